"""Event time is bounded (issue #18, item 2): the ingest refuses absurd event times, and
partition maintenance survives any row already in the table (docs/central.md)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from sync.central.batch import EventTimeWindow, MalformedBatch, parse_batch
from sync.central.partitions import maintain_partitions
from sync.central.schema import migrate
from sync.events import rfc3339
from tests.fixtures import MosquittoBroker, async_wait_until
from tests.fixtures.central import GW, batch_doc
from tests.fixtures.ingest import FakeGateway, probe, running_ingest

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)


def dated(*moments: str) -> bytes:
    """A batch of one sample per event time."""
    doc = batch_doc(1, len(moments), stream=str(uuid.uuid4()))
    for event, moment in zip(doc["events"], moments, strict=True):
        event["ts"] = moment
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "moment",
    [
        "0001-01-01T00:00:00Z",  # asyncpg would send it as -infinity
        "9999-12-31T23:59:59.999999Z",  # ... and this as +infinity
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "1969-12-31T23:59:59.999Z",
        "2026-11-16T12:00:00.001Z",  # just past now + 1 day
        "3026-11-15T12:00:00Z",
    ],
)
def test_an_event_outside_the_window_makes_its_batch_malformed(moment: str) -> None:
    payload = dated("2026-11-15T11:00:00Z", moment)
    with pytest.raises(MalformedBatch, match=r"events\[1\]\.ts .* outside the accepted event"):
        parse_batch(GW, payload, now=NOW)


def test_the_window_bounds_are_accepted_and_configurable() -> None:
    payload = dated("1970-01-01T00:00:00Z", "2026-11-16T12:00:00Z", "2026-11-16T13:00:00+01:00")
    assert len(parse_batch(GW, payload, now=NOW).rows) == 3
    narrow = EventTimeWindow(oldest=datetime(2020, 1, 1, tzinfo=UTC), max_future=timedelta(0))
    with pytest.raises(MalformedBatch, match=r"events\[0\]\.ts"):
        parse_batch(GW, payload, window=narrow, now=NOW)
    assert parse_batch(GW, dated("2020-01-01T00:00:00Z"), window=narrow, now=NOW).rows
    for bad in (
        {"oldest": datetime(1, 1, 1, tzinfo=UTC)},
        {"oldest": datetime(1970, 1, 1)},  # the point: no time zone
        {"max_future": timedelta(days=-1)},
        {"max_future": timedelta(days=400)},
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each says what it refuses
            EventTimeWindow(**bad)  # type: ignore[arg-type]


# -- partition maintenance with absurd rows already stored --------------------------------------


@pytest.fixture
async def conn(postgres_database: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a fresh database with the schema applied."""
    connection = await asyncpg.connect(postgres_database)
    try:
        await migrate(connection)
        yield connection
    finally:
        await connection.close()


# Stored before the ingest refused them (or by hand): -infinity and +infinity (what asyncpg
# makes of 0001-01-01 and 9999-12-31T23:59:59.999999), year 1, year 9999, 1000 years ahead,
# before Christ and PostgreSQL's last year.
ABSURD = (
    "-infinity",
    "infinity",
    "0001-01-01 00:00:00+00",
    "9999-06-30 12:00:00+00",
    "3026-11-15 12:00:00+00",
    "0044-03-15 12:00:00+00 BC",
    "294276-12-31 00:00:00+00",
)


async def insert(conn: asyncpg.Connection, *timestamps: str) -> None:
    """One event per timestamp, straight into edge_events (the default partition)."""
    stream = uuid.uuid4()
    await conn.executemany(
        "INSERT INTO edge_events (gateway_id, stream_id, seq, ts, kind) "
        "VALUES ('gw', $1, $2, $3::text::timestamptz, 'sample')",
        [(stream, seq, ts) for seq, ts in enumerate(timestamps, start=1)],
    )


async def test_maintenance_reports_absurd_rows_and_maintains_every_other_month(
    conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.partitions")
    await insert(conn, *ABSURD, "2026-08-10 10:00:00+00", "2025-01-01 00:00:00+00")
    # Also with the asyncpg datetimes that turn into infinities.
    await conn.execute(
        "INSERT INTO edge_events (gateway_id, stream_id, seq, ts, kind) "
        "VALUES ('gw', $1, 1, $2, 'sample'), ('gw', $1, 2, $3, 'sample')",
        uuid.uuid4(),
        datetime.min.replace(tzinfo=UTC),
        datetime.max.replace(tzinfo=UTC),
    )

    report = await maintain_partitions(conn, months_ahead=1, retention_months=24, now=NOW)

    # The replayed months and the months ahead got their partitions all the same.
    assert report.created == (
        "edge_events_p202501",
        "edge_events_p202608",
        "edge_events_p202611",
        "edge_events_p202612",
    )
    assert report.moved_rows == 2
    assert report.stray_rows == 0
    assert report.absurd.count == len(ABSURD) + 2
    assert report.absurd.infinite == 4
    assert (report.absurd.earliest, report.absurd.latest) == ("-infinity", "infinity")
    warnings = [r.getMessage() for r in caplog.records if "outside the accepted" in r.getMessage()]
    assert len(warnings) == 1
    assert f"{len(ABSURD) + 2} rows in edge_events_default" in warnings[0]
    assert "4 infinite" in warnings[0]
    # Nothing was deleted; every absurd row still waits in the default partition.
    assert await conn.fetchval("SELECT count(*) FROM edge_events_default") == len(ABSURD) + 2
    assert await conn.fetchval("SELECT count(*) FROM edge_events") == len(ABSURD) + 4

    # Finite absurd rows only: the range is reported as dates.
    await conn.execute("DELETE FROM edge_events WHERE NOT isfinite(ts)")
    again = await maintain_partitions(conn, months_ahead=1, retention_months=24, now=NOW)
    assert again.created == ()
    assert again.absurd.count == len(ABSURD) - 2
    assert again.absurd.infinite == 0
    assert again.absurd.earliest == "0044-03-15 12:00:00 BC"
    assert again.absurd.latest == "294276-12-31 00:00:00"


@pytest.mark.slow
async def test_the_ingest_refuses_absurd_times_and_keeps_maintaining(
    postgres_database: str, mosquitto: MosquittoBroker
) -> None:
    # An absurd row from before this release: maintenance must run regardless.
    setup = await asyncpg.connect(postgres_database)
    try:
        await migrate(setup)
        await insert(setup, "-infinity", "infinity")
    finally:
        await setup.close()
    stream = str(uuid.uuid4())
    now = datetime.now(UTC)
    async with (
        running_ingest(postgres_database, mosquitto) as ingest,
        FakeGateway(mosquitto) as gateway,
    ):
        await probe(gateway, ingest)
        assert ingest.stats.maintenance_failures == 0
        assert ingest.stats.maintenance_runs >= 1
        assert ingest.stats.absurd_rows == 2
        for moment in ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"):
            doc = batch_doc(
                1, 2, stream=stream, gateway="gw1", ts=lambda _: rfc3339(now.timestamp())
            )
            doc["events"][1]["ts"] = moment
            gateway.publish(doc)
        await async_wait_until(lambda: ingest.stats.out_of_window == 2, message="2 refused")
        assert ingest.stats.malformed_by_sender == {"gw1": 2}
        assert not [a for a in gateway.acks if a.stream == stream]
    check = await asyncpg.connect(postgres_database)
    try:
        assert (
            await check.fetchval(
                "SELECT count(*) FROM edge_events WHERE stream_id = $1", uuid.UUID(stream)
            )
            == 0
        )
    finally:
        await check.close()
