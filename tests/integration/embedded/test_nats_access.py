"""Who may do what on NATS: the operator anything, the subscriber only read events and alerts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from events import relay
from events.store import RecordedEvent
from rebalancer import alerts, embedded
from tests.support import NatsServer, eventually
from tests.support.nats_server import NATS_SERVER

ROOT = Path(__file__).resolve().parents[3]
REFERENCE_CONF = ROOT / "infra" / "nats" / "rebalancer.conf"
# How long a refused publish may take to come back as an error (it is one round trip).
REFUSAL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Access:
    """One NATS server with the rebalancer's users, and the URL each kind of client uses."""

    operator_url: str
    subscriber_url: str
    anonymous_url: str


@contextlib.contextmanager
def _embedded_server(home: Path) -> Iterator[Access]:
    try:
        info = embedded.up(home)
        yield Access(info.nats_url, info.nats_subscriber_url, info.nats_address)
    finally:
        left = embedded.load_info(home)
        embedded.down(home)
        # The /var/tmp fallback (tmp_path is not reachable by the postgres user) is ours too.
        if left is not None and str(left.pg_data_dir).startswith("/var/tmp/rebalancer-pg-"):
            shutil.rmtree(left.pg_data_dir.parent, ignore_errors=True)


@contextlib.contextmanager
def _reference_server(workdir: Path) -> Iterator[Access]:
    # The file as a user would run it, on another port; its store is relative to the workdir.
    passwords = {name: uuid.uuid4().hex for name in embedded.NATS_PASSWORD_VARIABLES.values()}
    workdir.mkdir(parents=True, exist_ok=True)
    with NatsServer("-c", str(REFERENCE_CONF), env={**os.environ, **passwords},
                    cwd=workdir) as server:
        operator = passwords[embedded.NATS_PASSWORD_VARIABLES[embedded.NATS_OPERATOR]]
        subscriber = passwords[embedded.NATS_PASSWORD_VARIABLES[embedded.NATS_SUBSCRIBER]]
        yield Access(
            f"nats://operator:{operator}@127.0.0.1:{server.port}",
            f"nats://subscriber:{subscriber}@127.0.0.1:{server.port}",
            server.url,
        )


@pytest.fixture(scope="module", params=["embedded", "reference"])
def access(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Access]:
    """The embedded server and one run from infra/nats/rebalancer.conf: both must hold."""
    where = tmp_path_factory.mktemp(request.param)
    if request.param == "embedded":
        with _embedded_server(where / "home") as found:
            yield found
    else:
        with _reference_server(where / "workdir") as found:
            yield found


@dataclass
class Errors:
    """What nats-py reported through a connection's error callback."""

    seen: list[Exception] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def report(self, error: Exception) -> None:
        self.seen.append(error)
        self.arrived.set()

    async def next(self) -> Exception:
        await asyncio.wait_for(self.arrived.wait(), REFUSAL_TIMEOUT)
        self.arrived.clear()
        return self.seen.pop(0)


@contextlib.asynccontextmanager
async def connected(url: str, errors: Errors | None = None) -> AsyncIterator[NATS]:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5,
                            error_cb=(errors or Errors()).report)
    try:
        yield nc
    finally:
        await nc.close()


async def _settled(nc: NATS) -> None:
    """Return once the server holds every subscription `nc` made so far.

    nats-py 2.16 writes flush()'s PING straight to the socket, ahead of a SUB still queued for
    its flusher task, so one flush does not prove the server has the subscription; by the time
    that PONG is back the flusher has written the SUB, and a second PING goes out behind it.
    """
    await nc.flush()
    await nc.flush()


def _refusal(subject: str) -> str:
    # nats-py lower-cases the server's -ERR line and hands it to the error callback.
    return f'nats: permissions violation for publish to "{subject.lower()}"'


def _event(workflow_id: str) -> RecordedEvent:
    return RecordedEvent(
        position=1, transaction_id=1, stream_id=f"workflow-{workflow_id}", version=1,
        type="WorkflowCreated", schema_version=1, data={"spec": "seed"}, metadata={},
        recorded_at=datetime.now(UTC), hash=b"",
    )


async def _published_event(operator: NATS) -> RecordedEvent:
    # The operator sets up REBALANCER_EVENTS as the relay does and publishes one event into it.
    js = operator.jetstream()
    await js.add_stream(relay.stream_config())
    event = _event(uuid.uuid4().hex)
    await js.publish(relay.subject_for(event), relay.body_of(event),
                     headers={relay.MSG_ID: relay.msg_id(event)})
    return event


# -- the reference file and the embedded server say the same -----------------------------------


def test_reference_config_carries_the_embedded_authorization_block() -> None:
    assert embedded.reference_nats_authorization() in REFERENCE_CONF.read_text()


def test_readable_streams_are_the_event_and_alert_streams() -> None:
    assert embedded.READABLE_STREAMS == (relay.STREAM, alerts.STREAM)
    subscribe = embedded.NATS_PERMISSIONS[embedded.NATS_SUBSCRIBER]["subscribe"]
    assert relay.SUBJECTS in subscribe and alerts.SUBJECTS in subscribe


def test_reference_config_does_not_start_without_the_passwords(tmp_path: Path) -> None:
    variables = embedded.NATS_PASSWORD_VARIABLES.values()
    env = {k: v for k, v in os.environ.items() if k not in variables}
    result = subprocess.run([str(NATS_SERVER), "-c", str(REFERENCE_CONF), "-t"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode != 0
    assert "REBALANCER_NATS_OPERATOR_PASSWORD" in result.stdout + result.stderr


# -- connecting --------------------------------------------------------------------------------


async def _login_refused(url: str) -> None:
    # nats-py raises the server's -ERR during connect as a plain nats.errors.Error.
    with pytest.raises(nats.errors.Error) as refused:
        await nats.connect(url, allow_reconnect=False, connect_timeout=5,
                           error_cb=Errors().report)
    assert str(refused.value) == "nats: 'Authorization Violation'"


async def test_anonymous_connections_are_refused(access: Access) -> None:
    await _login_refused(access.anonymous_url)


async def test_a_wrong_password_is_refused(access: Access) -> None:
    await _login_refused(access.subscriber_url.replace("subscriber:", "subscriber:x", 1))


# -- the operator --------------------------------------------------------------------------------


async def test_operator_may_send_commands(access: Access) -> None:
    async with connected(access.operator_url) as api, connected(access.operator_url) as operator:
        # A stand-in for the command API, on its subjects and queue group.
        async def respond(msg: Msg) -> None:
            await msg.respond(json.dumps({"ok": True, "subject": msg.subject}).encode())

        await api.subscribe("rebalancer.cmd.>", queue="rebalancer-api", cb=respond)
        await _settled(api)
        reply = await operator.request("rebalancer.cmd.start", b"{}", timeout=5)
        assert json.loads(reply.data) == {"ok": True, "subject": "rebalancer.cmd.start"}


# -- the subscriber may not write ----------------------------------------------------------------


@pytest.mark.parametrize("subject", [
    "rebalancer.cmd.start",
    "rebalancer.cmd.cancel",
    "rebalancer.query.workflows",
])
async def test_subscriber_may_not_send_commands_or_queries(access: Access, subject: str) -> None:
    received: list[str] = []
    async with connected(access.operator_url) as api:
        # The command API listens, so a refused request is refused by NATS and not for want of
        # a responder.
        async def respond(msg: Msg) -> None:
            received.append(msg.subject)
            await msg.respond(b'{"ok": true}')

        await api.subscribe("rebalancer.cmd.>", queue="rebalancer-api", cb=respond)
        await api.subscribe("rebalancer.query.>", queue="rebalancer-api", cb=respond)
        await _settled(api)
        errors = Errors()
        async with connected(access.subscriber_url, errors) as subscriber:
            with pytest.raises(nats.errors.TimeoutError):
                await subscriber.request(subject, b'{"command_id": "c1"}', timeout=1)
            assert str(await errors.next()) == _refusal(subject)
            # The connection stays usable after a refusal.
            assert subscriber.is_connected
        await api.flush()
    assert received == []


@pytest.mark.parametrize("subject", [
    "rebalancer.events.wf-1._workflow.created",
    "rebalancer.alerts.workflow_failed",
    "$JS.API.STREAM.CREATE.REBALANCER_EVENTS",
    "$JS.API.STREAM.DELETE.REBALANCER_EVENTS",
    "$JS.API.STREAM.PURGE.REBALANCER_EVENTS",
    "$JS.API.STREAM.MSG.DELETE.REBALANCER_EVENTS",
    "$JS.API.CONSUMER.CREATE.OTHER_STREAM",
])
async def test_subscriber_may_not_publish_events_alerts_or_change_streams(
    access: Access, subject: str
) -> None:
    async with connected(access.operator_url) as operator:
        await _published_event(operator)
        before = (await operator.jetstream().stream_info(relay.STREAM)).state.messages
        errors = Errors()
        async with connected(access.subscriber_url, errors) as subscriber:
            await subscriber.publish(subject, b"{}")
            await subscriber.flush()
            assert str(await errors.next()) == _refusal(subject)
        after = await operator.jetstream().stream_info(relay.STREAM)
    assert after.state.messages == before


# -- the subscriber may read -----------------------------------------------------------------------


async def test_subscriber_reads_events_with_an_ordered_consumer(access: Access) -> None:
    async with connected(access.operator_url) as operator:
        event = await _published_event(operator)
        errors = Errors()
        async with connected(access.subscriber_url, errors) as subscriber:
            subject = f"rebalancer.events.{event.stream_id.removeprefix('workflow-')}.>"
            async with relay.Subscriber(subscriber, subject) as events:
                got = await events.next(timeout=5)
            await subscriber.flush()
        assert (got.stream_id, got.version, got.type) == (event.stream_id, 1, "WorkflowCreated")
        assert got.subject == relay.subject_for(event)
        assert errors.seen == []  # nothing the consumer sent was refused


async def test_subscriber_reads_and_acknowledges_with_a_durable_consumer(access: Access) -> None:
    async with connected(access.operator_url) as operator:
        event = await _published_event(operator)
        durable = f"reader-{uuid.uuid4().hex[:8]}"
        errors = Errors()
        async with connected(access.subscriber_url, errors) as subscriber:
            subject = f"rebalancer.events.{event.stream_id.removeprefix('workflow-')}.>"
            async with relay.Subscriber(subscriber, subject, durable=durable) as events:
                got = await events.next(timeout=5)
            # Leaving acknowledged the event (the consumer takes in acks in its own time).
            reader = subscriber.jetstream()
            info = await eventually(
                lambda: reader.consumer_info(relay.STREAM, durable),
                lambda info: info.num_ack_pending == 0, timeout=5, what="the ack taken in")
            # A reader may remove its own durable consumer.
            await reader.delete_consumer(relay.STREAM, durable)
            await subscriber.flush()
        assert (got.stream_id, got.version) == (event.stream_id, 1)
        assert info.num_ack_pending == 0
        assert info.ack_floor.stream_seq == info.delivered.stream_seq
        assert errors.seen == []


async def test_subscriber_reads_alerts_with_push_and_pull_consumers(access: Access) -> None:
    async with connected(access.operator_url) as operator:
        # The operator sets up REBALANCER_ALERTS as the alert publisher does and raises one.
        js = operator.jetstream()
        await js.add_stream(alerts.alert_stream())
        kind = f"test_{uuid.uuid4().hex[:8]}"
        await js.publish(f"rebalancer.alerts.{kind}", b'{"kind": "test"}')
        errors = Errors()
        async with connected(access.subscriber_url, errors) as subscriber:
            reader = subscriber.jetstream()
            # Ordered push consumer, the stream found by subject ($JS.API.STREAM.NAMES).
            pushed = await reader.subscribe(f"rebalancer.alerts.{kind}", ordered_consumer=True)
            first = await pushed.next_msg(timeout=5)
            await pushed.unsubscribe()
            # Durable pull consumer: the newer CONSUMER.CREATE.<stream>.<name>.<filter> form.
            pulled = await reader.pull_subscribe(f"rebalancer.alerts.{kind}",
                                                 durable=f"pull-{kind}", stream=alerts.STREAM)
            [second] = await pulled.fetch(1, timeout=5)
            await second.ack()
            await reader.delete_consumer(alerts.STREAM, f"pull-{kind}")
            await subscriber.flush()
        assert first.data == second.data == b'{"kind": "test"}'
        assert errors.seen == []
