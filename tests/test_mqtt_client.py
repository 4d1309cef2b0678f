"""sync.mqtt.client.MqttClient against a private mosquitto: publish/ack, will/birth, reconnect,
resubscribe, TLS, refused credentials."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sync.mqtt.client import (
    ConnectionLost,
    Message,
    MqttClient,
    NotConnected,
    ProtocolChoice,
    TlsOptions,
    Will,
)
from tests.fixtures.fake_broker import read_packet
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.mqtt_client import MqttTestClient
from tests.fixtures.pool import MosquittoFactory
from tests.fixtures.ports import async_wait_until


def client_for(broker: MosquittoBroker, **kwargs: object) -> MqttClient:
    options: dict[str, object] = {
        "host": broker.host,
        "port": broker.port,
        "client_id": "edge-agent-test",
        "reconnect_min": 0.05,
        "reconnect_max": 0.5,
    }
    options.update(kwargs)
    return MqttClient(**options)  # type: ignore[arg-type]


def cut_under(client: MqttClient) -> None:
    """Shut the client's TCP connection down under it, with no DISCONNECT: a dead link.

    uvloop's transport sockets refuse shutdown(); a duplicate of the descriptor does not, and
    shutting it down ends the one connection both name.
    """
    connection = client._connection
    assert connection is not None
    sock = connection.socket()
    assert sock is not None
    with socket.fromfd(sock.fileno(), sock.family, sock.type) as duplicate:
        duplicate.shutdown(socket.SHUT_RDWR)


async def test_publish_is_acknowledged_and_received(mosquitto: MosquittoBroker) -> None:
    received: list[Message] = []
    async with client_for(mosquitto) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        client.subscribe("t/#", received.append)
        # The subscription must be active before publishing: wait for our own probe.
        while not received:
            client.publish("t/probe", b"x", qos=1)
            await asyncio.sleep(0.05)
        futures = [client.publish_acked(f"t/{i}", b"%d" % i) for i in range(500)]
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        await async_wait_until(lambda: len({m.topic for m in received}) >= 501, timeout=10)
        assert client.inflight == 0


async def test_birth_and_will(mosquitto: MosquittoBroker) -> None:
    with MqttTestClient(mosquitto.host, mosquitto.port) as watcher:
        watcher.subscribe("line/_agent/status")
        client = client_for(
            mosquitto,
            will=Will("line/_agent/status", lambda: b"offline"),
            birth=Will("line/_agent/status", lambda: b"online"),
            keepalive=5,
        )
        async with client:
            async with asyncio.timeout(10):
                await client.wait_connected()
            message = await asyncio.to_thread(watcher.wait_for_message, 5)
            assert (message.payload, message.retain) == (b"online", False)
            # Kill the client's socket without DISCONNECT: the broker publishes the will.
            cut_under(client)
            message = await asyncio.to_thread(watcher.wait_for_message, 10)
            assert message.payload == b"offline"


async def test_reconnects_after_broker_restart_and_resubscribes(
    mosquitto: MosquittoBroker,
) -> None:
    received: list[Message] = []
    changes: list[bool] = []
    async with client_for(mosquitto) as client:
        client.add_listener(changes.append)
        async with asyncio.timeout(10):
            await client.wait_connected()
        client.subscribe("r/#", received.append)
        await asyncio.to_thread(mosquitto.kill)
        await async_wait_until(lambda: not client.is_connected, timeout=10, message="loss noticed")
        with pytest.raises(NotConnected):
            client.publish("r/x", b"1")
        await asyncio.to_thread(mosquitto.restart)
        async with asyncio.timeout(15):
            await client.wait_connected()
        assert changes[:3] == [True, False, True]

        async def got_one() -> bool:
            client.publish("r/after", b"2")
            await asyncio.sleep(0.05)
            return any(m.topic == "r/after" for m in received)

        await async_wait_until(got_one, timeout=10, message="message after resubscribe")
        assert client.stats.connects == 2


async def test_loss_fails_pending_acks(mosquitto: MosquittoBroker) -> None:
    async with client_for(mosquitto) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        await asyncio.to_thread(mosquitto.pause)  # SIGSTOP: accepts nothing, acks nothing
        future = client.publish_acked("p/x", b"1")
        cut_under(client)
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(future, 10)
        assert client.inflight == 0
        await asyncio.to_thread(mosquitto.resume)


async def test_tls_with_ca(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory(tls=True)
    files = broker.tls_files
    assert files is not None
    assert broker.tls_port is not None
    tls = TlsOptions(ca_file=str(files.ca_cert))
    async with client_for(broker, port=broker.tls_port, tls=tls) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        await asyncio.wait_for(client.publish_acked("tls/x", b"1"), 5)


async def test_tls_untrusted_ca_is_refused_with_a_clear_reason(
    mosquitto_factory: MosquittoFactory, caplog: pytest.LogCaptureFixture
) -> None:
    broker = mosquitto_factory(tls=True)
    assert broker.tls_port is not None
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    async with client_for(broker, port=broker.tls_port, tls=TlsOptions()) as client:
        await async_wait_until(lambda: client.stats.connect_failures >= 2, timeout=10)
        assert not client.is_connected
    assert "TLS certificate not trusted" in caplog.text
    # Logged once per reason, not once per attempt.
    assert caplog.text.count("cannot connect") == 1


async def test_wrong_password_is_refused(
    mosquitto_factory: MosquittoFactory, caplog: pytest.LogCaptureFixture
) -> None:
    broker = mosquitto_factory(users={"line3": "right"})
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    async with client_for(broker, username="line3", password="wrong") as client:
        await async_wait_until(lambda: client.stats.connect_failures >= 1, timeout=10)
    assert "broker refused the connection" in caplog.text
    async with client_for(broker, username="line3", password="right") as client:
        async with asyncio.timeout(10):
            await client.wait_connected()


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="port"):
        MqttClient(host="h", port=0, client_id="x")
    with pytest.raises(ValueError, match="max_inflight"):
        MqttClient(host="h", port=1883, client_id="x", max_inflight=70000)


async def test_mqtt_311_also_works(mosquitto: MosquittoBroker) -> None:
    received: list[Message] = []
    async with client_for(mosquitto, protocol="3.1.1") as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        client.subscribe("v4/#", received.append)

        async def echoed() -> bool:
            client.publish("v4/x", b"1")
            await asyncio.sleep(0.05)
            return bool(received)

        await async_wait_until(echoed, timeout=10)
        await asyncio.wait_for(client.publish_acked("v4/y", b"2"), 5)


async def test_mutual_tls(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory(tls=True, require_certificate=True)
    files = broker.tls_files
    assert files is not None
    assert broker.tls_port is not None
    without = TlsOptions(ca_file=str(files.ca_cert))
    async with client_for(broker, port=broker.tls_port, tls=without) as client:
        await async_wait_until(lambda: client.stats.connect_failures >= 1, timeout=10)
        assert not client.is_connected
        # What is known: the broker's TLS alert (TLS 1.3 sends it after the handshake), or,
        # when our CONNECT crossed it, the reset that followed.
        assert client.last_error is not None
        assert client.last_error.startswith(
            ("TLS alert from the broker: ", "connection reset by the broker (TCP RST)")
        ), client.last_error
        assert client.last_error.endswith(" before CONNACK")
    with_cert = TlsOptions(
        ca_file=str(files.ca_cert), cert_file=str(files.client_cert), key_file=str(files.client_key)
    )
    async with client_for(broker, port=broker.tls_port, tls=with_cert) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        await asyncio.wait_for(client.publish_acked("mtls/x", b"1"), 5)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_paho_as_peer_sees_what_we_publish_and_we_see_what_it_publishes(
    mosquitto: MosquittoBroker, protocol: ProtocolChoice
) -> None:
    # An independent MQTT implementation on the other side of the broker checks our bytes:
    # retained flag, a payload long enough for a multi-byte length, and its QoS 2 handshake.
    big = bytes(range(256)) * 300  # 76,800 bytes
    received: list[Message] = []
    with MqttTestClient(mosquitto.host, mosquitto.port) as peer:
        peer.subscribe("peer/out/#")
        async with client_for(mosquitto, protocol=protocol) as client:
            async with asyncio.timeout(10):
                await client.wait_connected()
            await asyncio.wait_for(client.publish_acked("peer/out/big", big, retain=True), 5)
            client.publish("peer/out/small", b"s", qos=0)
            messages = [await asyncio.to_thread(peer.wait_for_message, 5) for _ in range(2)]
            by_topic = {message.topic: message for message in messages}
            assert by_topic["peer/out/big"].payload == big
            assert by_topic["peer/out/big"].retain is False  # live delivery, not the stored copy
            assert by_topic["peer/out/small"].payload == b"s"

            client.subscribe("peer/in/#", received.append, qos=1)
            client.subscribe("peer/out/big", received.append, qos=1)  # the retained copy
            await async_wait_until(lambda: bool(received), timeout=5, message="retained copy")
            assert (received[0].topic, received[0].payload, received[0].retain) == (
                "peer/out/big",
                big,
                True,
            )
            await asyncio.to_thread(peer.publish, "peer/in/q2", b"two", 2)
            await async_wait_until(
                lambda: any(m.topic == "peer/in/q2" for m in received), timeout=5
            )
            await asyncio.sleep(0.2)  # a duplicate would arrive within this
            assert [m.payload for m in received if m.topic == "peer/in/q2"] == [b"two"]
            assert client.inflight == 0


async def test_stalled_broker_is_noticed_by_the_keepalive(mosquitto: MosquittoBroker) -> None:
    # SIGSTOP: TCP stays up, nothing is acknowledged. We keep sending, so only the silence
    # from the broker's side can tell; a PINGREQ without PINGRESP ends the connection.
    changes: list[bool] = []
    async with client_for(mosquitto, keepalive=5) as client:
        client.add_listener(changes.append)
        async with asyncio.timeout(10):
            await client.wait_connected()
        await asyncio.to_thread(mosquitto.pause)
        try:

            async def lost() -> bool:
                with contextlib.suppress(NotConnected):
                    client.publish("stall/x", b"1", qos=0)
                return not client.is_connected

            await async_wait_until(lost, timeout=20, message="keep-alive timeout noticed")
            assert client.last_error == "keep-alive timeout"
        finally:
            await asyncio.to_thread(mosquitto.resume)
        async with asyncio.timeout(15):
            await client.wait_connected()
        assert changes[:3] == [True, False, True]


@pytest.mark.parametrize(
    ("after_connack", "reason"),
    [
        # A packet type no broker sends: the connection is dropped, the loop lives on.
        (b"\x10\x00", "malformed packet from the broker: packet type 1 is not sent by a broker"),
        # A PUBLISH whose properties end in the middle of one.
        (
            b"\x30\x05\x00\x01t\x01\x01",
            "malformed packet from the broker: property runs past the packet",
        ),
        # MQTT 5 DISCONNECT from the broker with a reason code and a reason string.
        (
            b"\xe0\x08\x8e\x06\x1f\x00\x03dup",
            "disconnected by the broker: Session taken over (dup)",
        ),
    ],
)
async def test_what_the_broker_sends_after_connack_ends_the_connection_with_a_reason(
    after_connack: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    sent = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"\x20\x03\x00\x00\x00")  # CONNACK: success, no properties
        await writer.drain()
        await sent.wait()
        writer.write(after_connack)
        await writer.drain()
        await reader.read(1024)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        client = MqttClient(
            host="127.0.0.1", port=port, client_id="m", reconnect_min=5, reconnect_max=5
        )
        async with client:
            async with asyncio.timeout(10):
                await client.wait_connected()
            sent.set()
            await async_wait_until(lambda: not client.is_connected, timeout=10)
            assert client.last_error == reason
            assert client.stats.lost == 1
    assert f"lost: {reason}" in caplog.text


async def test_the_brokers_keepalive_overrides_ours() -> None:
    # MQTT 5 CONNACK property Server Keep Alive (0x13): the client must ping within it.
    pings = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"\x20\x06\x00\x00\x03\x13\x00\x01")  # CONNACK, Server Keep Alive 1 s
        await writer.drain()
        while data := await reader.read(1024):
            if b"\xc0\x00" in data:
                pings.set()
                writer.write(b"\xd0\x00")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, MqttClient(host="127.0.0.1", port=port, client_id="k", keepalive=60) as c:
        async with asyncio.timeout(10):
            await c.wait_connected()
            await pings.wait()  # with our own 60 s it would not come for a minute
        assert c.is_connected


class StrictBroker:
    """A broker that enforces its Receive Maximum as EMQX and HiveMQ do: more unacknowledged
    QoS 1 PUBLISH packets than announced end the connection with DISCONNECT 0x93. It
    acknowledges each PUBLISH a few loop turns later, so the window really fills."""

    def __init__(self, receive_maximum: int | None) -> None:
        self.receive_maximum = receive_maximum
        self.topics: list[str] = []
        self.peak = 0
        self.violations = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        outstanding: set[int] = set()
        first = True
        while packet := await read_packet(reader):
            kind, body = packet
            if first:  # CONNECT: answer CONNACK with (or without) Receive Maximum
                first = False
                properties = b""
                if self.receive_maximum is not None:
                    properties = b"\x21" + self.receive_maximum.to_bytes(2, "big")
                writer.write(bytes([0x20, 3 + len(properties), 0, 0, len(properties)]) + properties)
            elif kind & 0xF0 == 0x30 and kind & 0x06:  # QoS 1 PUBLISH
                topic_end = 2 + int.from_bytes(body[:2], "big")
                self.topics.append(body[2:topic_end].decode())
                mid = int.from_bytes(body[topic_end : topic_end + 2], "big")
                outstanding.add(mid)
                self.peak = max(self.peak, len(outstanding))
                if self.receive_maximum is not None and len(outstanding) > self.receive_maximum:
                    self.violations += 1
                    writer.write(b"\xe0\x02\x93\x00")  # DISCONNECT, Receive Maximum exceeded
                    await writer.drain()
                    break
                asyncio.get_running_loop().call_later(0.002, self._ack, writer, outstanding, mid)
            elif kind == 0xC0:
                writer.write(b"\xd0\x00")
            elif kind == 0xE0:
                break
        writer.close()

    @staticmethod
    def _ack(writer: asyncio.StreamWriter, outstanding: set[int], mid: int) -> None:
        if not writer.is_closing():
            outstanding.discard(mid)
            writer.write(b"\x40\x03" + mid.to_bytes(2, "big") + b"\x00")


@contextlib.asynccontextmanager
async def strict_session(
    receive_maximum: int | None, *, connected: bool = True, **options: Any
) -> AsyncIterator[tuple[StrictBroker, MqttClient]]:
    """A StrictBroker on a free port and a client of it (connected, unless told not to)."""
    broker = StrictBroker(receive_maximum)
    server = await asyncio.start_server(broker.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, MqttClient(host="127.0.0.1", port=port, client_id="rm", **options) as client:
        if connected:
            async with asyncio.timeout(10):
                await client.wait_connected()
        yield broker, client


async def test_the_window_is_the_brokers_receive_maximum() -> None:
    # Publishers that ignore has_space (acks, replies) are queued in order inside the client.
    async with strict_session(3) as (broker, client):
        assert client.window == 3
        futures = [client.publish_acked(f"t/{index}", b"x") for index in range(60)]
        assert not client.has_space
        assert client.inflight == 3
        async with asyncio.timeout(10):
            await asyncio.gather(*futures)
            await client.wait_acked()
        assert client.is_connected
        assert client.has_space
    assert broker.violations == 0
    assert broker.peak == 3
    assert broker.topics == [f"t/{index}" for index in range(60)]


async def test_without_receive_maximum_the_window_is_max_inflight() -> None:
    async with strict_session(None, max_inflight=40) as (broker, client):
        assert client.window == 40
        for index in range(100):
            if not client.has_space:
                await client.wait_space()
            client.publish(f"t/{index}", b"x")
        async with asyncio.timeout(10):
            await client.wait_acked()
    assert broker.peak == 40
    assert broker.topics == [f"t/{index}" for index in range(100)]


async def test_queued_publishes_fail_with_the_connection() -> None:
    async with strict_session(1) as (_, client):
        futures = [client.publish_acked(f"t/{index}", b"x") for index in range(5)]
        connection = client._connection
        assert connection is not None
        connection.abort()
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
        assert all(isinstance(result, ConnectionLost) for result in results[1:])
        assert client.inflight == 0
        assert client.has_space


async def test_receive_maximum_zero_is_a_protocol_error() -> None:
    async with strict_session(0, connected=False, reconnect_min=5, reconnect_max=5) as (_, client):
        await async_wait_until(lambda: client.last_error is not None, timeout=10)
        assert "Receive Maximum 0" in (client.last_error or "")
        assert not client.is_connected


@pytest.mark.parametrize(("setting", "window"), [(None, 20), ("5", 5), ("0", 1000)])
async def test_mosquittos_max_inflight_messages_sets_the_window(
    mosquitto_factory: MosquittoFactory, setting: str | None, window: int
) -> None:
    extra = [] if setting is None else [f"max_inflight_messages {setting}"]
    broker = mosquitto_factory(extra_config=extra)
    async with client_for(broker) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        assert client.window == window
        futures = [client.publish_acked(f"w/{index}", b"x") for index in range(200)]
        assert client.inflight == min(window, 200)
        async with asyncio.timeout(10):
            await asyncio.gather(*futures)


async def test_mqtt_311_has_no_receive_maximum(mosquitto: MosquittoBroker) -> None:
    async with client_for(mosquitto, protocol="3.1.1", max_inflight=100) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        assert client.window == 100


async def test_close_ends_a_connection_task_that_swallowed_its_cancellation() -> None:
    # Python 3.11's asyncio.wait_for can swallow a cancellation that arrives as its future
    # completes; close() used to wait for such a task forever (a stop that never ends).
    client = MqttClient(host="127.0.0.1", port=1, client_id="s")
    swallowed: list[bool] = []

    async def connect_once() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(True)
        await asyncio.sleep(3600)  # carries on as if nothing happened

    client._link._connect_once = connect_once  # type: ignore[method-assign]
    async with asyncio.timeout(10):
        async with client:
            await asyncio.sleep(0.05)
    assert swallowed == [True]
