"""The operator token: who may act through the dashboard.

Actions are POSTs carrying the token in the `X-Operator-Token` header (the page's script) or
a `token` form field (no script). Nothing ambient authorizes them, no cookie and no HTTP
authentication the browser would replay on its own, so a page elsewhere that makes the
browser post here cannot supply the token: that is the defence against cross-site request
forgery. The Origin and Sec-Fetch-Site checks in app.py refuse such posts earlier still.
"""

from __future__ import annotations

import hmac

from rebalancer.errors import SpecError
from rebalancer.secret_files import read_secret_file
from rebalancer.settings import Settings

MIN_LENGTH = 16  # characters: a guessable token would be a password on money


def operator_token(settings: Settings) -> str | None:
    """The configured token (REBALANCER_OPERATOR_TOKEN, or the file that
    REBALANCER_OPERATOR_TOKEN_FILE names), None when there is none (read-only). Raises
    SpecError for both at once, an unreadable file or a short token, never showing it."""
    given = settings.operator_token.get_secret_value() if settings.operator_token else None
    path = settings.operator_token_file
    if given is not None and path is not None:
        raise SpecError("both REBALANCER_OPERATOR_TOKEN and REBALANCER_OPERATOR_TOKEN_FILE are"
                        " set: give the operator token one way")
    if path is not None:
        # Mode 600, as every file holding a secret: the token acts on the money.
        given = read_secret_file(path, "the operator token file")
    if given is None:
        return None
    given = given.strip()
    if len(given) < MIN_LENGTH:
        raise SpecError(f"the operator token is shorter than {MIN_LENGTH} characters; make a"
                        " longer one (e.g. `openssl rand -hex 24`)")
    return given


def token_matches(expected: str, given: str | None) -> bool:
    """Constant time in the given token's content: no timing tells how much of it was right."""
    if not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.strip().encode("utf-8"))
