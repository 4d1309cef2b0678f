"""`edge-agent demo` runs the simulators and an agent, shows OEE, and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.demo import shift_label
from agent.oee.calendar import ShiftWindow, window_at
from agent.settings.loader import load_agent_settings
from tests.fixtures.collector import TopicCollector
from tests.fixtures.mosquitto import MosquittoBroker

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_for_20_seconds_with_oee(mosquitto: MosquittoBroker) -> None:
    env = {**os.environ, "EDGE_AGENT__MQTT__URL": mosquitto.url}
    with TopicCollector(mosquitto, "demo/assembly/line1/#") as seen:
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", "demo", "--duration", "20"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        topics = set(seen.snapshot())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert "availability" in out
    assert "performance" in out
    last = out.rsplit("edge-agent demo: gateway", 1)[1]
    assert "press " in last
    assert "filler " in last
    assert "%" in last  # OEE figures, not only dashes
    assert "connected to" in out
    assert "outbox:" in last
    assert out.rstrip().endswith("edge-agent demo: stopped")
    assert "demo/assembly/line1/press/oee" in topics
    assert "demo/assembly/line1/filler/state" in topics


def test_packaged_demo_config_is_config_demo_toml() -> None:
    assert (REPO / "agent" / "data" / "demo.toml").read_text() == (
        REPO / "config" / "demo.toml"
    ).read_text()


def _minutes_of_a_day(day: datetime) -> list[float]:
    return [(day + timedelta(minutes=m)).timestamp() for m in range(24 * 60)]


def test_demo_calendar_is_planned_time_at_every_minute_of_the_day() -> None:
    # A demo started in a break would show only dashes (a break has no planned time): the
    # demo's test failed in CI at 10:07 UTC, inside the old 10:00-10:15 break.
    settings = load_agent_settings(REPO / "config" / "demo.toml")
    for machine in settings.machines:
        calendar = next(c for c in settings.calendars if c.name == machine.calendar)
        for day in (datetime(2026, 11, 29, tzinfo=UTC), datetime(2026, 3, 29, tzinfo=UTC)):
            unplanned = [
                ts
                for ts in _minutes_of_a_day(day)
                if not any(
                    start <= ts < end
                    for start, end in window_at(calendar, ts).planned  # type: ignore[union-attr]
                )
            ]
            assert unplanned == [], f"{machine.name}: no planned time at {unplanned[:3]}"


_EARLY = ShiftWindow(
    name="early",
    day=datetime(2026, 11, 29).date(),
    start=1000.0,
    end=2000.0,
    breaks=((1400.0, 1500.0),),
    planned=((1000.0, 1400.0), (1500.0, 2000.0)),
)


@pytest.mark.parametrize(
    ("window", "now", "label"),
    [
        (None, 1200.0, ""),
        (_EARLY, 1000.0, "early"),
        (_EARLY, 1399.9, "early"),
        (_EARLY, 1400.0, "early, break"),
        (_EARLY, 1499.9, "early, break"),
        (_EARLY, 1500.0, "early"),
    ],
)
def test_shift_label_says_when_the_figures_are_blank_for_a_break(
    window: ShiftWindow | None, now: float, label: str
) -> None:
    assert shift_label(window, now) == label
