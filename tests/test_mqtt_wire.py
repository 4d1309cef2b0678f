"""sync.mqtt.wire: the MQTT packets the client sends and parses, as table tests."""

from __future__ import annotations

import asyncio
import itertools
import re

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.mqtt import wire
from sync.mqtt.client import Message, MqttClient
from sync.mqtt.connection import Connection as _Connection
from sync.mqtt.dispatch import parse_connack, parse_publish


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
        + b"\x26\x00\x01k\x00\x01v"  # a user property
        + b"\x26\x00\x02by\x00\x05l\xc3\xa9on"  # another, in UTF-8: pairs keep their order
        + b"\x1f\x00\x04oops"  # reason string
        + b"\x0b\x81\x01"  # subscription identifier 129 (variable byte integer)
    )
    data = b"\xff" + wire.encode_varint(len(properties)) + properties + b"rest"
    found, end = wire.parse_properties(data, 1, len(data))
    assert found == {
        0x13: 60,
        0x21: 20,
        0x27: 65_536,
        0x1F: "oops",
        0x0B: 129,
        0x26: (("k", "v"), ("by", "léon")),
    }
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
        client._on_pubacks = acks.update  # type: ignore[method-assign,assignment]
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

    return uvloop.run(run())


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


# -- issue #18: limits and what a broker may not send --------------------------------------------


def test_connect_v5_announces_max_packet_size() -> None:
    packet = wire.encode_connect(client_id="c", keepalive=5, v5=True, max_packet_size=1 << 20)
    # Properties: length 5, Maximum Packet Size (0x27) = 1,048,576 (four bytes).
    assert packet == b"\x10\x13\x00\x04MQTT\x05\x02\x00\x05\x05\x27\x00\x10\x00\x00\x00\x01c"
    # MQTT 3.1.1 has no properties: nothing to announce.
    assert wire.encode_connect(
        client_id="c", keepalive=5, v5=False, max_packet_size=1 << 20
    ) == wire.encode_connect(client_id="c", keepalive=5, v5=False)


@pytest.mark.parametrize(
    ("no_local", "retain_as_published", "v5", "options"),
    [
        (False, True, True, 0x09),  # QoS 1 + Retain As Published (bit 3)
        (True, True, True, 0x0D),
        (False, False, True, 0x01),
        (True, True, False, 0x01),  # 3.1.1: the byte is the QoS, nothing else
    ],
)
def test_subscribe_retain_as_published(
    no_local: bool, retain_as_published: bool, v5: bool, options: int
) -> None:
    packet = wire.encode_subscribe(
        7, "a/#", 1, no_local=no_local, v5=v5, retain_as_published=retain_as_published
    )
    assert packet[-1] == options


def test_disconnect_with_a_reason_code() -> None:
    assert wire.encode_disconnect(wire.PACKET_TOO_LARGE) == b"\xe0\x02\x95\x00"
    assert wire.reason_name(wire.MALFORMED_PACKET) == "Malformed Packet"
    assert wire.reason_name(wire.PROTOCOL_ERROR) == "Protocol Error"


@given(
    topic=st.integers(min_value=1, max_value=300),
    payload=st.sampled_from([0, 1, 100, 120, 121, 122, 16_000, 16_370, 16_380, 2_097_140, 3 << 20]),
    qos=st.sampled_from([0, 1]),
    v5=st.booleans(),
)
def test_publish_size_is_the_packets_length(topic: int, payload: int, qos: int, v5: bool) -> None:
    header = wire.publish_header(b"t" * topic, payload, qos, False, 1, v5)
    assert wire.publish_size(topic, payload, qos, v5) == len(header) + payload


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"a/\xff", "is not valid UTF-8"),
        (b"a/\xc0\xaf", "is not valid UTF-8"),  # an overlong encoding of '/'
        (b"a/\xed\xa0\x80", "is not valid UTF-8"),  # a UTF-16 surrogate
        (b"a/\x00", "contains U+0000"),
    ],
)
def test_malformed_utf8_strings(raw: bytes, error: str) -> None:
    with pytest.raises(wire.MalformedPacket, match=re.escape(error)) as caught:
        wire.decode_utf8(raw, "topic")
    assert caught.value.reason_code == wire.MALFORMED_PACKET
    assert wire.decode_utf8("a/é/\ufeff".encode(), "topic") == "a/é/\ufeff"


@pytest.mark.parametrize("topic", ["", "a/+", "+", "a/#", "#", "a/b+c"])
def test_a_broker_may_not_deliver_these_topics(topic: str) -> None:
    with pytest.raises(wire.ProtocolError) as caught:
        wire.check_incoming_topic(topic)
    assert caught.value.reason_code == wire.PROTOCOL_ERROR


@pytest.mark.parametrize("topic", ["a", "a/b", "/", "a//b", "$SYS/x", "a/ b"])
def test_a_broker_may_deliver_these_topics(topic: str) -> None:
    wire.check_incoming_topic(topic)


@pytest.mark.parametrize(
    "data",
    [
        b"\x06\x26\x00\x01k\x00\x01",  # the value's length without the value
        b"\x07\x26\x00\x01k\x00\x01\xff",  # value not UTF-8
        b"\x07\x26\x00\x01\x00\x00\x01v",  # name is U+0000
        b"\x03\x26\x00\x05",  # name longer than the properties
    ],
)
def test_malformed_user_properties_are_refused(data: bytes) -> None:
    with pytest.raises(wire.MalformedPacket):
        wire.parse_properties(data, 0, len(data))


def _publish_body(properties: bytes, *, topic: bytes = b"a/b", payload: bytes = b"p") -> bytes:
    return len(topic).to_bytes(2, "big") + topic + b"\x00\x05" + properties + payload


@pytest.mark.parametrize(
    ("properties", "user_properties"),
    [
        (b"\x00", ()),
        (b"\x07\x26\x00\x01k\x00\x01v", (("k", "v"),)),
        (
            # Repeated names are allowed and kept in order (spec 3.3.2.3.7).
            b"\x1b\x26\x00\x02by\x00\x03ann\x01\x01\x26\x00\x02by\x00\x03bob\x02\x00\x00\x00\x10",
            (("by", "ann"), ("by", "bob")),
        ),
    ],
)
def test_parse_publish_keeps_user_properties(
    properties: bytes, user_properties: tuple[tuple[str, str], ...]
) -> None:
    body = memoryview(_publish_body(properties))
    message, mid = parse_publish(0x33, body, v5=True)
    assert (message.topic, message.payload, message.qos, message.retain, mid) == (
        "a/b",
        b"p",
        1,
        True,
        5,
    )
    assert message.user_properties == user_properties


def test_connack_maximum_packet_size() -> None:
    connack = parse_connack(memoryview(b"\x00\x00\x05\x27\x00\x00\x04\x00"), v5=True)
    assert connack.maximum_packet_size == 1024
    assert parse_connack(memoryview(b"\x00\x00\x00"), v5=True).maximum_packet_size is None
    with pytest.raises(wire.ProtocolError, match="Maximum Packet Size 0"):
        parse_connack(memoryview(b"\x00\x00\x05\x27\x00\x00\x00\x00"), v5=True)
