"""Live topics: the newest value per topic, published retained at QoS 1 as soon as possible.

Nothing here queues history (that is the outbox's job): while the broker is away only the
newest payload per topic is kept, and after every reconnect every topic is published again,
so the broker's retained state is current even if it restarted without persistence.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence

from sync.events import Event
from sync.mqtt.client import MessageTooLarge, MqttClient, NotConnected
from sync.uplink.sink import SinkFigure
from sync.uplink.topics import live_topic, sample_payload

log = logging.getLogger("edge_agent.live")


class LivePublisher:
    """Newest retained payload per topic, flushed while connected, re-sent on reconnect."""

    def __init__(self, client: MqttClient, *, topic_root: str) -> None:
        self._client = client
        self._root = topic_root
        self._latest: dict[str, bytes] = {}
        self._topics: dict[tuple[str, str], str] = {}  # (device, tag) -> its live topic
        # Ordered set of topics to (re)publish. An OrderedDict, not a dict: taking the first
        # key of a dict whose front entries were deleted scans over the holes, so draining a
        # dict from the front is quadratic (0.9 s of CPU for 50,000 topics after a reconnect,
        # bench/live_republish.py); popitem(last=False) is O(1).
        self._dirty: OrderedDict[str, None] = OrderedDict()
        self._wakeup = asyncio.Event()
        self.published = 0
        self.dropped_too_large = 0
        self._too_large_logged: set[str] = set()  # topics logged (bounded)
        client.add_listener(self._on_connection)

    def _on_connection(self, connected: bool) -> None:
        if connected:
            self._dirty = OrderedDict.fromkeys(self._latest)
            self._wakeup.set()

    def offer(self, topic: str, payload: bytes) -> None:
        """Set the newest payload of a topic."""
        self._latest[topic] = payload
        self._dirty[topic] = None
        self._wakeup.set()

    @property
    def name(self) -> str:
        """The sink's name."""
        return "live-publisher"

    def offer_events(self, events: Sequence[Event]) -> None:
        """Sample events -> R/{device}/{tag}."""
        topics = self._topics
        for event in events:
            device, tag = event.device, event.tag
            if event.kind == "sample" and device and tag:
                topic = topics.get((device, tag))
                if topic is None:
                    if len(topics) >= 65536:
                        topics.clear()  # bounded: tags come from config, a few thousand
                    topic = topics[device, tag] = live_topic(self._root, device, tag)
                self.offer(topic, sample_payload(event.ts, event.value, event.quality or "good"))

    def clear(self, topic: str) -> None:
        """Delete a topic's retained value at the broker (its tag was removed)."""
        self.offer(topic, b"")  # an empty retained message deletes the retained value

    def retire(self, device: str, tags: Sequence[str]) -> None:
        """A removed device: delete its tags' retained values at the broker."""
        for tag in tags:
            self.clear(live_topic(self._root, device, tag))

    def _too_large(self, topic: str, exc: MessageTooLarge) -> None:
        self.dropped_too_large += 1
        if topic not in self._too_large_logged and len(self._too_large_logged) < 256:
            self._too_large_logged.add(topic)
            log.warning("live: %s not published: %s", topic, exc)

    def figures(self) -> Sequence[SinkFigure]:
        """Live values published, and those too large for the broker."""
        return (
            SinkFigure("live_published", "Live values published.", self.published),
            SinkFigure(
                "live_dropped_too_large",
                "Live values larger than the broker's Maximum Packet Size (not published live).",
                self.dropped_too_large,
            ),
        )

    def problems(self) -> Sequence[str]:
        """None: a value too large for the broker is counted and logged, not a standing fault."""
        return ()

    @property
    def pending(self) -> int:
        """Topics waiting to be published."""
        return len(self._dirty)

    async def run(self) -> None:
        """Publish dirty topics whenever connected and the in-flight window has room."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._flush()

    async def drain(self) -> None:
        """Publish what is pending and wait for the broker's acknowledgements (shutdown)."""
        await self._flush()
        if self._client.is_connected:
            await self._client.wait_acked()

    async def _flush(self) -> None:
        client = self._client
        while self._dirty:
            if not client.is_connected:
                return  # the reconnect listener marks everything dirty again
            room = client.bulk_room  # leaves slots to the forwarder and to replies
            if room == 0:
                await client.wait_bulk_room()
                continue
            dirty, latest = self._dirty, self._latest  # replaced on every reconnect
            batch: list[tuple[str, bytes]] = []
            for _ in range(min(room, len(dirty))):
                topic, _ = dirty.popitem(last=False)
                batch.append((topic, latest[topic]))
            try:
                too_large = client.publish_many(batch, retain=True)
            except NotConnected:
                for topic, _ in reversed(batch):  # keep their places for the resend
                    dirty[topic] = None
                    dirty.move_to_end(topic, last=False)
                return
            # Larger than the broker takes (its Maximum Packet Size): such a value cannot be
            # published live (the outbox still carries it); the topic's next value may fit.
            for topic, exc in too_large:
                self._too_large(topic, exc)
            before = self.published
            self.published += len(batch) - len(too_large)
            if self.published // 256 != before // 256:
                await asyncio.sleep(0)  # let pollers run during a large burst
