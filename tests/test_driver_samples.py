"""Every registered driver has its folder with a README and a sample.toml whose devices and
tags `edge-agent check` accepts as written (appended to a minimal gateway header)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.settings.loader import load_agent_settings
from drivers.registry import DRIVERS

REPO = Path(__file__).resolve().parent.parent
HEADER = """
[gateway]
id = "gw1"
site = "plant1"
area = "assembly"
line = "line3"
data_dir = "/tmp/edge-agent-sample"

[mqtt]
url = "mqtt://127.0.0.1:1883"
"""


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_every_driver_has_a_folder_with_readme_and_sample(driver: str) -> None:
    folder = REPO / "drivers" / driver
    assert (folder / "README.md").is_file()
    assert (folder / "sample.toml").is_file()
    assert (folder / "driver.py").is_file()
    assert (
        DRIVERS[driver].driver == f"drivers.{driver}.driver:{DRIVERS[driver].driver.split(':')[1]}"
    )


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_the_sample_passes_check(driver: str, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(HEADER + (REPO / "drivers" / driver / "sample.toml").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check", "-c", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    settings = load_agent_settings(config, environ={})
    assert settings.devices
    assert {type(device) for device in settings.devices} == {DRIVERS[driver].config}
    assert all(device.tag_list() for device in settings.devices)
