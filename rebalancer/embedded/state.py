"""What the embedded servers of one home remember (infra.json), where their files are, the lock."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shlex
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rebalancer.embedded.permissions import NATS_OPERATOR, NATS_PERMISSIONS, NATS_SUBSCRIBER
from rebalancer.errors import InfraError

HOST = "127.0.0.1"  # loopback only, and every connection needs a password
# The bootstrap superuser (initdb's): used only by `up` to create the roles and the database.
DB_USER = "rebalancer"
DB_NAME = "rebalancer"
# The roles events/sql/011_roles.sql grants to: the owner runs migrations, the service
# (`serve` and the command line) may only read and append the events.
OWNER_ROLE = "rebalancer_owner"
SERVICE_ROLE = "rebalancer_service"
PG_ROLES = (DB_USER, OWNER_ROLE, SERVICE_ROLE)
PGPASS_FILE = "pgpass"
READY_TIMEOUT = 30.0
STATE_FILE = "infra.json"


def masked_url(url: str) -> str:
    """`url` with the password of its user part, if any, as `***`: `nats://operator:***@host:4222`."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}{slash}{path}"


@dataclass(frozen=True)
class InfraInfo:
    """Where the embedded servers of one `home` listen and keep their data."""

    home: Path
    database_url: str  # as the service role; the password is in the pgpass file, not the URL
    nats_url: str = field(repr=False)  # as the operator, password included
    nats_subscriber_url: str = field(repr=False)  # as the subscriber, password included
    pg_port: int
    nats_port: int
    pg_bin_dir: Path
    pg_data_dir: Path
    # As the owner role (migrations) and as the superuser (bootstrap, tests): pgpass as well.
    migrate_database_url: str = ""
    admin_database_url: str = field(default="", repr=False)

    @property
    def nats_address(self) -> str:
        """The NATS URL without credentials, for display."""
        return f"nats://{HOST}:{self.nats_port}"

    def exports(self) -> str:
        """Four shell lines that point the rebalancer (and a read-only reader) at these servers."""
        return (
            f"export REBALANCER_DATABASE_URL={shlex.quote(self.database_url)}\n"
            f"export REBALANCER_MIGRATE_DATABASE_URL={shlex.quote(self.migrate_database_url)}\n"
            f"export REBALANCER_NATS_URL={shlex.quote(self.nats_url)}\n"
            f"export REBALANCER_NATS_SUBSCRIBER_URL={shlex.quote(self.nats_subscriber_url)}"
        )

    def to_json(self) -> dict[str, Any]:
        """The same fields with paths as strings, for output: every password in a URL is `***`
        (`rebalancer infra env` is the one place that prints them, for `eval`)."""
        return {
            "home": str(self.home),
            "database_url": masked_url(self.database_url),
            "migrate_database_url": masked_url(self.migrate_database_url),
            "nats_url": masked_url(self.nats_url),
            "nats_subscriber_url": masked_url(self.nats_subscriber_url),
            "pg_port": self.pg_port,
            "nats_port": self.nats_port,
            "pg_bin_dir": str(self.pg_bin_dir),
            "pg_data_dir": str(self.pg_data_dir),
        }


@dataclass(frozen=True)
class State:
    """What infra.json remembers between runs; ports are picked once and reused."""

    pg_port: int
    nats_port: int
    pg_bin_dir: Path
    pg_dir: Path  # holds `data/` and `log`: home/pg, or a /var/tmp directory (see pg_dir_for)
    pg_user: str | None  # the unprivileged user PostgreSQL runs as when we are root
    # NATS passwords by user (NATS_OPERATOR, NATS_SUBSCRIBER); empty in a home made before NATS
    # had users, until the next `up` adds them.
    nats_passwords: dict[str, str] = field(default_factory=dict, repr=False)
    # PostgreSQL passwords by role (PG_ROLES); empty in a home made before password auth, until
    # the next `up` sets them (see postgres.secure_cluster). Written to the pgpass file too.
    pg_passwords: dict[str, str] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "pg_port": self.pg_port,
            "nats_port": self.nats_port,
            "pg_bin_dir": str(self.pg_bin_dir),
            "pg_dir": str(self.pg_dir),
            "pg_user": self.pg_user,
            "nats_passwords": self.nats_passwords,
            "pg_passwords": self.pg_passwords,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        return cls(
            pg_port=int(data["pg_port"]),
            nats_port=int(data["nats_port"]),
            pg_bin_dir=Path(data["pg_bin_dir"]),
            pg_dir=Path(data["pg_dir"]),
            pg_user=data.get("pg_user"),
            nats_passwords={str(k): str(v) for k, v in data.get("nats_passwords", {}).items()},
            pg_passwords={str(k): str(v) for k, v in data.get("pg_passwords", {}).items()},
        )


@dataclass(frozen=True)
class Paths:
    home: Path

    @property
    def state(self) -> Path:
        return self.home / STATE_FILE

    @property
    def lock(self) -> Path:
        return self.home / ".infra.lock"

    @property
    def pgpass(self) -> Path:
        return self.home / PGPASS_FILE

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


def read_state(paths: Paths) -> State | None:
    try:
        raw = paths.state.read_text()
    except FileNotFoundError:
        return None
    try:
        return State.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        raise InfraError(f"{paths.state} is unreadable ({e}); delete it to start over") from e


def write_state(paths: Paths, state: State) -> None:
    write_private(paths.state, json.dumps(state.to_json(), indent=2) + "\n")


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text`, readable by its owner only (it holds passwords)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # a leftover tmp file keeps its old mode otherwise
        f.write(text)
    tmp.replace(path)


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def with_nats_passwords(state: State) -> State:
    """`state` with a password for every NATS user (new homes, and homes from before users)."""
    missing = [user for user in NATS_PERMISSIONS if not state.nats_passwords.get(user)]
    if not missing:
        return state
    # URL-safe characters only, so the password needs no quoting in a URL or in nats.conf.
    added = {user: secrets.token_urlsafe(24) for user in missing}
    return dataclasses.replace(state, nats_passwords={**state.nats_passwords, **added})


def with_pg_passwords(state: State) -> State:
    """`state` with a password for every PostgreSQL role (new homes, homes from before)."""
    missing = [role for role in PG_ROLES if not state.pg_passwords.get(role)]
    if not missing:
        return state
    # token_hex: no character that needs escaping in pgpass (`:` and `\\`) or in SQL.
    added = {role: secrets.token_hex(24) for role in missing}
    return dataclasses.replace(state, pg_passwords={**state.pg_passwords, **added})


def write_pgpass(paths: Paths, state: State) -> None:
    """The libpq password file the URLs name (`passfile=`): mode 600, so libpq accepts it and
    no other OS user can read it. The URLs themselves carry no password, so printing them
    (`infra up`, `infra env`) shows none."""
    lines = [f"{HOST}:*:*:{role}:{state.pg_passwords[role]}\n" for role in PG_ROLES
             if role in state.pg_passwords]
    write_private(paths.pgpass, "".join(lines))


def pg_url(paths: Paths, state: State, role: str, dbname: str = DB_NAME) -> str:
    passfile = urllib.parse.quote(str(paths.pgpass), safe="/")
    return f"postgresql://{role}@{HOST}:{state.pg_port}/{dbname}?passfile={passfile}"


def _nats_url(state: State, user: str) -> str:
    password = state.nats_passwords.get(user)
    if password is None:
        # A home from before NATS had users, not `up` since: its server takes anyone.
        return f"nats://{HOST}:{state.nats_port}"
    return f"nats://{user}:{password}@{HOST}:{state.nats_port}"


def infra_info(paths: Paths, state: State) -> InfraInfo:
    return InfraInfo(
        home=paths.home,
        database_url=pg_url(paths, state, SERVICE_ROLE),
        migrate_database_url=pg_url(paths, state, OWNER_ROLE),
        admin_database_url=pg_url(paths, state, DB_USER, "postgres"),
        nats_url=_nats_url(state, NATS_OPERATOR),
        nats_subscriber_url=_nats_url(state, NATS_SUBSCRIBER),
        pg_port=state.pg_port,
        nats_port=state.nats_port,
        pg_bin_dir=state.pg_bin_dir,
        pg_data_dir=state.pg_dir / "data",
    )


@contextlib.contextmanager
def locked(paths: Paths) -> Iterator[None]:
    # Two commands started at once (a CLI and a test, two terminals) must not both initdb or
    # both start a server on the same port.
    with paths.lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

