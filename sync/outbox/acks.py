"""The central store's acks (docs/delivery.md): delete what they cover, persist the watermark.

An ack is idempotent: a lower or repeated ack, or an ack of another stream, changes nothing.
An ack is taken at once (`note`: reads skip what it covers and waiters wake) and applied
lazily: the DELETE and the ``acked_seq`` update ride in the writer's next insert transaction,
or in a transaction of their own after ``ack_delay`` (sync/outbox/writer.py). One lost in a
crash is harmless: those events are sent again and the central store absorbs duplicates.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import sqlite3

from sync.outbox.database import Database
from sync.outbox.errors import OutboxUnavailable
from sync.outbox.state import OutboxState

log = logging.getLogger("edge_agent.outbox")

# Largest number of rows deleted per transaction when an ack covers a huge range, so that an
# ack after a long outage does not hold up appends for seconds.
ACK_CHUNK = 50_000


class Acks:
    """Takes acks, wakes the tasks waiting for a seq to be acked, and deletes acked rows."""

    def __init__(self, *, database: Database, state: OutboxState) -> None:
        self._database = database
        self._state = state
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap by seq
        self._waiter_ids = itertools.count()
        self._foreign_streams: set[str] = set()

    def note(self, stream: str, acked_seq: int) -> bool:
        """Take the central store's watermark (in memory); False if nothing changed."""
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
        if target <= self._state.acked_seq:
            return False
        self._state.acked_seq = target
        self._wake_waiters()
        return True

    @property
    def pending(self) -> bool:
        """Whether acked rows wait to be deleted."""
        return self._state.acked_seq > self._state.deleted_upto

    def next_chunk(self) -> int | None:
        """The seq to delete up to in the next transaction (None: nothing to delete)."""
        state = self._state
        if state.acked_seq <= state.deleted_upto:
            return None
        return min(state.acked_seq, state.deleted_upto + ACK_CHUNK)

    @staticmethod
    def delete_in(connection: sqlite3.Connection, upto: int) -> int:
        """Delete the rows up to `upto` and persist the watermark (in the writer's transaction,
        on the connection's thread); return the rows deleted."""
        cursor = connection.execute("DELETE FROM events WHERE seq <= ?", (upto,))
        connection.execute("UPDATE meta SET acked_seq = ? WHERE id = 1", (upto,))
        return max(cursor.rowcount, 0)

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
