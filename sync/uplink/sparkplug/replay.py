"""The node's history: changes it could not publish live, kept and republished after a birth.

While the node is not born every change goes to the history file (sync/sparkplug/history.py)
through a bounded list in memory, written every HISTORY_FLUSH; so do the changes sent live in
the last 1.5 keep-alives before a connection loss (they may have died with the connection, so
they are kept at least once). After a birth they are republished oldest first as historical
DDATA, REPLAY_METRICS at a time with a pause between, so that live DDATA go out in between. A
change that cannot be kept or republished is counted and reported as a `gap` event
(docs/sparkplug.md, "History").
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from sync.events import Event, rfc3339
from sync.sparkplug.history import Change, Dropped, History
from sync.sparkplug.model import Update
from sync.uplink.sparkplug.limited_log import LimitedLog

log = logging.getLogger("edge_agent.sparkplug")

HISTORY_FLUSH = 0.2  # seconds between writes of what piled up in memory to the history file
MAX_PENDING = 100_000  # changes in memory waiting for that write (more: dropped, a gap)
REPLAY_METRICS = 200  # changes per historical DDATA read at once
REPLAY_PAUSE = 0.01  # seconds between two of them: live DDATA go out in between
# What was sent live in the last 1.5 keep-alives before a connection loss (the longest a loss
# may go unnoticed) may have died with it: it is kept, and stored as history when the loss
# comes (at least once). At most this many changes are kept so.
MAX_RECENT = 200_000

Emit = Callable[[list[Event]], Coroutine[Any, Any, None]]


class ReplayTarget(Protocol):
    """The node, as the history sees it."""

    @property
    def born(self) -> bool:
        """Whether NBIRTH went out on the current connection."""
        ...

    def unborn_devices(self) -> list[str]:
        """Devices whose DBIRTH is still to come: their changes wait."""
        ...

    def publish_historical(self, changes: Sequence[Change]) -> tuple[int, list[Change]] | None:
        """Send `changes` as historical DDATA: (metrics sent, changes the config no longer
        has), or None when the connection is gone (nothing counts as sent)."""
        ...


class HistoryKeeper:
    """Keeps what the node could not publish, and republishes it after a birth."""

    def __init__(self, history: History, *, limited: LimitedLog, keepalive: float) -> None:
        self._history = history
        self._limited = limited
        self._pending: list[Change] = []  # changes for the history file, not yet written
        # Sent live lately: (when, device, the DDATA's updates), one entry per message.
        self._recent: deque[tuple[float, str, list[Update]]] = deque()
        self._recent_values = 0
        self._recent_window = 1.5 * keepalive
        self._wake = asyncio.Event()
        self._emit: Emit | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.replayed = 0
        self.dropped = 0

    def reports_to(self, emit: Emit) -> None:
        """Where a `gap` event goes when changes are dropped (the pipeline: outbox, sinks)."""
        self._emit = emit

    @property
    def pending(self) -> int:
        """Changes kept for republishing (in the file and on their way to it)."""
        return self._history.count + len(self._pending)

    def keep(self, changes: list[Change]) -> None:
        """Keep `changes` for the next birth (on their way to the file)."""
        room = MAX_PENDING - len(self._pending)
        if room < len(changes):
            # The history file cannot keep up (or failed): the excess is a gap, not silence.
            self._dropped(changes[max(room, 0) :], "waiting in memory for the file")
            changes = changes[: max(room, 0)]
        self._pending.extend(changes)
        self._wake.set()

    def remember(self, device: str, updates: list[Update]) -> None:
        """A DDATA went out live: keep it in mind for as long as a loss may go unnoticed."""
        # One entry per message (the list the DDATA was made of): cheap on the live path.
        now = time.monotonic()
        recent = self._recent
        recent.append((now, device, updates))
        self._recent_values += len(updates)
        while recent and (
            now - recent[0][0] > self._recent_window or self._recent_values > MAX_RECENT
        ):
            self._recent_values -= len(recent.popleft()[2])

    def keep_recent(self) -> None:
        """The connection was lost: what went out lately may have died with it."""
        if self._recent:
            self.keep(
                [
                    Change(device, m.name, v, q, ts)
                    for _, device, updates in self._recent
                    for m, v, q, ts in updates
                ]
            )
            self._recent.clear()
            self._recent_values = 0

    def wake(self) -> None:
        """A birth: republish what is kept."""
        self._wake.set()

    async def open(self) -> None:
        """Open the history file (a failure is logged: every change kept is then a gap)."""
        try:
            await asyncio.to_thread(self._history.open)
        except (sqlite3.Error, OSError) as exc:
            log.error("sparkplug: history file unusable: %s", exc)
        if self._history.count:
            log.info("sparkplug: %d changes in the history file to republish", self._history.count)

    async def close(self) -> None:
        """Close the file (`write_pending` first to keep what is in memory)."""
        await asyncio.to_thread(self._history.close)

    async def run(self, node: ReplayTarget) -> None:
        """Write what piles up; after a birth, republish it oldest first (until cancelled)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.write_pending()
            try:
                if node.born and self._history.count and await self._replay_some(node):
                    self._wake.set()  # more to republish
            except sqlite3.Error as exc:
                self._limited.warning("history", "sparkplug: history file: %s", exc)
                self._wake.set()  # again later
                await asyncio.sleep(HISTORY_FLUSH * 25)
            await asyncio.sleep(HISTORY_FLUSH if not node.born else REPLAY_PAUSE)

    async def write_pending(self) -> None:
        """Append the changes in memory to the file."""
        if not self._pending:
            return
        changes, self._pending = self._pending, []
        try:
            dropped = await asyncio.to_thread(self._history.append, changes)
        except sqlite3.Error as exc:
            self._limited.warning("history-write", "sparkplug: history file not written: %s", exc)
            self._dropped(changes, "not written to the file")
            return
        if dropped is not None:
            self._report_gap(dropped, f"over its cap of {self._history.max_rows:,} changes")

    async def _replay_some(self, node: ReplayTarget) -> bool:
        """Republish the oldest stored changes as historical DDATA; False when none was sent."""
        # A device whose DBIRTH is still to come (its first poll) keeps its changes for later.
        rows = await asyncio.to_thread(
            self._history.oldest, REPLAY_METRICS, skip=node.unborn_devices()
        )
        if not rows or not node.born:
            return False
        outcome = node.publish_historical([change for _, change in rows])
        if outcome is None:
            return False  # not connected any more: the rows stay for the next birth
        sent, unusable = outcome
        self.replayed += sent
        if unusable:
            self._dropped(unusable, "of devices, tags or datatypes the config no longer has")
        await asyncio.to_thread(self._history.delete, [row_id for row_id, _ in rows])
        return True

    def _dropped(self, changes: list[Change], where: str) -> None:
        if changes:
            times = [change.ts_ms for change in changes]
            self._report_gap(Dropped(len(changes), min(times), max(times)), where)

    def _report_gap(self, dropped: Dropped, where: str) -> None:
        self.dropped += dropped.count
        log.warning(
            "sparkplug: %d changes dropped from the history (%s), readings of %s..%s",
            dropped.count,
            where,
            rfc3339(dropped.first_ms / 1000),
            rfc3339(dropped.last_ms / 1000),
        )
        if self._emit is None:
            return
        gap = Event(
            time.time(),
            "gap",
            value={
                "reason": "sparkplug_history_dropped",
                "ranges": [],
                "count": dropped.count,
                "first_ts": rfc3339(dropped.first_ms / 1000),
                "last_ts": rfc3339(dropped.last_ms / 1000),
                "detail": f"Sparkplug history {where}: not republished as historical DDATA",
            },
        )
        task = asyncio.get_running_loop().create_task(self._emit([gap]), name="sparkplug:gap")
        self._tasks.add(task)  # referenced until done
        task.add_done_callback(self._tasks.discard)
