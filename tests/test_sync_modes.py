"""The daemon without a central store (issue #21, item 3): live-only mode publishes live values
and keeps no samples; with sync on and no ingest, `status`, /status and /readyz say that no
central store acknowledges and why, instead of blaming the broker. docs/delivery.md."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from simulators.modbus.server import ModbusSimulator
from tests.fixtures.collector import TopicCollector
from tests.fixtures.daemon import ROOT, config_text, running, settings_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import async_wait_until
from tests.test_health_http import get, status_command


def with_mqtt_keys(text: str, broker: MosquittoBroker, keys: str) -> str:
    old = f'url = "{broker.url}"'
    assert old in text
    return text.replace(old, f"{old}\n{keys}", 1)


async def test_live_only_publishes_values_and_keeps_no_samples(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        text = config_text(mosquitto, tmp_path / "data", [("press1", sim.port)])
        settings = settings_for(tmp_path, with_mqtt_keys(text, mosquitto, "sync_enabled = false"))
        port = settings.http.port
        with TopicCollector(mosquitto) as seen:
            async with running(settings) as runtime:
                await asyncio.to_thread(seen.wait_for, f"{ROOT}/press1/temperature")
                await async_wait_until(lambda: runtime.pollers["press1"].polls >= 5, timeout=10)
                gateway = runtime.gateway
                assert gateway is not None
                assert [sink.name for sink in gateway.sinks] == ["live-publisher"]
                stored = await gateway.outbox.read_batch(0, 100_000, 1 << 30)
                assert stored.events, "the start event is kept"
                assert {event.kind for event in stored.events} <= {"agent", "oee", "state"}
                code, body = await asyncio.to_thread(get, port, "/status")
                assert json.loads(body)["sync"] == "live-only"
                code, body = await asyncio.to_thread(get, port, "/readyz")
                assert (code, json.loads(body)) == (200, {"ready": True, "problems": []})
                result = await asyncio.to_thread(status_command, tmp_path / "agent.toml")
                assert result.returncode == 0, result.stdout + result.stderr
                assert "sync       live only: no central store" in result.stdout
                assert "status     healthy" in result.stdout
        assert not [message for message in seen.messages if message.topic.startswith("edge/")]


async def test_no_ingest_makes_status_and_readyz_say_so(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.forwarder")
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        text = config_text(mosquitto, tmp_path / "data", [("press1", sim.port)])
        keys = 'ack_timeout = "300ms"\nack_warning_after = "1s"'
        settings = settings_for(tmp_path, with_mqtt_keys(text, mosquitto, keys))
        port = settings.http.port
        async with running(settings) as runtime:

            async def readyz() -> tuple[int, dict[str, object]]:
                code, body = await asyncio.to_thread(get, port, "/readyz")
                return code, json.loads(body)

            await async_wait_until(lambda: bool(runtime.sync_problems()), timeout=20)
            code, body = await readyz()
            assert code == 503
            (problem,) = body["problems"]  # type: ignore[misc]
            assert "is an ingest running on sync prefix 'edge'?" in problem
            result = await asyncio.to_thread(status_command, tmp_path / "agent.toml")
            assert result.returncode == 1, result.stdout + result.stderr
            assert "degraded: no central acknowledgement for " in result.stdout
            assert "is an ingest running on sync prefix 'edge'?" in result.stdout
    messages = [record.getMessage() for record in caplog.records]
    assert not [text for text in messages if "cut to" in text or "size limit" in text]
    assert len([text for text in messages if "no central acknowledgement" in text]) == 1
