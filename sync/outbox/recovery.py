"""A corrupt outbox at open: detect it, move it aside for forensics, declare what was lost.

``PRAGMA quick_check`` runs on every non-empty file before the outbox connection opens; a
corrupt file (and its -wal/-shm) is renamed and a new stream starts with a
``corruption_recovery`` gap event (docs/delivery.md).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from sync.events import Event
from sync.files import fsync_directory
from sync.outbox.errors import OutboxUnavailable

log = logging.getLogger("edge_agent.outbox")

# (problem, previous stream, its last_seq, its acked_seq) as far as the meta row was readable
_Problem = tuple[str, str | None, int | None, int | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovery:
    """A corrupt database moved aside at open, with what its meta row still told."""

    detail: str
    moved_to: str
    previous_stream: str | None
    previous_last_seq: int | None
    previous_acked_seq: int | None

    def gap_event(self) -> Event:
        """The ``corruption_recovery`` gap event that starts the new stream."""
        ranges: list[list[int]] = []
        last, acked = self.previous_last_seq, self.previous_acked_seq
        if last is not None and acked is not None and last > acked:
            ranges.append([acked + 1, last])
        value = {
            "reason": "corruption_recovery",
            "ranges": ranges,  # seqs of the previous stream that were not yet acknowledged
            "count": sum(last - first + 1 for first, last in ranges),
            "previous_stream": self.previous_stream,
            "moved_to": self.moved_to,
            "detail": self.detail[:500],
        }
        return Event(time.time(), "gap", value=value)


async def recover_if_corrupt(path: Path) -> Recovery | None:
    """Move the database at `path` aside if it is corrupt; None if absent, empty or sound."""
    size = await asyncio.to_thread(_file_size, path)
    if not size:
        return None
    problem = await _inspect(path)
    if problem is None:
        return None
    return await _move_aside(path, problem)


async def _inspect(path: Path) -> _Problem | None:
    """Return (problem, previous stream, last_seq, acked_seq) if the file is corrupt."""
    meta: tuple[str | None, int | None, int | None] = (None, None, None)
    try:
        async with aiosqlite.connect(path, isolation_level=None, timeout=1.0) as db:
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
        raise OutboxUnavailable(f"cannot open outbox {path}: {exc}") from exc
    if result != ["ok"]:
        return ("quick_check: " + "; ".join(result[:5]), *meta)
    return None


async def _move_aside(path: Path, problem: _Problem) -> Recovery:
    detail, stream, last_seq, acked_seq = problem
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    name, moved = await asyncio.to_thread(_move_files, path, target)
    log.error(
        "outbox %s is corrupt (%s); moved aside as %s, starting a new stream",
        path,
        detail,
        ", ".join(moved),
    )
    return Recovery(
        detail=detail,
        moved_to=name,
        previous_stream=stream,
        previous_last_seq=last_seq,
        previous_acked_seq=acked_seq,
    )


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (int(code) & 0xFF) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


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
    fsync_directory(path.parent)  # make the rename durable before a new stream starts
    return target.name, moved
