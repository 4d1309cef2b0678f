"""What the broker answers to CONNECT, and what the client makes of it (issue #19): the protocol
choice (`auto` falls back to MQTT 3.1.1, and says so), a refusal or a close before CONNACK in
the log with what is known, CONNACK flags and limits honoured (Session Present on a clean start,
a Will the broker refuses, Retain Available, Maximum QoS), and a backoff that a broker which
accepts and drops at once (a client-id takeover) does not reset. Fake brokers on a raw socket
answer as the real ones do (tests/test_mqtt_interop.py has the real ones)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from sync.mqtt.client import MqttClient, ProtocolChoice, Will
from tests.fixtures.fake_broker import (
    CONNACK_V5,
    CONNACK_V311,
    ConnackChoice,
    ScriptedBroker,
    connect_version,
    connect_will,
)
from tests.fixtures.ports import async_wait_until

V311_REFUSAL = b"\x20\x02\x00\x01"  # 3.1.1 return code 1: unacceptable protocol version
V5_UNSUPPORTED = b"\x20\x03\x00\x84\x00"  # MQTT 5 reason 0x84: Unsupported Protocol Version
WILL = Will("gw/status", lambda: b'{"online":false}', qos=1, retain=True)


@contextlib.asynccontextmanager
async def session(
    broker: ScriptedBroker, *, protocol: ProtocolChoice = "auto", **options: object
) -> AsyncIterator[MqttClient]:
    """The broker on a free port and a started client of it (not necessarily connected)."""
    server = await asyncio.start_server(broker.handle, "127.0.0.1", 0)
    port = broker.port = server.sockets[0].getsockname()[1]
    settings: dict[str, object] = {"reconnect_min": 0.05, "reconnect_max": 0.2, **options}
    client = MqttClient(
        host="127.0.0.1",
        port=port,
        client_id="proto",
        protocol=protocol,
        **settings,  # type: ignore[arg-type]
    )
    async with server, client:
        yield client


def only_311(first_answer: bytes | None) -> ConnackChoice:
    """A 3.1.1 broker: `first_answer` to an MQTT 5 CONNECT, success to a 3.1.1 one."""
    return lambda index, connect: CONNACK_V311 if connect_version(connect) == 4 else first_answer


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(V311_REFUSAL, id="return-code-1"),  # aedes, nats-server, amqtt
        pytest.param(V5_UNSUPPORTED, id="reason-0x84"),  # an MQTT 5 broker that refuses 5
        pytest.param(None, id="closed"),  # RabbitMQ 3.x
        pytest.param(b"", id="silent"),  # amqtt with a Will: waits for bytes that never come
    ],
)
async def test_auto_falls_back_to_311(
    answer: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.mqtt")
    closed = answer is None
    broker = ScriptedBroker(connack=only_311(answer))
    async with session(broker, will=WILL, connect_timeout=0.5) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        assert client.protocol_version == "3.1.1"
        assert [connect_version(s.connect) for s in broker.sessions] == [5, 4]
        connection = client._connection
        assert connection is not None
        connection.abort()
        # A broker that answered "not supported" (or was silent) gets 3.1.1 at once from now
        # on; after a close (a load balancer whose broker restarts?) MQTT 5 is tried first.
        again = [5, 4] if closed else [4]
        await async_wait_until(
            lambda: len(broker.sessions) == 2 + len(again) and client.is_connected
        )
        assert [connect_version(s.connect) for s in broker.sessions[2:]] == again
    log = messages(caplog)
    assert sum("did not take MQTT 5" in line and "trying MQTT 3.1.1" in line for line in log) == 1
    assert any(
        "connected to 127.0.0.1" in line and "MQTT 3.1.1 (the broker does not speak MQTT 5)" in line
        for line in log
    )
    assert not [line for line in log if "cannot connect" in line]


async def test_auto_speaks_5_where_it_can(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.mqtt")
    broker = ScriptedBroker(connack=CONNACK_V5)
    async with session(broker) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        assert client.protocol_version == "5"
    assert [connect_version(s.connect) for s in broker.sessions] == [5]
    assert any(line.endswith(", MQTT 5") for line in messages(caplog))


async def test_insisting_on_5_names_the_reason_and_never_tries_311(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    broker = ScriptedBroker(connack=only_311(V311_REFUSAL))
    async with session(broker, protocol="5") as client:
        await async_wait_until(lambda: len(broker.sessions) >= 3)
        assert not client.is_connected
    assert {connect_version(s.connect) for s in broker.sessions} == {5}
    reason = (
        "broker refused the connection: Unacceptable protocol version (the broker speaks "
        "MQTT 3.1.1 only)"
    )
    assert messages(caplog, logging.WARNING) == [
        f"mqtt: cannot connect to 127.0.0.1:{broker.port}: {reason}"
    ]


@pytest.mark.parametrize("protocol", ["5", "3.1.1", "auto"])
async def test_a_close_before_connack_is_logged(
    protocol: ProtocolChoice, caplog: pytest.LogCaptureFixture
) -> None:
    # The reason used to be stored before the "reason unchanged" check: RabbitMQ's refusal of
    # an MQTT 5 CONNECT was never logged at all.
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    broker = ScriptedBroker(connack=lambda index, connect: None)
    async with session(broker, protocol=protocol) as client:
        await async_wait_until(lambda: len(broker.sessions) >= 4)
        assert client.last_error == "connection closed by the broker before CONNACK"
    warnings = [line for line in messages(caplog, logging.WARNING) if "cannot connect" in line]
    assert len(warnings) == 1
    assert warnings[0].endswith(": connection closed by the broker before CONNACK")


async def test_a_refused_tcp_connect_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    client = MqttClient(host="127.0.0.1", port=port, client_id="x", reconnect_min=0.05)
    async with client:
        await async_wait_until(lambda: client.stats.connect_failures >= 2)
    assert client.last_error == "connection refused (no broker listening on that port?)"
    assert "Connect call failed" not in caplog.text


async def test_session_present_on_a_clean_start_closes_the_connection() -> None:
    broker = ScriptedBroker(connack=b"\x20\x03\x01\x00\x00")  # Session Present = 1
    async with session(broker) as client:
        await async_wait_until(lambda: len(broker.sessions) >= 2)
        await async_wait_until(broker.sessions[0].closed.is_set)
        assert client.stats.connects == 0
        assert client.last_error == (
            "malformed packet from the broker: CONNACK with Session Present on a clean start"
        )
        disconnect = broker.sessions[0].disconnect()
        assert disconnect is not None
        assert disconnect[0] == 0x82  # Protocol Error


def mosquitto_like(*, retain: bool, max_qos: int) -> ConnackChoice:
    """An MQTT 5 broker that refuses a Will it cannot take, as mosquitto does with
    `retain_available false` (0x9A) and `max_qos 0` (0x9B), and announces its limits."""

    def answer(index: int, connect: bytes) -> bytes:
        will = connect_will(connect)
        if will is not None and will[1] and not retain:
            return b"\x20\x03\x00\x9a\x00"
        if will is not None and will[0] > max_qos:
            return b"\x20\x03\x00\x9b\x00"
        properties = (b"" if retain else b"\x25\x00") + (
            b"\x24" + bytes((max_qos,)) if max_qos < 2 else b""
        )
        return bytes((0x20, 3 + len(properties), 0, 0, len(properties))) + properties

    return answer


@pytest.mark.parametrize(
    ("retain", "max_qos", "will_sent", "said"),
    [
        (False, 1, (1, False), "does not take retained messages (Retain not supported)"),
        (True, 0, (0, True), "does not take the Last Will's QoS 1 (QoS not supported)"),
        (False, 0, (0, False), "does not take retained messages (Retain not supported)"),
    ],
)
async def test_a_will_the_broker_refuses_is_sent_again_as_it_takes_it(
    retain: bool,
    max_qos: int,
    will_sent: tuple[int, bool],
    said: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    broker = ScriptedBroker(connack=mosquitto_like(retain=retain, max_qos=max_qos))
    async with session(broker, will=WILL) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        assert connect_will(broker.sessions[-1].connect) == will_sent
        assert client.retain_available is retain
        assert client.maximum_qos == max_qos
        # Live values as the live publisher sends them: retained, QoS 1, no future.
        client.publish("gw/R/press1/speed", b"1", qos=1, retain=True)
        client.publish("gw/R/press1/speed", b"2", qos=1, retain=True)
        await asyncio.wait_for(client.publish_acked("gw/R/_agent/status", b"x", retain=True), 5)
        await async_wait_until(
            lambda: sum(kind & 0xF0 == 0x30 for kind, _ in broker.sessions[-1].packets) == 3
        )
        publishes = [kind for kind, _ in broker.sessions[-1].packets if kind & 0xF0 == 0x30]
        assert {kind & 0x01 for kind in publishes} == {1 if retain else 0}
        assert {(kind >> 1) & 0x03 for kind in publishes} == {min(1, max_qos)}
        assert client.is_connected
        assert client.stats.lost == 0
    log = messages(caplog, logging.WARNING)
    assert sum(said in line for line in log) == 1
    assert sum("publishing" in line and "first to gw/R/press1/speed" in line for line in log) == 1


async def test_a_broker_that_drops_at_once_is_not_hammered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A client-id takeover on MQTT 3.1.1: accepted, then closed. The backoff used to reset on
    # every CONNACK: a reconnect every 25-50 ms here, forever.
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    broker = ScriptedBroker(connack=CONNACK_V311, close_after_connack=True)
    async with session(broker, protocol="3.1.1", reconnect_min=0.05, reconnect_max=0.4):
        await async_wait_until(lambda: len(broker.sessions) >= 7, timeout=20)
    starts = [s.started for s in broker.sessions]
    # From the 4th attempt on the delay is 0.4 s with jitter down to half of it.
    assert min(later - earlier for earlier, later in itertools.pairwise(starts[4:])) >= 0.2
    takeover = [line for line in messages(caplog, logging.WARNING) if "client id 'proto'" in line]
    assert takeover == [
        f"mqtt: 127.0.0.1:{broker.port} closed the connection within 5 s of accepting it 3 "
        "times in a row: is another client using our client id 'proto' (two gateways with one "
        "gateway.id)?"
    ]


async def test_a_takeover_on_mqtt_5_is_named_and_backs_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    taken_over = b"\xe0\x02\x8e\x00"  # DISCONNECT 0x8E Session taken over
    broker = ScriptedBroker(lambda index: (taken_over,), connack=CONNACK_V5)
    async with session(broker, reconnect_min=0.05, reconnect_max=0.4) as client:
        client.subscribe("cmd/#", lambda message: None)  # the script follows the SUBSCRIBE
        await async_wait_until(lambda: len(broker.sessions) >= 6, timeout=20)
        assert client.stats.takeovers >= 5
    starts = [s.started for s in broker.sessions]
    assert min(later - earlier for earlier, later in itertools.pairwise(starts[4:])) >= 0.2
    log = messages(caplog, logging.WARNING)
    assert any("with our client id 'proto' and took over the connection" in line for line in log)
    assert any(
        line.endswith("lost: disconnected by the broker: Session taken over") for line in log
    )
