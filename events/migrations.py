"""Numbered SQL migrations (events/sql/NNN_name.sql, package data), applied once each and
recorded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from events.database import first_line
from events.errors import EventStoreError, StoreUnavailableError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "sql"
_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
# Any constant works; it only has to be the same for every process that migrates.
_ADVISORY_LOCK_KEY = 0x7265_6261_6C61


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path


def available(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files in version order; raises EventStoreError on a bad or repeated number."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise EventStoreError(f"migration file name {path.name!r} is not NNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise EventStoreError(f"two migrations numbered {version:03d}")
        found[version] = Migration(version, path.stem, path)
    return [found[v] for v in sorted(found)]


async def migrate(conninfo: str, directory: Path = MIGRATIONS_DIR, *,
                  connect_timeout: float = 10.0) -> list[str]:
    """Apply every migration not yet recorded; returns the names applied (empty: up to date).

    Each migration runs in its own transaction together with its bookkeeping row, so a failed
    one leaves nothing half-applied. A session advisory lock makes concurrent runs wait for
    each other instead of racing on the same DDL.
    """
    migrations = available(directory)
    try:
        conn = await psycopg.AsyncConnection.connect(
            conninfo, autocommit=True, connect_timeout=max(1, round(connect_timeout)))
    except psycopg.OperationalError as e:
        raise StoreUnavailableError(f"cannot reach PostgreSQL: {first_line(e)}") from e
    applied_now: list[str] = []
    async with conn:
        await conn.execute("select pg_advisory_lock(%s)", (_ADVISORY_LOCK_KEY,))
        try:
            # Only when missing: the service role, which may not create tables, runs this too
            # (`serve` migrates at start) and must find an up-to-date database a no-op.
            cur = await conn.execute("select to_regclass('schema_migrations') is null")
            row = await cur.fetchone()
            if row is not None and row[0]:
                await conn.execute(
                    "create table if not exists schema_migrations ("
                    " version int primary key, name text not null,"
                    " applied_at timestamptz not null default now())"
                )
            cur = await conn.execute("select version from schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for migration in migrations:
                if migration.version in done:
                    continue
                sql = migration.path.read_text(encoding="utf-8")
                try:
                    async with conn.transaction():
                        await conn.execute(sql.encode())  # a trusted file, not user input
                        await conn.execute(
                            "insert into schema_migrations (version, name) values (%s, %s)",
                            (migration.version, migration.name),
                        )
                except psycopg.Error as e:
                    raise EventStoreError(
                        f"migration {migration.name} failed: {first_line(e)}"
                    ) from e
                applied_now.append(migration.name)
        finally:
            await conn.execute("select pg_advisory_unlock(%s)", (_ADVISORY_LOCK_KEY,))
    return applied_now

