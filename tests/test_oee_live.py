"""Live OEE in the running daemon: machine state and OEE topics, the engine clock."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.oee.live import REANCHOR_STEP, EngineClock, LiveOee
from agent.settings.loader import load_agent_settings
from drivers.base import Reading
from simulators.modbus.server import ModbusSimulator
from tests.fixtures.collector import TopicCollector
from tests.fixtures.daemon import ROOT, config_text, machine_config, running, settings_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import async_wait_until

MACHINE = machine_config("line_press")

OEE_KEYS = {
    "machine",
    "window",
    "availability",
    "performance",
    "quality",
    "oee",
    "planned_busy_time_s",
    "actual_production_time_s",
    "unplanned_downtime_s",
    "produced_quantity",
    "good_quantity",
    "reject_quantity",
    "microstops",
    "mtbf_s",
    "mttr_s",
}


async def test_state_and_oee_topics(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        sim.model(1).force_state(1)
        text = config_text(mosquitto, tmp_path / "data", [("press1", sim.port)]) + MACHINE
        settings = settings_for(tmp_path, text)
        with TopicCollector(mosquitto, f"{ROOT}/line_press/#") as seen:
            async with running(settings):
                state = await asyncio.to_thread(
                    seen.wait_for, f"{ROOT}/line_press/state", lambda p: p["state"] == "running"
                )
                sim.model(1).force_state(2, fault_code=3)
                stopped = await asyncio.to_thread(
                    seen.wait_for,
                    f"{ROOT}/line_press/state",
                    lambda p: p["state"] == "unplanned_stop",
                )
                shift = await asyncio.to_thread(
                    seen.wait_for,
                    f"{ROOT}/line_press/oee",
                    lambda p: p["window"]["kind"] == "shift",
                )
                rolling = await asyncio.to_thread(
                    seen.wait_for,
                    f"{ROOT}/line_press/oee/rolling",
                    lambda p: p["window"]["kind"] == "rolling",
                )
    assert set(state.json()) == {"ts", "state", "code"}
    assert state.json()["code"] == 1
    assert stopped.json()["code"] == 2
    record = shift.json()
    assert set(record) >= OEE_KEYS
    assert record["machine"] == "line_press"
    assert record["window"]["name"] in ("day", "night")
    assert set(record["window"]) >= {"kind", "name", "start", "end"}
    assert set(rolling.json()) >= OEE_KEYS


def test_engine_clock_ignores_small_steps_and_never_goes_back() -> None:
    wall = [1000.0]
    mono = [50.0]
    clock = EngineClock(wall=lambda: wall[0], monotonic=lambda: mono[0])
    assert clock.now() == 1000.0
    mono[0] += 10
    wall[0] += 10 - 5  # NTP stepped the wall clock back by 5 s
    assert clock.now() == 1010.0  # elapsed time follows the monotonic clock
    wall[0] -= REANCHOR_STEP * 2  # a huge backwards step: re-anchored, but never backwards
    assert clock.now() == 1010.0
    mono[0] += 1
    assert clock.now() >= 1010.0
    wall[0] += REANCHOR_STEP * 10  # a huge forward step (clock fixed after boot)
    mono[0] += 1
    assert clock.now() == wall[0]
    assert clock.reanchors == 2


async def test_oee_diagnostics_are_on_metrics(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        sim.model(1).force_state(1)
        text = config_text(mosquitto, tmp_path / "data", [("press1", sim.port)]) + MACHINE
        settings = settings_for(tmp_path, text)
        http = int(settings.http.listen.rsplit(":", 1)[1])

        async def families() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
            body = await asyncio.to_thread(_get, http, "/metrics")
            found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
            for family in text_string_to_metric_families(body.decode()):
                for sample in family.samples:
                    labels = tuple(sorted(sample.labels.items()))
                    found.setdefault(sample.name, {})[labels] = sample.value
            return found

        async with running(settings) as runtime:
            await async_wait_until(lambda: runtime.pollers["press1"].polls >= 2, timeout=10)
            before = await families()
            machine = (("machine", "line_press"),)
            for name in (
                "clock_steps_back",
                "ignored_bad",
                "invalid_values",
                "rollovers",
                "resets",
                "late_parts",
            ):
                assert before[f"edge_agent_oee_{name}_total"][machine] == 0.0
            assert before["edge_agent_oee_clock_reanchors_total"][()] == 0.0
            # A stalled PLC: the device goes down, and its one bad reading per tag reaches the
            # engine, which ignores it (state and counter: two readings).
            sim.stall()
            await async_wait_until(lambda: runtime.pollers["press1"].state != "up", timeout=15)
            after = await families()
            assert after["edge_agent_oee_ignored_bad_total"][machine] == 2.0


def test_live_oee_feeds_the_product_tag(tmp_path: Path) -> None:
    # The live task routes the product tag's readings to the engine: 06:00-07:00 product 1
    # (1.2 s) makes 3,000 parts, 07:00-08:00 product 2 (0.8 s) 4,500.
    from tests.test_replay import PRODUCT_CONFIG

    path = tmp_path / "agent.toml"
    path.write_text(PRODUCT_CONFIG, encoding="utf-8")
    settings = load_agent_settings(path)
    wall = [ROOT_TIME]
    clock = EngineClock(wall=lambda: wall[0], monotonic=lambda: wall[0])

    async def emit(events: object) -> None:
        return None

    live = LiveOee(settings, publish=lambda topic, payload: None, emit=emit, clock=clock)

    def poll(**values: int) -> None:
        live.observe(
            "press1", [Reading(tag, value, "good", wall[0]) for tag, value in values.items()]
        )

    poll(product_code=1, state_code=1, total_count=0, reject_count=0)
    wall[0] += 3600
    poll(product_code=2, state_code=1, total_count=3000, reject_count=0)
    wall[0] += 3600
    poll(product_code=2, state_code=1, total_count=7500, reject_count=0)
    engine = live.engine("press1")
    assert engine is not None
    record = engine.report_shift()
    assert record is not None
    produced = {key: p["produced"] for key, p in record["products"].items()}
    assert produced == {"1": 3000, "2": 4500}
    assert record["performance"] == pytest.approx((1.2 * 3000 + 0.8 * 4500) / 7200)


ROOT_TIME = 1772431200.0  # Monday 2026-03-02 06:00Z


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        body: bytes = response.read()
        return body
