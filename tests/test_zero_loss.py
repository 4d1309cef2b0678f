"""The whole durable path under fire: simulator -> agent -> mosquitto -> ingest -> PostgreSQL,
with kill -9 of the broker, the agent, the ingest and PostgreSQL while thousands of events per
second flow. Afterwards every seq of every stream is in PostgreSQL exactly once (or inside a
range a gap event declares), and the agent reports acked_seq == committed_seq."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from simulators.modbus.server import ModbusSimulator
from tests.fixtures import ChildProcess, MosquittoBroker, PostgresServer
from tests.fixtures.collector import TopicCollector
from tests.fixtures.ingest import central_config
from tests.fixtures.ports import async_wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ROOT = "plant1/assembly/line3"
GATEWAY = "plant1-line3"
BULK_TAGS = 1500


def agent_config(broker: MosquittoBroker, sim_port: int, data_dir: Path) -> str:
    tags = "".join(
        f'  [[devices.tags]]\n  name = "b{i}"\n  address = "hr:{1000 + i}"\n'
        for i in range(BULK_TAGS)
    )
    return f"""
[gateway]
id = "{GATEWAY}"
site = "plant1"
area = "assembly"
line = "line3"
data_dir = "{data_dir}"

[mqtt]
url = "{broker.url}"
ack_timeout = "2s"
health_interval = "500ms"
sync_batch_events = 500

[buffer]
max_size = "256MiB"

[http]
enabled = false

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:{sim_port}"
poll_interval = "250ms"
timeout = "1s"
breaker_reset = "1s"
{tags}"""


@pytest.mark.parametrize("scenario", ["kill-everything", "sigterm-under-load"])
async def test_faults_lose_nothing(
    mosquitto: MosquittoBroker,
    postgres: PostgresServer,
    tmp_path: Path,
    scenario: str,
    request: pytest.FixtureRequest,
) -> None:
    dsn = await asyncio.to_thread(postgres.create_database, "plant")
    # speed 4: every poll sees a new simulated second; a third of the bulk tags change.
    async with ModbusSimulator(port=0, seed=11, speed=4.0, bulk_change_fraction=0.34) as sim:
        (tmp_path / "agent.toml").write_text(agent_config(mosquitto, sim.port, tmp_path / "data"))
        (tmp_path / "central.toml").write_text(central_config(mosquitto, dsn))
        python = [sys.executable, "-m", "agent.cli"]
        agent = ChildProcess(
            "agent", [*python, "run", "-c", str(tmp_path / "agent.toml")], tmp_path / "agent.log"
        )
        ingest = ChildProcess(
            "ingest",
            [*python, "ingest", "-c", str(tmp_path / "central.toml")],
            tmp_path / "ingest.log",
        )
        request.addfinalizer(agent.ensure_dead)
        request.addfinalizer(ingest.ensure_dead)
        ingest.start()
        agent.start()
        health: list[dict[str, Any]] = []
        with TopicCollector(mosquitto, f"{ROOT}/_agent/health") as seen:

            def latest_health() -> dict[str, Any] | None:
                messages = seen.on_topic(f"{ROOT}/_agent/health")
                return json.loads(messages[-1].payload) if messages else None

            async def flowing(minimum: int) -> None:
                async def check() -> bool:
                    current = latest_health()
                    return current is not None and current["acked_seq"] >= minimum

                await async_wait_until(check, timeout=60, message=f"acked_seq >= {minimum}")

            await flowing(2000)

            def graceful_stop() -> None:
                # SIGTERM while events flow: drains, exits 0, loses nothing committed.
                assert agent.stop() == 0

            faults: list[tuple[str, Callable[[], None], Callable[[], None]]] = (
                [
                    ("broker", mosquitto.kill, mosquitto.restart),
                    ("agent", agent.kill, agent.start),
                    ("ingest", ingest.kill, ingest.start),
                    ("postgres", postgres.kill, postgres.restart),
                ]
                if scenario == "kill-everything"
                else [("agent-sigterm", graceful_stop, agent.start)]
            )
            kills = dict.fromkeys((name for name, _, _ in faults), 0)
            for _round in range(2 if scenario == "kill-everything" else 3):
                for name, kill, restart in faults:
                    kills[name] += 1
                    before = latest_health() or {"acked_seq": 0}
                    await asyncio.to_thread(kill)
                    await asyncio.sleep(1.5)  # the outage lasts while events keep coming
                    await asyncio.to_thread(restart)
                    if name == "broker":
                        await asyncio.to_thread(seen.reconnect)
                    await flowing(before["acked_seq"] + 500)
            # Stop producing: the device goes away; then everything must drain.
            await sim.close()

            async def drained() -> bool:
                current = latest_health()
                return (
                    current is not None
                    and current["devices"].get("press1") != "up"
                    and current["committed_seq"] == current["acked_seq"]
                    and current["outbox_events"] == 0
                )

            await async_wait_until(drained, timeout=90, message="acked_seq == committed_seq")
            final = latest_health()
            assert final is not None
            health.append(final)
        assert agent.stop() == 0  # its shutdown commits a last `agent` event and drains it
        assert ingest.stop() == 0

    # The agent has exited: its outbox says what it committed and what the center acked.
    with sqlite3.connect(tmp_path / "data" / "outbox.db") as db:
        committed, outbox_acked, stream = db.execute(
            "SELECT last_seq, acked_seq, stream FROM meta"
        ).fetchone()
    assert stream == health[-1]["stream"]
    assert committed == health[-1]["committed_seq"] + 1
    assert outbox_acked == committed
    assert committed > (10_000 if scenario == "kill-everything" else 5_000), (
        "a few thousand events per second for the whole test"
    )
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT stream_id::text AS stream, seq FROM edge_events WHERE gateway_id = $1", GATEWAY
        )
        gaps = await connection.fetch(
            "SELECT first_seq, last_seq FROM edge_gaps WHERE gateway_id = $1", GATEWAY
        )
        acked = await connection.fetchval(
            "SELECT acked_seq FROM edge_streams WHERE gateway_id = $1 AND stream_id = $2::uuid",
            GATEWAY,
            stream,
        )
    finally:
        await connection.close()
    assert {row["stream"] for row in rows} == {stream}
    seqs = [row["seq"] for row in rows]
    assert len(seqs) == len(set(seqs)), "duplicate rows"
    declared = {seq for gap in gaps for seq in range(gap["first_seq"], gap["last_seq"] + 1)}
    missing = set(range(1, committed + 1)) - set(seqs) - declared
    assert not missing, f"{len(missing)} seqs lost, e.g. {sorted(missing)[:10]}"
    assert max(seqs) == committed
    assert acked == committed
    if scenario == "kill-everything":
        assert kills == {"broker": 2, "agent": 2, "ingest": 2, "postgres": 2}
    else:
        assert kills == {"agent-sigterm": 3}
