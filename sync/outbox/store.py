"""The durable outbox: every event is committed to SQLite before anything else happens to it.

Design (see design.md §6 and §9):

* One aiosqlite connection in WAL mode with ``synchronous=FULL`` and ``locking_mode=EXCLUSIVE``
  (a second process on the same file fails at open instead of interleaving seqs).
* Group commit: `append` encodes its events on the caller's side and queues them; one writer
  task collects queued appends for at most ``commit_interval`` seconds or until
  ``commit_max_events`` are pending, writes them in ONE transaction and then resolves every
  waiter. The fsync rate stays low and producers never wait on each other's transactions.
* ``seq`` comes from an explicit counter in the ``meta`` row that is updated in the same
  transaction as the insert; SQLite never chooses a seq (rowids of an emptied table are
  reused, design §9), so seqs are gapless, strictly increasing and never reused.
* The cap (``max_size``) is enforced inside the same transaction: past it the oldest *sample*
  events are deleted and ``gap`` events with the exact seq ranges are inserted.
* At open, ``PRAGMA quick_check``; a corrupt file is moved aside and a new stream starts with
  a ``corruption_recovery`` gap event.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import os
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite

from sync import sqlite
from sync.events import Event, rfc3339
from sync.outbox.codec import KIND_NAMES, SAMPLE_KIND, Row, StoredEvent, encode_event, ts_text
from sync.outbox.errors import OutboxFull, OutboxUnavailable

__all__ = ["Batch", "Outbox", "OutboxFull", "OutboxUnavailable"]

log = logging.getLogger("edge_agent.outbox")

SCHEMA_VERSION = 1

SCHEMA: tuple[str, ...] = (
    """
CREATE TABLE IF NOT EXISTS meta (
    id           INTEGER PRIMARY KEY CHECK (id = 1),  -- exactly one row
    version      INTEGER NOT NULL,
    stream       TEXT    NOT NULL,   -- UUID created with the database
    created      REAL    NOT NULL,   -- epoch seconds
    last_seq     INTEGER NOT NULL,   -- highest seq ever committed; the seq counter
    acked_seq    INTEGER NOT NULL,   -- central watermark: every seq <= it is acknowledged
    dropped_total INTEGER NOT NULL   -- sample events dropped by the cap, ever
)""",
    """
CREATE TABLE IF NOT EXISTS events (
    seq     INTEGER PRIMARY KEY,     -- always given explicitly from meta.last_seq
    ts      REAL    NOT NULL,        -- epoch seconds (UTC)
    kind    INTEGER NOT NULL,        -- KIND_CODES
    device  TEXT,
    tag     TEXT,
    value   TEXT,                    -- JSON text; NULL for a null value
    quality TEXT
)""",
)

TAIL_EVENTS = 20_000  # recent committed events kept in memory for the forwarder
_INSERT = "INSERT INTO events (seq, ts, kind, device, tag, value, quality) VALUES (?,?,?,?,?,?,?)"
_SELECT = "SELECT seq, ts, kind, device, tag, value, quality FROM events"

# Every S/sync event object is at least this long (seq, ts, kind and four nulls), so reading
# max_bytes // _MIN_WIRE_EVENT + 1 rows always fills a byte budget.
_MIN_WIRE_EVENT = 96
# Largest number of rows deleted per transaction when an ack covers a huge range, so that an
# ack after a long outage does not hold up appends for seconds.
_ACK_CHUNK = 50_000
# At most this many ranges per gap event, so that a gap event stays far below broker limits.
_GAP_RANGES_PER_EVENT = 1000
_MIN_MAX_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Batch:
    """A lease of the oldest unacknowledged events after some seq, obeying the coverage rule.

    The batch covers every seq in ``[first_seq, last_seq]``; seqs in that range that are not in
    ``events`` were dropped by the cap (a gap event declares them). ``first_seq`` is the seq
    after the one the reader asked to continue from, so consecutive batches tile the seq space.
    An empty batch (``last_seq == first_seq - 1``) means nothing is there to send.
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


@dataclass(slots=True, eq=False)
class _Pending:
    rows: list[Row]
    future: asyncio.Future[tuple[int, int]]
    queued_at: float


@dataclass(frozen=True, slots=True)
class _Recovery:
    detail: str
    moved_to: str
    previous_stream: str | None
    previous_last_seq: int | None
    previous_acked_seq: int | None


class Outbox:
    """The SQLite outbox; use as ``async with Outbox(path, max_size=...) as outbox``."""

    def __init__(
        self,
        path: Path,
        *,
        max_size: int,
        commit_interval: float = 0.05,
        commit_max_events: int = 1000,
    ) -> None:
        if not isinstance(max_size, int) or max_size < _MIN_MAX_SIZE:
            raise ValueError(f"max_size must be an int >= {_MIN_MAX_SIZE} bytes")
        if not 0 < commit_interval <= 10:
            raise ValueError("commit_interval must be in (0, 10] seconds")
        if not isinstance(commit_max_events, int) or commit_max_events < 1:
            raise ValueError("commit_max_events must be an int >= 1")
        self._path = Path(path)
        self._max_size = max_size
        # Past the cap, drop down to this much below it, so that a full outbox drops (and
        # writes a gap event) every few thousand events rather than on every commit, while one
        # drop transaction stays short.
        self._headroom = min(max(max_size // 32, 16 * 1024), 16 * 1024 * 1024)
        self._commit_interval = commit_interval
        self._commit_max_events = commit_max_events
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one transaction or read at a time on the one connection
        self._queue: deque[_Pending] = deque()
        self._queued_events = 0
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._stream = ""
        self._page_size = 4096
        self._last_seq = 0
        self._acked_seq = 0
        self._events_count = 0
        self._bytes_used = 0
        self._oldest_ts: float | None = None
        self._dropped_total = 0
        self._append_failures = 0
        self._refused_count = 0
        # The most recent committed rows (seq, ts, kind, device, tag, value, quality), in seq
        # order without holes: read_batch serves a forwarder that keeps up from here.
        self._tail: deque[tuple[Any, ...]] = deque(maxlen=TAIL_EVENTS)
        self._refused_first_ts = 0.0
        self._refused_last_ts = 0.0
        self._refused_reason = ""
        self._commits = 0
        self._ack_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_ids = itertools.count()
        self._listeners: list[Callable[[], None]] = []
        self._foreign_streams: set[str] = set()
        self._recovery: _Recovery | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._db is not None or self._closed:
            raise RuntimeError("an Outbox can be opened once")
        try:
            await self._open()
        except BaseException:
            # Cancelled or failed half-way: the connection's thread must not outlive us.
            db, self._db = self._db, None
            if db is not None:
                await asyncio.shield(db.close())
            raise
        self._writer = asyncio.create_task(self._write_loop(), name=f"outbox-writer:{self._path}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Commit every pending append, then close the database (idempotent)."""
        if self._closed:
            return
        self._closing = True
        self._wakeup.set()
        self._full.set()
        writer = self._writer
        try:
            if writer is not None:
                await writer
        finally:
            self._closed = True
            if writer is not None and not writer.done():
                # We are being cancelled: stop the writer; an open transaction is rolled back
                # when the connection closes, and its appends never reported success.
                writer.cancel()
                await asyncio.wait([writer])
            self._fail_pending(OutboxUnavailable("outbox closed"))
            for _, _, waiter in self._ack_waiters:
                if not waiter.done():
                    waiter.set_exception(OutboxUnavailable("outbox closed"))
            self._ack_waiters.clear()
            db, self._db = self._db, None
            if db is not None:
                await db.close()

    async def _open(self) -> None:
        await asyncio.to_thread(self._path.parent.mkdir, parents=True, exist_ok=True)
        size = await asyncio.to_thread(_file_size, self._path)
        if size:
            problem = await self._inspect()
            if problem is not None:
                self._recovery = await self._move_aside(*problem)
        try:
            self._db = await sqlite.connect(self._path, isolation_level=None, timeout=1.0)
            await self._configure()
            if self._recovery is not None:
                await self._record_recovery(self._recovery)
        except BaseException as exc:
            db, self._db = self._db, None
            if db is not None:
                await db.close()
            if isinstance(exc, sqlite3.Error):
                raise OutboxUnavailable(f"cannot open outbox {self._path}: {exc}") from exc
            raise

    async def _inspect(self) -> tuple[str, str | None, int | None, int | None] | None:
        """Return (problem, previous stream, last_seq, acked_seq) if the file is corrupt."""
        meta: tuple[str | None, int | None, int | None] = (None, None, None)
        try:
            async with aiosqlite.connect(self._path, isolation_level=None, timeout=1.0) as db:
                try:
                    rows = list(
                        await db.execute_fetchall("SELECT stream, last_seq, acked_seq FROM meta")
                    )
                    if rows:
                        meta = (str(rows[0][0]), int(rows[0][1]), int(rows[0][2]))
                except sqlite3.DatabaseError as exc:
                    if not _is_corruption(exc) and "no such table" not in str(exc):
                        raise
                result = [str(row[0]) for row in await db.execute_fetchall("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            if _is_corruption(exc):
                return (str(exc), *meta)
            raise OutboxUnavailable(f"cannot open outbox {self._path}: {exc}") from exc
        if result != ["ok"]:
            return ("quick_check: " + "; ".join(result[:5]), *meta)
        return None

    async def _move_aside(
        self, problem: str, stream: str | None, last_seq: int | None, acked_seq: int | None
    ) -> _Recovery:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        name, moved = await asyncio.to_thread(_move_files, self._path, target)
        log.error(
            "outbox %s is corrupt (%s); moved aside as %s, starting a new stream",
            self._path,
            problem,
            ", ".join(moved),
        )
        return _Recovery(problem, name, stream, last_seq, acked_seq)

    async def _configure(self) -> None:
        db = self._conn()
        # EXCLUSIVE before WAL: no shared-memory file, and the lock taken by the first write
        # below keeps a second agent on the same file out.
        await db.execute("PRAGMA locking_mode = EXCLUSIVE")
        mode = list(await db.execute_fetchall("PRAGMA journal_mode = WAL"))
        if str(mode[0][0]).lower() != "wal":
            raise OutboxUnavailable(f"cannot switch {self._path} to WAL mode")
        await db.execute("PRAGMA synchronous = FULL")
        (page_size,) = await _one(db, "PRAGMA page_size")
        self._page_size = int(page_size)
        # The WAL counts against the disk too: checkpoint once it holds 1/16 of the cap (at
        # most SQLite's default of 1,000 pages), and truncate it back to that size afterwards.
        wal_pages = min(max(self._max_size // 16 // self._page_size, 16), 1000)
        await db.execute(f"PRAGMA wal_autocheckpoint = {wal_pages}")
        await db.execute(f"PRAGMA journal_size_limit = {wal_pages * self._page_size}")
        # 4 MiB of page cache (SQLite's default is 2): the hot pages are the ends of the seq
        # index. The cache fills with every larger backlog until it reaches this size, so it
        # is part of the agent's steady-state memory; the OS caches the rest of the file.
        await db.execute("PRAGMA cache_size = -4096")
        await db.execute("PRAGMA temp_store = MEMORY")
        await db.execute("BEGIN IMMEDIATE")
        try:
            tables = {
                str(row[0])
                for row in await db.execute_fetchall(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
            if tables and not {"meta", "events"} <= tables:
                raise OutboxUnavailable(
                    f"{self._path} is an SQLite database but not an outbox (tables: "
                    f"{', '.join(sorted(tables))}); refusing to touch it"
                )
            for statement in SCHEMA:
                await db.execute(statement)
            rows = list(await db.execute_fetchall("SELECT version, stream FROM meta"))
            if not rows:
                stream = str(uuid.uuid4())
                await db.execute(
                    "INSERT INTO meta (id, version, stream, created, last_seq, acked_seq, "
                    "dropped_total) VALUES (1, ?, ?, ?, 0, 0, 0)",
                    (SCHEMA_VERSION, stream, time.time()),
                )
                log.info("outbox %s: new stream %s", self._path, stream)
            elif int(rows[0][0]) > SCHEMA_VERSION:
                raise OutboxUnavailable(
                    f"{self._path} has outbox schema version {rows[0][0]}; this version "
                    f"understands up to {SCHEMA_VERSION}"
                )
            await db.execute("COMMIT")
        except BaseException:
            await _rollback(db)
            raise
        stream, last_seq, acked_seq, dropped = await _one(
            db, "SELECT stream, last_seq, acked_seq, dropped_total FROM meta"
        )
        self._stream = str(stream)
        self._last_seq = int(last_seq)
        self._acked_seq = int(acked_seq)
        self._dropped_total = int(dropped)
        count, max_seq = await _one(db, "SELECT count(*), max(seq) FROM events")
        self._events_count = int(count)
        if max_seq is not None and int(max_seq) > self._last_seq:
            # Cannot happen (the counter is written in the insert transaction); never reuse.
            log.error("outbox %s: seq counter %d behind max seq %d", self._path, last_seq, max_seq)
            self._last_seq = int(max_seq)
        self._oldest_ts = await self._query_oldest_ts()
        self._bytes_used = await self._measure()

    async def _record_recovery(self, recovery: _Recovery) -> None:
        ranges: list[list[int]] = []
        last, acked = recovery.previous_last_seq, recovery.previous_acked_seq
        if last is not None and acked is not None and last > acked:
            ranges.append([acked + 1, last])
        value = {
            "reason": "corruption_recovery",
            "ranges": ranges,  # seqs of the previous stream that were not yet acknowledged
            "count": sum(last - first + 1 for first, last in ranges),
            "previous_stream": recovery.previous_stream,
            "moved_to": recovery.moved_to,
            "detail": recovery.detail[:500],
        }
        row = encode_event(Event(time.time(), "gap", value=value))
        await self._transaction([[row]])

    # -- appending ---------------------------------------------------------------------------

    async def append(self, events: Sequence[Event]) -> tuple[int, int]:
        """Commit `events`; return their (first_seq, last_seq) once the COMMIT returned.

        Raises OutboxUnavailable (disk full, I/O error, closed); the events are then not stored.
        Raises ValueError for an event that cannot be stored (unknown kind, bad ts, not JSON).
        """
        if not events:
            raise ValueError("append needs at least one event")
        rows = [encode_event(event) for event in events]
        if self._closing or self._writer is None or self._writer.done():
            self._append_failures += 1
            raise OutboxUnavailable("outbox is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int]] = loop.create_future()
        self._queue.append(_Pending(rows, future, loop.time()))
        self._queued_events += len(rows)
        self._wakeup.set()
        if self._queued_events >= self._commit_max_events:
            self._full.set()
        return await future

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._queued_events < self._commit_max_events and not self._closing:
                # Collect more appends for up to commit_interval after the oldest one queued.
                self._full.clear()
                try:
                    async with asyncio.timeout_at(self._queue[0].queued_at + self._commit_interval):
                        await self._full.wait()
                except TimeoutError:
                    pass
            group: list[_Pending] = []
            taken = 0
            while self._queue and (
                not group or taken + len(self._queue[0].rows) <= self._commit_max_events
            ):
                item = self._queue.popleft()
                group.append(item)
                taken += len(item.rows)
            self._queued_events -= taken
            # Events refused earlier (disk full) are not lost silently: the first commit that
            # works again starts with a gap event that counts them.
            refused = self._refused_gap()
            batches = [item.rows for item in group]
            try:
                ranges = await self._transaction([refused, *batches] if refused else batches)
            except OutboxUnavailable as exc:
                self._append_failures += len(group)
                self._note_refused(batches, str(exc))
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            except Exception as exc:  # a bug must fail the waiters, not hang them
                log.exception("outbox writer: unexpected error")
                self._append_failures += len(group)
                error = OutboxUnavailable(f"outbox write failed: {exc!r}")
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            if refused:
                ranges = ranges[1:]
                log.warning(
                    "outbox: appends work again; %d refused events recorded as a gap",
                    self._refused_count,
                )
                self._refused_count = 0
            for item, seqs in zip(group, ranges, strict=True):
                if not item.future.done():
                    item.future.set_result(seqs)

    def _note_refused(self, batches: Sequence[Sequence[Row]], reason: str) -> None:
        for batch in batches:
            for row in batch:
                ts = float(row[0])
                if self._refused_count == 0:
                    self._refused_first_ts = ts
                    self._refused_last_ts = ts
                    self._refused_reason = reason
                self._refused_first_ts = min(self._refused_first_ts, ts)
                self._refused_last_ts = max(self._refused_last_ts, ts)
                self._refused_count += 1

    def _refused_gap(self) -> list[Row]:
        if self._refused_count == 0:
            return []
        gap = Event(
            time.time(),
            "gap",
            value={
                "reason": "append_failed",
                "ranges": [],
                "count": self._refused_count,
                "first_ts": ts_text(self._refused_first_ts),
                "last_ts": ts_text(self._refused_last_ts),
                "detail": self._refused_reason,
            },
        )
        return [encode_event(gap)]

    def _fail_pending(self, error: OutboxUnavailable) -> None:
        while self._queue:
            item = self._queue.popleft()
            self._append_failures += 1
            if not item.future.done():
                item.future.set_exception(error)
        self._queued_events = 0

    async def _transaction(self, batches: Sequence[Sequence[Row]]) -> list[tuple[int, int]]:
        """Insert `batches` with the next seqs in one transaction, enforce the cap, commit."""
        db = self._conn()
        seq = self._last_seq
        rows: list[tuple[Any, ...]] = []
        ranges: list[tuple[int, int]] = []
        for batch in batches:
            first = seq + 1
            for row in batch:
                seq += 1
                rows.append((seq, *row))
            ranges.append((first, seq))
        async with self._lock:
            try:
                await db.execute("BEGIN IMMEDIATE")
                await db.executemany(_INSERT, rows)
                count = self._events_count + len(rows)
                dropped = 0
                oldest = self._oldest_ts if self._events_count else rows[0][1]
                used = await self._update_meta(seq, self._dropped_total)
                if used > self._max_size:
                    seq, count, dropped, used = await self._enforce_cap(seq, count, used)
                    oldest = await self._query_oldest_ts()
                    used = await self._update_meta(seq, self._dropped_total + dropped)
                await db.execute("COMMIT")
            except sqlite3.Error as exc:
                await _rollback(db)
                raise OutboxUnavailable(
                    f"cannot commit {len(rows)} events to {self._path}: {exc}"
                ) from exc
            except BaseException:
                await _rollback(db)
                raise
        if dropped:
            self._tail.clear()  # the cache must never serve an event the cap dropped
        else:
            self._tail.extend(rows)
        self._last_seq = seq
        self._events_count = count
        self._bytes_used = used
        self._oldest_ts = oldest
        self._dropped_total += dropped
        self._commits += 1
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a listener's bug must not fail the appends
                log.exception("outbox commit listener failed")
        return ranges

    async def _enforce_cap(self, seq: int, count: int, used: int) -> tuple[int, int, int, int]:
        """Drop the oldest samples (inside the open transaction) until under the cap.

        Returns (last seq incl. gap events, events count, samples dropped, bytes used).
        """
        db = self._conn()
        target = self._max_size - self._headroom
        dropped: list[tuple[int, float]] = []
        while used > target:
            per_event = used / max(count, 1)
            want = max(16, math.ceil((used - target) / per_event))
            gone = [
                (int(row[0]), float(row[1]))
                for row in await db.execute_fetchall(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE kind = ? "
                    "ORDER BY seq LIMIT ?) RETURNING seq, ts",
                    (SAMPLE_KIND, want),
                )
            ]
            if not gone:
                break
            dropped.extend(gone)
            count -= len(gone)
            used = await self._measure()
        if used > self._max_size:
            raise OutboxFull(
                f"outbox {self._path} is over its cap of {self._max_size} bytes and holds no "
                "sample events to drop (states, counts, OEE, alarms, workflow and gap events "
                "are never dropped)"
            )
        if not dropped:
            return seq, count, 0, used
        dropped.sort()
        ranges = _ranges([item[0] for item in dropped])
        first_ts = min(item[1] for item in dropped)
        last_ts = max(item[1] for item in dropped)
        gap_rows: list[tuple[Any, ...]] = []
        for start in range(0, len(ranges), _GAP_RANGES_PER_EVENT):
            part = ranges[start : start + _GAP_RANGES_PER_EVENT]
            value = {
                "reason": "buffer_full",
                "ranges": part,
                "count": sum(last - first + 1 for first, last in part),
                "first_ts": rfc3339(first_ts),
                "last_ts": rfc3339(last_ts),
            }
            seq += 1
            gap_rows.append((seq, *encode_event(Event(time.time(), "gap", value=value))))
        await db.executemany(_INSERT, gap_rows)
        log.warning(
            "outbox %s over its cap of %d bytes: dropped %d oldest samples (seq %d..%d)",
            self._path,
            self._max_size,
            len(dropped),
            dropped[0][0],
            dropped[-1][0],
        )
        return seq, count + len(gap_rows), len(dropped), await self._measure()

    # -- reading and settling (the forwarder's lease interface) --------------------------------

    async def read_batch(self, after_seq: int, max_events: int, max_bytes: int) -> Batch:
        """The oldest committed events after `after_seq`, cut by events or wire bytes.

        The batch covers ``[after_seq + 1, last_seq]`` (``after_seq`` is raised to the acked
        seq when lower). An event larger than `max_bytes` comes alone in its own batch.
        """
        if max_events < 1 or max_bytes < 1:
            raise ValueError("max_events and max_bytes must be >= 1")
        start = max(after_seq, self._acked_seq)
        limit = min(max_events, max_bytes // _MIN_WIRE_EVENT + 1)
        tail = self._tail
        rows: Sequence[Any]
        if tail and tail[0][0] <= start + 1 <= tail[-1][0]:
            # A forwarder that keeps up reads what was just committed: serve it from memory
            # instead of querying SQLite for every batch (the rows are the same).
            first = start + 1 - tail[0][0]
            rows = list(itertools.islice(tail, first, first + limit))
        else:
            async with self._lock:
                rows = list(
                    await self._conn().execute_fetchall(
                        f"{_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?", (start, limit)
                    )
                )
        events: list[StoredEvent] = []
        wire: list[bytes] = []
        size = -1  # n items joined by n - 1 commas
        for row in rows:
            event = StoredEvent(
                int(row[0]), row[1], KIND_NAMES[row[2]], row[3], row[4], row[5], row[6]
            )
            encoded = event.wire().encode()
            if events and size + 1 + len(encoded) > max_bytes:
                break
            size += 1 + len(encoded)
            events.append(event)
            wire.append(encoded)
        last = events[-1].seq if events else start
        return Batch(self._stream, start + 1, last, tuple(events), tuple(wire))

    async def ack(self, stream: str, acked_seq: int) -> bool:
        """Delete every event covered by the central store's ack; False if nothing changed.

        Idempotent: a lower or repeated ack, or an ack of another stream, changes nothing.
        """
        if stream != self._stream:
            if stream not in self._foreign_streams:
                self._foreign_streams.add(stream)
                log.warning(
                    "outbox %s: ignoring ack for stream %s (ours is %s)",
                    self._path,
                    stream,
                    self._stream,
                )
            return False
        target = acked_seq
        if target > self._last_seq:
            log.warning(
                "outbox %s: ack %d beyond the last committed seq %d; using the latter",
                self._path,
                acked_seq,
                self._last_seq,
            )
            target = self._last_seq
        changed = False
        while self._acked_seq < target:
            upto = min(target, self._acked_seq + _ACK_CHUNK)
            db = self._conn()
            async with self._lock:
                if upto <= self._acked_seq:
                    continue
                try:
                    await db.execute("BEGIN IMMEDIATE")
                    cursor = await db.execute("DELETE FROM events WHERE seq <= ?", (upto,))
                    deleted = max(cursor.rowcount, 0)
                    await db.execute("UPDATE meta SET acked_seq = ? WHERE id = 1", (upto,))
                    oldest = await self._query_oldest_ts()
                    await db.execute("COMMIT")
                except sqlite3.Error as exc:
                    await _rollback(db)
                    raise OutboxUnavailable(
                        f"cannot record ack {upto} in {self._path}: {exc}"
                    ) from exc
                except BaseException:
                    await _rollback(db)
                    raise
            self._acked_seq = upto
            self._events_count -= deleted
            self._oldest_ts = oldest
            self._commits += 1
            changed = True
            self._wake_ack_waiters()
        return changed

    async def wait_acked(self, seq: int) -> None:
        """Wait until the central store acknowledged `seq` (raises OutboxUnavailable on close)."""
        if seq <= self._acked_seq:
            return
        if self._closed:
            raise OutboxUnavailable("outbox closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._ack_waiters, (seq, next(self._waiter_ids), future))
        await future

    def _wake_ack_waiters(self) -> None:
        while self._ack_waiters and self._ack_waiters[0][0] <= self._acked_seq:
            _, _, future = heapq.heappop(self._ack_waiters)
            if not future.done():
                future.set_result(None)

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (on the event loop) after every commit of new events."""
        self._listeners.append(listener)

    def remove_commit_listener(self, listener: Callable[[], None]) -> None:
        """Undo `add_commit_listener` (no error if it is not registered)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    # -- health and metrics ------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def stream(self) -> str:
        """The stream UUID of this database."""
        return self._stream

    @property
    def committed_seq(self) -> int:
        """The last seq committed (0 before the first event)."""
        return self._last_seq

    @property
    def acked_seq(self) -> int:
        """The central store's watermark as persisted here (survives restarts)."""
        return self._acked_seq

    @property
    def events_count(self) -> int:
        """Events stored (not yet acknowledged)."""
        return self._events_count

    @property
    def bytes_used(self) -> int:
        """Bytes of database pages in use (the quantity the cap applies to)."""
        return self._bytes_used

    @property
    def max_size(self) -> int:
        """The cap in bytes."""
        return self._max_size

    @property
    def oldest_unacked_ts(self) -> float | None:
        """Event time of the oldest stored event, None when empty."""
        return self._oldest_ts if self._events_count else None

    @property
    def dropped_total(self) -> int:
        """Sample events dropped by the cap since the stream began."""
        return self._dropped_total

    @property
    def append_failures(self) -> int:
        """Appends that raised OutboxUnavailable since open."""
        return self._append_failures

    @property
    def commits(self) -> int:
        """Write transactions committed since open (group commits and acks)."""
        return self._commits

    @property
    def recovered_from(self) -> str | None:
        """File name the corrupt database was moved to at open, if that happened."""
        return self._recovery.moved_to if self._recovery is not None else None

    # -- helpers -------------------------------------------------------------------------------

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise OutboxUnavailable("outbox is not open")
        return self._db

    async def _update_meta(self, last_seq: int, dropped_total: int) -> int:
        """Write the seq counter (in the open transaction); return the bytes in use."""
        # One call instead of two: each aiosqlite call costs about 100 µs (design §9).
        rows = await self._conn().execute_fetchall(
            "UPDATE meta SET last_seq = ?, dropped_total = ? WHERE id = 1 RETURNING (SELECT "
            "page_count - freelist_count FROM pragma_page_count(), pragma_freelist_count())",
            (last_seq, dropped_total),
        )
        return int(next(iter(rows))[0]) * self._page_size

    async def _measure(self) -> int:
        (pages,) = await _one(
            self._conn(),
            "SELECT page_count - freelist_count FROM pragma_page_count(), pragma_freelist_count()",
        )
        return int(pages) * self._page_size

    async def _query_oldest_ts(self) -> float | None:
        rows = list(
            await self._conn().execute_fetchall("SELECT ts FROM events ORDER BY seq LIMIT 1")
        )
        return float(rows[0][0]) if rows else None


def _ranges(seqs: Sequence[int]) -> list[list[int]]:
    """Sorted seqs -> [[first, last], ...] of consecutive runs."""
    ranges: list[list[int]] = []
    for seq in seqs:
        if ranges and ranges[-1][1] == seq - 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return ranges


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (int(code) & 0xFF) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


async def _one(db: aiosqlite.Connection, sql: str) -> Any:
    rows = list(await db.execute_fetchall(sql))
    return rows[0]


async def _rollback(db: aiosqlite.Connection) -> None:
    # SQLite may already have rolled back by itself (e.g. after SQLITE_FULL).
    if db.in_transaction:
        try:
            await db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("outbox rollback failed: %s", exc)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _move_files(path: Path, target: Path) -> tuple[str, list[str]]:
    """Move the database and its -wal/-shm files aside; return the new base and all names."""
    moved: list[str] = []
    base = target
    for number in itertools.count(1):  # never overwrite an earlier forensic copy
        if not any(target.with_name(target.name + s).exists() for s in ("", "-wal", "-shm")):
            break
        target = base.with_name(f"{base.name}.{number}")
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            destination = target.with_name(target.name + suffix)
            os.replace(source, destination)
            moved.append(destination.name)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename durable before a new stream starts
    finally:
        os.close(directory)
    return target.name, moved
