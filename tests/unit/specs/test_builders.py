"""The Python spec builders: `task`, `twap_trade` and `workflow` check what they build."""

from __future__ import annotations

import pytest

from rebalancer.machines import TaskKind
from rebalancer.specs import InvalidSpecError, TwapSpec, task, twap_trade, workflow


def test_twap_trade_is_a_trade_task_with_twap_set() -> None:
    built = twap_trade("Buy", slices=3, interval_seconds=0.5, account="{a}", side="buy")
    assert built.kind is TaskKind.TRADE
    assert built.name == "buy"
    assert built.twap == TwapSpec(slices=3, interval_seconds=0.5)
    assert built.config == {"account": "{a}", "side": "buy"}


def test_twap_trade_refuses_zero_slices() -> None:
    with pytest.raises(InvalidSpecError, match=r"task 'buy'.*twap.slices"):
        twap_trade("buy", slices=0, interval_seconds=1)


def test_builder_workflow_refuses_a_bad_reference() -> None:
    with pytest.raises(InvalidSpecError, match=r"task 'out'.*\{\$\.nowhere\.request_result\.id\}"):
        workflow(
            "broken",
            params={"a": "account"},
            tasks=[
                task(
                    "out",
                    "transfer",
                    account="{a}",
                    currency="ETH",
                    amount="{$.nowhere.request_result.id}",
                    from_wallet="spot",
                    to_wallet="futures",
                )
            ],
        )
