"""One broken file in the configured spec directory: listed with its error, the rest usable."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from events.store import EventStore
from rebalancer.accounts import DEFAULT_CONFIG, load_accounts
from rebalancer.api import Api
from rebalancer.cli import main
from rebalancer.service import WarnedSpecs
from rebalancer.settings import Settings
from rebalancer.specs.loading import BUILTIN_DIR

SEED = "upbit_to_binance_sub_futures"
PARAMS = {"from_account": "upbit-personal", "to_account": "binance-corp-sub",
          "from_currency": "KRW", "interim_currency": "ETH", "to_currency": "USDT",
          "from_amount": "1000000"}


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A configuration (the demo accounts) whose spec directory holds one good file, one that is
    not YAML and one that is YAML but not a valid spec."""
    specs = tmp_path / "specs"
    specs.mkdir()
    seed = (BUILTIN_DIR / f"{SEED}.yaml").read_text()
    (specs / "good.yaml").write_text(seed.replace(f"name: {SEED}", "name: good_copy", 1))
    (specs / "unparsable.yaml").write_text("name: [unclosed\n")
    (specs / "invalid.yaml").write_text(
        seed.replace(f"name: {SEED}", "name: typo_spec", 1).replace("kind: trade", "kind: nope", 1))
    path = tmp_path / "config.yaml"
    path.write_text(DEFAULT_CONFIG.read_text() + "\nspecs: [specs]\n")
    monkeypatch.setenv("REBALANCER_CONFIG", str(path))
    return path


def test_specs_list_shows_the_broken_files_with_one_line_each_and_the_others(
    config: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["specs", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[SEED]["error"] is None and rows["good_copy"]["error"] is None
    assert rows["good_copy"]["tasks"] == 8
    assert "unknown kind 'nope'" in rows["typo_spec"]["error"]
    assert rows["typo_spec"]["file"].endswith("invalid.yaml")
    assert rows["unparsable"]["error"].startswith("line 2")
    assert all("\n" not in row["error"] for row in rows.values() if row["error"])
    assert main(["specs", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert [line.split()[:2] for line in lines if "BROKEN" in line] == [
        ["typo_spec", "BROKEN"], ["unparsable", "BROKEN"]]


def test_starting_a_broken_spec_says_why_with_exit_2_and_a_good_file_validates(
    config: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["start", "typo_spec"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'typo_spec' is broken" in err and "unknown kind" in err
    good = config.parent / "specs" / "good.yaml"
    assert main(["specs", "validate", str(good)]) == 0


def test_validate_json_is_one_object_for_a_file_that_does_not_load(
    config: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    specs = config.parent / "specs"
    for name, said in (("unparsable.yaml", "line 2"), ("invalid.yaml", "unknown kind 'nope'"),
                       ("missing.yaml", "cannot read")):
        file = str(specs / name)
        assert main(["specs", "validate", file, "--json"]) == 2
        out, err = capsys.readouterr()
        assert err == ""
        report = json.loads(out)
        assert report == {"file": file, "spec": None, "tasks": None, "valid": False,
                          "problems": report["problems"], "preflight": None}
        assert report["problems"] and any(said in p for p in report["problems"]), report
    # Params that do not resolve: the spec is named, its problem listed.
    file = str(specs / "good.yaml")
    assert main(["specs", "validate", file, "--param", "from_amount=1e999", "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["spec"] == "good_copy" and report["valid"] is False
    assert report["preflight"] is None and report["problems"]
    # The same keys when valid.
    assert main(["specs", "validate", file, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"file": file, "spec": "good_copy", "tasks": report["tasks"],
                      "valid": True, "problems": [], "preflight": None}


async def test_the_service_starts_the_others_and_warns_once_per_broken_file(
    config: Path, store: EventStore, caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(config=config)
    accounts = load_accounts(config)
    api = Api(store, accounts, WarnedSpecs(settings, accounts))
    caplog.set_level(logging.WARNING, logger="rebalancer")
    for n, spec in enumerate((SEED, "good_copy", SEED)):
        reply = await api.handle("rebalancer.cmd.start", json.dumps(
            {"command_id": f"c{n}", "spec": spec, "params": PARAMS}).encode())
        assert reply["ok"] is True, reply
    reply = await api.handle("rebalancer.cmd.start", json.dumps(
        {"command_id": "bad", "spec": "typo_spec", "params": PARAMS}).encode())
    assert reply["ok"] is False and "is broken" in reply["error"]["message"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
    assert {Path(str(r.args[0])).name for r in warnings if isinstance(r.args, tuple)} == {
        "invalid.yaml", "unparsable.yaml"}
