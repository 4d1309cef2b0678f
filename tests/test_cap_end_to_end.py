"""The gateway's size cap and the central store agree: after the outbox dropped samples while
no ingest listened, the real forwarder and the real ingest get every seq either stored or
declared dropped, with no batch refused (the coverage rule, docs/topics.md and central.md)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import asyncpg

from sync.events import Event
from sync.mqtt.client import MqttClient
from sync.outbox.store import Outbox
from sync.uplink.forwarder import Forwarder
from tests.fixtures.ingest import running_ingest
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import async_wait_until

GATEWAY = "gw-cap"


def samples(start: int, count: int) -> list[Event]:
    now = time.time()
    return [
        Event(now, "sample", "press1", f"t{(start + i) % 20}", f"{start + i:0120d}", "good")
        for i in range(count)
    ]


async def test_dropped_seqs_are_declared_and_passed_and_nothing_is_refused(
    tmp_path: Path, mosquitto: MosquittoBroker, postgres_database: str
) -> None:
    async with Outbox(tmp_path / "outbox.db", max_size=256 * 1024, commit_interval=0.005) as box:
        async with MqttClient(
            host=mosquitto.host,
            port=mosquitto.port,
            client_id=f"edge-agent-{GATEWAY}-{uuid.uuid4().hex[:6]}",
            reconnect_min=0.05,
            reconnect_max=0.3,
        ) as client:
            forwarder = Forwarder(
                outbox=box,
                client=client,
                gateway_id=GATEWAY,
                sync_prefix="edge",
                batch_events=200,
                ack_timeout=1.0,
            )
            task = asyncio.create_task(forwarder.run(), name="forwarder")
            try:
                # Nobody listens yet: batches go nowhere and the cap drops the oldest samples,
                # interleaved with the state events it keeps.
                k = 0
                while box.dropped_total < 500:
                    await box.append(
                        [*samples(k, 40), Event(time.time(), "state", "press1", "state", k)]
                    )
                    k += 40
                async with running_ingest(postgres_database, mosquitto) as ingest:
                    await async_wait_until(
                        lambda: box.acked_seq == box.committed_seq,
                        timeout=60,
                        message="everything acknowledged",
                    )
                    assert ingest.stats.malformed == 0
                    assert ingest.stats.uncovered == 0
            finally:
                task.cancel()
                await asyncio.wait([task])
        committed = box.committed_seq
        assert box.dropped_total >= 500
    conn = await asyncpg.connect(postgres_database)
    try:
        stored = {r["seq"] for r in await conn.fetch("SELECT seq FROM edge_events")}
        declared: set[int] = set()
        for gap in await conn.fetch("SELECT first_seq, last_seq FROM edge_gaps"):
            declared.update(range(gap["first_seq"], gap["last_seq"] + 1))
        acked = await conn.fetchval("SELECT acked_seq FROM edge_streams")
    finally:
        await conn.close()
    assert stored | declared == set(range(1, committed + 1))
    assert acked == committed
