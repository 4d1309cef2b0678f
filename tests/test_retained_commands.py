"""A retained command never writes a PLC: the broker keeps RETAIN on live delivery because the
agent subscribes with Retain-As-Published (MQTT 5), and a retained command stored before the
agent subscribed arrives marked retained anyway (docs/workflows.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from simulators.modbus.server import ModbusSimulator
from tests.fixtures.daemon import ROOT, config_text, running, settings_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.mqtt_client import MqttTestClient
from tests.fixtures.ports import async_wait_until
from tests.fixtures.workflows import CommandSender, write_log

WORKFLOW = """
  [[devices.tags]]
  name = "product_code"
  address = "hr:200"
  writable = true

[[workflows]]
name = "set_product"
params = { v = "int:1..9999" }
steps = [{ write = "press1/product_code", value = "{v}" }]
"""


def retained(broker: MosquittoBroker, payload: dict[str, object] | None) -> None:
    """Publish a command retained (a misconfigured MES, or a hostile client); None clears it."""
    client = MqttTestClient.for_broker(broker)
    client.connect()
    try:
        body = b"" if payload is None else json.dumps(payload).encode()
        info = client.client.publish(f"{ROOT}/_cmd/set_product", body, 1, True)
        info.wait_for_publish(timeout=5)
    finally:
        client.close()


async def test_retained_commands_are_refused_live_and_stored(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    press_log = tmp_path / "press.jsonl"
    async with ModbusSimulator(port=0, seed=5, speed=0.0, write_log=press_log) as sim:
        text = config_text(mosquitto, tmp_path / "data", [("press1", sim.port)]) + WORKFLOW
        settings = settings_for(tmp_path, text)
        with CommandSender(mosquitto, ROOT) as sender:
            async with running(settings) as runtime:
                assert runtime.gateway is not None
                await runtime.gateway.workflows.ready.wait()
                await async_wait_until(lambda: runtime.gateway.mqtt.is_connected, timeout=10)
                # Live: published retained while the agent is subscribed.
                await asyncio.to_thread(retained, mosquitto, {"id": "live-1", "params": {"v": 7}})
                reply = await asyncio.to_thread(sender.wait_status, "live-1", ("rejected",))
                assert reply["detail"] == "retained commands are not accepted"
                # A valid command still runs (the refusal is about RETAIN, nothing else).
                sender.send("set_product", {"id": "plain-1", "params": {"v": 8}})
                done = await asyncio.to_thread(sender.wait_status, "plain-1", ("completed",))
                assert done["status"] == "completed"
            # Stored: the retained one waits at the broker for the next start.
            async with running(settings) as runtime:
                assert runtime.gateway is not None
                await runtime.gateway.workflows.ready.wait()
                reply = await asyncio.to_thread(
                    sender.wait_status, "live-1", ("rejected",), 20.0, 1
                )
                assert reply["detail"] == "retained commands are not accepted"
        await asyncio.to_thread(retained, mosquitto, None)
    writes = [entry for entry in write_log(press_log) if entry["address"] == 200]
    assert [entry["values"] for entry in writes] == [[8]]  # only the plain command wrote
