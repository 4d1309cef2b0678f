"""Group commit (docs/delivery.md): nothing is published before its COMMIT returned.

`append` (awaited) and `submit` (a callback, for the pipeline, which must not wait out the
commit) queue encoded rows; one writer task collects queued appends for at most
``commit_interval`` seconds or until ``commit_max_events`` are pending, writes them in ONE
transaction that is ONE call to the connection's thread (`Database.transact`), and then, in
append order, resolves every waiter and calls every callback. The fsync rate stays low and
producers never wait on each other's transactions. The queue is bounded (`room`): past
``QUEUED_COMMITS * commit_max_events`` queued events producers wait, so a slow disk slows the
pollers down instead of growing memory.

Acks the outbox took (sync/outbox/acks.py) are applied in the next insert transaction, or in
one of their own ``ack_delay`` seconds after the first of them when nothing is appended.

``seq`` comes from the counter in the ``meta`` row, updated in the same transaction as the
insert; SQLite never chooses a seq (rowids of an emptied table are reused), so seqs are
gapless, strictly increasing and never reused.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sync.events import Event, rfc3339
from sync.outbox.acks import Acks
from sync.outbox.cap import SizeCap
from sync.outbox.codec import Row, StoredRow, encode_event
from sync.outbox.database import INSERT_EVENT, LOOP_MAX_ROWS, Database, oldest_ts_in
from sync.outbox.errors import OutboxUnavailable
from sync.outbox.state import OutboxState

log = logging.getLogger("edge_agent.outbox")

SeqRange = tuple[int, int]  # (first_seq, last_seq) of one append
# Called on the event loop once a submitted append's COMMIT returned (None) or failed.
OnCommit = Callable[[OutboxUnavailable | None], None]

# Producers wait while this many full commits (commit_max_events each) are queued.
QUEUED_COMMITS = 4


@dataclass(slots=True, eq=False)
class _Pending:
    rows: list[Row]
    future: asyncio.Future[SeqRange] | None  # append(): awaited
    on_commit: OnCommit | None  # submit(): called back
    queued_at: float


@dataclass(slots=True, frozen=True)
class _Written:
    """What one insert transaction changed, read on the connection's thread."""

    last_seq: int
    count: int
    dropped: int
    used: int
    oldest: float | None
    deleted_upto: int


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
                "first_ts": rfc3339(self._first_ts),
                "last_ts": rfc3339(self._last_ts),
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
        acks: Acks,
        tail: deque[StoredRow],
        commit_interval: float,
        commit_max_events: int,
        ack_delay: float,
    ) -> None:
        if not 0 < commit_interval <= 10:
            raise ValueError("commit_interval must be in (0, 10] seconds")
        if not isinstance(commit_max_events, int) or commit_max_events < 1:
            raise ValueError("commit_max_events must be an int >= 1")
        if not ack_delay > 0:
            raise ValueError("ack_delay must be > 0")
        self._database = database
        self._state = state
        self._cap = cap
        self._acks = acks
        self._tail = tail  # the most recent committed rows, for BatchReader
        self._commit_interval = commit_interval
        self._commit_max_events = commit_max_events
        self._max_queued = QUEUED_COMMITS * commit_max_events
        self._ack_delay = ack_delay
        self._ack_due: float | None = None  # loop time when pending acks get their own commit
        self._ack_error: str | None = None
        self._queue: deque[_Pending] = deque()
        self._queued_events = 0
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
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
        """Commit every queued append and the acks taken, then let the writer task end."""
        self._closing = True
        self._wakeup.set()
        self._full.set()
        self._room.set()
        if self._task is not None:
            await self._task
            if self._task.exception() is None and self._database.connection is not None:
                try:
                    await self.apply_acks()
                except OutboxUnavailable as exc:
                    log.warning("outbox: acks not persisted at close (resent later): %s", exc)

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
        self._room.set()
        self._fail(pending, error)

    async def append(self, rows: list[Row]) -> SeqRange:
        """Queue `rows`; return their (first_seq, last_seq) once their COMMIT returned."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SeqRange] = loop.create_future()
        self._enqueue(_Pending(rows, future, None, loop.time()))
        return await future

    def submit(self, rows: list[Row], on_commit: OnCommit) -> None:
        """Queue `rows` and return at once; `on_commit` is called on the event loop after
        their COMMIT returned (None) or when it failed (the error), in queue order."""
        self._enqueue(_Pending(rows, None, on_commit, asyncio.get_running_loop().time()))

    async def room(self) -> None:
        """Wait while the queue is full (QUEUED_COMMITS groups of commit_max_events)."""
        while self._queued_events >= self._max_queued and not self._closing:
            self._room.clear()
            await self._room.wait()

    def acks_taken(self) -> None:
        """The outbox took an ack: delete its rows with the next commit, or alone soon."""
        if self._ack_due is None:
            self._ack_due = asyncio.get_running_loop().time() + self._ack_delay
            self._wakeup.set()  # the idle writer sets its timer

    def _enqueue(self, item: _Pending) -> None:
        if self._closing or self._task is None or self._task.done():
            self._state.append_failures += 1
            raise OutboxUnavailable("outbox is not open")
        self._queue.append(item)
        self._queued_events += len(item.rows)
        self._wakeup.set()
        if self._queued_events >= self._commit_max_events:
            self._full.set()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (on the event loop) after every commit of new events."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Undo `add_listener` (no error if it is not registered)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def commit(self, batches: Sequence[Sequence[Row]]) -> list[SeqRange]:
        """Insert `batches` with the next seqs in one transaction, with the pending acks'
        deletion and the cap; return each batch's (first_seq, last_seq).

        The tail, the state and the listeners see the rows only after the COMMIT returned.
        """
        rows, ranges = _number_rows(self._state.last_seq, batches)
        database, state, cap = self._database, self._state, self._cap
        seq = state.last_seq + len(rows)
        ack_upto = self._acks.next_chunk()
        events_count, dropped_total, oldest_before = (
            state.events_count,
            state.dropped_total,
            state.oldest_ts,
        )

        def write(connection: sqlite3.Connection) -> _Written:
            # Acked rows go first: their pages are free again before the cap measures.
            deleted = 0 if ack_upto is None else Acks.delete_in(connection, ack_upto)
            count = events_count - deleted
            connection.executemany(INSERT_EVENT, rows)
            oldest = oldest_before if count else (rows[0][1] if rows else None)
            count += len(rows)
            last, dropped = seq, 0
            used = database.update_meta_in(connection, last, dropped_total)
            if used > cap.max_size:
                last, count, dropped, used = cap.enforce(connection, last, count, used)
                used = database.update_meta_in(connection, last, dropped_total + dropped)
            if deleted or dropped:
                oldest = oldest_ts_in(connection)
            upto = state.deleted_upto if ack_upto is None else ack_upto
            return _Written(last, count, dropped, used, oldest, upto)

        # Small enough for the event loop: neither a large insert nor a large ack chunk, and
        # not near the cap, whose enforcement deletes an unknown number of rows.
        small = (
            len(rows) <= LOOP_MAX_ROWS
            and (ack_upto is None or ack_upto - state.deleted_upto <= LOOP_MAX_ROWS)
            and state.bytes_used < cap.max_size * 0.9
        )
        async with database.lock:
            written = await database.transact(
                write, f"cannot commit {len(rows)} events to {database.path}", small=small
            )
        if written.dropped:
            self._tail.clear()  # the cache must never serve an event the cap dropped
        else:
            self._tail.extend(rows)
        state.last_seq = written.last_seq
        state.events_count = written.count
        state.bytes_used = written.used
        state.oldest_ts = written.oldest
        state.dropped_total += written.dropped
        state.commits += 1
        self._acks_applied(written.deleted_upto)
        self._notify()
        return ranges

    async def apply_acks(self) -> None:
        """Delete what the acks taken cover now, in transactions of their own."""
        while (upto := self._acks.next_chunk()) is not None:
            database, state = self._database, self._state

            def delete(
                connection: sqlite3.Connection, upto: int = upto
            ) -> tuple[int, float | None]:
                deleted = Acks.delete_in(connection, upto)
                return deleted, oldest_ts_in(connection)

            async with database.lock:
                if upto <= state.deleted_upto:
                    continue  # an insert transaction got there first
                deleted, oldest = await database.transact(
                    delete, f"cannot record ack {upto} in {database.path}"
                )
            state.events_count -= deleted
            state.oldest_ts = oldest
            state.commits += 1
            self._acks_applied(upto)

    def _acks_applied(self, upto: int) -> None:
        self._state.deleted_upto = max(self._state.deleted_upto, upto)
        if not self._acks.pending:
            self._ack_due = None
            self._ack_error = None
        elif self._ack_due is None:  # taken while the transaction ran
            self._ack_due = asyncio.get_running_loop().time() + self._ack_delay

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                if self._ack_due is None:
                    await self._wakeup.wait()
                else:
                    await self._acks_alone(self._ack_due)
                continue
            if self._queued_events < self._commit_max_events and not self._closing:
                await self._collect()
            await self._commit_group(self._take_group())

    async def _acks_alone(self, due: float) -> None:
        # Nothing to insert: apply the acks taken in a transaction of their own once due,
        # unless an append comes first and takes them along.
        try:
            async with asyncio.timeout_at(due):
                await self._wakeup.wait()
            return
        except TimeoutError:
            pass
        try:
            await self.apply_acks()
        except OutboxUnavailable as exc:
            self._ack_due = asyncio.get_running_loop().time() + self._ack_delay
            if self._ack_error != str(exc):
                self._ack_error = str(exc)
                log.warning("outbox: acked events not deleted yet (retrying): %s", exc)

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
        if self._queued_events < self._max_queued:
            self._room.set()
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
        except BaseException:  # cancelled (a cancelled close): no waiter may hang either
            self._fail(group, OutboxUnavailable("outbox closed"))
            raise
        if refused:
            ranges = ranges[1:]
            log.warning(
                "outbox: appends work again; %d refused events recorded as a gap",
                self._refused.count,
            )
            self._refused = RefusedEvents()
        for item, seqs in zip(group, ranges, strict=True):
            if item.on_commit is not None:
                _call_back(item.on_commit, None)
            elif item.future is not None and not item.future.done():
                item.future.set_result(seqs)

    def _fail(self, items: Sequence[_Pending], error: OutboxUnavailable) -> None:
        self._state.append_failures += len(items)
        for item in items:
            if item.on_commit is not None:
                _call_back(item.on_commit, error)
            elif item.future is not None and not item.future.done():
                item.future.set_exception(error)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a listener's bug must not fail the appends
                log.exception("outbox commit listener failed")


def _call_back(on_commit: OnCommit, error: OutboxUnavailable | None) -> None:
    try:
        on_commit(error)
    except Exception:  # a caller's bug must not stop the writer
        log.exception("outbox commit callback failed")


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
