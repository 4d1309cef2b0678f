"""sync.mqtt.wire: the MQTT packets the client sends and parses, as table tests."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.mqtt import wire
from sync.mqtt.client import Message, MqttClient
from sync.mqtt.connection import Connection as _Connection


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_varint_round_trip(value: int, encoded: bytes) -> None:
    # The boundaries of spec table 1.5.5.
    assert wire.encode_varint(value) == encoded
    assert wire.decode_varint(b"\xaa" + encoded + b"\xbb", 1) == (value, 1 + len(encoded))


def test_varint_limits() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        wire.encode_varint(268_435_456)
    assert wire.decode_varint(b"\x80\x80", 0) is None  # not all bytes here yet
    with pytest.raises(wire.MalformedPacket, match="four bytes"):
        wire.decode_varint(b"\x80\x80\x80\x80\x01", 0)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+/c", "a/b/c", True),
        ("a/#", "a", True),  # "#" also matches the parent level (spec 4.7.1.2)
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("#", "$SYS/broker", False),  # $-topics are not matched by leading wildcards
        ("+/broker", "$SYS/broker", False),
        ("$SYS/#", "$SYS/broker", True),
        ("a/+", "a/", True),  # an empty level is a level
        ("+", "/a", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, matches: bool) -> None:
    assert wire.topic_matches(topic_filter, topic) is matches


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "a\x00b"])
def test_invalid_topic_names_are_refused(topic: str) -> None:
    with pytest.raises(ValueError, match="invalid topic name"):
        wire.check_topic_name(topic)


def test_connect_v5_with_will_and_credentials() -> None:
    will = wire.WillMessage("r/_agent/status", b"off", qos=1, retain=True)
    packet = wire.encode_connect(
        client_id="gw", keepalive=30, v5=True, username="u", password="p", will=will
    )
    body = (
        b"\x00\x04MQTT\x05"
        + bytes(
            (0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02,)
        )  # user, pass, will retain/QoS 1/flag, clean
        + b"\x00\x1e"  # keep-alive 30 s
        + b"\x00"  # no CONNECT properties
        + b"\x00\x02gw"
        + b"\x00"  # no will properties
        + b"\x00\x0fr/_agent/status"
        + b"\x00\x03off"
        + b"\x00\x01u"
        + b"\x00\x01p"
    )
    assert packet == b"\x10" + bytes((len(body),)) + body


def test_connect_v311_minimal() -> None:
    assert wire.encode_connect(client_id="c", keepalive=5, v5=False) == (
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x05\x00\x01c"
    )


@pytest.mark.parametrize(
    ("qos", "retain", "v5", "expected"),
    [
        (0, False, False, b"\x30\x05\x00\x01tab"),
        (1, True, False, b"\x33\x07\x00\x01t\x12\x34ab"),
        (1, True, True, b"\x33\x08\x00\x01t\x12\x34\x00ab"),
        (0, True, True, b"\x31\x06\x00\x01t\x00ab"),
    ],
)
def test_publish_header(qos: int, retain: bool, v5: bool, expected: bytes) -> None:
    assert wire.publish_header(b"t", 2, qos, retain, 0x1234, v5) + b"ab" == expected


def test_publish_header_with_a_long_payload_uses_a_multi_byte_length() -> None:
    header = wire.publish_header(b"t", 200, 1, False, 1, True)
    # 2 + 1 (topic) + 2 (id) + 1 (properties) + 200 = 206 = 0xCE 0x01
    assert header == b"\x32\xce\x01\x00\x01t\x00\x01\x00"


def test_subscribe_options() -> None:
    assert wire.encode_subscribe(7, "a/#", 1, no_local=True, v5=True) == (
        b"\x82\x09\x00\x07\x00\x00\x03a/#\x05"
    )
    assert wire.encode_subscribe(7, "a/#", 1, no_local=True, v5=False) == (
        b"\x82\x08\x00\x07\x00\x03a/#\x01"
    )
    assert wire.encode_unsubscribe(8, "a/#", v5=True) == b"\xa2\x08\x00\x08\x00\x00\x03a/#"


def test_parse_properties_by_type() -> None:
    properties = (
        b"\x13\x00\x3c"  # server keep-alive 60
        + b"\x21\x00\x14"  # receive maximum 20
        + b"\x27\x00\x01\x00\x00"  # maximum packet size 65,536
        + b"\x26\x00\x01k\x00\x01v"  # a user property (skipped)
        + b"\x1f\x00\x04oops"  # reason string
        + b"\x0b\x81\x01"  # subscription identifier 129 (variable byte integer)
    )
    data = b"\xff" + wire.encode_varint(len(properties)) + properties + b"rest"
    found, end = wire.parse_properties(data, 1, len(data))
    assert found == {0x13: 60, 0x21: 20, 0x27: 65_536, 0x1F: "oops", 0x0B: 129}
    assert data[end:] == b"rest"


@pytest.mark.parametrize(
    "data",
    [
        b"\x05\x13\x00",  # length says 5, 2 bytes there
        b"\x03\x7e\x00\x00",  # unknown identifier
        b"\x02\x13\x00\x3c",  # a property longer than the declared length
        b"\x01\x01",  # a byte property without its byte
        b"\x04\x1f\x00\x05a",  # a string longer than what is left
        b"\x02\x0b\x80",  # a variable byte integer cut short
    ],
)
def test_malformed_properties_are_refused(data: bytes) -> None:
    with pytest.raises(wire.MalformedPacket):
        wire.parse_properties(data, 0, len(data))


def test_reason_names() -> None:
    assert wire.reason_name(0x87) == "Not authorized"
    assert wire.reason_name(4, v5=False) == "Bad user name or password"
    assert wire.reason_name(0x7A) == "reason code 0x7A"
    assert wire.ack(wire.PUBACK, 0x0102) == b"\x40\x02\x01\x02"


# -- framing: what arrives in arbitrary TCP chunks is parsed the same ---------------------------


def _publish(topic: str, payload: bytes, qos: int, mid: int, *, retain: bool = False) -> bytes:
    return wire.publish_header(topic.encode(), len(payload), qos, retain, mid, True) + payload


STREAM = (
    b"\x40\x02\x00\x01"  # PUBACK 1 (MQTT 5 without a reason code)
    + b"\x40\x03\x00\x02\x00"  # PUBACK 2 with reason "Success"
    + _publish("a/b", b"x" * 300, 1, 7)  # a two-byte remaining length
    + b"\xd0\x00"  # PINGRESP
    + _publish("a/c", b"", 0, 0, retain=True)
    + b"\x40\x04\x00\x03\x97\x00"  # PUBACK 3: "Quota exceeded", empty properties
    + _publish("a/d", bytes(range(256)) * 70, 1, 8)  # 17,920 bytes: three-byte length
)


class _Recorder:
    """Stands in for the transport: what the connection wrote back."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


def _feed(chunks: list[bytes]) -> tuple[list[tuple[str, bytes, int, bool]], dict[int, int]]:
    async def run() -> tuple[list[tuple[str, bytes, int, bool]], dict[int, int]]:
        client = MqttClient(host="127.0.0.1", port=1, client_id="framing")
        received: list[Message] = []
        client.subscribe("a/#", received.append)
        connection = _Connection(client, asyncio.get_running_loop(), v5=True)
        connection.transport = _Recorder()  # type: ignore[assignment]
        client._connection = connection
        acks: dict[int, int] = {}
        client._on_puback = lambda mid, reason: acks.__setitem__(mid, reason)  # type: ignore[method-assign]
        for chunk in chunks:
            connection.data_received(chunk)
        assert not connection.buffer, "every byte belongs to a complete packet"
        connection.flush()
        recorder = connection.transport
        assert isinstance(recorder, _Recorder)
        # QoS 1 publishes are acknowledged with PUBACK, in order.
        assert recorder.written == [b"\x40\x02\x00\x07\x40\x02\x00\x08"]
        assert connection.ping_sent is None
        return [(m.topic, m.payload, m.qos, m.retain) for m in received], acks

    return asyncio.run(run())


EXPECTED = (
    [
        ("a/b", b"x" * 300, 1, False),
        ("a/c", b"", 0, True),
        ("a/d", bytes(range(256)) * 70, 1, False),
    ],
    {1: 0, 2: 0, 3: 0x97},
)


def test_framing_in_one_chunk_and_byte_by_byte() -> None:
    assert _feed([STREAM]) == EXPECTED
    assert _feed([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12))
@settings(max_examples=60, deadline=None)
def test_framing_at_any_split(cuts: list[int]) -> None:
    points = [0, *sorted(set(cuts)), len(STREAM)]
    assert _feed([STREAM[a:b] for a, b in itertools.pairwise(points)]) == EXPECTED
