"""Short workflow ids: the unique prefix a person types (`status` and `watch` print 8 hex digits)
turned into the canonical id the API and the store take (docs/contracts.md §3)."""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

from rebalancer.cli.common import UsageError, with_store
from rebalancer.settings import Settings

if TYPE_CHECKING:
    from events.store import EventStore

# Listed when a prefix is ambiguous; more than this and the prefix is simply too short.
SHOWN = 10
_PREFIX = re.compile(r"[0-9a-f]{1,31}")
# Where the canonical spelling has its hyphens (8-4-4-4-12).
_HYPHENS = (8, 12, 16, 20)

# One query over both places a workflow id is known: the read model, and the events the
# `workflows` projection has not applied yet (after its checkpoint, on the global-order index),
# so a workflow started a moment ago is found too. Creation events only: one row per workflow.
_MATCHES = """
select workflow_id::text as id from workflows where workflow_id::text like %s
union
select substr(stream_id, 10) from events
 where (transaction_id, position) > coalesce(
         (select (transaction_id, position) from projection_checkpoints where name = 'workflows'),
         ('0'::xid8, 0::bigint))
   and version = 1 and stream_id like 'workflow-' || %s
order by 1
limit %s
"""


def canonical(text: str) -> str | None:
    """The canonical id when `text` is a whole UUID in any spelling, else None."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


def prefix_of(text: str) -> str:
    """A prefix to look up, lower case; UsageError for what cannot start a workflow id."""
    digits = text.strip().lower().replace("-", "")
    if not _PREFIX.fullmatch(digits):
        raise UsageError(f"{text!r} is not a workflow id (a UUID or a unique prefix of one,"
                         " as `status` prints it)")
    # Hyphens where the canonical id has them, however (or whether) they were typed.
    for at in reversed(_HYPHENS):
        if len(digits) > at:
            digits = digits[:at] + "-" + digits[at:]
    return digits


async def matching(store: EventStore, prefix: str) -> list[str]:
    """Workflow ids starting with `prefix`, at most SHOWN + 1 of them."""
    pattern = prefix + "%"
    rows = await store.fetch_rows(_MATCHES, (pattern, pattern, SHOWN + 1))
    return [str(row[0]) for row in rows]


def pick(text: str, found: list[str]) -> str:
    """The one id `found` for `text`; UsageError (exit 2) for none or several."""
    if not found:
        raise UsageError(f"no workflow id starts with {text!r}")
    if len(found) > 1:
        more = " (and more: type more of the id)" if len(found) > SHOWN else ""
        count = f"{SHOWN}+" if len(found) > SHOWN else str(len(found))
        raise UsageError(f"{text!r} is ambiguous: {count} workflows start with it{more}:",
                         found[:SHOWN], listing=True)
    return found[0]


async def resolve_in(store: EventStore, text: str) -> str:
    """`text` as a canonical workflow id, looked up in `store` when it is a prefix."""
    whole = canonical(text)
    if whole is not None:
        return whole
    prefix = prefix_of(text)
    return pick(text, await matching(store, prefix))


def resolve_workflow_id(settings: Settings, text: str) -> str:
    """The canonical id for `text`: a whole UUID as is (no database needed, so commands that
    go only to NATS still work without one), a prefix looked up in one query."""
    whole = canonical(text)
    if whole is not None:
        return whole
    prefix = prefix_of(text)
    return pick(text, with_store(settings, lambda store: matching(store, prefix)))
