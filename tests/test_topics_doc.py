"""docs/topics.md, "Examples from a run", against a real run (issue #21, item 4): the agent on
the Modbus simulator with a machine and a workflow, `edge-agent ingest`'s replica on PostgreSQL,
a command sent. Every documented example must have the shape (keys, JSON types) of what went
over the wire on that topic, and every retained topic must be retained.

On a mismatch the assertion shows the real payload: paste it into the doc."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from simulators.modbus.server import ModbusSimulator
from tests.fixtures.collector import Seen, TopicCollector
from tests.fixtures.daemon import REPO
from tests.fixtures.ingest import running_ingest
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import async_wait_until
from tests.fixtures.workflows import CommandSender, running, settings_for

ROOT = "plant1/assembly/line3"
DOC = REPO / "docs" / "topics.md"


def config(broker: MosquittoBroker, data_dir: Path, port: int) -> str:
    return f"""
[gateway]
id = "plant1-line3"
site = "plant1"
area = "assembly"
line = "line3"
data_dir = "{data_dir}"

[mqtt]
url = "{broker.url}"
sync_batch_events = 2
health_interval = "1s"

[http]
enabled = false

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:{port}"
poll_interval = "200ms"

  [[devices.tags]]
  name = "state_code"
  address = "hr:100"
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
  name = "quality_hold"
  address = "co:2"
  type = "bool"
  writable = true

[[machines]]
name = "press1"
state = {{ tag = "press1/state_code", running = [1], planned_stop = [3], unplanned_stop = [2, 4] }}
total_count = "press1/total_count"
reject_count = "press1/reject_count"
ideal_cycle_time = "1.2s"
publish_interval = "1s"
calendar = "around-the-clock"

[[calendars]]
name = "around-the-clock"
timezone = "UTC"
shifts = [
  {{ name = "night", start = "22:00", end = "06:00", days = "daily" }},
  {{ name = "early", start = "06:00", end = "14:00", days = "daily" }},
  {{ name = "late", start = "14:00", end = "22:00", days = "daily" }},
]

[[workflows]]
name = "quality_hold"
params = {{ reason = "str:1..64" }}
steps = [{{ write = "press1/quality_hold", value = true }}]
"""


def documented_examples() -> list[tuple[str, str, Any]]:
    """(topic, flags, payload) of each example: a line "`topic` (flags)" and a JSON block."""
    text = DOC.read_text()
    section = text.split("## Examples from a run", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"^`([^`]+)` \(([^)]*)\):\n\n```json\n(.*?)\n```", section, re.M | re.S)
    return [(topic, flags, json.loads(body)) for topic, flags, body in found]


def on_topic(collector: TopicCollector, documented: str) -> list[Seen]:
    """Messages on a documented topic; `{name}` stands for any one level."""
    pattern = re.compile(re.sub(r"\\{[a-z_]+\\}", "[^/]+", re.escape(documented)) + "$")
    return [message for message in collector.messages if pattern.match(message.topic)]


def shape(value: Any) -> Any:
    """Keys and JSON types, recursively; a list's shape is its first element's."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return type(value).__name__
    return "number"


def same_shape(documented: Any, real: Any) -> bool:
    """Equal shapes, where null on either side matches any value (a figure not known yet)."""
    if "NoneType" in (documented, real):
        return True
    if isinstance(documented, dict) and isinstance(real, dict):
        return documented.keys() == real.keys() and all(
            same_shape(documented[key], real[key]) for key in documented
        )
    if isinstance(documented, list) and isinstance(real, list):
        return len(documented) == len(real) and all(
            same_shape(d, r) for d, r in zip(documented, real, strict=True)
        )
    return bool(documented == real)


async def test_every_documented_example_matches_a_real_run(
    mosquitto: MosquittoBroker, postgres_database: str, tmp_path: Path
) -> None:
    examples = documented_examples()
    assert len(examples) >= 10, "the section lists every topic with an example"
    async with (
        ModbusSimulator(port=0, seed=5, speed=1.0) as sim,
        running_ingest(postgres_database, mosquitto),
    ):
        assert sim.port is not None
        settings = settings_for(tmp_path, config(mosquitto, tmp_path / "data", sim.port))
        with TopicCollector(mosquitto) as seen, CommandSender(mosquitto, ROOT) as sender:
            async with running(settings):
                command = {"id": "qh-0815", "params": {"reason": "scratches on lot 17"}}
                sender.send("quality_hold", command)
                await asyncio.to_thread(sender.wait_status, "qh-0815", ("completed",))
                await async_wait_until(
                    lambda: all(on_topic(seen, topic) for topic, _, _ in examples),
                    timeout=30,
                    message="a message on every documented topic",
                )
            # A late subscriber gets what is retained, flagged as such.
            with TopicCollector(mosquitto) as late:
                retained_topics = [t for t, flags, _ in examples if "retained" in flags]
                await async_wait_until(
                    lambda: all(on_topic(late, topic) for topic in retained_topics),
                    timeout=10,
                    message="retained topics",
                )
                for topic in retained_topics:
                    assert all(message.retain for message in on_topic(late, topic)), topic
    for topic, _, documented in examples:
        real = [message.json() for message in on_topic(seen, topic) if message.payload]
        assert any(same_shape(shape(documented), shape(payload)) for payload in real), (
            f"docs/topics.md's example of {topic} differs from the wire; a real one:\n"
            + json.dumps(real[-1], separators=(",", ":"))
        )
