"""A private embedded PostgreSQL that a test may crash, stop and start (the outage tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg

from rebalancer.embedded.postgres import (
    ensure_database,
    start_postgres,
    stop_postgres,
    wait_postgres,
)
from rebalancer.embedded.servers import new_state
from rebalancer.embedded.state import DB_NAME, DB_USER, HOST, Paths, with_pg_passwords


class Cluster:
    """Its own data dir and port, so crashing it disturbs no other test's server.

    `extra_conf` lines are written to postgresql.auto.conf before the first start (e.g. to
    preload pg_stat_statements for a measurement).
    """

    def __init__(self, home: Path, extra_conf: str = "") -> None:
        self.paths = Paths(home.resolve())
        self.paths.home.mkdir(parents=True, exist_ok=True)
        self.state = with_pg_passwords(new_state(self.paths, None))
        self.extra_conf = extra_conf
        # As the superuser: these tests are about outages, not privileges (those are
        # tests/integration/embedded/test_pg_roles.py's).
        self.url = psycopg.conninfo.make_conninfo(
            host=HOST, port=self.state.pg_port, user=DB_USER, dbname=DB_NAME,
            password=self.state.pg_passwords[DB_USER],
        )

    def start(self) -> None:
        first = not (self.state.pg_dir / "data" / "PG_VERSION").exists()
        self.state = start_postgres(self.paths, self.state, None)
        if first and self.extra_conf:
            # Needs a restart to take effect (shared_preload_libraries), hence before use.
            (self.state.pg_dir / "data" / "postgresql.auto.conf").write_text(self.extra_conf)
            self.crash()
            self.state = start_postgres(self.paths, self.state, None)
        wait_postgres(self.state)
        ensure_database(self.state)

    def crash(self) -> None:
        """`pg_ctl stop -m immediate`: every backend killed, no checkpoint, crash recovery next."""
        stop_postgres(self.state, modes=("immediate",))

    def restart(self) -> None:
        """What `pg_ctl restart -m immediate` does, in two halves so tests can wait between."""
        self.crash()
        self.start()

    def destroy(self) -> None:
        stop_postgres(self.state)
        shutil.rmtree(self.state.pg_dir, ignore_errors=True)
        shutil.rmtree(self.paths.home, ignore_errors=True)
