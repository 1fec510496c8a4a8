"""The command line's resolve --result and retry --from: what they send."""

from __future__ import annotations

import pytest

from rebalancer.cli.common import UsageError
from rebalancer.cli.control import parse_params
from rebalancer.cli.parser import build_parser

WF = "0b6f3c1e-8d2a-4f7b-9c3e-1a2b3c4d5e6f"


def test_resolve_takes_repeated_results_and_retry_takes_from() -> None:
    args = build_parser().parse_args([
        "resolve", WF, "withdraw_x", "--outcome", "done", "--result", "id=17",
        "--result", "txid=ab12", "--result", "amount=0.19", "--note", "ours"])
    assert parse_params(args.result, option="--result") == {
        "id": "17", "txid": "ab12", "amount": "0.19"}
    retry = build_parser().parse_args(["retry", WF, "--from", "withdraw_x"])
    assert retry.from_task == "withdraw_x"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pause", WF, "--from", "withdraw_x"])


def test_a_result_without_a_value_or_given_twice_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--result 'txid'"):
        parse_params(["txid"], option="--result")
    with pytest.raises(UsageError, match="--result id given twice"):
        parse_params(["id=1", "id=2"], option="--result")
