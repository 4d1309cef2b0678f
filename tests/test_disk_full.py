"""A full disk under the running agent (issue #25): the power-cut harness answers ENOSPC; the
agent keeps publishing live values, reports the outbox refusing events in /readyz, /status and
/metrics, and once space returns resumes without a restart, with the refused events declared
by one `append_failed` gap event; nothing accepted before is lost."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from simulators.modbus.server import ModbusSimulator
from tests.fixtures import MosquittoBroker, PostgresServer
from tests.fixtures.collector import TopicCollector
from tests.fixtures.ports import async_wait_until
from tests.fixtures.powercut import fuse_available
from tests.fixtures.powercut_line import ROOT, PowerCutLine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not fuse_available(), reason="no usable /dev/fuse and fuse3"),
]

LIVE = f"{ROOT}/press1/total_count"


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


async def test_disk_full_keeps_live_values_and_loses_nothing_accepted(
    mosquitto: MosquittoBroker, postgres: PostgresServer, tmp_path: Path
) -> None:
    dsn = postgres.create_database("plant")
    async with ModbusSimulator(port=0, seed=11, speed=4.0, bulk_change_fraction=0.34) as sim:
        line = PowerCutLine(tmp_path, mosquitto, dsn, sim.port)
        try:
            await line.start()
            port = line.http_port
            with TopicCollector(mosquitto, LIVE) as live:
                await asyncio.to_thread(line.disk.full, True)

                async def refusing() -> bool:
                    status, body = await asyncio.to_thread(get, port, "/readyz")
                    return status == 503 and "the outbox refuses events" in body

                await async_wait_until(refusing, timeout=20, message="/readyz: outbox refuses")
                _, metrics = await asyncio.to_thread(get, port, "/metrics")
                assert "edge_agent_outbox_refusing 1.0" in metrics
                _, status_text = await asyncio.to_thread(get, port, "/status")
                status: dict[str, Any] = json.loads(status_text)
                assert "disk is full" in (status["outbox_refusing"] or "")
                committed = status["committed_seq"]
                # Live values keep coming while nothing can be committed.
                seen = len(live.on_topic(LIVE))

                async def live_values_flow() -> bool:
                    return len(live.on_topic(LIVE)) >= seen + 3

                await async_wait_until(live_values_flow, timeout=20, message="live values")
                _, status_text = await asyncio.to_thread(get, port, "/status")
                assert json.loads(status_text)["committed_seq"] == committed
                await asyncio.to_thread(line.disk.full, False)

                async def accepting() -> bool:
                    code, _ = await asyncio.to_thread(get, port, "/readyz")
                    return code == 200

                await async_wait_until(accepting, timeout=30, message="/readyz 200 again")
                _, metrics = await asyncio.to_thread(get, port, "/metrics")
                assert "edge_agent_outbox_refusing 0.0" in metrics
            totals = await line.finish(sim.close)
        finally:
            line.close()
    assert totals.lost == 0, totals
    assert totals.duplicated == 0, totals
    refused = [gap for gap in totals.gaps if gap["reason"] == "append_failed"]
    assert len(refused) == 1, totals.gaps
    assert refused[0]["total_count"] > 0, refused
