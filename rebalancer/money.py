"""The one money parser: every amount that enters the service (commands, CLI params, spec
literals, task configs) is read here, so one set of rules decides what an amount may be.

An amount is a Decimal, an int, or a decimal string of ASCII digits with an optional fraction
(`100`, `0.00000001`); exponent notation (`1E-8`) is read too, because it is how the service
writes its own Decimals back, but only within the same bounds. Refused: floats and bools,
NaN and infinities, zero and below, `_` separators, a sign, surrounding whitespace, non-ASCII
digits (Python's Decimal reads `١٠٠`), more than MAX_DIGITS significant digits, and
magnitudes outside [10**MIN_EXPONENT, 10**MAX_EXPONENT) - `1e30` and `1e999` among them.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Final

MAX_DIGITS: Final = 30
MAX_EXPONENT: Final = 18  # amounts stay below 10**18
MIN_EXPONENT: Final = -30  # and at or above 10**-30
_TEXT: Final = re.compile(r"[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]{1,4})?", re.ASCII)


def to_money(value: object) -> Decimal:
    """A positive, finite, bounded Decimal; raises ValueError saying what is wrong."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        if isinstance(value, float):
            raise ValueError(
                f"binary floats are not money: give {value!r} as a decimal string, e.g. '{value}'"
            )
        raise ValueError(f"expected a decimal amount, got {type(value).__name__} {value!r}")
    if isinstance(value, str):
        try:
            parsed: Decimal | None = Decimal(value) if value.isascii() else None
        except InvalidOperation:
            parsed = None
        if parsed is None or (not _TEXT.fullmatch(value) and parsed.is_finite() and parsed > 0):
            # the sign and non-finite forms get their own messages below
            raise ValueError(
                f"not a decimal number: {value!r} (ASCII digits with one optional '.' and"
                " exponent, e.g. 1000.5 or 1E-8; no sign, spaces, '_' or ',')")
        amount = parsed
    else:
        amount = Decimal(value)
    if not amount.is_finite():
        raise ValueError(f"amount must be finite, not {value!r}")
    if amount <= 0:
        raise ValueError(f"amount must be greater than 0, not {value!r}")
    if len(amount.as_tuple().digits) > MAX_DIGITS:
        raise ValueError(f"amount has more than {MAX_DIGITS} significant digits: {value!r}")
    if not MIN_EXPONENT <= amount.adjusted() < MAX_EXPONENT:
        raise ValueError(
            f"amount must be at least 1e{MIN_EXPONENT} and below 1e{MAX_EXPONENT}, not {value!r}")
    return amount


__all__ = ["MAX_DIGITS", "MAX_EXPONENT", "MIN_EXPONENT", "to_money"]
