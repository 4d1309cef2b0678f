"""The QoS 1 in-flight window: how many messages may wait for their PUBACK at once, the ones
queued beyond it, and the futures that the PUBACKs resolve.

An MQTT 5 broker announces in its CONNACK how many QoS 1 messages it takes unacknowledged
(Receive Maximum; mosquitto sends its `max_inflight_messages`, 20 by default, EMQX its
`max_inflight`, HiveMQ 10), and EMQX and HiveMQ disconnect a client that sends more (0x93). The
window is therefore min(max_inflight, Receive Maximum) per connection; a QoS 1 publish beyond it
waits in a small queue (in order) until a PUBACK frees a slot. The owners of bulk data (live
publisher, forwarder) wait for `bulk_room` first, so the queue only holds the occasional
acknowledgement or reply, and each of them leaves `bulk_reserve(window)` slots to the others.

Both directions work in bulk: `submit_many` takes a batch in one call, and `acknowledge` takes
every PUBACK of one read at once, so that a line publishing a hundred values a poll does not
pay a free-slot check, a queue check and a wake-up check per message.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

from sync.mqtt import wire
from sync.mqtt.connection import Connection
from sync.mqtt.errors import ConnectionLost, PublishRejected
from sync.mqtt.refusals import RefusalLog
from sync.mqtt.types import MqttStats

# A QoS 1 publish waiting for a free slot: (topic, payload, retain, future of publish_acked).
QueuedPublish = tuple[bytes, bytes, bool, asyncio.Future[None] | None]
# A PUBACK as read: (packet identifier, reason code; 0 on MQTT 3.1.1).
Puback = tuple[int, int]


def bulk_reserve(window: int) -> int:
    """In-flight slots each owner of bulk data leaves to the others: an eighth of the window.

    The live publisher and the forwarder both fill the window as fast as PUBACKs free it; a
    line whose values change faster than the broker acknowledges would otherwise take every
    slot the moment it frees, and the durable path (or the live one, during a backlog drain)
    would wait behind the other.
    """
    return window // 8


class InflightWindow:
    """QoS 1 messages in flight on the current connection, at most `size` of them; the rest
    queued in order until PUBACKs free slots."""

    def __init__(self, *, max_inflight: int, stats: MqttStats, refusals: RefusalLog) -> None:
        if not 1 <= max_inflight <= 20000:
            # QoS 1 packet identifiers are 16-bit: the window must stay well inside 65,535.
            raise ValueError("max_inflight must be 1..20000")
        self.max_inflight = max_inflight
        self.size = max_inflight  # min(max_inflight, the broker's Receive Maximum)
        self._stats = stats
        self._refusals = refusals
        self._connection: Connection | None = None
        self._queued: deque[QueuedPublish] = deque()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- the connection it counts for ---------------------------------------------------------

    def attach(self, connection: Connection) -> None:
        """Count for a new connection, starting at `max_inflight` until its CONNACK says less."""
        self._connection = connection
        self.size = self.max_inflight

    def limit(self, receive_maximum: int) -> None:
        """Apply the broker's Receive Maximum (CONNACK) when it is below `max_inflight`."""
        if receive_maximum < self.max_inflight:
            self.size = receive_maximum

    def detach(self, reason: str) -> None:
        """The connection is gone: fail what was in flight or queued with ConnectionLost."""
        connection, self._connection = self._connection, None
        pending = {} if connection is None else connection.pending
        queued, self._queued = self._queued, deque()
        self._space.set()
        self._idle.set()
        futures = [*(future for _, future in pending.values()), *(future for *_, future in queued)]
        pending.clear()
        for future in futures:
            if future is not None and not future.done():
                future.set_exception(ConnectionLost(reason))

    # -- state --------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """QoS 1 messages sent and not yet acknowledged (PUBACK)."""
        connection = self._connection
        return 0 if connection is None else len(connection.pending)

    @property
    def free_slots(self) -> int:
        """QoS 1 messages that would be sent at once (window minus in flight and queued)."""
        return self.size - self.inflight - len(self._queued)

    @property
    def bulk_room(self) -> int:
        """How many an owner of bulk data may send now, leaving `bulk_reserve` slots."""
        return max(0, self.free_slots - bulk_reserve(self.size))

    async def wait_idle(self) -> None:
        """Wait until nothing is in flight."""
        await self._idle.wait()

    async def wait_freed(self) -> None:
        """Wait for the next PUBACK that leaves a free slot (or the end of the connection)."""
        self._space.clear()
        await self._space.wait()

    # -- sending and acknowledging ------------------------------------------------------------

    def submit(
        self,
        connection: Connection,
        topic_bytes: bytes,
        payload: bytes,
        retain: bool,
        future: asyncio.Future[None] | None,
    ) -> None:
        """Send a QoS 1 message now, or queue it (in order) while the window is full."""
        self._idle.clear()
        if self._queued or len(connection.pending) >= self.size:
            self._queued.append((topic_bytes, payload, retain, future))
            return
        self._transmit(connection, topic_bytes, payload, retain, future)

    def submit_many(
        self, connection: Connection, messages: Sequence[tuple[bytes, bytes]], retain: bool
    ) -> None:
        """`submit` for QoS 1 messages nobody waits for: what the window lets out is sent (the
        connection writes one loop turn's packets at once), the rest is queued in order."""
        if not messages:
            return
        self._idle.clear()
        room = 0 if self._queued else max(0, self.size - len(connection.pending))
        for topic_bytes, payload in messages[:room]:
            self._transmit(connection, topic_bytes, payload, retain, None)
        self._queued.extend((topic, payload, retain, None) for topic, payload in messages[room:])

    def _transmit(
        self,
        connection: Connection,
        topic_bytes: bytes,
        payload: bytes,
        retain: bool,
        future: asyncio.Future[None] | None,
    ) -> None:
        mid = connection.new_mid()
        connection.write(
            wire.publish_header(topic_bytes, len(payload), 1, retain, mid, connection.v5) + payload
        )
        self._stats.published += 1
        connection.pending[mid] = (topic_bytes, future)

    def acknowledge(self, acks: Sequence[Puback]) -> None:
        """The PUBACKs of one read: free their slots, resolve their futures (PublishRejected
        for a failure reason code), then send what the slots let out of the queue."""
        connection = self._connection
        if connection is None:
            return
        pending = connection.pending
        stats = self._stats
        for mid, reason in acks:
            entry = pending.pop(mid, None)
            if entry is None:
                continue  # not ours (or a duplicate): nothing in flight under it
            topic, future = entry
            if reason >= 0x80:
                self._refusals.refused(topic, reason, owned=future is not None)
                if future is not None and not future.done():
                    future.set_exception(PublishRejected(reason=reason))
                continue
            stats.acked += 1
            if future is not None and not future.done():
                future.set_result(None)
        queued = self._queued
        if queued:
            while queued and len(pending) < self.size:
                self._transmit(connection, *queued.popleft())
        elif not pending:
            self._idle.set()
        if not self._space.is_set() and self.free_slots > 0:
            self._space.set()  # waiters for more than one slot check again
