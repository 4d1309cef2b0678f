"""MQTT 3.1.1 and 5 packets: the few the gateway needs, encoded and decoded as pure functions.

Only what `sync.mqtt.client` sends or must understand is here: CONNECT/CONNACK, PUBLISH/PUBACK (and
the QoS 2 handshake a broker may start), SUBSCRIBE/SUBACK, UNSUBSCRIBE/UNSUBACK, PINGREQ/PINGRESP,
DISCONNECT. MQTT 5 properties sent by the broker are parsed by type so that they can be
skipped or read; the client itself sends none.
"""

from __future__ import annotations

from dataclasses import dataclass

CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
PUBREC = 0x50
PUBREL = 0x60
PUBCOMP = 0x70
SUBSCRIBE = 0x80
SUBACK = 0x90
UNSUBSCRIBE = 0xA0
UNSUBACK = 0xB0
PINGREQ = 0xC0
PINGRESP = 0xD0
DISCONNECT = 0xE0
AUTH = 0xF0

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"  # MQTT 5: reason 0 "normal disconnection" may be left out

MAX_REMAINING_LENGTH = 268_435_455  # four bytes of variable-length integer
# The largest packet the protocol can frame: fixed header byte, four length bytes, the rest.
MAX_PACKET_SIZE = 1 + 4 + MAX_REMAINING_LENGTH

# The reason codes this client sends in DISCONNECT when it closes on what the broker sent.
MALFORMED_PACKET = 0x81
PROTOCOL_ERROR = 0x82
IMPLEMENTATION_ERROR = 0x83
PACKET_TOO_LARGE = 0x95

# MQTT 5 reason codes (spec 2.4) as brokers name them in logs.
REASONS_V5 = {
    0x00: "Success",
    0x04: "Disconnect with Will Message",
    0x10: "No matching subscribers",
    0x11: "No subscription existed",
    0x80: "Unspecified error",
    0x81: "Malformed Packet",
    0x82: "Protocol Error",
    0x83: "Implementation specific error",
    0x84: "Unsupported Protocol Version",
    0x85: "Client Identifier not valid",
    0x86: "Bad User Name or Password",
    0x87: "Not authorized",
    0x88: "Server unavailable",
    0x89: "Server busy",
    0x8A: "Banned",
    0x8B: "Server shutting down",
    0x8C: "Bad authentication method",
    0x8D: "Keep Alive timeout",
    0x8E: "Session taken over",
    0x8F: "Topic Filter invalid",
    0x90: "Topic Name invalid",
    0x91: "Packet Identifier in use",
    0x92: "Packet Identifier not found",
    0x93: "Receive Maximum exceeded",
    0x94: "Topic Alias invalid",
    0x95: "Packet too large",
    0x96: "Message rate too high",
    0x97: "Quota exceeded",
    0x98: "Administrative action",
    0x99: "Payload format invalid",
    0x9A: "Retain not supported",
    0x9B: "QoS not supported",
    0x9C: "Use another server",
    0x9D: "Server moved",
    0x9E: "Shared Subscriptions not supported",
    0x9F: "Connection rate exceeded",
    0xA0: "Maximum connect time",
    0xA1: "Subscription Identifiers not supported",
    0xA2: "Wildcard Subscriptions not supported",
}
# MQTT 3.1.1 CONNACK return codes (spec 3.2.2.3).
CONNACK_V311 = {
    0: "Connection Accepted",
    1: "Unacceptable protocol version",
    2: "Identifier rejected",
    3: "Server unavailable",
    4: "Bad user name or password",
    5: "Not authorized",
}

# MQTT 5 property identifier -> value type (spec 2.2.2.2).
_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_FIXED_SIZES = {_BYTE: 1, _U16: 2, _U32: 4}
_PROPERTY_TYPES = {
    0x01: _BYTE,
    0x02: _U32,
    0x03: _UTF8,
    0x08: _UTF8,
    0x09: _BINARY,
    0x0B: _VARINT,
    0x11: _U32,
    0x12: _UTF8,
    0x13: _U16,
    0x15: _UTF8,
    0x16: _BINARY,
    0x17: _BYTE,
    0x18: _U32,
    0x19: _BYTE,
    0x1A: _UTF8,
    0x1C: _UTF8,
    0x1F: _UTF8,
    0x21: _U16,
    0x22: _U16,
    0x23: _U16,
    0x24: _BYTE,
    0x25: _BYTE,
    0x26: _PAIR,
    0x27: _U32,
    0x28: _BYTE,
    0x29: _BYTE,
    0x2A: _BYTE,
}
SERVER_KEEP_ALIVE = 0x13
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS = 0x23
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27
MAXIMUM_QOS = 0x24
RETAIN_AVAILABLE = 0x25
SHARED_SUBSCRIPTION_AVAILABLE = 0x2A
NOT_AUTHORIZED = 0x87  # e.g. a PUBACK for a PUBLISH the broker's ACL denied
UNSUPPORTED_PROTOCOL_VERSION = 0x84
SESSION_TAKEN_OVER = 0x8E
RETAIN_NOT_SUPPORTED = 0x9A
QOS_NOT_SUPPORTED = 0x9B
REASON_STRING = 0x1F
ASSIGNED_CLIENT_ID = 0x12


class MalformedPacket(ValueError):
    """The broker sent bytes that are not a valid MQTT packet: the connection must close."""

    reason_code = MALFORMED_PACKET  # sent in the DISCONNECT that closes it (MQTT 5)


class ProtocolError(MalformedPacket):
    """A well-formed packet the broker may not send (spec 4.13): the connection must close."""

    reason_code = PROTOCOL_ERROR


def reason_name(code: int, *, v5: bool = True) -> str:
    """The spec's name of a reason code (MQTT 5) or CONNACK return code (MQTT 3.1.1)."""
    table = REASONS_V5 if v5 else CONNACK_V311
    return table.get(code, f"reason code 0x{code:02X}")


def encode_varint(value: int) -> bytes:
    """A variable byte integer (spec 1.5.5): 7 bits per byte, least significant first."""
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"{value} does not fit a variable byte integer")
    if value < 128:
        return bytes((value,))
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None when the bytes end before the integer does."""
    value = 0
    shift = 0
    end = len(data)
    while True:
        if pos >= end:
            return None
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise MalformedPacket("variable byte integer longer than four bytes")


def _string(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65,535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def decode_utf8(raw: bytes, what: str) -> str:
    """A UTF-8 Encoded String field; ill-formed UTF-8 or a U+0000 is a Malformed Packet
    (spec 1.5.4)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise MalformedPacket(f"{what} contains U+0000")
    return text


def _binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("binary field longer than 65,535 bytes")
    return len(data).to_bytes(2, "big") + data


def packet(first_byte: int, body: bytes) -> bytes:
    """Fixed header + body."""
    return bytes((first_byte,)) + encode_varint(len(body)) + body


@dataclass(frozen=True, slots=True)
class WillMessage:
    """The Last Will carried in CONNECT."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


def encode_connect(
    *,
    client_id: str,
    keepalive: int,
    v5: bool,
    username: str | None = None,
    password: str | None = None,
    will: WillMessage | None = None,
    max_packet_size: int | None = None,
) -> bytes:
    """CONNECT with a clean start (MQTT 5: session expiry 0, the default, so no property), and
    on MQTT 5 the Maximum Packet Size the client accepts (None: the protocol's own limit)."""
    flags = 0x02  # clean session / clean start: the SQLite outbox is the only queue
    payload = _string(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        if v5:
            payload += b"\x00"  # will properties: none
        payload += _string(will.topic) + _binary(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
    if password is not None:
        flags |= 0x40
        payload += _binary(password.encode())
    header = b"\x00\x04MQTT" + bytes((5 if v5 else 4, flags)) + keepalive.to_bytes(2, "big")
    if v5 and max_packet_size is not None:
        if not 1 <= max_packet_size <= MAX_PACKET_SIZE:
            raise ValueError(f"invalid Maximum Packet Size {max_packet_size}")
        header += b"\x05" + bytes((MAXIMUM_PACKET_SIZE,)) + max_packet_size.to_bytes(4, "big")
    elif v5:
        header += b"\x00"  # properties: none
    return packet(CONNECT, header + payload)


def publish_header(
    topic: bytes, payload_length: int, qos: int, retain: bool, mid: int, v5: bool
) -> bytes:
    """Everything of a PUBLISH before its payload (the payload is written as it is)."""
    variable = len(topic).to_bytes(2, "big") + topic
    if qos:
        variable += mid.to_bytes(2, "big")
    if v5:
        variable += b"\x00"  # properties: none
    remaining = len(variable) + payload_length
    first = PUBLISH | (qos << 1) | (1 if retain else 0)
    if remaining < 128:
        return bytes((first, remaining)) + variable
    return bytes((first,)) + encode_varint(remaining) + variable


def publish_size(topic_length: int, payload_length: int, qos: int, v5: bool) -> int:
    """The whole PUBLISH packet's size in bytes, as Maximum Packet Size counts it."""
    remaining = 2 + topic_length + (2 if qos else 0) + (1 if v5 else 0) + payload_length
    length_bytes = (
        1 if remaining < 0x80 else 2 if remaining < 0x4000 else 3 if remaining < 0x200000 else 4
    )
    return 1 + length_bytes + remaining


def encode_subscribe(
    mid: int,
    topic: str,
    qos: int,
    *,
    no_local: bool,
    v5: bool,
    retain_as_published: bool = False,
) -> bytes:
    """SUBSCRIBE of one topic filter (no_local and retain_as_published exist on MQTT 5 only)."""
    body = mid.to_bytes(2, "big")
    if v5:
        body += b"\x00"
        # Subscription options (spec 3.8.3.1): bit 2 No Local, bit 3 Retain As Published.
        options = qos | (0x04 if no_local else 0) | (0x08 if retain_as_published else 0)
    else:
        options = qos
    return packet(SUBSCRIBE | 0x02, body + _string(topic) + bytes((options,)))


def encode_unsubscribe(mid: int, topic: str, *, v5: bool) -> bytes:
    """UNSUBSCRIBE of one topic filter."""
    body = mid.to_bytes(2, "big") + (b"\x00" if v5 else b"")
    return packet(UNSUBSCRIBE | 0x02, body + _string(topic))


def encode_disconnect(reason_code: int) -> bytes:
    """MQTT 5 DISCONNECT with a reason code and no properties."""
    return bytes((DISCONNECT, 2, reason_code, 0))


def ack(first_byte: int, mid: int) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP with success (MQTT 5 allows leaving the reason out)."""
    return bytes((first_byte, 2, mid >> 8, mid & 0xFF))


def parse_properties(
    data: bytes | bytearray | memoryview, pos: int, end: int
) -> tuple[dict[int, object], int]:
    """MQTT 5 properties at `pos`: ({identifier: value}, position after them).

    User Properties (0x26) may repeat: their value is a tuple of (name, value) pairs, in order.
    """
    decoded = decode_varint(data, pos)
    if decoded is None or decoded[1] + decoded[0] > end:
        raise MalformedPacket("properties run past the packet")
    length, pos = decoded
    stop = pos + length

    def take(size: int) -> int:
        if pos + size > stop:
            raise MalformedPacket("property runs past the packet")
        return pos + size

    found: dict[int, object] = {}
    pairs: list[tuple[str, str]] = []
    while pos < stop:
        identifier = data[pos]
        pos += 1
        kind = _PROPERTY_TYPES.get(identifier)
        value: object
        if kind in _FIXED_SIZES:
            size = _FIXED_SIZES[kind]
            after = take(size)
            value = int.from_bytes(data[pos:after], "big")
            pos = after
        elif kind == _VARINT:
            number = decode_varint(data[:stop], pos)
            if number is None:
                raise MalformedPacket("property runs past the packet")
            value, pos = number
        elif kind in (_UTF8, _BINARY, _PAIR):
            strings = []
            for _ in range(2 if kind == _PAIR else 1):
                size = int.from_bytes(data[pos : take(2)], "big")
                pos += 2
                after = take(size)
                strings.append(bytes(data[pos:after]))
                pos = after
            if kind == _PAIR:
                name, text = (decode_utf8(raw, "user property") for raw in strings)
                pairs.append((name, text))
                continue
            # A reason string is only shown: a broken one is kept readable, not refused.
            value = strings[0].decode(errors="replace") if kind == _UTF8 else strings[0]
        else:
            raise MalformedPacket(f"unknown property 0x{identifier:02X}")
        found[identifier] = value
    if pairs:
        found[USER_PROPERTY] = tuple(pairs)
    return found, stop


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches a subscription filter with `+` and `#` (spec 4.7)."""
    if topic_filter == topic:
        return True
    # Wildcards at the first level never match topics starting with "$" (e.g. $SYS).
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


def check_incoming_topic(topic: str) -> None:
    """Raise ProtocolError for a topic a broker may not deliver (empty, wildcard; spec
    3.3.2.1): this client allows no Topic Alias, so every PUBLISH names its topic."""
    if not topic:
        raise ProtocolError("PUBLISH with an empty topic and no topic alias allowed")
    if "+" in topic or "#" in topic:
        raise ProtocolError(f"PUBLISH topic {topic!r} contains a wildcard")


def check_topic_name(topic: str) -> None:
    """Raise ValueError for a topic that may not be published to (empty, wildcard, NUL)."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise ValueError(f"invalid topic name to publish to: {topic!r}")
