"""The ingest's counters (served on ``/metrics``, docs/central.md "Metrics")."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_SENDERS = 10_000  # distinct senders with their own malformed count; the rest share "(other)"
OTHER_SENDERS = "(other)"
# A sender's name as kept by Senders: a gateway id is at most 64 characters (batch.GATEWAY_ID),
# a topic level up to 65,535 bytes; 10,000 of those must not take 655 MB.
SENDER_CHARS = 128


@dataclass(slots=True)
class IngestStats:
    """Counters (and one gauge) for metrics and tests."""

    messages: int = 0
    batches_committed: int = 0
    rows_inserted: int = 0
    rows_duplicate: int = 0
    malformed: int = 0
    malformed_by_sender: dict[str, int] = field(default_factory=dict)
    # Among the malformed: batches claiming seqs neither sent nor declared dropped, and batches
    # with an event dated outside the accepted window (docs/central.md, "Validation").
    uncovered: int = 0
    out_of_window: int = 0
    commit_errors: int = 0
    db_failures: int = 0
    acks_published: int = 0
    acks_unsent: int = 0
    overflow_dropped: int = 0
    maintenance_runs: int = 0
    maintenance_failures: int = 0
    # A gauge: default-partition rows dated outside the window, as of the last maintenance run.
    absurd_rows: int = 0

    def count_malformed(self, sender: str) -> bool:
        """Count one malformed message from ``sender``; True if it is the first of its key."""
        # Bounded: a client publishing under ever new topic levels must not grow this forever.
        counts = self.malformed_by_sender
        key = sender if sender in counts or len(counts) < MAX_SENDERS else OTHER_SENDERS
        first = key not in counts
        counts[key] = counts.get(key, 0) + 1
        self.malformed += 1
        return first


@dataclass(slots=True)
class SenderActivity:
    """When this replica last heard from one sender and last acknowledged it (epoch s)."""

    last_message: float
    last_ack: float | None = None


class Senders:
    """What this replica saw of each sender since it started, for the status page.

    In memory only (the database keeps what is durable: docs/page.md, "The ingest's page");
    bounded like the malformed counts: past MAX_SENDERS distinct senders the rest share
    OTHER_SENDERS; a name longer than SENDER_CHARS is kept cut to it.
    """

    def __init__(self) -> None:
        """No sender seen yet."""
        self._seen: dict[str, SenderActivity] = {}

    def _key(self, sender: str) -> str:
        seen = self._seen
        sender = sender[:SENDER_CHARS]
        return sender if sender in seen or len(seen) < MAX_SENDERS else OTHER_SENDERS

    def message(self, sender: str, now: float) -> None:
        """An S/sync message from ``sender`` arrived (valid or not)."""
        key = self._key(sender)
        activity = self._seen.get(key)
        if activity is None:
            self._seen[key] = SenderActivity(last_message=now)
        else:
            activity.last_message = now

    def acked(self, sender: str, now: float) -> None:
        """An S/ack went out to ``sender``."""
        activity = self._seen.get(self._key(sender))
        if activity is not None:
            activity.last_ack = now

    def get(self, sender: str) -> SenderActivity | None:
        """What was seen of ``sender`` (None: nothing since the start)."""
        return self._seen.get(sender[:SENDER_CHARS])

    def names(self) -> list[str]:
        """Every sender seen (OTHER_SENDERS included once the bound is reached)."""
        return list(self._seen)
