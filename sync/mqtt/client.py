"""The one MQTT client of the project: MQTT 5 (or 3.1.1) spoken directly on an asyncio transport.

Why not paho-mqtt, which the project used first: the live path publishes every changed value
as its own retained QoS 1 message (docs/topics.md), and paho spent ~45 µs of CPU on each one
here (a socket send per packet, an MQTTMessageInfo with a threading.Condition per publish,
MQTT 5 Properties and ReasonCode objects built for every PUBACK). That was two thirds of the
agent's CPU per OPC UA value. Here a publish is a few bytes concatenated onto the connection's
write list, flushed once per event-loop turn in one `transport.write`, and a PUBACK is four
bytes read in place. Tests check this client against mosquitto and against paho as an
independent peer.

Where things are: the packets in `wire` (pure functions, table-tested); one connection, its
framing and buffered writes in `connection`; the QoS 1 in-flight window (Receive Maximum,
`bulk_reserve`) in `window`; incoming packets in `dispatch`; subscriptions in `subscriptions`;
connecting, keep-alive and reconnecting in `link`, to the `endpoint`; the values handed out in
`types`, the errors in `errors`. This module is the API, and every name users import is here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from sync.mqtt import wire
from sync.mqtt.connection import Connection
from sync.mqtt.dispatch import PacketDispatcher
from sync.mqtt.endpoint import Endpoint
from sync.mqtt.errors import ConnectionLost, MessageTooLarge, NotConnected, PublishRejected
from sync.mqtt.link import STABLE_AFTER, BrokerLink
from sync.mqtt.refusals import RefusalLog
from sync.mqtt.subscriptions import Subscription, Subscriptions
from sync.mqtt.types import (
    ConnectionListener,
    Message,
    MessageHandler,
    MqttStats,
    ProtocolChoice,
    TlsOptions,
    Will,
)
from sync.mqtt.window import InflightWindow, bulk_reserve

log = logging.getLogger("edge_agent.mqtt")

__all__ = [
    "ConnectionListener",
    "ConnectionLost",
    "Message",
    "MessageHandler",
    "MessageTooLarge",
    "MqttClient",
    "MqttStats",
    "NotConnected",
    "ProtocolChoice",
    "PublishRejected",
    "TlsOptions",
    "Will",
    "bulk_reserve",
]


class MqttClient:
    """An always-reconnecting MQTT 5 / 3.1.1 client; use as ``async with MqttClient(...)``."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
        keepalive: float = 30.0,
        will: Will | None = None,
        birth: Will | None = None,
        max_inflight: int = 1000,
        reconnect_min: float = 0.5,
        reconnect_max: float = 10.0,
        connect_timeout: float = 10.0,
        protocol: ProtocolChoice = "auto",
        max_packet_size: int = wire.MAX_PACKET_SIZE,
        stable_after: float = STABLE_AFTER,
        name: str = "mqtt",
    ) -> None:
        endpoint = Endpoint(
            host=host,
            port=port,
            client_id=client_id,
            username=username,
            password=password,
            tls=tls,
            keepalive=keepalive,
            will=will,
            protocol=protocol,
            connect_timeout=connect_timeout,
            max_packet_size=max_packet_size,
        )
        self.stats = MqttStats()
        self._client_id = client_id
        self._name = name
        self._max_packet_size = endpoint.max_packet_size
        self._birth = birth
        self._window = InflightWindow(
            max_inflight=max_inflight,
            stats=self.stats,
            refusals=RefusalLog(stats=self.stats, name=name),
        )
        self._link = BrokerLink(
            endpoint=endpoint,
            owner=self,
            window=self._window,
            stats=self.stats,
            on_up=self._connected,
            reconnect_min=reconnect_min,
            reconnect_max=reconnect_max,
            stable_after=stable_after,
            name=name,
        )
        self._subscriptions = Subscriptions(name=name)
        self._dispatcher = PacketDispatcher(
            subscriptions=self._subscriptions,
            on_connack=self._link.on_connack,
            on_disconnect=self._link.on_disconnect,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._topic_bytes: dict[str, bytes] = {}
        self._downgrade_warned = False  # retain or QoS lowered to the broker's limits
        self._link.add_listener(self._on_link)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._link.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, *, final_publish: tuple[str, bytes, bool] | None = None) -> None:
        """Stop reconnecting; publish `final_publish` (e.g. status offline) and DISCONNECT."""
        await self._link.stop()
        if final_publish is not None and self.is_connected:
            topic, payload, retain = final_publish
            with contextlib.suppress(NotConnected, ConnectionLost, TimeoutError):
                future = self.publish_acked(topic, payload, qos=1, retain=retain)
                await asyncio.wait_for(future, timeout=2.0)
        self._link.disconnect()

    @property
    def client_id(self) -> str:
        """The MQTT client identifier."""
        return self._client_id

    @property
    def is_connected(self) -> bool:
        """Whether a connection is up (CONNACK received)."""
        return self._link.connected.is_set()

    async def wait_connected(self) -> None:
        """Wait until connected (wrap in ``asyncio.timeout`` for a deadline)."""
        await self._link.connected.wait()

    @property
    def max_packet_size(self) -> int:
        """The largest packet taken from the broker (announced in CONNECT on MQTT 5)."""
        return self._max_packet_size

    @property
    def broker_max_packet_size(self) -> int | None:
        """The broker's Maximum Packet Size (MQTT 5 CONNACK) on the current connection; None
        when it announced none (or on MQTT 3.1.1, or before the first CONNACK)."""
        return self._link.broker_max_packet_size

    @property
    def protocol_version(self) -> str | None:
        """The MQTT version the broker accepted ("5" or "3.1.1"); None before the first
        CONNACK."""
        return self._link.protocol_in_use

    @property
    def retain_available(self) -> bool:
        """Whether the broker takes retained messages (MQTT 5 CONNACK; True on 3.1.1)."""
        return self._link.retain_available

    @property
    def maximum_qos(self) -> int:
        """The highest QoS the broker takes in a PUBLISH (MQTT 5 CONNACK; 2 on 3.1.1)."""
        return self._link.maximum_qos

    @property
    def refused_subscriptions(self) -> dict[str, str]:
        """Topic filters the broker refused on this connection, with its reason."""
        return dict(self._subscriptions.refused)

    def is_subscribed(self, topic: str) -> bool:
        """Whether the broker granted the subscription to `topic` on this connection."""
        return self._subscriptions.is_granted(topic)

    async def wait_subscribed(self, topic: str) -> None:
        """Wait until the broker granted the subscription to `topic` (wrap in a timeout)."""
        await self._subscriptions.wait_granted(topic)

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt failed or the connection was lost."""
        return self._link.last_error

    def add_listener(self, listener: ConnectionListener) -> None:
        """Call `listener(True)` on every connect and `listener(False)` on every loss."""
        self._link.add_listener(listener)

    def remove_listener(self, listener: ConnectionListener) -> None:
        """Stop calling `listener`."""
        self._link.remove_listener(listener)

    def subscribe(
        self,
        topic: str,
        handler: MessageHandler,
        *,
        qos: int = 1,
        no_local: bool = False,
        retain_as_published: bool = False,
    ) -> None:
        """Subscribe now (when connected) and again after every reconnect.

        `Message.retain` of what arrives: a message sent because this subscription was made
        (the broker's stored copy) has RETAIN set. A live one has it cleared by the broker,
        unless `retain_as_published` (MQTT 5 subscription option, spec 3.8.3.1) asks for the
        flag as the publisher set it. MQTT 3.1.1 has no such option: there the option is not
        sent, and only the stored copies arrive with RETAIN set.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"invalid QoS {qos}")
        subscription = Subscription(topic, qos, handler, no_local, retain_as_published)
        self._subscriptions.add(subscription)
        connection = self._link.connection
        if connection is not None and self.is_connected:
            self._subscriptions.subscribe(
                connection, subscription, shared_allowed=self._link.shared_subscriptions
            )

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription (now and for later reconnects)."""
        self._subscriptions.remove(topic)
        connection = self._link.connection
        if connection is not None and self.is_connected:
            self._subscriptions.unsubscribe(connection, topic)

    # -- the in-flight window ----------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """QoS 1 messages sent and not yet acknowledged by the broker (PUBACK)."""
        return self._window.inflight

    @property
    def window(self) -> int:
        """QoS 1 messages allowed in flight on this connection: min(max_inflight, Receive
        Maximum of the broker's CONNACK)."""
        return self._window.size

    @property
    def has_space(self) -> bool:
        """Whether another QoS 1 message would be sent at once (the window has room)."""
        return self._window.free_slots > 0

    @property
    def free_slots(self) -> int:
        """QoS 1 messages that would be sent at once (window minus in flight and queued)."""
        return self._window.free_slots

    async def wait_acked(self) -> None:
        """Wait until nothing is in flight (every QoS 1 message acknowledged or lost)."""
        await self._window.wait_idle()

    async def wait_space(self, free: int = 1) -> None:
        """Wait until the in-flight window has `free` slots (or the connection is lost)."""
        while self._window.free_slots < free and self.is_connected:
            await self._window.wait_freed()

    @property
    def bulk_room(self) -> int:
        """How many QoS 1 messages an owner of bulk data may send now, leaving
        `bulk_reserve(window)` slots to the others."""
        return self._window.bulk_room

    @property
    def has_bulk_room(self) -> bool:
        """Whether an owner of bulk data may send one more QoS 1 message now."""
        return self._window.bulk_room > 0

    async def wait_bulk_room(self) -> None:
        """Wait until `has_bulk_room` (or the connection is lost)."""
        await self.wait_space(bulk_reserve(self._window.size) + 1)

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Send a message now (fire and forget; it still counts in the in-flight window).

        Raises NotConnected when there is no connection: nothing is queued anywhere; and
        MessageTooLarge when the packet exceeds `broker_max_packet_size`.
        """
        self._send(topic, payload, qos, retain, None)

    def publish_many(
        self, messages: Sequence[tuple[str, bytes]], *, retain: bool
    ) -> list[tuple[str, MessageTooLarge]]:
        """Send QoS 1 messages now, fire and forget, in order: `publish` for a batch (what the
        window does not let out waits in its queue). Returns the messages not sent because
        they are larger than the broker takes, with why; raises NotConnected like `publish`.
        """
        connection = self._connection_up()
        qos = 1
        if self._beyond_limits(retain, qos):
            # The broker's limits (rare): one message at a time, downgraded as `publish` does.
            return self._publish_each(messages, retain)
        too_large: list[tuple[str, MessageTooLarge]] = []
        packets: list[tuple[bytes, bytes]] = []
        for topic, payload in messages:
            topic_bytes = self._topic_name(topic)
            try:
                self._check_size(topic, topic_bytes, payload, qos, connection)
            except MessageTooLarge as exc:
                too_large.append((topic, exc))
                continue
            packets.append((topic_bytes, payload))
        self._window.submit_many(connection, packets, retain)
        return too_large

    def _publish_each(
        self, messages: Sequence[tuple[str, bytes]], retain: bool
    ) -> list[tuple[str, MessageTooLarge]]:
        too_large: list[tuple[str, MessageTooLarge]] = []
        for topic, payload in messages:
            try:
                self._send(topic, payload, 1, retain, None)
            except MessageTooLarge as exc:
                too_large.append((topic, exc))
        return too_large

    def publish_acked(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Send a message now; the future resolves on PUBACK or fails with ConnectionLost, or
        with PublishRejected: the broker refused it, or (MessageTooLarge) it would have."""
        loop = self._loop
        if loop is None:
            raise NotConnected("client not started")
        future: asyncio.Future[None] = loop.create_future()
        try:
            self._send(topic, payload, qos, retain, future)
        except MessageTooLarge as exc:
            # Reported like the broker's own refusal, which its owner handles already.
            future.set_exception(exc)
        return future

    def _send(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        future: asyncio.Future[None] | None,
    ) -> None:
        connection = self._connection_up()
        topic_bytes = self._topic_name(topic)
        if qos not in (0, 1):
            raise ValueError("only QoS 0 and 1 are published by this client")
        if self._beyond_limits(retain, qos):
            # The broker would disconnect us for it (MQTT 5, 3.3.1.3 and 3.2.2.3.4).
            retain, qos = self._downgrade(topic, retain, qos)
        self._check_size(topic, topic_bytes, payload, qos, connection)
        if qos == 0:
            connection.write(
                wire.publish_header(topic_bytes, len(payload), 0, retain, 0, connection.v5)
                + payload
            )
            self.stats.published += 1
            if future is not None:
                future.set_result(None)
            return
        self._window.submit(connection, topic_bytes, payload, retain, future)

    def _connection_up(self) -> Connection:
        link = self._link
        connection = link.connection
        if connection is None or connection.closed or not link.connected.is_set():
            raise NotConnected(link.last_error or "not connected")
        return connection

    def _topic_name(self, topic: str) -> bytes:
        """A topic's bytes, checked once and then cached (topics come from config)."""
        topic_bytes = self._topic_bytes.get(topic)
        if topic_bytes is not None:
            return topic_bytes
        wire.check_topic_name(topic)
        topic_bytes = topic.encode()
        if len(topic_bytes) > 0xFFFF:
            raise ValueError("topic longer than 65,535 bytes")
        if len(self._topic_bytes) >= 65536:
            self._topic_bytes.clear()  # bounded: topics come from config, a few thousand
        self._topic_bytes[topic] = topic_bytes
        return topic_bytes

    def _check_size(
        self, topic: str, topic_bytes: bytes, payload: bytes, qos: int, connection: Connection
    ) -> None:
        if len(payload) > wire.MAX_REMAINING_LENGTH - len(topic_bytes) - 8:
            raise ValueError(f"payload of {len(payload)} bytes is too large for MQTT")
        limit = self._link.broker_max_packet_size
        if limit is not None and len(payload) + len(topic_bytes) + 10 > limit:
            # The broker would disconnect us for it (MQTT 5, 3.2.2.3.6): refuse it here.
            size = wire.publish_size(len(topic_bytes), len(payload), qos, connection.v5)
            if size > limit:
                raise MessageTooLarge(
                    f"message to {topic} of {size} bytes is larger than the broker's "
                    f"Maximum Packet Size ({limit} bytes)"
                )

    def _beyond_limits(self, retain: bool, qos: int) -> bool:
        # The broker's Retain Available and Maximum QoS (CONNACK); `_downgrade` applies them.
        link = self._link
        return (retain and not link.retain_available) or qos > link.maximum_qos

    def _downgrade(self, topic: str, retain: bool, qos: int) -> tuple[bool, int]:
        link = self._link
        if not self._downgrade_warned:
            self._downgrade_warned = True  # once: every live value would log
            what = []
            if retain and not link.retain_available:
                what.append(
                    "without retain (the broker's Retain Available is 0: a subscriber "
                    "sees a value only once it changes)"
                )
            if qos > link.maximum_qos:
                what.append(f"at QoS {link.maximum_qos} (the broker's Maximum QoS)")
            log.warning("%s: publishing %s, first to %s", self._name, " and ".join(what), topic)
        return retain and link.retain_available, min(qos, link.maximum_qos)

    # -- the link's and the connection's callbacks --------------------------------------------

    def _on_link(self, up: bool) -> None:
        if not up:
            self._subscriptions.connection_lost()

    def _connected(self, connection: Connection) -> None:
        # A new connection knows no subscriptions (clean start); the birth message follows.
        self._subscriptions.subscribe_all(
            connection, shared_allowed=self._link.shared_subscriptions
        )
        if self._birth is not None:
            try:
                self.publish(
                    self._birth.topic,
                    self._birth.payload(),
                    qos=self._birth.qos,
                    retain=self._birth.retain,
                )
            except NotConnected:
                pass
            except MessageTooLarge as exc:
                log.warning("%s: birth message not sent: %s", self._name, exc)

    def _on_pubacks(self, acks: list[tuple[int, int]]) -> None:
        self._window.acknowledge(acks)

    def _on_packet(self, connection: Connection, first: int, body: memoryview) -> None:
        self._dispatcher.dispatch(connection, first, body)

    def _mark_lost(self, connection: Connection, reason: str) -> None:
        self._link.mark_lost(connection, reason)

    @property
    def _connection(self) -> Connection | None:
        """The current connection (tests cut its socket, or attach one of their own)."""
        return self._link.connection

    @_connection.setter
    def _connection(self, connection: Connection | None) -> None:
        self._link.connection = connection
