"""Which S/ack messages the forwarder believes (docs/delivery.md, "Deleted only on the central
acknowledgement"). An ack deletes events, so a forged or buggy one must never delete what the
central store does not have: only an ack of our own stream (compared as a UUID, whatever its
spelling), at most up to the last seq this process has sent (or the cap dropped right after
it), is applied."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass

from sync.events import Event
from sync.mqtt.client import Message
from sync.uplink.sink import SinkFigure

log = logging.getLogger("edge_agent.forwarder")

# At most one alarm event (and one ERROR line) per this many seconds for refused acks: a flood
# of forged acks must not fill the outbox or the journal.
ALARM_INTERVAL = 600.0
# Distinct foreign streams remembered (each is logged once); beyond it, only counted.
FOREIGN_STREAMS = 64


@dataclass(slots=True)
class AckCounts:
    """What became of S/ack messages, for /metrics."""

    malformed: int = 0
    foreign: int = 0
    stale: int = 0  # for seqs sent before a restart: deleted nothing, resent instead
    refused: int = 0  # beyond anything ever committed and sent: deleted nothing, alarmed


class AckCheck:
    """Decides which acks to apply and reports the others (once, or rate-limited)."""

    def __init__(self) -> None:
        self.counts = AckCounts()
        self._malformed_logged = False
        self._foreign: set[uuid.UUID] = set()
        self._alarm_at = -ALARM_INTERVAL
        self._refused_since_alarm = 0
        self._pending_alarm: Event | None = None

    def accepted_seq(
        self, message: Message, *, stream: str, sent_up_to: int, committed_at_start: int
    ) -> int | None:
        """The seq this ack of our `stream` acknowledges (at most `sent_up_to`), or None when it
        must not delete anything: `parse`, then `judge`."""
        acked = self.parse(message, stream=stream)
        if acked is None:
            return None
        return self.judge(
            acked, message.topic, sent_up_to=sent_up_to, committed_at_start=committed_at_start
        )

    def parse(self, message: Message, *, stream: str) -> int | None:
        """The seq an ack of our `stream` names, or None (malformed, or another stream's)."""
        try:
            document = json.loads(message.payload)
            acked_stream = uuid.UUID(document["stream"])
            acked = document["acked_seq"]
            if not isinstance(acked, int) or isinstance(acked, bool) or acked < 0:
                raise TypeError("acked_seq must be a non-negative integer")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.counts.malformed += 1
            if not self._malformed_logged:
                log.warning("forwarder: ignoring malformed ack on %s: %s", message.topic, exc)
                self._malformed_logged = True
            return None
        if acked_stream != uuid.UUID(stream):
            self.counts.foreign += 1
            if acked_stream not in self._foreign and len(self._foreign) < FOREIGN_STREAMS:
                self._foreign.add(acked_stream)
                log.warning(
                    "forwarder: ignoring ack for stream %s (ours is %s)", acked_stream, stream
                )
            return None
        return acked

    def judge(
        self, acked: int, topic: str, *, sent_up_to: int, committed_at_start: int
    ) -> int | None:
        """`acked` when it is at most `sent_up_to` (the last seq this process sent, or the last
        one the cap dropped right after it), else None: counted as stale when the process
        before a restart may have sent it, refused (and alarmed) beyond that."""
        if acked > max(sent_up_to, committed_at_start):
            self._refuse(topic, acked, sent_up_to)
            return None
        if acked > sent_up_to:
            # Seqs the process before a restart sent, acknowledged late: believable, but this
            # process has not sent them, so they are resent and acknowledged again first.
            self.counts.stale += 1
            if self.counts.stale == 1:
                log.info(
                    "forwarder: ack %d is for seqs sent before the restart: they are resent",
                    acked,
                )
            return None
        return acked

    def _refuse(self, topic: str, acked: int, sent_up_to: int) -> None:
        # Beyond everything ever committed and sent: a forged ack or an ingest bug. Deleting on
        # it could lose events the central store never received, so it deletes nothing.
        self.counts.refused += 1
        self._refused_since_alarm += 1
        now = time.monotonic()
        if now - self._alarm_at < ALARM_INTERVAL:
            return
        count, self._refused_since_alarm = self._refused_since_alarm, 0
        self._alarm_at = now
        text = (
            f"ignored an acknowledgement of seq {acked} on {topic}: the last seq sent "
            f"is {sent_up_to}; nothing was deleted ({count} such ack(s) since the last alarm)"
        )
        log.error("forwarder: %s", text)
        self._pending_alarm = Event(
            time.time(),
            "alarm",
            value={"source": "uplink", "severity": "critical", "message": text},
        )

    def figures(self) -> tuple[SinkFigure, ...]:
        """The acks that deleted nothing, for /metrics."""
        counts = self.counts
        return (
            SinkFigure(
                "sync_acks_refused",
                "S/ack messages beyond the last seq sent: deleted nothing (forged or a bug).",
                counts.refused,
            ),
            SinkFigure(
                "sync_acks_ignored",
                "S/ack messages malformed, for another stream, or for seqs sent before a restart.",
                counts.malformed + counts.foreign + counts.stale,
            ),
        )

    @property
    def alarm_pending(self) -> bool:
        """Whether an alarm event waits to be committed."""
        return self._pending_alarm is not None

    def take_alarm(self) -> Event | None:
        """The alarm event to commit, once (None when there is none)."""
        alarm, self._pending_alarm = self._pending_alarm, None
        return alarm
