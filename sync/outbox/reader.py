"""Reading batches for the forwarder: the oldest committed events, cut by events or bytes."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sync.outbox.codec import KIND_CODES, KIND_NAMES, StoredEvent, StoredRow
from sync.outbox.database import Database
from sync.outbox.state import OutboxState

_SELECT = "SELECT seq, ts, kind, device, tag, value, quality FROM events"

# Every S/sync event object is at least this long (seq, ts, kind and four nulls), so reading
# max_bytes // _MIN_WIRE_EVENT + 1 rows always fills a byte budget.
_MIN_WIRE_EVENT = 96


@dataclass(frozen=True, slots=True)
class Batch:
    """A lease of the oldest unacknowledged events after some seq, obeying the coverage rule.

    A batch claims exactly the seqs of its events: ``[first_seq, last_seq]`` is a run of
    consecutive seqs, all in ``events`` (docs/topics.md). Seqs the size cap dropped are never
    claimed by a batch; the gap event that declares them does that, later in the stream. An
    empty batch (``last_seq == first_seq - 1``) means nothing is there to send.
    """

    stream: str
    first_seq: int
    last_seq: int
    events: tuple[StoredEvent, ...]
    wire_events: tuple[bytes, ...] = field(repr=False)

    @property
    def wire_size(self) -> int:
        """Bytes of the encoded events joined by commas (the body of the ``events`` array)."""
        return sum(len(item) for item in self.wire_events) + max(0, len(self.wire_events) - 1)


class BatchReader:
    """Reads batches from the tail of recent commits, or from SQLite for older events."""

    def __init__(self, *, database: Database, state: OutboxState, tail: deque[StoredRow]) -> None:
        self._database = database
        self._state = state
        # The most recent committed rows, in seq order without holes (the writer fills it).
        self._tail = tail

    async def read(self, after_seq: int, max_events: int, max_bytes: int) -> Batch:
        """The oldest committed events after `after_seq` (raised to the acked seq when lower):
        a run of consecutive seqs, cut by events, wire bytes or a hole. An event larger than
        `max_bytes` comes alone in its own batch.
        """
        if max_events < 1 or max_bytes < 1:
            raise ValueError("max_events and max_bytes must be >= 1")
        start = max(after_seq, self._state.acked_seq)
        limit = min(max_events, max_bytes // _MIN_WIRE_EVENT + 1)
        tail = self._tail
        rows: Sequence[Any]
        if tail and tail[0][0] <= start + 1 <= tail[-1][0]:
            # A forwarder that keeps up reads what was just committed: serve it from memory
            # instead of querying SQLite for every batch (the rows are the same).
            # From the right end, where a forwarder that keeps up reads: islice from the left
            # walks the whole deque (20,000 rows) to reach it.
            size = len(tail)
            first = start + 1 - tail[0][0]
            end = min(first + limit, size)
            rows = list(itertools.islice(reversed(tail), size - end, size - first))
            rows.reverse()
        else:
            async with self._database.lock:
                rows = list(
                    await self._database.conn().execute_fetchall(
                        f"{_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?", (start, limit)
                    )
                )
        events: list[StoredEvent] = []
        wire: list[bytes] = []
        size = -1  # n items joined by n - 1 commas
        for row in rows:
            seq = int(row[0])
            if events and seq != events[-1].seq + 1:
                break  # a hole the cap left: the next batch starts after it
            event = StoredEvent(seq, row[1], KIND_NAMES[row[2]], row[3], row[4], row[5], row[6])
            encoded = event.wire().encode()
            if events and size + 1 + len(encoded) > max_bytes:
                break
            size += 1 + len(encoded)
            events.append(event)
            wire.append(encoded)
        if not events:
            return Batch(self._state.stream, start + 1, start, (), ())
        return Batch(self._state.stream, events[0].seq, events[-1].seq, tuple(events), tuple(wire))

    async def first_kept_after(self, after_seq: int) -> int | None:
        """The lowest seq still stored after `after_seq` (None: none)."""
        async with self._database.lock:
            rows = await self._database.conn().execute_fetchall(
                "SELECT MIN(seq) FROM events WHERE seq > ?", (after_seq,)
            )
        found = next(iter(rows))[0]
        return None if found is None else int(found)

    async def read_gaps(self, after_seq: int, limit: int) -> tuple[StoredEvent, ...]:
        """The oldest gap events after `after_seq` (raised to the acked seq when lower)."""
        start = max(after_seq, self._state.acked_seq)
        async with self._database.lock:
            rows = await self._database.conn().execute_fetchall(
                f"{_SELECT} WHERE kind = {KIND_CODES['gap']} AND seq > ? ORDER BY seq LIMIT ?",
                (start, limit),
            )
        return tuple(
            StoredEvent(int(row[0]), row[1], KIND_NAMES[row[2]], row[3], row[4], row[5], row[6])
            for row in rows
        )
