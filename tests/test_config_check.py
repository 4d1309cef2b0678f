"""`check` and every load are strict (issue #21, item 6): no text converted to a number or a
boolean in any config model, every problem of a file at once in line order, suggestions for
near-miss values and for keys written in the wrong place."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from agent.central.settings import CentralSettings
from agent.cli import main
from agent.settings.common import SettingsFile
from agent.settings.config_file import AgentSettings
from agent.settings.loader import ConfigError, load_agent_settings
from agent.settings.messages import is_union_tag
from agent.settings.validation import (
    KeyPath,
    sequence_item,
    union_members,
    validate_part,
    validate_settings,
)
from tests.test_config import BASE

REPO = Path(__file__).resolve().parent.parent
EXAMPLES: list[tuple[type[SettingsFile], str]] = [
    (AgentSettings, "config/agent.example.toml"),
    (CentralSettings, "config/central.example.toml"),
]


# ---------------------------------------------------------------------- strict everywhere


def models_of(annotation: object, seen: set[type[BaseModel]]) -> Iterator[type[BaseModel]]:
    """Every model a config may hold below `annotation` (union members included)."""
    for model, _ in union_members(annotation):
        if model in seen:
            continue
        seen.add(model)
        yield model
        for field in model.model_fields.values():
            item = sequence_item(field.annotation)
            yield from models_of(item if item is not None else field.annotation, seen)


def number_or_boolean_keys(model: type[BaseModel]) -> list[tuple[str, str]]:
    """(key, its JSON type) of every key whose schema is an integer, number or boolean."""
    properties = model.model_json_schema()["properties"]
    out = []
    for key, schema in properties.items():
        types = {option.get("type") for option in schema.get("anyOf", [schema])} - {"null"}
        if len(types) == 1 and types <= {"integer", "number", "boolean"}:
            out.append((key, types.pop()))
    return out


def model_locations(
    annotation: object, value: object, loc: KeyPath
) -> Iterator[tuple[type[BaseModel], KeyPath]]:
    """(model, location) of every table of a config's data, union members resolved."""
    members = union_members(annotation)
    if not isinstance(value, dict) or not members:
        return
    model = next(m for m, _ in members if len(members) == 1 or _validates(m, value))
    yield model, loc
    for name, field in model.model_fields.items():
        if name not in value:
            continue
        item = sequence_item(field.annotation)
        if item is not None and isinstance(value[name], list):
            for index, element in enumerate(value[name]):
                yield from model_locations(item, element, (*loc, name, index))
        else:
            yield from model_locations(field.annotation, value[name], (*loc, name))


def _validates(model: type[BaseModel], value: object) -> bool:
    try:
        validate_part(model, value)
    except ValidationError:
        return False
    return True


def example_data(root: type[SettingsFile], path: str) -> dict[str, Any]:
    data = tomllib.loads((REPO / path).read_text())
    for name in root.model_fields:  # sections left to their defaults: an empty table
        if union_members(root.model_fields[name].annotation) and name not in data:
            data[name] = {}
    return dict(root.completed(data))


def put(data: dict[str, Any], loc: KeyPath, value: object) -> dict[str, Any]:
    changed = copy.deepcopy(data)
    node: Any = changed
    for part in loc[:-1]:
        node = node[part]
    node[loc[-1]] = value
    return changed


def error_locs(root: type[SettingsFile], data: dict[str, Any]) -> dict[KeyPath, str]:
    try:
        validate_settings(root, data)
    except ValidationError as exc:
        return {
            tuple(p for p in error["loc"] if not is_union_tag(p)): error["type"]
            for error in exc.errors()
        }
    return {}


@pytest.mark.parametrize(("root", "path"), EXAMPLES, ids=["agent", "ingest"])
def test_every_number_and_boolean_key_refuses_text(root: type[SettingsFile], path: str) -> None:
    # Walks every model of the file's schema through the loader's one validation (the root
    # included: a BaseSettings root re-validated everything in lax mode), putting the text
    # "1" (or "true") where a number or a boolean belongs.
    data = example_data(root, path)
    assert error_locs(root, data) == {}
    located = {model: loc for model, loc in reversed(list(model_locations(root, data, ())))}
    checked = 0
    for model in models_of(root, set()):
        keys = number_or_boolean_keys(model)
        if not keys:
            continue
        assert model in located, f"{model.__name__}: add a table of it to {path}"
        for key, kind in keys:
            text = "true" if kind == "boolean" else "1"
            where = (*located[model], key)
            errors = error_locs(root, put(data, where, text))
            expected = {"boolean": "bool_type", "integer": "int_type", "number": "float_type"}
            assert errors.get(where) == expected[kind], (model.__name__, key, errors)
            checked += 1
    assert checked >= (20 if root is AgentSettings else 3)  # 24 and 3 keys today


# (case id, BASE text -> new text, the line the message names, the message without its line)
MESSAGES: list[tuple[str, str, str, str, str]] = [
    # Wrong TOML types, with how to write the value.
    (
        "int-quoted",
        'poll_interval = "1s"',
        'poll_interval = "1s"\nunit_id = "1"',
        'unit_id = "1"',
        "devices[0].unit_id: must be an integer, got '1': write 1 without quotes",
    ),
    (
        "int-float",
        'poll_interval = "1s"',
        'poll_interval = "1s"\nunit_id = 1.0',
        "unit_id = 1.0",
        "devices[0].unit_id: must be an integer, got 1.0: write 1",
    ),
    (
        "float-quoted",
        "scale = 0.1",
        'scale = "0.1"',
        'scale = "0.1"',
        "devices[0].tags[3].scale: must be a number, got '0.1': write 0.1 without quotes",
    ),
    (
        "bool-yes",
        "scale = 0.1",
        'scale = 0.1\n  writable = "yes"',
        'writable = "yes"',
        "devices[0].tags[3].writable: must be true or false, got 'yes': "
        "write true or false without quotes",
    ),
    (
        "bool-quoted",
        "scale = 0.1",
        'scale = 0.1\n  writable = "true"',
        'writable = "true"',
        "devices[0].tags[3].writable: must be true or false, got 'true': write true without quotes",
    ),
    (
        "bool-number",
        "scale = 0.1",
        "scale = 0.1\n  writable = 1",
        "writable = 1",
        "devices[0].tags[3].writable: must be true or false, got 1: write true",
    ),
    (
        "text-number",
        'name = "temperature"',
        "name = 7",
        "name = 7",
        'devices[0].tags[3].name: must be text in quotes, got 7: write "7" in quotes',
    ),
    (
        "array",
        "running = [1]",
        "running = 1",
        "state = {",
        "machines[0].state.running: must be an array [...], got 1",
    ),
    # Near-miss choices.
    (
        "type-float",
        'type = "int16"',
        'type = "float"',
        'type = "float"',
        "devices[0].tags[3].type: unknown value 'float'; did you mean 'float32'?",
    ),
    (
        "type-case",
        'type = "int16"',
        'type = "INT16"',
        'type = "INT16"',
        "devices[0].tags[3].type: unknown value 'INT16'; did you mean 'int16'?",
    ),
    (
        "type-far",
        'type = "int16"',
        'type = "word"',
        'type = "word"',
        "devices[0].tags[3].type: unknown value 'word'; one of: bool, int16, uint16, int32, "
        "uint32, int64, uint64, float32, float64, string",
    ),
    (
        "opcua-mode",
        'node_id = "ns=2;s=Filler.State"',
        'node_id = "ns=2;s=Filler.State"\n  mode = "subscription"',
        'mode = "subscription"',
        "devices[1].tags[0].mode: unknown value 'subscription'; did you mean 'subscribe'?",
    ),
    (
        "opcua-security-mode",
        'url = "opc.tcp://127.0.0.1:4840"',
        'url = "opc.tcp://127.0.0.1:4840"\nsecurity_mode = "signandencrypt"',
        'security_mode = "signandencrypt"',
        "devices[1].security_mode: unknown value 'signandencrypt'; did you mean 'SignAndEncrypt'?",
    ),
    (
        "driver",
        'driver = "opcua"',
        'driver = "opc-ua"',
        'driver = "opc-ua"',
        "devices[1].driver: unknown driver 'opc-ua'; did you mean 'opcua'?",
    ),
    # Keys in the wrong place.
    (
        "modbus-port",
        'poll_interval = "1s"',
        'poll_interval = "1s"\nport = 502',
        "port = 502",
        "devices[0].port: unknown key; put the port in url, e.g. 'tcp://192.168.10.11:502'",
    ),
    (
        "opcua-port",
        'url = "opc.tcp://127.0.0.1:4840"',
        'url = "opc.tcp://127.0.0.1:4840"\nport = 4840',
        "port = 4840",
        "devices[1].port: unknown key; put the port in url, e.g. 'opc.tcp://192.168.10.12:4840'",
    ),
    (
        "mqtt-port",
        'url = "mqtt://127.0.0.1:1883"',
        'url = "mqtt://127.0.0.1:1883"\nport = 1883',
        "port = 1883",
        "mqtt.port: unknown key; put the port in url, e.g. 'mqtts://broker.plant.local:8883'",
    ),
    (
        "http-port",
        "[buffer]",
        "[http]\nport = 9108\n\n[buffer]",
        "port = 9108",
        "http.port: unknown key; put the port in listen (HOST:PORT), e.g. '127.0.0.1:9108'",
    ),
    (
        "http-off-loopback-without-token",
        "[buffer]",
        '[http]\nlisten = "0.0.0.0:9108"\n\n[buffer]',
        'listen = "0.0.0.0:9108"',
        "http.listen: 0.0.0.0:9108 is reachable from the network: set token_file "
        "(docs/page.md, 'Access')",
    ),
    (
        "modbus-host",
        'poll_interval = "1s"',
        'poll_interval = "1s"\nhost = "10.0.0.5"',
        'host = "10.0.0.5"',
        "devices[0].host: unknown key; put the host in url, e.g. 'tcp://192.168.10.11:502'",
    ),
    (
        "modbus-baudrate",
        'poll_interval = "1s"',
        'poll_interval = "1s"\nbaudrate = 9600',
        "baudrate = 9600",
        "devices[0].baudrate: unknown key; serial settings go in url, e.g. "
        "'rtu:///dev/ttyUSB0?baudrate=19200&parity=E'",
    ),
    (
        "device-interval",
        'poll_interval = "1s"',
        'interval = "1s"',
        'interval = "1s"',
        "devices[0].interval: unknown key; did you mean 'poll_interval'?",
    ),
    (
        "tag-poll-interval",
        "scale = 0.1",
        'scale = 0.1\n  poll_interval = "5s"',
        'poll_interval = "5s"',
        "devices[0].tags[3].poll_interval: unknown key; a tag is read at its device's "
        "poll_interval: set it on the device",
    ),
    (
        "opcua-tag-interval",
        'node_id = "ns=2;s=Filler.State"',
        'node_id = "ns=2;s=Filler.State"\n  interval = "5s"',
        'interval = "5s"',
        "devices[1].tags[0].interval: unknown key; set poll_interval on the device "
        '(with mode = "poll") or sampling_interval here',
    ),
    (
        "slave-id",
        'poll_interval = "1s"',
        'poll_interval = "1s"\nslave_id = 3',
        "slave_id = 3",
        "devices[0].slave_id: unknown key; did you mean 'unit_id'?",
    ),
    (
        "mqtt-user",
        'url = "mqtt://127.0.0.1:1883"',
        'url = "mqtt://127.0.0.1:1883"\nuser = "line3"',
        'user = "line3"',
        "mqtt.user: unknown key; did you mean 'username'?",
    ),
    (
        "mqtt-topic",
        'url = "mqtt://127.0.0.1:1883"',
        'url = "mqtt://127.0.0.1:1883"\ntopic = "a/b"',
        'topic = "a/b"',
        "mqtt.topic: unknown key; did you mean 'topic_root'?",
    ),
    (
        "tag-key-on-device",
        'poll_interval = "1s"',
        'poll_interval = "1s"\nscale = 0.1',
        "scale = 0.1\n\n",
        'devices[0].scale: unknown key here; scale is a key of [[devices.tags]] (driver = "modbus")',
    ),
    (
        "device-key-on-tag",
        "scale = 0.1",
        "scale = 0.1\n  unit_id = 2",
        "unit_id = 2",
        "devices[0].tags[3].unit_id: unknown key here; unit_id is a key of [[devices]] "
        '(driver = "modbus")',
    ),
    (
        "modbus-key-on-opcua",
        'url = "opc.tcp://127.0.0.1:4840"',
        'url = "opc.tcp://127.0.0.1:4840"\nunit_id = 2',
        "unit_id = 2",
        'devices[1].unit_id: unknown key here; unit_id is a key of [[devices]] (driver = "modbus")',
    ),
    (
        "gateway-key-in-mqtt",
        'url = "mqtt://127.0.0.1:1883"',
        'url = "mqtt://127.0.0.1:1883"\nsite = "plant9"',
        'site = "plant9"',
        "mqtt.site: unknown key here; site is a key of [gateway]",
    ),
    (
        "tag-singular",
        '  [[devices.tags]]\n  name = "state_code"',
        '  [[devices.tag]]\n  name = "state_code"',
        "[[devices.tag]]",
        "devices[0].tag: unknown key; write [[devices.tags]] (plural)",
    ),
    (
        "typo",
        'poll_interval = "1s"',
        'poll_intervall = "1s"',
        'poll_intervall = "1s"',
        "devices[0].poll_intervall: unknown key (did you mean 'poll_interval'?)",
    ),
    (
        "nothing-like-it",
        "[buffer]",
        "[buffer]\ncolour = 1",
        "colour = 1",
        "buffer.colour: unknown key; known keys: max_size, commit_interval, commit_max_events",
    ),
]


def line_number(text: str, marker: str) -> int:
    return text[: text.index(marker)].count("\n") + 1


@pytest.mark.parametrize(
    ("old", "new", "marker", "message"), [m[1:] for m in MESSAGES], ids=[m[0] for m in MESSAGES]
)
def test_every_message(tmp_path: Path, old: str, new: str, marker: str, message: str) -> None:
    assert old in BASE
    text = BASE.replace(old, new, 1)
    problems = problems_of(tmp_path, text)
    assert f"{message} (line {line_number(text, marker)})" in problems, problems


def problems_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_agent_settings(path, environ=environ or {})
    return info.value.problems


# Eight mistakes, of every sort, in one file (the markers: the line each message names).
MISTAKES: list[tuple[str, str, str, str]] = [
    (
        'url = "mqtt://127.0.0.1:1883"',
        'url = "mqtt://127.0.0.1:1883"\nport = 1883',
        "port = 1883",
        "mqtt.port: unknown key; put the port in url, e.g. 'mqtts://broker.plant.local:8883'",
    ),
    (
        'poll_interval = "1s"',
        'poll_interval = "1s"\nunit_id = "1"',
        'unit_id = "1"',
        "devices[0].unit_id: must be an integer, got '1': write 1 without quotes",
    ),
    (
        'address = "hr:100"\n  type = "uint16"',
        'address = "hr:100"\n  type = "float"',
        'type = "float"',
        "devices[0].tags[0].type: unknown value 'float'; did you mean 'float32'?",
    ),
    (
        "scale = 0.1",
        'scale = "0.1"',
        'scale = "0.1"',
        "devices[0].tags[3].scale: must be a number, got '0.1': write 0.1 without quotes",
    ),
    (
        'url = "opc.tcp://127.0.0.1:4840"',
        'url = "opc.tcp://127.0.0.1:4840"\nsecurity_mode = "Sign"\nserver_certificate = "/x.der"',
        '[[devices]]\nname = "filler"',  # no security_policy key: its table's line
        "devices[1].security_policy: security_mode Sign needs a policy other than None",
    ),
    (
        '  node_id = "ns=2;s=Filler.State"\n',
        '  node_id = "ns=2;s=Filler.State"\n\n  [[devices.tags]]\n  name = "state_code"\n'
        '  node_id = "ns=2;s=Filler.Other"\n',
        'name = "state_code"\n  node_id = "ns=2;s=Filler.Other"',
        "devices[1].tags[1].name: duplicate tag name 'state_code' (also tags[0])",
    ),
    (
        'ideal_cycle_time = "1.2s"',
        "ideal_cycle_time = 1.2",
        "ideal_cycle_time = 1.2",
        "machines[0].ideal_cycle_time: a duration needs a unit: write 1.2 as e.g. '1.2s' or "
        "'1.2ms'",
    ),
    (
        '{ name = "late", start = "14:00"',
        '{ name = "late", start = "13:00"',
        '{ name = "late"',
        "calendars[0].shifts[1]: overlaps shifts[0] (early)",
    ),
]


def test_every_problem_of_a_file_at_once_in_line_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = BASE
    for old, new, _, _ in MISTAKES:
        assert old in text
        text = text.replace(old, new, 1)
    # And a reference the whole-file checks would refuse, which must wait (named last).
    text = text.replace('{ write = "press1/product_code"', '{ write = "press1/nothing"')
    path = tmp_path / "agent.toml"
    path.write_text(text)
    code = main(["check", "-c", str(path)])
    lines = capsys.readouterr().err.splitlines()
    expected = sorted(
        (line_number(text, marker), f"{message} (line {line_number(text, marker)})")
        for _, _, marker, message in MISTAKES
    )
    assert code == 2
    assert lines[:-1] == [message for _, message in expected]
    assert lines[-1] == (
        "(root): the cross-field checks of mqtt, devices[0], devices[0].tags[0], "
        "devices[0].tags[3] and the names and references between sections wait until the "
        "errors above are fixed"
    )
    assert "nothing" not in "\n".join(lines)  # the reference waits, as the last line says


def test_environment_values_are_read_by_the_key_type(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BASE.replace('id = "plant1-line3"', 'id = "1234"'))
    settings = load_agent_settings(
        path,
        environ={
            "EDGE_AGENT__MQTT__SYNC_WINDOW": "64",
            "EDGE_AGENT__HTTP__ENABLED": "false",
            "EDGE_AGENT__GATEWAY__SITE": "42",  # text keys keep text
        },
    )
    assert settings.mqtt.sync_window == 64
    assert settings.http.enabled is False
    assert settings.gateway.site == "42"
    problems = problems_of(tmp_path, BASE, {"EDGE_AGENT__MQTT__SYNC_WINDOW": "many"})
    assert problems[0] == (
        "mqtt.sync_window: must be an integer, got 'many' (from EDGE_AGENT__MQTT__SYNC_WINDOW)"
    )


def test_only_the_given_environment_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BaseSettings.__init__ read os.environ again whatever `environ` the loader was given.
    monkeypatch.setenv("EDGE_AGENT__HTTP__LISTEN", "127.0.0.1:1")
    path = tmp_path / "agent.toml"
    path.write_text(BASE)
    assert load_agent_settings(path, environ={}).http.listen == "127.0.0.1:9108"
    assert load_agent_settings(path).http.listen == "127.0.0.1:1"


def test_secret_problems_are_reported_with_the_others_in_line_order(tmp_path: Path) -> None:
    text = BASE.replace(
        'url = "mqtt://127.0.0.1:1883"',
        'url = "mqtt://127.0.0.1:1883"\nusername = "line3"\npassword_file = "absent.password"',
    ).replace("scale = 0.1", 'scale = "0.1"')
    problems = problems_of(tmp_path, text)  # as `run` loads it: every secret is needed
    assert [problem.split(":")[0] for problem in problems] == [
        "mqtt.password_file",
        "devices[0].tags[3].scale",
        "(root)",
    ]
    assert f"(line {line_number(text, 'password_file')})" in problems[0]
