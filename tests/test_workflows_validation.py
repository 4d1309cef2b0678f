"""Command decoding and validation, step values, the rate limit, and the command queue's
overflow (pure functions and an engine that never connects)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from agent.settings.config_file import AgentSettings
from agent.settings.workflows import ParamSpec, parse_param_spec
from agent.workflows.commands import (
    MAX_PAYLOAD,
    CommandRejected,
    TokenBucket,
    decode_command,
    peek_command_id,
    render,
    validate_params,
)
from agent.workflows.engine import WorkflowEngine
from agent.workflows.intake import COMMAND_QUEUE
from drivers.base import Reading
from drivers.modbus.config import ModbusTagConfig
from drivers.values import same_value
from sync.mqtt.client import Message, MqttClient
from sync.outbox.store import Outbox
from tests.fixtures.ports import async_wait_until as wait_for
from tests.fixtures.workflows import settings_for


def rejected(payload: bytes) -> CommandRejected:
    with pytest.raises(CommandRejected) as info:
        decode_command(payload)
    return info.value


def test_a_valid_envelope() -> None:
    command = decode_command(b'{"id": "ORD-1:a@b.c_d", "params": {"x": 1}}')
    assert command.id == "ORD-1:a@b.c_d"
    assert command.params == {"x": 1}


@pytest.mark.parametrize(
    ("payload", "reason", "command_id"),
    [
        (b"", "invalid JSON", None),
        (b"{", "invalid JSON", None),
        (b"\xff", "not UTF-8", None),
        (b'"text"', "a command is a JSON object", None),
        (b'{"id":"a","params":{},"x":1}', "unknown key(s) 'x'", "a"),
        (b'{"params":{}}', 'missing "id"', None),
        (b'{"id":"a"}', 'missing "params"', "a"),
        (b'{"id":"","params":{}}', '"id" must be', None),
        (b'{"id":"a/b","params":{}}', '"id" must be', None),
        (b'{"id":"a+#","params":{}}', '"id" must be', None),
        (b'{"id":7,"params":{}}', '"id" must be', None),
        (b'{"id":"a","id":"b","params":{}}', "duplicate key", None),
        (b'{"id":"a","params":{"x":NaN}}', "invalid JSON", None),
        (b'{"id":"a","params":{"x":Infinity}}', "invalid JSON", None),
        (b'{"id":"a","params":{"x":[[[[[[[[1]]]]]]]]}}', "nested deeper than 8", "a"),
        (b'{"id":"a","params":' + b"[" * 20000 + b"]" * 20000 + b"}", "payload too large", None),
        (b'{"id":"a","params":' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper", None),
        (b'{"id":"a","params":{"x":1' + b"0" * 5000 + b"}}", "invalid JSON", None),
    ],
)
def test_bad_envelopes(payload: bytes, reason: str, command_id: str | None) -> None:
    rejection = rejected(payload)
    assert reason in rejection.reason
    assert rejection.command_id == command_id


def test_size_is_checked_before_parsing() -> None:
    ok = b'{"id":"a","params":{"s":"' + b"x" * (MAX_PAYLOAD - 28) + b'"}}'
    assert len(ok) == MAX_PAYLOAD
    assert decode_command(ok).id == "a"
    assert "payload too large" in rejected(ok + b" ").reason
    assert "payload too large" in rejected(b"{" * (1024 * 1024)).reason


def test_ids() -> None:
    assert decode_command(json.dumps({"id": "i" * 128, "params": {}}).encode()).id == "i" * 128
    assert rejected(json.dumps({"id": "i" * 129, "params": {}}).encode()).command_id is None
    assert peek_command_id(b'{"id":"x-1","params":"junk"}') == "x-1"
    assert peek_command_id(b"junk") is None
    assert peek_command_id(b'{"id":"bad id"}') is None


SPECS = {
    "name": parse_param_spec("str:1..8"),
    "any": parse_param_spec("str"),
    "qty": parse_param_spec("int:1..100"),
    "neg": parse_param_spec("int:-5..-1"),
    "ratio": parse_param_spec("float:0..1.5"),
    "flag": parse_param_spec("bool"),
}
GOOD: dict[str, Any] = {
    "name": "A",
    "any": "",
    "qty": 1,
    "neg": -5,
    "ratio": 1,
    "flag": False,
}


def test_valid_params() -> None:
    params = validate_params(GOOD, SPECS)
    assert params == GOOD
    assert isinstance(params["ratio"], float)
    assert (
        validate_params(GOOD | {"qty": 100, "ratio": 1.5, "name": "ÄÖÜ-日本"}, SPECS)["qty"] == 100
    )
    assert validate_params({}, {}) == {}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"qty": "1"}, "params.qty: expected a number, got a string"),
        ({"qty": 1.0}, "params.qty: expected an integer, got 1.0"),
        ({"qty": True}, "params.qty: expected a number, got a boolean"),
        ({"qty": None}, "params.qty: expected a number, got null"),
        ({"qty": [1]}, "params.qty: expected a number, got an array"),
        ({"qty": 0}, "params.qty: 0 is below the minimum 1"),
        ({"qty": 101}, "params.qty: 101 is above the maximum 100"),
        ({"qty": 10**40}, "is above the maximum 100"),
        ({"neg": 0}, "params.neg: 0 is above the maximum -1"),
        ({"ratio": 1.6}, "params.ratio: 1.6 is above the maximum 1.5"),
        ({"ratio": -0.1}, "below the minimum 0"),
        ({"ratio": 10**400}, "params.ratio: number out of range"),
        ({"flag": 1}, "params.flag: expected true or false, got an integer"),
        ({"flag": "true"}, "params.flag: expected true or false, got a string"),
        ({"name": ""}, "params.name: 0 characters, at least 1"),
        ({"name": "123456789"}, "params.name: 9 characters, at most 8"),
        ({"name": 5}, "params.name: expected a string, got an integer"),
        ({"name": "a\nb"}, "control characters"),
        ({"any": "\x1b[2J"}, "control characters"),
        ({"extra": 1}, "unknown parameter(s) 'extra'"),
    ],
)
def test_invalid_params(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(CommandRejected, match=None) as info:
        validate_params(GOOD | change, SPECS)
    assert reason in info.value.reason


def test_missing_and_non_object_params() -> None:
    with pytest.raises(CommandRejected, match=r"missing parameter\(s\) 'flag'"):
        validate_params({k: v for k, v in GOOD.items() if k != "flag"}, SPECS)
    with pytest.raises(CommandRejected, match='"params" must be an object'):
        validate_params([], SPECS)
    many = {f"k{n}": 1 for n in range(9)}
    with pytest.raises(CommandRejected, match="and 4 more"):
        validate_params(many, {})


def test_float_params_are_finite() -> None:
    spec = {"x": ParamSpec("float")}
    assert validate_params({"x": 2}, spec) == {"x": 2.0}
    with pytest.raises(CommandRejected, match="out of range"):
        validate_params({"x": 10**400}, spec)
    with pytest.raises(CommandRejected, match="finite"):
        validate_params({"x": math.inf}, spec)


def test_render_keeps_the_type_of_a_lone_parameter() -> None:
    params = {"p": 42, "b": True, "s": "A-1"}
    assert render("{p}", params) == 42
    assert render("{b}", params) is True
    assert render("ORD-{s}/{p}", params) == "ORD-A-1/42"
    assert render("{p:05d}", params) == "00042"
    assert render("{{literal}}", params) == "{literal}"
    assert render(7, params) == 7
    assert render(False, params) is False


def tag(kind: str, **keys: Any) -> ModbusTagConfig:
    address = "co:0" if kind == "bool" else "hr:300"
    return ModbusTagConfig(name="t", address=address, type=kind, **keys)


def test_convert_to_the_tag_kind() -> None:
    assert tag("uint16").command_value("42") == 42
    assert tag("uint16").command_value(42.0) == 42
    assert tag("float32").command_value(5) == 5.0
    assert tag("float32").command_value("2.5") == 2.5
    assert tag("bool").command_value("true") is True
    assert tag("bool").command_value(False) is False
    assert tag("string", length=4).command_value(42) == "42"
    assert tag("string", length=8).command_value(True) == "true"
    assert tag("uint16", scale=0.1).command_value(3) == 3.0  # a scaled tag is a float
    cases: list[tuple[Any, str, str]] = [
        (True, "uint16", "not a number"),
        (1, "bool", "not a boolean"),
        ("yes", "bool", "not a boolean"),
        (2.5, "uint16", "not an integer"),
        ("x", "uint16", "not an integer"),
        (70000, "uint16", "does not fit"),
        (-1, "uint32", "does not fit"),
        ("nan", "float32", "not finite"),
        ("ABCDE", "string", "longer than the tag's 4 characters"),
    ]
    for value, kind, message in cases:
        keys = {"length": 4} if kind == "string" else {}
        with pytest.raises(ValueError, match=message):
            tag(kind, **keys).command_value(value)


def test_same_value() -> None:
    assert same_value(1, 1)
    assert same_value(1.0, 1)
    assert same_value(0.30000001, 0.3)
    assert not same_value(0.31, 0.3)
    assert not same_value(True, 1)
    assert not same_value(1, True)
    assert same_value(False, False)
    assert same_value("A", "A")
    assert not same_value(None, 0)


def test_token_bucket() -> None:
    bucket = TokenBucket(2, 60.0, now=0.0)
    assert bucket.take(0.0)
    assert bucket.take(0.0)
    assert not bucket.take(1.0)
    assert bucket.take(31.0)  # one token per 30 s
    assert not bucket.take(31.0)
    assert bucket.take(1000.0)
    assert bucket.take(1000.0)
    assert not bucket.take(1000.0)  # never more than the burst saved up
    assert not bucket.take(900.0)  # a clock going back never creates tokens


def minimal_settings(tmp_path: Path) -> AgentSettings:
    return settings_for(
        tmp_path,
        f"""
[gateway]
id = "gw"
site = "s"
area = "a"
line = "l"
data_dir = "{tmp_path / "data"}"

[mqtt]
url = "mqtt://127.0.0.1:1"

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:1"
  [[devices.tags]]
  name = "r0"
  address = "hr:300"
  writable = true

[[workflows]]
name = "w"
params = {{ v = "int" }}
steps = [{{ write = "press1/r0", value = "{{v}}" }}]
""",
    )


async def test_a_full_command_queue_rejects_busy(tmp_path: Path) -> None:
    settings = minimal_settings(tmp_path)
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 24) as outbox:
        mqtt = MqttClient(host="127.0.0.1", port=1, client_id="t")  # never connected
        engine = WorkflowEngine(
            settings, outbox=outbox, mqtt=mqtt, devices=NoDevices(), data_dir=tmp_path
        )
        assert set(engine.plans) == {"w"}
        for n in range(COMMAND_QUEUE + 10):
            payload = json.dumps({"id": f"c{n}", "params": {"v": n}}).encode()
            # What the MQTT client calls for every message (the engine is not running: the
            # queue fills up).
            engine._on_message(Message("s/a/l/_cmd/w", payload, 1, False))
    assert engine.stats.commands == COMMAND_QUEUE + 10
    assert engine.stats.busy_overflow == 10
    replies = [json.loads(payload) for _, payload in engine.replies.pending]
    assert [reply["id"] for reply in replies] == [f"c{COMMAND_QUEUE + n}" for n in range(10)]
    assert {reply["status"] for reply in replies} == {"rejected"}
    assert replies[0]["detail"] == "busy: too many commands queued"


class NoDevices:
    """Devices that must not be touched."""

    async def read(self, ref: str) -> Any:
        raise AssertionError("no device I/O expected")

    async def write(self, ref: str, value: Any) -> Any:
        raise AssertionError("no device I/O expected")


async def test_reconfigure_takes_new_workflows(tmp_path: Path) -> None:
    settings = minimal_settings(tmp_path)
    text = (tmp_path / "agent.toml").read_text()
    text += '\n[[workflows]]\nname = "w2"\nparams = {}\nrate_limit = "1/1h"\n'
    text += 'steps = [{ write = "press1/r0", value = 1 }]\n'
    reloaded = settings_for(tmp_path, text, "reloaded.toml")
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 24) as outbox:
        mqtt = MqttClient(host="127.0.0.1", port=1, client_id="t")
        engine = WorkflowEngine(
            settings, outbox=outbox, mqtt=mqtt, devices=NoDevices(), data_dir=tmp_path
        )
        await engine.reconfigure(reloaded)
    assert set(engine.plans) == {"w", "w2"}
    assert engine.plans["w2"].devices == frozenset({"press1"})


STRING_WORKFLOW = """
[gateway]
id = "gw"
site = "s"
area = "a"
line = "l"
data_dir = "{data}"

[mqtt]
url = "mqtt://127.0.0.1:1"

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:1"
  [[devices.tags]]
  name = "order_id"
  address = "hr:210"
  type = "string"
  length = 16
  writable = true

[[workflows]]
name = "w"
params = {{ order = "str:1..16" }}
rate_limit = "1/1h"
exclusive = "machine"
steps = [{{ write = "press1/order_id", value = "{{order}}" }}]
"""


class RecordingDevices:
    """Devices that answer every read and verified write, and remember the writes."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, Any]] = []

    async def read(self, ref: str) -> Reading:
        return Reading(ref.partition("/")[2], "", "good", time.time())

    async def write(self, ref: str, value: Any) -> Any:
        self.writes.append((ref, value))
        return value


async def test_a_value_the_plc_cannot_hold_is_rejected_before_any_write(tmp_path: Path) -> None:
    """'€uro' for a Latin-1 PLC string: rejected at validation with the codec's reason, no
    write, and neither the rate-limit token nor the exclusive slot is taken (issue #18)."""
    settings = settings_for(tmp_path, STRING_WORKFLOW.format(data=tmp_path / "data"))
    devices = RecordingDevices()
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 24) as outbox:
        mqtt = MqttClient(host="127.0.0.1", port=1, client_id="t")  # never connected
        engine = WorkflowEngine(
            settings, outbox=outbox, mqtt=mqtt, devices=devices, data_dir=tmp_path
        )
        task = asyncio.create_task(engine.run())
        try:
            await asyncio.wait_for(engine.ready.wait(), 10)
            for command_id, order in (("euro-1", "€uro"), ("ok-1", "ORD-1")):
                payload = json.dumps({"id": command_id, "params": {"order": order}}).encode()
                engine._on_message(Message("s/a/l/_cmd/w", payload, 1, False))
            await wait_for(lambda: engine.stats.completed == 1, message="the valid saga")
        finally:
            task.cancel()
            await asyncio.wait([task])
    replies = [json.loads(payload) for _, payload in engine.replies.pending]
    by_id = {(reply["id"], reply["status"]): reply["detail"] for reply in replies}
    assert by_id[("euro-1", "rejected")] == (
        "step 1 (press1/order_id): '€uro': a PLC string holds Latin-1 characters only, not '€'"
    )
    assert [status for command_id, status in by_id if command_id == "euro-1"] == ["rejected"]
    assert ("ok-1", "accepted") in by_id  # the rate limit of 1/1h still had its token
    assert devices.writes == [("press1/order_id", "ORD-1")]
