"""Least privilege on PostgreSQL (docs/security.md): password-only access to the embedded
cluster, an append-only `events` for the service and a guard for everyone, the timeouts."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import errors as pg_errors

from events.catalogue import WorkflowCreated
from events.migrations import MIGRATIONS_DIR
from events.store import EventStore
from rebalancer import embedded
from rebalancer.embedded.state import PG_ROLES
from tests.conftest import TEST_HOME, Servers


def _psql(bin_dir: Path) -> str | None:
    found = bin_dir / "psql"
    return str(found) if found.exists() else shutil.which("psql")


def _embedded_info(servers: Servers) -> embedded.InfraInfo:
    if servers.origin != "embedded":
        pytest.skip("the embedded cluster's access rules; the servers here are not embedded")
    info = embedded.load_info(TEST_HOME)
    assert info is not None
    return info


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="needs root and runuser to act as the OS user nobody")
def test_the_os_user_nobody_cannot_connect_as_any_role(servers: Servers) -> None:
    info = _embedded_info(servers)
    psql = _psql(info.pg_bin_dir)
    if psql is None:
        pytest.skip("no psql to connect with")
    for role in PG_ROLES:
        # With the pgpass file named, as the URLs do: nobody may not read it (mode 600).
        env = {"PATH": "/usr/bin:/bin", "PGPASSFILE": str(TEST_HOME / "pgpass"),
               "PGCONNECT_TIMEOUT": "5"}
        result = subprocess.run(
            [str(shutil.which("runuser")), "-u", "nobody", "--", psql, "-w", "-h", "127.0.0.1",
             "-p", str(info.pg_port), "-U", role, "-d", "postgres", "-Atc",
             "select rolsuper from pg_roles where rolname = current_user"],
            capture_output=True, text=True, env=env, cwd="/", check=False, timeout=30)
        assert result.returncode != 0, (role, result.stdout)
        assert "password" in result.stderr, result.stderr
    # The same command with the password file readable does connect: the refusal above is the
    # password, not a wrong port or a missing program.
    done = subprocess.run(
        [psql, "-w", "-h", "127.0.0.1", "-p", str(info.pg_port), "-U", "rebalancer_service",
         "-d", "postgres", "-Atc", "select rolsuper from pg_roles where rolname = current_user"],
        capture_output=True, text=True, check=False, timeout=30,
        env={**os.environ, "PGPASSFILE": str(TEST_HOME / "pgpass")})
    assert (done.returncode, done.stdout.strip()) == (0, "f"), done.stderr


def test_the_embedded_cluster_has_no_trust_rule_and_a_private_password_file(
    servers: Servers,
) -> None:
    info = _embedded_info(servers)
    assert (TEST_HOME / "pgpass").stat().st_mode & 0o077 == 0
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        rules = conn.execute(
            "select type, auth_method, address from pg_hba_file_rules").fetchall()
        roles = dict(conn.execute(  # type: ignore[arg-type]
            "select rolname, rolsuper from pg_roles where rolname like 'rebalancer%'").fetchall())
    assert rules == [("host", "scram-sha-256", "127.0.0.1")]
    assert roles == {"rebalancer": True, "rebalancer_owner": False, "rebalancer_service": False}
    assert "password" not in info.database_url and "pgpass" in info.database_url


async def _one_event(store: EventStore) -> str:
    stream = f"workflow-{uuid.uuid4()}"
    created = WorkflowCreated(spec_name="s", spec={"tasks": []}, params={}, command_id="c-1")
    await store.append(stream, [created], expected_version=0)
    return stream


async def test_the_service_may_not_update_delete_or_truncate_events(
    store: EventStore, database_url: str
) -> None:
    await _one_event(store)
    for statement in ("update events set data = '{}'", "delete from events",
                      "truncate events", "insert into maintenance_log (reason, operation)"
                      " values ('x', 'DELETE')", "alter table events disable trigger all"):
        with psycopg.connect(database_url, autocommit=True) as conn:
            # The maintenance setting changes nothing for the service.
            conn.execute("set rebalancer.maintenance = 'let me'")
            with pytest.raises((pg_errors.InsufficientPrivilege, pg_errors.WrongObjectType)):
                conn.execute(statement)
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("select count(*), min(data ->> 'command_id') from events").fetchone()
    assert row == (1, "c-1")


async def test_the_owner_changes_events_only_through_the_logged_maintenance_path(
    store: EventStore, owner_database_url: str, database_url: str
) -> None:
    stream = await _one_event(store)
    for statement in ("update events set metadata = '{\"n\": 2}'", "delete from events",
                      "truncate events"):
        with psycopg.connect(owner_database_url, autocommit=True) as conn:
            with pytest.raises(psycopg.Error, match="append-only") as refused:
                conn.execute(statement)
            assert refused.value.sqlstate == "RB423"
    with psycopg.connect(owner_database_url) as conn:
        with conn.transaction():
            conn.execute("set local rebalancer.maintenance = 'issue 12: a mistyped note'")
            conn.execute("""update events set metadata = '{"n": 2}'""")
        # `set local` ended with the transaction: the guard is back.
        with pytest.raises(psycopg.Error, match="append-only"), conn.transaction():
            conn.execute("delete from events")
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("select metadata ->> 'n' from events").fetchone() == ("2",)
        logged = conn.execute(
            "select by_role, reason, operation, stream_id, old_event -> 'metadata' ->> 'n',"
            " new_event -> 'metadata' ->> 'n' from maintenance_log").fetchall()
    assert logged == [("rebalancer_owner", "issue 12: a mistyped note", "UPDATE", stream,
                       None, "2")]


async def test_a_superuser_replica_session_gets_past_the_guard_unlogged(
    store: EventStore, admin_database_url: str
) -> None:
    # What docs/security.md says the guard cannot stop (and how the audit tests tamper).
    await _one_event(store)
    with psycopg.connect(admin_database_url) as conn, conn.transaction():
        conn.execute("set local session_replication_role = replica")
        conn.execute("delete from events")
    with psycopg.connect(admin_database_url, autocommit=True) as conn:
        assert conn.execute("select count(*) from events").fetchone() == (0,)
        assert conn.execute("select count(*) from maintenance_log").fetchone() == (0,)


def test_roles_migration_runs_again_on_a_migrated_database(owner_database_url: str) -> None:
    # Roles are cluster-wide and every test database is a copy: 011 must be a no-op again.
    sql = (MIGRATIONS_DIR / "011_roles.sql").read_text()
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute(sql.encode())
        triggers = conn.execute(
            "select tgname from pg_trigger where tgrelid = 'events'::regclass"
            " and not tgisinternal order by 1").fetchall()
    assert triggers == [("events_guard_rows",), ("events_guard_truncate",)]


def test_the_migration_sets_the_database_and_service_timeouts(
    servers: Servers, template_url: str
) -> None:
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        settings = dict(conn.execute(  # type: ignore[arg-type]
            "select coalesce(d.datname, r.rolname), s.setconfig from pg_db_role_setting s"
            " left join pg_database d on d.oid = s.setdatabase"
            " left join pg_roles r on r.oid = s.setrole"
            " where d.datname = 'rebalancer_template' or r.rolname = 'rebalancer_service'"
        ).fetchall())
    assert "idle_in_transaction_session_timeout=60s" in settings["rebalancer_template"]
    assert "statement_timeout=30s" in settings["rebalancer_service"]


def test_a_foreign_session_idle_in_a_transaction_is_ended(
    database_name: str, admin_database_url: str, owner_database_url: str
) -> None:
    # The limit the migration sets on the database, made short for this copy of it.
    with psycopg.connect(admin_database_url, autocommit=True) as conn:
        conn.execute(f"alter database {database_name}"
                     " set idle_in_transaction_session_timeout = '1s'")
    # A session that is not the service's (no options of ours), holding a transaction open.
    conn = psycopg.connect(owner_database_url)
    try:
        conn.execute("select count(*) from events")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        time.sleep(2.5)
        with pytest.raises(pg_errors.IdleInTransactionSessionTimeout):
            conn.execute("select 1")
    finally:
        conn.close()
    with psycopg.connect(admin_database_url, autocommit=True) as check:
        left = check.execute("select count(*) from pg_stat_activity where datname = %s"
                             " and state like 'idle in transaction%%'",
                             (database_name,)).fetchone()
    assert left == (0,)
