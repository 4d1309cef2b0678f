"""Config loading and `edge-agent check`: table-driven invalid configs, env, secrets, files."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.central.settings import load_central_settings
from agent.cli import main
from agent.settings.loader import ConfigError, load_agent_settings
from agent.settings.schema import agent_schema
from sync.central.batch import EventTimeWindow

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "config"

BASE = """\
[gateway]
id = "plant1-line3"
site = "plant1"
area = "assembly"
line = "line3"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[buffer]
max_size = "64MiB"

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:5020"
poll_interval = "1s"

  [[devices.tags]]
  name = "state_code"
  address = "hr:100"
  type = "uint16"

  [[devices.tags]]
  name = "total_count"
  address = "hr:102"
  type = "uint32"

  [[devices.tags]]
  name = "reject_count"
  address = "hr:104"
  type = "uint32"

  [[devices.tags]]
  name = "temperature"
  address = "ir:0"
  type = "int16"
  scale = 0.1

  [[devices.tags]]
  name = "product_code"
  address = "hr:200"
  type = "uint16"
  writable = true

  [[devices.tags]]
  name = "start"
  address = "co:0"
  type = "bool"
  writable = true

[[devices]]
name = "filler"
driver = "opcua"
url = "opc.tcp://127.0.0.1:4840"

  [[devices.tags]]
  name = "state_code"
  node_id = "ns=2;s=Filler.State"

[[machines]]
name = "press1"
state = { tag = "press1/state_code", running = [1], planned_stop = [3], unplanned_stop = [2, 4] }
total_count = "press1/total_count"
reject_count = "press1/reject_count"
ideal_cycle_time = "1.2s"
calendar = "two-shifts"

[[calendars]]
name = "two-shifts"
timezone = "Europe/Berlin"
shifts = [
  { name = "early", start = "06:00", end = "14:00", days = "mon-fri", breaks = [["09:00", "09:15"]] },
  { name = "late", start = "14:00", end = "22:00", days = "mon-fri" },
]

[[workflows]]
name = "start_order"
params = { product = "int:1..9999" }
steps = [
  { write = "press1/product_code", value = "{product}" },
  { write = "press1/start", value = true, compensate_value = false },
  { wait = "press1/state_code", value = 1, timeout = "30s" },
  { confirm = "central", timeout = "10s" },
]
"""


def _write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check", "-c", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_base_config_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _check(_write(tmp_path, BASE), capsys)
    assert (code, err) == (0, "")
    assert "devices: 2 (modbus 1, opcua 1), tags: 7 (2 writable)" in out
    assert "machines: 1, calendars: 1, workflows: 1" in out


def test_loaded_values_are_parsed_once(tmp_path: Path) -> None:
    settings = load_agent_settings(_write(tmp_path, BASE))
    assert settings.buffer.max_size == 64 * 1024 * 1024
    assert settings.devices[0].poll_interval == 1.0
    assert settings.machines[0].ideal_cycle_time == pytest.approx(1.2)
    assert settings.mqtt.topic_root == "plant1/assembly/line3"
    assert settings.sync_topic_base == "edge/plant1-line3"
    assert settings.client_id == "edge-agent-plant1-line3"
    assert settings.http.listen == "127.0.0.1:9108"
    with pytest.raises(Exception, match="frozen"):
        settings.gateway.id = "other"  # type: ignore[misc]


# (case id, old text -> new text (or appended text when old is ""), expected path in message)
INVALID: list[tuple[str, str, str, str]] = [
    ("gateway-id-chars", 'id = "plant1-line3"', 'id = "plant1 line3!"', "gateway.id"),
    ("gateway-id-long", 'id = "plant1-line3"', f'id = "{"x" * 65}"', "gateway.id"),
    ("gateway-missing-site", 'site = "plant1"\n', "", "gateway.site"),
    ("mqtt-scheme", 'url = "mqtt://127.0.0.1:1883"', 'url = "http://127.0.0.1:1883"', "mqtt.url"),
    ("mqtt-no-host", 'url = "mqtt://127.0.0.1:1883"', 'url = "mqtt://:1883"', "mqtt.url"),
    ("mqtt-unknown-key", "[buffer]", "qos = 2\n\n[buffer]", "mqtt.qos"),
    ("mqtt-topic-root-wildcard", "[buffer]", 'topic_root = "a/+/b"\n\n[buffer]', "mqtt.topic_root"),
    ("mqtt-tls-files-without-mqtts", "[buffer]", 'ca_file = "/x.pem"\n\n[buffer]', "mqtt.ca_file"),
    ("mqtt-password-without-user", "[buffer]", 'password = "x"\n\n[buffer]', "mqtt.username"),
    ("buffer-size-no-unit", 'max_size = "64MiB"', "max_size = 64", "buffer.max_size"),
    ("buffer-size-bad-unit", 'max_size = "64MiB"', 'max_size = "64XB"', "buffer.max_size"),
    ("unknown-section", "", "\n[telemetry]\nx = 1\n", "telemetry"),
    ("duration-no-unit", 'poll_interval = "1s"', "poll_interval = 1", "devices[0].poll_interval"),
    (
        "duration-garbage",
        'poll_interval = "1s"',
        'poll_interval = "1 sec"',
        "devices[0].poll_interval",
    ),
    ("duration-zero", 'poll_interval = "1s"', 'poll_interval = "0s"', "devices[0].poll_interval"),
    ("device-unknown-driver", 'driver = "opcua"', 'driver = "profinet"', "devices[1].driver"),
    ("device-missing-driver", 'driver = "opcua"\n', "", "devices[1].driver"),
    ("device-duplicate-name", 'name = "filler"', 'name = "press1"', "devices[1].name"),
    ("device-name-slash", 'name = "filler"', 'name = "fill/er"', "devices[1].name"),
    ("modbus-url-scheme", 'url = "tcp://127.0.0.1:5020"', 'url = "udp://x:502"', "devices[0].url"),
    (
        "modbus-rtu-bad-parity",
        'url = "tcp://127.0.0.1:5020"',
        'url = "rtu:///dev/ttyS0?parity=X"',
        "devices[0].url",
    ),
    (
        "modbus-rtu-unit-0",
        'url = "tcp://127.0.0.1:5020"',
        'url = "rtu:///dev/ttyS0"\nunit_id = 0',
        "devices[0].unit_id",
    ),
    (
        "modbus-unit-range",
        'poll_interval = "1s"',
        'poll_interval = "1s"\nunit_id = 300',
        "devices[0].unit_id",
    ),
    (
        "modbus-typo-key",
        'poll_interval = "1s"',
        'poll_intervall = "1s"',
        "devices[0].poll_intervall",
    ),
    (
        "tag-duplicate-name",
        'name = "total_count"',
        'name = "state_code"',
        "devices[0].tags[1].name",
    ),
    ("tag-bad-area", 'address = "hr:102"', 'address = "xr:102"', "devices[0].tags[1].address"),
    (
        "tag-negative-offset",
        'address = "hr:102"',
        'address = "hr:-1"',
        "devices[0].tags[1].address",
    ),
    (
        "tag-offset-range",
        'address = "hr:102"',
        'address = "hr:70000"',
        "devices[0].tags[1].address",
    ),
    (
        "tag-count-past-end",
        'address = "hr:102"\n  type = "uint32"',
        'address = "hr:65534"\n  type = "uint64"',
        "devices[0].tags[1].address",
    ),
    ("tag-unknown-type", 'type = "int16"', 'type = "int24"', "devices[0].tags[3].type"),
    ("tag-string-needs-length", 'type = "int16"', 'type = "string"', "devices[0].tags[3].length"),
    (
        "tag-length-on-int",
        'type = "int16"',
        'type = "int16"\n  length = 4',
        "devices[0].tags[3].length",
    ),
    (
        "tag-coil-not-bool",
        'address = "co:0"\n  type = "bool"',
        'address = "co:0"\n  type = "uint16"',
        "devices[0].tags[5].type",
    ),
    (
        "tag-writable-input-register",
        'address = "ir:0"',
        'address = "ir:0"\n  writable = true',
        "devices[0].tags[3].writable",
    ),
    (
        "tag-scale-on-bool",
        'type = "bool"',
        'type = "bool"\n  scale = 2.0',
        "devices[0].tags[5].scale",
    ),
    (
        "tag-bit-index-range",
        'address = "hr:102"',
        'address = "hr:102.16"',
        "devices[0].tags[1].address",
    ),
    (
        "tag-negative-deadband",
        "scale = 0.1",
        "scale = 0.1\n  deadband = -1.0",
        "devices[0].tags[3].deadband",
    ),
    (
        "opcua-mode-needs-policy",
        'url = "opc.tcp://127.0.0.1:4840"',
        'url = "opc.tcp://127.0.0.1:4840"\nsecurity_mode = "SignAndEncrypt"\nserver_certificate = "/x.der"',
        "devices[1].security_policy",
    ),
    (
        "opcua-policy-needs-mode",
        'url = "opc.tcp://127.0.0.1:4840"',
        'url = "opc.tcp://127.0.0.1:4840"\nsecurity_policy = "Basic256Sha256"',
        "devices[1].security_mode",
    ),
    (
        "opcua-secure-needs-server-cert",
        'url = "opc.tcp://127.0.0.1:4840"',
        'url = "opc.tcp://127.0.0.1:4840"\nsecurity_policy = "Basic256Sha256"\nsecurity_mode = "Sign"',
        "devices[1].server_certificate",
    ),
    (
        "opcua-unknown-policy",
        'url = "opc.tcp://127.0.0.1:4840"',
        'url = "opc.tcp://127.0.0.1:4840"\nsecurity_policy = "Basic128Rsa15"',
        "devices[1].security_policy",
    ),
    (
        "opcua-bad-url",
        'url = "opc.tcp://127.0.0.1:4840"',
        'url = "http://127.0.0.1:4840"',
        "devices[1].url",
    ),
    (
        "opcua-bad-node-id",
        'node_id = "ns=2;s=Filler.State"',
        'node_id = "Filler.State"',
        "devices[1].tags[0].node_id",
    ),
    (
        "opcua-bad-mode",
        'node_id = "ns=2;s=Filler.State"',
        'node_id = "ns=2;s=Filler.State"\n  mode = "push"',
        "devices[1].tags[0].mode",
    ),
    (
        "machine-unknown-device",
        'total_count = "press1/total_count"',
        'total_count = "press9/total_count"',
        "machines[0].total_count",
    ),
    (
        "machine-unknown-tag",
        'reject_count = "press1/reject_count"',
        'reject_count = "press1/rejects"',
        "machines[0].reject_count",
    ),
    (
        "machine-bad-ref",
        'total_count = "press1/total_count"',
        'total_count = "total_count"',
        "machines[0].total_count",
    ),
    (
        "machine-float-counter",
        'total_count = "press1/total_count"',
        'total_count = "press1/temperature"',
        "machines[0].total_count",
    ),
    (
        "machine-both-good-and-reject",
        'calendar = "two-shifts"',
        'calendar = "two-shifts"\ngood_count = "press1/total_count"',
        "machines[0].good_count",
    ),
    (
        "machine-unknown-calendar",
        'calendar = "two-shifts"',
        'calendar = "three-shifts"',
        "machines[0].calendar",
    ),
    (
        "machine-state-code-twice",
        "unplanned_stop = [2, 4]",
        "unplanned_stop = [2, 1]",
        "machines[0].state.unplanned_stop",
    ),
    (
        "machine-state-code-string-for-int-tag",
        "running = [1]",
        'running = ["1"]',
        "machines[0].state.running[0]",
    ),
    (
        "machine-state-code-bool-for-int-tag",
        "unplanned_stop = [2, 4]",
        "unplanned_stop = [2, true]",
        "machines[0].state.unplanned_stop[1]",
    ),
    (
        "machine-bool-counter",
        'total_count = "press1/total_count"',
        'total_count = "press1/start"',
        "machines[0].total_count",
    ),
    (
        "machine-product-key-not-an-integer",
        'calendar = "two-shifts"',
        'calendar = "two-shifts"\nproduct = "press1/product_code"\n'
        'ideal_cycle_times = { "1" = "1s", "A" = "2s" }',
        "machines[0].ideal_cycle_times.A",
    ),
    (
        "machine-product-key-not-as-read",
        'calendar = "two-shifts"',
        'calendar = "two-shifts"\nproduct = "press1/product_code"\n'
        'ideal_cycle_times = { "07" = "1s" }',
        "machines[0].ideal_cycle_times.07",
    ),
    (
        "machine-product-cycle-time-zero",
        'calendar = "two-shifts"',
        'calendar = "two-shifts"\nproduct = "press1/product_code"\n'
        'ideal_cycle_times = { "1" = "0s" }',
        "machines[0].ideal_cycle_times.1",
    ),
    (
        "machine-cycle-times-need-product",
        'calendar = "two-shifts"',
        'calendar = "two-shifts"\nideal_cycle_times = { "1" = "1s" }',
        "machines[0].ideal_cycle_times",
    ),
    (
        "machine-product-float-tag",
        'calendar = "two-shifts"',
        'calendar = "two-shifts"\nproduct = "press1/temperature"',
        "machines[0].product",
    ),
    (
        "machine-product-unknown-tag",
        'calendar = "two-shifts"',
        'calendar = "two-shifts"\nproduct = "press1/recipe"',
        "machines[0].product",
    ),
    (
        "machine-cycle-time-no-unit",
        'ideal_cycle_time = "1.2s"',
        "ideal_cycle_time = 1.2",
        "machines[0].ideal_cycle_time",
    ),
    (
        "machine-topic-clash",
        'name = "state_code"\n  address = "hr:100"',
        'name = "state"\n  address = "hr:100"',
        "machines[0]",
    ),
    (
        "calendar-bad-timezone",
        'timezone = "Europe/Berlin"',
        'timezone = "Mars/Olympus"',
        "calendars[0].timezone",
    ),
    (
        "calendar-bad-time",
        'start = "14:00", end = "22:00"',
        'start = "14:00", end = "25:00"',
        "calendars[0].shifts[1].end",
    ),
    (
        "calendar-bad-days",
        'days = "mon-fri", breaks',
        'days = "monday-friday", breaks',
        "calendars[0].shifts[0].days",
    ),
    (
        "calendar-overlap",
        'start = "14:00", end = "22:00"',
        'start = "13:00", end = "22:00"',
        "calendars[0].shifts[1]",
    ),
    (
        "calendar-break-outside",
        '[["09:00", "09:15"]]',
        '[["15:00", "15:15"]]',
        "calendars[0].shifts[0].breaks[0]",
    ),
    (
        "calendar-duplicate-shift",
        '{ name = "late"',
        '{ name = "early"',
        "calendars[0].shifts[1].name",
    ),
    (
        "workflow-write-not-writable",
        '{ write = "press1/product_code"',
        '{ write = "press1/total_count"',
        "workflows[0].steps[0].write",
    ),
    (
        "workflow-write-unknown-tag",
        '{ write = "press1/product_code"',
        '{ write = "press1/nothing"',
        "workflows[0].steps[0].write",
    ),
    (
        "workflow-undeclared-param",
        'value = "{product}"',
        'value = "{prod}"',
        "workflows[0].steps[0].value",
    ),
    (
        "workflow-bad-param-type",
        'product = "int:1..9999"',
        'product = "integer"',
        "workflows[0].params",
    ),
    (
        "workflow-param-range-inverted",
        'product = "int:1..9999"',
        'product = "int:9999..1"',
        "workflows[0].params",
    ),
    (
        "workflow-step-two-kinds",
        '{ confirm = "central", timeout = "10s" }',
        '{ confirm = "central", write = "press1/start", timeout = "10s" }',
        "workflows[0].steps[3]",
    ),
    (
        "workflow-step-no-kind",
        '{ confirm = "central", timeout = "10s" }',
        '{ timeout = "10s" }',
        "workflows[0].steps[3]",
    ),
    (
        "workflow-step-not-a-table",
        '{ confirm = "central", timeout = "10s" }',
        "true",
        "workflows[0].steps[3]",
    ),
    (
        "workflow-confirm-not-central",
        'confirm = "central"',
        'confirm = "mes"',
        "workflows[0].steps[3].confirm",
    ),
    (
        "workflow-wait-needs-timeout",
        'value = 1, timeout = "30s"',
        "value = 1",
        "workflows[0].steps[2].timeout",
    ),
    (
        "workflow-bad-policy",
        'params = { product = "int:1..9999" }',
        'params = { product = "int:1..9999" }\non_uplink_failure = "retry"',
        "workflows[0].on_uplink_failure",
    ),
    (
        "workflow-type-mismatch",
        "value = true, compensate_value = false",
        'value = "yes", compensate_value = false',
        "workflows[0].steps[1].value",
    ),
    (
        "workflow-bad-rate",
        'params = { product = "int:1..9999" }',
        'params = { product = "int:1..9999" }\nrate_limit = "fast"',
        "workflows[0].rate_limit",
    ),
    ("workflow-no-steps", "steps = [", "steps = []\nold_steps = [", "workflows[0]"),
    (
        "workflow-duplicate-name",
        "",
        '\n[[workflows]]\nname = "start_order"\nsteps = [{ confirm = "central", timeout = "1s" }]\n',
        "workflows[1].name",
    ),
    (
        "workflow-confirm-live-only",
        'url = "mqtt://127.0.0.1:1883"',
        'url = "mqtt://127.0.0.1:1883"\nsync_enabled = false',
        "workflows[0].steps[3].confirm",
    ),
    ("http-bad-listen", "[buffer]", '[http]\nlisten = "localhost"\n\n[buffer]', "http.listen"),
]


def _mutate(old: str, new: str) -> str:
    if not old:
        return BASE + new
    assert old in BASE, f"test case text not in BASE: {old!r}"
    return BASE.replace(old, new, 1)


def test_there_are_at_least_thirty_invalid_cases() -> None:
    assert len(INVALID) >= 30
    assert len({case[0] for case in INVALID}) == len(INVALID)


@pytest.mark.parametrize(
    ("old", "new", "path"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_config_exits_2_naming_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, path: str
) -> None:
    code, out, err = _check(_write(tmp_path, _mutate(old, new)), capsys)
    assert code == 2, f"expected exit 2, got {code}: {out}{err}"
    lines = err.strip().splitlines()
    assert lines, "no problem reported"
    assert any(line.startswith(path) for line in lines), f"no line names {path!r}:\n{err}"
    assert "Traceback" not in err
    for line in lines:
        assert ": " in line, f"not a 'path: reason' line: {line!r}"


def test_machine_codes_and_products_matching_their_tags_are_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An integer product tag with integer keys; an OPC UA state tag (its type unknown) with
    # text codes: both accepted.
    text = BASE.replace(
        'calendar = "two-shifts"',
        'calendar = "two-shifts"\nproduct = "press1/product_code"\n'
        'ideal_cycle_times = { "1" = "1.2s", "-2" = "800ms" }',
        1,
    ).replace(
        'state = { tag = "press1/state_code", running = [1]',
        'state = { tag = "filler/state_code", running = ["RUN"]',
    )
    code, _, err = _check(_write(tmp_path, text), capsys)
    assert (code, err) == (0, "")
    settings = load_agent_settings(_write(tmp_path, text))
    assert settings.machines[0].ideal_cycle_time_of("-2") == pytest.approx(0.8)
    assert settings.machines[0].ideal_cycle_time_of("3") == pytest.approx(1.2)


def test_state_code_of_the_wrong_type_names_key_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = BASE.replace("running = [1]", 'running = ["1"]')
    line = next(i for i, row in enumerate(text.splitlines(), 1) if 'running = ["1"]' in row)
    code, _, err = _check(_write(tmp_path, text), capsys)
    assert code == 2
    assert (
        "machines[0].state.running[0]: code '1' is a string, but press1/state_code is an "
        f"integer tag: it never matches; write an integer like 1 (line {line})"
    ) in err


def test_problem_lines_name_the_toml_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = BASE.replace('address = "hr:102"', 'address = "xx:102"')
    line = text.splitlines().index('  address = "xx:102"') + 1
    _, _, err = _check(_write(tmp_path, text), capsys)
    assert "devices[0].tags[1].address: invalid Modbus address 'xx:102'" in err
    assert f"(line {line})" in err


def test_several_problems_are_all_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = BASE.replace('address = "hr:102"', 'address = "xx:102"').replace(
        'timezone = "Europe/Berlin"', 'timezone = "Nowhere/Here"'
    )
    code, _, err = _check(_write(tmp_path, text), capsys)
    assert code == 2
    assert "devices[0].tags[1].address" in err
    assert "calendars[0].timezone" in err


def test_unknown_key_suggests_the_close_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, err = _check(_write(tmp_path, BASE.replace("poll_interval", "pol_interval")), capsys)
    assert "devices[0].pol_interval: unknown key (did you mean 'poll_interval'?)" in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the file is empty"),
        (b"  \n\n", "the file is empty"),
        (b'[gateway]\nid = "a"\nsite = \xff\n', "agent.toml:3: not valid UTF-8"),
        (b"[gateway\nid = 1\n", "agent.toml:1: invalid TOML"),
        (b'[gateway]\nid = "a"\nid = "b"\n', "agent.toml:3: invalid TOML"),
        (b'[gateway]\nid = "a\n', "agent.toml:2: invalid TOML"),
        (b"key = [1, 2\n", "invalid TOML"),
    ],
    ids=["empty", "blank", "non-utf8", "bad-header", "duplicate-key", "open-string", "open-array"],
)
def test_unreadable_content_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, expected: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(content)
    code, _, err = _check(path, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err


def test_missing_file_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _check(tmp_path / "nope.toml", capsys)
    assert code == 2
    assert err.strip() == f"{tmp_path / 'nope.toml'}: no such file"
    code, _, err = _check(tmp_path, capsys)
    assert code == 2
    assert "is a directory" in err


def test_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = _write(tmp_path, BASE)
    path.chmod(0)
    code, _, err = _check(path, capsys)
    assert code == 2
    assert "permission denied" in err


def test_env_overrides_file_values(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE)
    settings = load_agent_settings(
        path,
        environ={
            "EDGE_AGENT__MQTT__URL": "mqtts://broker.example:8884",
            "EDGE_AGENT__BUFFER__MAX_SIZE": "128MiB",
            "EDGE_AGENT__GATEWAY__DATA_DIR": str(tmp_path / "data"),
        },
    )
    assert settings.mqtt.url == "mqtts://broker.example:8884"
    assert settings.mqtt.port == 8884
    assert settings.mqtt.tls
    assert settings.buffer.max_size == 128 * 1024 * 1024
    assert settings.gateway.data_dir == tmp_path / "data"
    assert settings.gateway.id == "plant1-line3"  # untouched keys keep the file's value


def test_env_override_errors_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_agent_settings(_write(tmp_path, BASE), environ={"EDGE_AGENT__MQTT__URL": "ftp://x"})
    assert info.value.problems == [
        "mqtt.url: 'ftp://x': scheme must be mqtt:// or mqtts:// (from EDGE_AGENT__MQTT__URL)",
        "(root): the cross-field checks of mqtt and the names and references between sections "
        "wait until the errors above are fixed",
    ]


def test_password_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "mqtt.password").write_text("s3cret\n")
    text = BASE.replace(
        "[buffer]", 'username = "line3"\npassword_file = "mqtt.password"\n\n[buffer]'
    )
    settings = load_agent_settings(_write(tmp_path, text), environ={})
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_password_file_from_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt.password").write_text("from-systemd")
    (tmp_path / "mqtt.password").write_text("next-to-config")
    text = BASE.replace(
        "[buffer]", 'username = "line3"\npassword_file = "mqtt.password"\n\n[buffer]'
    )
    settings = load_agent_settings(
        _write(tmp_path, text), environ={"CREDENTIALS_DIRECTORY": str(creds)}
    )
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "from-systemd"


def test_missing_secret_file_and_both_forms(tmp_path: Path) -> None:
    text = BASE.replace("[buffer]", 'username = "u"\npassword_file = "absent.pw"\n\n[buffer]')
    with pytest.raises(ConfigError) as info:
        load_agent_settings(_write(tmp_path, text), environ={})
    assert info.value.problems[0].startswith("mqtt.password_file: no such file")
    text = BASE.replace(
        "[buffer]", 'username = "u"\npassword = "x"\npassword_file = "/etc/pw"\n\n[buffer]'
    )
    with pytest.raises(ConfigError) as info:
        load_agent_settings(_write(tmp_path, text), environ={})
    assert "mqtt.password_file: set password or password_file, not both" in info.value.problems[0]


def test_opcua_password_file(tmp_path: Path) -> None:
    (tmp_path / "filler.pw").write_text("opc")
    text = BASE.replace(
        'url = "opc.tcp://127.0.0.1:4840"',
        'url = "opc.tcp://127.0.0.1:4840"\nusername = "edge"\npassword_file = "filler.pw"',
    )
    settings = load_agent_settings(_write(tmp_path, text), environ={})
    device = settings.device("filler")
    assert device is not None
    assert device.password.get_secret_value() == "opc"  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["agent.example.toml", "demo.toml", "central.example.toml"])
def test_shipped_configs_pass_check(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The example reads its secrets from systemd credentials; give it some.
    for secret in ("mqtt.password", "filler.password"):
        (tmp_path / secret).write_text("secret")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    code, out, err = _check(CONFIG_DIR / name, capsys)
    assert (code, err) == (0, "")
    assert "OK" in out


def test_every_shipped_toml_is_covered() -> None:
    shipped = {path.name for path in CONFIG_DIR.glob("*.toml")}
    assert shipped == {"agent.example.toml", "demo.toml", "central.example.toml"}


def test_example_has_the_promised_line() -> None:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as creds:
        for secret in ("mqtt.password", "filler.password"):
            Path(creds, secret).write_text("x")
        settings = load_agent_settings(
            CONFIG_DIR / "agent.example.toml",
            environ={**os.environ, "CREDENTIALS_DIRECTORY": creds},
        )
    drivers = [getattr(device, "driver", "") for device in settings.devices]
    assert drivers.count("modbus") == 2
    assert drivers.count("opcua") == 1
    opcua = settings.device("filler")
    assert opcua is not None
    assert opcua.security_mode == "SignAndEncrypt"  # type: ignore[attr-defined]
    assert len(settings.machines) == 2
    assert len(settings.calendars[0].shifts) == 2
    assert {flow.name for flow in settings.workflows} == {
        "start_order",
        "quality_hold",
        "maintenance_lockout",
    }


def test_central_config_problems(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[mqtt]\nurl = "mqtt://x"\n[postgres]\n[partitions]\nretention = "forever"\n',
        "central.toml",
    )
    with pytest.raises(ConfigError) as info:
        load_central_settings(path, environ={})
    text = "\n".join(info.value.problems)
    assert "partitions.retention: invalid retention 'forever'" in text


def test_central_dsn_required(tmp_path: Path) -> None:
    path = _write(tmp_path, '[mqtt]\nurl = "mqtt://x"\n[postgres]\npool_size = 2\n', "c.toml")
    with pytest.raises(ConfigError) as info:
        load_central_settings(path, environ={})
    assert info.value.problems == ["postgres.dsn: required (or dsn_file) (line 3)"]


def test_central_events_window(tmp_path: Path) -> None:
    head = '[mqtt]\nurl = "mqtt://x"\n[postgres]\ndsn = "postgresql://i@db/p"\n'
    default = load_central_settings(_write(tmp_path, head, "c.toml"), environ={})
    assert default.events.window == EventTimeWindow(
        oldest=datetime(1970, 1, 1, tzinfo=UTC), max_future=timedelta(days=1)
    )
    # A TOML date or a string; a duration.
    for oldest in ("2000-01-01", '"2000-01-01"'):
        path = _write(tmp_path, f'{head}[events]\noldest = {oldest}\nmax_future = "2h"\n', "c.toml")
        window = load_central_settings(path, environ={}).events.window
        assert window == EventTimeWindow(
            oldest=datetime(2000, 1, 1, tzinfo=UTC), max_future=timedelta(hours=2)
        )
    bad = {
        'oldest = "0001-01-01"': "events.oldest: Input should be greater than 0001-01-01",
        'oldest = "2999-01-01"': "events.oldest: is in the future: every event would be refused",
        'max_future = "400d"': "events.max_future: Input should be less than or equal to",
        'max_future = "1 day"': "events.max_future: invalid duration",
    }
    for line, problem in bad.items():
        path = _write(tmp_path, f"{head}[events]\n{line}\n", "c.toml")
        with pytest.raises(ConfigError) as info:
            load_central_settings(path, environ={})
        assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_schema_file_is_current() -> None:
    shipped = json.loads((CONFIG_DIR / "agent.schema.json").read_text())
    assert shipped == agent_schema(), "config/agent.schema.json is stale: run scripts/gen-docs"


def test_schema_command_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == agent_schema()
    assert set(printed["properties"]) >= {
        "gateway",
        "mqtt",
        "buffer",
        "http",
        "devices",
        "machines",
        "calendars",
        "workflows",
    }


def test_configuration_doc_is_current() -> None:
    from scripts.gen_docs import configuration_markdown

    shipped = (REPO / "docs" / "configuration.md").read_text()
    assert shipped == configuration_markdown(), (
        "docs/configuration.md is stale: run scripts/gen-docs"
    )


@pytest.mark.parametrize(
    "argv",
    [["frobnicate"], ["check"], ["check", "-c"], ["check", "--bogus", "x"], [], ["simulate", "s7"]],
    ids=["unknown-command", "missing-config", "missing-value", "bad-flag", "nothing", "bad-choice"],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: edge-agent" in capsys.readouterr().err


def test_console_script_runs_check(tmp_path: Path) -> None:
    bad = _write(tmp_path, BASE.replace('id = "plant1-line3"', 'id = "bad id"'))
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check", "-c", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("gateway.id: String should match pattern")
    assert "Traceback" not in result.stderr


def _problems_of(path: Path) -> list[str]:
    """Load; a config error must carry readable problems, anything else propagates."""
    try:
        load_agent_settings(path, environ={})
    except ConfigError as exc:
        problems = exc.problems
    else:
        return []
    assert problems, "a ConfigError without problems"
    return problems


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=300) | st.text(max_size=300).map(lambda s: s.encode()))
def test_no_input_produces_a_traceback(
    tmp_path_factory: pytest.TempPathFactory, content: bytes
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "agent.toml"
    path.write_bytes(content)
    problems = _problems_of(path)
    assert all(isinstance(line, str) and line for line in problems)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(BASE) - 1), st.text(max_size=12))
def test_mutated_configs_give_config_errors_only(position: int, insert: str) -> None:
    import tempfile

    text = BASE[:position] + insert + BASE[position:]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "agent.toml"
        path.write_bytes(text.encode("utf-8", errors="replace"))
        _problems_of(path)
