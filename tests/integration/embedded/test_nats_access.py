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
from nats.js.api import AckPolicy, ConsumerConfig

from events import relay
from events.store import RecordedEvent
from rebalancer import alerts, api, embedded
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
    # As the CLI connects: each user with its own inbox prefix (the subscriber may read no other).
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5,
                            inbox_prefix=api.inbox_prefix_for(url),
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


def _refusal(subject: str, what: str = "publish to") -> str:
    # nats-py lower-cases the server's -ERR line and hands it to the error callback.
    return f'nats: permissions violation for {what} "{subject.lower()}"'


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
    # REBALANCER_CHAIN: the chain-head checkpoints (issue 12), readable like the other two.
    assert embedded.READABLE_STREAMS == (relay.STREAM, alerts.STREAM, "REBALANCER_CHAIN")
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


async def test_subscriber_reads_events_by_sequence(access: Access) -> None:
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
        assert errors.seen == []  # nothing the reader sent was refused


async def _durable_for_subscriber(operator: NATS, stream: str, name: str, subject: str) -> None:
    # The operator creates the subscriber's durable pull consumer under one of its fixed names.
    await operator.jetstream().add_consumer(stream, ConsumerConfig(
        durable_name=name, ack_policy=AckPolicy.EXPLICIT, filter_subject=subject, ack_wait=30.0))


async def test_subscriber_reads_and_acknowledges_with_its_durable_consumer(access: Access) -> None:
    durable = embedded.SUBSCRIBER_DURABLES[0]
    async with connected(access.operator_url) as operator:
        event = await _published_event(operator)
        subject = f"rebalancer.events.{event.stream_id.removeprefix('workflow-')}.>"
        await _durable_for_subscriber(operator, relay.STREAM, durable, subject)
        errors = Errors()
        try:
            async with connected(access.subscriber_url, errors) as subscriber:
                async with relay.Subscriber(subscriber, subject, durable=durable) as events:
                    got = await events.next(timeout=5)
                # Leaving acknowledged the event (the consumer takes in acks in its own time).
                reader = subscriber.jetstream()
                info = await eventually(
                    lambda: reader.consumer_info(relay.STREAM, durable),
                    lambda info: info.num_ack_pending == 0, timeout=5, what="the ack taken in")
                await subscriber.flush()
        finally:
            await operator.jetstream().delete_consumer(relay.STREAM, durable)
        assert (got.stream_id, got.version) == (event.stream_id, 1)
        assert info.num_ack_pending == 0
        assert info.ack_floor.stream_seq == info.delivered.stream_seq
        assert errors.seen == []


async def test_subscriber_reads_alerts_by_sequence_and_with_its_durable(access: Access) -> None:
    durable = embedded.SUBSCRIBER_DURABLES[1]
    async with connected(access.operator_url) as operator:
        # The operator sets up REBALANCER_ALERTS as the alert publisher does and raises one.
        js = operator.jetstream()
        await js.add_stream(alerts.alert_stream())
        kind = f"test_{uuid.uuid4().hex[:8]}"
        await js.publish(f"rebalancer.alerts.{kind}", b'{"kind": "test"}')
        await _durable_for_subscriber(operator, alerts.STREAM, durable, f"rebalancer.alerts.{kind}")
        errors = Errors()
        try:
            async with connected(access.subscriber_url, errors) as subscriber:
                reader = subscriber.jetstream()
                first = await reader.get_msg(alerts.STREAM, seq=1, next=True,
                                             subject=f"rebalancer.alerts.{kind}")
                pulled = await reader.pull_subscribe(f"rebalancer.alerts.{kind}",
                                                     durable=durable, stream=alerts.STREAM)
                [second] = await pulled.fetch(1, timeout=5)
                await second.ack()
                await subscriber.flush()
        finally:
            await js.delete_consumer(alerts.STREAM, durable)
        assert first.data == second.data == b'{"kind": "test"}'
        assert errors.seen == []


# -- the subscriber may not touch other consumers or other users' replies -----------------------


async def _refused_request(access: Access, subject: str, body: bytes) -> None:
    errors = Errors()
    async with connected(access.subscriber_url, errors) as subscriber:
        with pytest.raises(nats.errors.TimeoutError):
            await subscriber.request(subject, body, timeout=1)
        assert str(await errors.next()) == _refusal(subject)


@pytest.mark.parametrize("verb", ["DELETE", "MSG.NEXT", "INFO"])
async def test_subscriber_may_not_use_another_clients_durable(access: Access, verb: str) -> None:
    async with connected(access.operator_url) as operator:
        js = operator.jetstream()
        await js.add_stream(alerts.alert_stream())
        await js.publish("rebalancer.alerts.pager_test", b'{"kind": "test"}')
        # An alert pager's durable, made by the operator: not one of SUBSCRIBER_DURABLES.
        await js.add_consumer(alerts.STREAM, ConsumerConfig(
            durable_name="pager", ack_policy=AckPolicy.EXPLICIT))
        try:
            await _refused_request(
                access, f"$JS.API.CONSUMER.{verb}.{alerts.STREAM}.pager", b'{"batch": 1}')
            info = await js.consumer_info(alerts.STREAM, "pager")
        finally:
            await js.delete_consumer(alerts.STREAM, "pager")
    assert info.delivered.stream_seq == 0  # the subscriber took nothing from it


async def test_subscriber_may_not_delete_its_own_durable_either(access: Access) -> None:
    durable = embedded.SUBSCRIBER_DURABLES[2]
    async with connected(access.operator_url) as operator:
        await _published_event(operator)
        await _durable_for_subscriber(operator, relay.STREAM, durable, relay.SUBJECTS)
        try:
            await _refused_request(
                access, f"$JS.API.CONSUMER.DELETE.{relay.STREAM}.{durable}", b"")
            assert (await operator.jetstream().consumer_info(relay.STREAM, durable)).name
        finally:
            await operator.jetstream().delete_consumer(relay.STREAM, durable)


@pytest.mark.parametrize("create", [
    # Every form nats-server 2.15 takes; none checks the deliver subject against the creator.
    "$JS.API.CONSUMER.CREATE.{stream}",
    "$JS.API.CONSUMER.CREATE.{stream}.{name}",
    "$JS.API.CONSUMER.CREATE.{stream}.{name}.rebalancer.events.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{name}",
])
async def test_subscriber_may_not_create_a_consumer_delivering_to_commands(
    access: Access, create: str
) -> None:
    name = embedded.SUBSCRIBER_DURABLES[3]  # even under one of its own names
    subject = create.format(stream=relay.STREAM, name=name)
    received: list[str] = []
    async with connected(access.operator_url) as operator:
        await _published_event(operator)

        async def on_command(msg: Msg) -> None:
            received.append(msg.subject)

        # A literal subscription: JetStream pushes to it (it would miss a wildcard one).
        await operator.subscribe("rebalancer.cmd.start", cb=on_command)
        await _settled(operator)
        config = {"name": name, "durable_name": name, "deliver_subject": "rebalancer.cmd.start",
                  "filter_subject": "rebalancer.events.>"}
        await _refused_request(
            access, subject, json.dumps({"stream_name": relay.STREAM, "config": config}).encode())
        await asyncio.sleep(0.5)  # time for a delivery, were there a consumer
        names = [info.name for info in await operator.jetstream().consumers_info(relay.STREAM)]
    assert received == []
    assert name not in names


@pytest.mark.parametrize("inboxes", ["_INBOX.>", "_INBOX_operator.>", ">"])
async def test_subscriber_may_not_read_other_users_inboxes(access: Access, inboxes: str) -> None:
    errors = Errors()
    async with connected(access.subscriber_url, errors) as subscriber:
        await subscriber.subscribe(inboxes)
        await _settled(subscriber)
        assert str(await errors.next()) == _refusal(inboxes, "subscription to")
    # Its own prefix is what the CLI and relay.Subscriber use as the subscriber.
    assert api.inbox_prefix_for(access.subscriber_url) == "_INBOX_subscriber"
    assert api.inbox_prefix_for(access.operator_url) == "_INBOX_operator"


async def test_watch_follows_a_workflow_as_the_subscriber(access: Access) -> None:
    # What `rebalancer watch` runs (rebalancer.api.follow over cli.common.reader_url).
    seen: list[tuple[str, int]] = []

    def show(event: relay.PublishedEvent) -> bool:
        seen.append((event.stream_id, event.version))
        return True

    async with connected(access.operator_url) as operator:
        event = await _published_event(operator)
    await api.follow(access.subscriber_url, event.stream_id.removeprefix("workflow-"), show,
                     timeout=5)
    assert seen == [(event.stream_id, 1)]


async def test_watch_from_now_needs_no_consumer_as_the_subscriber(access: Access) -> None:
    # `rebalancer watch` without --from-start: only what is relayed once it has its place.
    seen: list[tuple[str, int]] = []
    async with connected(access.operator_url) as operator:
        await _published_event(operator)  # already there: not shown
        new = _event(uuid.uuid4().hex)

        async def placed() -> bool:
            # Published now: after the subscriber took the stream's last sequence.
            await operator.jetstream().publish(relay.subject_for(new), relay.body_of(new),
                                               headers={relay.MSG_ID: relay.msg_id(new)})
            return False

        def show(event: relay.PublishedEvent) -> bool:
            seen.append((event.stream_id, event.version))
            return True

        await api.follow(access.subscriber_url, "", show, timeout=5, from_start=False,
                         ready=placed)
    assert seen == [(new.stream_id, new.version)]
