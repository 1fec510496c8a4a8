"""The command line when NATS cannot be reached: a prompt one-line failure, exit status 4."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.support.nats_server import free_port


def test_cancel_with_nats_unreachable_ends_within_6_s_with_exit_4_and_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    env["REBALANCER_NATS_URL"] = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "rebalancer", "cancel", "3b241a34-5d0b-4c8e-9a57-3a2f4a1c0a11"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert time.monotonic() - began < 6
    assert result.returncode == 4, result.stderr
    assert result.stderr.count("\n") == 1 and "cannot reach NATS" in result.stderr
    assert result.stdout == ""


def _cli(env_extra: dict[str, str], *argv: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "rebalancer", *argv], env={**env, **env_extra},
                            capture_output=True, text=True, timeout=60)
    return time.monotonic() - began, result


@pytest.mark.parametrize("argv", [["status"], ["history", "3b241a34-5d0b-4c8e-9a57-3a2f4a1c0a11"],
                                  ["db", "migrate"], ["audit"]])
def test_postgresql_on_a_closed_port_is_exit_4_in_one_line(argv: list[str]) -> None:
    url = f"postgresql://rebalancer@127.0.0.1:{free_port()}/rebalancer"  # nothing listens
    took, result = _cli({"REBALANCER_DATABASE_URL": url}, *argv)
    assert took < 6
    assert result.returncode == 4, result.stderr
    assert result.stderr.count("\n") == 1 and "PostgreSQL" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("timeout", "within"), [(None, (4.5, 7.5)), ("2", (1.5, 4.5))])
@pytest.mark.parametrize("argv", [["status"], ["db", "migrate"]])
def test_postgresql_that_never_answers_gives_up_after_the_connect_timeout(
    argv: list[str], timeout: str | None, within: tuple[float, float],
) -> None:
    # Accepts the connection and then says nothing, as a host behind a dead proxy would.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"postgresql://rebalancer@127.0.0.1:{silent.getsockname()[1]}/rebalancer"
        env = {"REBALANCER_DATABASE_URL": url}
        if timeout is not None:
            env["REBALANCER_CONNECT_TIMEOUT"] = timeout
        took, result = _cli(env, *argv)
    assert within[0] <= took <= within[1], took
    assert result.returncode == 4, result.stderr
    assert result.stderr.count("\n") == 1 and "PostgreSQL" in result.stderr
