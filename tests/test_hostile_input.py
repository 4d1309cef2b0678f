"""Hostile input against a running agent and ingest (issue #18): 60 malformed or forged S/sync
batches and acks, and 60 hostile commands. Afterwards the ingest and the agent are up, nothing
malformed is stored or acknowledged, the gateway deleted nothing it had to keep (every seq it
committed reaches PostgreSQL), no rejected command wrote the PLC, and neither process grew
beyond a bound."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
import pytest

from simulators.modbus.server import ModbusSimulator
from tests.fixtures import ChildProcess, MosquittoBroker, PostgresServer
from tests.fixtures.mqtt_client import MqttTestClient
from tests.fixtures.ports import async_wait_until, free_port
from tests.fixtures.workflows import CommandSender, write_log

pytestmark = pytest.mark.slow

ROOT = "plant1/assembly/line3"
GATEWAY = "plant1-line3"
MAX_GROWTH = 64 * 1024 * 1024  # bytes of RSS either process may add during the onslaught


def agent_config(broker: MosquittoBroker, sim_port: int, data_dir: Path, http: int) -> str:
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
listen = "127.0.0.1:{http}"

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:{sim_port}"
poll_interval = "200ms"
timeout = "1s"
  [[devices.tags]]
  name = "state_code"
  address = "hr:100"
  [[devices.tags]]
  name = "total_count"
  address = "hr:102"
  type = "uint32"
  [[devices.tags]]
  name = "product_code"
  address = "hr:200"
  writable = true
  [[devices.tags]]
  name = "order_id"
  address = "hr:210"
  type = "string"
  length = 16
  writable = true

[[workflows]]
name = "set_order"
params = {{ order = "str:1..16", product = "int:1..9999" }}
rate_limit = "1000/1s"
steps = [
  {{ write = "press1/order_id", value = "{{order}}" }},
  {{ write = "press1/product_code", value = "{{product}}" }},
]
"""


def central_config(broker: MosquittoBroker, dsn: str, http: int) -> str:
    return f"""
[mqtt]
url = "{broker.url}"
sync_prefix = "edge"

[postgres]
dsn = "{dsn}"

[http]
listen = "127.0.0.1:{http}"
"""


def get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.loads(response.read())


def rss(pid: int) -> int:
    """Resident set size of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def ts(offset: float = 0.0) -> str:
    moment = time.gmtime(time.time() + offset)
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", moment)


def event(seq: int, **fields: Any) -> dict[str, Any]:
    base = {
        "seq": seq,
        "ts": ts(),
        "kind": "sample",
        "device": "forged",
        "tag": "x",
        "value": 1,
        "quality": "good",
    }
    return {**base, **fields}


def hostile_batches(stream: str) -> list[tuple[str, bytes]]:
    """(topic, payload): forged ranges, bad gap declarations, bad times, bad documents, acks."""
    sync, ack = f"edge/{GATEWAY}/sync", f"edge/{GATEWAY}/ack"
    huge = 2**63 - 1
    documents: list[dict[str, Any]] = []
    for spelled in (stream, stream.upper(), "urn:uuid:" + stream, "{" + stream + "}"):
        documents.append({"first_seq": 1, "last_seq": huge, "events": []})
        documents[-1]["stream"] = spelled
    for first, last in ((1, 10), (5, 5), (10**6, 10**6 + 5), (huge - 1, huge)):
        documents.append({"stream": stream, "first_seq": first, "last_seq": last, "events": []})
    for first, last, seqs in ((1, 100, [1]), (10**6, 10**6 + 9, [10**6, 10**6 + 9])):
        documents.append(
            {
                "stream": stream,
                "first_seq": first,
                "last_seq": last,
                "events": [event(s) for s in seqs],
            }
        )
    # A run of events with a seq missing inside, at many places of the seq space.
    for n in range(12):
        first = 10**5 + n * 100
        seqs = [first + i for i in range(10) if i != n % 10]
        documents.append(
            {
                "stream": stream,
                "first_seq": first,
                "last_seq": first + 9,
                "events": [event(seq) for seq in seqs],
            }
        )
    # Gap events that declare what they may not: their own seq or later, nonsense ranges.
    for ranges in ([[1, huge]], [[1, 10**7]], [[0, 5]], [[5, 1]], [["a", "b"]], [[1]], "x", None):
        gap = event(
            10**7,
            kind="gap",
            device=None,
            tag=None,
            value={"reason": "buffer_full", "ranges": ranges, "count": 1},
        )
        documents.append({"stream": stream, "first_seq": 10**7, "last_seq": 10**7, "events": [gap]})
    # Times the store cannot hold, or that no gateway can have produced.
    for moment in (
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999Z",
        "1969-12-31T23:59:59Z",
        ts(86400 * 3),
        "infinity",
        "2026-13-01T00:00:00Z",
        "",
        5,
    ):
        documents.append(
            {
                "stream": stream,
                "first_seq": 10**8,
                "last_seq": 10**8,
                "events": [event(10**8, ts=moment)],
            }
        )
    # Bad events.
    for fields in (
        {"kind": "nope"},
        {"device": "a\x00b"},
        {"seq": 0},
        {"seq": -1},
        {"seq": True},
        {"value": float("inf")},
        {"quality": 5},
        {"tag": ["x"]},
    ):
        bad = {**event(10**8 + 1), **fields}
        documents.append(
            {"stream": stream, "first_seq": 10**8 + 1, "last_seq": 10**8 + 1, "events": [bad]}
        )
    # Bad envelopes: another stream form, another gateway, reversed, repeated seqs.
    for envelope in (
        {"stream": "not-a-uuid", "first_seq": 1, "last_seq": 1, "events": [event(1)]},
        {
            "stream": stream,
            "gateway": "other-gw",
            "first_seq": 1,
            "last_seq": 1,
            "events": [event(1)],
        },
        {"stream": stream, "first_seq": 5, "last_seq": 1, "events": []},
        {"stream": stream, "first_seq": 1, "last_seq": 2, "events": [event(1), event(1), event(2)]},
        {"stream": stream, "first_seq": 1, "last_seq": 1, "events": {"seq": 1}},
    ):
        documents.append(envelope)
    batches = [
        (sync, json.dumps({"gateway": GATEWAY, **doc}, allow_nan=True).encode())
        for doc in documents
    ]
    batches += [
        (sync, b"not json"),
        (sync, b"\xff\xfe"),
        (sync, b"[" * 5000 + b"]" * 5000),
        (
            sync,
            json.dumps(
                {
                    "gateway": GATEWAY,
                    "stream": stream,
                    "first_seq": 1,
                    "last_seq": 2,  # claims a seq it lacks: a large forged batch
                    "events": [event(1, value="x" * 500_000)],
                }
            ).encode(),
        ),
        (sync, b'{"gateway": "plant1-line3", "stream": NaN}'),
    ]
    # Forged acks: far beyond anything sent, in every spelling of the stream.
    for spelled in (stream, stream.upper(), "urn:uuid:" + stream, "{" + stream + "}"):
        batches.append((ack, json.dumps({"stream": spelled, "acked_seq": huge}).encode()))
    batches += [(ack, b"nonsense"), (ack, json.dumps({"stream": stream, "acked_seq": -5}).encode())]
    return batches


def hostile_commands() -> list[tuple[str, bytes, bool]]:
    """(workflow, payload, retained): every one must be rejected before any write."""
    good = {"order": "ORD-1", "product": 5}

    def cmd(command_id: str, params: Any, **extra: Any) -> bytes:
        return json.dumps({"id": command_id, "params": params, **extra}).encode()

    commands: list[tuple[str, bytes, bool]] = [
        ("set_order", b"", False),
        ("set_order", b"{", False),
        ("set_order", b"\xff", False),
        ("set_order", b"[]", False),
        ("set_order", b"null", False),
        ("set_order", b'{"id": "d1", "id": "d2", "params": {}}', False),
        ("set_order", b'{"id": "n1", "params": {"order": "A", "product": NaN}}', False),
        ("set_order", b'{"id": "i1", "params": {"order": "A", "product": Infinity}}', False),
        ("set_order", b"[" * 100 + b"]" * 100, False),
        ("set_order", cmd("big-1", {"order": "A" * 20_000, "product": 1}), False),
        ("set_order", cmd("deep-1", {"order": [[[[[[[[[["x"]]]]]]]]]], "product": 1}), False),
        ("set_order", json.dumps({"params": good}).encode(), False),
        ("set_order", json.dumps({"id": "", "params": good}).encode(), False),
        ("set_order", json.dumps({"id": "a b", "params": good}).encode(), False),
        ("set_order", json.dumps({"id": "x" * 200, "params": good}).encode(), False),
        ("set_order", json.dumps({"id": 5, "params": good}).encode(), False),
        ("set_order", json.dumps({"id": "k1", "params": good, "extra": 1}).encode(), False),
        ("set_order", json.dumps({"id": "k2"}).encode(), False),
        ("set_order", cmd("p1", None), False),
        ("set_order", cmd("p2", []), False),
        ("set_order", cmd("p3", {}), False),
        ("set_order", cmd("p4", {"order": "A"}), False),
        ("set_order", cmd("p5", {**good, "extra": 1}), False),
        ("set_order", cmd("p6", {"order": "A", "product": 0}), False),
        ("set_order", cmd("p7", {"order": "A", "product": 10_000}), False),
        ("set_order", cmd("p8", {"order": "A", "product": 1.5}), False),
        ("set_order", cmd("p9", {"order": "A", "product": "5"}), False),
        ("set_order", cmd("p10", {"order": "A", "product": True}), False),
        ("set_order", cmd("p11", {"order": "A", "product": 2**80}), False),
        ("set_order", cmd("p12", {"order": "", "product": 1}), False),
        ("set_order", cmd("p13", {"order": "A" * 17, "product": 1}), False),
        ("set_order", cmd("p14", {"order": "A\x00B", "product": 1}), False),
        ("set_order", cmd("p15", {"order": "A\nB", "product": 1}), False),
        ("set_order", cmd("p16", {"order": "€uro", "product": 1}), False),
        ("set_order", cmd("p17", {"order": 5, "product": 1}), False),
        ("set_order", cmd("p18", {"order": None, "product": 1}), False),
        ("set_order", cmd("r1", good), True),  # retained
        ("set_order", cmd("r2", good), True),
        ("nope", cmd("u1", good), False),
        ("SET_ORDER", cmd("u2", good), False),
        ("set_order/x", cmd("u3", good), False),
        ("set_order", b" " * 17_000, False),
        ("set_order", b"\x00" * 100, False),
        ("set_order", "🙂".encode() * 10, False),
        ("set_order", b'{"id": "q1", "params": {"order": "\\ud800", "product": 1}}', False),
    ]
    # Fill up to 60 with varied out-of-range values.
    n = 0
    while len(commands) < 60:
        commands.append(("set_order", cmd(f"v{n}", {"order": "A", "product": -n - 1}), False))
        n += 1
    return commands


async def test_hostile_batches_and_commands_change_nothing_they_must_not(
    mosquitto: MosquittoBroker,
    postgres: PostgresServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    dsn = await asyncio.to_thread(postgres.create_database, "plant")
    agent_http, ingest_http = free_port(), free_port()
    press_log = tmp_path / "press.jsonl"
    async with ModbusSimulator(port=0, seed=3, speed=2.0, write_log=press_log) as sim:
        (tmp_path / "agent.toml").write_text(
            agent_config(mosquitto, sim.port, tmp_path / "data", agent_http)
        )
        (tmp_path / "central.toml").write_text(central_config(mosquitto, dsn, ingest_http))
        python = [sys.executable, "-m", "agent.cli"]
        agent = ChildProcess(
            "agent", [*python, "run", "-c", str(tmp_path / "agent.toml")], tmp_path / "agent.log"
        )
        ingest = ChildProcess(
            "ingest",
            [*python, "ingest", "-c", str(tmp_path / "central.toml")],
            tmp_path / "ingest.log",
        )
        request.addfinalizer(agent.ensure_dead)
        request.addfinalizer(ingest.ensure_dead)
        ingest.start()
        agent.start()

        async def agent_status() -> dict[str, Any] | None:
            try:
                status: dict[str, Any] = await asyncio.to_thread(get_json, agent_http, "/status")
            except OSError:
                return None
            return status

        async def flowing() -> bool:
            status = await agent_status()
            return status is not None and status["acked_seq"] >= 20

        await async_wait_until(flowing, timeout=60, message="the agent's events acknowledged")
        status = await agent_status()
        assert status is not None
        stream = status["stream"]
        assert agent.pid is not None
        assert ingest.pid is not None
        agent_rss, ingest_rss = rss(agent.pid), rss(ingest.pid)

        batches = hostile_batches(stream)
        forged_batches = len([t for t, _ in batches if t.endswith("/sync")])
        commands = hostile_commands()
        assert len([t for t, _ in batches if t.endswith("/sync")]) >= 50
        assert len(commands) >= 50
        with CommandSender(mosquitto, ROOT) as sender:
            attacker = MqttTestClient.for_broker(mosquitto, protocol=mqtt.MQTTv5)
            attacker.connect()
            try:
                for topic, payload in batches:
                    await asyncio.to_thread(attacker.publish, topic, payload, 1)
                for workflow, payload, retain in commands:
                    info = attacker.client.publish(f"{ROOT}/_cmd/{workflow}", payload, 1, retain)
                    await asyncio.to_thread(info.wait_for_publish, 5)
            finally:
                # No retained command may wait at the broker for the next start.
                for workflow, _, retain in commands:
                    if retain:
                        attacker.client.publish(f"{ROOT}/_cmd/{workflow}", b"", 1, True)
                attacker.close()

            async def all_rejected() -> bool:
                metrics = await asyncio.to_thread(get_json, agent_http, "/status")
                return bool(metrics) and sender.count() >= 50

            await async_wait_until(all_rejected, timeout=60, message="the commands' replies")
            replies = [reply for _, reply in sender.replies]
            assert all(reply["status"] == "rejected" for reply in replies), replies

            # The path still works: a valid command runs and writes.
            sender.send("set_order", {"id": "ok-1", "params": {"order": "ORD-9", "product": 9}})
            done = await asyncio.to_thread(sender.wait_status, "ok-1", ("completed",), 30.0)
            assert done["status"] == "completed"

        # The ingest counted the forged batches and is still up; the agent too.
        async def counted() -> bool:
            stats = (await asyncio.to_thread(get_json, ingest_http, "/status"))["stats"]
            return int(stats["malformed"]) >= forged_batches

        await async_wait_until(counted, timeout=60, message="malformed batches counted")
        assert ingest.alive
        assert agent.alive
        growth = (rss(agent.pid) - agent_rss, rss(ingest.pid) - ingest_rss)
        assert growth[0] < MAX_GROWTH, growth
        assert growth[1] < MAX_GROWTH, growth

        # Everything the agent committed reaches PostgreSQL: no forged ack deleted anything.
        async def drained() -> bool:
            current = await agent_status()
            return current is not None and current["acked_seq"] >= current["committed_seq"] - 5

        await async_wait_until(drained, timeout=60, message="the agent's outbox drained")
        assert agent.stop() == 0
        ingest_stats = (await asyncio.to_thread(get_json, ingest_http, "/status"))["stats"]
        assert ingest.stop() == 0
    agent_log = (tmp_path / "agent.log").read_text()
    assert "nothing was deleted" in agent_log  # the forged acks were refused, and said so
    conn = await asyncpg.connect(dsn)
    try:
        forged = await conn.fetchval("SELECT count(*) FROM edge_events WHERE device = 'forged'")
        watermark = await conn.fetchval(
            "SELECT acked_seq FROM edge_streams WHERE stream_id = $1", uuid.UUID(stream)
        )
        stored = {r["seq"] for r in await conn.fetch("SELECT seq FROM edge_events")}
        gaps = await conn.fetch("SELECT first_seq, last_seq FROM edge_gaps")
        absurd = await conn.fetchval(
            "SELECT count(*) FROM edge_events WHERE ts < '1970-01-01' OR ts > now() + interval '2 days'"
        )
    finally:
        await conn.close()
    assert forged == 0  # nothing malformed stored
    assert absurd == 0
    declared = {seq for gap in gaps for seq in range(gap["first_seq"], gap["last_seq"] + 1)}
    # Acknowledged only what is stored or declared: every seq up to the watermark is there.
    assert set(range(1, watermark + 1)) <= stored | declared
    assert watermark < 10**6  # nothing forged moved it
    # Every forged batch was refused (none was well-formed enough to be stored).
    assert int(ingest_stats["malformed"]) == forged_batches
    # No rejected command wrote the PLC: the only writes are the valid command's two.
    writes = [entry for entry in write_log(press_log) if entry["result"] == "ok"]
    assert [(w["address"], w["values"]) for w in writes] == [
        (210, writes[0]["values"]),
        (200, [9]),
    ]
