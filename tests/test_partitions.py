"""Central schema migrations and monthly partition maintenance against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from unittest import mock

import asyncpg
import pytest

from sync.central.partitions import (
    AbsurdRows,
    list_partitions,
    maintain_partitions,
    month_index,
    partition_name,
)
from sync.central.schema import MIGRATIONS, SCHEMA_VERSION, migrate

NOV_2026 = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
async def conn(postgres_database: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a fresh database with the schema applied."""
    connection = await asyncpg.connect(postgres_database)
    try:
        await migrate(connection)
        yield connection
    finally:
        await connection.close()


async def insert(conn: asyncpg.Connection, *timestamps: str) -> None:
    """Insert one event per timestamp (RFC 3339) straight into edge_events."""
    stream = uuid.uuid4()
    await conn.executemany(
        "INSERT INTO edge_events (gateway_id, stream_id, seq, ts, kind) "
        "VALUES ('gw', $1, $2, $3::text::timestamptz, 'sample')",
        [(stream, seq, ts) for seq, ts in enumerate(timestamps, start=1)],
    )


async def placement(conn: asyncpg.Connection) -> dict[str, str]:
    """Timestamp (ISO, UTC) -> the partition holding the row."""
    rows = await conn.fetch(
        "SELECT tableoid::regclass::text AS part, ts FROM edge_events ORDER BY ts"
    )
    return {row["ts"].astimezone(UTC).isoformat(): row["part"] for row in rows}


async def test_migrate_is_idempotent_and_safe_for_concurrent_replicas(
    postgres_database: str,
) -> None:
    conns = [await asyncpg.connect(postgres_database) for _ in range(4)]
    try:
        versions = await asyncio.gather(*(migrate(c) for c in conns))
        assert versions == [SCHEMA_VERSION] * 4
        assert await migrate(conns[0]) == SCHEMA_VERSION  # and once more, later
        applied = await conns[0].fetch("SELECT version FROM edge_schema_version")
        assert [row["version"] for row in applied] == [1, 2]

        # The contract's columns, exactly (docs/central.md, "Schema").
        columns = await conns[0].fetch(
            """
            SELECT column_name, data_type, is_nullable FROM information_schema.columns
            WHERE table_name = $1 ORDER BY ordinal_position
            """,
            "edge_events",
        )
        assert [(c["column_name"], c["data_type"], c["is_nullable"]) for c in columns] == [
            ("gateway_id", "text", "NO"),
            ("stream_id", "uuid", "NO"),
            ("seq", "bigint", "NO"),
            ("ts", "timestamp with time zone", "NO"),
            ("kind", "text", "NO"),
            ("device", "text", "YES"),
            ("tag", "text", "YES"),
            ("value", "jsonb", "YES"),
            ("quality", "text", "YES"),
            ("received_at", "timestamp with time zone", "NO"),
        ]
        pk = await conns[0].fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'edge_events'::regclass AND contype = 'p'"
        )
        assert pk == "PRIMARY KEY (gateway_id, stream_id, seq, ts)"
        assert (
            await conns[0].fetchval(
                "SELECT partstrat::text FROM pg_partitioned_table WHERE partrelid = 'edge_events'::regclass"
            )
            == "r"
        )
        streams_pk = await conns[0].fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'edge_streams'::regclass AND contype = 'p'"
        )
        assert streams_pk == "PRIMARY KEY (gateway_id, stream_id)"
        for name in ("edge_events_default", "edge_stream_ranges", "edge_gaps"):
            assert await conns[0].fetchval("SELECT to_regclass($1) IS NOT NULL", name)
    finally:
        for c in conns:
            await c.close()


async def test_a_version_1_database_upgrades_and_keeps_its_watermarks(
    postgres_database: str,
) -> None:
    conn = await asyncpg.connect(postgres_database)
    try:
        # What a replica of the previous release left behind: version 1 and a stream.
        with mock.patch("sync.central.schema.MIGRATIONS", MIGRATIONS[:1]):
            await migrate(conn)
        assert await conn.fetchval("SELECT max(version) FROM edge_schema_version") == 1
        stream = uuid.uuid4()
        assert await conn.fetchval("SELECT edge_commit_range('gw', $1, 1, 10)", stream) == 10
        assert await conn.fetchval("SELECT to_regproc('edge_commit_ranges')") is None

        assert await migrate(conn) == SCHEMA_VERSION == 2
        assert (
            await conn.fetchval("SELECT edge_commit_ranges('gw', $1, '{21,11}', '{30,20}')", stream)
            == 30
        )
        assert await conn.fetchval("SELECT count(*) FROM edge_stream_ranges") == 0
        applied = await conn.fetch("SELECT version FROM edge_schema_version ORDER BY 1")
        assert [row["version"] for row in applied] == [1, 2]
    finally:
        await conn.close()


async def test_maintenance_keeps_current_and_months_ahead_ready(conn: asyncpg.Connection) -> None:
    report = await maintain_partitions(conn, months_ahead=3, retention_months=24, now=NOV_2026)
    assert report.created == (
        "edge_events_p202611",
        "edge_events_p202612",
        "edge_events_p202701",
        "edge_events_p202702",
    )
    assert report.dropped == ()
    again = await maintain_partitions(conn, months_ahead=3, retention_months=24, now=NOV_2026)
    assert again.created == ()
    assert again.dropped == ()
    assert again.covered == report.covered
    bounds = await conn.fetchval(
        "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = $1",
        "edge_events_p202612",
    )
    # Bounds are UTC month starts (shown in the server's time zone).
    lower, upper = await conn.fetchrow(
        "SELECT '2026-12-01T00:00:00Z'::timestamptz::text, '2027-01-01T00:00:00Z'::timestamptz::text"
    )
    assert bounds == f"FOR VALUES FROM ('{lower}') TO ('{upper}')"


async def test_rows_across_a_month_boundary_land_in_their_partitions(
    conn: asyncpg.Connection,
) -> None:
    await maintain_partitions(conn, months_ahead=1, retention_months=24, now=NOV_2026)
    await insert(conn, "2026-11-30T23:59:59.999Z", "2026-12-01T00:00:00.000Z")
    # 00:30 on Dec 1st in Berlin is still November in UTC: partitions follow UTC.
    await insert(conn, "2026-12-01T00:30:00.000+01:00")
    assert await placement(conn) == {
        "2026-11-30T23:30:00+00:00": "edge_events_p202611",
        "2026-11-30T23:59:59.999000+00:00": "edge_events_p202611",
        "2026-12-01T00:00:00+00:00": "edge_events_p202612",
    }


async def test_maintenance_moves_default_rows_into_new_partitions(
    conn: asyncpg.Connection,
) -> None:
    await maintain_partitions(conn, months_ahead=1, retention_months=24, now=NOV_2026)
    await insert(
        conn,
        "2026-08-10T10:00:00.000Z",  # a replayed old buffer: no partition yet
        "2026-08-31T23:59:59.999Z",
        "2025-01-01T00:00:00.000Z",  # still within 24 months
        "2023-01-01T00:00:00.000Z",  # older than the retention: never gets a partition
        "2027-06-01T00:00:00.000Z",  # months ahead (the ingest refuses it now): waits there
    )
    before = await placement(conn)
    assert set(before.values()) == {"edge_events_default"}

    report = await maintain_partitions(conn, months_ahead=1, retention_months=24, now=NOV_2026)
    assert report.created == ("edge_events_p202501", "edge_events_p202608")
    assert report.moved_rows == 3
    assert report.stray_rows == 1
    assert report.absurd == AbsurdRows(1, 0, "2027-06-01 00:00:00", "2027-06-01 00:00:00")
    assert await placement(conn) == {
        "2023-01-01T00:00:00+00:00": "edge_events_default",
        "2025-01-01T00:00:00+00:00": "edge_events_p202501",
        "2026-08-10T10:00:00+00:00": "edge_events_p202608",
        "2026-08-31T23:59:59.999000+00:00": "edge_events_p202608",
        "2027-06-01T00:00:00+00:00": "edge_events_default",
    }
    # The new partition got the parent's indexes (primary key and the gap index).
    indexes = await conn.fetch(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'edge_events_p202608'"
    )
    assert len(indexes) == 2
    # New rows of that month now go straight to it.
    await insert(conn, "2026-08-20T00:00:00.000Z")
    assert (await placement(conn))["2026-08-20T00:00:00+00:00"] == "edge_events_p202608"

    # Months later, June 2027 enters the window: its waiting row moves into its partition.
    later = datetime(2027, 3, 2, tzinfo=UTC)
    report = await maintain_partitions(conn, months_ahead=3, retention_months=36, now=later)
    assert "edge_events_p202706" in report.created
    assert report.moved_rows == 1
    assert (await placement(conn))["2027-06-01T00:00:00+00:00"] == "edge_events_p202706"
    assert await conn.fetchval("SELECT count(*) FROM edge_events") == 6


async def test_retention_drops_whole_partitions_older_than_it(conn: asyncpg.Connection) -> None:
    old = datetime(2020, 1, 15, tzinfo=UTC)
    await maintain_partitions(conn, months_ahead=2, retention_months=24, now=old)
    await insert(conn, "2020-01-20T00:00:00Z", "2020-02-20T00:00:00Z", "2020-03-20T00:00:00Z")

    # On 2022-03-10 with 24 months: March 2020 still overlaps the retention, Feb 2020 not.
    now = datetime(2022, 3, 10, tzinfo=UTC)
    report = await maintain_partitions(conn, months_ahead=0, retention_months=24, now=now)
    assert report.dropped == ("edge_events_p202001", "edge_events_p202002")
    assert report.created == ("edge_events_p202203",)
    parts = await list_partitions(conn)
    assert sorted(parts.values()) == ["edge_events_p202003", "edge_events_p202203"]
    assert not await conn.fetchval("SELECT to_regclass('edge_events_p202001') IS NOT NULL")
    assert await placement(conn) == {"2020-03-20T00:00:00+00:00": "edge_events_p202003"}


async def test_concurrent_maintenance_and_inserts_lose_nothing(postgres_database: str) -> None:
    conns = [await asyncpg.connect(postgres_database) for _ in range(4)]
    writer = await asyncpg.connect(postgres_database)
    try:
        await migrate(conns[0])
        stream = uuid.uuid4()
        stop = asyncio.Event()

        async def keep_inserting() -> int:
            # Rows of a month without a partition: default first, then the new partition.
            seq = 0
            while not stop.is_set() or seq < 50:
                seq += 1
                await writer.execute(
                    "INSERT INTO edge_events (gateway_id, stream_id, seq, ts, kind) "
                    "VALUES ('gw', $1, $2, '2026-08-15T00:00:00Z', 'sample')",
                    stream,
                    seq,
                )
            return seq

        inserting = asyncio.create_task(keep_inserting())
        reports = await asyncio.gather(
            *(
                maintain_partitions(c, months_ahead=2, retention_months=24, now=NOV_2026)
                for c in conns
            )
        )
        stop.set()
        written = await inserting
        await maintain_partitions(conns[0], months_ahead=2, retention_months=24, now=NOV_2026)

        created = [name for report in reports for name in report.created]
        assert len(created) == len(set(created))  # each partition made by exactly one replica
        assert set(created) >= {partition_name(month_index(NOV_2026) + i) for i in range(3)}
        counts = await conns[0].fetch(
            "SELECT tableoid::regclass::text AS part, count(*) AS n FROM edge_events GROUP BY 1"
        )
        assert {row["part"]: row["n"] for row in counts} == {"edge_events_p202608": written}
    finally:
        for c in [*conns, writer]:
            await c.close()


async def test_gap_view_lists_every_declared_range(conn: asyncpg.Connection) -> None:
    stream = uuid.uuid4()
    await conn.executemany(
        "INSERT INTO edge_events (gateway_id, stream_id, seq, ts, kind, value) "
        "VALUES ('gw', $1, $2, now(), $3, $4::jsonb)",
        [
            (stream, 1, "sample", "21.5"),
            (stream, 2, "gap", '{"reason":"overflow","ranges":[[10,19],[30,30]],"count":11}'),
            (stream, 3, "gap", '{"reason":"corrupt","ranges":"garbage"}'),
            (stream, 4, "gap", '{"reason":"odd","ranges":[["a",1]]}'),
        ],
    )
    rows = await conn.fetch(
        "SELECT gap_seq, reason, first_seq, last_seq, seq_count, total_count "
        "FROM edge_gaps ORDER BY gap_seq, first_seq"
    )
    assert [tuple(row) for row in rows] == [
        (2, "overflow", 10, 19, 10, 11),
        (2, "overflow", 30, 30, 1, 11),
        (3, "corrupt", None, None, None, None),
        (4, "odd", None, 1, None, None),
    ]
