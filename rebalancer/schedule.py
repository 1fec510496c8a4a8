"""The worker's schedule: claims of due workflows (table workflow_schedule), one owner each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from events.store import EventStore

# Every statement here commits without waiting for the WAL flush (see Schedule._write): the
# setting rides in the statement itself, joined as a one-row relation, so it costs no round
# trip of its own; it is evaluated whenever the statement touches a row, the only case in
# which its commit has anything to flush.
_LAZY = "(select set_config('synchronous_commit', 'off', true)) lazy"
# Due and not held: never claimed, released, or held by a worker whose claim ran out.
_CLAIM = (
    "with due as ("
    " select workflow_id from workflow_schedule"
    " where next_run_at <= now() and (claimed_by is null or claim_expires_at < now())"
    " order by next_run_at limit %s for update skip locked)"
    " update workflow_schedule s set claimed_by = %s,"
    " claim_expires_at = now() + make_interval(secs => %s)"
    f" from due, {_LAZY} where s.workflow_id = due.workflow_id"
    " returning s.workflow_id::text, s.version, s.failures, s.retries"
)
# Handing a workflow back: due at `due_in` only if nothing was appended since our fold (the
# version is ours); otherwise an append made it due now and that stays.
_RELEASE = (
    "update workflow_schedule set claimed_by = null, claim_expires_at = null,"
    " next_run_at = case when version = %s then now() + make_interval(secs => %s)"
    " else next_run_at end,"
    " failures = %s, retries = %s, last_error = %s"
    f" from {_LAZY} where workflow_id = %s and claimed_by = %s"
)


@dataclass(frozen=True, slots=True)
class Claim:
    """A due workflow this worker now holds, with its schedule counters."""

    workflow_id: str
    version: int
    failures: int
    retries: int


class Schedule:
    """Claims held by `owner` for `lease_seconds` at a time, renewed while it works.

    A claim that expired is anyone's to take: a worker that died (SIGKILL, no clean-up) holds
    its workflows back only until then. The expected stream version on every append stays the
    last guard, so a claim that runs out mid-step costs a ConcurrencyError, never a double move.
    Every method raises StoreUnavailableError or StoreQueryError as the store's boundary does.
    """

    def __init__(self, store: EventStore, owner: str, lease_seconds: float) -> None:
        self._store = store
        self.owner = owner
        self.lease_seconds = lease_seconds

    async def claim(self, limit: int) -> list[Claim]:
        """Up to `limit` due workflows, oldest due first, now ours."""
        rows, _ = await self._write(_CLAIM, (limit, self.owner, self.lease_seconds))
        return [Claim(str(w), int(v), int(f), int(r)) for w, v, f, r in rows]

    async def renew(self) -> int:
        """Extend every claim we hold; the number still ours."""
        _, count = await self._write(
            "update workflow_schedule set claim_expires_at = now() + make_interval(secs => %s)"
            f" from {_LAZY} where claimed_by = %s",
            (self.lease_seconds, self.owner),
        )
        return count

    async def release(
        self, workflow_id: str, version: int, due_in: float, *, failures: int = 0,
        retries: int = 0, error: str | None = None,
    ) -> None:
        """Hand the workflow back, due in `due_in` seconds unless something was appended after
        `version` (then it is due now); nothing happens when the claim is no longer ours."""
        await self._write(
            _RELEASE, (version, due_in, failures, retries, error, workflow_id, self.owner))

    async def finish(self, workflow_id: str, version: int) -> None:
        """The worker has nothing more to do for it: drop its row, unless something was
        appended after `version` (a command), which keeps it due."""
        _, count = await self._write(
            f"delete from workflow_schedule using {_LAZY} where workflow_id = %s"
            " and claimed_by = %s and version = %s",
            (workflow_id, self.owner, version),
        )
        if count == 0:
            await self.release(workflow_id, version, 0)

    async def park(self, workflow_id: str, error: str) -> None:
        """Never due again until an append: its stream cannot be folded, someone must look."""
        await self._write(
            "update workflow_schedule set claimed_by = null, claim_expires_at = null,"
            " next_run_at = 'infinity', last_error = %s"
            f" from {_LAZY} where workflow_id = %s and claimed_by = %s",
            (error, workflow_id, self.owner),
        )

    async def release_all(self) -> None:
        """Give up every claim we hold (a worker stopping), each due now."""
        await self._write(
            "update workflow_schedule set claimed_by = null, claim_expires_at = null"
            f" from {_LAZY} where claimed_by = %s",
            (self.owner,),
        )

    async def _write(self, query: str, params: Sequence[Any]) -> tuple[list[Any], int]:
        """Run one statement on the schedule: (the rows it returned, the rows it touched).

        Its commit does not wait for the WAL flush. Losing it with the server costs nothing
        but time: a claim lost is taken again once due, and a second holder of a workflow
        meets the expected stream version of its next append (never a double move); a release
        or finish lost leaves the row due or claimed until its claim runs out. What a
        workflow waits for is written by the append itself, which does wait.
        """
        async with self._store.connection() as conn:
            cur = await conn.execute(query, params)
            rows = await cur.fetchall() if cur.description is not None else []
            return rows, cur.rowcount

    async def next_due(self) -> float | None:
        """Seconds until the next workflow another claim does not hold falls due (<= 0: now);
        None when nothing is scheduled."""
        rows = await self._store.fetch_rows(
            "select extract(epoch from min(greatest(next_run_at, coalesce(claim_expires_at,"
            " next_run_at))) - now())::float8 from workflow_schedule"
            " where next_run_at < 'infinity'",
            (),
        )
        value = rows[0][0] if rows else None
        return None if value is None else float(value)

    async def holders(self) -> dict[str, str]:
        """Workflow id -> owner, for every claim in force."""
        rows = await self._store.fetch_rows(
            "select workflow_id::text, claimed_by from workflow_schedule"
            " where claimed_by is not null and claim_expires_at >= now()",
            (),
        )
        return {str(w): str(o) for w, o in rows}
