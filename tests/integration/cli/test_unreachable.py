"""The command line when NATS cannot be reached: a prompt one-line failure, exit status 4."""

from __future__ import annotations

import os
import subprocess
import sys
import time

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
