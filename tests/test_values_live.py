"""Values at their precision end to end (issue #21, item 5): a scale-0.1 register and a float32
read from the Modbus simulator arrive on MQTT (live and S/sync) as the short text a person
would write, and `edge-agent probe` prints the same text."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient

from drivers.modbus.codec import encode_registers
from simulators.modbus.server import ModbusSimulator
from tests.fixtures.collector import TopicCollector
from tests.fixtures.daemon import REPO, ROOT, running, settings_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import free_port

# hr:300.. is plain memory in the simulator: the registers of the values of issue #21.
SCALED_RAW = 569  # x 0.1 = 56.900000000000006 in binary floating point
FLOAT32 = 56.703  # read back as 56.702999114990234 in binary floating point
EXPECTED = {"scaled": "56.9", "single": "56.703", "hundredths": "1.75", "running": "true"}
RUNNING = 1  # the simulator's state code of a running machine (di:0 is state == 1)


def config(broker: MosquittoBroker, data_dir: Path, port: int) -> str:
    return f"""
[gateway]
id = "plant1-line3"
site = "plant1"
area = "assembly"
line = "line3"
data_dir = "{data_dir}"

[mqtt]
url = "{broker.url}"

[http]
listen = "127.0.0.1:{free_port()}"

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:{port}"
poll_interval = "200ms"

  [[devices.tags]]
  name = "scaled"
  address = "hr:302"
  type = "int16"
  scale = 0.1
  [[devices.tags]]
  name = "single"
  address = "hr:300"
  type = "float32"
  [[devices.tags]]
  name = "hundredths"
  address = "hr:303"
  type = "uint16"
  scale = 0.25
  [[devices.tags]]
  name = "running"
  address = "di:0"
  type = "bool"
  [[devices.tags]]
  name = "product_name"
  address = "hr:210"
  type = "string"
  length = 16
"""


async def write_registers(port: int) -> None:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2.0, retries=0)
    await client.connect()
    try:
        registers = [*encode_registers(FLOAT32, "float32"), SCALED_RAW, 7]  # 7 x 0.25 = 1.75
        response = await client.write_registers(300, registers)
        assert not response.isError()
    finally:
        client.close()


def value_text(payload: bytes) -> str:
    """The value exactly as written in a payload (not parsed: the text is what is tested)."""
    match = re.search(rb'"value":(.*?),"quality"', payload)
    assert match is not None, payload
    return match.group(1).decode()


async def test_values_arrive_as_short_text_live_in_sync_and_in_probe(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        assert sim.port is not None
        await write_registers(sim.port)
        text = config(mosquitto, tmp_path / "data", sim.port)
        settings = settings_for(tmp_path, text)
        model = sim.model(1)
        with (
            TopicCollector(mosquitto, f"{ROOT}/press1/#") as live,
            TopicCollector(mosquitto, "edge/plant1-line3/sync") as sync,
        ):
            async with running(settings):
                latest = {
                    tag: await asyncio.to_thread(live.wait_for, f"{ROOT}/press1/{tag}")
                    for tag in (*EXPECTED, "product_name")
                }
                batch = await asyncio.to_thread(
                    sync.wait_for,
                    "edge/plant1-line3/sync",
                    lambda document: len(document["events"]) >= len(EXPECTED) + 1,
                )
        probe = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.cli",
            "probe",
            "-c",
            str(tmp_path / "agent.toml"),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(probe.communicate(), 60)
    assert model.state == RUNNING  # di:0 reads true
    for tag, expected in EXPECTED.items():
        assert value_text(latest[tag].payload) == expected, latest[tag].payload
    assert value_text(latest["product_name"].payload) == f'"{model.product_name}"'
    # The outbox's events, as S/sync carries them: the same text.
    events = {
        match.group(1).decode(): match.group(2).decode()
        for match in re.finditer(rb'"tag":"(\w+)","value":(.*?),"quality"', batch.payload)
    }
    assert {tag: events[tag] for tag in EXPECTED} == EXPECTED
    # probe: the payload's text (a string without quotes).
    assert probe.returncode == 0, err.decode()
    table = out.decode()
    for tag, expected in EXPECTED.items():
        assert re.search(rf"press1\s+{tag}\s+{re.escape(expected)}\s+good", table), table
    assert re.search(rf"press1\s+product_name\s+{model.product_name}\s+good", table), table
