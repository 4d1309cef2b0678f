"""The connection to the broker, kept up: connect, CONNECT/CONNACK, keep-alive, notice the loss,
reconnect with backoff.

Why a fresh connection state per connection: the SQLite outbox is the only queue of this
project, so every connection starts empty (clean start, session expiry 0) and the owners of the
data (forwarder, live publisher) decide what to send again.
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
        self._up_logged = False
        self._refused = False  # the last connection was closed on what the broker sent

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting, and reconnecting after every loss."""
        self._runner = asyncio.create_task(self._run(), name=f"{self._name}-connection")

    async def stop(self) -> None:
        """Stop reconnecting; the current connection stays up."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.wait([runner])  # not `await runner`: our own cancellation must pass

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
        self.broker_max_packet_size = connack.maximum_packet_size
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
            # Closed before the CONNACK (e.g. TLS client certificate refused): fail now
            # instead of waiting for the connect timeout.
            connack.set_exception(ConnectionError(reason))
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
                reason = describe_error(exc)
                if self.last_error != reason or self._up_logged:
                    log.warning(
                        "%s: cannot connect to %s:%d: %s",
                        self._name,
                        self._endpoint.host,
                        self._endpoint.port,
                        reason,
                    )
                self.last_error = reason
                self._up_logged = False
                self._teardown(self.connection, reason=reason)
            else:
                await self._lost.wait()
                if not self._refused:
                    attempt = 0
                # Else the backoff keeps growing: a broker that sends the same bad packet on
                # every connection (e.g. an oversized retained message) is not hammered.
            # Full jitter: many gateways reconnecting after a broker restart spread out.
            delay = min(self._reconnect_max, self._reconnect_min * 2**attempt)
            attempt = min(attempt + 1, 16)
            await asyncio.sleep(random.uniform(delay / 2, delay))

    async def _connect_once(self) -> None:
        endpoint = self._endpoint
        loop = asyncio.get_running_loop()
        connection = Connection(
            self._owner, loop, v5=endpoint.v5, max_packet_size=endpoint.max_packet_size
        )
        self.connection = connection
        self._lost.clear()
        self._refused = False
        self.broker_max_packet_size = None
        self._active_keepalive = endpoint.keepalive
        self._window.attach(connection)
        waiting: asyncio.Future[Connack] = loop.create_future()
        self._connack = waiting
        await endpoint.open(connection)
        try:
            connack = await asyncio.wait_for(waiting, endpoint.connect_timeout)
        except TimeoutError:
            raise ConnectionError("no CONNACK from the broker") from None
        if connection.closed or connection is not self.connection:
            # Lost right after the CONNACK, before this coroutine resumed.
            raise ConnectionError(self.last_error or "connection lost after CONNACK")
        if connack.code != 0:
            reason = wire.reason_name(connack.code, v5=endpoint.v5)
            if connack.reason_string and connack.code >= 0x80:
                reason = f"{reason} ({connack.reason_string})"
            raise ConnectionRefusedError(f"broker refused the connection: {reason}")
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
        host, port = self._endpoint.host, self._endpoint.port
        if self.last_error is not None and not self._up_logged:
            log.info("%s: connected to %s:%d (recovered)%s", self._name, host, port, note)
        else:
            log.info("%s: connected to %s:%d%s", self._name, host, port, note)
        self._up_logged = True
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
