"""The size cap (docs/delivery.md): past ``max_size`` the oldest sample events are dropped.

The cap is enforced inside the appending transaction: the oldest *sample* events are deleted
and ``buffer_full`` gap events with the exact seq ranges are inserted. States, counts, OEE,
alarms, workflow and gap events are never dropped.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Sequence

from sync.events import Event, rfc3339
from sync.outbox.codec import SAMPLE_KIND, StoredRow, encode_event
from sync.outbox.database import INSERT_EVENT, Database
from sync.outbox.errors import OutboxFull

log = logging.getLogger("edge_agent.outbox")

MIN_MAX_SIZE = 64 * 1024
# At most this many ranges per gap event, so that a gap event stays far below broker limits.
_GAP_RANGES_PER_EVENT = 1000


class SizeCap:
    """Keeps the database under `max_size` bytes by dropping its oldest sample events."""

    def __init__(self, *, database: Database, max_size: int) -> None:
        if not isinstance(max_size, int) or max_size < MIN_MAX_SIZE:
            raise ValueError(f"max_size must be an int >= {MIN_MAX_SIZE} bytes")
        self._database = database
        self.max_size = max_size
        # Past the cap, drop down to this much below it, so that a full outbox drops (and
        # writes a gap event) every few thousand events rather than on every commit, while one
        # drop transaction stays short.
        self._headroom = min(max(max_size // 32, 16 * 1024), 16 * 1024 * 1024)

    def enforce(
        self, connection: sqlite3.Connection, seq: int, count: int, used: int
    ) -> tuple[int, int, int, int]:
        """Drop the oldest samples (inside the writer's transaction, on the connection's
        thread) until under the cap.

        Returns (last seq incl. gap events, events count, samples dropped, bytes used).
        """
        dropped, used = self._drop_oldest_samples(connection, count, used)
        if used > self.max_size:
            raise OutboxFull(
                f"outbox {self._database.path} is over its cap of {self.max_size} bytes and "
                "holds no sample events to drop (states, counts, OEE, alarms, workflow and gap "
                "events are never dropped)"
            )
        if not dropped:
            return seq, count, 0, used
        count -= len(dropped)
        dropped.sort()
        gap_rows: list[StoredRow] = []
        for value in buffer_full_gaps(dropped):
            seq += 1
            gap_rows.append((seq, *encode_event(Event(time.time(), "gap", value=value))))
        connection.executemany(INSERT_EVENT, gap_rows)
        log.warning(
            "outbox %s over its cap of %d bytes: dropped %d oldest samples (seq %d..%d)",
            self._database.path,
            self.max_size,
            len(dropped),
            dropped[0][0],
            dropped[-1][0],
        )
        return seq, count + len(gap_rows), len(dropped), self._database.measure_in(connection)

    def _drop_oldest_samples(
        self, connection: sqlite3.Connection, count: int, used: int
    ) -> tuple[list[tuple[int, float]], int]:
        """Delete the oldest samples down to the headroom; return their (seq, ts), bytes in use."""
        target = self.max_size - self._headroom
        dropped: list[tuple[int, float]] = []
        while used > target:
            per_event = used / max(count, 1)
            want = max(16, math.ceil((used - target) / per_event))
            gone = [
                (int(row[0]), float(row[1]))
                for row in connection.execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE kind = ? "
                    "ORDER BY seq LIMIT ?) RETURNING seq, ts",
                    (SAMPLE_KIND, want),
                )
            ]
            if not gone:
                break
            dropped.extend(gone)
            count -= len(gone)
            used = self._database.measure_in(connection)
        return dropped, used


def buffer_full_gaps(dropped: Sequence[tuple[int, float]]) -> list[dict[str, object]]:
    """Values of the ``buffer_full`` gap events declaring the dropped (seq, ts), sorted by seq."""
    ranges = seq_ranges([item[0] for item in dropped])
    first_ts = min(item[1] for item in dropped)
    last_ts = max(item[1] for item in dropped)
    values: list[dict[str, object]] = []
    for start in range(0, len(ranges), _GAP_RANGES_PER_EVENT):
        part = ranges[start : start + _GAP_RANGES_PER_EVENT]
        values.append(
            {
                "reason": "buffer_full",
                "ranges": part,
                "count": sum(last - first + 1 for first, last in part),
                "first_ts": rfc3339(first_ts),
                "last_ts": rfc3339(last_ts),
            }
        )
    return values


def seq_ranges(seqs: Sequence[int]) -> list[list[int]]:
    """Sorted seqs -> [[first, last], ...] of consecutive runs."""
    ranges: list[list[int]] = []
    for seq in seqs:
        if ranges and ranges[-1][1] == seq - 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return ranges
