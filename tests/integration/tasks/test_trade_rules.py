"""What the trade processor settles before the exchange sees an order (on the simulated world).

Limit prices go out on the market's tick (a buy rounded down, a sell up) and the rounded price is
what the intent records; a price that rounds to nothing and a market buy given in base where the
market buys by quote only fail the task before any intent. A fee charged in a third currency
(BNB) is recorded by currency and leaves the base and quote figures alone.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from events.store import EventStore
from rebalancer.commands import start_workflow
from rebalancer.exchanges.simulated.spec import DEFAULT_WORLD
from rebalancer.specs.builders import task, twap_trade, workflow
from tests.support import Worker, intents, operations, write_world

D = Decimal


async def run_trade(
    store: EventStore, worker: Worker, *, twap: int = 0, **config: Any
) -> tuple[str, Any]:
    tasks = [twap_trade("trade", slices=twap, interval_seconds=0, **config) if twap
             else task("trade", "trade", **config)]
    spec = workflow("one_trade", {}, tasks, accounts=worker.accounts)
    workflow_id, _ = await start_workflow(store, spec, {}, worker.accounts)
    return workflow_id, await worker.drive(workflow_id)


def bnb_world(directory: Path, bnb: str) -> Path:
    """Binance's ETH/USDT charging its fee in BNB (priced on BNB/USDT), `bnb` held to pay it."""
    data = yaml.safe_load(DEFAULT_WORLD.read_text(encoding="utf-8"))
    markets = data["exchanges"]["binance"]["markets"]
    markets["ETH/USDT"]["fee_currency"] = "BNB"
    markets["BNB/USDT"] = {"mid": "600", "spread": "0.2", "taker_fee": "0.001",
                           "min_notional": "5", "amount_step": "0.001",
                           "price_ticks": [["0", "0.01"]]}
    data["balances"]["binance-personal"] = {"USDT": "10000", "BNB": bnb}
    data["balances"]["binance-mm"]["BNB"] = "1000"
    path = directory / "world.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


async def test_a_limit_buy_off_the_tick_goes_out_rounded_down(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    world = write_world(tmp_path, balances={"binance-personal": {"USDT": "10000"}})
    async with Worker(database_url, world=world) as worker:
        # Through the ask (2900.1): it fills at once, at the book price.
        _, flow = await run_trade(
            store, worker, account="binance-personal", side="buy", order_type="limit",
            base_currency="ETH", quote_currency="USDT", amount="0.01", price="2950.009")
        trade = flow.tasks[0]
        assert trade.state == "done", trade.error
        assert trade.request_params["price"] == "2950.00"
        assert trade.request_params["requested_price"] == "2950.009"
        [order] = await operations(database_url, "order")
        assert order["price"] == D("2950.00")


async def test_a_limit_sell_off_the_tick_goes_out_rounded_up(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    world = write_world(tmp_path, balances={"upbit-personal": {"ETH": "1"}})
    async with Worker(database_url, world=world) as worker:
        # Upbit's KRW tick at 3.9M is 1,000: 3,950,001 goes out as 3,951,000, through the bid
        # of 3,999,000 (never below what the user asked).
        _, flow = await run_trade(
            store, worker, account="upbit-personal", side="sell", order_type="limit",
            base_currency="ETH", quote_currency="KRW", amount="0.01", price="3950001")
        trade = flow.tasks[0]
        assert trade.state == "done", trade.error
        assert D(trade.request_params["price"]) == D("3951000")
        [order] = await operations(database_url, "order")
        assert order["price"] == D("3951000")


async def test_a_limit_price_that_rounds_to_zero_fails_before_any_intent(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    world = write_world(tmp_path, balances={"binance-personal": {"USDT": "10000"}})
    async with Worker(database_url, world=world) as worker:
        workflow_id, flow = await run_trade(
            store, worker, account="binance-personal", side="buy", order_type="limit",
            base_currency="ETH", quote_currency="USDT", amount="1", price="0.004")
        trade = flow.tasks[0]
        assert trade.state == "failed"
        assert trade.error["code"] == "invalid_price"
        assert "0.004" in trade.error["message"] and "0.01" in trade.error["message"]
        assert [i for i in await intents(database_url) if workflow_id in i["stream_id"]] == []
        assert await operations(database_url, "order") == []


async def test_a_market_buy_in_base_where_the_market_buys_by_quote_only_fails_before_any_intent(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    async with Worker(database_url, world=write_world(tmp_path)) as worker:
        workflow_id, flow = await run_trade(
            store, worker, account="upbit-personal", side="buy", order_type="market",
            base_currency="ETH", quote_currency="KRW", amount="0.01")
        trade = flow.tasks[0]
        assert trade.state == "failed"
        assert trade.error["code"] == "unsupported"
        assert "quote_amount" in trade.error["message"] and "KRW" in trade.error["message"]
        assert [i for i in await intents(database_url) if workflow_id in i["stream_id"]] == []
        assert await operations(database_url, "order") == []


async def test_a_market_sell_given_in_quote_is_still_refused_before_any_intent(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    async with Worker(database_url, world=write_world(tmp_path)) as worker:
        workflow_id, flow = await run_trade(
            store, worker, account="upbit-personal", side="sell", order_type="market",
            base_currency="ETH", quote_currency="KRW", quote_amount="10000")
        assert flow.tasks[0].state == "failed"
        assert flow.tasks[0].error["code"] == "unsupported"
        assert [i for i in await intents(database_url) if workflow_id in i["stream_id"]] == []


async def test_a_fee_in_bnb_is_recorded_and_leaves_the_base_figures_whole(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    async with Worker(database_url, world=bnb_world(tmp_path, "1")) as worker:
        _, flow = await run_trade(
            store, worker, twap=2, account="binance-personal", side="buy", order_type="market",
            base_currency="ETH", quote_currency="USDT", amount="0.5")
        trade = flow.tasks[0]
        assert trade.state == "done", trade.error
        extra, result = trade.refresh_result["extra"], trade.refresh_result["result"]
        slices = extra["slices"]
        assert [s["fee_currency"] for s in slices] == ["BNB", "BNB"]
        # 0.25 ETH at the ask 2900.1 is 725.025 USDT; 0.1% of it in BNB at 600.
        assert [D(s["fee"]) for s in slices] == [D("0.00120838")] * 2
        assert extra["fees"] == {"BNB": "0.00241676"}
        assert (result["fee"], result["fee_currency"]) == ("0.00241676", "BNB")
        assert D(extra["cumulative_amount_excluding_fee"]) == D(extra["cumulative_amount"]) \
            == D("0.5")
        assert D(extra["cumulative_quote_spent"]) == D(extra["cumulative_cost"]) \
            == D("1450.05")
        assert extra["cumulative_quote_received"] is None
        held = (await worker.world.balances())["binance-personal"]
        assert held["ETH"] == D("0.5")
        assert held["BNB"] == D(1) - D("0.00241676")
        assert held["USDT"] == D(10000) - D("1450.05")
        ok, totals = await worker.world.check()
        assert ok, totals


async def test_fees_in_two_currencies_are_each_recorded(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    # BNB for the first slice's fee only: the second pays in ETH, as Binance does.
    async with Worker(database_url, world=bnb_world(tmp_path, "0.002")) as worker:
        _, flow = await run_trade(
            store, worker, twap=2, account="binance-personal", side="buy", order_type="market",
            base_currency="ETH", quote_currency="USDT", amount="0.5")
        trade = flow.tasks[0]
        assert trade.state == "done", trade.error
        extra, result = trade.refresh_result["extra"], trade.refresh_result["result"]
        assert extra["fees"] == {"BNB": "0.00120838", "ETH": "0.00025000"}
        assert result["fee"] is None and result["fee_currency"] is None
        assert D(extra["cumulative_amount_excluding_fee"]) == D("0.5") - D("0.00025")
        held = (await worker.world.balances())["binance-personal"]
        assert held["ETH"] == D(extra["cumulative_amount_excluding_fee"])
        assert held["BNB"] == D("0.002") - D("0.00120838")


async def test_a_sell_records_what_it_received_after_a_quote_fee(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    world = write_world(tmp_path, balances={"binance-personal": {"ETH": "1"}})
    async with Worker(database_url, world=world) as worker:
        _, flow = await run_trade(
            store, worker, account="binance-personal", side="sell", order_type="market",
            base_currency="ETH", quote_currency="USDT", amount="1")
        extra = flow.tasks[0].refresh_result["extra"]
        # 1 ETH at the bid 2899.9, less 0.1% in USDT.
        assert D(extra["cumulative_quote_received"]) == D("2899.9") - D("2.8999")
        assert extra["cumulative_quote_spent"] is None
        # The deprecated alias still carries what it always did.
        assert extra["cumulative_cost_excluding_fee"] == extra["cumulative_quote_received"]
        held = (await worker.world.balances())["binance-personal"]
        assert held["USDT"] == D(extra["cumulative_quote_received"])
