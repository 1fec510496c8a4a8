"""The simulated world: its database (schema `sim`), seeding, balances and one call's frame."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg import errors as pg_errors
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from rebalancer.accounts import Accounts, load_accounts
from rebalancer.errors import (
    DuplicateClientIdError,
    RejectedError,
    RetryableError,
    UnknownOutcomeError,
)
from rebalancer.exchanges.simulated import ledger
from rebalancer.exchanges.simulated.faults import Faults, faulted
from rebalancer.exchanges.simulated.ledger import Book, Conn, apply_book, fetch_all, fetch_one
from rebalancer.exchanges.simulated.port import SimulatedExchange
from rebalancer.exchanges.simulated.spec import (
    DEFAULT_WORLD,
    ZERO,
    WorldSpec,
    load_world,
    validate_world,
)

T = TypeVar("T")

SESSION_OPTIONS = (
    "-c lock_timeout=5000 -c idle_in_transaction_session_timeout=60000 "
    "-c application_name=rebalancer-sim"
)
_TX_ATTEMPTS = 5


class SimulatedWorld:
    """The simulated exchanges behind one database; `for_account` gives one account's port.

    Every call is one short transaction, so a worker may crash at any moment and the world
    stays whole; time is the database clock. A market maker per exchange is the counterparty
    of every trade, a fee account per exchange receives every fee, and money between a
    withdrawal and its deposit sits in the transit account: the total of each currency never
    changes. Raises SpecError for a bad world file or an unknown account, ValueError for bad
    knobs.
    """

    def __init__(
        self, pool: AsyncConnectionPool[Conn], *, world_path: Path | None, accounts: Accounts,
        faults: Faults, seed: int, time_scale: float,
    ) -> None:
        self._pool = pool
        self._world_path = world_path
        self._accounts = accounts
        self.faults = faults
        self.random_seed = seed
        self.time_scale = time_scale
        self._spec: WorldSpec | None = None
        self._ports: dict[str, SimulatedExchange] = {}
        # (currency, lower-case address, network) -> the account that owns it, and the tag
        # (memo) a deposit to it needs
        self._owners: dict[tuple[str, str, str], tuple[str, str | None]] = {
            (currency, a.address.lower(), a.network): (account.id, a.tag)
            for account in accounts.accounts.values()
            for currency in account.deposit_addresses
            for a in account.addresses(currency)
        }

    @classmethod
    async def open(
        cls,
        database_url: str,
        *,
        world: Path | str | None = None,
        accounts: Accounts | None = None,
        faults: str = "",
        seed: int = 0,
        time_scale: float = 1.0,
        auto_seed: bool = True,
        max_size: int = 10,
        connect_timeout: float = 10.0,
    ) -> SimulatedWorld:
        """Connect; seed the world from `world` unless the database already holds one.

        The knobs come from the caller (a process passes its Settings' sim_faults, sim_seed
        and sim_time_scale); `accounts` None means the built-in ones. Raises ValueError for a
        bad knob, SpecError for a bad world, RetryableError when the database cannot be reached.
        """
        try:
            parsed = Faults.parse(faults)
        except ValueError as e:
            raise ValueError(f"simulated world faults: {e}") from None
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(
                f"simulated world time scale must be a positive number, not {time_scale}")
        if accounts is None:
            accounts = load_accounts(None)
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            database_url, min_size=1, max_size=max_size, open=False, timeout=connect_timeout,
            connection_class=AsyncConnection[DictRow],
            kwargs={"autocommit": True, "options": SESSION_OPTIONS, "row_factory": dict_row},
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout as e:
            await pool.close()
            raise RetryableError("simulated world: cannot reach PostgreSQL") from e
        opened = cls(pool, world_path=Path(world) if world is not None else None,
                     accounts=accounts, faults=parsed, seed=seed, time_scale=time_scale)
        try:
            if auto_seed:
                await opened.seed()
        except BaseException:
            await pool.close()
            raise
        return opened

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> SimulatedWorld:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def accounts(self) -> Accounts:
        return self._accounts

    def for_account(self, account_id: str) -> SimulatedExchange:
        """The port of one configured account; raises SpecError for an unknown one."""
        port = self._ports.get(account_id)
        if port is None:
            port = self._ports[account_id] = SimulatedExchange(self, self._accounts.get(account_id))
        return port

    # -- administration (never faulted) ------------------------------------------------------

    async def seed(self, *, reset: bool = False) -> dict[str, Any]:
        """Create the world's balances once; a second call changes nothing unless `reset`.

        `reset` wipes every sim table (balances, operations, deposits) first.
        """
        path = self._world_path or DEFAULT_WORLD
        spec = load_world(path)
        validate_world(spec, self._accounts)

        async def run(conn: Conn) -> dict[str, Any]:
            # One seeder at a time; readers of sim.world are not blocked.
            await conn.execute("lock table sim.world in exclusive mode")
            row = await fetch_one(conn, "select seeded_at, source from sim.world")
            if row is not None and not reset:
                seeded = await fetch_all(conn, "select currency, amount from sim.seeded_totals"
                                               " order by currency")
                return {
                    "seeded": False,
                    "message": f"already seeded at {row['seeded_at'].isoformat()} from"
                               f" {row['source']}; nothing changed",
                    "source": row["source"], "seeded_at": row["seeded_at"],
                    "totals": {r["currency"]: r["amount"] for r in seeded},
                    "balances": {},
                }
            if row is not None:
                await conn.execute(
                    "truncate sim.deposits, sim.operations, sim.balances, sim.seeded_totals,"
                    " sim.world")
                # Ids from 1 again. Not `restart identity`: that needs the sequences' owner,
                # setval only the UPDATE the service role has (events/sql/011_roles.sql).
                await conn.execute(
                    "select setval(pg_get_serial_sequence('sim.operations', 'id'), 1, false),"
                    " setval(pg_get_serial_sequence('sim.deposits', 'id'), 1, false)")
                await conn.execute("update sim.fault_counter set value = 0")
            world_row = await fetch_one(
                conn, "insert into sim.world (source, config) values (%s, %s::jsonb)"
                      " returning seeded_at",
                (str(path), json.dumps(spec.model_dump(mode="json"))))
            assert world_row is not None
            book = Book()
            for holder, held in spec.balances.items():
                for currency, amount in held.items():
                    book.add(holder, currency, amount)
            await apply_book(conn, book)
            totals = {currency: ZERO for currency in spec.currencies()}
            for held in spec.balances.values():
                for currency, amount in held.items():
                    totals[currency] += amount
            for currency, amount in totals.items():
                await conn.execute(
                    "insert into sim.seeded_totals (currency, amount) values (%s, %s)",
                    (currency, amount))
            return {
                "seeded": True,
                "message": ("reset and seeded" if reset and row is not None else "seeded")
                           + f" from {path}",
                "source": str(path), "seeded_at": world_row["seeded_at"],
                "totals": dict(sorted(totals.items())),
                "balances": {h: dict(sorted(held.items()))
                             for h, held in sorted(spec.balances.items())},
            }

        result = await self._transact(run)
        if result["seeded"]:
            self._spec = spec
        return result

    async def now(self) -> datetime:
        """The world's clock (the database's)."""
        async with self._pool.connection() as conn:
            row = await fetch_one(conn, "select now() as now")
        assert row is not None
        return row["now"]  # type: ignore[no-any-return]

    async def check(self) -> tuple[bool, list[dict[str, Any]]]:
        """Per currency: seeded total, current total, difference; ok when nothing differs."""
        async with self._pool.connection() as conn:
            return await ledger.check_totals(conn)

    async def ledger(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Executed operations, oldest first (the last `limit` of them when given)."""
        await self._settle()
        async with self._pool.connection() as conn:
            return await ledger.executed(conn, limit)

    async def balances(self) -> dict[str, dict[str, Decimal]]:
        """Every account's holdings (reserved amounts included), for reports and tests."""
        await self._settle()
        async with self._pool.connection() as conn:
            return await ledger.holdings(conn)

    # -- what the ports use ------------------------------------------------------------------

    async def spec(self) -> WorldSpec:
        """The seeded world; raises RetryableError while it is not seeded."""
        spec = await self._seeded_world()
        if spec is None:
            # Retryable: an operator may seed it while workers wait.
            raise RetryableError("the simulated world is not seeded: run `rebalancer sim seed`")
        return spec

    def owner_of(self, currency: str, address: str, network: str,
                 tag: str | None) -> str | None:
        """The configured account a deposit address belongs to (None: not one of ours).

        Raises RejectedError when the address needs a tag (memo) and `tag` is not it: the
        money would arrive unattributed.
        """
        found = self._owners.get((currency, address.lower(), network))
        if found is None:
            return None
        owner, needed = found
        if needed is not None and tag != needed:
            given = "no tag" if tag is None else f"tag {tag!r}"
            raise RejectedError(
                f"{address} ({network}) takes {currency} deposits only with its tag (memo):"
                f" {given} given")
        return owner

    def scaled(self, seconds: float) -> float:
        """Seconds of simulated time as seconds of the database clock."""
        return seconds / self.time_scale

    async def call(self, what: str, run: Callable[[Conn], Awaitable[T]], *,
                   moves_money: bool) -> T:
        """One port call: injected faults around settlement and one transaction."""
        async def execute() -> T:
            await self._settle()
            return await self._transact(run, moves_money=moves_money)

        return await faulted(self.faults, self.random_seed, self._next_draw, what, execute,
                             moves_money=moves_money)

    # -- internals ---------------------------------------------------------------------------

    async def _seeded_world(self) -> WorldSpec | None:
        if self._spec is None:
            async with self._pool.connection() as conn:
                row = await fetch_one(conn, "select config from sim.world")
            if row is not None:
                self._spec = WorldSpec.model_validate(row["config"])
        return self._spec

    async def _transact(self, run: Callable[[Conn], Awaitable[T]], *,
                        moves_money: bool = False) -> T:
        """Run `run` in one transaction; a deadlock or lock timeout rolled everything back,
        so it is simply run again."""
        for attempt in range(_TX_ATTEMPTS):
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    return await run(conn)
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure,
                    pg_errors.LockNotAvailable) as e:
                if attempt == _TX_ATTEMPTS - 1:
                    raise RetryableError(f"simulated world busy: {e.sqlstate}") from e
                await asyncio.sleep(0.005 * (attempt + 1))
            except pg_errors.UniqueViolation as e:
                if e.diag.constraint_name == "operations_client_id":
                    # A concurrent call with the same client id committed first.
                    raise DuplicateClientIdError(
                        f"client id already used ({e.diag.message_detail}): reconcile by it"
                    ) from e
                raise
            except (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName) as e:
                raise RetryableError(
                    "the sim schema is missing: run `rebalancer db migrate`") from e
            except PoolTimeout as e:
                raise RetryableError("simulated world: no database connection") from e
            except psycopg.OperationalError as e:
                if moves_money:
                    raise UnknownOutcomeError(f"simulated world: connection lost: {e}") from e
                raise RetryableError(f"simulated world: database unavailable: {e}") from e
        raise AssertionError("unreachable")

    async def _next_draw(self) -> int:
        async with self._pool.connection() as conn:
            row = await fetch_one(conn, "update sim.fault_counter set value = value + 1"
                                        " where id = 1 returning value")
        return int(row["value"]) if row is not None else 0

    async def _settle(self) -> None:
        spec = await self._seeded_world()
        if spec is None:
            return
        await self._transact(lambda conn: ledger.settle_due(conn, spec))
