"""A bad configuration file: one line naming the file, the key and the problem, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rebalancer.accounts import DEFAULT_CONFIG
from rebalancer.cli import main

GOOD = DEFAULT_CONFIG.read_text()


@pytest.mark.parametrize(
    ("text", "key", "said"),
    [
        (GOOD.replace("    kind: master", "    kind: 5", 1),
         "accounts.binance-corp-master.kind", "Input should be"),
        (GOOD + "\ncolour: blue\n", "colour", "unknown key"),
        (GOOD.replace("    kind: master", "    kind: master\n    favourite: 1", 1),
         "accounts.binance-corp-master.favourite", "unknown key"),
        (GOOD + "\nexchanges:\n  binance: {budgets: 7}\n", "exchanges.binance", "dictionary"),
        (GOOD + "\nexchanges:\n  kraken: {}\n", "exchanges", "unknown exchange 'kraken'"),
        (GOOD + "\nspecs: here\n", "specs", "must be a list"),
        (GOOD + "\nalerts:\n  webhooks:\n    - {name: ops, url: 'https://hooks.example/T0KEN'}\n",
         "alerts.webhooks.0", "url: a webhook URL carries its token"),
        (GOOD + "\nalerts:\n  webhooks:\n    - {name: ops, url_env: X, kinds: [oops]}\n",
         "alerts.webhooks.0", "kinds"),
        (GOOD + "\nalerts:\n  sinks: []\n", "alerts.sinks", "unknown key"),
        # The URL pasted where the variable's name goes: refused by the check, not echoed.
        (GOOD + "\nalerts:\n  webhooks:\n    - {name: ops, url_env: 'http://127.0.0.1:9911/x"
                "?token=T0KEN'}\n",
         "alerts.webhooks.0: url_env", "must be the name of an environment variable"),
        (GOOD + "\nalerts:\n  webhooks:\n    - {name: ops, url_file: 'https://hooks.example"
                "/T0KEN'}\n",
         "alerts.webhooks.0: url_file", "never the URL itself"),
        ("accounts: [\n", "line 2, column 1", "expected the node content"),
    ],
)
def test_a_bad_configuration_is_one_line_naming_file_key_and_problem_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    text: str, key: str, said: str,
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    monkeypatch.setenv("REBALANCER_CONFIG", str(path))
    # `specs list` reads only the spec directories: the whole file is checked all the same.
    assert main(["specs", "list"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"rebalancer: configuration {path}: {key}")
    assert said in captured.err
    assert "pydantic" not in captured.err and "Traceback" not in captured.err
    assert "T0KEN" not in captured.err


def test_a_bad_configuration_from_the_command_line_has_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.replace("    kind: personal", "    kind: []", 1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    result = subprocess.run(
        [sys.executable, "-m", "rebalancer", "balances"],
        env={**env, "REBALANCER_CONFIG": str(path), "REBALANCER_HOME": str(tmp_path / "h")},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(path) in result.stderr
    assert "accounts.upbit-personal.kind" in result.stderr


def test_infra_commands_work_while_the_configuration_is_being_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("colour: blue\n")
    monkeypatch.setenv("REBALANCER_CONFIG", str(path))
    monkeypatch.setenv("REBALANCER_HOME", str(tmp_path / "h"))
    assert main(["infra", "status", "--json"]) == 0
    assert "postgresql" in capsys.readouterr().out
