"""The outbox's seqs and counters as of the last commit (what the metrics and callers read)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, kw_only=True)
class OutboxState:
    """Loaded at open, then updated after each COMMIT by the writer and by acks."""

    stream: str = ""  # UUID of this database's seq space
    last_seq: int = 0  # the seq counter: highest seq ever committed
    acked_seq: int = 0  # the central store's watermark (taken at once, persisted lazily)
    deleted_upto: int = 0  # the watermark as persisted: rows up to it are deleted
    events_count: int = 0  # events stored (acked ones until their lazy deletion)
    bytes_used: int = 0  # bytes of database pages in use (what the cap applies to)
    oldest_ts: float | None = None  # event time of the oldest stored event
    dropped_total: int = 0  # sample events dropped by the cap since the stream began
    append_failures: int = 0  # appends that raised OutboxUnavailable since open
    commits: int = 0  # write transactions committed since open (group commits, acks alone)
