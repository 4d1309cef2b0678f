"""The outbox's one SQLite connection: pragmas, schema, the meta row, transactions and size.

One aiosqlite connection in WAL mode with ``synchronous=FULL`` and ``locking_mode=EXCLUSIVE``
(a second process on the same file fails at open instead of interleaving seqs). Each
aiosqlite call is a round trip to the connection's thread, about 100 µs of CPU on a small VM
(docs/performance.md, "Node-RED's job"), so a write transaction is ONE call: `transact` runs a
plain function (BEGIN IMMEDIATE, the statements, COMMIT) on that thread.

A small transaction (a poll's events, a second of acks) skips even that round trip while the
disk commits quickly: it runs on the event loop itself, which the fsync then holds for a
millisecond or two. Waking the connection's thread and then the loop again cost two wake-ups
per commit, a fifth of the agent's wake-ups on Node-RED's job. One such transaction slower than
`LOOP_BUDGET` (a slow disk, a WAL checkpoint) sends the next ones to the thread for
`LOOP_PAUSE`, so a slow disk holds the loop at most once in that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from sync import sqlite
from sync.files import private_database
from sync.outbox.codec import KIND_CODES
from sync.outbox.errors import OutboxUnavailable
from sync.outbox.state import OutboxState

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
    # The forwarder sends gap events ahead of the batches (docs/delivery.md): find them
    # without scanning the outbox. Gap events are rare, so the index stays tiny.
    f"CREATE INDEX IF NOT EXISTS events_gaps ON events (seq) WHERE kind = {KIND_CODES['gap']}",
)

T = TypeVar("T")

# A transaction that may run on the event loop: at most this many rows inserted or deleted.
LOOP_MAX_ROWS = 5_000
# An on-loop transaction slower than this (seconds) sends the next ones to the thread ...
LOOP_BUDGET = 0.010
# ... for this long (seconds), then the loop tries again.
LOOP_PAUSE = 60.0
# Only where SQLite is built serialized may one connection be used from two threads at once
# (see `open`); elsewhere every transaction stays on aiosqlite's thread.
SERIALIZED = sqlite3.threadsafety == 3

INSERT_EVENT = (
    "INSERT INTO events (seq, ts, kind, device, tag, value, quality) VALUES (?,?,?,?,?,?,?)"
)


class Database:
    """The outbox's SQLite connection; `lock` serialises its transactions and reads."""

    def __init__(self, *, path: Path, max_size: int) -> None:
        self.path = path
        self._max_size = max_size  # sizes the WAL
        self.connection: aiosqlite.Connection | None = None
        self.lock = asyncio.Lock()  # one transaction or read at a time on the one connection
        self._page_size = 4096
        self._on_loop_from = 0.0  # monotonic time from which small transactions run on the loop

    def conn(self) -> aiosqlite.Connection:
        """The open connection; raises OutboxUnavailable when closed."""
        if self.connection is None:
            raise OutboxUnavailable("outbox is not open")
        return self.connection

    async def open(self, state: OutboxState) -> None:
        """Connect, configure, create the schema of a new file and load `state` from it."""
        try:
            # 0600 before SQLite creates it: its WAL takes the same mode (docs/install.md).
            await asyncio.to_thread(private_database, self.path)
        except OSError as exc:
            raise OutboxUnavailable(f"cannot open outbox {self.path}: {exc}") from exc
        # check_same_thread=False: `transact` runs small transactions on the event loop's
        # thread as well as on aiosqlite's; `lock` keeps them one at a time. A call whose
        # awaiting task was cancelled may still run on aiosqlite's thread after the lock is
        # free; SQLite's serialized mode (sqlite3.threadsafety 3) keeps such an overlap safe.
        self.connection = await sqlite.connect(
            self.path, isolation_level=None, timeout=1.0, check_same_thread=False
        )
        await self._configure()
        await self._create_schema()
        await self._load(state)

    async def close(self) -> None:
        """Close the connection (idempotent); an open transaction is rolled back."""
        db, self.connection = self.connection, None
        if db is not None:
            await db.close()

    @contextlib.asynccontextmanager
    async def transaction(self, failure: str) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; roll back on any error.

        An SQLite error becomes ``OutboxUnavailable(f"{failure}: {error}")``. The caller holds
        `lock` where other tasks may use the connection.
        """
        db = self.conn()
        try:
            await db.execute("BEGIN IMMEDIATE")
            yield db
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            await _rollback(db)
            raise OutboxUnavailable(f"{failure}: {exc}") from exc
        except BaseException:
            await _rollback(db)
            raise

    async def transact(
        self, work: Callable[[sqlite3.Connection], T], failure: str, *, small: bool = False
    ) -> T:
        """Run ``work(connection)`` between BEGIN IMMEDIATE and COMMIT in ONE call to the
        connection's thread, or on the event loop if `small` and commits have been quick; roll
        back on any error.

        An SQLite error becomes ``OutboxUnavailable(f"{failure}: {error}")``. The caller holds
        `lock` where other tasks may use the connection; `work` may run on the connection's
        thread and must touch nothing of the event loop's. `small`: it inserts or deletes at
        most `LOOP_MAX_ROWS` rows.
        """
        db = self.conn()

        def transaction(connection: sqlite3.Connection) -> T:
            connection.execute("BEGIN IMMEDIATE")
            try:
                result = work(connection)
                connection.execute("COMMIT")
            except BaseException:
                _rollback_in(connection)
                raise
            return result

        # aiosqlite's sqlite3 connection and its own way of running a function on its thread
        # (the one its execute() uses); it has no public name for either.
        call = cast(Callable[..., Awaitable[T]], db._execute)
        try:
            if small and SERIALIZED and time.monotonic() >= self._on_loop_from:
                started = time.monotonic()
                try:
                    return transaction(db._conn)
                finally:
                    self._held_loop(time.monotonic() - started)
            return await call(transaction, db._conn)
        except sqlite3.Error as exc:
            raise OutboxUnavailable(f"{failure}: {exc}") from exc
        except ValueError as exc:  # aiosqlite: "Connection closed", "no active connection"
            raise OutboxUnavailable(f"{failure}: {exc}") from exc

    def _held_loop(self, seconds: float) -> None:
        # A commit on the loop took `seconds`: past the budget, the next ones go to the thread.
        if seconds > LOOP_BUDGET:
            self._on_loop_from = time.monotonic() + LOOP_PAUSE
            log.debug(
                "outbox: a commit held the event loop for %.0f ms; commits run on the SQLite "
                "thread for %.0f s",
                seconds * 1000,
                LOOP_PAUSE,
            )

    def update_meta_in(self, connection: sqlite3.Connection, last_seq: int, dropped: int) -> int:
        """Write the seq counter (in `transact`); return the bytes in use."""
        row = connection.execute(
            "UPDATE meta SET last_seq = ?, dropped_total = ? WHERE id = 1 RETURNING (SELECT "
            "page_count - freelist_count FROM pragma_page_count(), pragma_freelist_count())",
            (last_seq, dropped),
        ).fetchone()
        return int(row[0]) * self._page_size

    def measure_in(self, connection: sqlite3.Connection) -> int:
        """Bytes of database pages in use (in `transact`)."""
        (pages,) = connection.execute(
            "SELECT page_count - freelist_count FROM pragma_page_count(), pragma_freelist_count()"
        ).fetchone()
        return int(pages) * self._page_size

    async def measure(self) -> int:
        """Bytes of database pages in use (the quantity the cap applies to)."""
        (pages,) = await _one(
            self.conn(),
            "SELECT page_count - freelist_count FROM pragma_page_count(), pragma_freelist_count()",
        )
        return int(pages) * self._page_size

    async def oldest_ts(self) -> float | None:
        """Event time of the oldest stored event, None when empty."""
        rows = list(
            await self.conn().execute_fetchall("SELECT ts FROM events ORDER BY seq LIMIT 1")
        )
        return float(rows[0][0]) if rows else None

    async def _configure(self) -> None:
        db = self.conn()
        # EXCLUSIVE before WAL: no shared-memory file, and the lock taken by the first write
        # below keeps a second agent on the same file out.
        await db.execute("PRAGMA locking_mode = EXCLUSIVE")
        mode = list(await db.execute_fetchall("PRAGMA journal_mode = WAL"))
        if str(mode[0][0]).lower() != "wal":
            raise OutboxUnavailable(f"cannot switch {self.path} to WAL mode")
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

    async def _create_schema(self) -> None:
        async with self.transaction(f"cannot open outbox {self.path}") as db:
            tables = {
                str(row[0])
                for row in await db.execute_fetchall(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
            if tables and not {"meta", "events"} <= tables:
                raise OutboxUnavailable(
                    f"{self.path} is an SQLite database but not an outbox (tables: "
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
                log.info("outbox %s: new stream %s", self.path, stream)
            elif int(rows[0][0]) > SCHEMA_VERSION:
                raise OutboxUnavailable(
                    f"{self.path} has outbox schema version {rows[0][0]}; this version "
                    f"understands up to {SCHEMA_VERSION}"
                )

    async def _load(self, state: OutboxState) -> None:
        db = self.conn()
        stream, last_seq, acked_seq, dropped = await _one(
            db, "SELECT stream, last_seq, acked_seq, dropped_total FROM meta"
        )
        state.stream = str(stream)
        state.last_seq = int(last_seq)
        state.acked_seq = state.deleted_upto = int(acked_seq)
        state.dropped_total = int(dropped)
        count, max_seq = await _one(db, "SELECT count(*), max(seq) FROM events")
        state.events_count = int(count)
        if max_seq is not None and int(max_seq) > state.last_seq:
            # Cannot happen (the counter is written in the insert transaction); never reuse.
            log.error("outbox %s: seq counter %d behind max seq %d", self.path, last_seq, max_seq)
            state.last_seq = int(max_seq)
        state.oldest_ts = await self.oldest_ts()
        state.bytes_used = await self.measure()


async def _one(db: aiosqlite.Connection, sql: str) -> Any:
    rows = list(await db.execute_fetchall(sql))
    return rows[0]


def oldest_ts_in(connection: sqlite3.Connection) -> float | None:
    """Event time of the oldest stored event, None when empty (in `transact`)."""
    row = connection.execute("SELECT ts FROM events ORDER BY seq LIMIT 1").fetchone()
    return float(row[0]) if row is not None else None


def _rollback_in(connection: sqlite3.Connection) -> None:
    # SQLite may already have rolled back by itself (e.g. after SQLITE_FULL).
    if connection.in_transaction:
        try:
            connection.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("outbox rollback failed: %s", exc)


async def _rollback(db: aiosqlite.Connection) -> None:
    # SQLite may already have rolled back by itself (e.g. after SQLITE_FULL).
    if db.in_transaction:
        try:
            await db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("outbox rollback failed: %s", exc)
