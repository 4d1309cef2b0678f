"""The shipped systemd files: the settings the daemon relies on, `systemd-analyze verify`,
the `systemd-analyze security` exposure score (<= 1.5), and the sysusers.d / tmpfiles.d
snippets applied to a temporary root. Works without systemd as PID 1 (a container): every
systemd tool runs offline against a temporary root."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.daemon.runtime import SHUTDOWN_GRACE
from agent.settings.gateway import GatewayConfig

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
UNITS = ("edge-agent.service", "edge-agent-ingest.service")
MAX_EXPOSURE = 1.5

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def settings_of(unit: str) -> dict[str, list[str]]:
    """Every Key=value of a unit file (keys may repeat), sections merged."""
    values: dict[str, list[str]] = {}
    for raw in (SYSTEMD / unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key, []).append(value)
    return values


def seconds(value: str) -> float:
    """A systemd time span such as 30s, 2min or 1min 30s, in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


def test_agent_unit_has_what_the_daemon_relies_on() -> None:
    unit = settings_of("edge-agent.service")
    assert unit["Type"] == ["notify"]
    assert unit["ExecStart"] == [
        "/opt/edge-agent/venv/bin/edge-agent run -c /etc/edge-agent/agent.toml"
    ]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["User"] == ["edge-agent"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == ["2"]  # a bad config must not restart-loop
    assert seconds(unit["WatchdogSec"][0]) >= 10
    # The drain (SHUTDOWN_GRACE) plus the MQTT close must fit well inside the stop timeout.
    assert seconds(unit["TimeoutStopSec"][0]) >= 4 * SHUTDOWN_GRACE
    assert unit["StateDirectory"] == ["edge-agent"]
    assert unit["ConfigurationDirectory"] == ["edge-agent"]
    assert "mqtt.password:/etc/edge-agent/mqtt.password" in unit["LoadCredential"]
    # The data lives where the config's default points (written as in a file: text).
    assert Path(GatewayConfig.model_fields["data_dir"].default) == Path("/var/lib/edge-agent")
    assert unit["WorkingDirectory"] == ["/var/lib/edge-agent"]
    # Serial ports stay reachable: no PrivateDevices=, a closed policy with the tty groups.
    assert "PrivateDevices" not in unit
    assert unit["DevicePolicy"] == ["closed"]
    assert {"char-ttyS rw", "char-ttyUSB rw", "char-ttyACM rw"} <= set(unit["DeviceAllow"])
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]


def test_ingest_unit_is_the_central_counterpart() -> None:
    unit = settings_of("edge-agent-ingest.service")
    assert unit["Type"] == ["notify"]
    assert unit["ExecStart"] == [
        "/opt/edge-agent/venv/bin/edge-agent ingest -c /etc/edge-agent/central.toml"
    ]
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == ["2"]
    assert "WatchdogSec" in unit
    assert unit["PrivateDevices"] == ["yes"]
    assert "ExecReload" not in unit  # the ingest has no reload: `systemctl reload` refuses


def test_snippets_agree_with_the_units() -> None:
    sysusers = (SYSTEMD / "edge-agent.sysusers").read_text()
    assert re.search(r"^u\s+edge-agent\s", sysusers, re.MULTILINE)
    assert re.search(r"^m\s+edge-agent\s+dialout\s*$", sysusers, re.MULTILINE)
    tmpfiles = {
        fields[1]: fields[2:5]
        for line in (SYSTEMD / "edge-agent.tmpfiles").read_text().splitlines()
        if (fields := line.split()) and not line.startswith("#")
    }
    unit = settings_of("edge-agent.service")
    assert tmpfiles["/var/lib/edge-agent"] == [
        unit["StateDirectoryMode"][0],
        "edge-agent",
        "edge-agent",
    ]
    assert tmpfiles["/etc/edge-agent"] == [
        unit["ConfigurationDirectoryMode"][0],
        "root",
        "edge-agent",
    ]


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root with the shipped units, the host's standard units, stub executables."""
    root = tmp_path / "root"
    for system in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if system.is_dir():
            # verify resolves the units' dependencies (network-online.target, ...) in the root.
            shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
            break
    for stub in ("opt/edge-agent/venv/bin/edge-agent", "bin/kill"):
        path = root / stub
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in UNITS:
        shutil.copy(SYSTEMD / name, units / name)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


@needs_analyze
def test_systemd_analyze_verify_is_clean(unit_root: Path) -> None:
    result = analyze("verify", f"--root={unit_root}", "--man=no", "--generators=no", *UNITS)
    # Unknown keys and bad values are only warnings: any output at all is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_is_at_most_1_5(unit_root: Path, unit: str) -> None:
    result = analyze("security", "--offline=true", f"--root={unit_root}", "--no-pager", unit)
    assert result.returncode == 0, result.stderr
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    print(f"{unit}: exposure {score}")
    assert score <= MAX_EXPOSURE, result.stdout


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers / systemd-tmpfiles are not installed",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="files owned by another user need root")
def test_sysusers_and_tmpfiles_apply_to_a_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    conf = tmp_path / "edge-agent.conf"
    shutil.copy(SYSTEMD / "edge-agent.sysusers", conf)
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(conf)], check=True, timeout=60)
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/group").read_text().splitlines()
    }
    user = passwd["edge-agent"]
    assert user[5:] == ["/var/lib/edge-agent", "/usr/sbin/nologin"]
    assert "edge-agent" in groups["dialout"][3].split(",")
    subprocess.run(
        [
            "systemd-tmpfiles",
            f"--root={tmp_path}",
            "--create",
            str(SYSTEMD / "edge-agent.tmpfiles"),
        ],
        check=True,
        timeout=60,
    )
    uid, gid = int(user[2]), int(groups["edge-agent"][2])
    for path, mode, owner in (
        ("etc/edge-agent", 0o750, (0, gid)),
        ("etc/edge-agent/pki/trusted", 0o750, (0, gid)),
        ("var/lib/edge-agent", 0o750, (uid, gid)),
    ):
        stat = (tmp_path / path).stat()
        assert (stat.st_mode & 0o7777, (stat.st_uid, stat.st_gid)) == (mode, owner), path
