"""The changes the Sparkplug node could not publish live, on disk until it republishes them.

While the node is not born (broker unreachable, primary host offline, before the first birth),
every metric change it is offered goes here, and so do the ones it sent in the last moments
before a connection loss was noticed (they may have died in a dead TCP connection). After the
next birth the node republishes them oldest first as DDATA with `is_historical = true` and
deletes what it sent (docs/sparkplug.md, "History"). An SQLite file in the data directory
(WAL, synchronous FULL, 0600), so a restart loses nothing. Capped by rows: past the cap the
oldest rows are dropped, counted, and reported by the caller as a gap. Every method is blocking
(the node calls them through `asyncio.to_thread`, one at a time).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sync.files import private_database
from sync.sparkplug.codec import MetricValue

FILE_NAME = "sparkplug-history.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    device  TEXT    NOT NULL,
    metric  TEXT    NOT NULL,
    value   TEXT,                -- JSON text of the value; NULL for a null value
    quality TEXT    NOT NULL,
    ts_ms   INTEGER NOT NULL     -- the reading's time
)"""


@dataclass(frozen=True, slots=True)
class Change:
    """One metric change of one device."""

    device: str
    metric: str
    value: MetricValue
    quality: str
    ts_ms: int


@dataclass(frozen=True, slots=True)
class Dropped:
    """Rows the cap dropped: how many, and the time range of their readings (ms)."""

    count: int
    first_ms: int
    last_ms: int


class History:
    """The stored changes, oldest first."""

    def __init__(self, data_dir: Path, *, max_rows: int) -> None:
        self._path = data_dir / FILE_NAME
        self.max_rows = max_rows
        self._db: sqlite3.Connection | None = None
        self.count = 0

    def open(self) -> None:
        """Create or open the file; count what an earlier run left."""
        private_database(self._path)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(SCHEMA)
        self._db = db
        self.count = db.execute("SELECT COUNT(*) FROM changes").fetchone()[0]

    def close(self) -> None:
        """Close the file."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError(f"{self._path} is not open")
        return self._db

    def append(self, changes: list[Change]) -> Dropped | None:
        """Store changes in one transaction; past the cap drop the oldest (returned)."""
        db = self._conn()
        with db:
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO changes (device, metric, value, quality, ts_ms) VALUES (?,?,?,?,?)",
                [
                    (
                        c.device,
                        c.metric,
                        None if c.value is None else json.dumps(c.value),
                        c.quality,
                        c.ts_ms,
                    )
                    for c in changes
                ],
            )
            self.count += len(changes)
            over = self.count - self.max_rows
            if over <= 0:
                return None
            first, last, last_ms, first_ms = db.execute(
                "SELECT MIN(id), MAX(id), MAX(ts_ms), MIN(ts_ms) FROM "
                "(SELECT id, ts_ms FROM changes ORDER BY id LIMIT ?)",
                (over,),
            ).fetchone()
            db.execute("DELETE FROM changes WHERE id BETWEEN ? AND ?", (first, last))
            self.count -= over
            return Dropped(over, first_ms, last_ms)

    def oldest(self, limit: int, *, skip: Sequence[str] = ()) -> list[tuple[int, Change]]:
        """The oldest stored changes with their row ids, but those of the devices in `skip`."""
        marks = ",".join("?" * len(skip))
        rows = self._conn().execute(
            "SELECT id, device, metric, value, quality, ts_ms FROM changes "
            f"WHERE device NOT IN ({marks}) ORDER BY id LIMIT ?",
            (*skip, limit),
        )
        return [
            (row_id, Change(device, metric, None if value is None else json.loads(value), q, ts))
            for row_id, device, metric, value, q, ts in rows
        ]

    def delete(self, row_ids: Sequence[int]) -> None:
        """Forget these changes (sent)."""
        db = self._conn()
        with db:
            db.execute("BEGIN")
            deleted = db.execute(
                f"DELETE FROM changes WHERE id IN ({','.join('?' * len(row_ids))})", row_ids
            ).rowcount
        self.count -= max(deleted, 0)
