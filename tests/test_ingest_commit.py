"""S/sync validation and the committed-range watermark, against a real PostgreSQL (no MQTT)."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from sync.central.batch import Batch, MalformedBatch, parse_batch
from sync.central.commit import commit_batch, is_transient, prepare_connection
from tests.fixtures.central import GW, batch, batch_doc, prepare_schema

# -- validation (no database) ------------------------------------------------------------------


def test_parse_valid_batch() -> None:
    stream = str(uuid.uuid4())
    doc = batch_doc(5, 9, stream=stream, absent=[7])
    doc["events"][0].update(value={"a": [1, None, "x"]}, device=None, quality=None)
    doc["events"][1]["ts"] = "2026-11-18T10:00:00.000+01:00"
    parsed = parse_batch(GW, json.dumps(doc).encode())
    assert (parsed.gateway, parsed.stream, parsed.first_seq, parsed.last_seq) == (GW, stream, 5, 9)
    assert [row[2] for row in parsed.rows] == [5, 6, 8, 9]
    first = parsed.rows[0]
    assert first[5] is None
    assert first[8] is None
    assert json.loads(first[7] or "") == {"a": [1, None, "x"]}
    assert parsed.rows[1][3].isoformat() == "2026-11-18T09:00:00+00:00"  # stored in UTC
    assert parsed.months == frozenset({2026 * 12 + 10})


def test_parse_null_value() -> None:
    doc = batch_doc(1, 1, stream=str(uuid.uuid4()))
    doc["events"][0]["value"] = None
    assert parse_batch(GW, json.dumps(doc).encode()).rows[0][7] is None


def _mutated(change: Any) -> bytes:
    doc = batch_doc(1, 3, stream=str(uuid.uuid4()))
    change(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"gateway": "plant1-line3", "first_seq": NaN}', "NaN"),
        (_mutated(lambda d: d.update(gateway="other")), "differs from the topic"),
        (_mutated(lambda d: d.pop("gateway")), "differs from the topic"),
        (_mutated(lambda d: d.update(stream="nope")), "not a UUID"),
        (_mutated(lambda d: d.update(stream=7)), "UUID string"),
        (_mutated(lambda d: d.update(first_seq=0)), "first_seq must be"),
        (_mutated(lambda d: d.update(first_seq=True)), "first_seq must be"),
        (_mutated(lambda d: d.update(last_seq="3")), "last_seq must be"),
        (_mutated(lambda d: d.update(first_seq=4, last_seq=3)), "first_seq 4 > last_seq 3"),
        (_mutated(lambda d: d.update(events={})), "events must be a list"),
        (_mutated(lambda d: d["events"].append(5)), "is not an object"),
        (_mutated(lambda d: d["events"][0].update(seq=4)), "outside [1, 3]"),
        (_mutated(lambda d: d["events"][1].update(seq=1)), "appears twice"),
        (_mutated(lambda d: d["events"][0].update(kind="bogus")), "kind 'bogus'"),
        (_mutated(lambda d: d["events"][0].pop("kind")), "kind None"),
        (_mutated(lambda d: d["events"][0].update(ts="yesterday")), "not an RFC 3339"),
        (_mutated(lambda d: d["events"][0].update(ts="2026-11-18T10:00:00")), "no time zone"),
        (_mutated(lambda d: d["events"][0].update(ts=12)), "RFC 3339 string"),
        (_mutated(lambda d: d["events"][0].update(device=3)), "device must be"),
        (_mutated(lambda d: d["events"][0].update(tag="a\x00b")), "NUL"),
        (_mutated(lambda d: d["events"][0].update(quality="\ud800")), "not valid Unicode"),
        (b"[" * 100_000 + b"]" * 100_000, "RecursionError"),
    ],
)
def test_parse_rejects_malformed(payload: bytes, reason: str) -> None:
    with pytest.raises(MalformedBatch, match=reason.replace("[", r"\[")):
        parse_batch(GW, payload)


def test_parse_rejects_an_invalid_topic_gateway() -> None:
    doc = batch_doc(1, 1, stream=str(uuid.uuid4()), gateway="a/b")
    with pytest.raises(MalformedBatch, match="not a gateway id"):
        parse_batch("a/b", json.dumps(doc).encode())


# -- the watermark -------------------------------------------------------------------------------


@pytest.fixture
async def pool(postgres_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh database with the schema and ingest sessions prepared."""
    await prepare_schema(postgres_database)
    async with asyncpg.create_pool(
        postgres_database, min_size=1, max_size=8, init=prepare_connection
    ) as created:
        yield created


async def commit(pool: asyncpg.Pool, item: Batch) -> tuple[int, int]:
    """commit_batch on a pooled connection."""
    async with pool.acquire() as conn:
        return await commit_batch(conn, item)


async def pending_ranges(pool: asyncpg.Pool, stream: str) -> list[tuple[int, int]]:
    """The stream's ranges still above its watermark."""
    rows = await pool.fetch(
        "SELECT first_seq, last_seq FROM edge_stream_ranges WHERE stream_id = $1 ORDER BY 1, 2",
        uuid.UUID(stream),
    )
    return [(row[0], row[1]) for row in rows]


async def test_watermark_in_order_out_of_order_and_with_dropped_seqs(pool: asyncpg.Pool) -> None:
    stream = str(uuid.uuid4())
    assert await commit(pool, batch(1, 10, stream=stream)) == (10, 10)
    # Arrives before 11..20: committed, but the watermark cannot pass the hole.
    assert await commit(pool, batch(21, 30, stream=stream)) == (10, 10)
    assert await commit(pool, batch(41, 50, stream=stream)) == (10, 10)
    assert await pending_ranges(pool, stream) == [(21, 30), (41, 50)]
    # 11..20 with 13-15 dropped at the gateway and declared by the gap event 16.
    assert await commit(pool, batch(11, 20, stream=stream, absent=[13, 14, 15])) == (30, 7)
    assert await pending_ranges(pool, stream) == [(41, 50)]
    # A re-batched resend that overlaps both sides closes the last hole.
    assert await commit(pool, batch(25, 45, stream=stream)) == (50, 10)
    assert await pending_ranges(pool, stream) == []
    # A duplicate of an old batch: absorbed, acked again with the current watermark.
    assert await commit(pool, batch(1, 10, stream=stream)) == (50, 0)
    # A batch of only dropped seqs and the gap event declaring them advances the watermark.
    assert await commit(pool, batch(51, 55, stream=stream, absent=range(51, 55))) == (55, 1)

    row = await pool.fetchrow(
        "SELECT acked_seq, last_seen FROM edge_streams WHERE stream_id = $1", uuid.UUID(stream)
    )
    assert row["acked_seq"] == 55
    assert row["last_seen"] is not None
    seqs = await pool.fetch(
        "SELECT seq FROM edge_events WHERE stream_id = $1 ORDER BY seq", uuid.UUID(stream)
    )
    assert [r["seq"] for r in seqs] == [
        s for s in range(1, 56) if s not in (13, 14, 15) and not 51 <= s <= 54
    ]


async def test_streams_and_gateways_are_independent(pool: asyncpg.Pool) -> None:
    one, two = str(uuid.uuid4()), str(uuid.uuid4())
    assert (await commit(pool, batch(1, 5, stream=one)))[0] == 5
    assert (await commit(pool, batch(3, 9, stream=two)))[0] == 0
    assert (await commit(pool, batch(1, 4, stream=one, gateway="other")))[0] == 4
    assert (await commit(pool, batch(1, 2, stream=two)))[0] == 9
    streams = await pool.fetch("SELECT gateway_id, acked_seq FROM edge_streams ORDER BY 2")
    assert [tuple(r) for r in streams] == [("other", 4), (GW, 5), (GW, 9)]


async def test_concurrent_out_of_order_commits_of_one_stream(pool: asyncpg.Pool) -> None:
    """Eight connections commit shuffled, overlapping, duplicated batches of one stream."""
    rng = random.Random(7)
    stream = str(uuid.uuid4())
    bounds: list[tuple[int, int]] = []
    seq = 1
    while seq <= 2000:
        size = rng.randint(1, 60)
        bounds.append((seq, min(2000, seq + size - 1)))
        seq += size
    work = bounds + rng.sample(bounds, len(bounds) // 3)  # a third are resent
    work += [(a, min(2000, a + 90)) for a, _ in rng.sample(bounds, 10)]  # re-batched resends
    rng.shuffle(work)
    # Each run of dropped seqs is declared by the gap event right after it, often in another
    # batch than the run: the watermark passes the run only once that batch is committed.
    absent = set(rng.sample(range(1, 2000), 100))
    batches = [
        batch(a, b, stream=stream, absent=absent)
        for a, b in work
        if not absent.issuperset(range(a, b + 1))
    ]

    queue: asyncio.Queue[Batch] = asyncio.Queue()
    for item in batches:
        queue.put_nowait(item)
    seen: list[int] = []

    async def worker() -> None:
        while not queue.empty():
            acked, _ = await commit(pool, queue.get_nowait())
            seen.append(acked)

    await asyncio.gather(*(worker() for _ in range(8)))
    assert max(seen) == 2000
    assert (
        await pool.fetchval(
            "SELECT acked_seq FROM edge_streams WHERE stream_id = $1", uuid.UUID(stream)
        )
        == 2000
    )
    assert await pending_ranges(pool, stream) == []
    stored = await pool.fetchval(
        "SELECT count(*) FROM edge_events WHERE stream_id = $1", uuid.UUID(stream)
    )
    assert stored == 2000 - len(absent)


async def test_a_refused_batch_leaves_no_trace(pool: asyncpg.Pool) -> None:
    stream = str(uuid.uuid4())
    doc = batch_doc(1, 3, stream=stream)
    doc["events"][2]["value"] = "nul \u0000 inside"  # valid JSON, refused by jsonb
    bad = parse_batch(GW, json.dumps(doc).encode())
    with pytest.raises(asyncpg.DataError):
        await commit(pool, bad)
    assert await pool.fetchval("SELECT count(*) FROM edge_events") == 0
    assert await pool.fetchval("SELECT count(*) FROM edge_streams") == 0
    # The session is still usable, its staging table empty.
    assert await commit(pool, batch(1, 3, stream=stream)) == (3, 3)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (asyncpg.ConnectionDoesNotExistError("closed"), True),
        # PostgreSQL killed mid-COPY (seen in bench/soak.py): retry on a fresh connection.
        (asyncpg.InternalClientError("cannot switch to state 15"), True),
        (asyncpg.DataError("bad value"), False),
        (asyncpg.UndefinedTableError("gone"), False),
    ],
)
def test_which_database_errors_are_retried(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient
