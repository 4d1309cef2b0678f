"""Monthly partitions of ``edge_events``: create ahead, adopt stray rows, drop past retention.

Partition ``edge_events_pYYYYMM`` holds ``[first of month, first of next month)`` in UTC.
Maintenance keeps the current month and ``months_ahead`` months after it ready, and creates a
partition on demand for any month within the kept window that has rows in
``edge_events_default`` (an old gateway buffer replayed, a gateway clock off by months).

PostgreSQL refuses to add a partition whose range has rows in the default partition, so a
partition is built detached: ``CREATE TABLE (LIKE ...)``, copy the month's rows out of the
default partition, delete them there, ``ATTACH PARTITION`` — one short transaction that holds
``edge_events`` in EXCLUSIVE mode (writes wait, reads go on), with a lock timeout so that it
never queues for long in front of the ingest's inserts.

Months older than the retention are never created; their stray rows stay in the default
partition (reported, never deleted silently: docs/central.md, "Partitions"). Whole partitions
older than the retention are detached and dropped.

Rows whose event time lies outside the ingest's event time window (``-infinity``/``infinity``,
year 1, year 9999: stored before the ingest refused them, or by hand) are left alone and
reported: their month is never computed (``extract`` of an infinite time cannot be cast to an
integer), so they cannot stop the maintenance of every other month.

Everything runs under one session advisory lock, so any number of replicas can maintain.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sync.central.batch import DEFAULT_EVENT_WINDOW, EventTimeWindow
from sync.central.schema import MAINTENANCE_LOCK_KEY

log = logging.getLogger("edge_agent.partitions")

PARENT = "edge_events"
DEFAULT_PARTITION = "edge_events_default"
_NAME = re.compile(r"^edge_events_p(\d{4,5})(\d{2})$")


@dataclass(frozen=True, slots=True)
class MaintenanceReport:
    """What one maintenance run did; ``covered`` = month indexes that now have a partition."""

    created: tuple[str, ...]
    dropped: tuple[str, ...]
    moved_rows: int
    stray_rows: int
    covered: frozenset[int]
    absurd: AbsurdRows


@dataclass(frozen=True, slots=True)
class AbsurdRows:
    """Rows of the default partition dated outside the event time window (text: UTC)."""

    count: int
    infinite: int
    earliest: str | None
    latest: str | None


def month_index(moment: datetime) -> int:
    """Months since year 0 of a moment, in UTC (``year * 12 + month - 1``)."""
    utc = moment.astimezone(UTC)
    return utc.year * 12 + utc.month - 1


def year_month(index: int) -> tuple[int, int]:
    """Inverse of ``month_index``: (year, month 1..12)."""
    year, month0 = divmod(index, 12)
    return year, month0 + 1


def partition_name(index: int) -> str:
    """``edge_events_pYYYYMM`` of a month index."""
    year, month = year_month(index)
    return f"edge_events_p{year:04d}{month:02d}"


def _bound(index: int) -> str:
    # A literal, not a parameter: partition bounds in DDL cannot be bind parameters. Built as
    # text so that the month after December 9999 (year 10000) is still expressible.
    year, month = year_month(index)
    return f"{year:04d}-{month:02d}-01 00:00:00+00"


def kept_window(now: datetime, *, months_ahead: int, retention_months: int) -> tuple[int, int]:
    """Month indexes [oldest kept, newest kept ahead] for ``now``.

    A month is past retention when its whole range ends at or before ``now - retention``,
    i.e. when it is more than ``retention_months`` months before the current month.
    """
    current = month_index(now)
    return current - retention_months, current + months_ahead


async def list_partitions(conn: Any) -> dict[int, str]:
    """Month index -> name of every ``edge_events_pYYYYMM`` attached to ``edge_events``."""
    rows = await conn.fetch(
        """
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = $1::regclass
        """,
        PARENT,
    )
    found: dict[int, str] = {}
    for row in rows:
        match = _NAME.match(row["relname"])
        if match is not None:
            year, month = int(match.group(1)), int(match.group(2))
            if 1 <= month <= 12:
                found[year * 12 + month - 1] = row["relname"]
    return found


async def _default_months(
    conn: Any, earliest: datetime, latest: datetime
) -> tuple[dict[int, int], AbsurdRows]:
    """Month index -> row count of the rows waiting in the default partition dated within
    [earliest, latest], and the rows dated outside it."""
    # One scan. Outside the window the month is NULL (CASE evaluates only its branch: no
    # extract of an infinite time), and the bounds are text: asyncpg decodes neither years
    # before 1 nor after 9999.
    rows = await conn.fetch(
        f"""
        WITH r AS (
          SELECT ts, ts >= $1 AND ts <= $2 AS plausible FROM {DEFAULT_PARTITION}
        )
        SELECT CASE WHEN plausible THEN extract(year FROM ts AT TIME ZONE 'UTC')::int END AS y,
               CASE WHEN plausible THEN extract(month FROM ts AT TIME ZONE 'UTC')::int END AS m,
               count(*) AS n,
               count(*) FILTER (WHERE NOT isfinite(ts)) AS infinite,
               (min(ts) AT TIME ZONE 'UTC')::text AS earliest,
               (max(ts) AT TIME ZONE 'UTC')::text AS latest
        FROM r GROUP BY 1, 2
        """,
        earliest,
        latest,
    )
    months: dict[int, int] = {}
    absurd = AbsurdRows(0, 0, None, None)
    for row in rows:
        if row["y"] is None:
            absurd = AbsurdRows(int(row["n"]), int(row["infinite"]), row["earliest"], row["latest"])
        else:
            months[int(row["y"]) * 12 + int(row["m"]) - 1] = int(row["n"])
    return months, absurd


async def create_partition(conn: Any, index: int, *, lock_timeout: float = 10.0) -> int:
    """Create and attach the partition of month ``index``; return the rows moved into it."""
    name = partition_name(index)
    lower, upper = _bound(index), _bound(index + 1)
    in_range = f"ts >= '{lower}' AND ts < '{upper}'"
    async with conn.transaction():
        # Fail fast rather than queue an exclusive lock in front of every ingest insert.
        await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
        state = await conn.fetchval(
            """
            SELECT CASE WHEN to_regclass($1) IS NULL THEN 'absent'
              WHEN EXISTS (SELECT 1 FROM pg_inherits
                           WHERE inhrelid = to_regclass($1) AND inhparent = $2::regclass)
              THEN 'attached' ELSE 'foreign' END
            """,
            name,
            PARENT,
        )
        if state == "attached":
            return 0  # another replica made it between our listing and now
        if state == "foreign":
            # Never created that way by us (create and attach are one transaction).
            raise RuntimeError(f"table {name} exists but is not a partition of {PARENT}")
        # Writers are paused (readers are not) until COMMIT. Locking only the default
        # partition is not enough: an INSERT that already holds the parent and was routed to
        # the default would wait there, then fail the default's new partition constraint once
        # the attach committed. With the parent locked, in-flight writers finish first and
        # later ones are routed afresh after the attach.
        await conn.execute(f"LOCK TABLE {PARENT} IN EXCLUSIVE MODE")
        await conn.execute(f"CREATE TABLE {name} (LIKE {PARENT} INCLUDING DEFAULTS)")
        # The matching CHECK lets ATTACH skip scanning the new table.
        await conn.execute(f"ALTER TABLE {name} ADD CONSTRAINT {name}_range CHECK ({in_range})")
        status = await conn.execute(
            f"INSERT INTO {name} SELECT * FROM {DEFAULT_PARTITION} WHERE {in_range}"
        )
        moved = int(status.rsplit(" ", 1)[-1])
        if moved:
            await conn.execute(f"DELETE FROM {DEFAULT_PARTITION} WHERE {in_range}")
        await conn.execute(
            f"ALTER TABLE {PARENT} ATTACH PARTITION {name} "
            f"FOR VALUES FROM ('{lower}') TO ('{upper}')"
        )
        await conn.execute(f"ALTER TABLE {name} DROP CONSTRAINT {name}_range")
    return moved


async def drop_partition(conn: Any, name: str, *, lock_timeout: float = 10.0) -> None:
    """Detach and drop one partition."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
        await conn.execute(f"ALTER TABLE {PARENT} DETACH PARTITION {name}")
        await conn.execute(f"DROP TABLE {name}")


async def maintain_partitions(
    conn: Any,
    *,
    months_ahead: int,
    retention_months: int,
    now: datetime | None = None,
    lock_timeout: float = 10.0,
    event_window: EventTimeWindow = DEFAULT_EVENT_WINDOW,
) -> MaintenanceReport:
    """Create ahead, adopt default-partition rows, drop past retention (advisory-locked).

    Default-partition rows dated outside ``event_window`` are reported, never adopted.
    """
    if months_ahead < 0 or retention_months < 1:
        raise ValueError("need months_ahead >= 0 and retention_months >= 1")
    moment = now if now is not None else datetime.now(UTC)
    oldest, newest = kept_window(
        moment, months_ahead=months_ahead, retention_months=retention_months
    )
    current = month_index(moment)
    # Session lock: held across the several short transactions below. Another replica
    # maintaining at the same time makes this wait, then find nothing left to do.
    await conn.execute("SELECT pg_advisory_lock($1)", MAINTENANCE_LOCK_KEY)
    try:
        existing = await list_partitions(conn)
        dropped: list[str] = []
        for index in sorted(existing):
            if index < oldest:
                await drop_partition(conn, existing[index], lock_timeout=lock_timeout)
                dropped.append(existing.pop(index))
        waiting, absurd = await _default_months(conn, *event_window.bounds(moment))
        wanted = set(range(current, newest + 1))
        wanted.update(index for index in waiting if oldest <= index <= newest)
        created: list[str] = []
        moved = 0
        for index in sorted(wanted - existing.keys()):
            moved += await create_partition(conn, index, lock_timeout=lock_timeout)
            existing[index] = partition_name(index)
            created.append(existing[index])
        stray = sum(count for index, count in waiting.items() if index not in existing)
    finally:
        if not conn.is_closed():
            # A lost connection released the lock with its session; an unlock error must not
            # hide the error that brought us here.
            with contextlib.suppress(Exception):
                await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK_KEY)
    for name in dropped:
        log.info("partitions: dropped %s (older than %d months)", name, retention_months)
    if created:
        log.info("partitions: created %s (%d rows moved from the default)", created, moved)
    if stray:
        log.warning(
            "partitions: %d rows stay in %s: their months are outside the kept window "
            "(older than the retention, or past the %d months kept ahead)",
            stray,
            DEFAULT_PARTITION,
            months_ahead,
        )
    if absurd.count:
        log.warning(
            "partitions: %d rows in %s are dated outside the accepted event times %s "
            "(%d infinite; earliest %s, latest %s UTC): kept there, never deleted; a row "
            'moves only if a partition of its month is made (docs/central.md, "Partitions")',
            absurd.count,
            DEFAULT_PARTITION,
            event_window.describe(),
            absurd.infinite,
            absurd.earliest,
            absurd.latest,
        )
    return MaintenanceReport(
        created=tuple(created),
        dropped=tuple(dropped),
        moved_rows=moved,
        stray_rows=stray,
        covered=frozenset(existing),
        absurd=absurd,
    )
