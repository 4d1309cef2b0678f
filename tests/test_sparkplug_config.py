"""`[sparkplug]` (issue #23): ids checked against Sparkplug's topic rules by `check` and at
every load, with the line; defaults (edge node id = gateway.id, the [mqtt] broker); a gateway
with it off does not load the node (issue #22, RSS)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.daemon.reload import needs_restart
from agent.settings.config_file import AgentSettings
from agent.settings.loader import ConfigError, load_agent_settings
from agent.settings.sparkplug import id_problem
from tests.fixtures.daemon import REPO, config_text, sparkplug_config
from tests.fixtures.mosquitto import MosquittoBroker

BASE = """
[gateway]
id = "plant1-line3"
site = "plant1"
area = "assembly"
line = "line3"

[mqtt]
url = "mqtt://127.0.0.1:18830"

[sparkplug]
enabled = true
group_id = "plant1"

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:15020"
  [[devices.tags]]
  name = "count"
  address = "hr:0"

[[machines]]
name = "press1m"
state = { tag = "press1/count", running = [1] }
total_count = "press1/count"
ideal_cycle_time = "2s"
calendar = "always"

[[calendars]]
name = "always"
timezone = "UTC"
shifts = [{ name = "day", start = "06:00", end = "14:00", days = "mon-sun" }]
"""


def load(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    try:
        load_agent_settings(path, environ={})
    except ConfigError as exc:
        return exc.problems
    return []


def test_defaults(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BASE)
    settings = load_agent_settings(path, environ={})
    assert settings.sparkplug.enabled
    assert settings.sparkplug_edge_node_id == "plant1-line3"
    assert settings.sparkplug.broker is None
    assert settings.sparkplug.commands == "off"
    assert settings.sparkplug.primary_host_id is None
    path.write_text(
        BASE.replace('group_id = "plant1"', 'group_id = "plant1"\ncommands = "writable"')
    )
    assert load_agent_settings(path, environ={}).sparkplug.commands == "writable"


def test_disabled_by_default(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BASE.replace("enabled = true\n", "").replace('group_id = "plant1"\n', ""))
    assert not load_agent_settings(path, environ={}).sparkplug.enabled


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'group_id = "plant1"',
            'group_id = ""',
            "sparkplug.group_id: required when [sparkplug] is enabled",
        ),
        (
            'group_id = "plant1"',
            'group_id = "plant/1"',
            "sparkplug.group_id: 'plant/1' is not a valid Sparkplug group id: no '/' (topic level rules)",
        ),
        (
            'group_id = "plant1"',
            'group_id = "plant+#"',
            "sparkplug.group_id: 'plant+#' is not a valid Sparkplug group id: no '#', '+' (topic level rules)",
        ),
        (
            'group_id = "plant1"',
            'group_id = "plant1"\nedge_node_id = "line 3"',
            "sparkplug.edge_node_id: 'line 3' is not a valid Sparkplug edge node id: no ' ' (topic level rules)",
        ),
        (
            'group_id = "plant1"',
            'group_id = "plant1"\nprimary_host_id = "scada/main"',
            "sparkplug.primary_host_id: 'scada/main' is not a valid Sparkplug host id: no '/' (topic level rules)",
        ),
        (
            'group_id = "plant1"',
            'group_id = "plant1"\ncommands = "all"',
            "sparkplug.commands: unknown value 'all'; one of: off, writable",
        ),
        ('group_id = "plant1"', 'group_id = "plant1"\ncolour = 1', "sparkplug.colour: unknown key"),
        (
            'name = "press1m"',
            'name = "press1"',
            "machines[0].name: machine 'press1' has a device's name; with [sparkplug] enabled both are Sparkplug devices, whose ids must differ",
        ),
        (
            'group_id = "plant1"',
            'group_id = "plant1"\n[sparkplug.broker]\nurl = "mqtt://u:p@h"',
            "sparkplug.broker.url: 'mqtt://u:***@h': credentials do not belong in the URL; set username and password_file",
        ),
        (
            'group_id = "plant1"',
            'group_id = "plant1"\n[sparkplug.broker]\nurl = "mqtt://h"\npassword = "x"',
            "sparkplug.broker.username: required when a password is given",
        ),
    ],
)
def test_problems(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in BASE
    problems = load(tmp_path, BASE.replace(old, new, 1))
    assert any(problem.startswith(message) for problem in problems), problems


def test_own_broker(tmp_path: Path) -> None:
    text = BASE.replace(
        'group_id = "plant1"',
        'group_id = "plant1"\n[sparkplug.broker]\nurl = "mqtts://spb.plant.local"\nclient_id = "spb-1"',
    )
    path = tmp_path / "agent.toml"
    path.write_text(text)
    broker = load_agent_settings(path, environ={}).sparkplug.broker
    assert broker is not None
    assert (broker.host, broker.port, broker.tls, broker.client_id) == (
        "spb.plant.local",
        8883,
        True,
        "spb-1",
    )


def test_ids_not_checked_when_disabled(tmp_path: Path) -> None:
    assert (
        load(
            tmp_path,
            BASE.replace("enabled = true", "enabled = false").replace(
                'group_id = "plant1"', 'group_id = "a/b"'
            ),
        )
        == []
    )


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("plant1", True),
        ("Werk-Süd.3", True),
        ("", False),
        ("a/b", False),
        ("a\x00b", False),
        ("a\tb", False),
        ("x" * 257, False),
    ],
)
def test_id_rules(value: str, ok: bool) -> None:
    assert (id_problem(value, "group id") is None) == ok


def test_reload_restarts_when_sparkplug_announces_the_change(tmp_path: Path) -> None:
    """With Sparkplug on, a reload that changes devices or machines restarts inside the process
    (new births announce them); without it, devices change in place as before."""

    def settings(text: str) -> AgentSettings:
        path = tmp_path / "agent.toml"
        path.write_text(text)
        return load_agent_settings(path, environ={})

    renamed = BASE.replace('name = "count"', 'name = "count2"').replace(
        "press1/count", "press1/count2"
    )
    assert needs_restart(settings(BASE), settings(renamed))
    off = BASE.replace("enabled = true", "enabled = false")
    off_renamed = renamed.replace("enabled = true", "enabled = false")
    assert not needs_restart(settings(off), settings(off_renamed))
    assert needs_restart(settings(off), settings(BASE))  # [sparkplug] itself changed


# A daemon in a process of its own: what it imported is not hidden by what this test process
# (whose other tests use the node) has loaded already.
LOADED_MODULES = """
import sys
from pathlib import Path

import uvloop

from tests.fixtures.daemon import running, settings_for


async def main() -> None:
    async with running(settings_for(Path(sys.argv[1]), sys.stdin.read())):
        prefixes = ("google.protobuf", "sync.sparkplug", "sync.uplink.sparkplug")
        print(" ".join(sorted(name for name in sys.modules if name.startswith(prefixes))))


uvloop.run(main())
"""


@pytest.mark.parametrize("enabled", [False, True])
def test_a_gateway_without_sparkplug_does_not_load_it(
    tmp_path: Path, mosquitto: MosquittoBroker, enabled: bool
) -> None:
    # The node's modules and protobuf are about 2 MiB of RSS (docs/performance.md).
    text = config_text(mosquitto, tmp_path / "data", [])
    if enabled:
        text = sparkplug_config(text, group_id="plant1")
    result = subprocess.run(
        [sys.executable, "-c", LOADED_MODULES, str(tmp_path)],
        input=text,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    if enabled:
        assert {"google.protobuf", "sync.uplink.sparkplug.node"} <= set(loaded)
    else:
        assert loaded == []
