"""Benchmark: drain a backlog of N events (default 1,000,000) end to end,
agent -> mosquitto -> ingest -> PostgreSQL, and a raw COPY of the same rows for comparison.

The backlog is written into the agent's outbox first (as if the uplink had been down), then
`edge-agent run` (no devices) and `edge-agent ingest` start; the clock runs until the agent
reports acked_seq == committed_seq on R/_agent/health. Figures only, no asserts.

    .venv/bin/python bench/drain.py             # 1,000,000 events
    .venv/bin/python bench/drain.py --quick     # 20,000 events
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402

from sync.events import Event  # noqa: E402
from sync.outbox.store import Outbox  # noqa: E402
from tests.fixtures import MosquittoBroker, PostgresServer  # noqa: E402
from tests.fixtures.collector import TopicCollector  # noqa: E402

GATEWAY = "bench-gw"
ROOT = "bench/drain/line"


async def fill(path: Path, count: int) -> tuple[str, int]:
    """Write `count` sample events into a fresh outbox; (stream, committed_seq)."""
    rng = random.Random(1)
    start = time.time() - 3600
    async with Outbox(path, max_size=4 << 30, commit_max_events=5000) as outbox:
        done = 0
        while done < count:
            n = min(5000, count - done)
            events = [
                Event(
                    start + (done + i) * 0.001,
                    "sample",
                    f"plc{(done + i) % 5}",
                    f"tag{(done + i) % 1000}",
                    round(rng.uniform(0, 100), 3),
                    "good",
                )
                for i in range(n)
            ]
            await outbox.append(events)
            done += n
        return outbox.stream, outbox.committed_seq


async def raw_copy(dsn: str, count: int) -> float:
    """rows/s of a raw COPY of `count` equivalent rows into a fresh edge_events-like table."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(
            "CREATE TABLE raw_copy (gateway_id text, stream_id uuid, seq bigint, ts timestamptz,"
            " kind text, device text, tag text, value jsonb, quality text,"
            " received_at timestamptz DEFAULT now(), PRIMARY KEY (gateway_id, stream_id, seq, ts))"
        )
        stream = uuid.uuid4()
        start = time.time() - 3600
        rows = [
            (
                GATEWAY,
                stream,
                seq,
                datetime.fromtimestamp(start + seq * 0.001, tz=UTC),
                "sample",
                f"plc{seq % 5}",
                f"tag{seq % 1000}",
                json.dumps(round(seq * 0.37 % 100, 3)),
                "good",
            )
            for seq in range(1, count + 1)
        ]
        columns = [
            "gateway_id",
            "stream_id",
            "seq",
            "ts",
            "kind",
            "device",
            "tag",
            "value",
            "quality",
        ]
        began = time.perf_counter()
        for offset in range(0, count, 10_000):
            await connection.copy_records_to_table(
                "raw_copy", records=rows[offset : offset + 10_000], columns=columns
            )
        return count / (time.perf_counter() - began)
    finally:
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="20,000 events (smoke test)")
    args = parser.parse_args()
    count = 20_000 if args.quick else args.events

    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-drain-"))
    broker = MosquittoBroker()
    postgres = PostgresServer()
    await asyncio.to_thread(broker.start)
    await asyncio.to_thread(postgres.start)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        dsn = await asyncio.to_thread(postgres.create_database, "plant")
        fill_started = time.perf_counter()
        stream, committed = await fill(workdir / "data" / "outbox.db", count)
        fill_seconds = time.perf_counter() - fill_started
        (workdir / "agent.toml").write_text(
            f'[gateway]\nid = "{GATEWAY}"\nsite = "bench"\narea = "drain"\nline = "line"\n'
            f'data_dir = "{workdir / "data"}"\n[mqtt]\nurl = "{broker.url}"\n'
            f'health_interval = "200ms"\n[buffer]\nmax_size = "4GiB"\n[http]\nenabled = false\n'
        )
        (workdir / "central.toml").write_text(
            f'[mqtt]\nurl = "{broker.url}"\n[postgres]\ndsn = "{dsn}"\n'
        )
        python = [sys.executable, "-m", "agent.cli", "--log-level", "warning"]
        with TopicCollector(broker, f"{ROOT}/_agent/health") as seen:
            processes.append(
                subprocess.Popen([*python, "ingest", "-c", str(workdir / "central.toml")], cwd=REPO)  # noqa: ASYNC220
            )
            await asyncio.sleep(2.0)  # the ingest creates its schema before the flood
            began = time.perf_counter()
            processes.append(
                subprocess.Popen([*python, "run", "-c", str(workdir / "agent.toml")], cwd=REPO)  # noqa: ASYNC220
            )
            while True:
                messages = seen.on_topic(f"{ROOT}/_agent/health")
                if messages:
                    health = json.loads(messages[-1].payload)
                    if health["acked_seq"] >= committed + 1:  # + the agent's start event
                        break
                await asyncio.sleep(0.05)
            drain_seconds = time.perf_counter() - began
        connection = await asyncpg.connect(dsn)
        try:
            stored = await connection.fetchval(
                "SELECT count(*) FROM edge_events WHERE gateway_id = $1 AND kind = 'sample'",
                GATEWAY,
            )
        finally:
            await connection.close()
        copy_rate = await raw_copy(dsn, count)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        await asyncio.to_thread(broker.close)
        await asyncio.to_thread(postgres.close)
        shutil.rmtree(workdir, ignore_errors=True)
    rate = count / drain_seconds
    print(f"edge-agent backlog drain benchmark ({count:,} events, stream {stream[:8]})")
    print(f"  backlog written to the outbox   {fill_seconds:.1f} s (not counted)")
    print(
        f"  drain agent->mosquitto->ingest->PostgreSQL  {drain_seconds:.1f} s"
        f" = {rate:,.0f} events/s"
    )
    print(f"  rows stored                      {stored:,}")
    print(f"  raw COPY of the same rows        {copy_rate:,.0f} rows/s (same run)")
    print(f"  ratio end-to-end / raw COPY      {rate / copy_rate:.2f}")


if __name__ == "__main__":
    uvloop.run(main())
