"""Command provenance: the MQTT 5 user property "sender" is recorded, marked unverified, in the
audit trail and the replies, and a workflow can require it (docs/workflows.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.workflows.commands import CommandRejected, sender_of
from simulators.modbus.server import ModbusSimulator
from tests.fixtures.daemon import ROOT, config_text, running, settings_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.mqtt_client import MqttTestClient
from tests.fixtures.ports import async_wait_until
from tests.fixtures.workflows import CommandSender

WORKFLOWS = """
  [[devices.tags]]
  name = "product_code"
  address = "hr:200"
  writable = true

[[workflows]]
name = "set_product"
params = { v = "int:1..9999" }
steps = [{ write = "press1/product_code", value = "{v}" }]

[[workflows]]
name = "set_product_signed"
params = { v = "int:1..9999" }
require_sender = true
steps = [{ write = "press1/product_code", value = "{v}" }]
"""


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ((), None),
        ((("other", "x"),), None),
        ((("sender", "mes-01"),), "mes-01"),
        ((("sender", "user@plant.example"),), "user@plant.example"),
    ],
)
def test_sender_of(properties: tuple[tuple[str, str], ...], expected: str | None) -> None:
    assert sender_of(properties) == expected


@pytest.mark.parametrize(
    ("properties", "reason"),
    [
        ((("sender", "a"), ("sender", "b")), "more than one"),
        ((("sender", ""),), "must be 1..128 characters"),
        ((("sender", "x" * 129),), "must be 1..128 characters"),
        ((("sender", "mes 01"),), "must be 1..128 characters"),
        ((("sender", "mes\n01"),), "must be 1..128 characters"),
    ],
)
def test_a_bad_sender_is_a_rejection(properties: tuple[tuple[str, str], ...], reason: str) -> None:
    with pytest.raises(CommandRejected, match=reason):
        sender_of(properties)


def publish(
    broker: MosquittoBroker, workflow: str, payload: dict[str, Any], sender: str | None
) -> None:
    """A command from an MQTT 5 client, with the user property "sender" when given."""
    client = MqttTestClient.for_broker(broker, protocol=mqtt.MQTTv5)
    client.connect()
    try:
        properties = Properties(PacketTypes.PUBLISH)
        if sender is not None:
            properties.UserProperty = ("sender", sender)
        info = client.client.publish(
            f"{ROOT}/_cmd/{workflow}", json.dumps(payload), 1, False, properties=properties
        )
        info.wait_for_publish(timeout=5)
    finally:
        client.close()


async def test_the_sender_is_recorded_unverified_and_can_be_required(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        text = config_text(mosquitto, tmp_path / "data", [("press1", sim.port)]) + WORKFLOWS
        settings = settings_for(tmp_path, text)
        with CommandSender(mosquitto, ROOT) as sender:
            async with running(settings) as runtime:
                gateway = runtime.gateway
                assert gateway is not None
                await gateway.workflows.ready.wait()
                await async_wait_until(lambda: gateway.mqtt.is_connected, timeout=10)
                command = {"id": "c1", "params": {"v": 11}}
                await asyncio.to_thread(publish, mosquitto, "set_product", command, "mes-01")
                accepted = await asyncio.to_thread(sender.wait_status, "c1", ("accepted",))
                assert accepted["sender"] == "mes-01"
                await asyncio.to_thread(sender.wait_status, "c1", ("completed",))
                # Required but missing: refused; required and given: runs.
                anonymous = {"id": "c2", "params": {"v": 12}}
                await asyncio.to_thread(publish, mosquitto, "set_product_signed", anonymous, None)
                refused = await asyncio.to_thread(sender.wait_status, "c2", ("rejected",))
                assert 'requires a "sender"' in refused["detail"]
                assert "sender" not in refused
                named = {"id": "c3", "params": {"v": 13}}
                await asyncio.to_thread(publish, mosquitto, "set_product_signed", named, "mes-02")
                await asyncio.to_thread(sender.wait_status, "c3", ("completed",))
                batch = await gateway.outbox.read_batch(0, 10_000, 1 << 24)
    trail = [event.value for event in batch.events if event.kind == "workflow"]
    started = {e["command_id"]: e for e in trail if e["step"] == "started"}
    assert started["c1"]["sender"] == "mes-01"
    assert started["c1"]["sender_verified"] is False
    assert started["c3"]["sender"] == "mes-02"
    rejected = [e for e in trail if e["command_id"] == "c2" and e["action"] == "reject"]
    assert rejected[0]["sender"] is None
