"""A stateful, deterministic simulated world of several exchanges, kept in schema `sim`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import yaml
from psycopg import AsyncConnection
from psycopg import errors as pg_errors
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rebalancer.accounts import Account, Accounts, load_accounts
from rebalancer.errors import (
    DuplicateClientIdError,
    RejectedError,
    RetryableError,
    SpecError,
    UnknownOutcomeError,
)
from rebalancer.exchanges.base import (
    Deposit,
    HistoryMatch,
    MarketRules,
    MasterTransferRequest,
    Order,
    OrderRequest,
    OrderStatus,
    OrderType,
    Side,
    Transfer,
    TransferRequest,
    TransferStatus,
    Wallet,
    Withdrawal,
    WithdrawalRules,
    WithdrawRequest,
)

T = TypeVar("T")
Conn = AsyncConnection[DictRow]

DEFAULT_WORLD = Path(__file__).resolve().parent.parent / "defaults" / "world.yaml"
FAULT_KEYS = ("lost_response", "timeout", "rate_limit", "reject", "latency_ms")
SESSION_OPTIONS = (
    "-c lock_timeout=5000 -c idle_in_transaction_session_timeout=60000 "
    "-c application_name=rebalancer-sim"
)
FUTURES_SUFFIX = ":futures"
ZERO = Decimal(0)
_FEE_QUANTUM = Decimal("0.00000001")
_TX_ATTEMPTS = 5

# What each exchange calls our unified states (connectors map these back; EXCHANGES.md).
_RAW: dict[str, dict[str, str]] = {
    "upbit": {
        "order_open": "wait", "order_partial": "wait", "order_closed": "done",
        "order_refunded": "cancel",  # a market buy whose KRW leftover was refunded
        "withdraw_pending": "PROCESSING", "withdraw_ok": "DONE",
        "deposit_pending": "PROCESSING", "deposit_ok": "ACCEPTED", "transfer_ok": "DONE",
    },
    "binance": {
        "order_open": "NEW", "order_partial": "PARTIALLY_FILLED", "order_closed": "FILLED",
        "order_refunded": "FILLED",
        "withdraw_pending": "4", "withdraw_ok": "6",
        "deposit_pending": "0", "deposit_ok": "1", "transfer_ok": "CONFIRMED",
    },
}


def _raw(exchange: str, key: str) -> str:
    return _RAW.get(exchange, _RAW["binance"])[key]


# -- the world file -------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Delays(_Frozen):
    """Seconds of simulated time, divided by the time scale at run time."""

    withdrawal_seconds: float = Field(default=5, ge=0)
    confirmation_seconds: float = Field(default=60, ge=0)
    internal_seconds: float = Field(default=1, ge=0)
    limit_fill_seconds: float = Field(default=10, ge=0)


class MarketSpec(_Frozen):
    """One market: a fixed mid price with a spread, fees and the exchange's order rules."""

    mid: Decimal = Field(gt=0)
    spread: Decimal = Field(ge=0)
    taker_fee: Decimal = Field(ge=0, lt=1)
    min_notional: Decimal = Field(ge=0)
    amount_step: Decimal = Field(gt=0)
    market_buy_by_quote_only: bool = False
    price_ticks: tuple[tuple[Decimal, Decimal], ...] = ((ZERO, Decimal("0.00000001")),)

    @field_validator("price_ticks")
    @classmethod
    def _highest_first(
        cls, ticks: tuple[tuple[Decimal, Decimal], ...]
    ) -> tuple[tuple[Decimal, Decimal], ...]:
        if not ticks or any(tick <= 0 for _, tick in ticks):
            raise ValueError("price_ticks needs (floor, tick) rows with positive ticks")
        return tuple(sorted(ticks, key=lambda row: row[0], reverse=True))

    @property
    def bid(self) -> Decimal:
        return self.mid - self.spread / 2

    @property
    def ask(self) -> Decimal:
        return self.mid + self.spread / 2

    def rules(self, symbol: str) -> MarketRules:
        base, quote = symbol.split("/")
        return MarketRules(
            symbol=symbol, base=base, quote=quote, min_notional=self.min_notional,
            amount_step=self.amount_step, taker_fee=self.taker_fee,
            market_buy_by_quote_only=self.market_buy_by_quote_only,
            price_ticks=self.price_ticks,
        )


class WithdrawalSpec(_Frozen):
    currency: str
    network: str
    fee: Decimal = Field(ge=0)
    minimum: Decimal = Field(ge=0)
    multiple: Decimal = Field(gt=0)
    fee_included: bool

    def rules(self) -> WithdrawalRules:
        return WithdrawalRules(
            currency=self.currency, network=self.network, fee=self.fee, minimum=self.minimum,
            multiple=self.multiple, fee_included=self.fee_included,
        )


class ExchangeSpec(_Frozen):
    market_maker: str
    fee_account: str
    internal_transfers: bool = False  # withdrawals to the same exchange skip the chain
    withdraw_client_ids: bool = False  # the exchange de-duplicates withdrawals by client id
    futures: bool = False
    sub_accounts: bool = False
    markets: dict[str, MarketSpec] = Field(default_factory=dict)
    withdrawals: tuple[WithdrawalSpec, ...] = ()


class WorldSpec(_Frozen):
    """What the exchanges know: markets, fees, rules, delays and the starting balances."""

    delays: Delays = Delays()
    transit_account: str = "transit"
    external_account: str = "external"
    exchanges: dict[str, ExchangeSpec]
    balances: dict[str, dict[str, Decimal]] = Field(default_factory=dict)

    def currencies(self) -> set[str]:
        found = {c for held in self.balances.values() for c in held}
        for exchange in self.exchanges.values():
            for symbol in exchange.markets:
                found.update(symbol.split("/"))
            found.update(w.currency for w in exchange.withdrawals)
        return found


def load_world(path: Path | None = None) -> WorldSpec:
    """The world file (default: the demo world); raises SpecError when it is unreadable or bad."""
    path = path or DEFAULT_WORLD
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return WorldSpec.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as e:
        raise SpecError(f"bad simulated world {path}: {e}") from e


def _validate_world(world: WorldSpec, accounts: Accounts) -> None:
    """The world must know every configured account's exchange and every seeded account."""
    known = set(accounts.accounts) | {world.transit_account, world.external_account}
    for name, exchange in world.exchanges.items():
        for own in (exchange.market_maker, exchange.fee_account):
            if own in accounts:
                raise SpecError(f"world: {name}'s {own!r} is also a configured account")
            known.add(own)
        for symbol, market in exchange.markets.items():
            if symbol.count("/") != 1:
                raise SpecError(f"world: market {symbol!r} is not BASE/QUOTE")
            for side, price in (("bid", market.bid), ("ask", market.ask)):
                if price <= 0 or price % _tick(market, price) != 0:
                    raise SpecError(f"world: {name} {symbol} {side} {price} is not on a tick")
    for account in accounts.accounts.values():
        spec = world.exchanges.get(account.exchange)
        if spec is None:
            raise SpecError(f"world: no exchange {account.exchange!r} for account {account.id}")
        if spec.futures:
            known.add(account.id + FUTURES_SUFFIX)
    for holder in world.balances:
        if holder not in known:
            raise SpecError(f"world: balances for unknown account {holder!r}")
    for holder, held in world.balances.items():
        for currency, amount in held.items():
            if amount < 0:
                raise SpecError(f"world: negative {currency} balance for {holder}")


# -- faults ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    """Fault probabilities per call (0..1) and a latency, e.g. `timeout=0.05,latency_ms=20`."""

    lost_response: float = 0.0
    timeout: float = 0.0
    rate_limit: float = 0.0
    reject: float = 0.0
    latency_ms: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> Faults:
        """Raises ValueError naming the offending key."""
        values: dict[str, float] = {}
        for part in (text or "").split(","):
            if not part.strip():
                continue
            key, sep, raw = part.partition("=")
            key = key.strip()
            if key not in FAULT_KEYS:
                raise ValueError(
                    f"unknown fault {key!r} in {text!r} (known: {', '.join(FAULT_KEYS)})"
                )
            if not sep:
                raise ValueError(f"fault {key!r} needs a value, e.g. {key}=0.1")
            if key in values:
                raise ValueError(f"fault {key!r} given twice")
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"fault {key!r}: {raw.strip()!r} is not a number") from None
            if key == "latency_ms":
                if not (math.isfinite(value) and value >= 0):
                    raise ValueError(f"fault {key!r}: must be a number of milliseconds >= 0")
            elif not 0 <= value <= 1:
                raise ValueError(f"fault {key!r}: a probability must be within 0..1")
            values[key] = value
        return cls(**values)

    def __str__(self) -> str:
        return ",".join(f"{key}={getattr(self, key):g}" for key in FAULT_KEYS)


def _draw(seed: int, counter: int, kind: str) -> float:
    """A uniform number in [0, 1) that depends only on (seed, counter, kind)."""
    digest = hashlib.sha256(f"{seed}:{counter}:{kind}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# -- money helpers --------------------------------------------------------------------------


def _floor(amount: Decimal, step: Decimal) -> Decimal:
    return (amount / step).to_integral_value(rounding=ROUND_DOWN) * step


def _fee(gross: Decimal, rate: Decimal) -> Decimal:
    return (gross * rate).quantize(_FEE_QUANTUM, rounding=ROUND_HALF_UP)


def _tick(market: MarketSpec, price: Decimal) -> Decimal:
    for floor, tick in market.price_ticks:
        if price >= floor:
            return tick
    return market.price_ticks[-1][1]


def _wallet_account(account: str, wallet: Wallet) -> str:
    return account + FUTURES_SUFFIX if wallet == Wallet.FUTURES else account


class _Book:
    """Balance changes collected during one operation, applied together in a fixed order."""

    def __init__(self) -> None:
        self.deltas: dict[tuple[str, str], list[Decimal]] = {}
        self.required: dict[tuple[str, str], Decimal] = {}

    def add(self, account: str, currency: str, amount: Decimal = ZERO,
            locked: Decimal = ZERO) -> None:
        entry = self.deltas.setdefault((account, currency), [ZERO, ZERO])
        entry[0] += amount
        entry[1] += locked

    def move(self, currency: str, source: str, dest: str, amount: Decimal) -> None:
        self.add(source, currency, -amount)
        self.add(dest, currency, amount)

    def require(self, account: str, currency: str, free: Decimal) -> None:
        """The account must hold at least `free` unreserved before this operation."""
        self.required[(account, currency)] = free
        self.add(account, currency)


_APPLY = """
insert into sim.balances as b (account, currency, amount, locked)
select a, c, d, l from unnest(%s::text[], %s::text[], %s::numeric[], %s::numeric[]) as t(a, c, d, l)
order by a, c
on conflict (account, currency) do update
    set amount = b.amount + excluded.amount, locked = b.locked + excluded.locked
returning account, currency, amount, locked
"""


async def _apply(conn: Conn, book: _Book) -> None:
    """Apply the book; raises RejectedError (and so rolls back) when a free balance goes short.

    Rows are locked in (account, currency) order by one statement, so two operations touching
    the same market maker from opposite sides cannot deadlock each other.
    """
    keys = sorted(book.deltas)
    if not keys:
        return
    cur = await conn.execute(_APPLY, (
        [k[0] for k in keys], [k[1] for k in keys],
        [book.deltas[k][0] for k in keys], [book.deltas[k][1] for k in keys],
    ))
    for row in await cur.fetchall():
        key = (row["account"], row["currency"])
        free_after = row["amount"] - row["locked"]
        delta = book.deltas[key][0] - book.deltas[key][1]
        free_before = free_after - delta
        needed = max(-delta, book.required.get(key, ZERO))
        if free_after < 0 or row["locked"] < 0 or free_before < book.required.get(key, ZERO):
            raise RejectedError(
                f"insufficient {key[1]} on {key[0]}: {free_before.normalize():f} available,"
                f" {needed.normalize():f} needed"
            )


async def _one(conn: Conn, sql: str, params: Any = None) -> DictRow | None:
    cur = await conn.execute(sql, params)
    return await cur.fetchone()


async def _all(conn: Conn, sql: str, params: Any = None) -> list[DictRow]:
    cur = await conn.execute(sql, params)
    return await cur.fetchall()


# -- the world ------------------------------------------------------------------------------


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
        # (currency, lower-case address, network, tag) -> the account that owns it
        self._owners: dict[tuple[str, str, str, str | None], str] = {
            (currency, a.address.lower(), a.network, a.tag): account.id
            for account in accounts.accounts.values()
            for currency, a in account.deposit_addresses.items()
        }

    @classmethod
    async def open(
        cls,
        database_url: str,
        *,
        world: Path | str | None = None,
        accounts: Accounts | None = None,
        faults: str | None = None,
        seed: int | None = None,
        time_scale: float | None = None,
        auto_seed: bool = True,
        max_size: int = 10,
        connect_timeout: float = 10.0,
    ) -> SimulatedWorld:
        """Connect; seed the world from `world` unless the database already holds one.

        Knobs not given are read from REBALANCER_SIM_FAULTS, REBALANCER_SIM_SEED and
        REBALANCER_SIM_TIME_SCALE; accounts from REBALANCER_CONFIG (or the defaults).
        Raises ValueError for a bad knob, SpecError for a bad world, RetryableError when the
        database cannot be reached.
        """
        parsed = Faults.parse(faults if faults is not None
                              else os.environ.get("REBALANCER_SIM_FAULTS", ""))
        if seed is None:
            raw_seed = os.environ.get("REBALANCER_SIM_SEED", "").strip() or "0"
            try:
                seed = int(raw_seed)
            except ValueError:
                raise ValueError(f"REBALANCER_SIM_SEED: {raw_seed!r} is not an integer") from None
        if time_scale is None:
            raw_scale = os.environ.get("REBALANCER_SIM_TIME_SCALE", "").strip() or "1"
            try:
                time_scale = float(raw_scale)
            except ValueError:
                raise ValueError(
                    f"REBALANCER_SIM_TIME_SCALE: {raw_scale!r} is not a number") from None
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time scale must be a positive number, not {time_scale}")
        if accounts is None:
            config = os.environ.get("REBALANCER_CONFIG")
            accounts = load_accounts(Path(config) if config else None)
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
        _validate_world(spec, self._accounts)

        async def run(conn: Conn) -> dict[str, Any]:
            # One seeder at a time; readers of sim.world are not blocked.
            await conn.execute("lock table sim.world in exclusive mode")
            row = await _one(conn, "select seeded_at, source from sim.world")
            if row is not None and not reset:
                seeded = await _all(conn, "select currency, amount from sim.seeded_totals"
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
                    " sim.world restart identity")
                await conn.execute("update sim.fault_counter set value = 0")
            world_row = await _one(
                conn, "insert into sim.world (source, config) values (%s, %s::jsonb)"
                      " returning seeded_at",
                (str(path), json.dumps(spec.model_dump(mode="json"))))
            assert world_row is not None
            book = _Book()
            for holder, held in spec.balances.items():
                for currency, amount in held.items():
                    book.add(holder, currency, amount)
            await _apply(conn, book)
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
            row = await _one(conn, "select now() as now")
        assert row is not None
        return row["now"]  # type: ignore[no-any-return]

    async def totals(self) -> dict[str, Decimal]:
        """Per currency, the sum over every sim account (transit and fee accounts included)."""
        async with self._pool.connection() as conn:
            rows = await _all(conn, "select currency, sum(amount) as total from sim.balances"
                                    " group by currency order by currency")
        return {r["currency"]: r["total"] for r in rows}

    async def check(self) -> tuple[bool, list[dict[str, Any]]]:
        """Per currency: seeded total, current total, difference; ok when nothing differs."""
        async with self._pool.connection() as conn:
            seeded = await _one(conn, "select 1 as x from sim.world")
            rows = await _all(conn, """
                select coalesce(s.currency, b.currency) as currency,
                       coalesce(s.amount, 0) as seeded, coalesce(b.total, 0) as current
                from sim.seeded_totals s
                full join (select currency, sum(amount) as total from sim.balances
                           group by currency) b on b.currency = s.currency
                order by 1""")
        result = [
            {"currency": r["currency"], "seeded": r["seeded"], "current": r["current"],
             "difference": r["current"] - r["seeded"]}
            for r in rows
        ]
        ok = seeded is not None and all(r["difference"] == 0 for r in result)
        return ok, result

    async def ledger(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Executed operations, oldest first (the last `limit` of them when given)."""
        await self._settle()
        async with self._pool.connection() as conn:
            rows = await _all(conn, """
                select * from (
                    select id, created_at, exchange, account, kind, client_id, audit_ref,
                           currency, amount, fee, fee_currency, txid, status, raw_status,
                           symbol, side, cost, to_account, from_account, internal, ref
                    from sim.operations order by id desc limit %s) last
                order by id""", (limit,))
        return [dict(r) for r in rows]

    async def balances(self) -> dict[str, dict[str, Decimal]]:
        """Every account's holdings (reserved amounts included), for reports and tests."""
        await self._settle()
        async with self._pool.connection() as conn:
            rows = await _all(conn, "select account, currency, amount from sim.balances"
                                    " order by account, currency")
        found: dict[str, dict[str, Decimal]] = {}
        for r in rows:
            found.setdefault(r["account"], {})[r["currency"]] = r["amount"]
        return found

    # -- internals ---------------------------------------------------------------------------

    async def _seeded_world(self) -> WorldSpec | None:
        if self._spec is None:
            async with self._pool.connection() as conn:
                row = await _one(conn, "select config from sim.world")
            if row is not None:
                self._spec = WorldSpec.model_validate(row["config"])
        return self._spec

    async def _world(self) -> WorldSpec:
        spec = await self._seeded_world()
        if spec is None:
            # Retryable: an operator may seed it while workers wait.
            raise RetryableError("the simulated world is not seeded: run `rebalancer sim seed`")
        return spec

    def _owner(self, currency: str, address: str, network: str, tag: str | None) -> str | None:
        return self._owners.get((currency, address.lower(), network, tag))

    def _seconds(self, seconds: float) -> float:
        return seconds / self.time_scale

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
            row = await _one(conn, "update sim.fault_counter set value = value + 1"
                                   " where id = 1 returning value")
        return int(row["value"]) if row is not None else 0

    async def _call(self, what: str, run: Callable[[Conn], Awaitable[T]], *,
                    moves_money: bool) -> T:
        """One port call: injected faults around settlement and one transaction."""
        f = self.faults
        if f.latency_ms > 0:
            await asyncio.sleep(f.latency_ms / 1000)
        lost = False
        kinds = ("rate_limit", "timeout", "reject", "lost_response") if moves_money \
            else ("rate_limit", "timeout")
        if any(getattr(f, kind) > 0 for kind in kinds):
            counter = await self._next_draw()
            hit = {kind: _draw(self.random_seed, counter, kind) < getattr(f, kind)
                   for kind in kinds}
            if hit["rate_limit"]:
                raise RetryableError(f"simulated rate limit on {what}: nothing happened")
            if hit["timeout"]:
                if moves_money:
                    # Nothing was executed, but a caller that timed out cannot know that.
                    raise UnknownOutcomeError(f"simulated timeout on {what}")
                raise RetryableError(f"simulated timeout on {what}")
            if moves_money and hit["reject"]:
                raise RejectedError(f"simulated rejection of {what}")
            lost = moves_money and hit["lost_response"]
        await self._settle()
        try:
            result = await self._transact(run, moves_money=moves_money)
        except RejectedError as e:
            if lost:  # the refusal was lost on the way back, like any other answer
                raise UnknownOutcomeError(
                    f"simulated lost response: {what} was answered, no answer arrived") from e
            raise
        if lost:
            raise UnknownOutcomeError(f"simulated lost response: {what} executed, no answer")
        return result

    async def _settle(self) -> None:
        """Everything that came due: resting-order fills, sent withdrawals, arrived deposits."""
        spec = await self._seeded_world()
        if spec is None:
            return
        await self._transact(lambda conn: self._settle_in(conn, spec))

    async def _settle_in(self, conn: Conn, spec: WorldSpec) -> None:
        book = _Book()
        orders = await _all(conn, """
            select *, now() as db_now from sim.operations
            where kind = 'order' and status = 'open' and next_fill_at <= now()
            order by id for update skip locked""")
        for order in orders:
            ex = spec.exchanges[order["exchange"]]
            market = ex.markets[order["symbol"]]
            requested: Decimal = order["requested_amount"]
            half = _floor(requested / 2, market.amount_step)
            done = order["last_fill_at"] <= order["db_now"] or half <= 0
            target = requested if done else half
            fill = target - order["amount"]
            if fill <= 0:
                continue
            cost, fee = _fill(book, ex, order["account"], order["symbol"], market,
                              Side(order["side"]), fill, order["price"], reserved=True)
            await conn.execute("""
                update sim.operations set amount = amount + %s, cost = cost + %s,
                    fee = fee + %s, status = %s, raw_status = %s, next_fill_at = %s,
                    updated_at = now()
                where id = %s""", (
                fill, cost, fee, "closed" if done else "open",
                _raw(order["exchange"], "order_closed" if done else "order_partial"),
                None if done else order["last_fill_at"], order["id"]))
        # Sent withdrawals get their txid and their deposits show it too. An internal one gets
        # what Binance reports ("Internal transfer <id>") in the port's normalised form, <id>.
        await conn.execute("""
            with sent as (
                update sim.operations set status = 'ok',
                    raw_status = coalesce(%s::jsonb ->> exchange, 'ok'),
                    txid = case when internal then id::text else encode(sha256(convert_to(
                        'sim-withdrawal:' || exchange || ':' || id, 'UTF8')), 'hex') end,
                    updated_at = now()
                where kind = 'withdraw' and status = 'pending' and complete_at <= now()
                returning id, txid)
            update sim.deposits d set txid = sent.txid from sent where d.withdrawal_id = sent.id
            """, (json.dumps({name: raw["withdraw_ok"] for name, raw in _RAW.items()}),))
        deposits = await _all(conn, """
            select * from sim.deposits where status = 'pending' and arrive_at <= now()
            order by id for update skip locked""")
        for deposit in deposits:
            book.move(deposit["currency"], spec.transit_account, deposit["account"],
                      deposit["amount"])
            row = await _one(conn, """
                insert into sim.operations (exchange, account, kind, currency, amount, fee, txid,
                    status, raw_status, address, network, tag, internal, ref)
                values (%s, %s, 'deposit', %s, %s, 0, %s, 'ok', %s, %s, %s, %s, %s, %s)
                returning id""", (
                deposit["exchange"], deposit["account"], deposit["currency"], deposit["amount"],
                deposit["txid"], _raw(deposit["exchange"], "deposit_ok"), deposit["address"],
                deposit["network"], deposit["tag"], deposit["internal"],
                deposit["withdrawal_id"]))
            assert row is not None
            await conn.execute(
                "update sim.deposits set status = 'ok', credited_at = now(), operation_id = %s"
                " where id = %s", (row["id"], deposit["id"]))
        await _apply(conn, book)


def _fill(book: _Book, ex: ExchangeSpec, account: str, symbol: str, market: MarketSpec,
          side: Side, amount: Decimal, price: Decimal, *, reserved: bool = False,
          ) -> tuple[Decimal, Decimal]:
    """Book one fill against the market maker; the fee comes out of what the account receives.

    `reserved`: the paying side was locked when the order started resting. Returns (cost, fee).
    """
    base, quote = symbol.split("/")
    cost = amount * price
    if side == Side.BUY:
        fee = _fee(amount, market.taker_fee)
        book.add(account, quote, -cost, -cost if reserved else ZERO)
        book.add(ex.market_maker, quote, cost)
        book.add(ex.market_maker, base, -amount)
        book.add(account, base, amount - fee)
        book.add(ex.fee_account, base, fee)
    else:
        fee = _fee(cost, market.taker_fee)
        book.add(account, base, -amount, -amount if reserved else ZERO)
        book.add(ex.market_maker, base, amount)
        book.add(ex.market_maker, quote, -cost)
        book.add(account, quote, cost - fee)
        book.add(ex.fee_account, quote, fee)
    return cost, fee


# -- one account's port ---------------------------------------------------------------------


class SimulatedExchange:
    """One configured account on one simulated exchange; implements the `Exchange` port.

    Raises RetryableError (nothing happened), RejectedError (final, nothing happened),
    UnknownOutcomeError (may or may not have happened) and DuplicateClientIdError (a client id
    used before: nothing new happened; reconcile by it).
    """

    def __init__(self, world: SimulatedWorld, account: Account) -> None:
        self._world = world
        self._account = account
        self.exchange: str = account.exchange
        self.account: str = account.id

    def __repr__(self) -> str:
        return f"SimulatedExchange({self.exchange}, {self.account})"

    async def _spec(self) -> ExchangeSpec:
        world = await self._world._world()
        spec = world.exchanges.get(self.exchange)
        if spec is None:
            raise RejectedError(f"the simulated world has no exchange {self.exchange!r}")
        return spec

    async def _market(self, symbol: str) -> MarketSpec:
        market = (await self._spec()).markets.get(symbol)
        if market is None:
            raise RejectedError(f"{self.exchange} has no market {symbol}")
        return market

    async def _read(self, what: str, run: Callable[[Conn], Awaitable[T]]) -> T:
        return await self._world._call(f"{what} on {self.account}", run, moves_money=False)

    async def _move(self, what: str, run: Callable[[Conn], Awaitable[T]]) -> T:
        return await self._world._call(f"{what} on {self.account}", run, moves_money=True)

    async def _claim(self, conn: Conn, kind: str, client_id: str | None) -> None:
        if client_id is None:
            return
        used = await _one(conn, "select id from sim.operations where exchange = %s and kind = %s"
                                " and client_id = %s", (self.exchange, kind, client_id))
        if used is not None:
            raise DuplicateClientIdError(
                f"{self.exchange} {kind} client id {client_id!r} was used before"
                f" (operation {used['id']}): reconcile by it, do not resend")

    # -- market data -------------------------------------------------------------------------

    async def market(self, symbol: str) -> MarketRules:
        async def run(conn: Conn) -> MarketRules:
            return (await self._market(symbol)).rules(symbol)
        return await self._read("market", run)

    async def ticker_price(self, symbol: str) -> Decimal:
        async def run(conn: Conn) -> Decimal:
            return (await self._market(symbol)).mid
        return await self._read("ticker", run)

    async def balance(self, currency: str, wallet: Wallet = Wallet.SPOT) -> Decimal:
        """The free (unreserved) amount in one wallet."""
        if wallet == Wallet.FUTURES and not (await self._spec()).futures:
            raise RejectedError(f"{self.exchange} has no futures wallet")
        holder = _wallet_account(self.account, wallet)

        async def run(conn: Conn) -> Decimal:
            row = await _one(conn, "select amount - locked as free from sim.balances"
                                   " where account = %s and currency = %s", (holder, currency))
            return row["free"] if row is not None else ZERO
        return await self._read("balance", run)

    # -- orders ------------------------------------------------------------------------------

    async def create_order(self, request: OrderRequest) -> Order:
        async def run(conn: Conn) -> Order:
            return await self._place(conn, request)
        return await self._move(f"order {request.client_id}", run)

    async def _place(self, conn: Conn, request: OrderRequest) -> Order:
        ex = await self._spec()
        market = await self._market(request.symbol)
        base, quote = request.symbol.split("/")
        side = Side(request.side)
        if request.amount is not None and request.quote_amount is not None:
            raise RejectedError("give either amount or quote_amount, not both")
        if request.quote_amount is not None and (
                side != Side.BUY or request.type != OrderType.MARKET):
            raise RejectedError("quote_amount is for market buys only")
        if request.type == OrderType.MARKET and request.price is not None:
            raise RejectedError("a market order takes no price")
        book = _Book()
        quote_amount = request.quote_amount
        if request.type == OrderType.MARKET:
            price = market.ask if side == Side.BUY else market.bid
            if side == Side.BUY and market.market_buy_by_quote_only and request.amount is not None:
                raise RejectedError(
                    f"{self.exchange}: a market buy is given by {quote} amount (quote_amount) only")
            if quote_amount is not None:
                if quote_amount <= 0:
                    raise RejectedError("quote_amount must be positive")
                notional = quote_amount
                amount = _floor(quote_amount / price, market.amount_step)
                book.require(self.account, quote, quote_amount)
            else:
                if request.amount is None or request.amount <= 0:
                    raise RejectedError("a positive amount is required")
                amount = _floor(request.amount, market.amount_step)
                notional = amount * price
            if notional < market.min_notional:
                raise RejectedError(
                    f"{request.symbol} order of {notional.normalize():f} {quote} is below the"
                    f" minimum {market.min_notional.normalize():f} {quote}")
            if amount <= 0:
                raise RejectedError(f"amount is below the step {market.amount_step}")
            resting = False
        else:
            if request.price is None or request.price <= 0:
                raise RejectedError("a limit order needs a positive price")
            if request.amount is None or request.amount <= 0:
                raise RejectedError("a limit order needs a positive amount")
            tick = _tick(market, request.price)
            if request.price % tick != 0:
                raise RejectedError(
                    f"price {request.price.normalize():f} is not a multiple of the tick"
                    f" {tick.normalize():f} at that price")
            amount = _floor(request.amount, market.amount_step)
            if amount <= 0:
                raise RejectedError(f"amount is below the step {market.amount_step}")
            notional = amount * request.price
            if notional < market.min_notional:
                raise RejectedError(
                    f"{request.symbol} order of {notional.normalize():f} {quote} is below the"
                    f" minimum {market.min_notional.normalize():f} {quote}")
            # Through the touch it trades at once, at the better book price.
            if side == Side.BUY and request.price >= market.ask:
                price, resting = market.ask, False
            elif side == Side.SELL and request.price <= market.bid:
                price, resting = market.bid, False
            else:
                price, resting = request.price, True
        await self._claim(conn, "order", request.client_id)
        if resting:
            # Reserve what the order may spend; it fills in two halves after a delay.
            if side == Side.BUY:
                book.add(self.account, quote, ZERO, amount * price)
            else:
                book.add(self.account, base, ZERO, amount)
            delay = self._world._seconds((await self._world._world()).delays.limit_fill_seconds)
            cost = fee = filled = ZERO
            status, raw = "open", _raw(self.exchange, "order_open")
        else:
            filled = amount
            cost, fee = _fill(book, ex, self.account, request.symbol, market, side, amount, price)
            delay = 0.0
            refunded = quote_amount is not None and cost < quote_amount
            status = "closed"
            raw = _raw(self.exchange, "order_refunded" if refunded else "order_closed")
        row = await _one(conn, """
            insert into sim.operations (exchange, account, kind, client_id, currency, amount,
                fee, fee_currency, status, raw_status, audit_ref, symbol, side, order_type,
                price, requested_amount, quote_amount, cost, next_fill_at, last_fill_at)
            values (%s, %s, 'order', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
                case when %s then now() + make_interval(secs => %s) end,
                case when %s then now() + make_interval(secs => %s) end)
            returning *""", (
            self.exchange, self.account, request.client_id, base, filled, fee,
            base if side == Side.BUY else quote, status, raw, request.client_id, request.symbol,
            side.value, OrderType(request.type).value,
            request.price if request.type == OrderType.LIMIT else None,
            amount if quote_amount is None else None, quote_amount, cost,
            resting, delay, resting, 2 * delay))
        assert row is not None
        await _apply(conn, book)
        return _order(row)

    async def fetch_order(self, client_id: str, symbol: str) -> Order | None:
        async def run(conn: Conn) -> Order | None:
            row = await _one(conn, """
                select * from sim.operations where exchange = %s and account = %s
                and kind = 'order' and client_id = %s and symbol = %s""",
                (self.exchange, self.account, client_id, symbol))
            return _order(row) if row is not None else None
        return await self._read("fetch_order", run)

    # -- withdrawals and deposits ------------------------------------------------------------

    async def withdrawal_rules(self, currency: str, network: str) -> WithdrawalRules:
        async def run(conn: Conn) -> WithdrawalRules:
            return (await self._withdrawal_spec(currency, network)).rules()
        return await self._read("withdrawal_rules", run)

    async def _withdrawal_spec(self, currency: str, network: str) -> WithdrawalSpec:
        if not network:
            raise RejectedError(f"{self.exchange}: a withdrawal needs a network")
        for rule in (await self._spec()).withdrawals:
            if rule.currency == currency and rule.network == network:
                return rule
        raise RejectedError(f"{self.exchange}: no {currency} withdrawals on network {network}")

    async def withdraw(self, request: WithdrawRequest) -> Withdrawal:
        async def run(conn: Conn) -> Withdrawal:
            return await self._withdraw(conn, request)
        return await self._move(f"withdraw {request.client_id}", run)

    async def _withdraw(self, conn: Conn, request: WithdrawRequest) -> Withdrawal:
        world = self._world
        spec = await world._world()
        ex = await self._spec()
        rule = await self._withdrawal_spec(request.currency, request.network)
        if not self._account.allows(request.currency, request.address, request.network,
                                    request.tag):
            raise RejectedError(
                f"{self.exchange}: {request.address} ({request.network}) is not a registered"
                f" {request.currency} withdrawal address of {self.account}")
        amount = request.amount
        if amount <= 0 or amount < rule.minimum:
            raise RejectedError(
                f"{amount.normalize():f} {request.currency} is below the withdrawal minimum"
                f" {rule.minimum.normalize():f}")
        if amount % rule.multiple != 0:
            raise RejectedError(
                f"{amount.normalize():f} {request.currency} is not a multiple of"
                f" {rule.multiple.normalize():f}")
        dest = world._owner(request.currency, request.address, request.network, request.tag)
        dest_exchange = (world.accounts.get(dest).exchange if dest is not None
                         else spec.external_account)
        internal = ex.internal_transfers and dest_exchange == self.exchange
        fee = ZERO if internal else rule.fee
        # Binance counts the fee inside the amount; Upbit charges it on top.
        debit, received = (amount, amount - fee) if rule.fee_included else (amount + fee, amount)
        if received <= 0:
            raise RejectedError(f"{amount.normalize():f} does not cover the fee {fee}")
        client_id = request.client_id if ex.withdraw_client_ids else None
        await self._claim(conn, "withdraw", client_id)
        delays = spec.delays
        if internal:
            sent = arrive = world._seconds(delays.internal_seconds)
        else:
            sent = world._seconds(delays.withdrawal_seconds)
            arrive = sent + world._seconds(delays.confirmation_seconds)
        row = await _one(conn, """
            insert into sim.operations (exchange, account, kind, client_id, currency, amount, fee,
                fee_currency, status, raw_status, audit_ref, address, network, tag, received,
                internal, to_account, complete_at)
            values (%s, %s, 'withdraw', %s, %s, %s, %s, %s, 'pending', %s, %s, %s, %s, %s, %s,
                %s, %s, now() + make_interval(secs => %s))
            returning *""", (
            self.exchange, self.account, client_id, request.currency, amount, fee,
            request.currency, _raw(self.exchange, "withdraw_pending"), request.client_id,
            request.address, request.network, request.tag, received, internal,
            dest or spec.external_account, sent))
        assert row is not None
        await conn.execute("""
            insert into sim.deposits (withdrawal_id, exchange, account, currency, amount,
                address, network, tag, internal, sent_at, arrive_at)
            values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
                now() + make_interval(secs => %s))""", (
            row["id"], dest_exchange, dest or spec.external_account, request.currency, received,
            request.address, request.network, request.tag, internal, row["complete_at"], arrive))
        book = _Book()
        book.add(self.account, request.currency, -debit)
        book.add(ex.fee_account, request.currency, fee)
        book.add(spec.transit_account, request.currency, received)
        await _apply(conn, book)
        return _withdrawal(row)

    async def fetch_withdrawal(self, client_id: str, match: HistoryMatch) -> Withdrawal | None:
        ex = await self._spec()

        async def run(conn: Conn) -> Withdrawal | None:
            if ex.withdraw_client_ids:
                row = await _one(conn, """
                    select * from sim.operations where exchange = %s and account = %s
                    and kind = 'withdraw' and client_id = %s""",
                    (self.exchange, self.account, client_id))
                return _withdrawal(row) if row is not None else None
            # No client id at this exchange: the history is all there is.
            rows = await _all(conn, """
                select * from sim.operations where account = %s and kind = 'withdraw'
                and currency = %s and amount = %s and created_at >= %s
                and (%s::text is null or address = %s)
                and (%s::text is null or id::text = %s)
                and id::text <> all(%s::text[]) order by id""",
                (self.account, match.currency, match.amount, match.since, match.address,
                 match.address, match.exchange_id, match.exchange_id, sorted(match.exclude_ids)))
            return _withdrawal(_single(rows, "withdrawal", match)) if rows else None
        return await self._read("fetch_withdrawal", run)

    async def fetch_deposits(self, currency: str, since: datetime) -> list[Deposit]:
        async def run(conn: Conn) -> list[Deposit]:
            rows = await _all(conn, """
                select * from sim.deposits where account = %s and currency = %s
                and sent_at <= now() and sent_at >= %s order by id""",
                (self.account, currency, since))
            return [_deposit(r) for r in rows]
        return await self._read("fetch_deposits", run)

    # -- transfers ---------------------------------------------------------------------------

    async def transfer(self, request: TransferRequest) -> Transfer:
        async def run(conn: Conn) -> Transfer:
            if not (await self._spec()).futures:
                raise RejectedError(f"{self.exchange} has no futures wallet")
            if request.from_wallet == request.to_wallet:
                raise RejectedError("a transfer needs two different wallets")
            if request.amount <= 0:
                raise RejectedError("a transfer needs a positive amount")
            book = _Book()
            book.move(request.currency, _wallet_account(self.account, request.from_wallet),
                      _wallet_account(self.account, request.to_wallet), request.amount)
            # The exchange takes no client id here: the caller's id is kept for audits only.
            row = await _one(conn, """
                insert into sim.operations (exchange, account, kind, client_id, currency, amount,
                    status, raw_status, audit_ref, from_account, to_account, from_wallet,
                    to_wallet)
                values (%s, %s, 'transfer', null, %s, %s, 'ok', %s, %s, %s, %s, %s, %s)
                returning *""", (
                self.exchange, self.account, request.currency, request.amount,
                _raw(self.exchange, "transfer_ok"), request.client_id, self.account,
                self.account, Wallet(request.from_wallet).value,
                Wallet(request.to_wallet).value))
            assert row is not None
            await _apply(conn, book)
            return _transfer(row)
        return await self._move(f"transfer {request.client_id}", run)

    async def fetch_transfer(self, client_id: str, match: HistoryMatch) -> Transfer | None:
        async def run(conn: Conn) -> Transfer | None:
            rows = await _all(conn, """
                select * from sim.operations where account = %s and kind = 'transfer'
                and currency = %s and amount = %s and created_at >= %s
                and (%s::text is null or id::text = %s)
                and id::text <> all(%s::text[]) order by id""",
                (self.account, match.currency, match.amount, match.since, match.exchange_id,
                 match.exchange_id, sorted(match.exclude_ids)))
            return _transfer(_single(rows, "transfer", match)) if rows else None
        return await self._read("fetch_transfer", run)

    async def master_transfer(self, request: MasterTransferRequest) -> Transfer:
        async def run(conn: Conn) -> Transfer:
            if not (await self._spec()).sub_accounts:
                raise RejectedError(f"{self.exchange} has no sub-accounts")
            if self._account.kind != "master":
                raise RejectedError(
                    f"{self.account} is not a master account: sub-account transfers need the"
                    " master's key")
            for side in (request.from_account, request.to_account):
                if side == self.account:
                    continue
                other = self._world.accounts.accounts.get(side)
                if other is None or other.kind != "sub" or other.master_account != self.account:
                    raise RejectedError(f"{side} is not a sub-account of {self.account}")
            source = _wallet_account(request.from_account, Wallet(request.from_wallet))
            dest = _wallet_account(request.to_account, Wallet(request.to_wallet))
            if source == dest:
                raise RejectedError("a transfer needs two different wallets")
            if request.amount <= 0:
                raise RejectedError("a transfer needs a positive amount")
            if Wallet.FUTURES in (request.from_wallet, request.to_wallet) and \
                    not (await self._spec()).futures:
                raise RejectedError(f"{self.exchange} has no futures wallet")
            await self._claim(conn, "master_transfer", request.client_id)
            book = _Book()
            book.move(request.currency, source, dest, request.amount)
            row = await _one(conn, """
                insert into sim.operations (exchange, account, kind, client_id, currency, amount,
                    status, raw_status, audit_ref, from_account, to_account, from_wallet,
                    to_wallet)
                values (%s, %s, 'master_transfer', %s, %s, %s, 'ok', %s, %s, %s, %s, %s, %s)
                returning *""", (
                self.exchange, self.account, request.client_id, request.currency,
                request.amount, _raw(self.exchange, "transfer_ok"), request.client_id,
                request.from_account, request.to_account, Wallet(request.from_wallet).value,
                Wallet(request.to_wallet).value))
            assert row is not None
            await _apply(conn, book)
            return _transfer(row)
        return await self._move(f"master transfer {request.client_id}", run)

    async def fetch_master_transfer(self, client_id: str,
                                    match: HistoryMatch) -> Transfer | None:
        async def run(conn: Conn) -> Transfer | None:
            row = await _one(conn, """
                select * from sim.operations where exchange = %s and account = %s
                and kind = 'master_transfer' and client_id = %s""",
                (self.exchange, self.account, client_id))
            return _transfer(row) if row is not None else None
        return await self._read("fetch_master_transfer", run)


# -- rows -> our models ---------------------------------------------------------------------


def _single(rows: list[DictRow], what: str, match: HistoryMatch) -> DictRow:
    if len(rows) > 1:
        raise UnknownOutcomeError(
            f"{len(rows)} {what}s of {match.amount.normalize():f} {match.currency} since"
            f" {match.since.isoformat()} match: cannot tell which one is ours")
    return rows[0]


def _plain(row: DictRow, *keys: str) -> dict[str, Any]:
    return {k: (str(row[k]) if isinstance(row[k], Decimal | datetime) else row[k])
            for k in keys}


def _order(row: DictRow) -> Order:
    filled: Decimal = row["amount"]
    cost: Decimal = row["cost"]
    return Order(
        client_id=row["client_id"], exchange_id=str(row["id"]), symbol=row["symbol"],
        side=Side(row["side"]), type=OrderType(row["order_type"]),
        status=OrderStatus(row["status"]), amount=row["requested_amount"], filled=filled,
        cost=cost, fee=row["fee"], fee_currency=row["fee_currency"],
        average_price=cost / filled if filled else None, raw_status=row["raw_status"],
        raw=_plain(row, "id", "raw_status", "price", "quote_amount", "created_at"),
    )


def _withdrawal(row: DictRow) -> Withdrawal:
    status = TransferStatus(row["status"])
    return Withdrawal(
        client_id=row["client_id"], exchange_id=str(row["id"]), currency=row["currency"],
        amount=row["amount"], fee=row["fee"], received=row["received"], address=row["address"],
        network=row["network"], status=status,
        txid=row["txid"] if status == TransferStatus.OK else None, internal=row["internal"],
        created_at=row["created_at"], raw_status=row["raw_status"],
        raw=_plain(row, "id", "raw_status", "to_account", "complete_at"),
    )


def _deposit(row: DictRow) -> Deposit:
    status = TransferStatus(row["status"])
    return Deposit(
        exchange_id=str(row["id"]), currency=row["currency"], amount=row["amount"],
        address=row["address"], network=row["network"], status=status, txid=row["txid"],
        internal=row["internal"], created_at=row["sent_at"],
        raw_status=_raw(row["exchange"],
                        "deposit_ok" if status == TransferStatus.OK else "deposit_pending"),
        raw=_plain(row, "id", "withdrawal_id", "arrive_at"),
    )


def _transfer(row: DictRow) -> Transfer:
    return Transfer(
        client_id=row["client_id"], exchange_id=str(row["id"]), currency=row["currency"],
        amount=row["amount"], from_wallet=Wallet(row["from_wallet"]),
        to_wallet=Wallet(row["to_wallet"]), from_account=row["from_account"],
        to_account=row["to_account"], status=TransferStatus(row["status"]),
        created_at=row["created_at"], raw=_plain(row, "id", "raw_status"),
    )


__all__ = [
    "DEFAULT_WORLD",
    "Faults",
    "SimulatedExchange",
    "SimulatedWorld",
    "WorldSpec",
    "load_world",
]
