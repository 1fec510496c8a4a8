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
