"""The connection to the broker, kept up: connect, CONNECT/CONNACK, keep-alive, notice the loss,
reconnect with backoff.

Why a fresh connection state per connection: the SQLite outbox is the only queue of this
project, so every connection starts empty (clean start, session expiry 0) and the owners of the
data (forwarder, live publisher) decide what to send again.

What the broker says in its CONNACK is applied before anything is sent: Receive Maximum,
Maximum Packet Size, Maximum QoS, Retain Available, Server Keep Alive (docs/mqtt.md, "Broker
limits"). A CONNECT refused for what it asked (MQTT 5 to a 3.1.1 broker with `auto`, a retained
or QoS 1 Last Will) is sent again at once in the form the broker takes; every other failure
waits out a backoff that resets only once a connection has stayed up (docs/mqtt.md, "Failures
and backoff").
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from sync.mqtt import wire
from sync.mqtt.connection import Connection, ConnectionOwner
from sync.mqtt.dispatch import Connack
from sync.mqtt.endpoint import Endpoint
from sync.mqtt.errors import describe_error
from sync.mqtt.types import ConnectionListener, MqttStats
from sync.mqtt.window import InflightWindow

log = logging.getLogger("edge_agent.mqtt")

# A connection counts as stable, and the backoff starts again from reconnect_min, once it has
# stayed up this long: a broker that accepts and then drops at once (a client-id takeover, an
# ACL that disconnects) is not hit every half second.
STABLE_AFTER = 30.0
# A broker that closes the connection this soon after CONNACK, this many times in a row, is
# most likely handing our client id to another client each time (MQTT 3.1.1 has no reason).
SHORT_SESSION = 5.0
SHORT_SESSIONS_FOR_TAKEOVER = 3


class BrokerRefused(ConnectionRefusedError):
    """The CONNACK carried a failure: `code` is its reason (MQTT 5) or return code (3.1.1)."""

    def __init__(self, code: int, message: str) -> None:
        """`message`: for the log."""
        super().__init__(message)
        self.code = code


class NoConnack(ConnectionError):
    """The broker kept the connection open but never answered CONNECT."""


class ClosedBeforeConnack(ConnectionError):
    """The broker closed the connection before answering CONNECT (`tls`: with a TLS alert)."""

    def __init__(self, message: str, *, tls: bool) -> None:
        """`message`: what is known of the close, for the log."""
        super().__init__(message)
        self.tls = tls


class BrokerLink:
    """Keeps one connection to the broker up and tells the client when it comes and goes."""

    def __init__(
        self,
        *,
        endpoint: Endpoint,
        owner: ConnectionOwner,
        window: InflightWindow,
        stats: MqttStats,
        on_up: Callable[[Connection], None],
        reconnect_min: float,
        reconnect_max: float,
        stable_after: float = STABLE_AFTER,
        name: str,
    ) -> None:
        if not 0 < reconnect_min <= reconnect_max:
            raise ValueError("need 0 < reconnect_min <= reconnect_max")
        self._endpoint = endpoint
        self._owner = owner
        self._window = window
        self._stats = stats
        self._on_up = on_up
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self._stable_after = stable_after
        self._name = name
        self.connection: Connection | None = None
        self.connected = asyncio.Event()
        self.last_error: str | None = None  # why the last attempt failed or the link was lost
        self._lost = asyncio.Event()
        self._listeners: list[ConnectionListener] = []
        self._runner: asyncio.Task[None] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._connack: asyncio.Future[Connack] | None = None
        self._active_keepalive = endpoint.keepalive  # the broker's Server Keep Alive may lower it
        self.broker_max_packet_size: int | None = None  # CONNACK's Maximum Packet Size
        self.maximum_qos = 2  # CONNACK's Maximum QoS (MQTT 5; 3.1.1 announces none)
        self.retain_available = True  # CONNACK's Retain Available
        self.shared_subscriptions = True  # CONNACK's Shared Subscription Available
        self.protocol_in_use: str | None = None  # "5" or "3.1.1" once a CONNACK accepted us
        self._up_logged = False
        self._failure_logged: str | None = None  # the last failure to connect in the log
        self._fallback_logged = False
        self._v311_answered = False  # the broker made clear it does not speak MQTT 5
        self._refused = False  # the last connection was closed on what the broker sent
        self._takeover = False  # the last connection was taken over by another client
        self._short_sessions = 0  # connections in a row the broker closed soon after CONNACK

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting, and reconnecting after every loss."""
        self._runner = asyncio.create_task(self._run(), name=f"{self._name}-connection")

    async def stop(self) -> None:
        """Stop reconnecting; the current connection stays up."""
        runner, self._runner = self._runner, None
        # Cancelled until it ends (not `await runner`: our own cancellation must pass): a
        # cancellation swallowed inside a library call must not leave us waiting forever.
        while runner is not None and not runner.done():
            runner.cancel()
            await asyncio.wait([runner], timeout=1.0)

    def disconnect(self) -> None:
        """Send DISCONNECT when connected (the broker discards the Last Will), then drop the
        connection and fail what was in flight."""
        connection = self.connection
        if connection is not None and self.connected.is_set():
            connection.disconnect()
        self._teardown(connection, reason="closed")

    def add_listener(self, listener: ConnectionListener) -> None:
        """Call `listener(True)` on every connect and `listener(False)` on every loss."""
        self._listeners.append(listener)

    def remove_listener(self, listener: ConnectionListener) -> None:
        """Stop calling `listener`."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    # -- events from the connection ----------------------------------------------------------

    def on_connack(self, connack: Connack) -> None:
        """Apply the broker's limits at once (before anything is sent), then let the
        connecting coroutine judge the reason code."""
        waiting = self._connack
        if waiting is None or waiting.done():
            raise wire.ProtocolError("a second CONNACK")
        if connack.code == 0 and connack.session_present:
            # We asked for a clean start; a session the broker kept would replay messages we
            # know nothing of (MQTT 5 3.2.2.1.1, 3.1.1 3.2.2.2: the client closes).
            raise wire.ProtocolError("CONNACK with Session Present on a clean start")
        self.broker_max_packet_size = connack.maximum_packet_size
        self.maximum_qos = connack.maximum_qos
        self.retain_available = connack.retain_available
        self.shared_subscriptions = connack.shared_subscriptions
        if connack.server_keepalive is not None:
            self._active_keepalive = connack.server_keepalive
        if connack.receive_maximum is not None:
            self._window.limit(connack.receive_maximum)
        waiting.set_result(connack)

    def mark_lost(self, connection: Connection, reason: str) -> None:
        """The current connection died (or was found dead): tear it down, tell the listeners."""
        if connection is not self.connection:
            return
        connack = self._connack
        if connack is not None and not connack.done():
            # Closed before the CONNACK (e.g. TLS client certificate refused, or a broker that
            # does not speak the protocol version): fail now, not at the connect timeout.
            if connection.refused is not None:  # we closed it, on what the broker sent
                connack.set_exception(ConnectionError(reason))
            else:
                reason = f"{reason} before CONNACK"
                connack.set_exception(ClosedBeforeConnack(reason, tls=reason.startswith("TLS")))
        was_connected = self.connected.is_set()
        if was_connected:
            log.warning(
                "%s: connection to %s:%d lost: %s",
                self._name,
                self._endpoint.host,
                self._endpoint.port,
                reason,
            )
            self._stats.lost += 1
        if connection.refused is not None:
            self._stats.refused_packets += 1
            self._refused = True
        self.last_error = reason
        self._up_logged = False
        self._teardown(connection, reason=reason)
        if was_connected:
            self._notify(False)

    def on_disconnect(self, connection: Connection, code: int, reason: str) -> None:
        """The broker's DISCONNECT (MQTT 5): lost, and a takeover said as such."""
        if code == wire.SESSION_TAKEN_OVER and connection is self.connection:
            self._takeover = True
            self._stats.takeovers += 1
            log.warning(
                "%s: another client connected to %s:%d with our client id %r and took over the "
                "connection (two gateways with one gateway.id, or a second agent on this PC?)",
                self._name,
                self._endpoint.host,
                self._endpoint.port,
                self._endpoint.client_id,
            )
        self.mark_lost(connection, f"disconnected by the broker: {reason}")

    def _notify(self, up: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(up)
            except Exception:  # one broken listener must not break the link or the others
                log.exception("%s: connection listener failed", self._name)

    # -- connecting ------------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure to connect is retried
                self._stats.connect_failures += 1
                self._teardown(self.connection, reason=describe_error(exc))
                if self._adapt_connect(exc):
                    continue  # at once: the broker said what it takes
                self._v5_first_again()
                self._failed(describe_error(exc))
            else:
                started = time.monotonic()
                await self._lost.wait()
                self._v5_first_again()
                if self._stayed_up(time.monotonic() - started):
                    attempt = 0
            # Full jitter: many gateways reconnecting after a broker restart spread out.
            delay = min(self._reconnect_max, self._reconnect_min * 2**attempt)
            attempt = min(attempt + 1, 16)
            await asyncio.sleep(random.uniform(delay / 2, delay))

    def _v5_first_again(self) -> None:
        # `auto` stays on 3.1.1 once the broker said (or showed by silence) that it does not
        # speak 5. A close before CONNACK may be a load balancer whose broker is restarting:
        # the next attempt tries 5 again, so that such a moment does not pin us to 3.1.1.
        if self._endpoint.protocol == "auto" and not self._v311_answered:
            self._endpoint.v5 = True

    def _failed(self, reason: str) -> None:
        # Logged when the reason changes, or when it follows a connection that was up.
        if reason != self._failure_logged or self._up_logged:
            log.warning(
                "%s: cannot connect to %s:%d: %s",
                self._name,
                self._endpoint.host,
                self._endpoint.port,
                reason,
            )
            self._failure_logged = reason
        self.last_error = reason
        self._up_logged = False

    def _adapt_connect(self, exc: Exception) -> bool:
        """Change the next CONNECT to what the broker takes; True when it was changed."""
        endpoint = self._endpoint
        host, port = endpoint.host, endpoint.port
        unsupported = isinstance(exc, BrokerRefused) and exc.code in (
            wire.UNSUPPORTED_PROTOCOL_VERSION,
            0x01,  # a 3.1.1 broker's "unacceptable protocol version" (3.1.1, 3.2.2.3)
        )
        closed = isinstance(exc, ClosedBeforeConnack) and not exc.tls
        silent = isinstance(exc, NoConnack)
        if endpoint.protocol == "auto" and endpoint.v5 and (unsupported or closed or silent):
            # Settled for good on an answer, and on silence (a 3.1.1 broker that misread the
            # CONNECT: waiting for it again would cost a connect timeout on every reconnect).
            self._v311_answered = not closed
            # Some 3.1.1 brokers answer return code 1, others just close (RabbitMQ 3.x), and
            # some misread an MQTT 5 CONNECT with a Will and wait for bytes that never come
            # (amqtt 0.12: "Will flag set, but will topic/message not present").
            endpoint.v5 = False
            if not self._fallback_logged:
                self._fallback_logged = True
                log.info(
                    "%s: %s:%d did not take MQTT 5 (%s): trying MQTT 3.1.1",
                    self._name,
                    host,
                    port,
                    describe_error(exc),
                )
            return True
        will = endpoint.will
        if not isinstance(exc, BrokerRefused) or will is None:
            return False
        if (
            exc.code == wire.RETAIN_NOT_SUPPORTED
            and will.retain
            and not endpoint.will_retain_refused
        ):
            endpoint.will_retain_refused = True
            log.warning(
                "%s: %s:%d does not take retained messages (Retain not supported): connecting "
                "again with a Last Will that is not retained",
                self._name,
                host,
                port,
            )
            return True
        if exc.code == wire.QOS_NOT_SUPPORTED and will.qos > 0 and not endpoint.will_qos_refused:
            endpoint.will_qos_refused = True
            log.warning(
                "%s: %s:%d does not take the Last Will's QoS %d (QoS not supported): connecting "
                "again with a QoS 0 Last Will",
                self._name,
                host,
                port,
                will.qos,
            )
            return True
        return False

    def _stayed_up(self, seconds: float) -> bool:
        """Whether a connection that lasted `seconds` resets the backoff; notices a broker
        that keeps closing soon after accepting (a takeover without MQTT 5's reason)."""
        refused, takeover = self._refused, self._takeover
        if seconds >= SHORT_SESSION or refused or takeover:
            self._short_sessions = 0
        else:
            self._short_sessions += 1
            if self._short_sessions == SHORT_SESSIONS_FOR_TAKEOVER:
                log.warning(
                    "%s: %s:%d closed the connection within %.0f s of accepting it %d times in "
                    "a row: is another client using our client id %r (two gateways with one "
                    "gateway.id)?",
                    self._name,
                    self._endpoint.host,
                    self._endpoint.port,
                    SHORT_SESSION,
                    SHORT_SESSIONS_FOR_TAKEOVER,
                    self._endpoint.client_id,
                )
        # A broker that sends the same bad packet on every connection (e.g. an oversized
        # retained message) or hands our id to another client is not hammered either.
        return seconds >= self._stable_after and not refused and not takeover

    async def _connect_once(self) -> None:
        endpoint = self._endpoint
        loop = asyncio.get_running_loop()
        connection = Connection(
            self._owner, loop, v5=endpoint.v5, max_packet_size=endpoint.max_packet_size
        )
        self.connection = connection
        self._lost.clear()
        self._refused = False
        self._takeover = False
        self.broker_max_packet_size = None
        self.maximum_qos = 2
        self.retain_available = True
        self.shared_subscriptions = True
        self._active_keepalive = endpoint.keepalive
        self._window.attach(connection)
        waiting: asyncio.Future[Connack] = loop.create_future()
        self._connack = waiting
        await endpoint.open(connection)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as the CONNACK does, and stop() would then wait forever.
            async with asyncio.timeout(endpoint.connect_timeout):
                connack = await waiting
        except TimeoutError:
            raise NoConnack(
                f"no CONNACK from the broker within {endpoint.connect_timeout:g} s"
            ) from None
        if connection.closed or connection is not self.connection:
            # Lost right after the CONNACK, before this coroutine resumed.
            raise ConnectionError(self.last_error or "connection lost after CONNACK")
        if connack.code != 0:
            if endpoint.v5 and connack.code == 0x01:
                # Not an MQTT 5 reason code: a 3.1.1 broker's answer (3.1.1, 3.2.2.3).
                reason = "Unacceptable protocol version (the broker speaks MQTT 3.1.1 only)"
            else:
                reason = wire.reason_name(connack.code, v5=endpoint.v5)
            if connack.reason_string and connack.code >= 0x80:
                reason = f"{reason} ({connack.reason_string})"
            raise BrokerRefused(connack.code, f"broker refused the connection: {reason}")
        self.protocol_in_use = "5" if endpoint.v5 else "3.1.1"
        self._went_up(connection)

    def _went_up(self, connection: Connection) -> None:
        self._stats.connects += 1
        self._keepalive_task = asyncio.create_task(
            self._keep_alive(connection), name=f"{self._name}-keepalive"
        )
        window = self._window
        note = ""
        if window.size < window.max_inflight:
            note = f", at most {window.size} QoS 1 messages in flight (broker's Receive Maximum)"
        if not self.retain_available:
            note += ", without retained messages (broker's Retain Available 0)"
        if self.maximum_qos < 1:
            note += ", at QoS 0 only (broker's Maximum QoS 0)"
        endpoint = self._endpoint
        host, port = endpoint.host, endpoint.port
        version = f"MQTT {self.protocol_in_use}"
        if endpoint.protocol == "auto" and not endpoint.v5:
            version += " (the broker does not speak MQTT 5)"
        recovered = " (recovered)" if self.last_error is not None and not self._up_logged else ""
        log.info("%s: connected to %s:%d%s, %s%s", self._name, host, port, recovered, version, note)
        self._up_logged = True
        self._failure_logged = None
        self.last_error = None
        self.connected.set()
        self._on_up(connection)
        self._notify(True)

    async def _keep_alive(self, connection: Connection) -> None:
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
                    self.mark_lost(connection, "keep-alive timeout")
                    return
            elif now - connection.last_out >= keepalive or now - connection.last_in >= keepalive:
                connection.ping_sent = now
                connection.write(wire.PINGREQ_PACKET)

    # -- loss --------------------------------------------------------------------------------

    def _teardown(self, connection: Connection | None, *, reason: str) -> None:
        self.connected.clear()
        keepalive_task, self._keepalive_task = self._keepalive_task, None
        if keepalive_task is not None and keepalive_task is not asyncio.current_task():
            keepalive_task.cancel()
        if connection is not None and not connection.closed:
            connection.abort()  # drop the socket of a dead connection now
        if connection is self.connection:
            self.connection = None
        self._window.detach(reason)
        self._lost.set()
