"""`rebalancer serve` as the soak runs it: one subprocess at a time, SIGKILLed and restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What `serve` logs once its runtime is open (rebalancer/service.py): from then on it works.
READY_LINE = b"serving as "


@dataclass
class Serve:
    """The service process and its incarnations; every incarnation appends to one log."""

    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    incarnations: int = 0
    log_offset: int = 0  # where the current incarnation's lines begin
    lifetimes: list[float] = field(default_factory=list)  # seconds each killed one had run
    killed_at: list[float] = field(default_factory=list)  # time.time() of each kill
    died_on_its_own: list[int] = field(default_factory=list)  # exit statuses

    def start(self) -> None:
        assert self.process is None
        self.incarnations += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n=== serve incarnation {self.incarnations} ===\n".encode())
            self.log_offset = log.tell()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rebalancer", "serve", "--tick", "0.05"],
                env=self.env, cwd=ROOT, stdout=log, stderr=log,
            )
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def ready(self, timeout: float = 60.0) -> bool:
        """Whether this incarnation said it serves within `timeout` (False if it died)."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if not self.alive():
                return False
            with self.log_path.open("rb") as log:
                log.seek(self.log_offset)
                if READY_LINE in log.read():
                    return True
            await asyncio.sleep(0.02)
        return False

    def kill(self) -> bool:
        """SIGKILL: no draining, claims left behind. False when it had already exited on its
        own (its status is kept in `died_on_its_own`)."""
        assert self.process is not None
        code = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.lifetimes.append(time.monotonic() - self.started_at)
            self.killed_at.append(time.time())
        else:
            self.died_on_its_own.append(code)
        self.process = None
        return code is None

    def stop(self) -> int:
        """SIGTERM (steps in flight drain), then the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            self.ensure_dead()

    def ensure_dead(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no serve log)"
        return f"--- last {lines} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])


def service_env(database_url: str, nats_url: str, key_file: Path, *, faults: str = "",
                seed: int = 0, time_scale: float = 1.0) -> dict[str, str]:
    """The environment of `serve` and of the command line the soak runs afterwards: only the
    soak's servers, whatever REBALANCER_* the caller has set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    env.update(
        REBALANCER_DATABASE_URL=database_url,
        REBALANCER_NATS_URL=nats_url,
        REBALANCER_CHAIN_KEY_FILE=str(key_file),
        REBALANCER_EXCHANGES="simulated",
        REBALANCER_SIM_FAULTS=faults,
        REBALANCER_SIM_SEED=str(seed),
        REBALANCER_SIM_TIME_SCALE=f"{time_scale:g}",
        PYTHONUNBUFFERED="1",
    )
    return env
