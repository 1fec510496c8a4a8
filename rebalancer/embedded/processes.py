"""Ports, pid files, logs and the server processes this interpreter started."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from rebalancer.embedded.state import HOST, Paths
from rebalancer.errors import InfraError

# nats-server processes this interpreter started and has not reaped yet. `down` waits on them so
# that a stopped server does not linger as a zombie of a long-lived caller (a test session).
children: dict[int, subprocess.Popen[bytes]] = {}


def free_ports(count: int) -> list[int]:
    # Hold every socket until all are picked so the ports differ from each other.
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def check_port_free(port: int, what: str, paths: Paths) -> None:
    # SO_REUSEADDR as the servers set it: connections lingering in TIME_WAIT after our own
    # `down` do not count, only another listener does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise InfraError(
                f"{what} port {HOST}:{port} stored in {paths.state} is taken by another "
                f"process; stop it, or delete {paths.state} to pick new ports"
            ) from e


def pid_alive(pid: int, name: str) -> bool:
    """Whether `pid` is a live (not zombie) process whose name contains `name`."""
    if pid <= 0:
        return False
    child = children.get(pid)
    if child is not None and child.poll() is not None:
        return False  # our own nats-server exited; poll() reaped it, so no zombie either
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no procfs: trust kill(0)
    try:
        stat_line = (proc / "stat").read_text()
        comm = (proc / "comm").read_text().strip()
    except OSError:
        return False  # exited between the calls
    # A server whose parent does not reap (pid 1 in some containers) stays a zombie: it is gone.
    if stat_line.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    # A stale pid file may name a pid that was reused by an unrelated process.
    return name in comm


def read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_tail(path: Path, since: int = 0, lines: int = 10) -> str:
    """The last lines of a server log, from byte `since` on (what this start attempt wrote)."""
    try:
        with path.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return f"{path} says:\n" + "\n".join(tail) if tail else f"({path} says nothing)"


def wait_gone(pid: int, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid, name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


