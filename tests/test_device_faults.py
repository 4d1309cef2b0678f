"""A device whose connect raises an exception no driver error covers (an RTU port that refuses
its line settings: pyserial raises termios.error, as a pty does for even parity) is down with
the reason in the log, /status and /metrics; the other devices keep polling and the daemon
stays up. And whatever does end the daemon logs each cause, not only a group's summary."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pty
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.cli import main
from simulators.modbus.server import ModbusSimulator
from tests.fixtures.daemon import config_text, running, settings_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import async_wait_until


def rtu_device(port: str) -> str:
    """A Modbus RTU device on `port` with even parity (a pty refuses it)."""
    return f"""
[[devices]]
name = "rtu1"
driver = "modbus"
url = "rtu://{port}?baudrate=19200&parity=E"
poll_interval = "200ms"
timeout = "300ms"
breaker_failures = 3
breaker_reset = "1s"
  [[devices.tags]]
  name = "state_code"
  address = "hr:100"
"""


def get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        body: bytes = response.read()
        return body


def samples(metrics: bytes, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted labels: value} of one metric family."""
    found = {}
    for family in text_string_to_metric_families(metrics.decode()):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def test_an_unexpected_connect_error_downs_that_device_only(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    leader, follower = pty.openpty()
    try:
        async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
            text = config_text(mosquitto, tmp_path / "data", [("press1", sim.port)])
            settings = settings_for(tmp_path, text + rtu_device(os.ttyname(follower)))
            http = int(settings.http.listen.rsplit(":", 1)[1])
            async with running(settings) as runtime:
                rtu = runtime.pollers["rtu1"]
                await async_wait_until(
                    lambda: rtu.poll_errors >= 2 and runtime.pollers["press1"].polls >= 3,
                    timeout=15,
                )
                polls = runtime.pollers["press1"].polls
                await async_wait_until(
                    lambda: runtime.pollers["press1"].polls >= polls + 5, timeout=10
                )
                assert rtu.state in ("down", "open")
                assert rtu.reason is not None
                assert "Invalid argument" in rtu.reason

                status = json.loads(await asyncio.to_thread(get, http, "/status"))
                assert status["devices"]["press1"] == "up"
                assert status["devices"]["rtu1"] in ("down", "open")
                assert "internal error" in status["device_detail"]["rtu1"]["reason"]
                assert "Invalid argument" in status["device_detail"]["rtu1"]["reason"]

                metrics = await asyncio.to_thread(get, http, "/metrics")
                up = samples(metrics, "edge_agent_device_up")
                assert up[(("device", "press1"),)] == 1.0
                assert up[(("device", "rtu1"),)] == 0.0
                down = samples(metrics, "edge_agent_device_down_info")
                reasons = [
                    dict(labels)["reason"] for labels in down if ("device", "rtu1") in labels
                ]
                assert len(reasons) == 1
                assert "Invalid argument" in reasons[0]
                assert not any(("device", "press1") in labels for labels in down)
    finally:
        os.close(leader)
        os.close(follower)
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("device rtu1 down: internal error") for m in messages), messages
    tracebacks = [
        record
        for record in caplog.records
        if record.getMessage() == "device rtu1: unexpected error" and record.exc_info
    ]
    assert len(tracebacks) == 1  # logged once, although every reconnect fails the same way


def test_a_daemon_ended_by_an_exception_group_logs_every_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
[gateway]
id = "gw1"
site = "s"
area = "a"
line = "l"
data_dir = "{tmp_path / "data"}"

[mqtt]
url = "mqtt://127.0.0.1:1"
"""
    )

    async def fails(*args: object) -> int:
        async with asyncio.TaskGroup() as group:
            group.create_task(_raise(KeyError("one")))
            group.create_task(_raise(ValueError("two")))
        return 0

    monkeypatch.setattr("agent.daemon.runtime.run_until_signalled", fails)
    caplog.set_level(logging.ERROR)
    assert main(["run", "-c", str(config)]) == 1
    logged = [(record.getMessage(), record.exc_info is not None) for record in caplog.records]
    assert ("KeyError: 'one'", True) in logged
    assert ("ValueError: two", True) in logged


async def _raise(exc: Exception) -> None:
    raise exc
