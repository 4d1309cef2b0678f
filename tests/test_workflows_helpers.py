"""Shared pieces of the workflow tests (no tests here): a stand-in for the central store that
acknowledges S/sync batches (and can stop acknowledging), command senders, config builders,
write-log readers.

The central acknowledgement is a small MQTT client instead of `edge-agent ingest` +
PostgreSQL: the saga only sees `S/ack`, and the ingest is tested on its own (test_ingest*).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.daemon.runtime import Runtime
from agent.settings.config_file import AgentSettings
from agent.settings.loader import load_agent_settings
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.mqtt_client import MqttTestClient
from tests.fixtures.relay import TcpRelay

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "agent.example.toml"


def example_workflows() -> str:
    """The [[workflows]] tables of config/agent.example.toml, verbatim."""
    text = EXAMPLE.read_text()
    start = text.index("\n[[workflows]]")
    # Keep the comment lines right above the first table out: they describe the section.
    return text[start:]


class CentralAcker:
    """Acknowledges every S/sync batch like the central ingest (unless paused); keeps events."""

    def __init__(self, broker: MosquittoBroker, sync_prefix: str = "edge") -> None:
        self._broker = broker
        self._prefix = sync_prefix
        self._client = MqttTestClient.for_broker(broker)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="central-acker", daemon=True)
        self.paused = False
        self.events: list[dict[str, Any]] = []
        self.acked: dict[tuple[str, str], int] = {}
        self._seen: dict[tuple[str, str], set[int]] = {}

    def __enter__(self) -> CentralAcker:
        self._client.connect()
        self._client.subscribe(f"{self._prefix}/+/sync")
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._client.close()

    def reconnect(self, timeout: float = 20.0) -> None:
        """Connect again after the broker restarted."""
        deadline = time.monotonic() + timeout
        while True:
            self._client.close()
            self._client = MqttTestClient.for_broker(self._broker)
            try:
                self._client.connect()
                self._client.subscribe(f"{self._prefix}/+/sync")
                return
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _drain(self) -> None:
        while not self._stop.is_set():
            client = self._client
            try:
                message = client.messages.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                batch = json.loads(message.payload)
            except ValueError:
                continue
            gateway = message.topic.split("/")[-2]
            key = (gateway, batch["stream"])
            with self._lock:
                seen = self._seen.setdefault(key, set())
                for event in batch["events"]:
                    if event["seq"] not in seen:
                        seen.add(event["seq"])
                        self.events.append({**event, "gateway": gateway})
                watermark = self.acked.get(key, 0)
                while watermark + 1 in seen:
                    watermark += 1
                self.acked[key] = watermark
                paused = self.paused
            if not paused and watermark:
                ack = json.dumps({"stream": batch["stream"], "acked_seq": watermark})
                with contextlib.suppress(Exception):
                    client.client.publish(f"{self._prefix}/{gateway}/ack", ack, qos=1)

    def workflow_events(self, gateway: str | None = None) -> list[dict[str, Any]]:
        """The `workflow` events received (their value objects), in seq order."""
        with self._lock:
            events = sorted(
                (e for e in self.events if gateway is None or e["gateway"] == gateway),
                key=lambda e: e["seq"],
            )
        return [
            e["value"] | {"_tag": e["tag"], "_device": e["device"]}
            for e in events
            if e["kind"] == "workflow"
        ]

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        """Every received event of one kind."""
        with self._lock:
            return [e for e in self.events if e["kind"] == kind]


class CommandSender:
    """Publishes commands and collects replies (one MQTT connection)."""

    def __init__(self, broker: MosquittoBroker, root: str) -> None:
        self._broker = broker
        self.root = root
        self._client = MqttTestClient.for_broker(broker)
        self._lock = threading.Lock()
        self.replies: list[tuple[str, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="replies", daemon=True)

    def __enter__(self) -> CommandSender:
        self._client.connect()
        self._client.subscribe(f"{self.root}/_cmd/+/reply")
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._client.close()

    def reconnect(self, timeout: float = 20.0) -> None:
        """Connect again after the broker restarted."""
        deadline = time.monotonic() + timeout
        while True:
            self._client.close()
            self._client = MqttTestClient.for_broker(self._broker)
            try:
                self._client.connect()
                self._client.subscribe(f"{self.root}/_cmd/+/reply")
                return
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._client.messages.get(timeout=0.05)
            except queue.Empty:
                continue
            workflow = message.topic.split("/")[-2]
            with self._lock:
                self.replies.append((workflow, json.loads(message.payload)))

    def send(self, workflow: str, payload: bytes | str | dict[str, Any]) -> None:
        """Publish one command (QoS 1, waits for the broker's PUBACK)."""
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        self._client.publish(f"{self.root}/_cmd/{workflow}", payload, qos=1)

    def burst(self, workflow: str, payloads: list[bytes]) -> None:
        """Publish many commands back to back, then wait for every PUBACK."""
        infos = [
            self._client.client.publish(f"{self.root}/_cmd/{workflow}", payload, qos=1)
            for payload in payloads
        ]
        for info in infos:
            info.wait_for_publish(timeout=10)

    def for_id(self, command_id: str | None) -> list[dict[str, Any]]:
        """Replies carrying this id, in arrival order."""
        with self._lock:
            return [reply for _, reply in self.replies if reply["id"] == command_id]

    def wait_status(
        self, command_id: str, statuses: tuple[str, ...], timeout: float = 20.0, skip: int = 0
    ) -> dict[str, Any]:
        """Wait for a reply with one of `statuses` for `command_id` (after the first `skip`)."""
        deadline = time.monotonic() + timeout
        while True:
            for reply in self.for_id(command_id)[skip:]:
                if reply["status"] in statuses:
                    return reply
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no {statuses} reply for {command_id} in {timeout}s: {self.for_id(command_id)}"
                )
            time.sleep(0.02)

    def count(self) -> int:
        """Replies received so far."""
        with self._lock:
            return len(self.replies)


def settings_for(tmp_path: Path, text: str, name: str = "agent.toml") -> AgentSettings:
    """Write and load a config."""
    path = tmp_path / name
    path.write_text(text)
    return load_agent_settings(path, environ={})


@contextlib.asynccontextmanager
async def running(settings: AgentSettings) -> AsyncIterator[Runtime]:
    """Run the daemon in-process until the block ends; waits until workflows serve commands."""
    runtime = Runtime(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop), name="runtime")
    try:
        async with asyncio.timeout(15):
            await runtime.started.wait()
            assert runtime.gateway is not None
            await runtime.gateway.workflows.ready.wait()
            mqtt = runtime.gateway.mqtt
            assert mqtt is not None
            await mqtt.wait_connected()
        yield runtime
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await task


def write_log(path: Path) -> list[dict[str, Any]]:
    """The simulator's write log (JSON lines)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ok_writes(path: Path) -> list[tuple[int, int, tuple[Any, ...]]]:
    """(function code, address, values) of every executed write, in order."""
    return [
        (entry["function_code"], entry["address"], tuple(entry["values"]))
        for entry in write_log(path)
        if entry["result"] == "ok"
    ]


def saga_rows(db: Path) -> list[dict[str, Any]]:
    """Every saga of a saga log file (read-only; the agent may still have it open)."""
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM sagas ORDER BY created")]


def step_rows(db: Path, saga: str) -> list[dict[str, Any]]:
    """The step rows of one saga."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        conn.row_factory = sqlite3.Row
        return [
            dict(row)
            for row in conn.execute("SELECT * FROM steps WHERE saga = ? ORDER BY idx", (saga,))
        ]


class GatedProxy(TcpRelay):
    """A TCP relay between the agent and the broker whose gate the test opens and closes.

    The broker is still killed for real (the relay passes the loss on); the gate only decides
    when the agent may connect again, so that the test's own subscribers are back first.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._open = True

    def accepting(self) -> bool:
        """Relay only while the gate is open."""
        return self._open

    def close_gate(self) -> None:
        """Refuse new connections (accepted and closed at once)."""
        self._open = False

    def open_gate(self) -> None:
        """Relay new connections again."""
        self._open = True
