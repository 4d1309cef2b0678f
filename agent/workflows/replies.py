"""Replies on ``R/_cmd/{workflow}/reply``: queued (bounded) while the broker is away, sent in
order in bounded rounds while it is there."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Literal

from agent.workflows.stats import EngineStats
from sync.events import dumps
from sync.mqtt.client import ConnectionLost, MqttClient, NotConnected, PublishRejected
from sync.uplink.topics import reply_topic

log = logging.getLogger("edge_agent.workflows")

Status = Literal["accepted", "rejected", "completed", "compensated", "failed"]

PENDING_REPLIES = 10_000  # replies kept while the broker is away; the oldest go first
REPLY_BATCH = 100  # replies in flight at once


class Replies:
    """The engine's replies, in the order they were made."""

    def __init__(self, *, mqtt: MqttClient, topic_root: str, stats: EngineStats) -> None:
        self._mqtt = mqtt
        self._root = topic_root
        self._stats = stats
        self.pending: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()

    def send(
        self,
        workflow: str,
        command_id: str | None,
        status: Status,
        detail: str,
        *,
        sender: str | None = None,
    ) -> None:
        """Queue a reply ``{"id","status","detail"}`` (and ``"sender"`` when the command named
        one)."""
        reply: dict[str, str | None] = {"id": command_id, "status": status, "detail": detail}
        if sender is not None:
            reply["sender"] = sender
        payload = dumps(reply)
        if len(self.pending) >= PENDING_REPLIES:
            # Bounded while the broker is away: the saga log keeps the truth.
            self.pending.popleft()
            self._stats.replies_dropped += 1
        self.pending.append((reply_topic(self._root, workflow), payload))
        self._wake.set()

    def connected(self) -> None:
        """The uplink is back: send what waited."""
        self._wake.set()

    async def run(self) -> None:
        """Send replies while connected, REPLY_BATCH at a time, until cancelled."""
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._mqtt.wait_connected()
            if not await self._send_round():
                await asyncio.sleep(0.5)  # connected, yet the client refused: do not spin

    async def _send_round(self) -> bool:
        """One batch; False if the client took none of it."""
        pending = self.pending
        batch = [pending.popleft() for _ in range(min(REPLY_BATCH, len(pending)))]
        sent: list[tuple[tuple[str, bytes], asyncio.Future[None]]] = []
        retry: list[tuple[str, bytes]] = []
        for index, (topic, payload) in enumerate(batch):
            try:
                sent.append(((topic, payload), self._mqtt.publish_acked(topic, payload)))
            except NotConnected:
                retry = batch[index:]
                break
        results = await asyncio.gather(*(future for _, future in sent), return_exceptions=True)
        lost = []
        for (item, _), result in zip(sent, results, strict=True):
            if isinstance(result, PublishRejected):
                log.warning("reply on %s refused by the broker: %s", item[0], result)
            elif isinstance(result, ConnectionLost):
                lost.append(item)
        # Unsent replies go back to the front, in order, for the next connection.
        pending.extendleft(reversed(lost + retry))
        return bool(sent)
