"""The whole daemon against the Modbus simulator and a private mosquitto: retained payloads,
faults (kill/restart, stall, garbage), isolation between devices, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from simulators.modbus.control import send_control
from simulators.modbus.server import ModbusSimulator
from tests.fixtures.collector import TopicCollector
from tests.fixtures.daemon import REPO, ROOT, config_text, running, settings_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import async_wait_until, free_port, wait_until


async def test_values_arrive_retained_with_the_contract_payload(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        settings = settings_for(
            tmp_path, config_text(mosquitto, tmp_path / "data", [("press1", sim.port)])
        )
        with TopicCollector(mosquitto, f"{ROOT}/#") as seen:
            async with running(settings):
                model = sim.model(1)
                state = await asyncio.to_thread(seen.wait_for, f"{ROOT}/press1/state_code")
                status = await asyncio.to_thread(
                    seen.wait_for, f"{ROOT}/_agent/status", lambda p: p["status"] == "online"
                )
                await asyncio.to_thread(seen.wait_for, f"{ROOT}/press1/energy")
            offline = await asyncio.to_thread(
                seen.wait_for, f"{ROOT}/_agent/status", lambda p: p["status"] == "offline"
            )
        latest = seen.snapshot()
    payload = state.json()
    assert set(payload) == {"ts", "value", "quality"}
    assert payload["value"] == model.state
    assert payload["quality"] == "good"
    assert payload["ts"].endswith("Z")
    assert len(payload["ts"]) == len("2026-11-28T22:10:35.123Z")
    assert latest[f"{ROOT}/press1/total_count"].json()["value"] == model.total_count
    assert latest[f"{ROOT}/press1/temperature"].json()["value"] == pytest.approx(
        round(model.temperature * 10) / 10, abs=0.051
    )
    assert latest[f"{ROOT}/press1/product_name"].json()["value"] == model.product_name
    assert latest[f"{ROOT}/press1/running"].json()["value"] in (True, False)
    assert set(status.json()) == {"ts", "status", "version"}
    assert offline.json()["status"] == "offline"
    # A late subscriber gets the retained state.
    with TopicCollector(mosquitto, f"{ROOT}/press1/#") as late:
        retained = await asyncio.to_thread(late.wait_for, f"{ROOT}/press1/state_code")
    assert retained.retain


async def test_only_changes_are_published(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        settings = settings_for(
            tmp_path, config_text(mosquitto, tmp_path / "data", [("press1", sim.port)])
        )
        with TopicCollector(mosquitto, f"{ROOT}/press1/#") as seen:
            async with running(settings) as runtime:
                await asyncio.to_thread(seen.wait_for, f"{ROOT}/press1/product_name")
                poller = runtime.pollers["press1"]
                polls = poller.polls
                await async_wait_until(lambda: poller.polls >= polls + 5, timeout=10)
                assert len(seen.on_topic(f"{ROOT}/press1/product_name")) == 1
                sim.model(1).write("product_name", "NEW-PART")
                changed = await asyncio.to_thread(
                    seen.wait_for, f"{ROOT}/press1/product_name", lambda p: p["value"] == "NEW-PART"
                )
    assert changed.json()["quality"] == "good"


def start_simulator(port: int, control: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "simulate",
            "modbus",
            "--port",
            str(port),
            "--control-port",
            str(control),
            "--speed",
            "0",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    from tests.fixtures.ports import port_accepts

    wait_until(lambda: port_accepts("127.0.0.1", port), timeout=20, message="simulator listening")
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


async def test_simulator_killed_and_restarted(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    simulator_process: tuple[int, int, list[subprocess.Popen[bytes]]],
) -> None:
    port, control, processes = simulator_process
    settings = settings_for(tmp_path, config_text(mosquitto, tmp_path / "data", [("press1", port)]))
    topic = f"{ROOT}/press1/state_code"
    with TopicCollector(mosquitto, f"{ROOT}/#") as seen:
        async with running(settings) as runtime:
            await asyncio.to_thread(seen.wait_for, topic, lambda p: p["quality"] == "good")
            processes[0].kill()
            processes[0].wait()
            bad = await asyncio.to_thread(seen.wait_for, topic, lambda p: p["quality"] == "bad")
            assert bad.json()["value"] is None
            assert runtime.pollers["press1"].state in ("down", "open")
            # Once per transition: the bad value is not repeated every poll.
            await asyncio.sleep(1.0)
            assert sum(1 for m in seen.on_topic(topic) if m.json()["quality"] == "bad") == 1
            processes.append(await asyncio.to_thread(start_simulator, port, control))
            back_at = time.monotonic()
            good = await asyncio.to_thread(
                seen.wait_for, topic, lambda p: p["quality"] == "good", 15, back_at
            )
            assert good.at - back_at < 10.0
            assert runtime.pollers["press1"].state == "up"


async def test_stalled_device_goes_bad_opens_breaker_and_recovers(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        settings = settings_for(
            tmp_path, config_text(mosquitto, tmp_path / "data", [("press1", sim.port)])
        )
        topic = f"{ROOT}/press1/state_code"
        with TopicCollector(mosquitto, f"{ROOT}/#") as seen:
            async with running(settings) as runtime:
                poller = runtime.pollers["press1"]
                await asyncio.to_thread(seen.wait_for, topic, lambda p: p["quality"] == "good")
                stalled_at = time.monotonic()
                sim.stall()
                bad = await asyncio.to_thread(seen.wait_for, topic, lambda p: p["quality"] == "bad")
                await async_wait_until(lambda: poller.breaker_state == "open", timeout=15)
                assert poller.state == "open"
                sim.unstall()
                await async_wait_until(lambda: poller.state == "up", timeout=15)
                await asyncio.to_thread(
                    seen.wait_for, topic, lambda p: p["quality"] == "good", 10, bad.at
                )
                assert bad.at > stalled_at


@pytest.mark.parametrize("fault", ["garbage", "wrong_transaction_id"])
async def test_corrupt_answers_never_reach_mqtt(
    mosquitto: MosquittoBroker, tmp_path: Path, fault: str
) -> None:
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        settings = settings_for(
            tmp_path, config_text(mosquitto, tmp_path / "data", [("press1", sim.port)])
        )
        topic = f"{ROOT}/press1/total_count"
        with TopicCollector(mosquitto, f"{ROOT}/#") as seen:
            async with running(settings) as runtime:
                await asyncio.to_thread(seen.wait_for, topic)
                getattr(sim, fault)(True)
                bad = await asyncio.to_thread(seen.wait_for, topic, lambda p: p["quality"] == "bad")
                poller = runtime.pollers["press1"]
                errors = poller.poll_errors
                await async_wait_until(lambda: poller.poll_errors >= errors + 2, timeout=15)
                getattr(sim, fault)(False)
                await asyncio.to_thread(
                    seen.wait_for, topic, lambda p: p["quality"] == "good", 15, bad.at
                )
        good_values = {
            m.json()["value"] for m in seen.on_topic(topic) if m.json()["quality"] == "good"
        }
    assert good_values == {sim.model(1).total_count}  # nothing decoded from corrupt frames


async def test_one_device_down_never_delays_another(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with (
        ModbusSimulator(port=0, seed=5, speed=0.0) as healthy,
        ModbusSimulator(port=0, seed=6, speed=0.0) as stalled,
    ):
        text = config_text(
            mosquitto, tmp_path / "data", [("good", healthy.port), ("slow", stalled.port)]
        )
        settings = settings_for(tmp_path, text)
        async with running(settings) as runtime:
            good, slow = runtime.pollers["good"], runtime.pollers["slow"]
            await async_wait_until(lambda: good.polls >= 3 and slow.polls >= 3, timeout=10)
            stalled.stall()
            await async_wait_until(lambda: slow.state != "up", timeout=10)
            # While the other device times out, this one keeps its 200 ms schedule: 15 polls
            # need 3 s; allow 6 s of wall time, and no skipped ticks.
            start = good.polls
            skipped = good.skipped_ticks
            await async_wait_until(lambda: good.polls >= start + 15, timeout=6)
            assert good.skipped_ticks == skipped
            assert good.state == "up"


async def test_broker_down_then_newest_values_published_on_reconnect(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        settings = settings_for(
            tmp_path, config_text(mosquitto, tmp_path / "data", [("press1", sim.port)])
        )
        async with running(settings) as runtime:
            assert runtime.gateway is not None
            await async_wait_until(
                lambda: runtime.gateway is not None and runtime.gateway.mqtt.is_connected,
                timeout=10,
            )
            await asyncio.to_thread(mosquitto.kill)
            sim.model(1).write("product_name", "DURING-OUTAGE")
            poller = runtime.pollers["press1"]
            polls = poller.polls
            await async_wait_until(
                lambda: poller.polls >= polls + 3, timeout=10
            )  # polling continues
            await asyncio.to_thread(mosquitto.restart)
            with TopicCollector(mosquitto, f"{ROOT}/press1/#") as seen:
                message = await asyncio.to_thread(
                    seen.wait_for,
                    f"{ROOT}/press1/product_name",
                    lambda p: p["value"] == "DURING-OUTAGE",
                    20,
                )
    assert message.retain or message.json()["value"] == "DURING-OUTAGE"


def test_run_command_sigterm_exits_0(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
            path = tmp_path / "agent.toml"
            path.write_text(config_text(mosquitto, tmp_path / "data", [("press1", sim.port)]))
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent.cli",
                "run",
                "-c",
                str(path),
                cwd=REPO,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                with TopicCollector(mosquitto, f"{ROOT}/#") as seen:
                    await asyncio.to_thread(seen.wait_for, f"{ROOT}/press1/state_code", None, 20)
                process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(15):
                    _, stderr = await process.communicate()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            assert process.returncode == 0, stderr.decode()
            assert b"Traceback" not in stderr

    uvloop.run(scenario())


def test_run_command_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[gateway]\nid = "x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "gateway.site: required" in result.stderr


def test_probe_table_and_exit_codes(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    async def scenario() -> tuple[int, str, int, str]:
        async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
            good = tmp_path / "good.toml"
            good.write_text(config_text(mosquitto, tmp_path / "data", [("press1", sim.port)]))
            bad = tmp_path / "bad.toml"
            bad.write_text(
                config_text(
                    mosquitto, tmp_path / "data", [("press1", sim.port), ("gone", free_port())]
                )
            )
            results = []
            for path in (good, bad):
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "agent.cli",
                    "probe",
                    "-c",
                    str(path),
                    cwd=REPO,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, _ = await asyncio.wait_for(process.communicate(), 60)
                results += [process.returncode or 0, out.decode()]
            return results[0], results[1], results[2], results[3]  # type: ignore[return-value]

    good_code, good_out, bad_code, bad_out = uvloop.run(scenario())
    assert good_code == 0, good_out
    assert "press1  state_code" in good_out
    assert "6 of 6 tags good" in good_out
    assert bad_code == 1
    assert "cannot connect" in bad_out
    assert "6 of 12 tags good" in bad_out


async def test_control_channel_restart(tmp_path: Path) -> None:
    # The subprocess simulator's control channel is what the fault tests drive.
    port, control = free_port(), free_port()
    process = await asyncio.to_thread(start_simulator, port, control)
    try:
        from tests.fixtures.ports import port_accepts

        await async_wait_until(lambda: port_accepts("127.0.0.1", control), timeout=10)
        assert await send_control(control, "ping") == ""  # "ok" with nothing after it
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


async def test_run_without_devices_stops_cleanly(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    text = config_text(mosquitto, tmp_path / "data", [])
    async with running(settings_for(tmp_path, text)) as runtime:
        assert runtime.pollers == {}


async def test_runtime_write_and_read_go_through_the_device(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    from drivers.base import DriverFault

    writable = (
        '  [[devices.tags]]\n  name = "product_code"\n  address = "hr:200"\n  writable = true\n'
    )
    text = config_text(mosquitto, tmp_path / "data", [("press1", 0)]) + writable
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        text = text.replace("tcp://127.0.0.1:0", f"tcp://127.0.0.1:{sim.port}")
        async with running(settings_for(tmp_path, text)) as runtime:
            await async_wait_until(lambda: runtime.pollers["press1"].state == "up", timeout=10)
            assert await runtime.write("press1/product_code", 321) == 321
            assert sim.model(1).product_code == 321
            assert (await runtime.read("press1/product_code")).value == 321
            with pytest.raises(DriverFault, match="not a writable tag"):
                await runtime.write("press1/state_code", 1)
            with pytest.raises(DriverFault, match="not a writable tag"):
                await runtime.write("press9/x", 1)
