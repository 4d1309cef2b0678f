"""Central ingest end to end: a fake gateway, a real mosquitto, a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from sync.central.batch import EventTimeWindow
from sync.central.ingest import Ingest
from sync.central.partitions import month_index, partition_name
from sync.events import dumps, rfc3339
from sync.mqtt.client import Message, MqttClient
from tests.fixtures import MosquittoBroker, PostgresServer, async_wait_until
from tests.fixtures.ingest import (
    Ack,
    FakeGateway,
    batch_doc,
    probe,
    running_ingest,
    stored_rows,
    watermarks,
)

pytestmark = pytest.mark.slow

# -- tests --------------------------------------------------------------------------------------


async def test_batches_land_in_month_partitions_and_default_rows_are_adopted(
    postgres_database: str, mosquitto: MosquittoBroker
) -> None:
    current = month_index(datetime.now(UTC))
    # An old buffer replayed: 5 months back has no partition until maintenance makes one.
    old_year, old_month0 = divmod(current - 5, 12)
    old = datetime(old_year, old_month0 + 1, 28, 23, 59, tzinfo=UTC).timestamp()
    next_year, next_month0 = divmod(current + 1, 12)
    boundary = datetime(next_year, next_month0 + 1, 1, tzinfo=UTC).timestamp()

    stream = str(uuid.uuid4())
    times = {
        1: boundary - 0.002,  # last milliseconds of the current month
        2: boundary - 0.001,
        3: boundary,  # first instant of the next month
        4: boundary + 0.001,
        5: old,
        6: old + 0.5,
    }
    doc = batch_doc("gw1", stream, 1, 6, ts=lambda seq: rfc3339(times[seq]))
    # Next month's events are weeks ahead: accepted with a wider window.
    weeks_ahead = EventTimeWindow(max_future=timedelta(days=62))
    # A debounce longer than the test: rows stay in the default until we ask.
    async with (
        running_ingest(
            postgres_database, mosquitto, maintenance_debounce=None, event_window=weeks_ahead
        ) as ingest,
        FakeGateway(mosquitto) as gateway,
    ):
        await gateway.deliver([doc])
        assert gateway.watermark[("gw1", stream)] == 6
        conn = await asyncpg.connect(postgres_database)
        try:
            placed = await conn.fetch(
                "SELECT seq, tableoid::regclass::text AS part FROM edge_events "
                "WHERE stream_id = $1 ORDER BY seq",
                uuid.UUID(stream),
            )
            assert [row["part"] for row in placed] == [
                partition_name(current),
                partition_name(current),
                partition_name(current + 1),
                partition_name(current + 1),
                "edge_events_default",
                "edge_events_default",
            ]
        finally:
            await conn.close()
        assert ingest.stats.maintenance_runs == 1

    # The next replica start maintains at once; with the debounce on it also reacts to new
    # rows in a kept month without partition (3 months back) within a second.
    stream2 = str(uuid.uuid4())
    y3, m3 = divmod(current - 3, 12)
    three_back = datetime(y3, m3 + 1, 2, tzinfo=UTC).timestamp()
    async with (
        running_ingest(postgres_database, mosquitto, maintenance_debounce=0.2) as ingest,
        FakeGateway(mosquitto) as gateway,
    ):
        await gateway.deliver([batch_doc("gw1", stream2, 1, 2, ts=lambda s: rfc3339(three_back))])
        conn = await asyncpg.connect(postgres_database)
        try:

            async def adopted() -> bool:
                return not await conn.fetchval("SELECT count(*) FROM edge_events_default")

            await async_wait_until(adopted, timeout=10, message="default partition emptied")
            parts = await conn.fetch(
                "SELECT DISTINCT tableoid::regclass::text AS p FROM edge_events ORDER BY 1"
            )
            assert [row["p"] for row in parts] == sorted(
                {
                    partition_name(current - 5),
                    partition_name(current - 3),
                    partition_name(current),
                    partition_name(current + 1),
                }
            )
            assert await conn.fetchval("SELECT count(*) FROM edge_events") == 8
        finally:
            await conn.close()
        assert ingest.stats.maintenance_runs >= 2


async def test_watermark_over_mqtt_with_out_of_order_dropped_and_duplicate_batches(
    postgres_database: str, mosquitto: MosquittoBroker
) -> None:
    stream = str(uuid.uuid4())
    async with (
        running_ingest(postgres_database, mosquitto) as ingest,
        FakeGateway(mosquitto) as gateway,
    ):
        await probe(gateway, ingest)
        inserted, duplicates = ingest.stats.rows_inserted, ingest.stats.rows_duplicate

        def mine() -> list[int]:
            # Only this stream's acks: a late ack of a resent probe may arrive meanwhile.
            return [a.acked_seq for a in gateway.acks if a.stream == stream]

        async def acks(n: int) -> None:
            await async_wait_until(lambda: len(mine()) >= n, message=f"{n} acks")

        # 4 and 5 were dropped at the gateway, 6 is the gap event declaring them.
        gateway.publish(batch_doc("gw1", stream, 11, 20, absent=[4, 5]))  # early
        await acks(1)
        assert mine() == [0]
        gateway.publish(batch_doc("gw1", stream, 1, 10, absent=[4, 5]))
        await acks(2)
        assert mine() == [0, 20]
        gateway.publish(batch_doc("gw1", stream, 1, 10, absent=[4, 5]))  # a resend
        await acks(3)
        assert mine() == [0, 20, 20]  # acked again: the forwarder learns it was absorbed
        assert all(a.gateway == "gw1" for a in gateway.acks if a.stream == stream)
        assert ingest.stats.rows_inserted - inserted == 18
        # 8 rows of the resend (plus any late duplicate of a probe).
        assert ingest.stats.rows_duplicate - duplicates >= 8

    assert [row[2] for row in await stored_rows(postgres_database)] == [
        s for s in range(1, 21) if s not in (4, 5)
    ]
    assert await watermarks(postgres_database) == {("gw1", stream): 20}


async def test_malformed_messages_are_counted_logged_once_per_sender_and_skipped(
    postgres_database: str, mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.ingest")
    good = str(uuid.uuid4())
    async with (
        running_ingest(postgres_database, mosquitto) as ingest,
        FakeGateway(mosquitto) as gateway,
    ):
        await probe(gateway, ingest)
        bad = batch_doc("bad1", str(uuid.uuid4()), 1, 2)
        gateway.publish_raw("bad1", b"{not json")
        gateway.publish(batch_doc("good", good, 1, 5))
        gateway.publish_raw("bad1", dumps({**bad, "gateway": "someone-else"}))
        gateway.publish(batch_doc("bad2", str(uuid.uuid4()), 0, 2))  # first_seq 0
        gateway.publish(batch_doc("good", good, 6, 10))
        gateway.publish_raw("bad1", dumps({**bad, "events": [{**bad["events"][0], "kind": "x"}]}))
        gateway.publish_raw("bad2", b"")
        # Valid JSON, refused by PostgreSQL (jsonb has no \u0000): malformed too.
        nul = batch_doc("bad2", str(uuid.uuid4()), 1, 1)
        nul["events"][0]["value"] = "\u0000"
        gateway.publish(nul)
        gateway.publish(batch_doc("good", good, 11, 15))

        await async_wait_until(lambda: ingest.stats.malformed == 6, message="6 malformed")
        await gateway.deliver([batch_doc("good", good, 11, 15)])
        assert ingest.stats.malformed_by_sender == {"bad1": 3, "bad2": 3}

    assert await watermarks(postgres_database) == {("good", good): 15}
    assert len(await stored_rows(postgres_database)) == 15
    assert not any(ack.gateway.startswith("bad") for ack in gateway.acks)
    logged = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert sorted(r.getMessage().split("'")[1] for r in logged) == ["bad1", "bad2"]


async def test_every_ack_is_backed_by_committed_rows(
    postgres_database: str, mosquitto: MosquittoBroker
) -> None:
    stream = str(uuid.uuid4())
    docs = [batch_doc("gw1", stream, s, s + 49) for s in range(1, 1001, 50)]
    conn = await asyncpg.connect(postgres_database)
    checks: list[asyncio.Task[tuple[int, int]]] = []

    async def stored_up_to(acked: int) -> tuple[int, int]:
        # Read after the ack arrived: the commit must already be visible.
        count = await conn.fetchval(
            "SELECT count(*) FROM edge_events WHERE stream_id = $1 AND seq <= $2",
            uuid.UUID(stream),
            acked,
        )
        return acked, count

    try:
        async with (
            running_ingest(postgres_database, mosquitto, pool_size=3) as ingest,
            FakeGateway(mosquitto) as gateway,
        ):
            await probe(gateway, ingest)
            lock = asyncio.Lock()

            async def serialised(acked: int) -> tuple[int, int]:
                async with lock:  # one asyncpg connection: one query at a time
                    return await stored_up_to(acked)

            def on_ack(ack: Ack) -> None:
                if ack.stream == stream:
                    checks.append(asyncio.create_task(serialised(ack.acked_seq)))

            gateway.listeners.append(on_ack)
            random.Random(3).shuffle(docs)
            await gateway.deliver(docs)
            results = await asyncio.gather(*checks)
    finally:
        await conn.close()
    assert results, "no acks seen"
    assert all(count == acked for acked, count in results), results
    assert max(acked for acked, _ in results) == 1000


async def run_workload(
    dsn: str, broker: MosquittoBroker, docs: list[dict[str, Any]], replicas: int
) -> list[Ingest]:
    """Deliver ``docs`` (and random resends) through ``replicas`` ingests on one shared group."""
    async with contextlib.AsyncExitStack() as stack:
        ingests = [
            await stack.enter_async_context(
                running_ingest(dsn, broker, shared_group="ingest", pool_size=2)
            )
            for _ in range(replicas)
        ]
        gateway = await stack.enter_async_context(FakeGateway(broker))
        assert ingests[0].topic == "$share/ingest/edge/+/sync"
        await probe(gateway, *ingests)
        rng = random.Random(11)
        for doc in docs:  # out of order, plus duplicates, up front
            gateway.publish(doc)
            if rng.random() < 0.2:
                gateway.publish(rng.choice(docs))
        await gateway.deliver(docs, timeout=30)
        return ingests


async def test_two_replicas_on_a_shared_subscription_equal_one(
    postgres_session: PostgresServer, mosquitto_factory: Any
) -> None:
    rng = random.Random(5)
    docs: list[dict[str, Any]] = []
    for gw in ("gw-a", "gw-b", "gw-c"):
        for _ in range(2):
            stream = str(uuid.uuid4())
            # Dropped at the gateway, each run declared by the gap event right after it.
            dropped = rng.sample(range(1, 600), k=30)
            seq = 1
            while seq <= 600:
                size = rng.randint(10, 60)
                last = min(600, seq + size - 1)
                if any(s not in dropped for s in range(seq, last + 1)):
                    docs.append(batch_doc(gw, stream, seq, last, absent=dropped))
                seq = last + 1
    rng.shuffle(docs)

    one_db = postgres_session.create_database(f"one_{uuid.uuid4().hex[:8]}")
    two_db = postgres_session.create_database(f"two_{uuid.uuid4().hex[:8]}")
    await run_workload(one_db, mosquitto_factory(), docs, replicas=1)
    pair = await run_workload(two_db, mosquitto_factory(), docs, replicas=2)

    assert all(r.stats.batches_committed > 1 for r in pair)  # both did real work
    one_rows, two_rows = await stored_rows(one_db), await stored_rows(two_db)
    assert len(one_rows) == sum(len(d["events"]) for d in docs)
    assert one_rows == two_rows
    expected = {(d["gateway"], d["stream"]): 600 for d in docs}
    assert await watermarks(one_db) == expected
    assert await watermarks(two_db) == expected
    for dsn in (one_db, two_db):
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM edge_stream_ranges") == 0
        finally:
            await conn.close()


async def test_postgres_killed_mid_stream_loses_nothing_and_acks_resume(
    postgres: PostgresServer, mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.ingest")
    before_kill, during_outage = str(uuid.uuid4()), str(uuid.uuid4())
    docs_a = [batch_doc("gw1", before_kill, s, s + 99) for s in range(1, 3001, 100)]
    docs_b = [batch_doc("gw1", during_outage, s, s + 99) for s in range(1, 1001, 100)]
    async with (
        running_ingest(postgres.dsn, mosquitto, retry_max=0.5) as ingest,
        FakeGateway(mosquitto) as gateway,
    ):
        await probe(gateway, ingest)

        async def stream_a() -> None:
            for doc in docs_a:  # paced, so that the kill lands mid-stream
                gateway.publish(doc)
                await asyncio.sleep(0.03)

        publishing = asyncio.create_task(stream_a())
        await async_wait_until(
            lambda: gateway.watermark.get(("gw1", before_kill), 0) >= 500,
            message="stream A under way",
        )
        await asyncio.to_thread(postgres.kill)
        killed_at = time.monotonic()
        await publishing

        # During the outage: stream B arrives, the ingest notices, nothing of B is acked.
        received = ingest.stats.messages
        for doc in docs_b:
            gateway.publish(doc)
        await async_wait_until(lambda: not ingest.db_up, message="outage noticed")
        await async_wait_until(
            lambda: (
                ingest.stats.messages >= received + len(docs_b) and ingest.stats.db_failures >= 3
            ),
            message="stream B received and retried during the outage",
        )
        assert not any(a.stream == during_outage for a in gateway.acks)
        assert ingest.stats.overflow_dropped == 0
        acked_before_restart = gateway.watermark.get(("gw1", before_kill), 0)
        restart_at = time.monotonic()
        await postgres.arestart()
        # Every ack sent before the crash is durable: the recovered watermark is not lower.
        conn = await asyncpg.connect(postgres.dsn)
        try:
            recovered = await conn.fetchval(
                "SELECT acked_seq FROM edge_streams WHERE stream_id = $1",
                uuid.UUID(before_kill),
            )
        finally:
            await conn.close()
        assert recovered >= acked_before_restart >= 500

        # Resends after the ack timeout, like the forwarder: everything is acked in the end.
        await gateway.deliver(docs_a + docs_b, resend_after=1.0, timeout=30)
        assert ingest.db_up

    assert not any(a.stream == during_outage and a.at < restart_at for a in gateway.acks), (
        "acked during the outage"
    )
    # Acks seen between the kill and the restart can only be for commits made before the kill.
    outage_acks = [a for a in gateway.acks if killed_at <= a.at < restart_at]
    assert all(a.stream == before_kill for a in outage_acks)
    assert ingest.stats.batches_committed >= len(docs_a) + len(docs_b)

    rows = await stored_rows(postgres.dsn)
    keys = [(r[1], r[2]) for r in rows]
    assert len(keys) == len(set(keys)) == 3000 + 1000  # no loss, no duplicate row
    assert await watermarks(postgres.dsn) == {
        ("gw1", before_kill): 3000,
        ("gw1", during_outage): 1000,
    }
    assert max(a.acked_seq for a in gateway.acks if a.stream == before_kill) == 3000
    # Logged once per outage, not once per failed attempt.
    messages = [r.getMessage() for r in caplog.records if r.name == "edge_agent.ingest"]
    assert sum("PostgreSQL unavailable" in m for m in messages) == 1
    assert sum("PostgreSQL available again" in m for m in messages) == 1


async def test_ingest_started_while_postgres_is_down_waits_for_it(
    postgres: PostgresServer, mosquitto: MosquittoBroker
) -> None:
    await asyncio.to_thread(postgres.kill)
    client = MqttClient(host=mosquitto.host, port=mosquitto.port, client_id="ingest-late-db")
    ingest = Ingest(dsn=postgres.dsn, mqtt=client, retry_max=0.3)
    task = asyncio.create_task(ingest.run())
    try:
        await async_wait_until(lambda: ingest.stats.db_failures >= 3, message="retries")
        assert not task.done()
        assert not ingest.db_up
        await postgres.arestart()
        async with asyncio.timeout(20):
            await ingest.wait_ready()
        async with FakeGateway(mosquitto) as gateway:
            await probe(gateway, ingest)
        assert ingest.db_up
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_configuration_error_stops_the_ingest(
    postgres_session: PostgresServer, mosquitto: MosquittoBroker
) -> None:
    client = MqttClient(host=mosquitto.host, port=mosquitto.port, client_id="ingest-bad-db")
    ingest = Ingest(dsn=postgres_session.dsn_for("no_such_database"), mqtt=client)
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        async with asyncio.timeout(20):
            await ingest.run()


async def test_each_replica_announces_itself_online_and_offline_retained(
    postgres_database: str, mosquitto: MosquittoBroker
) -> None:
    # Gateways resend their window when a replica comes (back) online (sync/forwarder.py).
    seen: list[Message] = []
    watcher = MqttClient(host=mosquitto.host, port=mosquitto.port, client_id="presence-watch")
    watcher.subscribe("edge/_central/status/+", seen.append, qos=1)

    def last_status(topic: str) -> str | None:
        mine = [m for m in seen if m.topic == topic]
        return json.loads(mine[-1].payload)["status"] if mine else None

    async with watcher:
        async with running_ingest(postgres_database, mosquitto) as ingest:
            topic = ingest.presence_topic
            assert topic.startswith("edge/_central/status/ingest-")
            await async_wait_until(lambda: last_status(topic) == "online", message="online")
            online = next(m for m in seen if m.topic == topic)
            assert set(json.loads(online.payload)) == {"ts", "status"}
        await async_wait_until(lambda: last_status(topic) == "offline", message="offline")
    # Retained: whoever subscribes later learns the replica's last state.
    late: list[Message] = []
    async with MqttClient(host=mosquitto.host, port=mosquitto.port, client_id="late") as client:
        client.subscribe(topic, late.append, qos=1)
        await async_wait_until(lambda: bool(late), message="retained presence")
    assert late[0].retain
    assert json.loads(late[0].payload)["status"] == "offline"
