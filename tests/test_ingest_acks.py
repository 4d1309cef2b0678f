"""The ingest acknowledges only seqs it stored or saw declared dropped (issue #18, item 1).

A batch must be self-covering: every seq of [first_seq, last_seq] is one of its events or lies
in a range declared by one of its gap events, each declared below the gap event's own seq
(docs/central.md, "What the ingest acknowledges"). Forged ranges of every shape are malformed:
nothing stored, nothing acked.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from sync.central.batch import MAX_SEQ, MalformedBatch, parse_batch
from sync.central.commit import commit_batch, prepare_connection
from sync.events import rfc3339
from tests.fixtures import MosquittoBroker, async_wait_until
from tests.fixtures.central import GW, TS, batch, prepare_schema
from tests.fixtures.ingest import FakeGateway, event_ts, probe, running_ingest, watermarks


def at_ts(seq: int) -> str:
    """A distinct event time per seq, on TS's day (seqs reach 2^63-1)."""
    return rfc3339(TS + seq % 100_000 / 1000)


def sample(seq: int, ts: Callable[[int], str] = at_ts) -> Any:
    """One sample event."""
    return {
        "seq": seq,
        "ts": ts(seq),
        "kind": "sample",
        "device": "press1",
        "tag": "temperature",
        "value": seq,
        "quality": "good",
    }


def gap(
    seq: int,
    ranges: Any,
    ts: Callable[[int], str] = at_ts,
    **value: Any,
) -> Any:
    """A buffer_full gap event at ``seq`` declaring ``ranges``."""
    return {
        "seq": seq,
        "ts": ts(seq),
        "kind": "gap",
        "device": None,
        "tag": None,
        "value": {"reason": "buffer_full", "ranges": ranges, "count": 0, **value},
        "quality": None,
    }


def recovery(seq: int, ranges: Any) -> Any:
    """A corruption_recovery gap event: ``ranges`` are seqs of the previous stream."""
    event = gap(seq, ranges)
    event["value"] = {
        "reason": "corruption_recovery",
        "ranges": ranges,
        "count": sum(last - first + 1 for first, last in ranges),
        "previous_stream": str(uuid.uuid4()),
        "moved_to": "outbox.db.corrupt-1",
        "detail": "database disk image is malformed",
    }
    return event


def doc(first: int, last: int, events: list[Any], *, stream: str, gateway: str = GW) -> Any:
    """An S/sync document with exactly these events."""
    return {
        "gateway": gateway,
        "stream": stream,
        "first_seq": first,
        "last_seq": last,
        "events": events,
    }


STREAM = str(uuid.uuid4())

# Every shape of a range that claims seqs neither sent nor declared dropped.
FORGED: list[tuple[str, Any, str]] = [
    ("empty, whole seq space", doc(1, MAX_SEQ, [], stream=STREAM), "seq 1 of"),
    ("empty, one seq", doc(5, 5, [], stream=STREAM), "seq 5 of"),
    (
        "events at the ends only",
        doc(1, 10, [sample(1), sample(10)], stream=STREAM),
        "seq 2 of",
    ),
    (
        "events cover the start only",
        doc(1, 10, [sample(s) for s in range(1, 6)], stream=STREAM),
        "seq 6 of",
    ),
    (
        "gap declares part of the hole",
        doc(1, 10, [sample(1), gap(10, [[2, 5]])], stream=STREAM),
        "seq 6 of",
    ),
    (
        "gap declares its own seq",
        doc(1, 3, [sample(1), sample(2), gap(3, [[3, 3]])], stream=STREAM),
        "not below the gap event's own seq 3",
    ),
    (
        "gap declares seqs after itself",
        doc(1, 10, [gap(1, [[2, 10]])], stream=STREAM),
        "not below the gap event's own seq 1",
    ),
    (
        "gap declares up to the end of the seq space",
        doc(5, 5, [gap(5, [[1, MAX_SEQ]])], stream=STREAM),
        "not below",
    ),
    ("declared seq 0", doc(2, 2, [gap(2, [[0, 1]])], stream=STREAM), r"ranges\[0\]\[0\] must be"),
    (
        "declared seq past 2^63-1",
        doc(MAX_SEQ, MAX_SEQ, [gap(MAX_SEQ, [[1, MAX_SEQ + 1]])], stream=STREAM),
        r"ranges\[0\]\[1\] must be",
    ),
    ("declared negative", doc(3, 3, [gap(3, [[-5, 2]])], stream=STREAM), "must be an integer"),
    ("declared reversed", doc(9, 9, [gap(9, [[5, 2]])], stream=STREAM), "first > last"),
    ("declared as text", doc(9, 9, [gap(9, [["1", 2]])], stream=STREAM), "must be an integer"),
    ("declared as boolean", doc(9, 9, [gap(9, [[True, 2]])], stream=STREAM), "must be an int"),
    ("declared as a float", doc(9, 9, [gap(9, [[1.0, 2]])], stream=STREAM), "must be an int"),
    ("a range of one bound", doc(9, 9, [gap(9, [[1]])], stream=STREAM), "must be .first, last."),
    ("a range of three", doc(9, 9, [gap(9, [[1, 2, 3]])], stream=STREAM), "must be .first, l"),
    ("ranges not a list", doc(9, 9, [gap(9, "1-8")], stream=STREAM), "'ranges' list"),
    (
        "gap value not an object",
        doc(9, 9, [{**gap(9, []), "value": [[1, 8]]}], stream=STREAM),
        "'ranges' list",
    ),
    (
        "gap without ranges",
        doc(9, 9, [{**gap(9, []), "value": {"reason": "buffer_full"}}], stream=STREAM),
        "'ranges' list",
    ),
    (
        "another stream's seqs cover nothing here",
        doc(1, 9, [recovery(1, [[2, 9]])], stream=STREAM),
        "seq 2 of",
    ),
]


@pytest.mark.parametrize(
    ("forged", "reason"), [(d, r) for _, d, r in FORGED], ids=[n for n, _, _ in FORGED]
)
def test_a_batch_that_is_not_self_covering_is_malformed(forged: Any, reason: str) -> None:
    with pytest.raises(MalformedBatch, match=reason):
        parse_batch(GW, json.dumps(forged).encode())


def test_self_covering_batches_are_accepted() -> None:
    stream = str(uuid.uuid4())
    # Events only; a gap declaring the batch's own hole; a gap declaring seqs before the batch.
    parse_batch(
        GW, json.dumps(doc(1, 3, [sample(1), sample(2), sample(3)], stream=stream)).encode()
    )
    holed = doc(1, 6, [sample(1), gap(5, [[2, 4]]), sample(6)], stream=stream)
    parse_batch(GW, json.dumps(holed).encode())
    later = doc(20, 21, [gap(20, [[4, 5], [8, 8]]), sample(21)], stream=stream)
    parse_batch(GW, json.dumps(later).encode())
    # append_failed assigns no seqs: an empty ranges list.
    parse_batch(GW, json.dumps(doc(7, 7, [gap(7, [])], stream=stream)).encode())
    # corruption_recovery names the previous stream's seqs, above its own: accepted as such.
    parsed = parse_batch(
        GW, json.dumps(doc(1, 1, [recovery(1, [[500, 900]])], stream=stream)).encode()
    )
    assert parsed.covered == ((1, 1),)
    assert parse_batch(GW, json.dumps(later).encode()).covered == ((4, 5), (8, 8), (20, 21))


# -- the watermark in PostgreSQL -----------------------------------------------------------------


@pytest.fixture
async def conn(postgres_database: str) -> AsyncIterator[asyncpg.Connection]:
    """A prepared ingest session on a fresh database."""
    await prepare_schema(postgres_database)
    connection = await asyncpg.connect(postgres_database)
    try:
        await prepare_connection(connection)
        yield connection
    finally:
        await connection.close()


async def test_a_hole_declared_by_a_later_gap_event_is_passed_once_that_batch_commits(
    conn: asyncpg.Connection,
) -> None:
    stream = str(uuid.uuid4())
    # The size cap dropped 4..5 and 8 after they were sent nowhere; its gap event is seq 11.
    dropped = [4, 5, 8]
    assert (await commit_batch(conn, batch(1, 3, stream=stream)))[0] == 3
    assert (await commit_batch(conn, batch(6, 7, stream=stream)))[0] == 3
    assert (await commit_batch(conn, batch(9, 10, stream=stream)))[0] == 3
    later = doc(11, 12, [gap(11, [[4, 5], [8, 8]]), sample(12)], stream=stream)
    parsed = parse_batch(GW, json.dumps(later).encode())
    assert await commit_batch(conn, parsed) == (12, 2)
    stored = await conn.fetch(
        "SELECT seq FROM edge_events WHERE stream_id = $1 ORDER BY seq", uuid.UUID(stream)
    )
    assert [row["seq"] for row in stored] == [s for s in range(1, 13) if s not in dropped]
    assert await conn.fetchval("SELECT count(*) FROM edge_stream_ranges") == 0


async def test_a_gap_event_that_arrives_first_waits_for_the_batches_around_the_hole(
    conn: asyncpg.Connection,
) -> None:
    stream = str(uuid.uuid4())
    later = doc(11, 12, [gap(11, [[4, 5]]), sample(12)], stream=stream)
    assert await commit_batch(conn, parse_batch(GW, json.dumps(later).encode())) == (0, 2)
    assert (await commit_batch(conn, batch(6, 10, stream=stream)))[0] == 0
    assert (await commit_batch(conn, batch(1, 3, stream=stream)))[0] == 12


async def test_a_declaration_below_the_watermark_changes_nothing(conn: asyncpg.Connection) -> None:
    stream = str(uuid.uuid4())
    assert (await commit_batch(conn, batch(1, 10, stream=stream)))[0] == 10
    late = doc(11, 11, [gap(11, [[2, 3]])], stream=stream)
    assert await commit_batch(conn, parse_batch(GW, json.dumps(late).encode())) == (11, 1)


async def test_the_watermark_can_reach_the_last_seq(conn: asyncpg.Connection) -> None:
    stream = str(uuid.uuid4())
    last = doc(MAX_SEQ, MAX_SEQ, [gap(MAX_SEQ, [[1, MAX_SEQ - 1]])], stream=stream)
    assert await commit_batch(conn, parse_batch(GW, json.dumps(last).encode())) == (MAX_SEQ, 1)
    # Once more with a pending range inside: the walk passes 2^63-1 and must not overflow.
    other = str(uuid.uuid4())
    assert (await commit_batch(conn, batch(5, 6, stream=other)))[0] == 0
    end = doc(MAX_SEQ, MAX_SEQ, [gap(MAX_SEQ, [[1, MAX_SEQ - 1]])], stream=other)
    assert await commit_batch(conn, parse_batch(GW, json.dumps(end).encode())) == (MAX_SEQ, 1)


# -- end to end: forged batches over MQTT ------------------------------------------------------


@pytest.mark.slow
async def test_forged_ranges_over_mqtt_are_neither_stored_nor_acked(
    postgres_database: str, mosquitto: MosquittoBroker
) -> None:
    stream = str(uuid.uuid4())
    now: Callable[[int], str] = event_ts

    def e2e(first: int, last: int, events: list[Any]) -> Any:
        return doc(first, last, events, stream=stream, gateway="gw1")

    forged = [
        # The example: the whole seq space, no events.
        e2e(1, MAX_SEQ, []),
        # Below the watermark, overlapping it, far above it.
        e2e(1, 10, []),
        e2e(5, 40, [sample(s, now) for s in range(5, 21)]),
        e2e(21, 30, [sample(21, now), sample(30, now)]),
        # A gap declaring seqs at or above itself, or out of bounds.
        e2e(21, 21, [gap(21, [[21, MAX_SEQ]], now)]),
        e2e(21, 22, [gap(21, [[22, 22]], now), sample(22, now)]),
        e2e(21, 21, [gap(21, [[0, 20]], now)]),
        e2e(21, 21, [gap(21, [[15, 12]], now)]),
    ]
    async with (
        running_ingest(postgres_database, mosquitto) as ingest,
        FakeGateway(mosquitto) as gateway,
    ):
        await probe(gateway, ingest)
        await gateway.deliver([e2e(1, 20, [sample(s, now) for s in range(1, 21)])])
        malformed = ingest.stats.malformed
        acks_before = len([a for a in gateway.acks if a.stream == stream])
        for item in forged:
            gateway.publish(item)
        await async_wait_until(
            lambda: ingest.stats.malformed - malformed == len(forged),
            message=f"{len(forged)} forged batches refused",
        )
        # The legitimate next batch is still acked, exactly up to what is stored.
        await gateway.deliver([e2e(21, 25, [sample(s, now) for s in range(21, 26)])])
        assert ingest.stats.uncovered == 4
        assert ingest.stats.malformed_by_sender["gw1"] == len(forged)

    mine = [a.acked_seq for a in gateway.acks if a.stream == stream]
    assert len(mine) == acks_before + 1  # no forged batch was acked
    assert max(mine) == 25
    assert await watermarks(postgres_database) == {("gw1", stream): 25}
    check = await asyncpg.connect(postgres_database)
    try:
        seqs = await check.fetch(
            "SELECT seq FROM edge_events WHERE stream_id = $1 ORDER BY seq", uuid.UUID(stream)
        )
        assert [row["seq"] for row in seqs] == list(range(1, 26))
        assert await check.fetchval("SELECT count(*) FROM edge_stream_ranges") == 0
    finally:
        await check.close()
