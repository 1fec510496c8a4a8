"""Both embedded servers of one home together: up, down, status and the URLs they serve."""

from __future__ import annotations

import os
from pathlib import Path

from rebalancer.embedded.nats_server import (
    nats_conf_for,
    nats_pid_of,
    start_nats,
    stop_nats,
    wait_nats,
)
from rebalancer.embedded.postgres import (
    ensure_database,
    find_pg_bin_dir,
    pg_dir_for,
    postmaster_pid,
    start_postgres,
    stop_postgres,
    unprivileged_user,
    wait_postgres,
)
from rebalancer.embedded.processes import free_ports, log_size
from rebalancer.embedded.state import (
    InfraInfo,
    Paths,
    State,
    infra_info,
    locked,
    read_state,
    read_text,
    with_nats_passwords,
    with_pg_passwords,
    write_pgpass,
    write_state,
)
from rebalancer.settings import Settings


def load_info(home: Path) -> InfraInfo | None:
    """The servers' addresses from the state file; None if `up` never ran for this home."""
    paths = Paths(home.expanduser().resolve())
    state = read_state(paths)
    return None if state is None else infra_info(paths, state)


def status(home: Path) -> dict[str, bool]:
    """Whether each embedded server of `home` is running."""
    paths = Paths(home.expanduser().resolve())
    state = read_state(paths)
    if state is None:
        return {"postgresql": False, "nats": False}
    return {
        "postgresql": postmaster_pid(state) is not None,
        "nats": nats_pid_of(paths) is not None,
    }


def up(home: Path, *, pg_bin: Path | None = None) -> InfraInfo:
    """Start both servers under `home` (or find them running) and wait until they answer.

    `pg_bin` is Settings.pg_bin: the PostgreSQL bin directory to use, None to find one.

    Raises InfraError when a binary is missing, a stored port is taken by another process or a
    server does not come up (with the end of its log).
    """
    paths = Paths(home.expanduser().resolve())
    paths.home.mkdir(parents=True, exist_ok=True)
    with locked(paths):
        state = with_nats_passwords(read_state(paths) or new_state(paths, pg_bin))
        state = with_pg_passwords(state)
        write_state(paths, state)
        write_pgpass(paths, state)
        if postmaster_pid(state) is None:
            state = start_postgres(paths, state, pg_bin)
        conf = nats_conf_for(paths, state)
        if nats_pid_of(paths) is not None and read_text(paths.nats_conf) != conf:
            # Started by an older version (no users) or with other permissions: a config reload
            # can fail half-way and leave the old users in place, a restart cannot.
            stop_nats(paths)
        nats_log_from = log_size(paths.nats_log)
        started = start_nats(paths, state, conf) if nats_pid_of(paths) is None else None
        wait_postgres(state)
        wait_nats(paths, state, started, nats_log_from)
        ensure_database(state)
        return infra_info(paths, state)


def down(home: Path) -> list[str]:
    """Stop both servers of `home`; returns the names of those that were running."""
    paths = Paths(home.expanduser().resolve())
    if not paths.home.is_dir():
        return []
    stopped: list[str] = []
    with locked(paths):
        state = read_state(paths)
        if state is not None and stop_postgres(state):
            stopped.append("postgresql")
        if stop_nats(paths):
            stopped.append("nats")
    return stopped


def migrate_url(settings: Settings) -> str:
    """Where migrations run, as the owner role: REBALANCER_MIGRATE_DATABASE_URL, else (a
    database of your own) REBALANCER_DATABASE_URL, else the embedded owner's URL."""
    if settings.migrate_database_url:
        return settings.migrate_database_url
    if settings.database_url:
        return settings.database_url
    up(settings.home, pg_bin=settings.pg_bin)
    info = load_info(settings.home)
    assert info is not None  # `up` just wrote the state
    return info.migrate_database_url


def ensure_urls(settings: Settings) -> tuple[str, str]:
    """(database_url, nats_url) from settings; the embedded servers stand in for any unset."""
    database_url, nats_url = settings.database_url, settings.nats_url
    if database_url is None or nats_url is None:
        info = up(settings.home, pg_bin=settings.pg_bin)
        database_url = database_url or info.database_url
        nats_url = nats_url or info.nats_url
    return database_url, nats_url


def new_state(paths: Paths, pg_bin: Path | None) -> State:
    """A first state for `paths`: free ports, the binaries to use, where the data dir goes."""
    pg_port, nats_port = free_ports(2)
    pg_user = unprivileged_user() if os.geteuid() == 0 else None
    return State(
        pg_port=pg_port,
        nats_port=nats_port,
        pg_bin_dir=find_pg_bin_dir(pg_bin),
        pg_dir=pg_dir_for(paths.home, pg_user),
        pg_user=pg_user,
    )


