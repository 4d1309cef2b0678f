"""The whole daemon against the OPC UA simulator and a private mosquitto: subscribed and polled
values on MQTT with their JSON types, NaN, a killed and restarted simulator process, a stalled
server, a refused password (one log line), and `probe`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from agent.daemon.runtime import Runtime
from agent.probe import probe
from agent.settings.config_file import AgentSettings
from agent.settings.loader import load_agent_settings
from simulators.opcua.control import send_control
from simulators.opcua.server import OpcUaSimulator
from sync.events import rfc3339
from tests.fixtures.collector import TopicCollector
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import async_wait_until, free_port, port_accepts, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPO = Path(__file__).resolve().parent.parent
ROOT = "plant1/assembly/line3"

TAGS = """
  [[devices.tags]]
  name = "state_code"
  node_id = "ns=2;s=Filler.State"
  [[devices.tags]]
  name = "total_count"
  node_id = "ns=2;s=Filler.Counters.Total"
  [[devices.tags]]
  name = "temperature"
  node_id = "ns=2;s=Filler.Temperature"
  [[devices.tags]]
  name = "hold"
  node_id = "ns=2;s=Filler.QualityHold"
  [[devices.tags]]
  name = "operator"
  node_id = "ns=2;s=Filler.Setpoints.Operator"
  [[devices.tags]]
  name = "speed"
  node_id = "ns=2;s=Filler.Setpoints.SpeedBpm"
  [[devices.tags]]
  name = "recipe"
  node_id = "ns=2;s=Filler.Recipe"
  mode = "poll"
  [[devices.tags]]
  name = "zones"
  node_id = "ns=2;s=Filler.ZoneTemperatures"
  mode = "poll"
  [[devices.tags]]
  name = "fill_level"
  node_id = "ns=2;s=Filler.FillLevel"
  mode = "poll"
"""


@pytest.fixture(scope="module", autouse=True)
def _quiet_asyncua() -> Iterator[None]:
    logger = logging.getLogger("asyncua")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sim() -> AsyncIterator[OpcUaSimulator]:
    async with OpcUaSimulator(
        port=0, seed=4, speed=0.0, bulk_count=0, users={"edge": "right"}, allow_anonymous=True
    ) as simulator:
        yield simulator


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def _clean(sim: OpcUaSimulator) -> AsyncIterator[None]:
    yield
    sim.unstall()
    await sim.clear_faults()


def config_text(mqtt_url: str, data_dir: Path, port: int, **device_keys: str) -> str:
    extra = "".join(f"{key} = {value}\n" for key, value in device_keys.items())
    return f"""
[gateway]
id = "plant1-line3"
site = "plant1"
area = "assembly"
line = "line3"
data_dir = "{data_dir}"

[mqtt]
url = "{mqtt_url}"

[[devices]]
name = "filler"
driver = "opcua"
url = "opc.tcp://127.0.0.1:{port}"
poll_interval = "200ms"
publishing_interval = "100ms"
timeout = "500ms"
breaker_failures = 3
breaker_reset = "1s"
{extra}{TAGS}"""


def settings_for(tmp_path: Path, text: str) -> AgentSettings:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_agent_settings(path, environ={})


@contextlib.asynccontextmanager
async def running(settings: AgentSettings) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop), name="runtime")
    try:
        async with asyncio.timeout(10):
            await runtime.started.wait()
        yield runtime
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task


def topic(tag: str) -> str:
    return f"{ROOT}/filler/{tag}"


async def wait_for(seen: TopicCollector, tag: str, predicate: Any = None, **kw: Any) -> Any:
    message = await asyncio.to_thread(seen.wait_for, topic(tag), predicate, **kw)
    return message.json()


async def test_subscribed_and_polled_values_reach_mqtt_with_their_json_types(
    mosquitto: MosquittoBroker, sim: OpcUaSimulator, tmp_path: Path
) -> None:
    settings = settings_for(
        tmp_path, config_text(mosquitto.url, tmp_path / "data", int(sim.port or 0))
    )
    model = sim.model
    with TopicCollector(mosquitto, f"{ROOT}/#") as seen:
        async with running(settings):
            values = {
                tag: await wait_for(seen, tag)
                for tag in (
                    "state_code",
                    "total_count",
                    "temperature",
                    "hold",
                    "operator",
                    "recipe",
                    "zones",
                    "fill_level",
                )
            }
            # Subscribed: a change on the server is pushed.
            await sim.set_value("Filler.Setpoints.Operator", "night shift")
            operator = await wait_for(seen, "operator", lambda p: p["value"] == "night shift")
            # NaN has no JSON form: null with quality bad, and back to good afterwards.
            await sim.set_value("Filler.Setpoints.SpeedBpm", math.nan)
            nan = await wait_for(seen, "speed", lambda p: p["quality"] == "bad")
            await sim.set_value("Filler.Setpoints.SpeedBpm", 99.5)
            await wait_for(seen, "speed", lambda p: p["value"] == 99.5)
    for payload in values.values():
        assert set(payload) == {"ts", "value", "quality"}
        assert payload["quality"] == "good"
        assert payload["ts"].endswith("Z")
    assert values["state_code"]["value"] == model.state
    assert values["total_count"]["value"] == model.total_count
    assert type(values["total_count"]["value"]) is int
    assert values["temperature"]["value"] == model.temperature
    assert type(values["temperature"]["value"]) is float
    assert values["hold"]["value"] is False
    assert values["operator"]["value"] == ""
    assert values["recipe"]["value"] == model.product_name
    assert type(values["zones"]["value"]) is list
    assert len(values["zones"]["value"]) == 4
    assert type(values["fill_level"]["value"]) is float
    assert operator["quality"] == "good"
    assert nan == {"ts": nan["ts"], "value": None, "quality": "bad"}
    # The event time is the server's SourceTimestamp of the value.
    source = sim.value("Filler.Setpoints.Operator").SourceTimestamp
    assert source is not None
    assert operator["ts"] == rfc3339(source.timestamp())


async def test_stalled_server_goes_bad_and_recovers(
    mosquitto: MosquittoBroker, sim: OpcUaSimulator, tmp_path: Path
) -> None:
    settings = settings_for(
        tmp_path, config_text(mosquitto.url, tmp_path / "data", int(sim.port or 0))
    )
    with TopicCollector(mosquitto, f"{ROOT}/#") as seen:
        async with running(settings) as runtime:
            poller = runtime.pollers["filler"]
            await wait_for(seen, "state_code", lambda p: p["quality"] == "good")
            await wait_for(seen, "recipe", lambda p: p["quality"] == "good")
            stalled_at = time.monotonic()
            sim.stall()
            for tag in ("state_code", "recipe"):  # subscribed and polled
                await wait_for(seen, tag, lambda p: p["quality"] == "bad", timeout=10)
            assert time.monotonic() - stalled_at < 8.0
            assert poller.state in ("down", "open")
            sim.unstall()
            back_at = time.monotonic()
            for tag in ("state_code", "recipe"):
                await asyncio.to_thread(
                    seen.wait_for, topic(tag), lambda p: p["quality"] == "good", 15, back_at
                )
            await async_wait_until(lambda: poller.state == "up", timeout=10)


async def test_refused_password_is_one_clear_log_line(
    mosquitto: MosquittoBroker,
    sim: OpcUaSimulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "filler.password").write_text("wrong\n")
    text = config_text(
        mosquitto.url,
        tmp_path / "data",
        int(sim.port or 0),
        username='"edge"',
        password_file=f'"{tmp_path / "filler.password"}"',
    )
    settings = settings_for(tmp_path, text)
    with caplog.at_level(logging.INFO, logger="edge_agent.poller"):
        async with running(settings) as runtime:
            poller = runtime.pollers["filler"]
            await async_wait_until(lambda: poller.poll_errors >= 3, timeout=15)
            assert poller.state in ("down", "open")
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_agent.poller"]
    assert lines == ["device filler down: server refused user 'edge': BadUserAccessDenied"]


async def test_probe_reads_every_opcua_tag(sim: OpcUaSimulator, tmp_path: Path) -> None:
    # probe never connects to MQTT.
    text = config_text("mqtt://127.0.0.1:1", tmp_path / "data", int(sim.port or 0))
    settings = settings_for(tmp_path, text)
    rows = await probe(settings)
    assert {row.tag for row in rows} == {tag.name for tag in settings.devices[0].tag_list()}
    assert all(row.quality == "good" for row in rows), rows
    assert next(r for r in rows if r.tag == "recipe").value == sim.model.product_name


# ---------------------------------------------------------------------- a real process


def start_simulator(port: int, control: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.opcua",
            "--port",
            str(port),
            "--control-port",
            str(control),
            "--speed",
            "0",
            "--bulk",
            "0",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_until(lambda: port_accepts("127.0.0.1", control), timeout=30, message="simulator up")
    return process


@pytest.fixture
def simulator_process() -> Iterator[tuple[int, int, list[subprocess.Popen[bytes]]]]:
    port, control = free_port(), free_port()
    processes = [start_simulator(port, control)]
    yield port, control, processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_simulator_killed_and_restarted_values_flow_again_within_10_s(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    simulator_process: tuple[int, int, list[subprocess.Popen[bytes]]],
) -> None:
    port, control, processes = simulator_process
    settings = settings_for(tmp_path, config_text(mosquitto.url, tmp_path / "data", port))
    with TopicCollector(mosquitto, f"{ROOT}/#") as seen:
        async with running(settings) as runtime:
            poller = runtime.pollers["filler"]
            await wait_for(seen, "state_code", lambda p: p["quality"] == "good")
            processes[0].kill()
            await asyncio.to_thread(processes[0].wait)
            bad = await wait_for(seen, "state_code", lambda p: p["quality"] == "bad")
            assert bad["value"] is None
            processes.append(await asyncio.to_thread(start_simulator, port, control))
            back_at = time.monotonic()
            good = await asyncio.to_thread(
                seen.wait_for, topic("state_code"), lambda p: p["quality"] == "good", 15, back_at
            )
            assert good.at - back_at < 10.0
            # The subscription was re-created on the new server: a change is pushed again.
            async with asyncio.timeout(5):
                await send_control(control, 'set_value Filler.Setpoints.Operator "after restart"')
            await wait_for(seen, "operator", lambda p: p["value"] == "after restart", timeout=5)
            assert poller.state == "up"
            assert poller.reconnects >= 1
