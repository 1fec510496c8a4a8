"""The sim schema's books: balance changes, fills, settlement of what came due, totals."""

from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import DictRow

from rebalancer.errors import RejectedError
from rebalancer.exchanges.base import Side, floor_to
from rebalancer.exchanges.simulated.spec import (
    RAW_STATUSES,
    ZERO,
    ExchangeSpec,
    MarketSpec,
    WorldSpec,
    raw_status,
)

Conn = AsyncConnection[DictRow]

_FEE_QUANTUM = Decimal("0.00000001")


async def fetch_one(conn: Conn, sql: str, params: Any = None) -> DictRow | None:
    cur = await conn.execute(sql, params)
    return await cur.fetchone()


async def fetch_all(conn: Conn, sql: str, params: Any = None) -> list[DictRow]:
    cur = await conn.execute(sql, params)
    return await cur.fetchall()


async def free_balance(conn: Conn, account: str, currency: str) -> Decimal:
    """What `account` holds of `currency` unreserved."""
    row = await fetch_one(conn, "select amount - locked as free from sim.balances"
                                " where account = %s and currency = %s", (account, currency))
    return row["free"] if row is not None else ZERO


class Book:
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


async def apply_book(conn: Conn, book: Book) -> None:
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


def _fee(gross: Decimal, rate: Decimal) -> Decimal:
    return (gross * rate).quantize(_FEE_QUANTUM, rounding=ROUND_HALF_UP)


def third_currency_fee(ex: ExchangeSpec, symbol: str, market: MarketSpec, amount: Decimal,
                       price: Decimal) -> tuple[str, Decimal] | None:
    """The taker fee of a fill in the market's `fee_currency` (None: the market has none)."""
    if market.fee_currency is None:
        return None
    quote = symbol.split("/")[1]
    fee_price = ex.markets[f"{market.fee_currency}/{quote}"].mid
    return market.fee_currency, _fee(amount * price / fee_price, market.taker_fee)


def book_fill(book: Book, ex: ExchangeSpec, account: str, symbol: str, market: MarketSpec,
              side: Side, amount: Decimal, price: Decimal, *, reserved: bool = False,
              third_fee: tuple[str, Decimal] | None = None,
              ) -> tuple[Decimal, Decimal, str]:
    """Book one fill against the market maker; the fee comes out of what the account receives,
    or, given `third_fee` (currency, fee), out of the account's holding of that currency.

    `reserved`: the paying side was locked when the order started resting. Returns (cost, fee,
    fee currency).
    """
    base, quote = symbol.split("/")
    cost = amount * price
    if third_fee is not None:
        currency, fee = third_fee
        paying, paid, receiving, received = (
            (quote, cost, base, amount) if side == Side.BUY else (base, amount, quote, cost))
        book.add(account, paying, -paid, -paid if reserved else ZERO)
        book.add(ex.market_maker, paying, paid)
        book.add(ex.market_maker, receiving, -received)
        book.add(account, receiving, received)
        book.add(account, currency, -fee)
        book.add(ex.fee_account, currency, fee)
        return cost, fee, currency
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
    return cost, fee, base if side == Side.BUY else quote


async def settle_due(conn: Conn, spec: WorldSpec) -> None:
    """Everything that came due: resting-order fills, sent withdrawals, arrived deposits.

    `skip locked`: a row another settler holds is settled by that one, nobody waits.
    """
    book = Book()
    orders = await fetch_all(conn, """
        select *, now() as db_now from sim.operations
        where kind = 'order' and status = 'open' and next_fill_at <= now()
        order by id for update skip locked""")
    for order in orders:
        ex = spec.exchanges[order["exchange"]]
        market = ex.markets[order["symbol"]]
        requested: Decimal = order["requested_amount"]
        half = floor_to(requested / 2, market.amount_step)
        done = order["last_fill_at"] <= order["db_now"] or half <= 0
        target = requested if done else half
        fill = target - order["amount"]
        if fill <= 0:
            continue
        cost, fee, _ = book_fill(book, ex, order["account"], order["symbol"], market,
                              Side(order["side"]), fill, order["price"], reserved=True)
        await conn.execute("""
            update sim.operations set amount = amount + %s, cost = cost + %s,
                fee = fee + %s, status = %s, raw_status = %s, next_fill_at = %s,
                updated_at = now()
            where id = %s""", (
            fill, cost, fee, "closed" if done else "open",
            raw_status(order["exchange"], "order_closed" if done else "order_partial"),
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
        """, (json.dumps({name: raw["withdraw_ok"] for name, raw in RAW_STATUSES.items()}),))
    deposits = await fetch_all(conn, """
        select * from sim.deposits where status = 'pending' and arrive_at <= now()
        order by id for update skip locked""")
    for deposit in deposits:
        book.move(deposit["currency"], spec.transit_account, deposit["account"],
                  deposit["amount"])
        row = await fetch_one(conn, """
            insert into sim.operations (exchange, account, kind, currency, amount, fee, txid,
                status, raw_status, address, network, tag, internal, ref)
            values (%s, %s, 'deposit', %s, %s, 0, %s, 'ok', %s, %s, %s, %s, %s, %s)
            returning id""", (
            deposit["exchange"], deposit["account"], deposit["currency"], deposit["amount"],
            deposit["txid"], raw_status(deposit["exchange"], "deposit_ok"), deposit["address"],
            deposit["network"], deposit["tag"], deposit["internal"],
            deposit["withdrawal_id"]))
        assert row is not None
        await conn.execute(
            "update sim.deposits set status = 'ok', credited_at = now(), operation_id = %s"
            " where id = %s", (row["id"], deposit["id"]))
    await apply_book(conn, book)


# -- reports --------------------------------------------------------------------------------


async def check_totals(conn: Conn) -> tuple[bool, list[dict[str, Any]]]:
    """Per currency: seeded total, current total, difference; ok when nothing differs."""
    seeded = await fetch_one(conn, "select 1 as x from sim.world")
    rows = await fetch_all(conn, """
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


async def executed(conn: Conn, limit: int | None = None) -> list[dict[str, Any]]:
    """Executed operations, oldest first (the last `limit` of them when given)."""
    rows = await fetch_all(conn, """
        select * from (
            select id, created_at, exchange, account, kind, client_id, audit_ref,
                   currency, amount, fee, fee_currency, txid, status, raw_status,
                   symbol, side, cost, to_account, from_account, internal, ref
            from sim.operations order by id desc limit %s) last
        order by id""", (limit,))
    return [dict(r) for r in rows]


async def holdings(conn: Conn) -> dict[str, dict[str, Decimal]]:
    """Every account's holdings (reserved amounts included)."""
    rows = await fetch_all(conn, "select account, currency, amount from sim.balances"
                                 " order by account, currency")
    found: dict[str, dict[str, Decimal]] = {}
    for r in rows:
        found.setdefault(r["account"], {})[r["currency"]] = r["amount"]
    return found
