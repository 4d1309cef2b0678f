"""The saga log: every saga's state and every step's outcome, committed before the next action.

A separate SQLite file, ``{data_dir}/sagas.db`` (the outbox's database is held by one
connection in exclusive locking mode), in WAL mode with ``synchronous=FULL``: when a method
here returns, its change survives a kill -9 or a power cut. The engine (agent/workflows.py)
writes an intent *before* it acts (``write step 2: about to write 42, previous value 7``) and
the outcome *after*; a row left in an intent phase is what crash recovery calls "in doubt".

The log is also the durable index of command ids: a command id is unique per workflow, so a
replayed command finds its saga here even after a restart (for as long as the saga is kept,
see `SagaLog.prune`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import aiosqlite

from sync import sqlite
from sync.files import private_database, private_dir

log = logging.getLogger("edge_agent.saga_log")

SCHEMA_VERSION = 1

SagaState = Literal["running", "compensating", "completed", "compensated", "failed"]
FINAL_STATES: frozenset[str] = frozenset({"completed", "compensated", "failed"})

StepKind = Literal["write", "wait", "confirm"]
# Lifecycle of a step row (one row per step of a saga, updated in place):
#   write:   intent -> done | not_applied | unknown
#   wait:    waiting -> done | timeout
#   confirm: waiting -> done | deferred (uplink failed, policy continue)
#                            | uplink_failed (policy compensate)
#   compensation of a write: compensating -> compensated | compensation_failed
StepPhase = Literal[
    "intent",
    "done",
    "not_applied",
    "unknown",
    "waiting",
    "timeout",
    "deferred",
    "uplink_failed",
    "compensating",
    "compensated",
    "compensation_failed",
]
# Write steps in these phases may have changed the PLC: compensation must undo them.
NEEDS_UNDO: frozenset[str] = frozenset({"done", "unknown", "compensating", "compensation_failed"})

SCHEMA: tuple[str, ...] = (
    """
CREATE TABLE IF NOT EXISTS meta (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  INTEGER NOT NULL,
    created  REAL    NOT NULL
)""",
    """
CREATE TABLE IF NOT EXISTS sagas (
    id             TEXT    PRIMARY KEY,   -- UUID of the saga
    workflow       TEXT    NOT NULL,
    command_id     TEXT    NOT NULL,      -- the command's "id"; unique per workflow
    params         TEXT    NOT NULL,      -- validated params, JSON
    state          TEXT    NOT NULL,      -- running compensating completed compensated failed
    step           INTEGER NOT NULL,      -- 1-based index of the step in progress (0: none yet)
    created        REAL    NOT NULL,      -- epoch seconds
    updated        REAL    NOT NULL,
    outcome        TEXT,                  -- final status once finished (= state), else NULL
    detail         TEXT,                  -- why it ended / why it is compensating
    started_stream TEXT,                  -- outbox stream of the 'started' event
    started_seq    INTEGER,               -- its seq: the confirm step waits for its central ack
    confirmed      INTEGER NOT NULL DEFAULT 0,  -- the central store acknowledged 'started'
    confirm_pending INTEGER NOT NULL DEFAULT 0, -- completed locally; confirmation to follow
    UNIQUE (workflow, command_id)
)""",
    """
CREATE INDEX IF NOT EXISTS sagas_open ON sagas (state) WHERE state IN ('running', 'compensating')
""",
    """
CREATE TABLE IF NOT EXISTS steps (
    saga      TEXT    NOT NULL REFERENCES sagas (id) ON DELETE CASCADE,
    idx       INTEGER NOT NULL,           -- 1-based step index
    kind      TEXT    NOT NULL,           -- write | wait | confirm
    ref       TEXT,                       -- device/tag (NULL for confirm)
    phase     TEXT    NOT NULL,           -- see StepPhase
    previous  TEXT,                       -- write: JSON of the value read before writing
    value     TEXT,                       -- JSON of the value written / waited for
    target    TEXT,                       -- write: JSON of the value compensation writes
    result    TEXT,                       -- JSON of the value read back / observed
    detail    TEXT,
    updated   REAL    NOT NULL,
    PRIMARY KEY (saga, idx)
)""",
)


class SagaLogError(Exception):
    """The saga log cannot be read or written (I/O error, disk full, closed)."""


class DuplicateCommand(SagaLogError):
    """A saga for this (workflow, command id) already exists."""


@dataclass(slots=True)
class StepRecord:
    """One step's row: values are decoded JSON (None = not captured)."""

    idx: int
    kind: StepKind
    ref: str | None
    phase: StepPhase
    previous: Any = None
    value: Any = None
    target: Any = None
    result: Any = None
    detail: str | None = None
    updated: float = 0.0


@dataclass(slots=True)
class SagaRecord:
    """One saga's row and its steps (keyed by 1-based index)."""

    id: str
    workflow: str
    command_id: str
    params: dict[str, Any]
    state: SagaState
    step: int = 0
    created: float = 0.0
    updated: float = 0.0
    outcome: str | None = None
    detail: str | None = None
    started_stream: str | None = None
    started_seq: int | None = None
    confirmed: bool = False
    confirm_pending: bool = False
    steps: dict[int, StepRecord] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Whether the saga reached a final state."""
        return self.state in FINAL_STATES


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), allow_nan=False)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


_SAGA_COLUMNS = (
    "id, workflow, command_id, params, state, step, created, updated, outcome, detail, "
    "started_stream, started_seq, confirmed, confirm_pending"
)
_STEP_COLUMNS = "saga, idx, kind, ref, phase, previous, value, target, result, detail, updated"


class SagaLog:
    """The saga log; use as ``async with SagaLog(path) as saga_log``."""

    def __init__(self, path: Path, *, clock: Any = time.time) -> None:
        self._path = path
        self._clock = clock
        self._db: aiosqlite.Connection | None = None
        # One transaction at a time on the one connection: concurrent sagas interleave their
        # statements otherwise, and a BEGIN inside another transaction fails.
        self._lock = asyncio.Lock()
        self.recovered_from: str | None = None

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open (creating the schema); a corrupt file is moved aside and a new one started."""
        try:
            await self._open()
        except BaseException:
            # Cancelled or failed half-way: close what was opened (its thread must end).
            await asyncio.shield(self.close())
            raise

    async def _open(self) -> None:
        try:
            await asyncio.to_thread(private_dir, self._path.parent)
        except OSError as exc:
            raise SagaLogError(f"cannot open saga log {self._path}: {exc}") from exc
        try:
            await self._open_checked()
        except sqlite3.DatabaseError as exc:
            if self._db is not None:
                await self._db.close()
                self._db = None
            if not _is_corruption(exc):
                # Locked, read-only, I/O error: the file may be fine; never move it aside.
                raise SagaLogError(f"cannot open saga log {self._path}: {exc}") from exc
            target = self._path.with_name(f"{self._path.name}.corrupt-{int(self._clock())}")
            log.error("saga log %s is unreadable (%s); moved to %s", self._path, exc, target)
            await asyncio.to_thread(_move_aside, self._path, target)
            self.recovered_from = str(target)
            await self._open_checked()

    async def _open_checked(self) -> None:
        try:
            # 0600 before SQLite creates it: its WAL and -shm take the same mode.
            await asyncio.to_thread(private_database, self._path)
        except OSError as exc:
            raise SagaLogError(f"cannot open saga log {self._path}: {exc}") from exc
        db = await sqlite.connect(self._path, isolation_level=None)
        self._db = db
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA busy_timeout=5000")
        async with db.execute("PRAGMA quick_check") as cursor:
            row = await cursor.fetchone()
        if row is None or row[0] != "ok":
            raise sqlite3.DatabaseError(f"malformed: quick_check: {row[0] if row else 'none'}")
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA:
                await db.execute(statement)
            await db.execute(
                "INSERT OR IGNORE INTO meta (id, version, created) VALUES (1, ?, ?)",
                (SCHEMA_VERSION, self._clock()),
            )
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Close the database (idempotent)."""
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise SagaLogError("saga log is not open")
        return self._db

    async def _transaction(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Run statements in one transaction; return once COMMIT returned (durable)."""
        async with self._lock:
            db = self._conn()
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, args in statements:
                        await db.execute(sql, args)
                    await db.execute("COMMIT")
                except BaseException:
                    await _rollback(db)
                    raise
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc) and "command_id" in str(exc):
                    raise DuplicateCommand(str(exc)) from exc
                raise SagaLogError(str(exc)) from exc
            except sqlite3.Error as exc:
                raise SagaLogError(str(exc)) from exc

    # -- writing -------------------------------------------------------------------------------

    async def create(self, saga: SagaRecord) -> None:
        """Insert a new saga (state 'running'); raise DuplicateCommand for a known command id."""
        now = self._clock()
        saga.created = saga.updated = now
        await self._transaction(
            [
                (
                    f"INSERT INTO sagas ({_SAGA_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        saga.id,
                        saga.workflow,
                        saga.command_id,
                        _dump(saga.params) or "{}",
                        saga.state,
                        saga.step,
                        now,
                        now,
                        saga.outcome,
                        saga.detail,
                        saga.started_stream,
                        saga.started_seq,
                        int(saga.confirmed),
                        int(saga.confirm_pending),
                    ),
                )
            ]
        )

    def _saga_update(self, saga: SagaRecord, now: float) -> tuple[str, tuple[Any, ...]]:
        return (
            "UPDATE sagas SET state = ?, step = ?, updated = ?, outcome = ?, detail = ?, "
            "started_stream = ?, started_seq = ?, confirmed = ?, confirm_pending = ? "
            "WHERE id = ?",
            (
                saga.state,
                saga.step,
                now,
                saga.outcome,
                saga.detail,
                saga.started_stream,
                saga.started_seq,
                int(saga.confirmed),
                int(saga.confirm_pending),
                saga.id,
            ),
        )

    def _step_upsert(
        self, saga_id: str, step: StepRecord, now: float
    ) -> tuple[str, tuple[Any, ...]]:
        return (
            f"INSERT OR REPLACE INTO steps ({_STEP_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                saga_id,
                step.idx,
                step.kind,
                step.ref,
                step.phase,
                _dump(step.previous),
                _dump(step.value),
                _dump(step.target),
                _dump(step.result),
                step.detail,
                now,
            ),
        )

    async def save(self, saga: SagaRecord, *steps: StepRecord) -> None:
        """Commit the saga's row and the given step rows in one transaction."""
        now = self._clock()
        saga.updated = now
        statements = [self._saga_update(saga, now)]
        for step in steps:
            step.updated = now
            saga.steps[step.idx] = step
            statements.append(self._step_upsert(saga.id, step, now))
        await self._transaction(statements)

    async def prune(self, older_than: float) -> int:
        """Delete finished sagas last updated before `older_than` (epoch s); return how many."""
        async with self._lock:
            db = self._conn()
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    cursor = await db.execute(
                        "DELETE FROM sagas WHERE state IN ('completed', 'compensated', 'failed') "
                        "AND updated < ? AND confirm_pending = 0",
                        (older_than,),
                    )
                    count = cursor.rowcount
                    await db.execute("COMMIT")
                except BaseException:
                    await _rollback(db)
                    raise
            except sqlite3.Error as exc:
                raise SagaLogError(str(exc)) from exc
        return max(0, count)

    # -- reading -------------------------------------------------------------------------------

    async def _fetch(
        self, where: str, args: tuple[Any, ...], order: str = "created, id"
    ) -> list[SagaRecord]:
        async with self._lock:
            db = self._conn()
            try:
                async with db.execute(
                    f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE {where} ORDER BY {order}", args
                ) as cursor:
                    rows = list(await cursor.fetchall())
                sagas = [_saga_from_row(row) for row in rows]
                if sagas:
                    ids = [saga.id for saga in sagas]
                    by_id = {saga.id: saga for saga in sagas}
                    # Chunked IN lists: SQLite limits the number of host parameters.
                    for start in range(0, len(ids), 500):
                        chunk = ids[start : start + 500]
                        marks = ",".join("?" * len(chunk))
                        async with db.execute(
                            f"SELECT {_STEP_COLUMNS} FROM steps WHERE saga IN ({marks}) "
                            "ORDER BY idx",
                            chunk,
                        ) as cursor:
                            for row in await cursor.fetchall():
                                step = _step_from_row(row)
                                by_id[row[0]].steps[step.idx] = step
            except sqlite3.Error as exc:
                raise SagaLogError(str(exc)) from exc
        return sagas

    async def get(self, saga_id: str) -> SagaRecord | None:
        """The saga with this id."""
        found = await self._fetch("id = ?", (saga_id,))
        return found[0] if found else None

    async def find(self, workflow: str, command_id: str) -> SagaRecord | None:
        """The saga started by this command id of this workflow."""
        found = await self._fetch("workflow = ? AND command_id = ?", (workflow, command_id))
        return found[0] if found else None

    async def unfinished(self) -> list[SagaRecord]:
        """Sagas still running or compensating (crash recovery resolves them)."""
        return await self._fetch("state IN ('running', 'compensating')", ())

    async def confirm_pending(self) -> list[SagaRecord]:
        """Sagas completed locally whose central confirmation is still to come."""
        return await self._fetch("confirm_pending = 1", ())

    async def recent(self, limit: int) -> list[SagaRecord]:
        """The `limit` sagas created last, newest first (the status page)."""
        return await self._fetch("1 = 1", (), f"created DESC, id DESC LIMIT {int(limit)}")

    async def all(self) -> list[SagaRecord]:
        """Every saga (oldest first); for tests and inspection."""
        return await self._fetch("1 = 1", ())


def _saga_from_row(row: Any) -> SagaRecord:
    return SagaRecord(
        id=row[0],
        workflow=row[1],
        command_id=row[2],
        params=json.loads(row[3]),
        state=row[4],
        step=row[5],
        created=row[6],
        updated=row[7],
        outcome=row[8],
        detail=row[9],
        started_stream=row[10],
        started_seq=row[11],
        confirmed=bool(row[12]),
        confirm_pending=bool(row[13]),
    )


def _step_from_row(row: Any) -> StepRecord:
    return StepRecord(
        idx=row[1],
        kind=row[2],
        ref=row[3],
        phase=row[4],
        previous=_load(row[5]),
        value=_load(row[6]),
        target=_load(row[7]),
        result=_load(row[8]),
        detail=row[9],
        updated=row[10],
    )


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (int(code) & 0xFF) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


async def _rollback(db: aiosqlite.Connection) -> None:
    # No transaction open (BEGIN failed) means nothing to undo.
    with contextlib.suppress(sqlite3.Error):
        await db.execute("ROLLBACK")


def _move_aside(path: Path, target: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            source.rename(target.with_name(target.name + suffix))
