"""Group commit (docs/delivery.md): nothing is published before its COMMIT returned.

`append` encodes its events on the caller's side and queues them; one writer task collects
queued appends for at most ``commit_interval`` seconds or until ``commit_max_events`` are
pending, writes them in ONE transaction and then resolves every waiter. The fsync rate stays
low and producers never wait on each other's transactions.

``seq`` comes from the counter in the ``meta`` row, updated in the same transaction as the
insert; SQLite never chooses a seq (rowids of an emptied table are reused), so seqs are
gapless, strictly increasing and never reused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sync.events import Event
from sync.outbox.cap import SizeCap
from sync.outbox.codec import Row, StoredRow, encode_event, ts_text
from sync.outbox.database import INSERT_EVENT, Database
from sync.outbox.errors import OutboxUnavailable
from sync.outbox.state import OutboxState

log = logging.getLogger("edge_agent.outbox")

SeqRange = tuple[int, int]  # (first_seq, last_seq) of one append


@dataclass(slots=True, eq=False)
class _Pending:
    rows: list[Row]
    future: asyncio.Future[SeqRange]
    queued_at: float


class RefusedEvents:
    """Events whose append failed (disk full), declared later by one ``append_failed`` gap."""

    def __init__(self) -> None:
        self.count = 0
        self._first_ts = 0.0
        self._last_ts = 0.0
        self._reason = ""

    def note(self, batches: Sequence[Sequence[Row]], reason: str) -> None:
        """Count the rows of a failed group commit."""
        for batch in batches:
            for row in batch:
                ts = float(row[0])
                if self.count == 0:
                    self._first_ts = ts
                    self._last_ts = ts
                    self._reason = reason
                self._first_ts = min(self._first_ts, ts)
                self._last_ts = max(self._last_ts, ts)
                self.count += 1

    def gap_rows(self) -> list[Row]:
        """The gap event's row, or no row when nothing was refused."""
        if self.count == 0:
            return []
        gap = Event(
            time.time(),
            "gap",
            value={
                "reason": "append_failed",
                "ranges": [],
                "count": self.count,
                "first_ts": ts_text(self._first_ts),
                "last_ts": ts_text(self._last_ts),
                "detail": self._reason,
            },
        )
        return [encode_event(gap)]


class GroupCommitWriter:
    """Queues appends and commits them in groups, one transaction each, from one task."""

    def __init__(
        self,
        *,
        database: Database,
        state: OutboxState,
        cap: SizeCap,
        tail: deque[StoredRow],
        commit_interval: float,
        commit_max_events: int,
    ) -> None:
        if not 0 < commit_interval <= 10:
            raise ValueError("commit_interval must be in (0, 10] seconds")
        if not isinstance(commit_max_events, int) or commit_max_events < 1:
            raise ValueError("commit_max_events must be an int >= 1")
        self._database = database
        self._state = state
        self._cap = cap
        self._tail = tail  # the most recent committed rows, for BatchReader
        self._commit_interval = commit_interval
        self._commit_max_events = commit_max_events
        self._queue: deque[_Pending] = deque()
        self._queued_events = 0
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._refused = RefusedEvents()
        self._listeners: list[Callable[[], None]] = []

    def start(self) -> None:
        """Start the writer task (once the database is open)."""
        self._task = asyncio.create_task(
            self._write_loop(), name=f"outbox-writer:{self._database.path}"
        )

    async def finish(self) -> None:
        """Commit every queued append, then let the writer task end."""
        self._closing = True
        self._wakeup.set()
        self._full.set()
        if self._task is not None:
            await self._task

    async def stop(self, error: OutboxUnavailable) -> None:
        """End the writer task if `finish` did not, and fail the appends still queued."""
        task = self._task
        if task is not None and not task.done():
            # close() was cancelled while finish() waited: stop the writer; an open transaction
            # is rolled back when the connection closes, and its appends never reported success.
            task.cancel()
            await asyncio.wait([task])
        pending = list(self._queue)
        self._queue.clear()
        self._queued_events = 0
        self._fail(pending, error)

    async def append(self, rows: list[Row]) -> SeqRange:
        """Queue `rows`; return their (first_seq, last_seq) once their COMMIT returned."""
        if self._closing or self._task is None or self._task.done():
            self._state.append_failures += 1
            raise OutboxUnavailable("outbox is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SeqRange] = loop.create_future()
        self._queue.append(_Pending(rows, future, loop.time()))
        self._queued_events += len(rows)
        self._wakeup.set()
        if self._queued_events >= self._commit_max_events:
            self._full.set()
        return await future

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (on the event loop) after every commit of new events."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Undo `add_listener` (no error if it is not registered)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def commit(self, batches: Sequence[Sequence[Row]]) -> list[SeqRange]:
        """Insert `batches` with the next seqs in one transaction, enforce the cap, commit.

        Returns each batch's (first_seq, last_seq). The tail, the state and the listeners see
        the rows only after the COMMIT returned.
        """
        rows, ranges = _number_rows(self._state.last_seq, batches)
        database, state = self._database, self._state
        seq = state.last_seq + len(rows)
        async with (
            database.lock,
            database.transaction(f"cannot commit {len(rows)} events to {database.path}") as db,
        ):
            await db.executemany(INSERT_EVENT, rows)
            count = state.events_count + len(rows)
            dropped = 0
            oldest = state.oldest_ts if state.events_count else rows[0][1]
            used = await database.update_meta(seq, state.dropped_total)
            if used > self._cap.max_size:
                seq, count, dropped, used = await self._cap.enforce(seq, count, used)
                oldest = await database.oldest_ts()
                used = await database.update_meta(seq, state.dropped_total + dropped)
        if dropped:
            self._tail.clear()  # the cache must never serve an event the cap dropped
        else:
            self._tail.extend(rows)
        state.last_seq = seq
        state.events_count = count
        state.bytes_used = used
        state.oldest_ts = oldest
        state.dropped_total += dropped
        state.commits += 1
        self._notify()
        return ranges

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._queued_events < self._commit_max_events and not self._closing:
                await self._collect()
            await self._commit_group(self._take_group())

    async def _collect(self) -> None:
        # Collect more appends for up to commit_interval after the oldest one queued.
        self._full.clear()
        try:
            async with asyncio.timeout_at(self._queue[0].queued_at + self._commit_interval):
                await self._full.wait()
        except TimeoutError:
            pass

    def _take_group(self) -> list[_Pending]:
        group: list[_Pending] = []
        taken = 0
        while self._queue and (
            not group or taken + len(self._queue[0].rows) <= self._commit_max_events
        ):
            item = self._queue.popleft()
            group.append(item)
            taken += len(item.rows)
        self._queued_events -= taken
        return group

    async def _commit_group(self, group: list[_Pending]) -> None:
        # Events refused earlier (disk full) are not lost silently: the first commit that
        # works again starts with a gap event that counts them.
        refused = self._refused.gap_rows()
        batches = [item.rows for item in group]
        try:
            ranges = await self.commit([refused, *batches] if refused else batches)
        except OutboxUnavailable as exc:
            self._refused.note(batches, str(exc))
            self._fail(group, exc)
            return
        except Exception as exc:  # a bug must fail the waiters, not hang them
            log.exception("outbox writer: unexpected error")
            self._fail(group, OutboxUnavailable(f"outbox write failed: {exc!r}"))
            return
        if refused:
            ranges = ranges[1:]
            log.warning(
                "outbox: appends work again; %d refused events recorded as a gap",
                self._refused.count,
            )
            self._refused = RefusedEvents()
        for item, seqs in zip(group, ranges, strict=True):
            if not item.future.done():
                item.future.set_result(seqs)

    def _fail(self, items: Sequence[_Pending], error: OutboxUnavailable) -> None:
        self._state.append_failures += len(items)
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a listener's bug must not fail the appends
                log.exception("outbox commit listener failed")


def _number_rows(
    last_seq: int, batches: Sequence[Sequence[Row]]
) -> tuple[list[StoredRow], list[SeqRange]]:
    """Give the rows of `batches` the seqs after `last_seq`; return them and each batch's range."""
    seq = last_seq
    rows: list[StoredRow] = []
    ranges: list[SeqRange] = []
    for batch in batches:
        first = seq + 1
        for row in batch:
            seq += 1
            rows.append((seq, *row))
        ranges.append((first, seq))
    return rows, ranges
