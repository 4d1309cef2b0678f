"""Workflows in the whole daemon (in-process) against the Modbus and OPC UA simulators, a private
mosquitto and a stand-in central store: the three example workflows, a wait step that times
out, the broker killed during a confirm step, hostile commands, idempotency, recovery of saga
logs left behind by a crash."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.workflows.saga_log import SagaLog, SagaRecord, StepRecord
from simulators.modbus.server import ModbusSimulator
from simulators.opcua.server import OpcUaSimulator
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import async_wait_until as wait_for
from tests.fixtures.workflows import (
    CentralAcker,
    CommandSender,
    GatedProxy,
    example_workflows,
    ok_writes,
    running,
    settings_for,
)

pytestmark = pytest.mark.slow

ROOT = "plant1/assembly/line3"
GATEWAY = "plant1-line3"

PRESS_TAGS = """
  [[devices.tags]]
  name = "state_code"
  address = "hr:100"
  [[devices.tags]]
  name = "product_code"
  address = "hr:200"
  writable = true
  [[devices.tags]]
  name = "target_qty"
  address = "hr:201"
  type = "uint32"
  writable = true
  [[devices.tags]]
  name = "order_id"
  address = "hr:210"
  type = "string"
  length = 16
  writable = true
  [[devices.tags]]
  name = "start"
  address = "co:0"
  type = "bool"
  writable = true
  [[devices.tags]]
  name = "quality_hold"
  address = "co:2"
  type = "bool"
  writable = true
  [[devices.tags]]
  name = "maintenance_lock"
  address = "co:3"
  type = "bool"
  writable = true
"""


def base_config(broker: MosquittoBroker, data_dir: Path, press_port: int | None) -> str:
    return f"""
[gateway]
id = "{GATEWAY}"
site = "plant1"
area = "assembly"
line = "line3"
data_dir = "{data_dir}"

[mqtt]
url = "{broker.url}"
ack_timeout = "2s"

[http]
enabled = false

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:{press_port}"
poll_interval = "100ms"
timeout = "500ms"
read_retries = 0
{PRESS_TAGS}
"""


FILLER = """
[[devices]]
name = "filler"
driver = "opcua"
url = "opc.tcp://127.0.0.1:{port}"
poll_interval = "200ms"
publishing_interval = "100ms"
timeout = "1s"

  [[devices.tags]]
  name = "state_code"
  node_id = "ns=2;s=Filler.State"
  [[devices.tags]]
  name = "hold"
  node_id = "ns=2;s=Filler.QualityHold"
  writable = true
"""


@pytest.fixture(autouse=True)
def _quiet_asyncua() -> Iterator[None]:
    logger = logging.getLogger("asyncua")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def command(params: dict[str, Any], command_id: str | None = None) -> dict[str, Any]:
    return {"id": command_id or f"c-{uuid.uuid4().hex[:12]}", "params": params}


async def finished(sender: CommandSender, command_id: str, within: float = 20.0) -> dict[str, Any]:
    return await asyncio.to_thread(
        sender.wait_status, command_id, ("completed", "compensated", "failed", "rejected"), within
    )


async def test_the_three_example_workflows(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    press_log, filler_log = tmp_path / "press.jsonl", tmp_path / "filler.jsonl"
    async with (
        ModbusSimulator(port=0, seed=3, speed=0.0, write_log=press_log) as press,
        OpcUaSimulator(port=0, seed=4, speed=0.0, bulk_count=0, write_log=filler_log) as filler,
    ):
        model = press.model(1)
        model.force_state(0)  # off: the order's start command makes it run
        code_before = model.product_code
        text = (
            base_config(mosquitto, tmp_path / "data", press.port)
            + FILLER.format(port=filler.port)
            + example_workflows()
        )
        settings = settings_for(tmp_path, text)
        with CentralAcker(mosquitto) as central, CommandSender(mosquitto, ROOT) as sender:
            async with running(settings) as runtime:
                await wait_for(lambda: runtime.device_states() == {"press1": "up", "filler": "up"})
                order = command({"order_id": "ORD-4711", "product": 42, "quantity": 500})
                sender.send("start_order", order)
                reply = await finished(sender, order["id"])
                assert reply["status"] == "completed", reply
                assert [r["status"] for r in sender.for_id(order["id"])] == [
                    "accepted",
                    "completed",
                ]
                assert (model.product_name, model.product_code, model.target_qty) == (
                    "ORD-4711",
                    42,
                    500,
                )
                assert model.start
                assert model.state == 1

                hold = command({"reason": "scratches on lot 17"})
                sender.send("quality_hold", hold)
                reply = await finished(sender, hold["id"])
                assert reply["status"] == "completed", reply
                assert model.quality_hold
                assert model.state == 3
                assert filler.model.quality_hold

                lock = command({"technician": "A. Smith", "lock": True})
                sender.send("maintenance_lockout", lock)
                reply = await finished(sender, lock["id"])
                assert reply["status"] == "completed", reply
                assert model.maintenance_lock
                assert not model.start  # the lockout drops the run command

                engine = runtime.gateway.workflows if runtime.gateway else None
                assert engine is not None
                assert engine.saga_log is not None
                sagas = await engine.saga_log.all()
                await wait_for(
                    lambda: (
                        len([e for e in central.workflow_events() if e["step"] == "finished"]) == 3
                    ),
                    message="the audit trail at the central store",
                )
        # Every write went out exactly once (start_order: 4 writes, quality_hold: 1 + 1 OPC UA,
        # maintenance_lockout: 1).
        writes = ok_writes(press_log)
        assert [(fc, address) for fc, address, _ in writes] == [
            (16, 210),
            (6, 200),
            (16, 201),
            (5, 0),
            (5, 2),
            (5, 3),
        ]
        assert writes[1][2] == (42,)
        assert writes[2][2] == (0, 500)
        assert [json.loads(line)["node"] for line in filler_log.read_text().splitlines()] == [
            "ns=2;s=Filler.QualityHold"
        ]
    assert [saga.state for saga in sagas] == ["completed"] * 3
    assert all(saga.confirmed for saga in sagas[:2])  # the two with a confirm step
    start_steps = sagas[0].steps
    assert [start_steps[i].phase for i in sorted(start_steps)] == ["done"] * 6
    assert start_steps[2].previous == code_before
    assert start_steps[2].value == 42
    assert start_steps[4].target is False  # compensate_value
    # The audit trail: started, begin + outcome per step, finished; device and tag named.
    trail = [e for e in central.workflow_events() if e["command_id"] == order["id"]]
    assert trail[0]["step"] == "started"
    assert trail[0]["params"]["product"] == 42
    assert trail[-1]["step"] == "finished"
    assert trail[-1]["result"] == "completed"
    write_ok = [e for e in trail if e["action"] == "write" and e["result"] == "ok"]
    assert [e["_tag"] for e in write_ok] == [
        "press1/order_id",
        "press1/product_code",
        "press1/target_qty",
        "press1/start",
    ]
    assert write_ok[1]["before"] == code_before
    assert write_ok[1]["after"] == 42
    assert {e["_device"] for e in write_ok} == {"press1"}


SPARE_TAGS = "".join(
    f'  [[devices.tags]]\n  name = "r{n}"\n  address = "hr:{300 + n}"\n  writable = true\n'
    for n in range(10)
)


def spare_config(broker: MosquittoBroker, data_dir: Path, port: int | None, workflows: str) -> str:
    return base_config(broker, data_dir, port) + SPARE_TAGS + workflows


async def test_wait_timeout_compensates_every_written_register(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # start_order as in the example, with a wait that cannot succeed: the press is on
    # quality hold, so starting it leaves it in state 3, never 1.
    workflow = """
[[workflows]]
name = "start_order"
params = { order_id = "str:1..16", product = "int:1..9999", quantity = "int:1..100000" }
steps = [
  { write = "press1/order_id", value = "{order_id}" },
  { write = "press1/product_code", value = "{product}" },
  { write = "press1/target_qty", value = "{quantity}" },
  { write = "press1/start", value = true, compensate_value = false },
  { wait = "press1/state_code", value = 1, timeout = "1s" },
  { confirm = "central", timeout = "10s" },
]
"""
    press_log = tmp_path / "press.jsonl"
    async with ModbusSimulator(port=0, seed=3, speed=0.0, write_log=press_log) as press:
        model = press.model(1)
        model.force_state(0)
        model.write("quality_hold", True)
        model.write("product_name", "OLD-ORDER")
        model.write("product_code", 7)
        model.write("target_qty", 123)
        before = model.snapshot()
        settings = settings_for(
            tmp_path, base_config(mosquitto, tmp_path / "d", press.port) + workflow
        )
        with CentralAcker(mosquitto) as central, CommandSender(mosquitto, ROOT) as sender:
            async with running(settings) as runtime:
                await wait_for(lambda: runtime.device_states() == {"press1": "up"})
                order = command({"order_id": "NEW-1", "product": 42, "quantity": 500})
                sender.send("start_order", order)
                reply = await finished(sender, order["id"])
                assert reply["status"] == "compensated", reply
                assert "did not reach 1 within 1s (last value 3)" in reply["detail"]
                assert "undone: step(s) 1, 2, 3, 4" in reply["detail"]
                await wait_for(
                    lambda: any(e["step"] == "finished" for e in central.workflow_events()),
                    message="audit trail",
                )
    after = model.snapshot()
    for point in ("product_name", "product_code", "target_qty", "start"):
        assert after[point] == before[point], point
    writes = ok_writes(press_log)
    # Forward in order, then compensation in reverse order, each exactly once.
    assert [(fc, address, values) for fc, address, values in writes] == [
        (16, 210, tuple(writes[0][2])),
        (6, 200, (42,)),
        (16, 201, (0, 500)),
        (5, 0, (True,)),
        (5, 0, (False,)),
        (16, 201, (0, 123)),
        (6, 200, (7,)),
        (16, 210, tuple(writes[7][2])),
    ]
    compensations = [e for e in central.workflow_events() if e["action"] == "compensate"]
    assert [(e["step"], e["result"]) for e in compensations] == [
        (4, "begin"),
        (4, "ok"),
        (3, "begin"),
        (3, "ok"),
        (2, "begin"),
        (2, "ok"),
        (1, "begin"),
        (1, "ok"),
    ]
    assert compensations[-1]["after"] == "OLD-ORDER"


async def test_broker_killed_during_confirm(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    workflows = """
[[workflows]]
name = "strict"
params = { v = "int:0..65535" }
on_uplink_failure = "compensate"
steps = [
  { write = "press1/r0", value = "{v}" },
  { confirm = "central", timeout = "30s" },
]

[[workflows]]
name = "lenient"
params = { v = "int:0..65535" }
on_uplink_failure = "continue"
steps = [
  { write = "press1/r1", value = "{v}" },
  { confirm = "central", timeout = "30s" },
  { write = "press1/r2", value = "{v}" },
]
"""
    press_log = tmp_path / "press.jsonl"
    async with (
        ModbusSimulator(port=0, seed=3, speed=0.0, write_log=press_log) as press,
        GatedProxy(mosquitto.port) as proxy,
    ):
        text = spare_config(mosquitto, tmp_path / "d", press.port, workflows)
        text = text.replace(mosquitto.url, f"mqtt://127.0.0.1:{proxy.port}")
        settings = settings_for(tmp_path, text)
        with CentralAcker(mosquitto) as central, CommandSender(mosquitto, ROOT) as sender:
            async with running(settings) as runtime:
                engine = runtime.gateway.workflows if runtime.gateway else None
                assert engine is not None
                assert engine.saga_log is not None
                saga_log = engine.saga_log
                await wait_for(lambda: runtime.device_states() == {"press1": "up"})
                central.paused = True  # the central store stops answering
                strict, lenient = command({"v": 11}), command({"v": 22})
                sender.send("strict", strict)
                sender.send("lenient", lenient)

                async def both_confirming() -> bool:
                    sagas = [
                        await saga_log.find("strict", strict["id"]),
                        await saga_log.find("lenient", lenient["id"]),
                    ]
                    return all(
                        s is not None and 2 in s.steps and s.steps[2].phase == "waiting"
                        for s in sagas
                    )

                loop = asyncio.get_running_loop()
                deadline = loop.time() + 15
                while not await both_confirming():
                    assert loop.time() < deadline, "sagas never reached their confirm step"
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(mosquitto.kill)

                async def outcome(workflow: str, command_id: str, states: set[str]) -> SagaRecord:
                    deadline = loop.time() + 15
                    while True:
                        saga = await saga_log.find(workflow, command_id)
                        if saga is not None and saga.state in states:
                            return saga
                        assert loop.time() < deadline, f"{workflow}: {saga}"
                        await asyncio.sleep(0.05)

                strict_saga = await outcome("strict", strict["id"], {"compensated", "failed"})
                lenient_saga = await outcome("lenient", lenient["id"], {"completed", "failed"})
                assert strict_saga.state == "compensated", strict_saga.detail
                assert "the central store did not confirm: the uplink" in (strict_saga.detail or "")
                assert lenient_saga.state == "completed"
                assert lenient_saga.confirm_pending
                assert lenient_saga.steps[2].phase == "deferred"
                # Replies due meanwhile are kept in memory.
                assert runtime.gateway is not None
                assert not runtime.gateway.mqtt.is_connected
                # The uplink returns: our subscribers first (the gate holds the agent back),
                # then the agent: the kept replies go out, the central store acks.
                proxy.close_gate()
                await asyncio.to_thread(mosquitto.restart)
                await asyncio.to_thread(sender.reconnect)
                await asyncio.to_thread(central.reconnect)
                central.paused = False
                proxy.open_gate()
                confirmed = await asyncio.to_thread(
                    lambda: _wait_reply(sender, lenient["id"], "confirmed")
                )
                assert confirmed["status"] == "completed"
                saga = await saga_log.find("lenient", lenient["id"])
                assert saga is not None
                assert saga.confirmed
                assert not saga.confirm_pending
                strict_reply = await asyncio.to_thread(
                    sender.wait_status, strict["id"], ("compensated",), 20
                )
                assert "central store did not confirm" in strict_reply["detail"]
                statuses = [r["status"] for r in sender.for_id(lenient["id"])]
                assert statuses[-2:] == ["completed", "completed"]
    # strict: written then restored; lenient: both writes stay.
    writes = [(a, v) for _, a, v in ok_writes(press_log)]
    assert writes.count((300, (11,))) == 1
    assert writes.count((300, (0,))) == 1
    assert writes.count((301, (22,))) == 1
    assert writes.count((302, (22,))) == 1
    assert any(e["step"] == "confirmed" for e in central.workflow_events())


def _wait_reply(sender: CommandSender, command_id: str, text: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        for reply in sender.for_id(command_id):
            if text in reply["detail"]:
                return reply
        if time.monotonic() > deadline:
            raise TimeoutError(f"no reply containing {text!r}: {sender.for_id(command_id)}")
        time.sleep(0.02)


HOSTILE_WORKFLOWS = """
[[workflows]]
name = "burst_target"
params = { v = "int:0..65535" }
rate_limit = "1/1h"
steps = [
  { write = "press1/r0", value = "{v}" },
]
"""


def hostile_commands() -> list[tuple[str, bytes, str | None, str]]:
    """(workflow, payload, id the reply carries, part of the reason) of hostile commands."""
    good = {"order_id": "A-1", "product": 42, "quantity": 5}

    def doc(command_id: str, params: Any, **extra: Any) -> bytes:
        return json.dumps({"id": command_id, "params": params, **extra}).encode()

    return [
        ("start_order", b"{not json", None, "invalid JSON"),
        ("start_order", b"\xff\xfe\x00", None, "not UTF-8"),
        ("start_order", b"x" * (1024 * 1024), None, "payload too large"),
        (
            "start_order",
            b'{"id":"deep-1","params":' + b"[" * 6000 + b"]" * 6000 + b"}",
            None,
            "nested deeper",
        ),
        (
            "start_order",
            b'{"id":"deep-2","params":{"a":[[[[[[[[[[1]]]]]]]]]]}}',
            "deep-2",
            "nested deeper",
        ),
        (
            "start_order",
            b'{"id":"nan-1","params":{"order_id":"A","product":NaN,"quantity":1}}',
            None,
            "invalid JSON",
        ),
        ("start_order", b'{"id":"dup-1","id":"dup-2","params":{}}', None, "duplicate key"),
        (
            "start_order",
            doc("type-1", good | {"product": "42"}),
            "type-1",
            "params.product: expected a number, got a string",
        ),
        (
            "start_order",
            doc("type-2", good | {"quantity": 1.5}),
            "type-2",
            "params.quantity: expected an integer",
        ),
        (
            "start_order",
            doc("type-3", good | {"product": True}),
            "type-3",
            "params.product: expected a number, got a boolean",
        ),
        (
            "maintenance_lockout",
            doc("type-4", {"technician": "A", "lock": 1}),
            "type-4",
            "params.lock: expected true or false",
        ),
        ("start_order", doc("range-1", good | {"product": 0}), "range-1", "below the minimum 1"),
        (
            "start_order",
            doc("range-2", good | {"product": 10000}),
            "range-2",
            "above the maximum 9999",
        ),
        (
            "start_order",
            doc("range-3", good | {"quantity": 10**30}),
            "range-3",
            "above the maximum 100000",
        ),
        ("start_order", doc("len-1", good | {"order_id": ""}), "len-1", "at least 1"),
        ("start_order", doc("len-2", good | {"order_id": "X" * 17}), "len-2", "at most 16"),
        (
            "start_order",
            doc("ctl-1", good | {"order_id": "A\u0000B"}),
            "ctl-1",
            "control characters",
        ),
        (
            "start_order",
            doc("enc-1", good | {"order_id": "€uro"}),
            "enc-1",
            "step 1 (press1/order_id): '€uro': a PLC string holds Latin-1 characters only",
        ),
        ("start_order", doc("key-1", good | {"sql": "drop"}), "key-1", "unknown parameter(s)"),
        ("start_order", doc("key-2", {"order_id": "A"}), "key-2", "missing parameter(s)"),
        ("start_order", doc("key-3", good, run_as="root"), "key-3", "unknown key(s)"),
        ("start_order", doc("params-1", [1, 2]), "params-1", '"params" must be an object'),
        ("start_order", doc("bad id with spaces", good), None, '"id" must be a string'),
        ("start_order", doc("i" * 129, good), None, '"id" must be a string'),
        ("start_order", b'{"params":{}}', None, 'missing "id"'),
        ("start_order", b"[1,2,3]", None, "a command is a JSON object"),
        ("drop_tables", doc("wf-1", {}), "wf-1", "unknown workflow 'drop_tables'"),
    ]


async def test_hostile_commands_write_nothing(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    press_log = tmp_path / "press.jsonl"
    async with ModbusSimulator(port=0, seed=3, speed=0.0, write_log=press_log) as press:
        text = spare_config(
            mosquitto, tmp_path / "d", press.port, example_workflows() + HOSTILE_WORKFLOWS
        )
        settings = settings_for(tmp_path, text.replace('"filler/hold"', '"press1/start"'))
        hostile = hostile_commands()
        with CentralAcker(mosquitto) as central, CommandSender(mosquitto, ROOT) as sender:
            async with running(settings) as runtime:
                engine = runtime.gateway.workflows if runtime.gateway else None
                assert engine is not None
                poller = runtime.pollers["press1"]
                await wait_for(lambda: poller.state == "up")
                for workflow, payload, _, _ in hostile:
                    await asyncio.to_thread(sender.send, workflow, payload)
                await wait_for(lambda: sender.count() >= len(hostile), message="hostile replies")

                # The same id twice runs once; the second gets the first's status.
                lock = command({"technician": "B. Jones", "lock": True}, "replay-1")
                sender.send("maintenance_lockout", lock)
                first = await finished(sender, "replay-1")
                assert first["status"] == "completed", first
                sender.send("maintenance_lockout", lock)
                await wait_for(lambda: len(sender.for_id("replay-1")) >= 3)
                replayed = sender.for_id("replay-1")[2]
                assert replayed["status"] == "completed"
                assert replayed["detail"].startswith("duplicate id")

                # A burst of 1,000 valid commands: one runs, every other is refused.
                polls, errors = poller.polls, poller.poll_errors
                ids = [f"burst-{n}" for n in range(1000)]
                payloads = [json.dumps({"id": i, "params": {"v": 7}}).encode() for i in ids]
                await asyncio.to_thread(sender.burst, "burst_target", payloads)
                await wait_for(
                    lambda: all(sender.for_id(i) for i in ids), timeout=30, message="burst replies"
                )
                await wait_for(lambda: engine.stats.completed == 2, message="burst saga")
                burst_polls = poller.polls - polls
                burst_errors = poller.poll_errors - errors
                assert poller.state == "up"
                expected_rejections = len(hostile) + 999
                await wait_for(
                    lambda: (
                        len([e for e in central.workflow_events() if e["action"] == "reject"])
                        >= expected_rejections
                    ),
                    timeout=30,
                    message="every rejection audited",
                )
        rejections = [e for e in central.workflow_events() if e["action"] == "reject"]
    for workflow, _, command_id, reason in hostile:
        replies = [
            reply
            for w, reply in sender.replies
            if w == workflow and reply["id"] == command_id and reason in reply["detail"]
        ]
        assert replies, (workflow, command_id, reason)
        assert all(reply["status"] == "rejected" for reply in replies)
    null_ids = [reply for _, reply in sender.replies if reply["id"] is None]
    assert len(null_ids) == len([h for h in hostile if h[2] is None])
    statuses = [sender.for_id(i)[0]["status"] for i in ids]
    assert statuses.count("accepted") == 1
    assert statuses.count("rejected") == 999
    refused = [
        sender.for_id(i)[0]["detail"] for i in ids if sender.for_id(i)[0]["status"] == "rejected"
    ]
    assert all(d.startswith(("busy: saga ", "rate limited: at most 1/1h")) for d in refused)
    assert len(rejections) == expected_rejections
    assert {e["result"] for e in rejections} == {"rejected"}
    # Zero unintended writes: the lockout and the one burst saga.
    assert [(a, v) for _, a, v in ok_writes(press_log)] == [(3, (True,)), (300, (7,))]
    # Polling went on during the burst, without a single failed poll. (How many ticks a
    # loaded machine skips is a matter of wall-clock speed, not asserted here.)
    assert burst_polls >= 5
    assert burst_errors == 0


RECOVERY_WORKFLOWS = """
[[workflows]]
name = "w_applied"
params = { v = "int" }
steps = [{ write = "press1/r0", value = "{v}" }, { write = "press1/r1", value = "{v}" }]

[[workflows]]
name = "w_not_applied"
params = { v = "int" }
steps = [{ write = "press1/r2", value = "{v}" }, { write = "press1/r3", value = "{v}" }]

[[workflows]]
name = "w_unknown"
params = { v = "int" }
steps = [{ write = "press1/r4", value = "{v}" }]

[[workflows]]
name = "w_compensating"
params = { v = "int" }
steps = [{ write = "press1/r5", value = "{v}" }, { write = "press1/r6", value = "{v}" }]

[[workflows]]
name = "w_wait"
params = { v = "int" }
steps = [{ write = "press1/r7", value = "{v}" }, { wait = "press1/r8", value = "{v}", timeout = "2s" }]

[[workflows]]
name = "w_confirm"
params = { v = "int" }
steps = [{ write = "press1/r9", value = "{v}" }, { confirm = "central", timeout = "10s" }]

[[workflows]]
name = "w_stale"
params = { v = "int" }
steps = [{ write = "press1/r0", value = 9 }, { write = "press1/r1", value = 9 }]
"""


async def _registers(port: int | None, values: dict[int, int] | None = None) -> list[int]:
    from pymodbus.client import AsyncModbusTcpClient

    assert port is not None
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    try:
        for address, value in (values or {}).items():
            await client.write_register(address, value)
        response = await client.read_holding_registers(300, count=10)
        return list(response.registers)
    finally:
        client.close()


def _saga(workflow: str, state: str, *steps: StepRecord, age: float = 1.0) -> SagaRecord:
    saga = SagaRecord(
        id=str(uuid.uuid4()),
        workflow=workflow,
        command_id=f"{workflow}-1",
        params={"v": 5},
        state=state,  # type: ignore[arg-type]
        step=max((s.idx for s in steps), default=0),
        started_stream="a-stream-that-is-gone",
        started_seq=1,
    )
    saga.steps = {s.idx: s for s in steps}
    saga.created = saga.updated = time.time() - age
    return saga


async def test_recovery_settles_in_doubt_steps_by_reading_back(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    press_log = tmp_path / "press.jsonl"
    data = tmp_path / "d"

    def write(idx: int, ref: str, phase: str, value: int, previous: int = 0) -> StepRecord:
        return StepRecord(idx, "write", ref, phase, previous=previous, value=value, target=previous)  # type: ignore[arg-type]

    crashed = [
        # The PLC shows the written value: done, the saga resumes after it (no write).
        _saga(
            "w_applied",
            "running",
            write(1, "press1/r0", "done", 5),
            write(2, "press1/r1", "intent", 5),
        ),
        # The PLC shows the previous value: not done, the step runs (once).
        _saga(
            "w_not_applied",
            "running",
            write(1, "press1/r2", "done", 5),
            write(2, "press1/r3", "intent", 5),
        ),
        # Neither: unknown, the previous value is restored.
        _saga("w_unknown", "running", write(1, "press1/r4", "intent", 5)),
        # Compensation in doubt: the restored value is there (no write), then step 1 is undone.
        _saga(
            "w_compensating",
            "compensating",
            write(1, "press1/r5", "done", 5),
            write(2, "press1/r6", "compensating", 5),
        ),
        # A wait in progress runs again with a fresh timeout.
        _saga(
            "w_wait",
            "running",
            write(1, "press1/r7", "done", 5),
            StepRecord(2, "wait", "press1/r8", "waiting", value=5),
        ),
        # A confirm in progress: its started event is re-sent to the new outbox stream.
        _saga(
            "w_confirm",
            "running",
            write(1, "press1/r9", "done", 5),
            StepRecord(2, "confirm", None, "waiting", value=1),
        ),
    ]
    # Interrupted too long ago: compensated, not resumed.
    stale = _saga("w_stale", "running", write(1, "press1/r0", "done", 5, previous=5), age=7200)
    async with SagaLog(data / "sagas.db") as saga_log:
        for saga in [*crashed, stale]:
            steps = saga.steps
            saga.steps = {}
            await saga_log.create(saga)
            saga.updated = saga.created
            await saga_log.save(saga, *steps.values())
        # save() stamps `updated` with now: age the stale one by hand.
        db = saga_log._conn()
        await db.execute(
            "UPDATE sagas SET updated = ? WHERE id = ?", (time.time() - 7200, stale.id)
        )
    async with ModbusSimulator(port=0, seed=3, speed=0.0, write_log=press_log) as press:
        # What the PLC holds after the "crash": r0 r1 r2 r3 r4 r5 r6 r7 r8 r9.
        await _registers(
            press.port, {300: 5, 301: 5, 302: 5, 304: 99, 305: 5, 307: 5, 308: 5, 309: 5}
        )
        baseline = len(ok_writes(press_log))
        settings = settings_for(
            tmp_path, spare_config(mosquitto, data, press.port, RECOVERY_WORKFLOWS)
        )
        with CentralAcker(mosquitto) as central:
            async with running(settings) as runtime:
                engine = runtime.gateway.workflows if runtime.gateway else None
                assert engine is not None
                assert engine.saga_log is not None
                saga_log = engine.saga_log

                async def settled() -> bool:
                    return all(s.finished for s in await saga_log.all())

                await wait_for(settled, timeout=30, message="every saga resolved")
                final = {s.workflow: s for s in await saga_log.all()}
            registers = await _registers(press.port)
    states = {name: saga.state for name, saga in final.items()}
    assert states == {
        "w_applied": "completed",
        "w_not_applied": "completed",
        "w_unknown": "compensated",
        "w_compensating": "compensated",
        "w_wait": "completed",
        "w_confirm": "completed",
        "w_stale": "compensated",
    }, {name: saga.detail for name, saga in final.items()}
    assert final["w_applied"].steps[2].phase == "done"
    assert final["w_not_applied"].steps[2].phase == "done"
    assert final["w_unknown"].steps[1].phase == "compensated"
    assert final["w_compensating"].steps[2].phase == "compensated"
    assert "settled by reading back" in (final["w_compensating"].steps[2].detail or "")
    assert final["w_confirm"].confirmed
    assert final["w_confirm"].started_stream != "a-stream-that-is-gone"
    assert "not resumed" in (final["w_stale"].detail or "")
    writes = [(a, v) for _, a, v in ok_writes(press_log)[baseline:]]
    # Only: r3 written once (not applied before), r4 restored, r5 undone, stale r0 restored.
    assert sorted(writes) == sorted([(303, (5,)), (304, (0,)), (305, (0,)), (300, (5,))])
    assert registers[:10] == [5, 5, 5, 5, 0, 0, 0, 5, 5, 5]
    recoveries = [e for e in central.workflow_events() if e["action"] == "recover"]
    assert {e["result"] for e in recoveries} >= {"begin", "applied", "not_applied", "unknown"}


EXCLUSIVE_WORKFLOWS = """
[[workflows]]
name = "slow"
params = {}
exclusive = "machine"
steps = [
  { write = "press1/r0", value = 5 },
  { wait = "press1/r1", value = 1, timeout = "20s" },
]

[[workflows]]
name = "other"
params = {}
rate_limit = "1/1h"
steps = [{ write = "press1/r2", value = 6 }]

[[workflows]]
name = "fragile"
params = {}
steps = [
  { write = "press1/r3", value = 7 },
  { wait = "press1/r4", value = 1, timeout = "2s" },
]
"""


async def test_exclusivity_rate_limit_and_a_failed_compensation(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    press_log = tmp_path / "press.jsonl"
    async with ModbusSimulator(port=0, seed=3, speed=0.0, write_log=press_log) as press:
        text = spare_config(mosquitto, tmp_path / "d", press.port, EXCLUSIVE_WORKFLOWS)
        settings = settings_for(tmp_path, text)
        with CentralAcker(mosquitto) as central, CommandSender(mosquitto, ROOT) as sender:
            async with running(settings) as runtime:
                await wait_for(lambda: runtime.device_states() == {"press1": "up"})
                sender.send("slow", command({}, "slow-1"))
                await asyncio.to_thread(sender.wait_status, "slow-1", ("accepted",))
                # A machine-exclusive saga holds press1: nothing else runs on it meanwhile.
                sender.send("other", command({}, "other-1"))
                sender.send("slow", command({}, "slow-2"))
                busy = [
                    await asyncio.to_thread(sender.wait_status, i, ("rejected",))
                    for i in ("other-1", "slow-2")
                ]
                assert all(r["detail"].startswith("busy: saga ") for r in busy), busy
                await _registers(press.port, {301: 1})  # the line reports ready
                assert (await finished(sender, "slow-1"))["status"] == "completed"
                # The id of a busy rejection may be sent again (it never ran).
                sender.send("other", command({}, "other-1"))
                again = await asyncio.to_thread(
                    sender.wait_status, "other-1", ("completed", "rejected"), 20, 1
                )
                assert again["status"] == "completed", again
                sender.send("other", command({}, "other-2"))
                limited = await finished(sender, "other-2")
                assert limited["status"] == "rejected"
                assert limited["detail"] == "rate limited: at most 1/1h"

                # A compensation the PLC refuses: `failed`, an alarm, a person is needed.
                sender.send("fragile", command({}, "fragile-1"))
                await asyncio.to_thread(sender.wait_status, "fragile-1", ("accepted",))
                # Refuse hr:303 only once the write is verified: refused earlier, the driver's
                # read-back fails, the write is unverified and the saga reads back for up to
                # SETTLE_DEADLINE (30 s) before compensating (seen once under full-suite load).
                engine = runtime.gateway.workflows if runtime.gateway else None
                assert engine is not None
                assert engine.saga_log is not None
                saga_log = engine.saga_log
                async with asyncio.timeout(20):
                    while True:
                        sagas = await saga_log.all()
                        if any(
                            saga.command_id == "fragile-1"
                            and 1 in saga.steps
                            and saga.steps[1].phase == "done"
                            for saga in sagas
                        ):
                            break
                        await asyncio.sleep(0.02)
                assert (303, (7,)) in [(a, v) for _, a, v in ok_writes(press_log)]
                press.exception(4, ["hr:303"])
                failed = await finished(sender, "fragile-1")
                press.exception(None)
                assert failed["status"] == "failed", failed
                assert "the line needs a person" in failed["detail"]
                await wait_for(lambda: bool(central.kinds("alarm")), message="alarm event")
        alarm = central.kinds("alarm")[0]
    assert alarm["value"]["command_id"] == "fragile-1"
    assert alarm["value"]["severity"] == "critical"
    assert alarm["device"] == "press1"
    assert "compensation FAILED for step(s) 1" in alarm["value"]["message"]
