"""What PostgreSQL holds of each gateway, for the ingest's status page (docs/page.md, "The
ingest's page"): its streams' watermarks, the batches committed above them, and its gap events.

Read on one connection of its own (never the commit pool's), opened when first needed and
again after a failure; every read is bounded (the first ``limit`` gateways by id, the newest
``STREAMS_SHOWN`` streams of each).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped, unused-ignore]

# Streams per gateway in one read: a gateway starts a new stream only when its outbox is
# recreated, so more than a few is history (the count says how many).
STREAMS_SHOWN = 5
READ_TIMEOUT = 5.0

# The first `limit` gateway ids (of edge_streams) containing the filter, and their number.
_GATEWAYS = """
SELECT gateway_id, count(*) OVER () AS total FROM (
  SELECT DISTINCT gateway_id FROM edge_streams WHERE strpos(lower(gateway_id), $1) > 0
) AS g
ORDER BY gateway_id
LIMIT $2
"""
# The newest streams of those gateways: the watermark, the last commit, and what is committed
# above the watermark (ranges waiting for a missing seq below them).
_STREAMS = """
SELECT s.gateway_id, s.stream_id, s.acked_seq, extract(epoch FROM s.last_seen) AS last_seen,
       s.streams, p.ranges, p.highest
FROM (
  SELECT gateway_id, stream_id, acked_seq, last_seen,
         count(*) OVER (PARTITION BY gateway_id) AS streams,
         row_number() OVER (PARTITION BY gateway_id ORDER BY last_seen DESC NULLS LAST) AS n
  FROM edge_streams WHERE gateway_id = ANY($1::text[])
) AS s
LEFT JOIN LATERAL (
  SELECT count(*) AS ranges, max(last_seq) AS highest FROM edge_stream_ranges r
  WHERE r.gateway_id = s.gateway_id AND r.stream_id = s.stream_id
) AS p ON true
WHERE s.n <= $2
ORDER BY s.gateway_id, s.n
"""
# Gap events (edge_events_gaps_idx): how many, the seqs they declare dropped, the newest.
_GAPS = """
SELECT gateway_id, count(*) AS events,
       sum(CASE WHEN (value -> 'count')::text ~ '^[0-9]{1,18}$'
           THEN (value -> 'count')::text::bigint END) AS seqs,
       extract(epoch FROM max(ts)) AS newest
FROM edge_events WHERE kind = 'gap' AND gateway_id = ANY($1::text[])
GROUP BY gateway_id
"""


@dataclass(frozen=True, slots=True)
class StoredStream:
    """One stream of a gateway as stored."""

    stream: uuid.UUID
    acked_seq: int  # the watermark: every seq up to it is committed or declared dropped
    last_commit: float | None  # epoch s of its last committed batch (any replica)
    ranges_above: int  # committed ranges above the watermark (a seq below them is missing)
    highest_committed: int | None  # the highest seq of those ranges


@dataclass(frozen=True, slots=True)
class StoredGaps:
    """A gateway's gap events."""

    events: int
    seqs: int  # seqs they declare dropped
    newest: float  # epoch s of the newest one's event time


@dataclass(frozen=True, slots=True)
class StoredGateway:
    """One gateway as stored: its newest streams, how many it has, its gaps."""

    gateway: str
    streams: tuple[StoredStream, ...]
    streams_total: int
    gaps: StoredGaps | None


@dataclass(frozen=True, slots=True)
class StoredOverview:
    """The first gateways of a read, and how many match in all."""

    gateways: tuple[StoredGateway, ...]
    total: int


async def read_overview(conn: Any, needle: str, limit: int, extra: list[str]) -> StoredOverview:
    """The first ``limit`` of the stored gateways whose id contains ``needle`` (lower case) and
    the gateways named in ``extra`` (seen by this replica), by id, with their streams and gaps;
    ``total`` counts the stored ones that match."""
    rows = await conn.fetch(_GATEWAYS, needle, limit)
    total = int(rows[0]["total"]) if rows else 0
    names = sorted({*(row["gateway_id"] for row in rows), *extra})[:limit]
    streams: dict[str, list[StoredStream]] = {}
    counts: dict[str, int] = {}
    for row in await conn.fetch(_STREAMS, names, STREAMS_SHOWN):
        gateway = row["gateway_id"]
        counts[gateway] = int(row["streams"])
        last_seen = row["last_seen"]
        highest = row["highest"]
        streams.setdefault(gateway, []).append(
            StoredStream(
                stream=uuid.UUID(str(row["stream_id"])),
                acked_seq=int(row["acked_seq"]),
                last_commit=None if last_seen is None else float(last_seen),
                ranges_above=int(row["ranges"]),
                highest_committed=None if highest is None else int(highest),
            )
        )
    gaps = {
        row["gateway_id"]: StoredGaps(
            events=int(row["events"]),
            seqs=int(row["seqs"] or 0),
            newest=float(row["newest"]),
        )
        for row in await conn.fetch(_GAPS, names)
    }
    gateways = tuple(
        StoredGateway(
            gateway=name,
            streams=tuple(streams.get(name, ())),
            streams_total=counts.get(name, 0),
            gaps=gaps.get(name),
        )
        for name in names
        if name in counts or name in gaps
    )
    return StoredOverview(gateways=gateways, total=total)


class OverviewReader:
    """Reads ``read_overview`` on a connection of its own; ``close()`` when done."""

    def __init__(self, dsn: str, *, timeout: float = READ_TIMEOUT) -> None:
        """Connect to ``dsn`` when first read; every call gives up after ``timeout`` seconds."""
        self._dsn = dsn
        self._timeout = timeout
        self._conn: Any = None
        self._lock = asyncio.Lock()  # one read at a time on the connection (several tabs)

    async def read(self, needle: str, limit: int, extra: list[str]) -> StoredOverview:
        """``read_overview`` now; a failure closes the connection (the next read reopens it)
        and is raised."""
        async with self._lock:
            try:
                async with asyncio.timeout(self._timeout):
                    if self._conn is None:
                        self._conn = await asyncpg.connect(
                            self._dsn,
                            timeout=self._timeout,
                            command_timeout=self._timeout,
                            server_settings={"application_name": "edge-agent-ingest-page"},
                        )
                    return await read_overview(self._conn, needle, limit, extra)
            except BaseException:
                # In doubt (a timeout, a cancellation, a lost server): never reused.
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.terminate()
                raise

    async def close(self) -> None:
        """Close the connection, if open."""
        async with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=self._timeout)
