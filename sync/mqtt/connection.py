"""One connection to the broker as an asyncio Protocol: packet framing, buffered writes, keep-alive
clocks, and the packet identifiers in use on it.

A publish is a few bytes appended to the write list, and everything appended in one event-loop
turn goes out in one `transport.write`; a PUBACK is four bytes read in place. Both matter: they
are most of the CPU the agent spends per live value (see the module docstring of
`sync.mqtt.client`).

What the broker sends is never trusted with memory or with the process: a packet whose fixed
header announces more than `max_packet_size` bytes is refused before its body is buffered, and
a malformed packet or one the broker may not send closes the connection (DISCONNECT with the
spec's reason code on MQTT 5) like any other lost connection; the link then reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol, cast

from sync.mqtt import wire
from sync.mqtt.errors import describe_error

log = logging.getLogger("edge_agent.mqtt")


class ConnectionOwner(Protocol):
    """What a connection reports to (the client): the PUBACKs of a read as (packet
    identifier, reason code) pairs, every other packet, and its end."""

    def _on_pubacks(self, acks: list[tuple[int, int]]) -> None: ...

    def _on_packet(self, connection: Connection, first: int, body: memoryview) -> None: ...

    def _mark_lost(self, connection: Connection, reason: str) -> None: ...


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: packet framing, the write list, keep-alive clocks and the
    packet identifiers in flight on it."""

    def __init__(
        self,
        owner: ConnectionOwner,
        loop: asyncio.AbstractEventLoop,
        *,
        v5: bool,
        max_packet_size: int = wire.MAX_PACKET_SIZE,
    ) -> None:
        self.owner = owner
        self.loop = loop
        self.v5 = v5
        self.max_packet_size = max_packet_size  # the most one incoming packet may take
        self.refused: str | None = None  # why we closed it on what the broker sent
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.closed = False
        now = time.monotonic()
        self.last_in = now
        self.last_out = now
        self.ping_sent: float | None = None
        # Every connection starts clean (clean start, session expiry 0), so the packet
        # identifiers in use, and what waits for an answer under them, die with it.
        self.next_mid = 0
        # QoS 1 PUBLISH in flight: packet identifier -> (its topic, the future its PUBACK
        # resolves, if its publisher wants one).
        self.pending: dict[int, tuple[bytes, asyncio.Future[None] | None]] = {}
        self.requests: dict[int, str] = {}  # SUBSCRIBE/UNSUBSCRIBE -> its topic filter
        self.incoming_qos2: set[int] = set()  # the broker's QoS 2 messages before PUBREL

    # asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport: asyncio's is an asyncio.Transport, uvloop's (the programs' loop)
        # has the same methods but is no subclass of it, so the class is not checked.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # refused already: what the transport still hands over is dropped
        self.last_in = time.monotonic()
        buffer = self.buffer
        buffer += data
        owner = self.owner
        size = len(buffer)
        limit = self.max_packet_size
        pos = 0
        # The PUBACKs of this read, handed over together, and before any later packet.
        acks: list[tuple[int, int]] = []
        # Nothing the broker sends may escape into the event loop (and from there end the
        # program): every error closes this connection, and the link reconnects.
        try:
            while size - pos >= 2:
                first = buffer[pos]
                # The remaining length: one byte for every packet this client sees often.
                length = buffer[pos + 1]
                start = pos + 2
                if length >= 0x80:
                    decoded = wire.decode_varint(buffer, pos + 1)  # more than 4 bytes: malformed
                    if decoded is None:
                        break
                    length, start = decoded
                end = start + length
                if end - pos > limit:
                    # Refused on its fixed header: the body is never buffered (MQTT 5
                    # 3.1.2.11.4: a packet over our Maximum Packet Size is a protocol error).
                    if acks:
                        owner._on_pubacks(acks)  # what the broker acknowledged still counts
                    self.refuse(
                        wire.PACKET_TOO_LARGE,
                        f"packet of {end - pos} bytes from the broker is larger than "
                        f"max_packet_size ({limit} bytes)",
                    )
                    return
                if end > size:
                    break
                if first == wire.PUBACK and length >= 2:
                    # The hot path: one PUBACK per QoS 1 publish.
                    reason = buffer[start + 2] if length > 2 and self.v5 else 0
                    acks.append(((buffer[start] << 8) | buffer[start + 1], reason))
                else:
                    if acks:
                        owner._on_pubacks(acks)
                        acks = []
                    # A copy: a view into `buffer` would pin it against the `del` below.
                    owner._on_packet(self, first, memoryview(bytes(memoryview(buffer)[start:end])))
                    if self.closed:
                        return
                pos = end
            if acks:
                owner._on_pubacks(acks)
        except wire.MalformedPacket as exc:
            self.refuse(exc.reason_code, f"malformed packet from the broker: {exc}")
            return
        except (ValueError, IndexError) as exc:  # a field cut short, or not what it must be
            self.refuse(wire.MALFORMED_PACKET, f"malformed packet from the broker: {exc}")
            return
        except Exception as exc:  # a bug of ours: logged with its traceback, then as above
            log.exception("mqtt: error handling a packet from the broker")
            self.refuse(wire.IMPLEMENTATION_ERROR, f"error handling a packet: {exc!r}")
            return
        if pos:
            del buffer[:pos]

    def refuse(self, reason_code: int, reason: str) -> None:
        """Close because of what the broker sent, then report the loss with `reason` (the link
        logs it once). MQTT 5: DISCONNECT with `reason_code` first, after what is buffered;
        a reason code other than 0 keeps the Last Will. MQTT 3.1.1 DISCONNECT has no reason
        and would discard the Will: the socket is just closed."""
        self.refused = reason
        self.buffer = bytearray()  # an oversized packet's first bytes are not kept either
        transport = self.transport
        if not self.closed and transport is not None:
            if self.v5:
                self.write(wire.encode_disconnect(reason_code))
            self.flush()
            self.closed = True
            transport.close()
        self.owner._mark_lost(self, reason)

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
        pending = self.pending
        requests = self.requests
        mid = self.next_mid
        while True:
            mid = mid % 0xFFFF + 1
            if mid not in pending and mid not in requests:
                self.next_mid = mid
                return mid

    def disconnect(self) -> None:
        """Send DISCONNECT (the broker then discards the Last Will) after what is buffered,
        and close."""
        transport = self.transport
        if self.closed or transport is None:
            return
        self.write(wire.DISCONNECT_PACKET)
        self.flush()
        self.closed = True
        transport.close()  # sends what the transport still buffers before it closes

    def abort(self) -> None:
        """Drop the connection now (no flush)."""
        self.closed = True
        self.out = []
        if self.transport is not None:
            self.transport.abort()

    def socket(self) -> Any:
        """The underlying socket (tests shut a duplicate of it down to simulate a dead link)."""
        return None if self.transport is None else self.transport.get_extra_info("socket")
