"""Kill -9 of the agent at every saga step boundary (failpoints), then a restart without them:
every saga ends `completed` or `compensated`, and the simulator's write log shows no step
applied twice (each forward write and each compensation write at most once).

The agent runs as `python -m agent.cli run` (the real daemon); ``EDGE_AGENT_FAILPOINTS`` makes
it SIGKILL itself at the named point. Scenarios run four at a time, each with its own
simulator, data directory and gateway id on one broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from simulators.modbus.server import ModbusSimulator
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.mqtt_client import MqttTestClient
from tests.fixtures.workflows import REPO, CentralAcker, ok_writes, saga_rows, step_rows

pytestmark = pytest.mark.slow

LANES = 4

WORKFLOWS = """
[[workflows]]
name = "forward"
params = { a = "int:1..60000", b = "int:1..60000" }
on_uplink_failure = "compensate"
steps = [
  { write = "press1/r0", value = "{a}" },
  { write = "press1/r1", value = "{b}" },
  { wait = "press1/r0", value = "{a}", timeout = "5s" },
  { confirm = "central", timeout = "15s" },
]

[[workflows]]
name = "undo"
params = { a = "int:1..60000", b = "int:1..60000" }
steps = [
  { write = "press1/r2", value = "{a}" },
  { write = "press1/r3", value = "{b}" },
  { wait = "press1/r4", value = 1, timeout = "1s" },
]
"""

FORWARD_POINTS = [
    "saga.after_accept=kill",
    "saga.before_write=kill@1",
    "saga.before_write=kill@2",
    "saga.after_write_sent=kill@1",
    "saga.after_write_sent=kill@2",
    "saga.after_step_committed=kill@1",
    "saga.after_step_committed=kill@2",
    "saga.after_step_committed=kill@3",
    "saga.after_step_committed=kill@4",
    "saga.before_wait=kill",
    "saga.before_confirm=kill",
    "saga.before_finish=kill",
]
UNDO_POINTS = [
    "saga.after_step_committed=kill@3",
    "saga.before_compensate=kill",
    "saga.before_compensate_write=kill@1",
    "saga.before_compensate_write=kill@2",
    "saga.after_compensate_sent=kill@1",
    "saga.after_compensate_sent=kill@2",
    "saga.after_compensate_committed=kill@1",
    "saga.after_compensate_committed=kill@2",
    "saga.before_finish=kill",
]


@dataclass(frozen=True)
class Scenario:
    index: int
    workflow: str
    failpoint: str

    @property
    def gateway(self) -> str:
        return f"gw{self.index}"

    @property
    def root(self) -> str:
        return f"plant1/crash/{self.gateway}"

    @property
    def a(self) -> int:
        return 1000 + self.index

    @property
    def b(self) -> int:
        return 2000 + self.index


SCENARIOS = [Scenario(i, "forward", p) for i, p in enumerate(FORWARD_POINTS)] + [
    Scenario(len(FORWARD_POINTS) + i, "undo", p) for i, p in enumerate(UNDO_POINTS)
]


def agent_config(broker: MosquittoBroker, scenario: Scenario, port: int | None, data: Path) -> str:
    tags = "".join(
        f'  [[devices.tags]]\n  name = "r{n}"\n  address = "hr:{300 + n}"\n  writable = true\n'
        for n in range(5)
    )
    return f"""
[gateway]
id = "{scenario.gateway}"
site = "plant1"
area = "crash"
line = "{scenario.gateway}"
data_dir = "{data}"

[mqtt]
url = "{broker.url}"
ack_timeout = "2s"

[http]
enabled = false

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:{port}"
poll_interval = "100ms"
timeout = "500ms"
read_retries = 0
{tags}
{WORKFLOWS}"""


async def start_agent(
    config: Path, log: Path, failpoints: str | None
) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_FAILPOINTS"}
    if failpoints:
        env["EDGE_AGENT_FAILPOINTS"] = failpoints
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "-c",
            str(config),
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


async def kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


async def run_scenario(
    broker: MosquittoBroker, central: CentralAcker, scenario: Scenario, tmp_path: Path
) -> dict[str, Any]:
    base = tmp_path / scenario.gateway
    base.mkdir()
    data, wlog, alog = base / "data", base / "writes.jsonl", base / "agent.log"
    command = json.dumps(
        {"id": f"cmd-{scenario.index}", "params": {"a": scenario.a, "b": scenario.b}}
    )
    topic = f"{scenario.root}/_cmd/{scenario.workflow}"
    async with ModbusSimulator(port=0, seed=scenario.index, speed=0.0, write_log=wlog) as sim:
        config = base / "agent.toml"
        config.write_text(agent_config(broker, scenario, sim.port, data))
        sender = MqttTestClient.for_broker(broker)
        await asyncio.to_thread(sender.connect)
        await asyncio.to_thread(sender.subscribe, f"{scenario.root}/_cmd/+/reply")
        processes: list[asyncio.subprocess.Process] = []
        try:
            agent = await start_agent(config, alog, scenario.failpoint)
            processes.append(agent)
            # Until the agent answers (it subscribes once started) or dies: the same id, so
            # a repeat never runs the saga twice.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while agent.returncode is None and sender.messages.empty():
                assert loop.time() < deadline, f"{scenario}: no reply, agent alive"
                await asyncio.to_thread(sender.publish, topic, command)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(agent.wait(), 0.5)
            async with asyncio.timeout(30):
                code = await agent.wait()
            assert code == -signal.SIGKILL, f"{scenario}: exit {code}, see {alog}"
            # Restart without failpoints: recovery resolves the saga.
            agent = await start_agent(config, alog, None)
            processes.append(agent)
            db = data / "sagas.db"
            deadline = loop.time() + 45
            while True:
                rows = await asyncio.to_thread(saga_rows, db)
                if rows and all(r["state"] in ("completed", "compensated", "failed") for r in rows):
                    break
                assert agent.returncode is None, f"{scenario}: agent exited, see {alog}"
                assert loop.time() < deadline, f"{scenario}: unresolved {rows}, see {alog}"
                await asyncio.sleep(0.1)
            steps = await asyncio.to_thread(step_rows, db, rows[0]["id"])
            # The final reply reaches the command's sender.
            replies: list[dict[str, Any]] = []
            deadline = loop.time() + 20
            while not any(r["status"] in ("completed", "compensated") for r in replies):
                assert loop.time() < deadline, f"{scenario}: replies {replies}"
                with contextlib.suppress(TimeoutError):
                    message = await asyncio.to_thread(sender.wait_for_message, 0.2)
                    replies.append(json.loads(message.payload))
            # ...and the audit trail reaches the (stand-in) central store.
            deadline = loop.time() + 20
            while not any(
                e["step"] == "finished" for e in central.workflow_events(scenario.gateway)
            ):
                assert loop.time() < deadline, f"{scenario}: no audit trail"
                await asyncio.sleep(0.05)
            recovered = [
                (e["step"], e["result"])
                for e in central.workflow_events(scenario.gateway)
                if e["action"] == "recover"
            ]
        finally:
            for process in processes:
                await kill(process)
            await asyncio.to_thread(sender.close)
        registers = [sim._units[1].spare[n] for n in range(5)]  # what the PLC holds now
    return {
        "rows": rows,
        "steps": steps,
        "writes": ok_writes(wlog),
        "registers": registers,
        "replies": replies,
        "recovered": recovered,
    }


async def test_kill_at_every_step_boundary(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    lanes = asyncio.Semaphore(LANES)

    async def one(scenario: Scenario, central: CentralAcker) -> dict[str, Any]:
        async with lanes:
            return await run_scenario(mosquitto, central, scenario, tmp_path)

    with CentralAcker(mosquitto) as central:
        results = await asyncio.gather(*(one(s, central) for s in SCENARIOS))
    problems = []
    for scenario, result in zip(SCENARIOS, results, strict=True):
        rows = result["rows"]
        assert len(rows) == 1, (scenario, rows)
        saga = rows[0]
        expected = "completed" if scenario.workflow == "forward" else "compensated"
        if saga["state"] != expected:
            problems.append(f"{scenario}: {saga['state']}: {saga['detail']}")
            continue
        writes = Counter((address, values) for _, address, values in result["writes"])
        twice = {key: n for key, n in writes.items() if n > 1}
        if twice:
            problems.append(f"{scenario}: written more than once: {twice}")
        registers = result["registers"]
        if scenario.workflow == "forward":
            assert registers[:2] == [scenario.a, scenario.b], scenario
            assert set(writes) == {(300, (scenario.a,)), (301, (scenario.b,))}, scenario
        else:
            # Undone: both registers back to their previous value (0).
            assert registers[2:4] == [0, 0], scenario
            assert set(writes) <= {
                (302, (scenario.a,)),
                (303, (scenario.b,)),
                (302, (0,)),
                (303, (0,)),
            }, scenario
        assert result["replies"][-1]["status"] == expected, (scenario, result["replies"])
        # The audit trail shows how the step in doubt was settled after the restart.
        recovered = result["recovered"]
        point, _, hit = scenario.failpoint.partition("=kill")
        step = int(hit[1:]) if hit else 1
        if point == "saga.after_write_sent":
            assert (step, "applied") in recovered, (scenario, recovered)
        elif point == "saga.before_write":
            assert (step, "not_applied") in recovered, (scenario, recovered)
        else:
            assert ("recovery", "begin") in recovered, (scenario, recovered)
    assert not problems, "\n".join(problems)
