"""The compose file's first start without Docker: infra/postgres/roles.sh on a cluster with no
rebalancer roles yet (what the postgres image's initdb.d step sees), then `rebalancer db
migrate` as the owner, as the `migrate` service does, then the service role as `serve` has it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from rebalancer.embedded.state import DB_NAME, DB_USER, HOST
from tests.conftest import TEST_HOME
from tests.support.cluster import Cluster

ROOT = Path(__file__).resolve().parents[3]
ROLES_SCRIPT = ROOT / "infra" / "postgres" / "roles.sh"


@pytest.fixture
def bare_cluster() -> Iterator[Cluster]:
    """A private cluster whose rebalancer database and roles are gone again: the superuser and
    an empty `rebalancer` database it owns, as the postgres image leaves them."""
    private = Cluster(TEST_HOME / f"compose-{uuid.uuid4().hex[:8]}")
    private.start()
    try:
        admin = psycopg.conninfo.make_conninfo(private.url, dbname="postgres")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"drop database {DB_NAME} with (force)")
            conn.execute("drop role rebalancer_service")
            conn.execute("drop role rebalancer_owner")
            conn.execute(f"create database {DB_NAME}")
        yield private
    finally:
        private.destroy()


def cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    return subprocess.run([sys.executable, "-m", "rebalancer", *argv], cwd=ROOT,
                          env={**base, **env}, capture_output=True, text=True, timeout=60)


def role_url(cluster: Cluster, role: str, password: str) -> str:
    return f"postgresql://{role}:{password}@{HOST}:{cluster.state.pg_port}/{DB_NAME}"


def test_roles_script_then_migrate_as_owner_then_serve_as_the_service_role(
    bare_cluster: Cluster,
) -> None:
    psql = shutil.which("psql") or str(bare_cluster.state.pg_bin_dir / "psql")
    if not os.access(psql, os.X_OK):
        pytest.skip("no psql to run infra/postgres/roles.sh with")
    owner_pw, service_pw = uuid.uuid4().hex, uuid.uuid4().hex
    env = {**os.environ, "PATH": f"{Path(psql).parent}:{os.environ['PATH']}",
           "POSTGRES_USER": DB_USER, "POSTGRES_DB": DB_NAME,
           "PGHOST": HOST, "PGPORT": str(bare_cluster.state.pg_port),
           "PGPASSWORD": bare_cluster.state.pg_passwords[DB_USER],
           "REBALANCER_OWNER_PASSWORD": owner_pw, "REBALANCER_SERVICE_PASSWORD": service_pw}
    done = subprocess.run(["sh", str(ROLES_SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    # Without its passwords the script refuses before touching anything.
    refused = subprocess.run(["sh", str(ROLES_SCRIPT)], capture_output=True, text=True,
                             env={k: v for k, v in env.items()
                                  if k != "REBALANCER_SERVICE_PASSWORD"}, timeout=60)
    assert refused.returncode != 0 and "REBALANCER_SERVICE_PASSWORD" in refused.stderr

    owner = role_url(bare_cluster, "rebalancer_owner", owner_pw)
    service = role_url(bare_cluster, "rebalancer_service", service_pw)
    migrated = cli({"REBALANCER_MIGRATE_DATABASE_URL": owner}, "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "applied 001_events" in migrated.stdout
    # `serve` migrates at start as the service role: up to date, nothing to do.
    again = cli({"REBALANCER_DATABASE_URL": service}, "db", "migrate")
    assert again.returncode == 0 and again.stdout.strip() == "up to date", again.stderr
    with psycopg.connect(service) as conn:
        assert conn.execute("show statement_timeout").fetchone() == ("30s",)
        assert conn.execute("select count(*) from events").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("create table not_yours (x int)")
    with psycopg.connect(owner) as conn:
        row = conn.execute("select pg_get_userbyid(datdba) from pg_database"
                           " where datname = current_database()").fetchone()
        assert row == ("rebalancer_owner",)
