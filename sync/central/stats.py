"""The ingest's counters (served on ``/metrics``, docs/central.md "Metrics")."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_SENDERS = 10_000  # distinct senders with their own malformed count; the rest share "(other)"
OTHER_SENDERS = "(other)"


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
