"""The interop matrix: our MQTT client against brokers nobody here wrote, each started privately
on free ports (tests/fixtures/brokers.py, rabbitmq.py, mosquitto.py), with paho-mqtt as the
independent peer on the other side.

For every broker: connect; live values published retained at QoS 1 and seen by a subscriber;
the Last Will on an abrupt loss; commands in (a subscription receiving what paho publishes);
an S/sync batch out and its S/ack in; reconnecting after the broker is killed -9 and started
again on the same port. Where a broker differs from the others, the table below says so,
citing its documentation: the test asserts that difference, it does not skip it.

Each broker starts once for this module (pytest groups the tests by the module-scoped `case`).
docs/mqtt.md, "Broker matrix", has the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import asyncpg
import pytest
from paho.mqtt.client import MQTTMessage

from agent.central.service import ingest_for, serve
from agent.central.settings import load_central_settings
from agent.service.sdnotify import SdNotifier
from simulators.modbus.server import ModbusSimulator
from sync.central.ingest import Ingest
from sync.mqtt.client import Message, MqttClient, ProtocolChoice, Will
from tests.fixtures.brokers import AedesBroker, AmqttBroker, NatsBroker, connack_code
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.mqtt_client import AsyncPeer
from tests.fixtures.pool import Peer
from tests.fixtures.ports import async_wait_until
from tests.fixtures.procs import live_pids_with_cwd, pid_is_live
from tests.fixtures.rabbitmq import RabbitMqBroker
from tests.fixtures.workflows import running, settings_for

WAIT = 15.0  # deadline of every wait on a broker (RabbitMQ restarts take 5-15 s: more there)


class Broker(Protocol):
    """What the matrix needs of a broker fixture (MosquittoBroker and BrokerProcess have it)."""

    @property
    def host(self) -> str:
        """Loopback address."""

    @property
    def port(self) -> int:
        """MQTT port, the same after a restart."""

    def start(self) -> None:
        """Start and wait until it answers CONNECT."""

    def kill(self) -> None:
        """kill -9."""

    def close(self) -> None:
        """Kill and remove files."""

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of its log."""

    @property
    def workdir(self) -> Path:
        """Its private temp dir (config, data, logs; the processes' working directory)."""


@dataclass(frozen=True)
class BrokerCase:
    """One column of the matrix: a broker, the protocol our client is told to speak (`auto`
    unless the case insists), the version it ends up speaking, and where the broker's behaviour
    differs from the MQTT spec's common reading."""

    id: str
    make: Callable[[], Broker]
    protocol: ProtocolChoice  # MqttClient(protocol=...) and [mqtt] protocol of both programs
    speaks: Literal["5", "3.1.1"]  # what `auto` settles on
    # What a CONNECT for MQTT 5 gets: the CONNACK's code, or None (closed without one).
    v5_connack: int | None
    # Stored retained messages are sent to a new subscription whose filter has a wildcard.
    retained_to_wildcard: bool = True
    # What a retained message is after kill -9 and restart: "lost" (kept in memory only),
    # "kept" (written before the PUBACK), "lost or kept" (written on a timer).
    retained_over_kill: Literal["lost", "kept", "lost or kept"] = "lost"
    # The broker sends a new connection stored messages that match someone else's filter.
    unsolicited_retained: bool = False
    restart_timeout: float = WAIT


CASES = [
    # mosquitto 2.0 speaks both. The fixture runs it with `persistence false`: its retained
    # messages live in memory (mosquitto.conf(5), "persistence").
    BrokerCase("mosquitto-5", MosquittoBroker, "auto", "5", v5_connack=0),
    BrokerCase("mosquitto-3.1.1", MosquittoBroker, "3.1.1", "3.1.1", v5_connack=0),
    # aedes: "MQTT 5.0 (not support yet)" (aedes README, Features), answered with return code
    # 1, unacceptable protocol version (MQTT 3.1.1, 3.2.2.3). In-memory persistence unless
    # given a database (aedes-persistence).
    BrokerCase("aedes", AedesBroker, "auto", "3.1.1", v5_connack=0x01),
    # nats-server implements MQTT v3.1.1 and answers a v5 CONNECT with return code 1
    # (docs.nats.io, "MQTT"). Retained messages are a JetStream stream, $MQTT_rmsgs
    # (nats-server README-MQTT.md, "Retained messages"), stored in the publisher's read loop
    # before its PUBACK (mqtt.go, mqttHandlePubRetain): the fixture's file store keeps them.
    BrokerCase("nats", NatsBroker, "auto", "3.1.1", v5_connack=0x01, retained_over_kill="kept"),
    # RabbitMQ 3.x's MQTT plugin speaks 3.1 and 3.1.1 (MQTT 5 came with 3.13): a v5 CONNECT
    # is closed without a CONNACK. Retained messages are not sent for topic filters with
    # wildcards (rabbitmq.com/docs/mqtt, "Retained Messages and Stores"); the DETS store writes
    # them to disk every mqtt.retained_message_store_dets_sync_interval (2 s), so a kill -9
    # keeps them or not depending on the moment.
    BrokerCase(
        "rabbitmq",
        RabbitMqBroker,
        "auto",
        "3.1.1",
        v5_connack=None,
        retained_to_wildcard=False,
        retained_over_kill="lost or kept",
        restart_timeout=60.0,
    ),
    # amqtt is "a MQTT 3.1.1 broker" (amqtt broker_script) and answers a v5 CONNECT with
    # return code 1. On every CONNECT it sends the new connection, at QoS 0, the retained
    # messages matching any subscription of any client ("publish retained messages to a
    # pre-existing session's subscriptions" loops over the whole broker's table:
    # amqtt/broker.py, Broker._handle_client_session); a client drops what it did not ask for.
    BrokerCase("amqtt", AmqttBroker, "auto", "3.1.1", v5_connack=0x01, unsolicited_retained=True),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.id)
def case(request: pytest.FixtureRequest) -> BrokerCase:
    """The broker column under test."""
    param: BrokerCase = request.param
    return param


@pytest.fixture(scope="module")
def broker(case: BrokerCase) -> Iterator[Broker]:
    """The case's broker, started once for the module; at the end killed, and nothing of it
    left: no process (RabbitMQ's port mapper included), no temp dir."""
    made = case.make()
    try:
        made.start()
        yield made
    finally:
        processes = live_pids_with_cwd(made.workdir)  # every process of it runs in its dir
        made.close()
    assert processes
    assert not [pid for pid in processes if pid_is_live(pid)]
    assert not made.workdir.exists()


@pytest.fixture(autouse=True)
def _broker_log_on_failure(
    request: pytest.FixtureRequest, track_peer: Callable[[Peer], None]
) -> None:
    if "broker" in request.fixturenames:
        track_peer(request.getfixturevalue("broker"))


def client_for(
    broker: Broker, case: BrokerCase, *, will: Will | None = None, birth: Will | None = None
) -> MqttClient:
    """Our client for the broker, speaking the case's protocol, reconnecting quickly."""
    return MqttClient(
        host=broker.host,
        port=broker.port,
        client_id=f"interop-{uuid.uuid4().hex[:10]}",
        protocol=case.protocol,
        will=will,
        birth=birth,
        reconnect_min=0.05,
        reconnect_max=0.5,
        # amqtt misreads an MQTT 5 CONNECT with a Will and stays silent: `auto` falls back on
        # the connect timeout, which must stay well inside WAIT (the product's 10 s did not).
        connect_timeout=4.0,
        name=f"interop-{case.id}",
    )


def fresh_root() -> str:
    """A topic root of its own per test: the brokers outlive the tests and keep retained."""
    return f"interop/{uuid.uuid4().hex[:10]}"


async def connected(client: MqttClient, timeout: float = WAIT) -> None:  # noqa: ASYNC109
    """Wait until the client is connected."""
    async with asyncio.timeout(timeout):
        await client.wait_connected()


async def subscription_live(client: MqttClient, topic: str, received: list[Message]) -> None:
    """Publish to ``topic`` (matched by one of the client's own subscriptions, whose messages go
    to ``received``) until one comes back: the broker has processed the SUBSCRIBE.

    Why not just go on: a message published before that is not delivered; and amqtt drops a
    connection whose CONNECT it handles while a SUBSCRIBE changes its subscription table
    (RuntimeError "dictionary changed size during iteration", Broker._handle_client_session).
    """

    async def back() -> bool:
        client.publish(topic, b"probe", qos=1)
        return any(m.topic == topic for m in received)

    await async_wait_until(back, timeout=WAIT, interval=0.2)


async def clear_retained(client: MqttClient, topics: list[str]) -> None:
    """Remove the retained messages a test left (an empty retained message, MQTT 3.3.1.3).

    Why: the broker outlives the test; and a stored message that a stale subscription of a
    closing client matches makes amqtt's CONNECT handling yield in the middle of its loop over
    the subscription table, the moment its race (see `subscription_live`) needs.
    """
    for topic in topics:
        client.publish(topic, b"", qos=1, retain=True)
    async with asyncio.timeout(WAIT):
        await client.wait_acked()


def payloads(messages: list[MQTTMessage]) -> list[tuple[str, bytes, int, bool]]:
    """(topic, payload, qos, retain) of paho messages."""
    return [(m.topic, m.payload, m.qos, bool(m.retain)) for m in messages]


# -- the matrix ---------------------------------------------------------------------------------


async def test_connect(case: BrokerCase, broker: Broker) -> None:
    """Our client connects with the case's protocol (`auto`: 5, else 3.1.1 after the broker's
    answer to a v5 CONNECT, which is as documented)."""
    assert await asyncio.to_thread(connack_code, broker.host, broker.port) == 0  # MQTT 3.1.1
    answer = await asyncio.to_thread(connack_code, broker.host, broker.port, v5=True)
    assert answer == case.v5_connack
    async with client_for(broker, case) as client:
        await connected(client)
        assert client.stats.connects == 1
        assert client.last_error is None
        assert client.protocol_version == case.speaks


async def test_live_values_retained_qos1(case: BrokerCase, broker: Broker) -> None:
    """200 live values (retained, QoS 1, fire and forget as the live publisher sends them) are
    all acknowledged, stored and replayed to a new subscriber; a later value arrives live."""
    root = fresh_root()
    count = 200
    async with client_for(broker, case) as client:
        await connected(client)
        for i in range(count):
            client.publish(f"{root}/press1/t{i}", f"v{i}".encode(), qos=1, retain=True)
        async with asyncio.timeout(WAIT):
            await client.wait_acked()
        assert client.stats.acked == count

        async with AsyncPeer(broker.host, broker.port) as wildcard:
            await wildcard.subscribe(f"{root}/press1/#")
            if case.retained_to_wildcard:
                # Counted, not bounded by a marker: aedes sends a subscription's stored
                # messages after later live ones on other topics (MQTT orders per topic only).
                replayed = await wildcard.take(count, f"{root}/press1/#")
                expected = {
                    (f"{root}/press1/t{i}", f"v{i}".encode(), 1, True) for i in range(count)
                }
                assert set(payloads(replayed)) == expected
            else:
                replayed = await wildcard.until_marker(f"{root}/press1/marker")
                assert [m for m in replayed if m.topic.startswith(f"{root}/")] == []

            async with AsyncPeer(broker.host, broker.port) as exact:
                # Connected while `wildcard` holds a matching subscription: amqtt replays those
                # stored messages to this new connection unasked.
                await exact.subscribe(f"{root}/press1/t7")
                got = await exact.until_marker(f"{root}/press1/t7")
                assert payloads([m for m in got if m.topic == f"{root}/press1/t7"])[-1] == (
                    f"{root}/press1/t7",
                    b"v7",
                    1,
                    True,
                )
                unasked = [m for m in got if m.topic != f"{root}/press1/t7"]
                assert bool(unasked) == case.unsolicited_retained

            client.publish(f"{root}/press1/t0", b"live", qos=1, retain=True)
            [live] = await wildcard.take(1, f"{root}/press1/t0")
            # Delivered because of a subscription, not replayed: RETAIN is 0 (MQTT 3.1.1 3.3.1.3).
            assert payloads([live]) == [(f"{root}/press1/t0", b"live", 1, False)]
        await clear_retained(client, [f"{root}/press1/t{i}" for i in range(count)])


async def test_last_will_on_abrupt_loss(case: BrokerCase, broker: Broker) -> None:
    """The agent's status pattern: birth `online` at connect, the Last Will `offline` (retained,
    QoS 1) published by the broker when the connection dies without DISCONNECT, `online` again
    after the reconnect; a new subscriber then finds the last one retained."""
    topic = f"{fresh_root()}/_agent/status"
    status = Will(topic, lambda: b"offline", qos=1, retain=True)
    birth = Will(topic, lambda: b"online", qos=1, retain=True)
    async with AsyncPeer(broker.host, broker.port) as watcher:
        await watcher.subscribe(topic)
        async with client_for(broker, case, will=status, birth=birth) as client:
            await connected(client)
            await watcher.take(1, topic)
            connection = client._connection
            assert connection is not None
            connection.abort()  # TCP reset: no DISCONNECT, so the broker publishes the Will
            got = await watcher.take(2, topic)
            assert [m.payload for m in got] == [b"offline", b"online"]
            assert client.stats.connects == 2
        # Closed with DISCONNECT: the broker discards the Will (MQTT 3.1.1 3.14.4).
        after_close = await watcher.until_marker(topic)
        assert [m.payload for m in after_close if m.topic == topic] == []
        async with AsyncPeer(broker.host, broker.port) as late:
            await late.subscribe(topic)
            stored = [m for m in await late.until_marker(topic) if m.topic == topic]
            assert payloads(stored)[-1] == (topic, b"online", 1, True)
        await watcher.publish(topic, b"", retain=True)


async def test_commands_in(case: BrokerCase, broker: Broker) -> None:
    """A subscription like the workflow engine's (`R/_cmd/+`, QoS 1, Retain-As-Published)
    receives what paho publishes, in order, and only what matches its filter."""
    root = fresh_root()
    received: list[Message] = []
    async with client_for(broker, case) as client:
        client.subscribe(f"{root}/_cmd/+", received.append, qos=1, retain_as_published=True)
        await connected(client)
        async with AsyncPeer(broker.host, broker.port) as sender:
            # The SUBSCRIBE went out with the CONNECT's answer; a command that arrives before
            # the broker processed it would be lost, so resend the first until one arrives.
            async def first_arrived() -> bool:
                await sender.publish(f"{root}/_cmd/probe", b"{}")
                return any(m.topic == f"{root}/_cmd/probe" for m in received)

            await async_wait_until(first_arrived, timeout=WAIT, interval=0.1)
            commands = [json.dumps({"id": f"c{i}", "params": {"n": i}}).encode() for i in range(5)]
            for command in commands:
                await sender.publish(f"{root}/_cmd/start_order", command)
            await sender.publish(f"{root}/_cmd/start_order/reply", b"not a command")
            # A retained command (which the engine refuses): MQTT 5 with Retain-As-Published
            # keeps RETAIN on the live copy (3.8.3.1); MQTT 3.1.1 clears it (3.3.1.3).
            await sender.publish(f"{root}/_cmd/stop", b'{"id":"r"}', retain=True)
            await async_wait_until(
                lambda: any(m.topic == f"{root}/_cmd/stop" for m in received), timeout=WAIT
            )
            await sender.publish(f"{root}/_cmd/stop", b"", retain=True)  # clear it
    start_orders = [m for m in received if m.topic == f"{root}/_cmd/start_order"]
    assert [m.payload for m in start_orders] == commands
    assert all(m.qos == 1 and not m.retain for m in start_orders)
    assert not [m for m in received if m.topic.endswith("/reply")]
    # (The empty retained message that clears it may arrive too: it is a PUBLISH like others.)
    retained_command = next(m for m in received if m.topic == f"{root}/_cmd/stop")
    assert retained_command.payload == b'{"id":"r"}'
    assert retained_command.retain == (case.speaks == "5")


async def test_sync_out_ack_in(case: BrokerCase, broker: Broker) -> None:
    """The durable path's shapes: an S/sync batch of ~200 KiB (QoS 1, PUBACK awaited) reaches
    the central side intact, and its S/ack comes back to our subscription."""
    prefix = fresh_root()
    gateway = "plant1-line3"
    stream = str(uuid.uuid4())
    acks: list[Message] = []
    events = [
        {"seq": seq, "ts": "2026-01-01T00:00:00.000Z", "kind": "sample", "device": "press1",
         "tag": f"t{seq % 50}", "value": seq * 0.5, "quality": "good"}
        for seq in range(1, 1601)
    ]  # fmt: skip
    batch = json.dumps(
        {"gateway": gateway, "stream": stream, "first_seq": 1, "last_seq": 1600, "events": events}
    ).encode()
    assert 150_000 < len(batch) < 256 * 1024  # below sync_max_bytes' default
    async with AsyncPeer(broker.host, broker.port) as central:
        await central.subscribe(f"{prefix}/+/sync")
        async with client_for(broker, case) as client:
            client.subscribe(f"{prefix}/{gateway}/ack", acks.append, qos=1)
            await connected(client)
            async with asyncio.timeout(WAIT):
                await client.publish_acked(f"{prefix}/{gateway}/sync", batch, qos=1)
            [arrived] = await central.take(1, f"{prefix}/+/sync")
            assert arrived.payload == batch
            assert arrived.qos == 1
            ack = json.dumps({"stream": stream, "acked_seq": 1600}).encode()

            async def acked() -> bool:
                if not acks:
                    await central.publish(f"{prefix}/{gateway}/ack", ack)
                return bool(acks)

            await async_wait_until(acked, timeout=WAIT, interval=0.2)
    assert acks[0].payload == ack
    assert acks[0].qos == 1


async def test_reconnect_after_kill(case: BrokerCase, broker: Broker) -> None:
    """kill -9 of the broker: our client notices, reconnects when the broker is back on the same
    port, subscribes again; a retained value is what the broker keeps (the table says), and
    the value published again after the reconnect is what a new subscriber finds."""
    root = fresh_root()
    topic = f"{root}/press1/temperature"
    commands: list[Message] = []
    ups: list[bool] = []
    async with client_for(broker, case) as client:
        client.subscribe(f"{root}/_cmd/+", commands.append, qos=1)
        client.add_listener(ups.append)
        await connected(client)
        async with asyncio.timeout(WAIT):
            await client.publish_acked(topic, b"before", qos=1, retain=True)

        await asyncio.to_thread(broker.kill)
        await async_wait_until(lambda: not client.is_connected, timeout=WAIT)
        assert client.last_error is not None
        await asyncio.to_thread(broker.start)
        await connected(client, case.restart_timeout)
        assert ups == [True, False, True]
        # Subscribed again on the new connection (every connection starts clean).
        await subscription_live(client, f"{root}/_cmd/probe", commands)

        async with AsyncPeer(broker.host, broker.port) as peer:
            await peer.subscribe(topic)
            kept = [m.payload for m in await peer.until_marker(topic) if m.topic == topic]
            allowed = {"lost": [[]], "kept": [[b"before"]], "lost or kept": [[], [b"before"]]}
            assert kept in allowed[case.retained_over_kill]

            # What the live publisher does after every reconnect: publish the values again.
            async with asyncio.timeout(WAIT):
                await client.publish_acked(topic, b"after", qos=1, retain=True)
            [live] = await peer.take(1, topic)
            assert live.payload == b"after"
            await peer.publish(f"{root}/_cmd/start_order", b'{"id":"after-restart"}')
            await async_wait_until(
                lambda: any(m.topic.endswith("/start_order") for m in commands), timeout=WAIT
            )
            async with AsyncPeer(broker.host, broker.port) as late:
                await late.subscribe(topic)
                stored = [m.payload for m in await late.until_marker(topic) if m.topic == topic]
                # (amqtt sends a copy unasked at CONNECT as well: see the table.)
                assert set(stored) == {b"after"}
                assert len(stored) == (2 if case.unsolicited_retained else 1)
        await clear_retained(client, [topic])


# -- the whole agent and ingest ---------------------------------------------------------------

E2E_ROOT = "plant1/assembly/line3"
E2E_GATEWAY = "plant1-line3"
# The agent and the ingest run end to end against every broker of the matrix, with the case's
# `[mqtt] protocol` (`auto` but for the case that insists on 3.1.1).
E2E_CASES = CASES


def e2e_agent_config(broker: Broker, case: BrokerCase, sim_port: int, data_dir: Path) -> str:
    """One Modbus press with a writable order and a workflow that writes it."""
    return f"""
[gateway]
id = "{E2E_GATEWAY}"
site = "plant1"
area = "assembly"
line = "line3"
data_dir = "{data_dir}"

[mqtt]
url = "mqtt://{broker.host}:{broker.port}"
protocol = "{case.protocol}"
ack_timeout = "2s"

[http]
enabled = false

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:{sim_port}"
poll_interval = "200ms"
timeout = "1s"
  [[devices.tags]]
  name = "state_code"
  address = "hr:100"
  [[devices.tags]]
  name = "order_id"
  address = "hr:210"
  type = "string"
  length = 16
  writable = true

[[workflows]]
name = "set_order"
params = {{ order = "str:1..16" }}
steps = [
  {{ write = "press1/order_id", value = "{{order}}" }},
  {{ confirm = "central", timeout = "10s" }},
]
"""


def e2e_central_config(broker: Broker, case: BrokerCase, dsn: str) -> str:
    """An ingest replica for the same broker."""
    return f"""
[mqtt]
url = "mqtt://{broker.host}:{broker.port}"
protocol = "{case.protocol}"
sync_prefix = "edge"

[postgres]
dsn = "{dsn}"

[http]
enabled = false
"""


@contextlib.asynccontextmanager
async def running_ingest(path: Path) -> AsyncIterator[Ingest]:
    """`edge-agent ingest -c path`, in-process: the CLI's wiring (`ingest_for`, `serve`)."""
    settings = load_central_settings(path, environ={})
    ingest = ingest_for(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, ingest, SdNotifier(environ={}), stop))
    try:
        async with asyncio.timeout(WAIT):
            await ingest.wait_ready()
        yield ingest
    finally:
        stop.set()
        async with asyncio.timeout(WAIT):
            await task


@pytest.mark.slow
@pytest.mark.parametrize("case", E2E_CASES, ids=lambda case: case.id, indirect=True)
async def test_agent_and_ingest_end_to_end(
    case: BrokerCase,
    broker: Broker,
    postgres_database: str,
    tmp_path: Path,
) -> None:
    """The agent and `edge-agent ingest` over the case's broker and protocol: live values reach
    a paho subscriber, a command makes its round trip (accepted, then completed once the
    central store confirmed its write), and the outbox's batches are acknowledged."""
    (tmp_path / "central.toml").write_text(e2e_central_config(broker, case, postgres_database))
    async with (
        ModbusSimulator(port=0, seed=5) as sim,
        running_ingest(tmp_path / "central.toml"),
        AsyncPeer(broker.host, broker.port) as watcher,
    ):
        await watcher.subscribe(f"{E2E_ROOT}/press1/state_code")
        await watcher.subscribe(f"{E2E_ROOT}/_cmd/set_order/reply")
        text = e2e_agent_config(broker, case, sim.port, tmp_path / "data")
        async with running(settings_for(tmp_path, text)) as runtime:
            assert runtime.gateway is not None
            connection = runtime.gateway.mqtt._connection
            assert connection is not None
            assert connection.v5 == (case.speaks == "5")
            assert runtime.gateway.mqtt.protocol_version == case.speaks
            [value] = await watcher.take(1, f"{E2E_ROOT}/press1/state_code")
            document = json.loads(value.payload)
            assert set(document) == {"ts", "value", "quality"}
            assert document["quality"] == "good"
            assert value.qos == 1

            command = {"id": f"e2e-{uuid.uuid4().hex[:8]}", "params": {"order": "A-17"}}
            await watcher.publish(f"{E2E_ROOT}/_cmd/set_order", json.dumps(command))
            replies = await watcher.take(2, f"{E2E_ROOT}/_cmd/set_order/reply", within=WAIT)
            statuses = [json.loads(reply.payload) for reply in replies]
            assert [s["id"] for s in statuses] == [command["id"]] * 2
            assert [s["status"] for s in statuses] == ["accepted", "completed"]

            outbox = runtime.gateway.outbox
            committed = outbox.committed_seq
            assert committed > 0
            await async_wait_until(lambda: outbox.acked_seq >= committed, timeout=WAIT)
    stored = await asyncpg_fetchval(
        postgres_database,
        "SELECT max(acked_seq) FROM edge_streams WHERE gateway_id = $1",
        E2E_GATEWAY,
    )
    assert stored is not None
    assert stored >= committed


async def asyncpg_fetchval(dsn: str, query: str, *args: object) -> object:
    """One value from PostgreSQL."""
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval(query, *args)
    finally:
        await connection.close()
