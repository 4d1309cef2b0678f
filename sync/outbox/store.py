"""The durable outbox: every event is committed to SQLite before anything else happens to it.

The guarantees are described in docs/delivery.md. `Outbox` is the one object callers use;
each concern lives in its own module:

* database.py: the one aiosqlite connection in WAL mode with ``synchronous=FULL`` and
  ``locking_mode=EXCLUSIVE``, the schema and the ``meta`` row (the seq counter).
* writer.py: group commit, one call to the connection's thread per transaction; a commit is
  published (futures, callbacks, tail, listeners) only after its COMMIT returned. Seqs are
  gapless, strictly increasing and never reused.
* cap.py: past ``max_size`` the oldest *sample* events are deleted in the same transaction
  and ``gap`` events with the exact seq ranges are inserted.
* reader.py and acks.py: the forwarder's lease interface (batches, then acks, which are
  taken at once and deleted lazily with the next write).
* recovery.py: at open, ``PRAGMA quick_check``; a corrupt file is moved aside and a new
  stream starts with a ``corruption_recovery`` gap event.
* codec.py: the row and wire encoding of events.

Every failure a caller must handle is an `OutboxUnavailable`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import aiosqlite

from sync.events import Event
from sync.outbox.acks import Acks
from sync.outbox.cap import SizeCap
from sync.outbox.codec import StoredEvent, StoredRow, encode_event
from sync.outbox.database import Database
from sync.outbox.errors import OutboxFull, OutboxUnavailable
from sync.outbox.reader import Batch, BatchReader
from sync.outbox.recovery import Recovery, recover_if_corrupt
from sync.outbox.state import OutboxState
from sync.outbox.writer import GroupCommitWriter, OnCommit

__all__ = ["TAIL_EVENTS", "Batch", "OnCommit", "Outbox", "OutboxFull", "OutboxUnavailable"]

TAIL_EVENTS = 20_000  # recent committed events kept in memory for the forwarder
# The agent's come from buffer.commit_interval and buffer.commit_max_events (the same
# defaults). A window longer than a device's poll interval would merge that device's
# successive values on the live topics (docs/performance.md, "Node-RED's job").
COMMIT_INTERVAL = 0.05
COMMIT_MAX_EVENTS = 1000
# Acks taken with nothing appended are deleted this many seconds later at the latest.
ACK_DELAY = 2.0


class Outbox:
    """The SQLite outbox; use as ``async with Outbox(path, max_size=...) as outbox``."""

    def __init__(
        self,
        path: Path,
        *,
        max_size: int,
        commit_interval: float = COMMIT_INTERVAL,
        commit_max_events: int = COMMIT_MAX_EVENTS,
        ack_delay: float = ACK_DELAY,
    ) -> None:
        self._path = Path(path)
        self._database = Database(path=self._path, max_size=max_size)
        self._state = OutboxState()
        self._cap = SizeCap(database=self._database, max_size=max_size)
        self._acks = Acks(database=self._database, state=self._state)
        # The most recent committed rows, in seq order without holes: the writer appends what
        # it committed, the reader serves a forwarder that keeps up from here.
        self._tail: deque[StoredRow] = deque(maxlen=TAIL_EVENTS)
        self._writer = GroupCommitWriter(
            database=self._database,
            state=self._state,
            cap=self._cap,
            acks=self._acks,
            tail=self._tail,
            commit_interval=commit_interval,
            commit_max_events=commit_max_events,
            ack_delay=ack_delay,
        )
        self._reader = BatchReader(database=self._database, state=self._state, tail=self._tail)
        self._closed = False
        self._recovery: Recovery | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._database.connection is not None or self._closed:
            raise RuntimeError("an Outbox can be opened once")
        try:
            await self._open()
        except BaseException:
            # Cancelled or failed half-way: the connection's thread must not outlive us.
            await asyncio.shield(self._database.close())
            raise
        self._writer.start()
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
        try:
            await self._writer.finish()
        finally:
            self._closed = True
            await self._writer.stop(OutboxUnavailable("outbox closed"))
            self._acks.close()
            await self._database.close()

    async def _open(self) -> None:
        await asyncio.to_thread(self._path.parent.mkdir, parents=True, exist_ok=True)
        self._recovery = await recover_if_corrupt(self._path)
        try:
            await self._database.open(self._state)
            if self._recovery is not None:
                await self._writer.commit([[encode_event(self._recovery.gap_event())]])
        except BaseException as exc:
            await self._database.close()
            if isinstance(exc, sqlite3.Error):
                raise OutboxUnavailable(f"cannot open outbox {self._path}: {exc}") from exc
            raise

    # -- appending, reading and settling -------------------------------------------------------

    async def append(self, events: Sequence[Event]) -> tuple[int, int]:
        """Commit `events`; return their (first_seq, last_seq) once the COMMIT returned.

        Raises OutboxUnavailable (disk full, I/O error, closed); the events are then not stored.
        Raises ValueError for an event that cannot be stored (unknown kind, bad ts, not JSON).
        """
        if not events:
            raise ValueError("append needs at least one event")
        # Encoded on the caller's side: the writer task only runs transactions.
        return await self._writer.append([encode_event(event) for event in events])

    def submit(self, events: Sequence[Event], on_commit: OnCommit) -> None:
        """Queue `events` for the next group commit and return at once (the pipeline: a
        poller must not wait out commit_interval). ``on_commit(None)`` runs on the event loop
        once their COMMIT returned, ``on_commit(error)`` if it failed (OutboxUnavailable: the
        events are not stored); callbacks run in submit order. Raises OutboxUnavailable
        (closed) or ValueError (an event that cannot be stored) at once. Await `room` first.
        """
        if not events:
            raise ValueError("submit needs at least one event")
        self._writer.submit([encode_event(event) for event in events], on_commit)

    async def room(self) -> None:
        """Wait while the commit queue is full: memory stays bounded when the disk is slow."""
        await self._writer.room()

    async def read_batch(self, after_seq: int, max_events: int, max_bytes: int) -> Batch:
        """The oldest committed events after `after_seq` (raised to the acked seq when lower):
        a run of consecutive seqs, cut by events, wire bytes or a hole the cap left. An event
        larger than `max_bytes` comes alone in its own batch.
        """
        return await self._reader.read(after_seq, max_events, max_bytes)

    async def first_kept_after(self, after_seq: int) -> int | None:
        """The lowest seq still stored after `after_seq` (None: none): the seqs between were
        acknowledged or dropped by the size cap."""
        return await self._reader.first_kept_after(after_seq)

    async def read_gaps(self, after_seq: int, limit: int = 64) -> tuple[StoredEvent, ...]:
        """The oldest gap events after `after_seq` (the forwarder sends them early)."""
        return await self._reader.read_gaps(after_seq, limit)

    def take_ack(self, stream: str, acked_seq: int) -> bool:
        """Take the central store's ack now and delete what it covers lazily: with the next
        appended events, or ``ack_delay`` seconds later; False if nothing changed.

        Reads and `wait_acked` see it at once. An ack not yet deleted when the process dies is
        harmless: those events are sent again and the central store absorbs the duplicates.
        Idempotent: a lower or repeated ack, or an ack of another stream, changes nothing.
        """
        changed = self._acks.note(stream, acked_seq)
        if changed:
            self._writer.acks_taken()
        return changed

    async def ack(self, stream: str, acked_seq: int) -> bool:
        """`take_ack`, then delete what it covers now; False if nothing changed."""
        changed = self._acks.note(stream, acked_seq)
        await self._writer.apply_acks()
        return changed

    async def wait_acked(self, seq: int) -> None:
        """Wait until the central store acknowledged `seq` (raises OutboxUnavailable on close)."""
        if seq <= self._state.acked_seq:
            return
        if self._closed:
            raise OutboxUnavailable("outbox closed")
        await self._acks.wait(seq)

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (on the event loop) after every commit of new events."""
        self._writer.add_listener(listener)

    def remove_commit_listener(self, listener: Callable[[], None]) -> None:
        """Undo `add_commit_listener` (no error if it is not registered)."""
        self._writer.remove_listener(listener)

    # -- health and metrics ------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def stream(self) -> str:
        """The stream UUID of this database."""
        return self._state.stream

    @property
    def committed_seq(self) -> int:
        """The last seq committed (0 before the first event)."""
        return self._state.last_seq

    @property
    def acked_seq(self) -> int:
        """The central store's watermark (persisted with the next write, within ack_delay)."""
        return self._state.acked_seq

    @property
    def events_count(self) -> int:
        """Events stored (acknowledged ones until their deletion, within ack_delay)."""
        return self._state.events_count

    @property
    def bytes_used(self) -> int:
        """Bytes of database pages in use (the quantity the cap applies to)."""
        return self._state.bytes_used

    @property
    def max_size(self) -> int:
        """The cap in bytes."""
        return self._cap.max_size

    @property
    def oldest_unacked_ts(self) -> float | None:
        """Event time of the oldest stored event, None when empty or all acknowledged."""
        state = self._state
        if not state.events_count or state.acked_seq >= state.last_seq:
            return None
        return state.oldest_ts

    @property
    def dropped_total(self) -> int:
        """Sample events dropped by the cap since the stream began."""
        return self._state.dropped_total

    @property
    def append_failures(self) -> int:
        """Appends that raised OutboxUnavailable since open."""
        return self._state.append_failures

    @property
    def commits(self) -> int:
        """Write transactions committed since open (group commits, and acks alone)."""
        return self._state.commits

    @property
    def recovered_from(self) -> str | None:
        """File name the corrupt database was moved to at open, if that happened."""
        return self._recovery.moved_to if self._recovery is not None else None

    @property
    def _db(self) -> aiosqlite.Connection | None:
        # The one connection, private: tests reach for it to simulate a full disk.
        return self._database.connection
