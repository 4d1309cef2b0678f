"""The one MQTT client of the project: paho-mqtt 2.x driven by the asyncio event loop.

Why not paho's own network thread: callbacks would run on another thread, and paho's
automatic reconnect has no jitter. Here paho's socket is registered with the event loop
(`add_reader`/`add_writer`), so every callback runs on the loop thread; only the blocking part
of a connection attempt (DNS, TCP connect, TLS handshake) runs in a worker thread.

Why a fresh paho `Client` per connection: paho keeps QoS 1 messages in memory and re-sends
them after a reconnect. The SQLite outbox is the only queue of this project, so every
connection starts empty and the owners of the data (forwarder, live publisher) decide what
to send again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger("edge_agent.mqtt")

MessageHandler = Callable[["Message"], None]
ConnectionListener = Callable[[bool], None]


class NotConnected(Exception):
    """Raised by `publish` while there is no connection; the caller keeps its data."""


class ConnectionLost(Exception):
    """Set on the PUBACK future of a message when its connection went away first."""


class PublishRejected(ConnectionLost):
    """Set on the PUBACK future when the broker refused the message (a failure reason code)."""


@dataclass(frozen=True, slots=True)
class Message:
    """An incoming message."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Will:
    """The Last Will: published by the broker when the connection dies without DISCONNECT."""

    topic: str
    payload: Callable[[], bytes]
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS for mqtts://: CA bundle (None: system CAs), client certificate for mutual TLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        """Build the verifying client context (hostname checked, TLS >= 1.2)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


@dataclass(slots=True)
class MqttStats:
    """Counters for metrics."""

    published: int = 0
    acked: int = 0
    received: int = 0
    connects: int = 0
    connect_failures: int = 0
    lost: int = 0


@dataclass(slots=True)
class _Subscription:
    topic: str
    qos: int
    handler: MessageHandler
    options: dict[str, Any] = field(default_factory=dict)


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
            # QoS 1 message ids are 16-bit: paho stalls past 65,535 outstanding messages.
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
        # MQTT 3.1.1 costs less CPU per message (no properties, no reason codes to parse on
        # every PUBACK); MQTT 5 is needed for shared subscriptions by the book.
        self._protocol = (
            MQTTProtocolVersion.MQTTv5 if protocol == 5 else MQTTProtocolVersion.MQTTv311
        )
        self._subscriptions: list[_Subscription] = []
        self._listeners: list[ConnectionListener] = []
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task[None] | None = None
        self._misc: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._pending: dict[int, asyncio.Future[None] | None] = {}
        self._inflight = 0
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_error: str | None = None
        self._up_logged = False
        self._connack: asyncio.Future[ReasonCode] | None = None
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
        client = self._client
        if client is not None and self._connected.is_set():
            if final_publish is not None:
                topic, payload, retain = final_publish
                with contextlib.suppress(NotConnected, ConnectionLost, TimeoutError):
                    future = self.publish_acked(topic, payload, qos=1, retain=retain)
                    await asyncio.wait_for(future, timeout=2.0)
            client.disconnect()
        self._teardown(client, reason="closed")

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
        subscription = _Subscription(topic, qos, handler, {"noLocal": no_local})
        self._subscriptions.append(subscription)
        if self._client is not None and self.is_connected:
            self._subscribe(self._client, subscription)

    # -- publishing ----------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """QoS 1 messages sent and not yet acknowledged by the broker (PUBACK)."""
        return self._inflight

    @property
    def has_space(self) -> bool:
        """Whether another QoS 1 message may be sent without exceeding max_inflight."""
        return self._inflight < self._max_inflight

    async def wait_acked(self) -> None:
        """Wait until nothing is in flight (every QoS 1 message acknowledged or lost)."""
        await self._idle.wait()

    async def wait_space(self) -> None:
        """Wait until the in-flight window has room."""
        while not self.has_space:
            self._space.clear()
            await self._space.wait()

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
        client = self._client
        if client is None or not self._connected.is_set():
            raise NotConnected(self._last_error or "not connected")
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise NotConnected(paho.error_string(info.rc))
        self.stats.published += 1
        if qos == 0 or info.is_published():
            if future is not None:
                future.set_result(None)
            return
        self._inflight += 1
        self._idle.clear()
        self._pending[info.mid] = future

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
                reason = _describe(exc)
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
                self._teardown(self._client, reason=reason)
            else:
                attempt = 0
                await self._lost.wait()
            # Full jitter: many gateways reconnecting after a broker restart spread out.
            delay = min(self._reconnect_max, self._reconnect_min * 2**attempt)
            attempt = min(attempt + 1, 16)
            await asyncio.sleep(random.uniform(delay / 2, delay))

    def _new_client(self) -> paho.Client:
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=self._protocol,
            reconnect_on_failure=False,
            clean_session=None if self._protocol == MQTTProtocolVersion.MQTTv5 else True,
        )
        # 0 = unlimited inside paho: this wrapper bounds what is in flight itself, and paho's
        # own limit makes every PUBACK scan all outgoing messages (quadratic at high rates).
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.connect_timeout = self._connect_timeout
        if self._username is not None:
            client.username_pw_set(self._username, self._password)
        if self._tls_context is not None:
            client.tls_set_context(self._tls_context)
        if self._will is not None:
            client.will_set(
                self._will.topic,
                self._will.payload(),
                qos=self._will.qos,
                retain=self._will.retain,
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    async def _connect_once(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._new_client()
        self._client = client
        self._lost.clear()
        connack: asyncio.Future[ReasonCode] = loop.create_future()
        self._connack = connack
        client.user_data_set(connack)
        properties: Properties | None = None
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0
        self._thread_sockets = []
        try:
            # DNS, TCP connect and the TLS handshake block: keep them off the event loop.
            if properties is not None:
                await asyncio.to_thread(
                    client.connect,
                    self._host,
                    self._port,
                    self._keepalive,
                    clean_start=True,
                    properties=properties,
                )
            else:  # MQTT 3.1.1: clean_session=True was given to the Client
                await asyncio.to_thread(client.connect, self._host, self._port, self._keepalive)
        finally:
            self._thread_sockets = None
        sock = client.socket()
        if sock is None:
            raise ConnectionError("connection closed during connect")
        # paho leaves Nagle on: with the broker's delayed ACK a publish that follows another
        # waits ~40 ms. Every message here is complete when written, so send it now.
        if isinstance(sock, socket.socket):  # also ssl.SSLSocket
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._watch(client, sock)
        try:
            reason = await asyncio.wait_for(connack, self._connect_timeout)
        except TimeoutError:
            raise ConnectionError("no CONNACK from the broker") from None
        if reason.is_failure:
            raise ConnectionRefusedError(f"broker refused the connection: {reason}")
        self.stats.connects += 1
        self._misc = asyncio.create_task(self._misc_loop(client), name=f"{self._name}-keepalive")
        if self._last_error is not None and not self._up_logged:
            log.info("%s: connected to %s:%d (recovered)", self._name, self._host, self._port)
        else:
            log.info("%s: connected to %s:%d", self._name, self._host, self._port)
        self._up_logged = True
        self._last_error = None
        self._connected.set()
        for subscription in self._subscriptions:
            self._subscribe(client, subscription)
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

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription (now and for later reconnects)."""
        self._subscriptions = [sub for sub in self._subscriptions if sub.topic != topic]
        if self._client is not None and self.is_connected:
            self._client.unsubscribe(topic)

    def _subscribe(self, client: paho.Client, subscription: _Subscription) -> None:
        if self._protocol != MQTTProtocolVersion.MQTTv5:
            client.subscribe(subscription.topic, qos=subscription.qos)
            return
        options = SubscribeOptions(qos=subscription.qos, **subscription.options)
        client.subscribe(subscription.topic, options=options)

    async def _misc_loop(self, client: paho.Client) -> None:
        # Keep-alive pings and their timeout; paho needs this called about once a second.
        while True:
            await asyncio.sleep(1.0)
            if client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
                self._mark_lost(client, "keep-alive timeout")
                return

    def _watch(self, client: paho.Client, sock: Any) -> None:
        loop = self._loop
        assert loop is not None

        def readable() -> None:
            if client is not self._client:
                return
            rc = client.loop_read()
            # TLS may hold decrypted bytes that select() does not report.
            while (
                rc == MQTTErrorCode.MQTT_ERR_SUCCESS
                and isinstance(sock, ssl.SSLSocket)
                and sock.pending()
            ):
                rc = client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._mark_lost(client, paho.error_string(rc))

        loop.add_reader(sock, readable)
        if client.want_write():
            self._add_writer(client, sock)

    def _add_writer(self, client: paho.Client, sock: Any) -> None:
        loop = self._loop
        assert loop is not None

        def writable() -> None:
            if client is not self._client:
                return
            if client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._mark_lost(client, "write failed")

        loop.add_writer(sock, writable)

    # -- paho callbacks (loop thread, except socket-open during connect) ---------------------

    _thread_sockets: list[socket.socket] | None = None

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # During connect() this runs in the worker thread: _connect_once registers the
        # socket itself once the thread returns.
        if self._thread_sockets is not None:
            self._thread_sockets.append(sock)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._thread_sockets is not None:
            return  # still connecting in the worker thread; _watch checks want_write()
        if client is self._client:
            self._add_writer(client, sock)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._thread_sockets is not None or self._loop is None:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_writer(sock)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: asyncio.Future[ReasonCode],
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not userdata.done():
            userdata.set_result(reason)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._mark_lost(client, f"disconnected: {reason}")

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if mid not in self._pending:
            return
        future = self._pending.pop(mid)
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()
        self.stats.acked += 1
        if not self._space.is_set():
            self._space.set()
        if future is not None and not future.done():
            if reason.is_failure:
                future.set_exception(PublishRejected(f"broker rejected the message: {reason}"))
            else:
                future.set_result(None)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.stats.received += 1
        incoming = Message(message.topic, bytes(message.payload), message.qos, bool(message.retain))
        for subscription in self._subscriptions:
            if paho.topic_matches_sub(_strip_share(subscription.topic), message.topic):
                try:
                    subscription.handler(incoming)
                except Exception:  # one broken handler must not break the connection
                    log.exception("%s: handler for %s failed", self._name, subscription.topic)

    # -- loss -----------------------------------------------------------------------------------

    def _mark_lost(self, client: paho.Client, reason: str) -> None:
        if client is not self._client:
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
        self._teardown(client, reason=reason)
        if was_connected:
            for listener in list(self._listeners):
                listener(False)

    def _teardown(self, client: paho.Client | None, *, reason: str) -> None:
        self._connected.clear()
        if self._misc is not None and self._misc is not asyncio.current_task():
            self._misc.cancel()
        self._misc = None
        if client is not None:
            sock = client.socket()
            if sock is not None and self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(sock)
                    self._loop.remove_writer(sock)
            client.on_disconnect = None
            client.on_socket_close = None
            with contextlib.suppress(Exception):
                client._sock_close()  # drop the socket of a dead connection now
        if client is self._client:
            self._client = None
        pending, self._pending = self._pending, {}
        self._inflight = 0
        self._space.set()
        self._idle.set()
        for future in pending.values():
            if future is not None and not future.done():
                future.set_exception(ConnectionLost(reason))
        self._lost.set()


def _strip_share(topic: str) -> str:
    # "$share/group/a/b" delivers messages whose topic is "a/b".
    if topic.startswith("$share/"):
        return topic.split("/", 2)[2]
    return topic


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError) and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
