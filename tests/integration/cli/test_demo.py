"""`rebalancer demo` as a user runs it: fresh embedded servers, the built-in path, JSON out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rebalancer import embedded


@pytest.mark.slow
def test_the_demo_runs_the_seed_path_on_fresh_servers(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    env["REBALANCER_HOME"] = str(home)
    try:
        # Fresh PostgreSQL and a NATS with no stream yet: as on a new machine.
        result = subprocess.run(
            [sys.executable, "-m", "rebalancer", "demo", "--json"], env=env,
            capture_output=True, text=True, timeout=240,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        summary = json.loads(result.stdout)
        assert summary["state"] == "done"
        assert summary["totals_unchanged"] is True
        assert [t["state"] for t in summary["tasks"]] == ["done"] * 8
        assert float(summary["result"]["to_amount"]) > 0
        futures = [b for b in summary["balances"] if b["account"] == "binance-corp-sub:futures"]
        assert futures and futures[0]["change"] == summary["result"]["to_amount"]
        # A second run is a new workflow on the same servers.
        again = subprocess.run(
            [sys.executable, "-m", "rebalancer", "demo", "--json"], env=env,
            capture_output=True, text=True, timeout=240,
        )
        assert again.returncode == 0, again.stderr[-2000:]
        assert json.loads(again.stdout)["workflow_id"] != summary["workflow_id"]
    finally:
        embedded.down(home)
