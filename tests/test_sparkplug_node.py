"""The Sparkplug B edge node against a running agent, the Modbus simulator and a private
mosquitto (issue #23); every message decoded by Eclipse Tahu's JavaScript payload library,
commands encoded by it. docs/sparkplug.md lists the normative statements each test checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from simulators.modbus.server import ModbusSimulator
from sync.events import Event
from sync.mqtt.client import MqttClient
from sync.sparkplug.bdseq import BdSeq
from sync.sparkplug.codec import DataType
from sync.sparkplug.history import History
from sync.sparkplug.model import DeviceModel, NodeModel, NodeStatus, TagModel
from sync.uplink.sparkplug.node import SparkplugNode
from tests.fixtures.collector import Seen, TopicCollector
from tests.fixtures.daemon import (
    ROOT,
    config_text,
    machine_config,
    running,
    settings_for,
    sparkplug_config,
)
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.mqtt_client import MqttTestClient
from tests.fixtures.ports import async_wait_until, free_port
from tests.fixtures.sparkplug import TahuPayload, tahu_decode, tahu_encode
from tests.fixtures.workflows import CommandSender

GROUP = "plant1"
NODE = "plant1-line3"
PREFIX = f"spBv1.0/{GROUP}"
NBIRTH, NDEATH, NCMD = (f"{PREFIX}/{kind}/{NODE}" for kind in ("NBIRTH", "NDEATH", "NCMD"))
HOST = "scada-main"
STATE = f"spBv1.0/STATE/{HOST}"
TAG_TYPES = {  # tests/fixtures/daemon.py's six tags -> Sparkplug datatypes (docs/sparkplug.md)
    "state_code": "UInt16",
    "total_count": "UInt32",
    "temperature": "Double",  # int16 x 0.1
    "product_name": "String",
    "running": "Boolean",
    "energy": "Double",  # float64
}
MACHINE = machine_config("line_press")


class SparkplugCollector(TopicCollector):
    """Every message on spBv1.0/#, subscribed at QoS 1 (so a message's QoS is the publisher's)."""

    def __init__(self, broker: MosquittoBroker) -> None:
        super().__init__(broker, f"{PREFIX}/#")

    async def wait(self, what: Callable[[list[Seen]], bool], within: float = 15.0) -> list[Seen]:
        await async_wait_until(lambda: what(self.received()), timeout=within)
        return self.received()


def kind_of(message: Seen) -> str:
    """NBIRTH, DDATA, ...: the message type of a Sparkplug topic."""
    return message.topic.split("/")[2]


def count(kind: str, device: str | None = None) -> Callable[[list[Seen]], int]:
    def counted(messages: list[Seen]) -> int:
        return sum(
            1
            for m in messages
            if kind_of(m) == kind and (device is None or m.topic.endswith(f"/{device}"))
        )

    return counted


def at_least(n: int, kind: str, device: str | None = None) -> Callable[[list[Seen]], bool]:
    return lambda messages: count(kind, device)(messages) >= n


def publish(broker: MosquittoBroker, topic: str, payload: bytes, retain: bool = False) -> None:
    with MqttTestClient.for_broker(broker) as client:
        client.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)


def node_of(runtime: object) -> SparkplugNode:
    gateway = runtime._gateway  # type: ignore[attr-defined]
    (node,) = [sink for sink in gateway.sinks if isinstance(sink, SparkplugNode)]
    return node


def unit_node(
    model: NodeModel, broker: MosquittoBroker, data_dir: Path, client_id: str, *, max_rows: int
) -> SparkplugNode:
    """A node outside the daemon: its own client on `broker`, bdSeq and history in `data_dir`."""
    return SparkplugNode(
        model=model,
        connect=lambda will: MqttClient(
            host=broker.host, port=broker.port, client_id=client_id, will=will
        ),
        bdseq=BdSeq(data_dir),
        status=lambda: NodeStatus(0, True),
        history=History(data_dir, max_rows=max_rows),
    )


def bdseq(payload: TahuPayload) -> int:
    return int(payload.by_name()["bdSeq"].value)


def assert_seq_continuity(messages: list[Seen], decoded: list[TahuPayload]) -> None:
    """Every message after an NBIRTH (seq 0) is one more, modulo 256; NDEATH has none."""
    previous: int | None = None
    for message, payload in zip(messages, decoded, strict=True):
        if kind_of(message) in ("NCMD", "DCMD"):
            continue  # a host's, not the node's
        if kind_of(message) == "NDEATH":
            assert payload.seq is None
            previous = None
            continue
        assert payload.seq is not None, message.topic
        if kind_of(message) == "NBIRTH":
            assert payload.seq == 0
        elif previous is not None:
            assert payload.seq == (previous + 1) % 256, (message.topic, previous, payload.seq)
        previous = payload.seq


async def test_births_data_rebirth_outage_and_death(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    down_port = free_port()  # press2: nothing listens there at first
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        assert sim.port is not None
        text = config_text(
            mosquitto, tmp_path / "data", [("press1", sim.port), ("press2", down_port)]
        )
        settings = settings_for(tmp_path, sparkplug_config(text, group_id=GROUP) + MACHINE)
        with SparkplugCollector(mosquitto) as spb, TopicCollector(mosquitto, f"{ROOT}/#") as live:
            async with running(settings) as runtime:
                node = node_of(runtime)
                await spb.wait(at_least(1, "DDEATH", "press2"))
                await spb.wait(at_least(1, "DBIRTH", "press1"))
                await spb.wait(at_least(1, "DBIRTH", "line_press"))
                # Live JSON values of the same readings, for the values' check.
                for tag in TAG_TYPES:
                    await asyncio.to_thread(live.wait_for, f"{ROOT}/press1/{tag}")
                json_values = {
                    tag: live.latest[f"{ROOT}/press1/{tag}"].json()["value"] for tag in TAG_TYPES
                }
                # Rebirth: an NCMD encoded by Tahu; NBIRTH and DBIRTHs again, same connection.
                births = count("NBIRTH")(spb.received())
                connects = node._client.stats.connects  # type: ignore[union-attr]
                (rebirth,) = tahu_encode(
                    [
                        {
                            "timestamp": 1,
                            "metrics": [
                                {"name": "Node Control/Rebirth", "type": "Boolean", "value": True}
                            ],
                        }
                    ]
                )
                await asyncio.to_thread(publish, mosquitto, NCMD, rebirth)
                await spb.wait(at_least(births + 1, "NBIRTH"))
                await spb.wait(at_least(2, "DBIRTH", "press1"))
                assert node._client.stats.connects == connects  # type: ignore[union-attr]
                # A change: DDATA by exception (state_code 1 -> 2), and the machine's state.
                sim.model(1).force_state(2)
                await spb.wait(at_least(1, "DDATA", "press1"))
                await spb.wait(at_least(1, "DDATA", "line_press"))
                # press2 comes up: DBIRTH with its values.
                async with ModbusSimulator(port=down_port, seed=6, speed=0.0):
                    await spb.wait(
                        lambda ms: any(
                            kind_of(m) == "DBIRTH"
                            and m.topic.endswith("/press2")
                            and b"PART-A" in m.payload
                            for m in ms
                        ),
                        within=20,
                    )
                    # Will QoS 1: cut the node's TCP connection; the broker publishes NDEATH.
                    before = len(spb.received())
                    node._client._connection.transport.abort()  # type: ignore[union-attr]
                    await spb.wait(lambda ms: any(kind_of(m) == "NDEATH" for m in ms[before:]))
                    await spb.wait(lambda ms: any(kind_of(m) == "NBIRTH" for m in ms[before:]))
                    await spb.wait(at_least(3, "DBIRTH", "press1"))
            # A clean stop: NDEATH published by the node itself.
            messages = await spb.wait(lambda ms: kind_of(ms[-1]) == "NDEATH")
    decoded = tahu_decode([m.payload for m in messages])
    by_kind: dict[str, list[tuple[Seen, TahuPayload]]] = {}
    for message, payload in zip(messages, decoded, strict=True):
        by_kind.setdefault(kind_of(message), []).append((message, payload))

    # NBIRTH: seq 0, bdSeq, Node Control/Rebirth = false (Boolean), node metrics; QoS 0.
    births = by_kind["NBIRTH"]
    assert [bdseq(p) for _, p in births] == [0, 0, 1]  # the rebirth kept bdSeq 0
    for message, payload in births:
        assert (message.qos, message.retain, payload.seq) == (0, False, 0)
        metrics = payload.by_name()
        assert (metrics["Node Control/Rebirth"].type, metrics["Node Control/Rebirth"].value) == (
            "Boolean",
            False,
        )
        assert metrics["bdSeq"].type == "Int64"
        assert metrics["Node Info/Agent Version"].type == "String"
        assert metrics["Node Info/Outbox Depth"].type == "UInt64"
        assert metrics["Node Info/Uplink Online"].value is True
        assert all(m.timestamp is not None and m.alias is not None for m in payload.metrics)
    # NDEATH: the Will (QoS 1, not retained) with the bdSeq of the NBIRTH before it, then one
    # published on the clean stop with the next session's bdSeq; no seq.
    deaths = by_kind["NDEATH"]
    assert [(m.qos, m.retain, bdseq(p), p.seq) for m, p in deaths] == [
        (1, False, 0, None),
        (1, False, 1, None),
    ]
    assert all(len(p.metrics) == 1 for _, p in deaths)

    # DBIRTH of press1: every tag with name, alias, datatype, value (as the JSON topics carry
    # it), quality property, timestamp.
    press1 = next(p for m, p in by_kind["DBIRTH"] if m.topic.endswith("/press1"))
    metrics = press1.by_name()
    assert {name: metrics[name].type for name in TAG_TYPES} == TAG_TYPES
    for tag, value in json_values.items():
        got = metrics[tag].value
        assert got == value or (isinstance(value, float) and abs(got - value) < 1e-9), (
            tag,
            got,
            value,
        )
        assert metrics[tag].properties == {"Quality": 192}
        assert metrics[tag].timestamp is not None
    assert metrics["product_name"].value == sim.model(1).product_name
    # press2 was down: DBIRTH with nulls and bad quality, then DDEATH; later a full DBIRTH.
    press2 = [(m, p) for m, p in zip(messages, decoded, strict=True) if m.topic.endswith("/press2")]
    assert [kind_of(m) for m, _ in press2[:2]] == ["DBIRTH", "DDEATH"]
    assert all(x.is_null and x.properties == {"Quality": 0} for x in press2[0][1].metrics)
    reborn = [p for m, p in press2 if kind_of(m) == "DBIRTH"][-1]
    assert all(not x.is_null for x in reborn.metrics)
    # The machine: state and OEE metrics.
    machine = next(p for m, p in by_kind["DBIRTH"] if m.topic.endswith("/line_press")).by_name()
    assert machine["State"].type == "String"
    assert {"OEE/Availability", "OEE/Performance", "OEE/Quality", "OEE/OEE"} <= set(machine)
    assert all(machine[f"OEE/{k}"].type == "Double" for k in ("Availability", "OEE"))
    # The running OEE report (publish_interval 1 s) reaches the host as DDATA of the machine.
    oee_aliases = {
        machine[f"OEE/{k}"].alias for k in ("Availability", "Performance", "Quality", "OEE")
    }
    assert any(
        m.alias in oee_aliases
        for message, payload in by_kind["DDATA"]
        if message.topic.endswith("/line_press")
        for m in payload.metrics
    )

    # Aliases: unique across the node, and every DDATA alias one of its device's DBIRTH.
    aliases: dict[str, dict[int, str]] = {}
    for message, payload in by_kind["DBIRTH"]:
        device = message.topic.rsplit("/", 1)[1]
        aliases[device] = {m.alias: m.name for m in payload.metrics}  # type: ignore[misc]
    node_aliases = {m.alias for m in births[0][1].metrics}
    all_aliases = [a for table in aliases.values() for a in table]
    assert len(set(all_aliases)) == len(all_aliases)
    assert not node_aliases & set(all_aliases)
    state_alias = next(m.alias for m in press1.metrics if m.name == "state_code")
    changes = [
        m.value
        for message, payload in by_kind["DDATA"]
        if message.topic.endswith("/press1")
        for m in payload.metrics
        if m.alias == state_alias
    ]
    assert changes[0] == 2
    born: set[str] = set()
    for message, payload in zip(messages, decoded, strict=True):
        device = message.topic.rsplit("/", 1)[1]
        if kind_of(message) == "DBIRTH":
            born.add(device)
        elif kind_of(message) in ("NBIRTH", "NDEATH"):
            born.clear()
        elif kind_of(message) == "DDATA":
            assert device in born, message.topic  # DBIRTH first
            assert all(m.name is None and m.alias in aliases[device] for m in payload.metrics)
            assert all(m.timestamp is not None for m in payload.metrics)
    assert all(m.qos == 0 and not m.retain for m, _ in by_kind["DBIRTH"] + by_kind["DDEATH"])
    assert_seq_continuity(messages, decoded)


async def test_bdseq_survives_kill_and_restart(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """bdSeq is on disk before the CONNECT: after kill -9 the Will carries it, and the next
    start takes the next number (tests/fixtures/child.py runs `edge-agent run`)."""
    from tests.fixtures.child import ChildProcess

    text = config_text(mosquitto, tmp_path / "data", [])
    settings_for(tmp_path, sparkplug_config(text, group_id=GROUP))  # validates it
    child = ChildProcess(
        "agent",
        [".venv/bin/python", "-m", "agent.cli", "run", "-c", str(tmp_path / "agent.toml")],
        tmp_path / "agent.log",
    )
    with SparkplugCollector(mosquitto) as spb:
        try:
            child.start()
            await spb.wait(at_least(1, "NBIRTH"), within=30)
            child.kill()
            await spb.wait(at_least(1, "NDEATH"), within=30)
            child.start()
            messages = await spb.wait(at_least(2, "NBIRTH"), within=30)
        finally:
            child.ensure_dead()
    decoded = tahu_decode([m.payload for m in messages])
    seen = [(kind_of(m), bdseq(p), m.qos) for m, p in zip(messages, decoded, strict=True)]
    assert seen == [("NBIRTH", 0, 0), ("NDEATH", 0, 1), ("NBIRTH", 1, 0)], seen
    assert (tmp_path / "data" / "sparkplug-bdseq").read_text() == "1\n"


async def test_primary_host_state(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """Births only while the primary host's STATE says online; offline: NDEATH, disconnect,
    reconnect (a new bdSeq), wait; an older STATE is ignored."""
    text = config_text(mosquitto, tmp_path / "data", [])
    settings = settings_for(
        tmp_path, sparkplug_config(text, f'primary_host_id = "{HOST}"', group_id=GROUP)
    )

    def state(online: bool, ts: int) -> bytes:
        return json.dumps({"online": online, "timestamp": ts}).encode()

    with SparkplugCollector(mosquitto) as spb:
        async with running(settings) as runtime:
            node = node_of(runtime)
            await async_wait_until(lambda: node._client is not None and node._client.is_connected)
            await async_wait_until(
                lambda: node._client is not None and node._client.is_subscribed(STATE)
            )
            assert node.problems() == (
                f"sparkplug: waiting for primary host '{HOST}' to be online (no births until then)",
            )
            assert count("NBIRTH")(spb.received()) == 0
            now = int(time.time() * 1000)
            await asyncio.to_thread(publish, mosquitto, STATE, state(True, now), True)
            await spb.wait(at_least(1, "NBIRTH"))
            await asyncio.to_thread(publish, mosquitto, STATE, state(False, now - 5000), True)
            await asyncio.to_thread(publish, mosquitto, STATE, state(False, now + 1000), True)
            await spb.wait(at_least(1, "NDEATH"))
            await async_wait_until(
                lambda: node._client is not None and node._client.is_subscribed(STATE)
            )
            assert count("NBIRTH")(spb.received()) == 1
            await asyncio.to_thread(publish, mosquitto, STATE, state(True, now + 2000), True)
            messages = await spb.wait(at_least(2, "NBIRTH"))
    decoded = tahu_decode([m.payload for m in messages])
    seen = [
        (kind_of(m), bdseq(p))
        for m, p in zip(messages, decoded, strict=True)
        if kind_of(m) in ("NBIRTH", "NDEATH")
    ]
    assert seen == [("NBIRTH", 0), ("NDEATH", 0), ("NBIRTH", 1)], seen


async def test_seq_wraps_values_times_and_hostile_commands(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """The node alone on a real connection: 300 DDATA take seq past 255 and back to 0; each
    metric carries its reading's value and time; an NCMD or DCMD that is garbage, unknown or
    refused is counted and changes nothing."""
    model = NodeModel(
        GROUP, NODE, None, "9.9", (DeviceModel("d1", (TagModel("t", DataType.INT32),)),), ()
    )
    node = unit_node(model, mosquitto, tmp_path, "spb-unit", max_rows=1_000_000)
    start = 1_765_000_000.0
    with SparkplugCollector(mosquitto) as spb:
        task = asyncio.create_task(node.run())
        try:
            await spb.wait(at_least(1, "NBIRTH"))
            node.offer_events([Event(start, "sample", "d1", "t", -1, "good")])
            await spb.wait(at_least(1, "DBIRTH"))
            for i in range(300):
                node.offer_events([Event(start + i / 1000, "sample", "d1", "t", i, "good")])
            await spb.wait(at_least(300, "DDATA"))
            for topic, payload in (
                (NCMD, b"\xff\x00garbage"),
                (
                    NCMD,
                    tahu_encode(
                        [
                            {
                                "timestamp": 1,
                                "metrics": [
                                    {
                                        "name": "Node Control/Reboot",
                                        "type": "Boolean",
                                        "value": True,
                                    }
                                ],
                            }
                        ]
                    )[0],
                ),
                (
                    f"{PREFIX}/DCMD/{NODE}/d1",
                    tahu_encode(
                        [{"timestamp": 1, "metrics": [{"name": "t", "type": "Int32", "value": 5}]}]
                    )[0],
                ),
            ):
                await asyncio.to_thread(publish, mosquitto, topic, payload)
            figures = {}

            def counted() -> bool:
                figures.update({f.name: f.value for f in node.figures()})
                return (
                    figures["sparkplug_bad_messages"] >= 2
                    and figures["sparkplug_commands_refused"] >= 1
                )

            await async_wait_until(counted)
            node.offer_events([Event(start + 1, "sample", "d1", "t", 1000, "uncertain")])
            await spb.wait(at_least(301, "DDATA"))
            await node.drain()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        messages = await spb.wait(lambda ms: kind_of(ms[-1]) == "NDEATH")
    mine = [m for m in messages if kind_of(m) not in ("NCMD", "DCMD")]
    decoded = tahu_decode([m.payload for m in mine])
    assert_seq_continuity(mine, decoded)
    seqs = [p.seq for m, p in zip(mine, decoded, strict=True) if kind_of(m) == "DDATA"]
    assert seqs[:3] == [2, 3, 4]
    assert 255 in seqs
    assert seqs[seqs.index(255) + 1] == 0
    data = [p for m, p in zip(mine, decoded, strict=True) if kind_of(m) == "DDATA"]
    assert [p.metrics[0].value for p in data] == [*range(300), 1000]
    assert [p.metrics[0].timestamp for p in data[:300]] == [
        round((start + i / 1000) * 1000) for i in range(300)
    ]
    assert data[0].metrics[0].properties == {}  # quality unchanged: no property
    assert data[-1].metrics[0].properties == {"Quality": 64}  # uncertain
    assert figures["sparkplug_rebirth_requests"] == 0
    assert count("NBIRTH")(mine) == 1


def test_bdseq_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """0 the first time, then one more per CONNECT, 255 -> 0, written 0600 before it is used;
    a file that does not hold 0-255 starts again at 0 with a warning."""
    store = BdSeq(tmp_path)
    assert [store.take() for _ in range(3)] == [0, 1, 2]
    path = tmp_path / "sparkplug-bdseq"
    assert path.read_text() == "2\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert BdSeq(tmp_path).take() == 3  # a restart goes on from the file
    path.write_text("255\n")
    assert BdSeq(tmp_path).take() == 0
    path.write_text("garbage")
    assert BdSeq(tmp_path).take() == 0
    assert "holds 'garbage', not 0-255; bdSeq starts at 0" in caplog.text
    assert not list(tmp_path.glob(".*staged"))


def writable_config(broker: MosquittoBroker, data_dir: Path, port: int) -> str:
    return f"""
[gateway]
id = "{NODE}"
site = "plant1"
area = "assembly"
line = "line3"
data_dir = "{data_dir}"

[mqtt]
url = "{broker.url}"
sync_enabled = true

[sparkplug]
enabled = true
group_id = "{GROUP}"
commands = "writable"

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:{port}"
poll_interval = "200ms"
  [[devices.tags]]
  name = "setpoint"
  address = "hr:304"
  type = "int16"
  writable = true
  [[devices.tags]]
  name = "state_code"
  address = "hr:100"

[[workflows]]
name = "hold"
on_uplink_failure = "continue"
steps = [{{ wait = "press1/setpoint", value = 999, timeout = "30s" }}]
"""


async def test_dcmd_writes(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """commands = "writable": a DCMD (encoded by Tahu) for a writable tag is written, read back,
    audited and seen in the next DDATA; one for a read-only tag, a value out of the tag's range
    or an unknown metric is refused and audited; nothing else is written."""
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        assert sim.port is not None
        settings = settings_for(tmp_path, writable_config(mosquitto, tmp_path / "data", sim.port))
        dcmd = f"{PREFIX}/DCMD/{NODE}/press1"
        commands = tahu_encode(
            [
                {"timestamp": 1, "metrics": [{"name": "setpoint", "type": "Int16", "value": -42}]},
                {"timestamp": 2, "metrics": [{"name": "state_code", "type": "UInt16", "value": 4}]},
                {
                    "timestamp": 3,
                    "metrics": [{"name": "setpoint", "type": "Int32", "value": 70000}],
                },
                {"timestamp": 4, "metrics": [{"name": "nosuch", "type": "Int16", "value": 1}]},
            ]
        )
        with SparkplugCollector(mosquitto) as spb:
            async with running(settings) as runtime:
                node = node_of(runtime)
                await spb.wait(at_least(1, "DBIRTH", "press1"))
                state_before = sim.model(1).state
                for payload in commands:
                    await asyncio.to_thread(publish, mosquitto, dcmd, payload)

                def figures() -> dict[str, float]:
                    return {f.name: f.value for f in node.figures()}

                await async_wait_until(
                    lambda: (
                        figures()["sparkplug_writes_completed"] == 1
                        and figures()["sparkplug_commands_refused"] == 3
                    ),
                    message="one write and three refusals",
                )
                messages = await spb.wait(at_least(1, "DDATA", "press1"))
                # Exclusivity: while a saga acts on press1, a DCMD write to it is refused.
                with CommandSender(mosquitto, ROOT) as sender:
                    await asyncio.to_thread(sender.send, "hold", {"id": "h1", "params": {}})
                    await asyncio.to_thread(sender.wait_status, "h1", ("accepted",))
                    (again,) = tahu_encode(
                        [
                            {
                                "timestamp": 5,
                                "metrics": [{"name": "setpoint", "type": "Int16", "value": 7}],
                            }
                        ]
                    )
                    await asyncio.to_thread(publish, mosquitto, dcmd, again)
                    await async_wait_until(
                        lambda: figures()["sparkplug_commands_refused"] == 4,
                        message="the DCMD during the saga refused",
                    )
            assert sim.model(1).state == state_before
    decoded = tahu_decode([m.payload for m in messages])
    birth = next(p for m, p in zip(messages, decoded, strict=True) if kind_of(m) == "DBIRTH")
    alias = birth.by_name()["setpoint"].alias
    values = [
        x.value
        for m, p in zip(messages, decoded, strict=True)
        if kind_of(m) == "DDATA"
        for x in p.metrics
        if x.alias == alias
    ]
    assert values[-1] - 2**32 == -42  # int_value, two's complement (no datatype in DDATA)
    assert figures()["sparkplug_writes_failed"] == 0
    with sqlite3.connect(tmp_path / "data" / "outbox.db") as db:
        rows = db.execute(
            "SELECT tag, value FROM events WHERE value LIKE '%single_write%'"
        ).fetchall()
    audits = {(tag, json.loads(value)["result"]) for tag, value in rows}
    assert audits == {
        ("press1/setpoint", "completed"),
        ("press1/state_code", "refused"),
        ("press1/setpoint", "refused"),
    }, rows
    details = [json.loads(value)["detail"] for _, value in rows]
    assert any(d.startswith("busy: saga ") and d.endswith("(hold) acts on press1") for d in details)
    assert any("70000 does not fit the tag" in d for d in details)
    assert any("press1/state_code is not writable" in d for d in details)


async def test_history_after_host_outage(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """While the primary host is offline the values keep changing; after it returns, the
    changes are republished as historical DDATA, oldest first: every sample of the outbox
    (ground truth: no ingest acknowledges, so it keeps them all) reached the host live, in a
    DBIRTH or as history."""
    async with ModbusSimulator(port=0, seed=5, speed=1.0) as sim:
        assert sim.port is not None
        text = config_text(mosquitto, tmp_path / "data", [("press1", sim.port)])
        settings = settings_for(
            tmp_path, sparkplug_config(text, f'primary_host_id = "{HOST}"', group_id=GROUP)
        )

        def state(online: bool, ts: int) -> bytes:
            return json.dumps({"online": online, "timestamp": ts}).encode()

        now = int(time.time() * 1000)
        with SparkplugCollector(mosquitto) as spb:
            async with running(settings) as runtime:
                node = node_of(runtime)
                await asyncio.to_thread(publish, mosquitto, STATE, state(True, now), True)
                await spb.wait(at_least(3, "DDATA", "press1"))
                await asyncio.to_thread(publish, mosquitto, STATE, state(False, now + 1), True)
                await spb.wait(at_least(1, "NDEATH"))

                def pending() -> float:
                    return next(
                        f.value for f in node.figures() if f.name == "sparkplug_history_pending"
                    )

                await async_wait_until(lambda: pending() >= 30, message="changes kept")
                await asyncio.to_thread(publish, mosquitto, STATE, state(True, now + 2), True)
                await async_wait_until(lambda: pending() == 0, message="history republished")
                await spb.wait(at_least(3, "DDATA", "press1"))
            messages = spb.received()
    with sqlite3.connect(tmp_path / "data" / "outbox.db") as db:
        truth = {
            round(ts * 1000): json.loads(value)
            for ts, value in db.execute(
                "SELECT ts, value FROM events WHERE device = 'press1' AND tag = 'energy'"
            )
        }
    decoded = tahu_decode([m.payload for m in messages])
    alias = None
    seen: dict[int, object] = {}
    historical = []
    for message, payload in zip(messages, decoded, strict=True):
        if not message.topic.endswith("/press1"):
            continue
        if kind_of(message) == "DBIRTH":
            metric = payload.by_name()["energy"]
            alias = metric.alias
            seen[metric.timestamp] = metric.value  # type: ignore[index]
        elif kind_of(message) == "DDATA":
            for metric in payload.metrics:
                if metric.alias == alias:
                    seen[metric.timestamp] = metric.value  # type: ignore[index]
                    if metric.is_historical:
                        historical.append(metric.timestamp)
    assert len(truth) >= 10
    missing = sorted(set(truth) - set(seen))
    assert not missing, (
        f"{len(missing)} of {len(truth)} samples never reached the host: {missing[:5]}"
    )
    assert all(seen[ts] == truth[ts] for ts in truth)
    assert len(historical) >= 5
    assert historical == sorted(historical)  # oldest first


async def test_history_cap_is_a_gap(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """Past the history's cap the oldest changes are dropped: counted, a node metric, and a
    gap event (reason sparkplug_history_dropped) for the outbox; never silently."""
    model = NodeModel(
        GROUP, NODE, HOST, "9.9", (DeviceModel("d1", (TagModel("t", DataType.INT32),)),), ()
    )
    gaps: list[Event] = []

    async def emit(events: list[Event]) -> None:
        gaps.extend(events)

    node = unit_node(model, mosquitto, tmp_path, "spb-cap", max_rows=50)
    node.reports_to(emit)
    start = 1_765_000_000.0
    task = asyncio.create_task(node.run())
    try:
        for i in range(120):  # no STATE: never born, everything goes to the history
            node.offer_events([Event(start + i, "sample", "d1", "t", i, "good")])
        await async_wait_until(lambda: bool(gaps), message="a gap event")
        figures = {f.name: f.value for f in node.figures()}
        await node.drain()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert figures["sparkplug_history_dropped"] == 70
    assert figures["sparkplug_history_pending"] == 50
    (gap,) = gaps
    assert gap.kind == "gap"
    assert gap.value["reason"] == "sparkplug_history_dropped"
    assert gap.value["count"] == 70
    assert (gap.value["first_ts"], gap.value["last_ts"]) == (
        "2025-12-06T05:46:40.000Z",
        "2025-12-06T05:47:49.000Z",
    )
    left = History(tmp_path, max_rows=50)
    left.open()
    try:
        assert [change.value for _, change in left.oldest(100)] == list(range(70, 120))
    finally:
        left.close()


async def test_unusable_history_file_is_a_gap_not_a_crash(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """A history file that cannot be opened (here a directory in its place): the node runs,
    births, publishes; what it cannot keep is reported as a gap."""
    (tmp_path / "sparkplug-history.db").mkdir()
    model = NodeModel(
        GROUP, NODE, None, "9.9", (DeviceModel("d1", (TagModel("t", DataType.INT32),)),), ()
    )
    gaps: list[Event] = []

    async def emit(events: list[Event]) -> None:
        gaps.extend(events)

    node = unit_node(model, mosquitto, tmp_path, "spb-nofile", max_rows=50)
    node.reports_to(emit)
    node.offer_events([Event(1_765_000_000.0, "sample", "d1", "t", 1, "good")])  # not born yet
    with SparkplugCollector(mosquitto) as spb:
        task = asyncio.create_task(node.run())
        try:
            await spb.wait(at_least(1, "DBIRTH"))
            node.offer_events([Event(1_765_000_001.0, "sample", "d1", "t", 2, "good")])
            await spb.wait(at_least(1, "DDATA"))
            await async_wait_until(lambda: bool(gaps), message="a gap event")
            await node.drain()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert [(g.value["reason"], g.value["count"]) for g in gaps] == [
        ("sparkplug_history_dropped", 1)
    ]
