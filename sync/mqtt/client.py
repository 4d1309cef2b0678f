"""The one MQTT client of the project: MQTT 5 (or 3.1.1) spoken directly on an asyncio transport.

Why not paho-mqtt, which the project used first: the live path publishes every changed value
as its own retained QoS 1 message (design §5), and paho spent ~45 µs of CPU on each one here
(a socket send per packet, an MQTTMessageInfo with a threading.Condition per publish, MQTT 5
Properties and ReasonCode objects built for every PUBACK). That was two thirds of the agent's
CPU per OPC UA value. Here a publish is a few bytes concatenated onto the connection's write
list, flushed once per event-loop turn in one `transport.write`, and a PUBACK is four bytes
read in place. The packets are in `sync.mqtt.wire` (pure functions, table-tested); tests
check this client against mosquitto and against paho as an independent peer.

Flow control: an MQTT 5 broker announces in its CONNACK how many QoS 1 messages it takes
unacknowledged (Receive Maximum; mosquitto sends its `max_inflight_messages`, 20 by default,
EMQX its `max_inflight`, HiveMQ 10), and EMQX and HiveMQ disconnect a client that sends more
(0x93). The window is therefore min(max_inflight, Receive Maximum) per connection; a QoS 1
publish beyond it waits in a small queue inside the client (in order) until a PUBACK frees
a slot. The owners of bulk data (live publisher, forwarder) wait for `has_bulk_room` first,
so the queue only holds the occasional acknowledgement or reply, and each of them leaves
`bulk_reserve(window)` slots to the others.

Why a fresh connection state per connection: the SQLite outbox is the only queue of this
project, so every connection starts empty (clean start, session expiry 0) and the owners of
the data (forwarder, live publisher) decide what to send again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from sync.mqtt import wire
from sync.mqtt.errors import ConnectionLost, NotConnected, PublishRejected, describe_error
from sync.mqtt.types import (
    ConnectionListener,
    Message,
    MessageHandler,
    MqttStats,
    TlsOptions,
    Will,
)

log = logging.getLogger("edge_agent.mqtt")


def bulk_reserve(window: int) -> int:
    """In-flight slots each owner of bulk data leaves to the others: an eighth of the window.

    The live publisher and the forwarder both fill the window as fast as PUBACKs free it; a
    line whose values change faster than the broker acknowledges would otherwise take every
    slot the moment it frees, and the durable path (or the live one, during a backlog drain)
    would wait behind the other.
    """
    return window // 8


@dataclass(slots=True)
class _Subscription:
    topic: str
    qos: int
    handler: MessageHandler
    no_local: bool = False


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: packet framing, the write list and keep-alive clocks."""

    def __init__(self, owner: MqttClient, loop: asyncio.AbstractEventLoop, *, v5: bool) -> None:
        self.owner = owner
        self.loop = loop
        self.v5 = v5
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.closed = False
        now = time.monotonic()
        self.last_in = now
        self.last_out = now
        self.ping_sent: float | None = None
        self.next_mid = 0

    # asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_in = time.monotonic()
        buffer = self.buffer
        buffer += data
        owner = self.owner
        size = len(buffer)
        pos = 0
        try:
            while size - pos >= 2:
                first = buffer[pos]
                # The remaining length: one byte for every packet this client sees often.
                length = buffer[pos + 1]
                start = pos + 2
                if length >= 0x80:
                    decoded = wire.decode_varint(buffer, pos + 1)
                    if decoded is None:
                        break
                    length, start = decoded
                end = start + length
                if end > size:
                    break
                if first == wire.PUBACK and length >= 2:
                    # The hot path: one PUBACK per QoS 1 publish.
                    reason = buffer[start + 2] if length > 2 and self.v5 else 0
                    owner._on_puback((buffer[start] << 8) | buffer[start + 1], reason)
                else:
                    # A copy: a view into `buffer` would pin it against the `del` below.
                    owner._on_packet(self, first, memoryview(bytes(memoryview(buffer)[start:end])))
                pos = end
                if self.closed:
                    return
        except (ValueError, IndexError) as exc:  # MalformedPacket, or a field cut short
            owner._mark_lost(self, f"malformed packet from the broker: {exc}")
            return
        if pos:
            del buffer[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = "connection closed by the broker" if exc is None else describe_error(exc)
        self.owner._mark_lost(self, reason)

    # writing --------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue bytes; everything queued in one loop turn goes out in one send."""
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand the queued bytes to the transport."""
        self.flush_scheduled = False
        out, self.out = self.out, []
        transport = self.transport
        if not out or transport is None or self.closed or transport.is_closing():
            return
        transport.write(b"".join(out) if len(out) > 1 else out[0])
        self.last_out = time.monotonic()

    def new_mid(self) -> int:
        """The next free 16-bit packet identifier (never 0), unique across PUBLISH (QoS 1),
        SUBSCRIBE and UNSUBSCRIBE in flight, as the spec requires."""
        pending = self.owner._pending
        control = self.owner._control
        mid = self.next_mid
        while True:
            mid = mid % 0xFFFF + 1
            if mid not in pending and mid not in control:
                self.next_mid = mid
                return mid

    def abort(self) -> None:
        """Drop the connection now (no flush)."""
        self.closed = True
        self.out = []
        if self.transport is not None:
            self.transport.abort()

    def socket(self) -> Any:
        """The underlying socket (tests shut it down to simulate a dead TCP connection)."""
        return None if self.transport is None else self.transport.get_extra_info("socket")


class MqttClient:
    """An always-reconnecting MQTT 5 client; use as ``async with MqttClient(...) as client``."""

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
        protocol: int = 5,
        name: str = "mqtt",
    ) -> None:
        if not host:
            raise ValueError("host is required")
        if not 0 < port < 65536:
            raise ValueError(f"invalid port {port}")
        if not 1 <= max_inflight <= 20000:
            # QoS 1 packet identifiers are 16-bit: the window must stay well inside 65,535.
            raise ValueError("max_inflight must be 1..20000")
        if not 0 < reconnect_min <= reconnect_max:
            raise ValueError("need 0 < reconnect_min <= reconnect_max")
        if protocol not in (4, 5):
            raise ValueError("protocol must be 4 (MQTT 3.1.1) or 5")
        self._host = host
        self._port = port
        self._client_id = client_id
        self._username = username
        self._password = password
        self._tls_context = tls.context() if tls is not None else None
        self._keepalive = max(5, int(keepalive))
        self._will = will
        self._birth = birth
        self._max_inflight = max_inflight
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self._connect_timeout = connect_timeout
        self._name = name
        # MQTT 5 is needed for shared subscriptions and for reason codes on PUBACK (a broker
        # that refuses a message says so); 3.1.1 stays available for old brokers.
        self._v5 = protocol == 5
        self._subscriptions: list[_Subscription] = []
        self._listeners: list[ConnectionListener] = []
        self._connection: _Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task[None] | None = None
        self._misc: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._pending: dict[int, asyncio.Future[None] | None] = {}
        self._control: dict[int, str] = {}  # SUBSCRIBE/UNSUBSCRIBE packet id -> topic filter
        self._incoming_qos2: set[int] = set()
        self._inflight = 0
        self._window = max_inflight  # min(max_inflight, the broker's Receive Maximum)
        # QoS 1 publishes beyond the window, in order: (topic, payload, retain, future).
        self._queued: deque[tuple[bytes, bytes, bool, asyncio.Future[None] | None]] = deque()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_error: str | None = None
        self._up_logged = False
        self._connack: asyncio.Future[int] | None = None
        self._active_keepalive = self._keepalive  # the broker's Server Keep Alive may lower it
        self._connack_detail: str | None = None  # MQTT 5 reason string of a refused CONNECT
        self._topic_bytes: dict[str, bytes] = {}
        self.stats = MqttStats()

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._runner = asyncio.create_task(self._run(), name=f"{self._name}-connection")
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
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.wait([runner])  # not `await runner`: our own cancellation must pass
        connection = self._connection
        if connection is not None and self._connected.is_set():
            if final_publish is not None:
                topic, payload, retain = final_publish
                with contextlib.suppress(NotConnected, ConnectionLost, TimeoutError):
                    future = self.publish_acked(topic, payload, qos=1, retain=retain)
                    await asyncio.wait_for(future, timeout=2.0)
            if not connection.closed and connection.transport is not None:
                # DISCONNECT: the broker discards the Last Will. close() sends what is
                # buffered before it closes the socket.
                connection.write(wire.DISCONNECT_PACKET)
                connection.flush()
                connection.closed = True
                connection.transport.close()
        self._teardown(connection, reason="closed")

    @property
    def client_id(self) -> str:
        """The MQTT client identifier."""
        return self._client_id

    @property
    def is_connected(self) -> bool:
        """Whether a connection is up (CONNACK received)."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Wait until connected (wrap in ``asyncio.timeout`` for a deadline)."""
        await self._connected.wait()

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt failed or the connection was lost."""
        return self._last_error

    def add_listener(self, listener: ConnectionListener) -> None:
        """Call `listener(True)` on every connect and `listener(False)` on every loss."""
        self._listeners.append(listener)

    def remove_listener(self, listener: ConnectionListener) -> None:
        """Stop calling `listener`."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def subscribe(
        self, topic: str, handler: MessageHandler, *, qos: int = 1, no_local: bool = False
    ) -> None:
        """Subscribe now (when connected) and again after every reconnect."""
        if qos not in (0, 1, 2):
            raise ValueError(f"invalid QoS {qos}")
        subscription = _Subscription(topic, qos, handler, no_local)
        self._subscriptions.append(subscription)
        if self._connection is not None and self.is_connected:
            self._subscribe(self._connection, subscription)

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription (now and for later reconnects)."""
        self._subscriptions = [sub for sub in self._subscriptions if sub.topic != topic]
        connection = self._connection
        if connection is not None and self.is_connected:
            mid = connection.new_mid()
            self._control[mid] = topic
            connection.write(wire.encode_unsubscribe(mid, topic, v5=self._v5))

    # -- publishing ----------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """QoS 1 messages sent and not yet acknowledged by the broker (PUBACK)."""
        return self._inflight

    @property
    def window(self) -> int:
        """QoS 1 messages allowed in flight on this connection: min(max_inflight, Receive
        Maximum of the broker's CONNACK)."""
        return self._window

    @property
    def has_space(self) -> bool:
        """Whether another QoS 1 message would be sent at once (the window has room)."""
        return self.free_slots > 0

    @property
    def free_slots(self) -> int:
        """QoS 1 messages that would be sent at once (window minus in flight and queued)."""
        return self._window - self._inflight - len(self._queued)

    async def wait_acked(self) -> None:
        """Wait until nothing is in flight (every QoS 1 message acknowledged or lost)."""
        await self._idle.wait()

    async def wait_space(self, free: int = 1) -> None:
        """Wait until the in-flight window has `free` slots (or the connection is lost)."""
        while self.free_slots < free and self.is_connected:
            self._space.clear()
            await self._space.wait()

    @property
    def has_bulk_room(self) -> bool:
        """Whether an owner of bulk data may send one more QoS 1 message now, leaving
        `bulk_reserve(window)` slots to the others."""
        return self.free_slots > bulk_reserve(self._window)

    async def wait_bulk_room(self) -> None:
        """Wait until `has_bulk_room` (or the connection is lost)."""
        await self.wait_space(bulk_reserve(self._window) + 1)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Send a message now (fire and forget; it still counts in the in-flight window).

        Raises NotConnected when there is no connection: nothing is queued anywhere.
        """
        self._send(topic, payload, qos, retain, None)

    def publish_acked(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Send a message now; the future resolves on PUBACK or fails with ConnectionLost."""
        loop = self._loop
        if loop is None:
            raise NotConnected("client not started")
        future: asyncio.Future[None] = loop.create_future()
        self._send(topic, payload, qos, retain, future)
        return future

    def _send(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        future: asyncio.Future[None] | None,
    ) -> None:
        connection = self._connection
        if connection is None or connection.closed or not self._connected.is_set():
            raise NotConnected(self._last_error or "not connected")
        topic_bytes = self._topic_bytes.get(topic)
        if topic_bytes is None:
            wire.check_topic_name(topic)
            topic_bytes = topic.encode()
            if len(topic_bytes) > 0xFFFF:
                raise ValueError("topic longer than 65,535 bytes")
            if len(self._topic_bytes) >= 65536:
                self._topic_bytes.clear()  # bounded: topics come from config, a few thousand
            self._topic_bytes[topic] = topic_bytes
        if qos not in (0, 1):
            raise ValueError("only QoS 0 and 1 are published by this client")
        if len(payload) > wire.MAX_REMAINING_LENGTH - len(topic_bytes) - 8:
            raise ValueError(f"payload of {len(payload)} bytes is too large for MQTT")
        if qos == 0:
            connection.write(
                wire.publish_header(topic_bytes, len(payload), 0, retain, 0, self._v5) + payload
            )
            self.stats.published += 1
            if future is not None:
                future.set_result(None)
            return
        self._idle.clear()
        if self._queued or self._inflight >= self._window:
            self._queued.append((topic_bytes, payload, retain, future))
            return
        self._send_qos1(connection, topic_bytes, payload, retain, future)

    def _send_qos1(
        self,
        connection: _Connection,
        topic_bytes: bytes,
        payload: bytes,
        retain: bool,
        future: asyncio.Future[None] | None,
    ) -> None:
        mid = connection.new_mid()
        connection.write(
            wire.publish_header(topic_bytes, len(payload), 1, retain, mid, self._v5) + payload
        )
        self.stats.published += 1
        self._inflight += 1
        self._pending[mid] = future

    # -- incoming packets (loop thread, from _Connection.data_received) -----------------------

    def _on_puback(self, mid: int, reason: int) -> None:
        if mid not in self._pending:
            return
        future = self._pending.pop(mid)
        self._inflight -= 1
        self.stats.acked += 1
        queued = self._queued
        if queued:
            connection = self._connection
            if connection is not None:
                while queued and self._inflight < self._window:
                    self._send_qos1(connection, *queued.popleft())
        elif self._inflight == 0:
            self._idle.set()
        if not self._space.is_set() and self.has_space:
            self._space.set()  # waiters for more than one slot check again
        if future is not None and not future.done():
            if reason >= 0x80:
                future.set_exception(
                    PublishRejected(f"broker rejected the message: {wire.reason_name(reason)}")
                )
            else:
                future.set_result(None)

    def _on_packet(self, connection: _Connection, first: int, body: memoryview) -> None:
        kind = first & 0xF0
        if kind == wire.PUBLISH:
            self._on_publish_packet(connection, first, body)
        elif kind == wire.CONNACK:
            self._on_connack(connection, body)
        elif kind == wire.PINGRESP:
            connection.ping_sent = None
        elif kind == wire.SUBACK:
            self._on_suback(body)
        elif kind == wire.UNSUBACK:
            if len(body) >= 2:
                self._control.pop((body[0] << 8) | body[1], None)
        elif kind == wire.PUBREL:  # the broker's QoS 2 handshake, step 3 of 4
            if len(body) < 2:
                raise wire.MalformedPacket("PUBREL without a packet identifier")
            mid = (body[0] << 8) | body[1]
            self._incoming_qos2.discard(mid)
            connection.write(wire.ack(wire.PUBCOMP, mid))
        elif kind == wire.DISCONNECT:
            reason = wire.reason_name(body[0]) if len(body) >= 1 else "Normal disconnection"
            if len(body) > 1 and self._v5:
                properties, _ = wire.parse_properties(body, 1, len(body))
                detail = properties.get(wire.REASON_STRING)
                if isinstance(detail, str) and detail:
                    reason = f"{reason} ({detail})"
            self._mark_lost(connection, f"disconnected by the broker: {reason}")
        elif kind == wire.PUBACK:
            raise wire.MalformedPacket("PUBACK shorter than a packet identifier")
        elif kind in (wire.PUBREC, wire.PUBCOMP, wire.AUTH):
            raise wire.MalformedPacket(f"unexpected packet type {kind >> 4}")
        else:
            raise wire.MalformedPacket(f"packet type {kind >> 4} is not sent by a broker")

    def _on_publish_packet(self, connection: _Connection, first: int, body: memoryview) -> None:
        qos = (first >> 1) & 0x03
        if qos == 3 or len(body) < 2:
            raise wire.MalformedPacket("invalid PUBLISH")
        topic_end = 2 + ((body[0] << 8) | body[1])
        if topic_end > len(body):
            raise wire.MalformedPacket("PUBLISH topic runs past the packet")
        try:
            topic = str(body[2:topic_end], "utf-8")
        except UnicodeDecodeError:
            raise wire.MalformedPacket("PUBLISH topic is not UTF-8") from None
        pos = topic_end
        mid = 0
        if qos:
            if pos + 2 > len(body):
                raise wire.MalformedPacket("PUBLISH without a packet identifier")
            mid = (body[pos] << 8) | body[pos + 1]
            pos += 2
        if self._v5:
            _, pos = wire.parse_properties(body, pos, len(body))
        payload = bytes(body[pos:])
        if qos == 1:
            connection.write(wire.ack(wire.PUBACK, mid))
        elif qos == 2:
            connection.write(wire.ack(wire.PUBREC, mid))
            if mid in self._incoming_qos2:
                return  # a re-sent QoS 2 message we already delivered
            self._incoming_qos2.add(mid)
        self.stats.received += 1
        incoming = Message(topic, payload, qos, bool(first & 0x01))
        for subscription in self._subscriptions:
            if wire.topic_matches(_strip_share(subscription.topic), topic):
                try:
                    subscription.handler(incoming)
                except Exception:  # one broken handler must not break the connection
                    log.exception("%s: handler for %s failed", self._name, subscription.topic)

    def _on_connack(self, connection: _Connection, body: memoryview) -> None:
        connack = self._connack
        if len(body) < 2:
            raise wire.MalformedPacket("CONNACK too short")
        code = body[1]
        if self._v5 and len(body) > 2:
            properties, _ = wire.parse_properties(body, 2, len(body))
            keepalive = properties.get(wire.SERVER_KEEP_ALIVE)
            if isinstance(keepalive, int) and keepalive > 0:
                # The broker's keep-alive overrides ours (MQTT 5, 3.2.2.3.14).
                self._active_keepalive = keepalive
            receive_maximum = properties.get(wire.RECEIVE_MAXIMUM)
            if receive_maximum is not None:
                if receive_maximum == 0:  # a protocol error (MQTT 5, 3.2.2.3.3)
                    raise wire.MalformedPacket("CONNACK with Receive Maximum 0")
                if isinstance(receive_maximum, int) and receive_maximum < self._max_inflight:
                    self._window = receive_maximum
            detail = properties.get(wire.REASON_STRING)
            if isinstance(detail, str) and detail and code >= 0x80:
                self._connack_detail = detail
        if connack is not None and not connack.done():
            connack.set_result(code)

    def _on_suback(self, body: memoryview) -> None:
        if len(body) < 3:
            raise wire.MalformedPacket("SUBACK too short")
        mid = (body[0] << 8) | body[1]
        pos = 2
        if self._v5:
            _, pos = wire.parse_properties(body, pos, len(body))
        topic = self._control.pop(mid, "?")
        for code in bytes(body[pos:]):
            if code >= 0x80:
                log.warning(
                    "%s: the broker refused the subscription to %s: %s",
                    self._name,
                    topic,
                    wire.reason_name(code, v5=True) if self._v5 else "Failure",
                )

    # -- connection management --------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure to connect is retried
                self.stats.connect_failures += 1
                reason = describe_error(exc)
                if self._last_error != reason or self._up_logged:
                    log.warning(
                        "%s: cannot connect to %s:%d: %s",
                        self._name,
                        self._host,
                        self._port,
                        reason,
                    )
                self._last_error = reason
                self._up_logged = False
                self._teardown(self._connection, reason=reason)
            else:
                attempt = 0
                await self._lost.wait()
            # Full jitter: many gateways reconnecting after a broker restart spread out.
            delay = min(self._reconnect_max, self._reconnect_min * 2**attempt)
            attempt = min(attempt + 1, 16)
            await asyncio.sleep(random.uniform(delay / 2, delay))

    async def _connect_once(self) -> None:
        loop = asyncio.get_running_loop()
        connection = _Connection(self, loop, v5=self._v5)
        self._connection = connection
        self._lost.clear()
        self._active_keepalive = self._keepalive
        self._window = self._max_inflight
        self._connack_detail = None
        connack: asyncio.Future[int] = loop.create_future()
        self._connack = connack
        try:
            # asyncio resolves the name in its executor and does the TLS handshake without
            # blocking the loop; TCP_NODELAY is set by asyncio on TCP transports.
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: connection,
                    self._host,
                    self._port,
                    ssl=self._tls_context,
                    server_hostname=self._host if self._tls_context is not None else None,
                ),
                self._connect_timeout,
            )
        except TimeoutError:
            raise ConnectionError("connection attempt timed out") from None
        will = None
        if self._will is not None:
            will = wire.WillMessage(
                self._will.topic, self._will.payload(), self._will.qos, self._will.retain
            )
        connection.write(
            wire.encode_connect(
                client_id=self._client_id,
                keepalive=self._keepalive,
                v5=self._v5,
                username=self._username,
                password=self._password,
                will=will,
            )
        )
        connection.flush()
        try:
            code = await asyncio.wait_for(connack, self._connect_timeout)
        except TimeoutError:
            raise ConnectionError("no CONNACK from the broker") from None
        if connection.closed or connection is not self._connection:
            # Lost right after the CONNACK, before this coroutine resumed.
            raise ConnectionError(self._last_error or "connection lost after CONNACK")
        if code != 0:
            reason = wire.reason_name(code, v5=self._v5)
            if self._connack_detail:
                reason = f"{reason} ({self._connack_detail})"
            raise ConnectionRefusedError(f"broker refused the connection: {reason}")
        self.stats.connects += 1
        self._misc = asyncio.create_task(
            self._keepalive_loop(connection), name=f"{self._name}-keepalive"
        )
        window = ""
        if self._window < self._max_inflight:
            window = f", at most {self._window} QoS 1 messages in flight (broker's Receive Maximum)"
        if self._last_error is not None and not self._up_logged:
            log.info(
                "%s: connected to %s:%d (recovered)%s", self._name, self._host, self._port, window
            )
        else:
            log.info("%s: connected to %s:%d%s", self._name, self._host, self._port, window)
        self._up_logged = True
        self._last_error = None
        self._connected.set()
        for subscription in self._subscriptions:
            self._subscribe(connection, subscription)
        if self._birth is not None:
            with contextlib.suppress(NotConnected):
                self.publish(
                    self._birth.topic,
                    self._birth.payload(),
                    qos=self._birth.qos,
                    retain=self._birth.retain,
                )
        for listener in list(self._listeners):
            listener(True)

    def _subscribe(self, connection: _Connection, subscription: _Subscription) -> None:
        mid = connection.new_mid()
        self._control[mid] = subscription.topic
        connection.write(
            wire.encode_subscribe(
                mid,
                subscription.topic,
                subscription.qos,
                no_local=subscription.no_local,
                v5=self._v5,
            )
        )

    async def _keepalive_loop(self, connection: _Connection) -> None:
        # PINGREQ when either direction was quiet for a keep-alive period (a broker that is
        # stopped while we keep publishing must be noticed too); no PINGRESP within another
        # period means the connection is dead even if TCP has not noticed.
        while not connection.closed:
            # The broker gives up after 1.5 keep-alive periods without a packet from us.
            await asyncio.sleep(min(1.0, self._active_keepalive / 4))
            keepalive = self._active_keepalive
            now = time.monotonic()
            if connection.ping_sent is not None:
                if now - connection.ping_sent >= keepalive:
                    self._mark_lost(connection, "keep-alive timeout")
                    return
            elif now - connection.last_out >= keepalive or now - connection.last_in >= keepalive:
                connection.ping_sent = now
                connection.write(wire.PINGREQ_PACKET)

    # -- loss -----------------------------------------------------------------------------------

    def _mark_lost(self, connection: _Connection, reason: str) -> None:
        if connection is not self._connection:
            return
        connack = self._connack
        if connack is not None and not connack.done():
            # Closed before the CONNACK (e.g. TLS client certificate refused): fail now
            # instead of waiting for the connect timeout.
            connack.set_exception(ConnectionError(reason))
        was_connected = self._connected.is_set()
        if was_connected:
            log.warning(
                "%s: connection to %s:%d lost: %s", self._name, self._host, self._port, reason
            )
            self.stats.lost += 1
        self._last_error = reason
        self._up_logged = False
        self._teardown(connection, reason=reason)
        if was_connected:
            for listener in list(self._listeners):
                listener(False)

    def _teardown(self, connection: _Connection | None, *, reason: str) -> None:
        self._connected.clear()
        if self._misc is not None and self._misc is not asyncio.current_task():
            self._misc.cancel()
        self._misc = None
        if connection is not None and not connection.closed:
            connection.abort()  # drop the socket of a dead connection now
        if connection is self._connection:
            self._connection = None
        self._control.clear()
        self._incoming_qos2.clear()
        pending, self._pending = self._pending, {}
        queued, self._queued = self._queued, deque()
        self._inflight = 0
        self._space.set()
        self._idle.set()
        futures = [*pending.values(), *(future for *_, future in queued)]
        for future in futures:
            if future is not None and not future.done():
                future.set_exception(ConnectionLost(reason))
        self._lost.set()


def _strip_share(topic: str) -> str:
    # "$share/group/a/b" delivers messages whose topic is "a/b".
    if topic.startswith("$share/"):
        return topic.split("/", 2)[2]
    return topic


__all__ = [
    "ConnectionListener",
    "ConnectionLost",
    "Message",
    "MessageHandler",
    "MqttClient",
    "MqttStats",
    "NotConnected",
    "PublishRejected",
    "TlsOptions",
    "Will",
    "bulk_reserve",
]
