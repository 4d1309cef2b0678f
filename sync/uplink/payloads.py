"""S/sync payloads (docs/topics.md): the envelope around a batch's events, how many event
bytes fit in one message, and the gap events sent alone ahead of the batches."""

from __future__ import annotations

import json
import logging

from sync.mqtt import wire
from sync.mqtt.client import MqttClient, NotConnected, PublishRejected
from sync.outbox.codec import StoredEvent
from sync.outbox.store import Batch

log = logging.getLogger("edge_agent.forwarder")


class SyncPayloads:
    """Encodes the batches of one gateway's stream for its S/sync topic."""

    def __init__(self, *, gateway_id: str, topic: str, client: MqttClient) -> None:
        self._gateway = json.dumps(gateway_id)
        self.topic = topic
        self._client = client
        self._envelope_size: int | None = None

    def encode(self, batch: Batch) -> bytes:
        """The S/sync payload of `batch` (compact UTF-8 JSON)."""
        head = (
            f'{{"gateway":{self._gateway},"stream":{json.dumps(batch.stream)},'
            f'"first_seq":{batch.first_seq},"last_seq":{batch.last_seq},"events":['
        )
        return b"".join((head.encode(), b",".join(batch.wire_events), b"]}"))

    def events_budget(self, budget: int, stream: str) -> int:
        """Bytes the events of the next batch may take: `budget` for the whole message, and
        never more than the broker's Maximum Packet Size (MQTT 5 CONNACK) allows the packet."""
        limit = self._client.broker_max_packet_size
        if limit is not None:
            headers = wire.publish_size(len(self.topic.encode()), limit, 1, True) - limit
            budget = min(budget, limit - headers)
        return max(1, budget - self._envelope(stream))

    def _envelope(self, stream: str) -> int:
        # Everything but the events, with the longest possible seqs (the stream never changes).
        if self._envelope_size is None:
            self._envelope_size = len(self.encode(Batch(stream, 10**18, 10**18, (), ())))
        return self._envelope_size

    def send_alone(self, stream: str, gaps: tuple[StoredEvent, ...]) -> bool:
        """Publish each gap event as a batch of its own; False if not all could go now."""
        client = self._client
        for event in gaps:
            if not client.has_bulk_room:
                return False  # the rest at the next step
            alone = Batch(stream, event.seq, event.seq, (event,), (event.wire().encode(),))
            try:
                # Outside the window's order: a lost one is sent again with the next epoch.
                client.publish(self.topic, self.encode(alone), qos=1)
            except NotConnected:
                return False
            except PublishRejected as exc:
                log.warning("forwarder: gap event seq %d not sent: %s", event.seq, exc)
        return True
