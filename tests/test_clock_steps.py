"""Wall-clock steps while the agent runs (issue #25): stepped back 1 h, then forward 1 h, by
injecting the clock (every wall-clock read of the agent is `time.time()`; the monotonic clock
stays real, as after an NTP step). Polling, commits, the MQTT session and its timeouts go on
(they run on the monotonic clock), each step is detected once and recorded as an `agent`
`clock_step` event where it happened, and no reported duration is negative."""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import time
from pathlib import Path

import pytest

from agent.daemon.clock import ClockStepWatch
from simulators.modbus.server import ModbusSimulator
from sync.outbox.codec import KIND_CODES
from tests.fixtures.collector import TopicCollector
from tests.fixtures.daemon import ROOT, config_text, running, settings_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import async_wait_until

HOUR = 3600.0


def test_a_step_is_seen_once_and_slews_are_not() -> None:
    wall, mono = [1000.0], [50.0]
    watch = ClockStepWatch(wall=lambda: wall[0], monotonic=lambda: mono[0])
    wall[0] += 1.0004
    mono[0] += 1.0  # an NTP slew: 0.4 ms in a second
    assert watch.check() is None
    wall[0] += 1.0 - HOUR
    mono[0] += 1.0
    back = watch.check()
    assert back is not None
    assert back.kind == "agent"
    assert back.value == {"event": "clock_step", "step_s": -HOUR}
    assert back.ts == wall[0]  # stamped with the new wall time: where the jump is
    wall[0] += 1.0
    mono[0] += 1.0
    assert watch.check() is None  # the same step is not reported again
    wall[0] += 1.0 + HOUR
    mono[0] += 1.0
    forward = watch.check()
    assert forward is not None
    assert forward.value == {"event": "clock_step", "step_s": HOUR}
    assert watch.steps == 2


@pytest.mark.slow
async def test_steps_back_and_forward_while_running(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    offset = [0.0]
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + offset[0])
    health_topic = f"{ROOT}/_agent/health"
    async with ModbusSimulator(port=0, seed=3, speed=4.0) as sim:
        settings = settings_for(
            tmp_path,
            config_text(mosquitto, tmp_path / "data", [("press1", sim.port)]).replace(
                '[mqtt]\nurl = "', '[mqtt]\nhealth_interval = "200ms"\nurl = "'
            ),
        )
        with TopicCollector(mosquitto, health_topic) as seen:
            async with running(settings) as runtime:

                def committed() -> int:
                    messages = seen.on_topic(health_topic)
                    return int(messages[-1].json()["committed_seq"]) if messages else 0

                async def commits_beyond(seq: int) -> None:
                    await async_wait_until(
                        lambda: committed() > seq + 5, timeout=20, message=f"commits > {seq}"
                    )

                await commits_beyond(0)
                offset[0] = -HOUR  # stepped back
                await async_wait_until(
                    lambda: runtime.clock.steps == 1, timeout=10, message="step back seen"
                )
                await commits_beyond(committed())
                offset[0] = 0.0  # and forward again
                await async_wait_until(
                    lambda: runtime.clock.steps == 2, timeout=10, message="step forward seen"
                )
                await commits_beyond(committed())
                gateway = runtime._running()
                assert gateway.mqtt.stats.connects == 1  # keep-alive and acks never timed out
                assert gateway.mqtt.stats.lost == 0
                assert gateway.devices.pollers["press1"].state == "up"
                for message in seen.on_topic(health_topic):
                    oldest = message.json()["oldest_unacked_s"]
                    assert oldest is None or oldest >= 0
                metrics = runtime.metrics.render().decode()
                assert "edge_agent_clock_steps_total 2.0" in metrics
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "outbox.db")) as db:
        rows = db.execute(
            "SELECT seq, ts, value FROM events WHERE kind = ? ORDER BY seq", (KIND_CODES["agent"],)
        ).fetchall()
        samples = db.execute(
            "SELECT seq, ts FROM events WHERE kind = ? ORDER BY seq", (KIND_CODES["sample"],)
        ).fetchall()
    steps = [(seq, ts, json.loads(value)) for seq, ts, value in rows if "clock_step" in value]
    assert [round(value["step_s"] / HOUR) for _, _, value in steps] == [-1, 1]
    (back_seq, back_ts, _), (forward_seq, forward_ts, _) = steps
    # The samples' timestamps jump where the clock_step events sit (checked once a second:
    # an event follows the first jumped sample within about a second).
    jumps = [
        (seq, ts, ts - previous)
        for (_, previous), (seq, ts) in itertools.pairwise(samples)
        if abs(ts - previous) > HOUR / 2
    ]
    assert [round(delta / HOUR) for _, _, delta in jumps] == [-1, 1], jumps
    (back_jump_seq, back_jump_ts, _), (forward_jump_seq, forward_jump_ts, _) = jumps
    assert back_jump_seq < back_seq
    assert 0 <= back_ts - back_jump_ts < 2.5
    assert forward_jump_seq < forward_seq
    assert 0 <= forward_ts - forward_jump_ts < 2.5
