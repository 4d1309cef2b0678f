"""When the ingest maintains its partitions: at start, every interval, and soon after rows
landed in a kept month that has no partition yet (docs/central.md, "Partitions")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from sync.central.batch import EventTimeWindow
from sync.central.commit import DatabaseAvailability, describe, is_transient
from sync.central.partitions import kept_window, maintain_partitions
from sync.central.stats import IngestStats

log = logging.getLogger("edge_agent.ingest")

# After a failed run, the next one comes at most this many seconds later.
RETRY_AFTER_FAILURE = 30.0


@contextlib.asynccontextmanager
async def maintenance_connection(dsn: str, *, connect_timeout: float) -> AsyncIterator[Any]:
    """A connection outside the pool, without the pool's command timeout.

    For migrations and partition maintenance: they may wait for another replica's advisory
    lock or move many rows, and must not take a connection from the commits.
    """
    conn = await asyncpg.connect(
        dsn,
        timeout=connect_timeout,
        server_settings={"application_name": "edge-agent-ingest-maintenance"},
    )
    try:
        yield conn
    except BaseException:
        conn.terminate()  # the server rolls back and releases the locks of the session
        raise
    await conn.close(timeout=5.0)


class PartitionMaintenance:
    """Runs ``maintain_partitions`` on schedule and early when a batch needs a partition."""

    def __init__(
        self,
        *,
        dsn: str,
        connect_timeout: float,
        database: DatabaseAvailability,
        stats: IngestStats,
        months_ahead: int,
        retention_months: int,
        interval: float,
        debounce: float | None,
        event_window: EventTimeWindow,
    ) -> None:
        """``debounce`` None: never run early, only every ``interval`` seconds."""
        if months_ahead < 0 or retention_months < 1:
            raise ValueError("need months_ahead >= 0 and retention_months >= 1")
        if interval <= 0:
            raise ValueError("need maintenance_interval > 0")
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._database = database
        self._stats = stats
        self._months_ahead = months_ahead
        self._retention_months = retention_months
        self._interval = interval
        self._debounce = debounce
        self._event_window = event_window
        self._covered: frozenset[int] = frozenset()
        self._wake = asyncio.Event()
        self._last_ok = True
        self._last_run = 0.0

    def note_months(self, months: frozenset[int]) -> None:
        """Wake maintenance early when rows land in a kept month that has no partition."""
        if self._debounce is None or months <= self._covered:
            return
        oldest, newest = kept_window(
            datetime.now(UTC),
            months_ahead=self._months_ahead,
            retention_months=self._retention_months,
        )
        if any(oldest <= month <= newest for month in months - self._covered):
            self._wake.set()

    async def loop(self) -> None:
        """Run maintenance every interval, or soon after ``note_months`` woke it; forever."""
        loop = asyncio.get_running_loop()
        while True:
            # After a failure, try again sooner than the regular interval.
            delay = self._interval if self._last_ok else min(self._interval, RETRY_AFTER_FAILURE)
            woke = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
                    woke = True
            if woke and self._debounce is not None:
                # Rows just went to the default partition: adopt them soon, not per batch.
                pause = self._last_run + self._debounce - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
            self._wake.clear()
            await self.run_once()

    async def run_once(self) -> None:
        """One maintenance run; a failure is counted (and logged), never raised."""
        self._last_run = asyncio.get_running_loop().time()
        try:
            async with maintenance_connection(
                self._dsn, connect_timeout=self._connect_timeout
            ) as conn:
                report = await maintain_partitions(
                    conn,
                    months_ahead=self._months_ahead,
                    retention_months=self._retention_months,
                    event_window=self._event_window,
                )
        except Exception as exc:
            self._last_ok = False
            self._stats.maintenance_failures += 1
            if is_transient(exc):
                self._database.failed(exc)  # logged once per outage
            else:
                log.warning("ingest: partition maintenance failed: %s", describe(exc))
            return
        self._last_ok = True
        self._covered = report.covered
        self._stats.maintenance_runs += 1
        self._stats.absurd_rows = report.absurd.count
