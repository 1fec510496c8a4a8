"""The event store on real PostgreSQL: appends, concurrency, bad input, hash chain."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any, ClassVar

import psycopg
import pytest

from events.catalogue import (
    Catalogue,
    Event,
    TaskStateChanged,
    WorkflowCreated,
    WorkflowStateChanged,
)
from events.errors import (
    ConcurrencyError,
    InvalidEventError,
    StoreUnavailableError,
    UnknownEventTypeError,
)
from events.store import ORIGIN, EventStore, NewEvent
from tests.support import event_count


def new_stream() -> str:
    return f"workflow-{uuid.uuid4()}"


def started(command_id: str = "cmd-1") -> WorkflowCreated:
    return WorkflowCreated(
        spec_name="upbit_to_binance_sub_futures",
        spec={"tasks": [{"name": "buy", "kind": "trade"}]},
        params={"from_amount": "1000000", "from_currency": "KRW"},
        command_id=command_id,
    )


def moved(
    trigger: str, source: str, dest: str, reason: str | None = None
) -> WorkflowStateChanged:
    return WorkflowStateChanged(trigger=trigger, source=source, dest=dest, reason=reason)


async def test_every_event_type_round_trips_through_the_store(store: EventStore) -> None:
    stream = new_stream()
    events: list[Event] = [
        started(),
        moved("start", "created", "running"),
        TaskStateChanged(
            task_index=0, task_name="buy", kind="trade", trigger="submit", source="created",
            dest="submitting",
            request_params={"client_id": "rb-1", "quote_amount": str(Decimal("1000000"))},
        ),
    ]
    result = await store.append(stream, events, expected_version=0, metadata={"actor": "test"})
    # Positions and versions are assigned in order, and metadata is kept.
    assert result.version == 3
    assert list(result.positions) == sorted(result.positions)
    read = await store.read_stream(stream)
    assert [r.version for r in read] == [1, 2, 3]
    assert [r.position for r in read] == list(result.positions)
    assert all(r.metadata == {"actor": "test"} for r in read)
    assert [r.decode() for r in read] == events
    assert read[0].data["params"] == {"from_amount": "1000000", "from_currency": "KRW"}
    assert isinstance(read[0].transaction_id, int)
    assert read[0].transaction_id == result.transaction_id
    assert await store.stream_version(stream) == 3


async def test_reading_a_stream_up_to_a_version(store: EventStore) -> None:
    stream = new_stream()
    await store.append(stream, [started(), moved("start", "created", "running")], 0)
    await store.append(stream, [moved("pause", "running", "paused")], 2)
    assert [r.version for r in await store.read_stream(stream, up_to_version=2)] == [1, 2]
    assert [r.version for r in await store.read_stream(stream, after_version=2)] == [3]


async def test_a_stale_expected_version_raises_and_appends_nothing(store: EventStore) -> None:
    stream = new_stream()
    await store.append(stream, [started()], expected_version=0)
    with pytest.raises(ConcurrencyError):
        await store.append(
            stream,
            [moved("start", "created", "running"), moved("pause", "running", "paused")],
            expected_version=0,
        )
    with pytest.raises(ConcurrencyError):
        await store.append(stream, [moved("start", "created", "running")], expected_version=5)
    assert await event_count(store) == 1
    assert await store.stream_version(stream) == 1


async def test_of_many_concurrent_appenders_at_one_version_exactly_one_wins(
    store: EventStore,
) -> None:
    stream = new_stream()
    await store.append(stream, [started()], 0)

    async def attempt(i: int) -> str:
        try:
            await store.append(stream, [moved("start", "created", "running", f"attempt {i}")], 1)
            return "won"
        except ConcurrencyError:
            return "lost"

    outcomes = await asyncio.gather(*(attempt(i) for i in range(10)))
    assert outcomes.count("won") == 1
    assert await store.stream_version(stream) == 2


@pytest.mark.parametrize(
    ("stream_id", "event", "error", "message"),
    [
        (None, NewEvent("NoSuchEvent", {}), UnknownEventTypeError, "NoSuchEvent"),
        (None, NewEvent("WorkflowStateChanged", {"trigger": "start"}), InvalidEventError,
         "source"),
        (None, NewEvent("WorkflowStateChanged",
                        {"trigger": "x", "source": "a", "dest": "b", "extra": 1}),
         InvalidEventError, "extra"),
        ("order-123", NewEvent("WorkflowStateChanged",
                               {"trigger": "x", "source": "a", "dest": "b"}),
         InvalidEventError, "stream id"),
        ("workflow-not-a-uuid", NewEvent("WorkflowStateChanged",
                                         {"trigger": "x", "source": "a", "dest": "b"}),
         InvalidEventError, "stream id"),
        (None, NewEvent("TaskStateChanged",
                        {"task_index": 0, "task_name": "w", "kind": "withdraw",
                         "trigger": "submit", "source": "created", "dest": "submitting",
                         "request_params": {"nested": {"api_key": "k"}}}),
         InvalidEventError, "secret"),
        (None, NewEvent("WorkflowStateChanged",
                        {"trigger": "start", "source": "created", "dest": "running"},
                        metadata={"signature": "abc"}), InvalidEventError, "secret"),
    ],
    ids=["unregistered-type", "missing-field", "unknown-field", "foreign-stream-id",
         "bad-uuid", "secret-in-data", "secret-in-metadata"],
)
async def test_bad_input_is_refused_with_a_clear_error_and_appends_nothing(
    store: EventStore, stream_id: str | None, event: NewEvent, error: type[Exception],
    message: str,
) -> None:
    stream = new_stream()
    await store.append(stream, [started()], 0)
    with pytest.raises(error, match=message):
        # A valid event first: the whole batch must be refused, not just the bad one.
        await store.append(stream_id or stream, [moved("start", "created", "running"), event], 1)
    assert await event_count(store) == 1


async def test_an_unregistered_event_class_is_refused(store: EventStore) -> None:
    class Stray(Event):
        type_name: ClassVar[str] = "Stray"

    with pytest.raises(UnknownEventTypeError):
        await store.append(new_stream(), [Stray()], 0)
    assert await event_count(store) == 0


async def test_the_hash_chain_detects_an_edited_row(
    store: EventStore, admin_database_url: str
) -> None:
    stream = new_stream()
    await store.append(stream, [started(), moved("start", "created", "running")], 0)
    await store.append(stream, [moved("pause", "running", "paused")], 2)
    assert await store.verify_stream(stream) == []
    async with await psycopg.AsyncConnection.connect(admin_database_url, autocommit=True) as conn:
        # A superuser skipping the events guard (docs/security.md), as an attacker would.
        await conn.execute("set session_replication_role = replica")
        # An edit of the payload that keeps the JSON valid and the model happy.
        await conn.execute(
            "update events set data = jsonb_set(data, '{dest}', '\"done\"')"
            " where stream_id = %s and version = 2",
            (stream,),
        )
    problems = await store.verify_stream(stream)
    assert [(p.version, "hash" in p.message) for p in problems] == [(2, True)]


async def test_the_hash_chain_detects_a_deleted_middle_event(
    store: EventStore, admin_database_url: str
) -> None:
    stream = new_stream()
    await store.append(
        stream,
        [started(), moved("start", "created", "running"), moved("pause", "running", "paused")],
        0,
    )
    async with await psycopg.AsyncConnection.connect(admin_database_url, autocommit=True) as conn:
        await conn.execute("set session_replication_role = replica")
        await conn.execute("delete from events where stream_id = %s and version = 2", (stream,))
    problems = await store.verify_stream(stream)
    assert {p.version for p in problems} == {3}
    assert any("missing" in p.message for p in problems)
    assert any("hash" in p.message for p in problems)


async def test_an_old_schema_version_in_the_store_is_upcast_on_read(
    database_url: str,
) -> None:
    local = Catalogue()

    @local.register
    class AmountNoted(Event):
        type_name: ClassVar[str] = "AmountNoted"
        schema_version: ClassVar[int] = 2
        amount: Decimal
        currency: str

    @local.upcaster("AmountNoted", 1)
    def _v1(data: dict[str, Any]) -> dict[str, Any]:
        return {"amount": data["qty"], "currency": "KRW"}

    stream = new_stream()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # Written by an older release: schema_version 1 and the old shape.
        await conn.execute(
            "select * from append_events(%s, 0, '[{\"type\": \"AmountNoted\","
            " \"schema_version\": 1, \"data\": {\"qty\": \"5000\"}, \"metadata\": {}}]')",
            (stream,),
        )
    async with await EventStore.open(database_url, catalogue=local) as store:
        [row] = await store.read_stream(stream)
        assert row.schema_version == 1
        assert row.decode(local) == AmountNoted(amount=Decimal("5000"), currency="KRW")
        assert await store.verify_stream(stream) == []


async def test_read_all_waits_for_a_late_commit_instead_of_skipping_it(
    store: EventStore, database_url: str
) -> None:
    early, late = new_stream(), new_stream()
    async with await psycopg.AsyncConnection.connect(database_url) as slow:
        # The slow transaction takes its id and position first but commits last.
        await slow.execute(
            "select * from append_events(%s, 0, '[{\"type\": \"WorkflowStateChanged\","
            " \"schema_version\": 1, \"metadata\": {},"
            " \"data\": {\"trigger\": \"t\", \"source\": \"a\", \"dest\": \"b\"}}]')",
            (early,),
        )
        fast = await store.append(late, [started()], 0)
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
            cur = await c.execute(
                "select position from events where stream_id = %s and position > 0", (early,)
            )
            assert await cur.fetchall() == []  # not visible yet
        # A naive position-ordered reader would return `fast` now and then never go back.
        assert await store.read_all(ORIGIN) == []
        await slow.commit()
    read = await store.read_all(ORIGIN)
    assert [r.stream_id for r in read] == [early, late]
    assert read[0].position < fast.positions[0]
    assert await store.read_all(read[-1].checkpoint) == []


async def test_an_unreachable_database_gives_a_one_line_error() -> None:
    with pytest.raises(StoreUnavailableError) as caught:
        await EventStore.open("postgresql://nobody@127.0.0.1:1/none", connect_timeout=2)
    assert "\n" not in str(caught.value)
    assert "127.0.0.1:1" in str(caught.value)


async def test_notifications_wake_a_listener_after_an_append(store: EventStore) -> None:
    async with store.listen() as notifications:
        assert not await notifications.wait(0.05)
        await store.append(new_stream(), [started()], 0)
        assert await notifications.wait(5)
