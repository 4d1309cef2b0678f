"""Central ingest rate: rows/s committed by one replica (S/sync over MQTT -> PostgreSQL -> S/ack),
beside a raw COPY of the same rows into the same table measured in the same run.

A private PostgreSQL and mosquitto are started. Gateways publish batches of 1,000 events with
a window of unacked batches each (like the forwarder's sync_window); the clock runs from the
first publish to the last S/ack covering everything.

    python bench/ingest.py [--quick] [--batches 300] [--gateways 4] [--window 8] [--pool-size 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from sync.central.batch import COLUMNS, Row, parse_batch
from sync.central.ingest import Ingest
from sync.events import dumps, rfc3339
from sync.mqtt.client import Message, MqttClient
from tests.fixtures import MosquittoBroker, PostgresServer

BATCH = 1000


def make_payloads(gateways: int, batches: int) -> list[list[tuple[str, int, bytes]]]:
    """Per gateway: (gateway, last_seq, S/sync payload) of its batches, in seq order."""
    now = time.time()
    per_gateway: list[list[tuple[str, int, bytes]]] = []
    for g in range(gateways):
        gateway, stream = f"line{g}", str(uuid.uuid4())
        items = []
        for b in range(batches // gateways):
            first = b * BATCH + 1
            events = [
                {
                    "seq": seq,
                    "ts": rfc3339(now + seq * 0.001),
                    "kind": "sample",
                    "device": f"press{seq % 10}",
                    "tag": "temperature",
                    "value": 20.0 + (seq % 100) * 0.25,
                    "quality": "good",
                }
                for seq in range(first, first + BATCH)
            ]
            doc = {
                "gateway": gateway,
                "stream": stream,
                "first_seq": first,
                "last_seq": first + BATCH - 1,
                "events": events,
            }
            items.append((gateway, first + BATCH - 1, dumps(doc)))
        per_gateway.append(items)
    return per_gateway


async def ingest_rate(
    pg: PostgresServer,
    broker: MosquittoBroker,
    per_gateway: list[list[tuple[str, int, bytes]]],
    window: int,
    pool_size: int,
) -> tuple[float, Ingest]:
    """Seconds from the first publish until every batch is acked, and the replica's stats."""
    client = MqttClient(host=broker.host, port=broker.port, client_id="bench-ingest")
    ingest = Ingest(dsn=pg.dsn, mqtt=client, pool_size=pool_size, queue_size=max(256, window * 8))
    running = asyncio.create_task(ingest.run())
    publisher = MqttClient(host=broker.host, port=broker.port, client_id="bench-gateways")
    acked: dict[str, int] = {}
    progress = asyncio.Event()

    def on_ack(message: Message) -> None:
        gateway = message.topic.split("/")[-2]
        acked[gateway] = max(acked.get(gateway, 0), json.loads(message.payload)["acked_seq"])
        progress.set()

    publisher.subscribe("edge/+/ack", on_ack, qos=1)
    try:
        async with asyncio.timeout(60):
            await ingest.wait_ready()
            await client.wait_connected()
        async with publisher:
            await publisher.wait_connected()
            # Warm-up: one small batch proves the subscription and the sessions are ready. It
            # carries its one event: the ingest acks no seq it has not stored (docs/central.md).
            warm = {"gateway": "warmup", "stream": str(uuid.uuid4()), "first_seq": 1}
            event = {"seq": 1, "ts": rfc3339(time.time()), "kind": "agent", "value": None}
            warm |= {"last_seq": 1, "events": [event]}
            while "warmup" not in acked:
                publisher.publish("edge/warmup/sync", dumps(warm), qos=1)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await progress.wait()
                progress.clear()

            sent = [0] * len(per_gateway)
            started = time.perf_counter()
            while True:
                done = True
                for g, items in enumerate(per_gateway):
                    gateway = items[0][0]
                    confirmed = acked.get(gateway, 0)
                    done = done and confirmed >= items[-1][1]
                    # Keep `window` batches unacked per gateway, like the forwarder.
                    while sent[g] < len(items) and sent[g] - confirmed // BATCH < window:
                        publisher.publish(f"edge/{gateway}/sync", items[sent[g]][2], qos=1)
                        sent[g] += 1
                if done:
                    break
                progress.clear()
                async with asyncio.timeout(60):
                    await progress.wait()
            return time.perf_counter() - started, ingest
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def raw_copy_rate(dsn: str, rows: list[list[Row]], connections: int) -> float:
    """Seconds to COPY the rows straight into edge_events, one 1,000-row transaction per batch."""
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    try:
        await conns[0].execute("TRUNCATE edge_events, edge_streams, edge_stream_ranges")
        queue: asyncio.Queue[list[Row]] = asyncio.Queue()
        for batch in rows:
            queue.put_nowait(batch)

        async def copier(conn: Any) -> None:
            while not queue.empty():
                batch = queue.get_nowait()
                async with conn.transaction():
                    await conn.copy_records_to_table("edge_events", records=batch, columns=COLUMNS)

        started = time.perf_counter()
        await asyncio.gather(*(copier(conn) for conn in conns))
        return time.perf_counter() - started
    finally:
        for conn in conns:
            await conn.close()


async def run(args: argparse.Namespace, pg: PostgresServer, broker: MosquittoBroker) -> None:
    """Measure and print."""
    batches = 24 if args.quick else args.batches
    per_gateway = make_payloads(args.gateways, batches)
    total = sum(len(items) for items in per_gateway) * BATCH
    rows = [
        parse_batch(gateway, payload).rows for items in per_gateway for gateway, _, payload in items
    ]
    elapsed, ingest = await ingest_rate(pg, broker, per_gateway, args.window, args.pool_size)
    raw_one = await raw_copy_rate(pg.dsn, rows, 1)
    raw_pool = await raw_copy_rate(pg.dsn, rows, args.pool_size)
    rate = total / elapsed
    print(f"ingest, 1 replica, pool_size {args.pool_size}: {rate:12,.0f} rows/s committed+acked")
    print(
        f"  {total:,} rows in {total // BATCH} batches of {BATCH:,} from {args.gateways} gateways "
        f"(window {args.window}), {elapsed:.2f} s, "
        f"{ingest.stats.rows_duplicate:,} duplicate rows absorbed"
    )
    print(f"raw COPY into edge_events, 1 connection:  {total / raw_one:12,.0f} rows/s")
    print(
        f"raw COPY into edge_events, {args.pool_size} connections: {total / raw_pool:12,.0f} rows/s"
    )
    print(f"ratio ingest / raw COPY (1 connection):  {raw_one / elapsed:.2f}")
    print(f"ratio ingest / raw COPY ({args.pool_size} connections): {raw_pool / elapsed:.2f}")


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    parser.add_argument("--batches", type=int, default=300, help="batches of 1,000 events")
    parser.add_argument("--gateways", type=int, default=4, help="publishing gateways")
    parser.add_argument("--window", type=int, default=8, help="unacked batches per gateway")
    parser.add_argument("--pool-size", type=int, default=4, help="the replica's pool_size")
    args = parser.parse_args()
    with PostgresServer() as pg, MosquittoBroker() as broker:
        uvloop.run(run(args, pg, broker))


if __name__ == "__main__":
    main()
