"""main(): the settings are read once, and a bad environment value is one line, exit 2."""

from __future__ import annotations

import pytest

from rebalancer.cli import main


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("REBALANCER_SIM_TIME_SCALE", "0", "greater than 0"),
        ("REBALANCER_SIM_TIME_SCALE", "inf", "finite"),
        ("REBALANCER_SIM_SEED", "seven", "integer"),
        ("REBALANCER_RELAY_LAG_SECONDS", "soon", "number"),
    ],
)
def test_a_bad_environment_value_is_named_in_one_line_with_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str,
    said: str,
) -> None:
    monkeypatch.setenv(name, value)
    assert main(["specs", "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rebalancer: {name}={value!r}: ")
    assert said in err


def test_the_handler_gets_the_settings_built_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: object,
) -> None:
    # `infra status` reads only the home: a fresh one has nothing running.
    monkeypatch.setenv("REBALANCER_HOME", str(tmp_path))
    assert main(["infra", "status", "--json"]) == 0
    assert capsys.readouterr().out.strip() == '{"postgresql": false, "nats": false}'


def test_version_prints_one_line_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        main(["--version"])
    assert ended.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("rebalancer ") and out.count("\n") == 1


@pytest.mark.parametrize(("text", "amount"), [("1,000,000", "1000000"), ("250000", "250000"),
                                              ("1,234.5", "1234.5")])
def test_demo_amount_takes_the_grouping_its_help_shows(text: str, amount: str) -> None:
    from decimal import Decimal

    from rebalancer.cli.parser import build_parser

    assert build_parser().parse_args(["demo", "--amount", text]).amount == Decimal(amount)


@pytest.mark.parametrize("text", ["1,00", "1e999", "-5", "0", "1_000"])
def test_a_bad_demo_amount_is_a_usage_error(text: str) -> None:
    from rebalancer.cli.parser import build_parser

    with pytest.raises(SystemExit) as ended:
        build_parser().parse_args(["demo", "--amount", text])
    assert ended.value.code == 2


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        ([], "the following arguments are required: COMMAND (see `rebalancer --help`)"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["start"], "the following arguments are required: SPEC (see `rebalancer start --help`)"),
        (["resolve", "3b241a34-5d0b-4c8e-9a57-3a2f4a1c0a11", "t", "--outcome", "nope",
          "--note", "x"], "argument --outcome: invalid choice: 'nope'"),
        (["status", "--limit", "0"], "0 is not a positive number"),
        (["specs", "list", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_usage_is_one_line_without_the_usage_dump_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], said: str,
) -> None:
    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("rebalancer: error: ") and said in captured.err
    assert "usage:" not in captured.err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["serve", "--tick", "0"], "argument --tick: 0 is not a positive number of seconds"
                                   " (at most 60)"),
        (["serve", "--tick", "-1"], "argument --tick: -1 is not a positive number of seconds"),
        (["serve", "--tick", "nan"], "argument --tick: nan is not a positive number"),
        (["serve", "--tick", "1e9"], "argument --tick: 1e9 is not a positive number"),
        (["serve", "--tick", "soon"], "argument --tick: soon is not a positive number"),
        (["start", "x", "--wait", "--timeout", "0"], "argument --timeout: 0 is not a positive"),
        (["start", "x", "--wait", "--timeout", "-3"], "argument --timeout: -3 is not a positive"),
        (["start", "x", "--wait", "--timeout", "inf"], "argument --timeout: inf is not a"),
        (["start", "x", "--wait", "--timeout", "1e12"], "argument --timeout: 1e12 is not a"),
        (["status", "--limit", "-1"], "argument --limit: -1 is not a positive number"),
        (["status", "--limit", "ten"], "argument --limit: ten is not a positive number"),
        (["status", "--limit", "99999999999"], "argument --limit: 99999999999 is not a"),
        (["status", "x", "--at", "0"], "argument --at: 0 is not a positive number (a stream"
                                       " version from 1"),
        (["status", "x", "--at", "-2"], "argument --at: -2 is not a positive number"),
        (["sim", "ledger", "--limit", "0"], "argument --limit: 0 is not a positive number"),
    ],
)
def test_a_number_that_would_spin_never_wait_or_is_a_typo_is_refused_by_the_parser(
    capsys: pytest.CaptureFixture[str], argv: list[str], said: str,
) -> None:
    from rebalancer.cli.parser import build_parser

    # Parsed only: were the value taken, `serve` would start for real.
    with pytest.raises(SystemExit) as ended:
        build_parser().parse_args(argv)
    assert ended.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("rebalancer: error: ") and said in captured.err


def test_help_still_shows_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        main(["start", "--help"])
    assert ended.value.code == 0
    assert capsys.readouterr().out.startswith("usage: rebalancer start")
