"""Workflow leases: one driver per workflow at a time, across every worker on one database."""

from __future__ import annotations

from events.store import EventStore


class Leases:
    """Short leases in table workflow_leases, held by `owner` for `seconds` at a time.

    A lease that expired is anyone's to take: a worker that died (SIGKILL, no clean-up) holds
    its workflows back only until then. The expected stream version on every append stays the
    last guard, so a lease that runs out mid-step costs a ConcurrencyError, never a double move.
    Every method raises StoreUnavailableError or StoreQueryError as the store's boundary does.
    """

    def __init__(self, store: EventStore, owner: str, seconds: float) -> None:
        self._store = store
        self.owner = owner
        self.seconds = seconds

    async def acquire(self, workflow_id: str) -> bool:
        """Take the workflow's lease (or extend our own); False when another owner holds it."""
        async with self._store.connection() as conn:
            cur = await conn.execute(
                "insert into workflow_leases (workflow_id, owner, expires_at)"
                " values (%s, %s, now() + make_interval(secs => %s))"
                " on conflict (workflow_id) do update set owner = excluded.owner,"
                " expires_at = excluded.expires_at"
                " where workflow_leases.expires_at < now()"
                " or workflow_leases.owner = excluded.owner"
                " returning owner",
                (workflow_id, self.owner, self.seconds),
            )
            return await cur.fetchone() is not None

    async def renew(self, workflow_id: str) -> bool:
        """Extend a lease we hold; False when we hold none (it expired and someone took it)."""
        async with self._store.connection() as conn:
            cur = await conn.execute(
                "update workflow_leases set expires_at = now() + make_interval(secs => %s)"
                " where workflow_id = %s and owner = %s returning owner",
                (self.seconds, workflow_id, self.owner),
            )
            return await cur.fetchone() is not None

    async def release(self, workflow_id: str) -> None:
        """Give the lease up (nothing happens when we do not hold it)."""
        async with self._store.connection() as conn:
            await conn.execute(
                "delete from workflow_leases where workflow_id = %s and owner = %s",
                (workflow_id, self.owner),
            )

    async def holders(self) -> dict[str, str]:
        """Workflow id -> owner, for every lease that has not expired."""
        async with self._store.connection() as conn:
            cur = await conn.execute(
                "select workflow_id::text, owner from workflow_leases where expires_at >= now()"
            )
            return {str(workflow_id): str(owner) for workflow_id, owner in await cur.fetchall()}
