"""The central store's acks (docs/delivery.md): delete what they cover, persist the watermark.

An ack is idempotent: a lower or repeated ack, or an ack of another stream, changes nothing.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging

from sync.outbox.database import Database
from sync.outbox.errors import OutboxUnavailable
from sync.outbox.state import OutboxState

log = logging.getLogger("edge_agent.outbox")

# Largest number of rows deleted per transaction when an ack covers a huge range, so that an
# ack after a long outage does not hold up appends for seconds.
_ACK_CHUNK = 50_000


class Acks:
    """Applies acks to the database and wakes the tasks waiting for a seq to be acked."""

    def __init__(self, *, database: Database, state: OutboxState) -> None:
        self._database = database
        self._state = state
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap by seq
        self._waiter_ids = itertools.count()
        self._foreign_streams: set[str] = set()

    async def ack(self, stream: str, acked_seq: int) -> bool:
        """Delete every event covered by the ack; False if nothing changed."""
        if stream != self._state.stream:
            if stream not in self._foreign_streams:
                self._foreign_streams.add(stream)
                log.warning(
                    "outbox %s: ignoring ack for stream %s (ours is %s)",
                    self._database.path,
                    stream,
                    self._state.stream,
                )
            return False
        target = acked_seq
        if target > self._state.last_seq:
            log.warning(
                "outbox %s: ack %d beyond the last committed seq %d; using the latter",
                self._database.path,
                acked_seq,
                self._state.last_seq,
            )
            target = self._state.last_seq
        changed = False
        while self._state.acked_seq < target:
            if await self._delete_upto(min(target, self._state.acked_seq + _ACK_CHUNK)):
                changed = True
        return changed

    async def _delete_upto(self, upto: int) -> bool:
        """Delete the events up to `upto` in one transaction; False if already done."""
        database, state = self._database, self._state
        async with database.lock:
            if upto <= state.acked_seq:
                return False  # a concurrent ack got there first
            async with database.transaction(f"cannot record ack {upto} in {database.path}") as db:
                cursor = await db.execute("DELETE FROM events WHERE seq <= ?", (upto,))
                deleted = max(cursor.rowcount, 0)
                await db.execute("UPDATE meta SET acked_seq = ? WHERE id = 1", (upto,))
                oldest = await database.oldest_ts()
        state.acked_seq = upto
        state.events_count -= deleted
        state.oldest_ts = oldest
        state.commits += 1
        self._wake_waiters()
        return True

    async def wait(self, seq: int) -> None:
        """Wait until `seq` is acked (the caller checked that it is not yet)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (seq, next(self._waiter_ids), future))
        await future

    def close(self) -> None:
        """Fail every waiting task with OutboxUnavailable (the outbox closes)."""
        for _, _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(OutboxUnavailable("outbox closed"))
        self._waiters.clear()

    def _wake_waiters(self) -> None:
        while self._waiters and self._waiters[0][0] <= self._state.acked_seq:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
