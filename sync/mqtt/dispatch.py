"""Incoming packets other than PUBACK (which the connection hands straight to the in-flight
window): parsed here and passed to what handles them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sync.mqtt import wire
from sync.mqtt.connection import Connection
from sync.mqtt.subscriptions import Subscriptions
from sync.mqtt.types import Message


@dataclass(frozen=True, slots=True)
class Connack:
    """The broker's answer to CONNECT: its reason code and the limits it sets (MQTT 5)."""

    code: int
    session_present: bool = False
    server_keepalive: int | None = None  # overrides ours (MQTT 5, 3.2.2.3.14)
    receive_maximum: int | None = None  # QoS 1 messages it takes unacknowledged
    maximum_packet_size: int | None = None  # the largest packet it takes (None: no limit)
    maximum_qos: int = 2  # the highest QoS it takes in a PUBLISH (3.2.2.3.4)
    retain_available: bool = True  # whether it takes retained messages (3.2.2.3.5)
    shared_subscriptions: bool = True  # whether it takes $share/ filters (3.2.2.3.13)
    reason_string: str | None = None  # why it refused, when it says


def _flag(properties: dict[int, object], identifier: int, name: str) -> bool:
    value = properties.get(identifier, 1)
    if value not in (0, 1):  # a protocol error (MQTT 5, 3.2.2.3.5, 3.2.2.3.11-13)
        raise wire.ProtocolError(f"CONNACK with {name} {value}")
    return value == 1


def parse_connack(body: memoryview, *, v5: bool) -> Connack:
    """The CONNACK body: session present, reason code and, for MQTT 5, the properties the
    client uses."""
    if len(body) < 2:
        raise wire.MalformedPacket("CONNACK too short")
    if body[0] & 0xFE:
        raise wire.MalformedPacket("CONNACK with reserved flags set")
    session_present = bool(body[0] & 0x01)
    code = body[1]
    if not v5 or len(body) <= 2:
        return Connack(code, session_present)
    properties, _ = wire.parse_properties(body, 2, len(body))
    keepalive = properties.get(wire.SERVER_KEEP_ALIVE)
    receive_maximum = properties.get(wire.RECEIVE_MAXIMUM)
    if receive_maximum == 0:  # a protocol error (MQTT 5, 3.2.2.3.3)
        raise wire.ProtocolError("CONNACK with Receive Maximum 0")
    maximum_packet_size = properties.get(wire.MAXIMUM_PACKET_SIZE)
    if maximum_packet_size == 0:  # a protocol error (MQTT 5, 3.2.2.3.6)
        raise wire.ProtocolError("CONNACK with Maximum Packet Size 0")
    maximum_qos = properties.get(wire.MAXIMUM_QOS, 2)  # absent: every QoS
    if wire.MAXIMUM_QOS in properties and maximum_qos not in (0, 1):
        raise wire.ProtocolError(f"CONNACK with Maximum QoS {maximum_qos}")  # 3.2.2.3.4
    detail = properties.get(wire.REASON_STRING)
    return Connack(
        code,
        session_present,
        server_keepalive=keepalive if isinstance(keepalive, int) and keepalive > 0 else None,
        receive_maximum=receive_maximum if isinstance(receive_maximum, int) else None,
        maximum_packet_size=(maximum_packet_size if isinstance(maximum_packet_size, int) else None),
        maximum_qos=maximum_qos if isinstance(maximum_qos, int) else 2,
        retain_available=_flag(properties, wire.RETAIN_AVAILABLE, "Retain Available"),
        shared_subscriptions=_flag(
            properties, wire.SHARED_SUBSCRIPTION_AVAILABLE, "Shared Subscription Available"
        ),
        reason_string=detail if isinstance(detail, str) and detail else None,
    )


def parse_publish(first: int, body: memoryview, *, v5: bool) -> tuple[Message, int]:
    """An incoming PUBLISH: the message and its packet identifier (0 for QoS 0).

    A topic no handler may see (not UTF-8, a U+0000, a wildcard, empty) makes the packet
    malformed: a reply topic built from it would be invalid too (docs/workflows.md).
    """
    qos = (first >> 1) & 0x03
    if qos == 3 or len(body) < 2:
        raise wire.MalformedPacket("invalid PUBLISH")
    topic_end = 2 + ((body[0] << 8) | body[1])
    if topic_end > len(body):
        raise wire.MalformedPacket("PUBLISH topic runs past the packet")
    topic = wire.decode_utf8(bytes(body[2:topic_end]), "PUBLISH topic")
    wire.check_incoming_topic(topic)
    pos = topic_end
    mid = 0
    if qos:
        if pos + 2 > len(body):
            raise wire.MalformedPacket("PUBLISH without a packet identifier")
        mid = (body[pos] << 8) | body[pos + 1]
        pos += 2
    user_properties: tuple[tuple[str, str], ...] = ()
    if v5:
        properties, pos = wire.parse_properties(body, pos, len(body))
        if wire.TOPIC_ALIAS in properties:
            # We announce no Topic Alias Maximum, i.e. 0: any alias is a protocol error.
            raise wire.ProtocolError("PUBLISH with a topic alias, which this client never allows")
        pairs = properties.get(wire.USER_PROPERTY)
        if isinstance(pairs, tuple):
            user_properties = pairs
    message = Message(topic, bytes(body[pos:]), qos, bool(first & 0x01), user_properties)
    return message, mid


def disconnect_reason(body: memoryview, *, v5: bool) -> str:
    """Why the broker sent DISCONNECT: the reason code's name and its reason string, if any."""
    reason = wire.reason_name(body[0]) if len(body) >= 1 else "Normal disconnection"
    if len(body) > 1 and v5:
        properties, _ = wire.parse_properties(body, 1, len(body))
        detail = properties.get(wire.REASON_STRING)
        if isinstance(detail, str) and detail:
            reason = f"{reason} ({detail})"
    return reason


class PacketDispatcher:
    """Routes every incoming packet but PUBACK: messages to the subscriptions, CONNACK and
    DISCONNECT to the link (`sync.mqtt.link`), the QoS 2 handshake and PINGRESP answered here."""

    def __init__(
        self,
        *,
        subscriptions: Subscriptions,
        on_connack: Callable[[Connack], None],
        on_disconnect: Callable[[Connection, int, str], None],
    ) -> None:
        self._subscriptions = subscriptions
        self._on_connack = on_connack
        self._on_disconnect = on_disconnect

    def dispatch(self, connection: Connection, first: int, body: memoryview) -> None:
        """Handle one packet; raises MalformedPacket for one a broker may not send."""
        kind = first & 0xF0
        if kind == wire.PUBLISH:
            self._on_publish(connection, first, body)
        elif kind == wire.CONNACK:
            self._on_connack(parse_connack(body, v5=connection.v5))
        elif kind == wire.PINGRESP:
            connection.ping_sent = None
        elif kind == wire.SUBACK:
            self._subscriptions.on_suback(connection, body)
        elif kind == wire.UNSUBACK:
            self._subscriptions.on_unsuback(connection, body)
        elif kind == wire.PUBREL:  # the broker's QoS 2 handshake, step 3 of 4
            if len(body) < 2:
                raise wire.MalformedPacket("PUBREL without a packet identifier")
            mid = (body[0] << 8) | body[1]
            connection.incoming_qos2.discard(mid)
            connection.write(wire.ack(wire.PUBCOMP, mid))
        elif kind == wire.DISCONNECT:
            code = body[0] if len(body) >= 1 else 0
            self._on_disconnect(connection, code, disconnect_reason(body, v5=connection.v5))
        elif kind == wire.PUBACK:
            raise wire.MalformedPacket("PUBACK shorter than a packet identifier")
        elif kind in (wire.PUBREC, wire.PUBCOMP, wire.AUTH):
            raise wire.ProtocolError(f"unexpected packet type {kind >> 4}")
        else:
            raise wire.ProtocolError(f"packet type {kind >> 4} is not sent by a broker")

    def _on_publish(self, connection: Connection, first: int, body: memoryview) -> None:
        message, mid = parse_publish(first, body, v5=connection.v5)
        if message.qos == 1:
            connection.write(wire.ack(wire.PUBACK, mid))
        elif message.qos == 2:
            connection.write(wire.ack(wire.PUBREC, mid))
            if mid in connection.incoming_qos2:
                return  # a re-sent QoS 2 message we already delivered
            connection.incoming_qos2.add(mid)
        self._subscriptions.deliver(message)
