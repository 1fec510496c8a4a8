"""`rebalancer status | head -1`: a reader that stops early ends the command quietly, exit 0."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

from tests.conftest import ROOT
from tests.integration.cli.test_replay_history_status import seed

# Linux's smallest pipe: the command is sure to be blocked on a write when the reader leaves.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def first_line_then_close(argv: list[str], env: dict[str, str]) -> tuple[bytes, int, str]:
    """Run the command, read its first line, close the pipe: (line, exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "rebalancer", *argv], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    fd = proc.stdout.fileno()
    fcntl.fcntl(fd, F_SETPIPE_SZ, 4096)
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        assert chunk, "the command ended before its first line"
        line += chunk
    proc.stdout.close()  # `head -1` exits
    err = proc.stderr.read().decode()
    return line, proc.wait(timeout=60), err


def test_status_into_a_pipe_closed_after_one_line_ends_quietly_with_exit_0(
    database_url: str,
) -> None:
    seed(database_url, count=400)  # some 50 kB of lines: far more than the pipe holds
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    env["REBALANCER_DATABASE_URL"] = database_url
    for argv in (["status", "--limit", "1000"], ["status", "--limit", "1000", "--json"]):
        line, status, err = first_line_then_close(argv, env)
        assert line.strip(), argv
        assert status == 0, (argv, err)
        assert err == "", (argv, err)
