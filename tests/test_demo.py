"""`edge-agent demo` runs the simulators and an agent, shows OEE, and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
