"""What a broken or hostile broker (or a man in the middle on mqtt://) sends never ends the
client nor fills its memory (issue #18, items 4 and 5): an oversized packet is refused on its
fixed header, a malformed or forbidden one closes the connection with the spec's reason code,
one log line each, and the client reconnects. Fake brokers on a raw socket send what no real
broker would."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

import sync.mqtt.link
from sync.mqtt import wire
from sync.mqtt.client import Message, MqttClient, ProtocolChoice
from sync.mqtt.connection import Connection
from tests.fixtures.fake_broker import CONNACK_V5, CONNACK_V311, ScriptedBroker
from tests.fixtures.ports import async_wait_until


def raw_publish(topic: bytes, payload: bytes = b"x", *, properties: bytes = b"\x00") -> bytes:
    """A QoS 0 MQTT 5 PUBLISH built by hand: any topic, any properties."""
    body = len(topic).to_bytes(2, "big") + topic + properties + payload
    return b"\x30" + wire.encode_varint(len(body)) + body


@contextlib.asynccontextmanager
async def scripted_session(
    script: Callable[[int], Sequence[bytes]],
    *,
    protocol: ProtocolChoice = "5",
    prepare: Callable[[MqttClient], None] | None = None,
    **options: object,
) -> AsyncIterator[tuple[ScriptedBroker, MqttClient, list[Message]]]:
    """A ScriptedBroker and a connected client subscribed to '#' (what it receives);
    `prepare` sees the client before it connects."""
    broker = ScriptedBroker(script, connack=CONNACK_V311 if protocol == "3.1.1" else CONNACK_V5)
    server = await asyncio.start_server(broker.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    received: list[Message] = []
    settings: dict[str, object] = {"reconnect_min": 0.05, "reconnect_max": 0.5, **options}
    client = MqttClient(
        host="127.0.0.1",
        port=port,
        client_id="hostile",
        protocol=protocol,
        **settings,  # type: ignore[arg-type]
    )
    client.subscribe("#", received.append)
    if prepare is not None:
        prepare(client)
    async with server, client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        yield broker, client, received


def first_only(*chunks: bytes) -> Callable[[int], Sequence[bytes]]:
    """The script: `chunks` on the first connection, nothing on the later ones."""
    return lambda index: chunks if index == 0 else ()


async def reconnected(broker: ScriptedBroker, client: MqttClient) -> None:
    """Wait until the first connection is closed and a second one is up."""
    await async_wait_until(lambda: broker.sessions[0].closed.is_set(), timeout=10)
    await async_wait_until(
        lambda: len(broker.sessions) >= 2 and client.is_connected, timeout=10, message="reconnect"
    )


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and text in record.getMessage()
    ]


@pytest.mark.parametrize(
    ("packet", "reason_code", "reason"),
    [
        # Topics no handler may see: a reply topic built from one would be invalid too.
        pytest.param(raw_publish(b"cmd/a\x00b"), 0x81, "PUBLISH topic contains U+0000", id="nul"),
        pytest.param(
            raw_publish(b"cmd/+"), 0x82, "PUBLISH topic 'cmd/+' contains a wildcard", id="plus"
        ),
        pytest.param(
            raw_publish(b"cmd/#/x"), 0x82, "PUBLISH topic 'cmd/#/x' contains a wildcard", id="hash"
        ),
        pytest.param(
            raw_publish(b""),
            0x82,
            "PUBLISH with an empty topic and no topic alias allowed",
            id="empty",
        ),
        pytest.param(
            raw_publish(b"cmd/x", properties=b"\x03\x23\x00\x01"),  # Topic Alias 1
            0x82,
            "PUBLISH with a topic alias, which this client never allows",
            id="topic-alias",
        ),
        pytest.param(
            raw_publish(b"cmd/\xff"), 0x81, "PUBLISH topic is not valid UTF-8", id="not-utf8"
        ),
        pytest.param(
            raw_publish(b"cmd/\xed\xa0\x80"),  # an encoded UTF-16 surrogate
            0x81,
            "PUBLISH topic is not valid UTF-8",
            id="surrogate",
        ),
        pytest.param(
            raw_publish(b"cmd/x", properties=b"\x07\x26\x00\x01k\x00\x01\xff"),
            0x81,
            "user property is not valid UTF-8",
            id="user-property-not-utf8",
        ),
        pytest.param(
            b"\x30\xff\xff\xff\xff\x01",
            0x81,
            "variable byte integer longer than four bytes",
            id="remaining-length-5-bytes",
        ),
        pytest.param(b"\x36\x04\x00\x01tx", 0x81, "invalid PUBLISH", id="qos-3"),
        pytest.param(b"\x50\x02\x00\x01", 0x82, "unexpected packet type 5", id="pubrec"),
        pytest.param(b"\x10\x00", 0x82, "packet type 1 is not sent by a broker", id="connect"),
        pytest.param(CONNACK_V5, 0x82, "a second CONNACK", id="second-connack"),
    ],
)
async def test_a_malformed_or_forbidden_packet_closes_the_connection_not_the_client(
    packet: bytes, reason_code: int, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    async with scripted_session(first_only(packet)) as (broker, client, received):
        await reconnected(broker, client)
        assert broker.sessions[0].disconnect() == bytes((reason_code, 0))
        assert received == []
        assert client.stats.refused_packets == 1
        assert client.stats.lost == 1
    # One line, naming what was wrong.
    lines = warnings_with(caplog, "lost:")
    assert len(lines) == 1
    assert lines[0].endswith(f" lost: malformed packet from the broker: {reason}")


async def test_on_mqtt_311_a_bad_topic_closes_the_socket_without_disconnect() -> None:
    # 3.1.1's DISCONNECT has no reason code and would discard the Last Will: just close.
    async with scripted_session(
        first_only(raw_publish(b"cmd/a+b", properties=b"")), protocol="3.1.1"
    ) as (
        broker,
        client,
        received,
    ):
        await reconnected(broker, client)
        assert broker.sessions[0].disconnect() is None
        assert received == []
        assert client.last_error is None  # up again
        assert client.stats.refused_packets == 1


async def test_an_oversized_packet_is_refused_on_its_fixed_header(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The fixed header announces a 200 MiB PUBLISH; only its first bytes ever come. The client
    # must not wait for (and buffer) the body: it refuses on the header alone.
    announced = 200 * 1024 * 1024
    header = b"\x30" + wire.encode_varint(announced) + b"\x00\x03cmd"
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    async with scripted_session(first_only(header), max_packet_size=65536) as (
        broker,
        client,
        received,
    ):
        await reconnected(broker, client)
        assert broker.sessions[0].disconnect() == b"\x95\x00"  # Packet too large
        assert received == []
        assert client.stats.refused_packets == 1
    size = 1 + 4 + announced
    assert len(warnings_with(caplog, "lost:")) == 1
    assert warnings_with(caplog, "lost:")[0].endswith(
        f"lost: packet of {size} bytes from the broker is larger than max_packet_size (65536 bytes)"
    )


async def test_max_packet_size_is_announced_in_connect() -> None:
    async with scripted_session(lambda _: (), max_packet_size=1 << 20) as (broker, client, _):
        assert client.max_packet_size == 1 << 20
        # Properties: length 5, Maximum Packet Size (0x27) = 1,048,576.
        assert broker.sessions[0].connect[10:16] == b"\x05\x27\x00\x10\x00\x00"


class _Owner:
    """Stands in for the client: the packets handed over and the losses reported."""

    def __init__(self) -> None:
        self.packets: list[tuple[int, bytes]] = []
        self.lost: list[str] = []

    def _on_pubacks(self, acks: list[tuple[int, int]]) -> None:
        for mid, reason in acks:
            self.packets.append((0x40, bytes((mid >> 8, mid & 0xFF, reason))))

    def _on_packet(self, connection: Connection, first: int, body: memoryview) -> None:
        self.packets.append((first, bytes(body)))

    def _mark_lost(self, connection: Connection, reason: str) -> None:
        self.lost.append(reason)


class _Transport:
    """Stands in for the socket: what was written, whether it was closed."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def _framing(limit: int, *, v5: bool = True) -> tuple[Connection, _Owner, _Transport]:
    owner = _Owner()
    connection = Connection(owner, asyncio.get_running_loop(), v5=v5, max_packet_size=limit)
    transport = _Transport()
    connection.transport = transport  # type: ignore[assignment]
    return connection, owner, transport


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
async def test_a_packet_of_exactly_max_packet_size_passes_one_byte_more_does_not(
    chunk: int,
) -> None:
    # A QoS 0 PUBLISH to "a/b" (MQTT 5) with a payload of n bytes takes 1 + 2 + 6 + n bytes.
    limit = 1000
    fits = wire.publish_header(b"a/b", 991, 0, False, 0, True) + b"p" * 991
    too_large = wire.publish_header(b"a/b", 992, 0, False, 0, True) + b"p" * 992
    assert (len(fits), len(too_large)) == (limit, limit + 1)
    assert wire.publish_size(3, 992, 0, True) == limit + 1
    connection, owner, transport = _framing(limit)
    stream = fits + too_large + b"q" * (3 << 20)  # and what a hostile broker keeps sending
    for start in range(0, len(stream), chunk):
        connection.data_received(stream[start : start + chunk])
        assert len(connection.buffer) <= limit + chunk  # never the 3 MiB
    assert [first for first, _ in owner.packets] == [0x30]
    assert owner.lost == [
        "packet of 1001 bytes from the broker is larger than max_packet_size (1000 bytes)"
    ]
    assert bytes(transport.written) == b"\xe0\x02\x95\x00"
    assert transport.closing
    assert not connection.buffer


async def test_an_error_of_ours_while_handling_a_packet_stays_inside_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A bug in dispatching must not escape data_received into the event loop (asyncio would
    # report a fatal protocol error) nor into a TaskGroup: close with 0x83, log, reconnect.
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))

    def break_delivery(client: MqttClient) -> None:
        def deliver(message: Message) -> None:
            raise TypeError("a bug")

        client._subscriptions.deliver = deliver  # type: ignore[method-assign]

    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    try:
        script = first_only(raw_publish(b"cmd/x"))
        async with scripted_session(script, prepare=break_delivery) as (broker, client, _):
            await reconnected(broker, client)
            assert broker.sessions[0].disconnect() == b"\x83\x00"  # Implementation specific
            assert client.stats.refused_packets == 1
    finally:
        loop.set_exception_handler(None)
    assert loop_errors == []
    assert "TypeError: a bug" in caplog.text  # the traceback
    assert len(warnings_with(caplog, "lost: error handling a packet: TypeError('a bug')")) == 1


async def test_a_failing_handler_or_listener_keeps_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="edge_agent.mqtt")
    good: list[str] = []

    def handler(message: Message) -> None:
        if message.topic == "cmd/boom":
            raise RuntimeError("handler bug")
        good.append(message.topic)

    def listener(up: bool) -> None:
        raise RuntimeError("listener bug")

    def prepare(client: MqttClient) -> None:
        client.subscribe("cmd/#", handler)
        client.add_listener(listener)

    script = first_only(raw_publish(b"cmd/boom"), raw_publish(b"cmd/ok"))
    async with scripted_session(script, prepare=prepare) as (broker, client, _):
        await async_wait_until(lambda: good == ["cmd/ok"], timeout=10, message="cmd/ok")
        assert client.is_connected
        assert len(broker.sessions) == 1
        assert client.stats.lost == 0
    text = caplog.text
    assert "handler for cmd/# failed" in text
    assert "RuntimeError: handler bug" in text
    assert "connection listener failed" in text
    assert "RuntimeError: listener bug" in text


async def test_a_broker_that_keeps_sending_bad_packets_is_not_hammered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # E.g. an oversized retained message sent again on every (re)subscription: the backoff
    # grows as after failed attempts, instead of reconnecting at reconnect_min forever.
    delays: list[float] = []

    class Jitter:
        @staticmethod
        def uniform(low: float, high: float) -> float:
            delays.append(high)
            return 0.0

    monkeypatch.setattr(sync.mqtt.link, "random", Jitter)
    always = lambda _index: (raw_publish(b"cmd/+"),)  # noqa: E731
    async with scripted_session(always, reconnect_min=0.01, reconnect_max=10) as (broker, _, _):
        await async_wait_until(lambda: len(broker.sessions) >= 5, timeout=10)
    assert delays[:4] == [0.01, 0.02, 0.04, 0.08]


class _BatchOwner(_Owner):
    """Records each hand-over of PUBACKs as one batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []

    def _on_pubacks(self, acks: list[tuple[int, int]]) -> None:
        self.batches.append([mid for mid, _ in acks])
        super()._on_pubacks(acks)


async def test_the_pubacks_of_a_read_go_over_together_and_before_a_later_packet() -> None:
    owner = _BatchOwner()
    connection = Connection(owner, asyncio.get_running_loop(), v5=True)
    connection.transport = _Transport()  # type: ignore[assignment]
    puback = wire.PUBACK.to_bytes(1, "big")
    stream = (
        puback + b"\x02\x00\x01"  # 3.1.1-style PUBACK (no reason code)
        + puback + b"\x03\x00\x02\x00"
        + puback + b"\x03\x00\x03\x97"  # a refusal (Quota exceeded) stays with its mid
        + bytes((wire.PINGRESP, 0))
        + puback + b"\x02\x00\x04"
        + puback + b"\x02\x00"  # cut short: completed by the next read
    )  # fmt: skip
    connection.data_received(stream)
    connection.data_received(b"\x05")
    assert owner.batches == [[1, 2, 3], [4], [5]]
    assert [first for first, _ in owner.packets] == [0x40, 0x40, 0x40, 0xD0, 0x40, 0x40]
    assert owner.packets[2] == (0x40, b"\x00\x03\x97")
    assert not owner.lost
    assert not connection.buffer


async def test_pubacks_read_before_an_oversized_packet_still_count() -> None:
    connection, owner, _ = _framing(100)
    big = wire.publish_header(b"a/b", 200, 0, False, 0, True)
    connection.data_received(bytes((wire.PUBACK,)) + b"\x02\x00\x09" + big)
    assert owner.packets == [(0x40, b"\x00\x09\x00")]
    assert owner.lost
    assert "larger than max_packet_size" in owner.lost[0]
