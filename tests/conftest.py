"""Shared fixtures: real PostgreSQL and NATS (testcontainers with Docker, embedded otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import os
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
    """Where the test PostgreSQL (an admin URL) and NATS listen, and who started them."""

    admin_url: str
    nats_url: str
    origin: str


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
        yield Servers(info.database_url, info.nats_url, "embedded")
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
        yield Servers(given_db, given_nats, "environment")
    elif _docker_reachable():
        with _containers() as found:
            yield found
    else:
        with _embedded() as found:
            yield found


def _with_dbname(url: str, dbname: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(url)
    parts["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**parts)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def template_url(servers: Servers) -> str:
    """A migrated template database, so each test gets a fresh copy in milliseconds."""
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(f"drop database if exists {TEMPLATE_DB} with (force)")
        conn.execute(f"create database {TEMPLATE_DB}")
    url = _with_dbname(servers.admin_url, TEMPLATE_DB)
    asyncio.run(migrate(url))
    return url


@pytest.fixture
def database_url(servers: Servers, template_url: str) -> Iterator[str]:
    """A fresh, migrated database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(f"create database {name} template {TEMPLATE_DB}")
    try:
        yield _with_dbname(servers.admin_url, name)
    finally:
        with psycopg.connect(servers.admin_url, autocommit=True) as conn:
            conn.execute(f"drop database if exists {name} with (force)")


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
