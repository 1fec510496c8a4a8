"""`serve --http PORT` with the port already taken: refused in one line (exit 2) before the
worker, the relay or anything else has started. Real PostgreSQL and NATS, `serve` in a
subprocess as an operator runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_serve_on_a_port_in_use_starts_nothing_and_says_so_in_one_line(
    database_url: str, owner_database_url: str, nats_url: str, tmp_path: Path
) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")},
           "REBALANCER_DATABASE_URL": database_url,
           "REBALANCER_MIGRATE_DATABASE_URL": owner_database_url,
           "REBALANCER_NATS_URL": nats_url, "REBALANCER_HOME": str(tmp_path / "home")}
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "rebalancer", "serve", "--http", str(port)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr == (f"rebalancer: cannot listen on 127.0.0.1:{port}: address already"
                             " in use\n")
    assert "Traceback" not in result.stderr and "started" not in result.stderr
