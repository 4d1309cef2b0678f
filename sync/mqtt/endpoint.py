"""Where and as whom the client connects: the broker's address, TLS, protocol version and the
fields of its CONNECT packet."""

from __future__ import annotations

import asyncio

from sync.mqtt import wire
from sync.mqtt.connection import Connection
from sync.mqtt.types import PROTOCOL_CHOICES, ProtocolChoice, TlsOptions, Will

# Below this not even a CONNACK or SUBACK with a reason string is sure to fit.
MIN_PACKET_SIZE = 256


class Endpoint:
    """The broker to connect to and the CONNECT sent to it."""

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
        protocol: ProtocolChoice = "auto",
        connect_timeout: float = 10.0,
        max_packet_size: int = wire.MAX_PACKET_SIZE,
    ) -> None:
        if not host:
            raise ValueError("host is required")
        if not 0 < port < 65536:
            raise ValueError(f"invalid port {port}")
        if protocol not in PROTOCOL_CHOICES:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOL_CHOICES)}")
        if not MIN_PACKET_SIZE <= max_packet_size <= wire.MAX_PACKET_SIZE:
            raise ValueError(
                f"max_packet_size must be {MIN_PACKET_SIZE}..{wire.MAX_PACKET_SIZE} bytes, "
                f"not {max_packet_size}"
            )
        self.host = host
        self.port = port
        self.client_id = client_id
        self.username = username
        self._password = password
        # Built once: a missing or unreadable certificate fails here, not at every attempt.
        self.tls_context = tls.context() if tls is not None else None
        self.keepalive = max(5, int(keepalive))  # seconds; the broker's Server Keep Alive wins
        self.will = will
        # What the broker refused of the Will (MQTT 5 CONNACK 0x9A Retain not supported, 0x9B
        # QoS not supported): the next CONNECT carries a Will it accepts.
        self.will_retain_refused = False
        self.will_qos_refused = False
        # MQTT 5 gives shared subscriptions and reason codes on PUBACK (a broker that refuses a
        # message says so); `auto` falls back to 3.1.1 for brokers without it (link.py).
        self.protocol: ProtocolChoice = protocol
        self.v5 = protocol != "3.1.1"  # the version the next CONNECT speaks
        self.connect_timeout = connect_timeout
        # The most one incoming packet may take, announced in CONNECT on MQTT 5 so that the
        # broker drops a larger message for us instead of sending it; enforced on either.
        self.max_packet_size = max_packet_size

    async def open(self, connection: Connection) -> None:
        """Open the TCP (or TLS) connection for `connection` and send CONNECT."""
        try:
            # asyncio resolves the name in its executor and does the TLS handshake without
            # blocking the loop; TCP_NODELAY is set by asyncio on TCP transports.
            # asyncio.timeout, not wait_for, which can swallow a cancellation on Python 3.11.
            async with asyncio.timeout(self.connect_timeout):
                await connection.loop.create_connection(
                    lambda: connection,
                    self.host,
                    self.port,
                    ssl=self.tls_context,
                    server_hostname=self.host if self.tls_context is not None else None,
                )
        except TimeoutError:
            raise ConnectionError("connection attempt timed out") from None
        connection.write(self.connect_packet())
        connection.flush()

    def connect_packet(self) -> bytes:
        """CONNECT with a clean start; the Will's payload is taken now (e.g. a timestamp)."""
        will = None
        if self.will is not None:
            will = wire.WillMessage(
                self.will.topic,
                self.will.payload(),
                0 if self.will_qos_refused else self.will.qos,
                self.will.retain and not self.will_retain_refused,
            )
        return wire.encode_connect(
            client_id=self.client_id,
            keepalive=self.keepalive,
            v5=self.v5,
            username=self.username,
            password=self._password,
            will=will,
            # The protocol's own limit needs no announcement (and keeps CONNECT as it was).
            max_packet_size=(
                None if self.max_packet_size == wire.MAX_PACKET_SIZE else self.max_packet_size
            ),
        )
