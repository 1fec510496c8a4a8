"""Shared fixtures: real PostgreSQL and NATS (testcontainers with Docker, embedded otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from events.migrations import migrate
from events.store import EventStore

ROOT = Path(__file__).resolve().parent.parent
TEST_HOME = ROOT / ".rebalancer-test"
TEMPLATE_DB = "rebalancer_template"


def pytest_addoption(parser: pytest.Parser) -> None:
    # The opt-in tests against a real exchange's test network (tests/live); off by default.
    parser.addoption("--exchange", action="append", default=[], metavar="NAME",
                     help="run tests/live against NAME (binance-testnet); keys from env")


@dataclass(frozen=True)
class Servers:
    """Where the test PostgreSQL and NATS listen, and who started them. PostgreSQL three ways:
    as a superuser, as the owner role (migrations) and as the service role (everything else);
    any database name in them is replaced per test."""

    admin_url: str
    nats_url: str
    origin: str
    owner_url: str = ""
    service_url: str = ""


def _with_roles(found: Servers) -> Servers:
    """`found` with owner and service URLs: the roles get LOGIN and fresh passwords from the
    superuser, as `infra up` does on the embedded cluster. Roles are cluster-wide: pointed at
    an embedded home's cluster, its pgpass is stale until its next `infra up` resets them."""
    from rebalancer.embedded.postgres import ensure_roles
    from rebalancer.embedded.state import OWNER_ROLE, SERVICE_ROLE

    if found.owner_url and found.service_url:
        return found
    passwords = {role: secrets.token_hex(16) for role in (OWNER_ROLE, SERVICE_ROLE)}
    with psycopg.connect(found.admin_url, autocommit=True) as conn:
        ensure_roles(conn, passwords)

    def as_role(role: str) -> str:
        parts = psycopg.conninfo.conninfo_to_dict(found.admin_url)
        parts.update(user=role, password=passwords[role])
        return psycopg.conninfo.make_conninfo(**parts)  # type: ignore[arg-type]

    return dataclasses.replace(found, owner_url=as_role(OWNER_ROLE),
                               service_url=as_role(SERVICE_ROLE))


def _docker_reachable() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _containers() -> Iterator[Servers]:
    from testcontainers.core.container import DockerContainer  # type: ignore[import-untyped]
    from testcontainers.core.waiting_utils import wait_for_logs  # type: ignore[import-untyped]
    from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]

    with (
        PostgresContainer("postgres:16", username="rebalancer", password="rebalancer",
                          dbname="rebalancer", driver=None) as pg,
        DockerContainer("nats:2.10").with_command("-js").with_exposed_ports(4222) as nats,
    ):
        wait_for_logs(nats, "Server is ready")
        nats_url = f"nats://{nats.get_container_host_ip()}:{nats.get_exposed_port(4222)}"
        yield Servers(pg.get_connection_url(), nats_url, "testcontainers")


@contextlib.contextmanager
def _embedded() -> Iterator[Servers]:
    from rebalancer import embedded

    was_running = all(embedded.status(TEST_HOME).values())
    info = embedded.up(TEST_HOME)
    try:
        yield Servers(info.admin_database_url, info.nats_url, "embedded",
                      owner_url=info.migrate_database_url, service_url=info.database_url)
    finally:
        # Leave nothing running that this session started.
        if not was_running:
            embedded.down(TEST_HOME)


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    """Real servers for the whole session: given URLs, Docker containers, or embedded ones."""
    given_db = os.environ.get("REBALANCER_TEST_DATABASE_URL")
    given_nats = os.environ.get("REBALANCER_TEST_NATS_URL")
    if given_db and given_nats:
        yield _with_roles(Servers(given_db, given_nats, "environment"))
    elif _docker_reachable():
        with _containers() as found:
            yield _with_roles(found)
    else:
        with _embedded() as found:
            yield found


def _with_dbname(url: str, dbname: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(url)
    parts["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**parts)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def template_url(servers: Servers) -> str:
    """A template database migrated by the owner role, as `rebalancer db migrate` would, so
    each test gets a fresh copy in milliseconds."""
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(f"drop database if exists {TEMPLATE_DB} with (force)")
        conn.execute(f"create database {TEMPLATE_DB} owner rebalancer_owner")
    asyncio.run(migrate(_with_dbname(servers.owner_url, TEMPLATE_DB)))
    return _with_dbname(servers.admin_url, TEMPLATE_DB)


@pytest.fixture
def database_name(servers: Servers, template_url: str) -> Iterator[str]:
    """A fresh, migrated database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(f"create database {name} template {TEMPLATE_DB} owner rebalancer_owner")
        # A database's own grants are not copied from its template: what 011_roles.sql grants
        # on the database it migrates, granted again on this copy.
        conn.execute(f"grant create on database {name} to rebalancer_service")
    try:
        yield name
    finally:
        with psycopg.connect(servers.admin_url, autocommit=True) as conn:
            conn.execute(f"drop database if exists {name} with (force)")


@pytest.fixture
def database_url(servers: Servers, database_name: str) -> str:
    """The test's database as the service role: what `serve` and the command line may do, so
    the suite proves the grants of 011_roles.sql are enough."""
    return _with_dbname(servers.service_url, database_name)


@pytest.fixture
def owner_database_url(servers: Servers, database_name: str) -> str:
    """The test's database as the owner role (migrations, the maintenance path)."""
    return _with_dbname(servers.owner_url, database_name)


@pytest.fixture
def admin_database_url(servers: Servers, database_name: str) -> str:
    """The test's database as a superuser: for tests that tamper with what the service may
    not touch (`set local session_replication_role = replica` gets past the events guard)."""
    return _with_dbname(servers.admin_url, database_name)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[EventStore]:
    """An event store on the test's own database."""
    opened = await EventStore.open(database_url, max_size=12)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture(scope="session")
def nats_url(servers: Servers) -> str:
    return servers.nats_url
