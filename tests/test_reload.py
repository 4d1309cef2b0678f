"""SIGHUP: valid changes apply without a restart and without dropping the MQTT connection;
an invalid file keeps the running config."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from simulators.modbus.server import ModbusSimulator
from tests.fixtures.collector import TopicCollector
from tests.fixtures.daemon import REPO, ROOT, config_text
from tests.fixtures.mosquitto import MosquittoBroker

EXTRA_TAG = '  [[devices.tags]]\n  name = "product_code"\n  address = "hr:200"\n'


async def test_sighup_applies_changes_and_refuses_invalid_files(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with (
        ModbusSimulator(port=0, seed=5, speed=0.0) as press,
        ModbusSimulator(port=0, seed=6, speed=0.0) as oven,
    ):
        config = tmp_path / "agent.toml"
        both = config_text(
            mosquitto, tmp_path / "data", [("press1", press.port), ("oven1", oven.port)]
        )
        config.write_text(both)
        log = tmp_path / "agent.log"
        with log.open("wb") as out:
            agent = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent.cli",
                "run",
                "-c",
                str(config),
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            with TopicCollector(mosquitto, f"{ROOT}/#") as seen:
                await asyncio.to_thread(seen.wait_for, f"{ROOT}/oven1/state_code", None, 20)
                await asyncio.to_thread(
                    seen.wait_for, f"{ROOT}/_agent/status", lambda p: p["status"] == "online"
                )
                # Valid change: oven1 removed, a tag added to press1.
                one = (
                    config_text(mosquitto, tmp_path / "data", [("press1", press.port)]) + EXTRA_TAG
                )
                # Keep [http] (a different port would mean a restart): reuse the first file's.
                http_line = next(line for line in both.splitlines() if line.startswith("listen"))
                config.write_text(
                    "\n".join(
                        http_line if line.startswith("listen") else line
                        for line in one.splitlines()
                    )
                )
                agent.send_signal(signal.SIGHUP)
                added = await asyncio.to_thread(
                    seen.wait_for, f"{ROOT}/press1/product_code", None, 20
                )
                assert added.json()["value"] == press.model(1).product_code
                cleared = await asyncio.to_thread(
                    seen.wait_for, f"{ROOT}/oven1/state_code", None, 20, added.at - 5
                )
                # The removed device's retained values are deleted (empty retained message).
                assert any(m.payload == b"" for m in seen.on_topic(f"{ROOT}/oven1/state_code"))
                assert cleared is not None
                # Invalid change: refused, the agent keeps running on the old config.
                config.write_text("[gateway]\nid = 'broken id'\n")
                agent.send_signal(signal.SIGHUP)
                await asyncio.to_thread(
                    _wait_for_log, log, "reload: " + str(config) + " is invalid"
                )
                assert agent.returncode is None
                # Never went offline: one connection for the whole test.
                statuses = [m.json()["status"] for m in seen.on_topic(f"{ROOT}/_agent/status")]
                assert "offline" not in statuses
            text = log.read_text()
            assert "reload: applied (1 devices: 0 added, 1 removed, 1 changed)" in text
            assert "gateway.id: String should match pattern" in text
        finally:
            agent.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(agent.wait(), 30) == 0
    assert mosquitto.log_text().count("New client connected from") >= 1
    assert mosquitto.log_text().count("as edge-agent-plant1-line3") == 1


def _wait_for_log(path: Path, needle: str, timeout: float = 20.0) -> None:
    from tests.fixtures.ports import wait_until

    wait_until(lambda: needle in path.read_text(), timeout=timeout, message=needle)
