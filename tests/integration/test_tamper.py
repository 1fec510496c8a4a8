"""Tampering as a superuser would, caught by `audit` against the JetStream copy and the anchors.

Each case stores workflows, relays them (with the chain key) to a private nats-server, tampers
inside a transaction with `session_replication_role = replica` (so a guard trigger on events
does not stop it) and audits: the stream is named, exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import psycopg
import pytest

from events.relay import Relay
from events.relay.anchors import CHAIN_STREAM, Anchor, ChainKeyError, load_key
from events.store import EventStore
from projections.runner import ProjectionRunner, default_projections
from rebalancer.audit import AuditReport, audit_database
from rebalancer.cli.main import main
from tests.support import NatsServer
from tests.support.synthetic import History, done_history


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A private nats-server: the copy must hold this test's events only."""
    with NatsServer.jetstream(tmp_path / "js") as server:
        yield server


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "home" / "chain.key"
    load_key(path, create=True)
    return path


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, database_url: str, nats_server: NatsServer,
            key_file: Path) -> None:
    monkeypatch.setenv("REBALANCER_DATABASE_URL", database_url)
    monkeypatch.setenv("REBALANCER_NATS_URL", nats_server.url)
    monkeypatch.setenv("REBALANCER_CHAIN_KEY_FILE", str(key_file))


async def stored_and_relayed(store: EventStore, nats_url: str, key_file: Path,
                             seeds: tuple[int, ...] = (1, 2, 3)) -> list[History]:
    histories = [done_history(seed) for seed in seeds]
    for history in histories:
        version = 0
        for batch in history.appends:
            version = (await store.append(history.stream_id, batch, version)).version
    await ProjectionRunner(store, default_projections()).catch_up()
    await relay_all(store, nats_url, key_file)
    return histories


async def relay_all(store: EventStore, nats_url: str, key_file: Path) -> None:
    async with Relay(store, nats_url, chain_key=load_key(key_file)) as relay:
        await relay.relay_once()


@contextlib.asynccontextmanager
async def as_superuser(database_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """One transaction of an intruder with superuser rights: triggers (a guard) are off."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn, conn.transaction():
        await conn.execute("set local session_replication_role = replica")
        yield conn


async def recompute_chain(conn: psycopg.AsyncConnection[Any], stream_id: str,
                          from_version: int) -> None:
    """Rewrite every hash from `from_version` on, so the chain verifies again."""
    cur = await conn.execute(
        "select hash from events where stream_id = %s and version = %s",
        (stream_id, from_version - 1),
    )
    row = await cur.fetchone()
    previous = bytes(row[0]) if row else b""
    cur = await conn.execute(
        "select version from events where stream_id = %s and version >= %s order by version",
        (stream_id, from_version),
    )
    for (version,) in await cur.fetchall():
        updated = await conn.execute(
            "update events set hash = sha256(%s || event_canonical_v2(position, stream_id,"
            " version, type, schema_version, data, metadata, recorded_at))"
            " where stream_id = %s and version = %s returning hash",
            (previous, stream_id, version),
        )
        new = await updated.fetchone()
        assert new is not None
        previous = bytes(new[0])


async def withdrawal_version(store: EventStore, stream_id: str) -> int:
    events = await store.read_stream(stream_id)
    return next(e.version for e in events
                if e.type == "TaskStateChanged" and e.data.get("kind") == "withdraw"
                and e.data.get("request_params"))


async def audited(database_url: str, nats_url: str, key_file: Path) -> AuditReport:
    return await audit_database(database_url, None, nats_url=nats_url, chain_key_file=key_file)


def checks_of(report: AuditReport, stream_id: str) -> set[str]:
    return {f.check for f in report.findings if f.stream_id == stream_id}


async def cli(*argv: str) -> int:
    # main() runs its own event loop (asyncio.run): give it a thread of its own.
    return await asyncio.to_thread(main, list(argv))


# -- clean ---------------------------------------------------------------------------------------


async def test_an_untampered_store_audits_clean_against_copy_and_anchors(
    store: EventStore, database_url: str, nats_server: NatsServer, key_file: Path,
    cli_env: None, capsys: pytest.CaptureFixture[str],
) -> None:
    histories = await stored_and_relayed(store, nats_server.url, key_file)
    events = sum(len(h.events) for h in histories)
    report = await audited(database_url, nats_server.url, key_file)
    assert report.findings == []
    assert report.outside == f"checked against the JetStream copy ({events} events, 3 anchors)"
    assert await cli("audit") == 0
    out = capsys.readouterr().out
    assert "all intact" in out and "checked against the JetStream copy" in out
    # --no-nats says that it did not look.
    assert await cli("audit", "--no-nats") == 0
    assert "not checked against the JetStream copy (--no-nats)" in capsys.readouterr().out


async def test_the_copy_and_the_anchors_cannot_be_deleted_through_the_api(
    store: EventStore, nats_server: NatsServer, key_file: Path
) -> None:
    await stored_and_relayed(store, nats_server.url, key_file, seeds=(4,))
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        for stream in ("REBALANCER_EVENTS", CHAIN_STREAM):
            with pytest.raises(nats.js.errors.APIError):
                await js.delete_msg(stream, 1)
            with pytest.raises(nats.js.errors.APIError):
                await js.purge_stream(stream)
            assert (await js.stream_info(stream)).state.messages >= 1
    finally:
        await nc.close()


def test_the_chain_key_file_is_made_once_mode_600_with_32_bytes(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "chain.key"
    key = load_key(path, create=True)
    assert len(key) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_key(path, create=True) == key  # never replaced
    path.write_bytes(b"short")
    with pytest.raises(ChainKeyError, match="is not 32 bytes"):
        load_key(path)


# -- the four tamper cases -------------------------------------------------------------------------


async def test_an_edited_address_with_the_chain_recomputed_is_caught(
    store: EventStore, database_url: str, admin_database_url: str, nats_server: NatsServer,
    key_file: Path,
    cli_env: None, capsys: pytest.CaptureFixture[str],
) -> None:
    victim, *others = await stored_and_relayed(store, nats_server.url, key_file)
    version = await withdrawal_version(store, victim.stream_id)
    async with as_superuser(admin_database_url) as conn:
        await conn.execute(
            "update events set data = jsonb_set(data, '{request_params,address}',"
            " '\"0xmallory\"') where stream_id = %s and version = %s",
            (victim.stream_id, version),
        )
        await recompute_chain(conn, victim.stream_id, version)
    report = await audited(database_url, nats_server.url, key_file)
    # The chain itself verifies: only the outside record tells.
    assert checks_of(report, victim.stream_id) == {"jetstream_copy", "anchor"}
    edited = [f for f in report.findings if f.check == "jetstream_copy"]
    assert [(f.stream_id, f.version) for f in edited] == [
        (victim.stream_id, v) for v in range(version, len(victim.events) + 1)]
    assert edited[0].message == "differs from the JetStream copy in data, hash"
    assert all(f.message == "differs from the JetStream copy in hash" for f in edited[1:])
    anchor = next(f for f in report.findings if f.check == "anchor")
    assert anchor.version == len(victim.events)
    assert "(the chain was recomputed)" in anchor.message
    assert report.bad_streams == [victim.stream_id]
    assert await cli("audit") == 1
    out = capsys.readouterr().out
    assert f"{victim.stream_id} v{version}" in out
    assert all(h.stream_id not in out for h in others)


async def test_a_deleted_stream_with_its_read_model_row_is_caught(
    store: EventStore, database_url: str, admin_database_url: str, nats_server: NatsServer,
    key_file: Path,
    cli_env: None, capsys: pytest.CaptureFixture[str],
) -> None:
    victim, *_ = await stored_and_relayed(store, nats_server.url, key_file)
    async with as_superuser(admin_database_url) as conn:
        await conn.execute("delete from events where stream_id = %s", (victim.stream_id,))
        await conn.execute("delete from workflows where stream_id = %s", (victim.stream_id,))
    report = await audited(database_url, nats_server.url, key_file)
    count = len(victim.events)
    assert report.streams == 3
    assert checks_of(report, victim.stream_id) == {"jetstream_copy", "anchor"}
    gone = next(f for f in report.findings if f.check == "jetstream_copy")
    assert gone.message == (f"the JetStream copy has {count} event(s) (v1-v{count});"
                            " the table has no events")
    # One workflow alone: its id still names something to audit.
    workflow_id = victim.stream_id.removeprefix("workflow-")
    assert await cli("audit", workflow_id) == 1
    assert f"{victim.stream_id} v1" in capsys.readouterr().out


async def test_a_back_dated_event_is_caught(
    store: EventStore, database_url: str, admin_database_url: str, nats_server: NatsServer,
    key_file: Path,
    cli_env: None, capsys: pytest.CaptureFixture[str],
) -> None:
    victim, *_ = await stored_and_relayed(store, nats_server.url, key_file)
    async with as_superuser(admin_database_url) as conn:
        await conn.execute(
            "update events set recorded_at = recorded_at - interval '3 days'"
            " where stream_id = %s and version = 2", (victim.stream_id,),
        )
    report = await audited(database_url, nats_server.url, key_file)
    found = {(f.check, f.version) for f in report.findings}
    # v2 hashes cover recorded_at; the copy says what it was.
    assert found == {("hash_chain", 2), ("jetstream_copy", 2)}
    redated = next(f for f in report.findings if f.check == "jetstream_copy")
    assert redated.message.startswith("differs from the JetStream copy in recorded_at (")
    assert report.bad_streams == [victim.stream_id]
    assert await cli("audit") == 1
    assert f"{victim.stream_id} v2" in capsys.readouterr().out


async def test_a_deleted_tail_then_replay_is_refused_and_forced_replay_keeps_the_evidence(
    store: EventStore, database_url: str, admin_database_url: str, nats_server: NatsServer,
    key_file: Path,
    cli_env: None, capsys: pytest.CaptureFixture[str],
) -> None:
    victim, *_ = await stored_and_relayed(store, nats_server.url, key_file)
    last = len(victim.events)
    async with as_superuser(admin_database_url) as conn:
        await conn.execute("delete from events where stream_id = %s and version = %s",
                           (victim.stream_id, last))
    # Replay refuses over the failed audit, naming the stream.
    assert await cli("replay") == 1
    err = capsys.readouterr().err
    assert "replay: refused" in err and victim.stream_id in err
    rows = await store.fetch_rows("select count(*) from replay_log", ())
    assert rows == [(0,)]
    # Forced, it rebuilds (the read model forgets v{last}) and records that it did.
    assert await cli("replay", "--force") == 0
    out = capsys.readouterr().out
    assert "forced over a failed audit" in out and "replay_log" in out
    rows = await store.fetch_rows(
        "select action, findings, bad_streams from replay_log", ())
    assert len(rows) == 1 and rows[0][0] == "replay --force" and rows[0][1] >= 1
    assert rows[0][2] == [victim.stream_id]
    # The read model no longer remembers the tail; the copy and the anchor still do.
    report = await audited(database_url, nats_server.url, key_file)
    assert checks_of(report, victim.stream_id) == {"jetstream_copy", "anchor"}
    lost = next(f for f in report.findings if f.check == "jetstream_copy")
    assert lost.version == last
    assert lost.message == f"the JetStream copy has 1 event(s) (v{last}); the table lacks v{last}"
    assert await cli("audit") == 1
    assert victim.stream_id in capsys.readouterr().out


async def test_an_anchor_signed_with_another_key_does_not_verify(
    store: EventStore, database_url: str, nats_server: NatsServer, key_file: Path,
    tmp_path: Path,
) -> None:
    victim, = await stored_and_relayed(store, nats_server.url, key_file, seeds=(5,))
    # Someone with NATS rights but not the key anchors the head with a key of their own.
    forged = tmp_path / "forged.key"
    load_key(forged, create=True)
    head = (await store.read_stream(victim.stream_id))[-1]
    anchor = Anchor.of(head, load_key(forged))
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().publish(anchor.subject, anchor.body())
    finally:
        await nc.close()
    report = await audited(database_url, nats_server.url, key_file)
    assert [(f.stream_id, f.version, f.check, f.message) for f in report.findings] == [
        (victim.stream_id, head.version, "anchor",
         f"the anchor of v{head.version} does not verify with the chain key")]


async def test_a_deleted_copy_is_caught_empty_and_refilled_without_the_key(
    store: EventStore, database_url: str, nats_server: NatsServer, key_file: Path,
) -> None:
    histories = await stored_and_relayed(store, nats_server.url, key_file, seeds=(6, 7))
    # NATS operator rights: JetStream refuses deleting messages, not deleting the streams.
    nc = await nats.connect(nats_server.url)
    try:
        for stream in ("REBALANCER_EVENTS", CHAIN_STREAM):
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()
    report = await audited(database_url, nats_server.url, key_file)
    assert [(f.stream_id, f.check) for f in report.findings] == [
        ("REBALANCER_EVENTS", "jetstream_copy")]
    assert report.findings[0].message.startswith("the copy is empty, but the relay recorded")
    # Re-filled by a relay without the key: the copy matches, but nothing is anchored.
    async with Relay(store, nats_server.url, name="refill") as relay:
        await relay.relay_once()
    report = await audited(database_url, nats_server.url, key_file)
    assert {(f.stream_id, f.check) for f in report.findings} == {
        (h.stream_id, "anchor") for h in histories}
    assert all(f.message.startswith(f"no anchor for v{f.version}, the last event")
               for f in report.findings)
