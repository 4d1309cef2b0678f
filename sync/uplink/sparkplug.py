"""The Sparkplug B 3.0 edge node: an uplink beside the JSON topics (docs/sparkplug.md).

It has its own MQTT connection (the NDEATH is that connection's Will, and a session's bdSeq
belongs to it). Per connection: the NDEATH Will (QoS 1, not retained) carries the bdSeq taken
for that CONNECT (`BdSeq.take`, on disk first); once connected, and with a primary host once
its STATE says online, NBIRTH (seq 0, the same bdSeq, Node Control/Rebirth, node metrics), then
one DBIRTH per device whose every tag has reported, and one per machine. Then DDATA by
exception from the committed sample, state and OEE events, with aliases and each reading's own
time; NDATA when a node metric changes. seq counts every message after NBIRTH, 0-255 wrapping.
A device whose every tag is bad gets a DDEATH, and a DBIRTH when a value returns. An NCMD
`Node Control/Rebirth = true` republishes NBIRTH and every DBIRTH on the same connection with
the same bdSeq. When the primary host goes offline the node publishes its NDEATH, disconnects,
and connects again (a new bdSeq) to wait for the host.

Every Sparkplug message but NDEATH is QoS 0 and not retained (spec 3.0). While the node is not
born its births-to-be keep the newest value of each metric, and every change goes to the
history file (sync/sparkplug/history.py), as do the changes sent in the last moments before a
connection loss; after the next birth they are republished oldest first as historical DDATA,
paced, between the live ones. DCMD writes (commands = "writable") go to the workflow engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sync.events import Event, rfc3339
from sync.mqtt.client import Message, MessageTooLarge, MqttClient, NotConnected, Will
from sync.sparkplug.bdseq import BdSeq
from sync.sparkplug.codec import (
    DataType,
    Metric,
    MetricValue,
    Payload,
    PayloadError,
    datatype_of_value,
    decode_received,
    encode,
    fits,
)
from sync.sparkplug.history import Change, Dropped, History
from sync.sparkplug.topics import device_topic, node_topic, state_topic
from sync.uplink.sink import SinkFigure

log = logging.getLogger("edge_agent.sparkplug")

REBIRTH = "Node Control/Rebirth"
BDSEQ = "bdSeq"
# The OPC DA quality codes, which Ignition and other hosts read from a "Quality" property.
QUALITY = "Quality"
QUALITY_CODES = {"good": 192, "uncertain": 64, "bad": 0}
# Node metrics: (name, datatype); their aliases follow bdSeq (1) and Node Control/Rebirth (2).
NODE_METRICS: tuple[tuple[str, DataType], ...] = (
    ("Node Info/Agent Version", DataType.STRING),
    ("Node Info/Outbox Depth", DataType.UINT64),
    ("Node Info/Uplink Online", DataType.BOOLEAN),
    ("Node Info/History Pending", DataType.UINT64),
    ("Node Info/History Dropped", DataType.UINT64),
)
NODE_STATUS_INTERVAL = 5.0  # seconds between looks at the node metrics (NDATA on change)
REBIRTH_SPACING = 1.0  # seconds: rebirth requests closer than this are served together
MACHINE_METRICS: tuple[tuple[str, DataType | None], ...] = (
    ("State", DataType.STRING),
    ("State Code", None),  # the machine's code, as its state tag reads it
    ("OEE/Availability", DataType.DOUBLE),
    ("OEE/Performance", DataType.DOUBLE),
    ("OEE/Quality", DataType.DOUBLE),
    ("OEE/OEE", DataType.DOUBLE),
)
_OEE_FIGURES = {
    "availability": "OEE/Availability",
    "performance": "OEE/Performance",
    "quality": "OEE/Quality",
    "oee": "OEE/OEE",
}
LOG_EVERY = 60.0  # seconds between two log lines about a peer's bad messages
MAX_WRITES = 32  # DCMD writes running at once; more are refused (a peer may flood us)
# A DCMD write: ('device/tag', value) -> (completed | refused | failed, what happened); the
# workflow engine's single_write (validation, exclusivity, audit, read-back).
Write = Callable[
    [str, MetricValue], Awaitable[tuple[Literal["completed", "refused", "failed"], str]]
]
_SIGNED_32 = (DataType.INT8, DataType.INT16, DataType.INT32)
# History (docs/sparkplug.md, "History"): changes kept while not born, republished after a birth.
HISTORY_FLUSH = 0.2  # seconds between writes of what piled up in memory to the history file
MAX_PENDING = 100_000  # changes in memory waiting for that write (more: dropped, a gap)
REPLAY_METRICS = 200  # changes per historical DDATA read at once
REPLAY_PAUSE = 0.01  # seconds between two of them: live DDATA go out in between
# What was sent live in the last 1.5 keep-alives before a connection loss (the longest a loss
# may go unnoticed) may have died with it: it is kept, and stored as history when the loss
# comes (at least once). At most this many changes are kept so.
MAX_RECENT = 200_000


@dataclass(frozen=True, slots=True)
class TagModel:
    """A tag as the node announces it: its name and datatype (None: its first value decides)."""

    name: str
    datatype: DataType | None


@dataclass(frozen=True, slots=True)
class DeviceModel:
    """A device of the config and its tags, in config order (the order of the aliases)."""

    name: str
    tags: tuple[TagModel, ...]


@dataclass(frozen=True, slots=True)
class NodeModel:
    """What the edge node announces: ids, devices, machines (all from the config)."""

    group_id: str
    edge_node_id: str
    primary_host_id: str | None
    version: str
    devices: tuple[DeviceModel, ...]
    machines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """The node metrics that change: events in the outbox, whether the JSON uplink is up."""

    outbox_depth: int
    uplink_online: bool


@dataclass(slots=True)
class _Metric:
    name: str
    alias: int
    datatype: DataType | None
    value: MetricValue = None
    quality: str | None = None  # None: nothing read yet
    ts_ms: int | None = None
    sent_quality: str | None = None  # the quality the host last heard of


@dataclass(slots=True)
class _Device:
    name: str
    metrics: dict[str, _Metric]
    machine: bool
    born: bool = False  # a DBIRTH went out since the last NBIRTH
    dead: bool = False  # a DDEATH went out after it

    def ready(self) -> bool:
        return self.machine or all(metric.quality is not None for metric in self.metrics.values())

    def all_bad(self) -> bool:
        return not self.machine and all(m.quality == "bad" for m in self.metrics.values())


@dataclass(slots=True)
class _Figures:
    published: int = 0
    births: int = 0
    rebirth_requests: int = 0
    commands_refused: int = 0
    writes_completed: int = 0
    writes_failed: int = 0
    history_replayed: int = 0
    history_dropped: int = 0
    bad_messages: int = 0
    too_large: int = 0
    last_log: dict[str, float] = field(default_factory=dict)


# A metric's change as offered: (metric, value, quality, reading time in ms).
_Update = tuple[_Metric, MetricValue, str, int]


def _ms(ts: float) -> int:
    return int(ts * 1000 + 0.5) if ts > 0 else 0


class SparkplugNode:
    """The edge node (a Sink). `connect(will)` makes the MQTT client of one connection."""

    def __init__(
        self,
        *,
        model: NodeModel,
        connect: Callable[[Will], MqttClient],
        bdseq: BdSeq,
        status: Callable[[], NodeStatus],
        history: History,
        keepalive: float = 30.0,
    ) -> None:
        self._model = model
        self._connect = connect
        self._bdseq = bdseq
        self._status = status
        self._group = model.group_id
        self._node = model.edge_node_id
        self._devices: dict[str, _Device] = {}
        alias = 2 + len(NODE_METRICS)  # 1: bdSeq, 2: rebirth, then the node metrics
        for device in model.devices:
            metrics = {}
            for tag in device.tags:
                alias += 1
                metrics[tag.name] = _Metric(tag.name, alias, tag.datatype)
            self._devices[device.name] = _Device(device.name, metrics, machine=False)
        for machine in model.machines:
            metrics = {}
            for name, datatype in MACHINE_METRICS:
                alias += 1
                metrics[name] = _Metric(name, alias, datatype)
            self._devices[machine] = _Device(machine, metrics, machine=True)
        self._client: MqttClient | None = None
        self._born = False
        self._seq = 0
        self._host_online = model.primary_host_id is None
        self._host_timestamp: int | None = None
        self._sent_values: tuple[MetricValue, ...] | None = None
        self._wake = asyncio.Event()  # the serve loop has something to do:
        self._restart = False  # the primary host went offline: NDEATH, reconnect
        self._rebirth = False  # an NCMD asked for a rebirth
        self._last_rebirth = 0.0
        self._stopping = False
        self._figures = _Figures()
        self._write: Write | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._history = history
        self._pending: list[Change] = []  # changes for the history file, not yet written
        # Sent live lately: (when, device, the DDATA's updates), one entry per message.
        self._recent: deque[tuple[float, str, list[_Update]]] = deque()
        self._recent_values = 0
        self._recent_window = 1.5 * keepalive
        self._history_wake = asyncio.Event()
        self._emit: Callable[[list[Event]], Coroutine[Any, Any, None]] | None = None

    def reports_to(self, emit: Callable[[list[Event]], Coroutine[Any, Any, None]]) -> None:
        """Where a `gap` event goes when history is dropped (the pipeline: outbox, sinks)."""
        self._emit = emit

    def writes_to(self, write: Write) -> None:
        """Take DCMD writes (sparkplug.commands = 'writable'): each metric of a DCMD for a
        device's tag goes to `write`; without this every DCMD is refused."""
        self._write = write

    # -- the Sink protocol ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The sink's name."""
        return "sparkplug"

    def offer_events(self, events: Sequence[Event]) -> None:
        """Samples of the config's tags, machine states and OEE records -> DDATA (or births)."""
        changed: dict[str, list[_Update]] = {}
        for event in events:
            device = self._devices.get(event.device or "")
            if device is None:
                continue
            for metric, value, quality in self._updates(device, event):
                ts_ms = _ms(event.ts)
                metric.value, metric.quality, metric.ts_ms = value, quality, ts_ms
                changed.setdefault(device.name, []).append((metric, value, quality, ts_ms))
        if not self._born:
            # The next birth carries the newest values; the history file every change.
            for name, updates in changed.items():
                self._keep([Change(name, m.name, v, q, ts) for m, v, q, ts in updates])
            return
        for name, updates in changed.items():
            self._publish_device(self._devices[name], updates)

    def offer_oee(self, machine: str, record: dict[str, Any]) -> None:
        """A machine's running OEE figures (the live OEE task's periodic report): DDATA of
        the figures that changed."""
        device = self._devices.get(machine)
        if device is None or not device.machine:
            return
        changed = {
            key: value
            for key, value in record.items()
            if key in _OEE_FIGURES and _number(value) != device.metrics[_OEE_FIGURES[key]].value
        }
        if changed:
            self.offer_events([Event(time.time(), "oee", machine, "oee", changed, "good")])

    def _updates(self, device: _Device, event: Event) -> list[tuple[_Metric, MetricValue, str]]:
        quality = event.quality or "good"
        if event.kind == "sample" and not device.machine:
            metric = device.metrics.get(event.tag or "")
            if metric is None:
                return []
            return [(metric, _scalar(event.value), quality)]
        if not device.machine or not isinstance(event.value, dict):
            return []
        if event.kind == "state":
            return [
                (device.metrics["State"], _scalar(event.value.get("state")), quality),
                (device.metrics["State Code"], _scalar(event.value.get("code")), quality),
            ]
        if event.kind == "oee":
            return [
                (device.metrics[name], _number(event.value.get(key)), quality)
                for key, name in _OEE_FIGURES.items()
                if key in event.value
            ]
        return []

    def retire(self, device: str, tags: Sequence[str]) -> None:
        """A device left the config: DDEATH, and it is no longer announced."""
        gone = self._devices.pop(device, None)
        if gone is not None and gone.born and not gone.dead and self._born:
            self._send(device_topic(self._group, "DDEATH", self._node, device), self._empty())

    async def run(self) -> None:
        """Connect, birth, serve; after the primary host went offline, NDEATH and again. Beside
        it, the history: what piled up is written, and after a birth republished."""
        try:
            await asyncio.to_thread(self._history.open)
        except (sqlite3.Error, OSError) as exc:
            # The node runs on; every change it cannot publish is then a gap (reported).
            log.error("sparkplug: history file unusable: %s", exc)
        if self._history.count:
            log.info("sparkplug: %d changes in the history file to republish", self._history.count)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._history_loop(), name="sparkplug:history")
                await self._connections()
        finally:
            await asyncio.to_thread(self._history.close)

    async def _connections(self) -> None:
        while not self._stopping:
            client = self._connect(
                Will(node_topic(self._group, "NDEATH", self._node), self._will_payload, 1, False)
            )
            client.add_listener(self._on_connection)
            client.subscribe(node_topic(self._group, "NCMD", self._node), self._on_ncmd)
            client.subscribe(f"spBv1.0/{self._group}/DCMD/{self._node}/+", self._on_dcmd)
            if self._model.primary_host_id is not None:
                client.subscribe(state_topic(self._model.primary_host_id), self._on_state)
            self._client = client
            async with client:
                await self._serve(client)
            self._client = None

    async def drain(self) -> None:
        """At shutdown: NDEATH with the session's bdSeq, then DISCONNECT (spec 3.0: an edge
        node that disconnects on purpose publishes its NDEATH first)."""
        self._stopping = True
        for task in self._writes:
            task.cancel()
        client = self._client
        if client is not None:
            # The DDATA sent before reach the broker before the NDEATH (one connection, in
            # order); what piled up unsent goes to the history file for the next start.
            await self._die(client)
        await self._write_pending()

    def figures(self) -> Sequence[SinkFigure]:
        """Messages published, births, rebirth requests, refused commands, bad messages."""
        figures = self._figures
        return (
            SinkFigure("sparkplug_published", "Sparkplug messages published.", figures.published),
            SinkFigure(
                "sparkplug_births", "Sparkplug NBIRTHs (births and rebirths).", figures.births
            ),
            SinkFigure(
                "sparkplug_rebirth_requests",
                "NCMD Node Control/Rebirth requests received.",
                figures.rebirth_requests,
            ),
            SinkFigure(
                "sparkplug_commands_refused",
                "DCMD metrics refused (commands = 'off', unknown or read-only tag, invalid "
                "value, busy).",
                figures.commands_refused,
            ),
            SinkFigure(
                "sparkplug_writes_completed",
                "DCMD writes written and read back.",
                figures.writes_completed,
            ),
            SinkFigure(
                "sparkplug_writes_failed",
                "DCMD writes that the device refused or did not confirm.",
                figures.writes_failed,
            ),
            SinkFigure(
                "sparkplug_history_pending",
                "Changes kept for republishing as historical DDATA.",
                self._history.count + len(self._pending),
                "gauge",
            ),
            SinkFigure(
                "sparkplug_history_replayed",
                "Changes republished as historical DDATA.",
                figures.history_replayed,
            ),
            SinkFigure(
                "sparkplug_history_dropped",
                "Changes dropped from the history (its cap), each reported as a gap event.",
                figures.history_dropped,
            ),
            SinkFigure(
                "sparkplug_bad_messages",
                "NCMD, DCMD or STATE messages that could not be read (ignored).",
                figures.bad_messages,
            ),
            SinkFigure(
                "sparkplug_too_large",
                "Sparkplug messages larger than the broker's Maximum Packet Size (not sent).",
                figures.too_large,
            ),
        )

    def problems(self) -> Sequence[str]:
        """Not connected, or connected and waiting for the primary host."""
        client = self._client
        if client is None or not client.is_connected:
            reason = client.last_error if client is not None else None
            return (f"sparkplug: not connected to the broker ({reason or 'connecting'})",)
        if not self._born and self._model.primary_host_id is not None:
            return (
                f"sparkplug: waiting for primary host {self._model.primary_host_id!r} to be "
                "online (no births until then)",
            )
        return ()

    # -- the connection -----------------------------------------------------------------------

    def _will_payload(self) -> bytes:
        # Called by the client as it builds each CONNECT: a new bdSeq for a new session.
        return self._death_payload(self._bdseq.take())

    def _death_payload(self, bdseq: int) -> bytes:
        # NDEATH: the bdSeq metric only, no seq (spec 3.0, topics-ndeath-payload/-seq).
        metric = Metric(DataType.INT64, bdseq, name=BDSEQ, timestamp_ms=_ms(time.time()))
        return encode(Payload(_ms(time.time()), None, (metric,)))

    def _on_connection(self, up: bool) -> None:
        if up:
            if self._model.primary_host_id is not None:
                # Births wait for the host's STATE on this connection (the retained one comes
                # right after the subscription).
                self._host_online = False
            else:
                self._birth()
        else:
            self._born = False
            self._keep_recent()

    async def _serve(self, client: MqttClient) -> None:
        while True:
            try:
                async with asyncio.timeout(NODE_STATUS_INTERVAL):
                    await self._wake.wait()
            except TimeoutError:
                self._publish_status()
                continue
            self._wake.clear()
            if self._restart:
                self._restart = False
                await self._die(client)
                self._keep_recent()  # the host was gone before we heard: it may lack them
                return
            if not self._rebirth:
                continue
            self._rebirth = False
            wait = self._last_rebirth + REBIRTH_SPACING - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._born:
                log.info("sparkplug: rebirth requested (NCMD): NBIRTH and every DBIRTH again")
                self._birth()

    async def _die(self, client: MqttClient) -> None:
        self._born = False
        current = self._bdseq.current
        if current is None or not client.is_connected:
            await client.close()
            return
        self._figures.published += 1
        await client.close(
            final_publish=(
                node_topic(self._group, "NDEATH", self._node),
                self._death_payload(current),
                False,
            )
        )

    # -- births and data ------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % 256
        return self._seq

    def _empty(self) -> bytes:
        return encode(Payload(_ms(time.time()), self._next_seq(), ()))

    def _send(self, topic: str, payload: bytes) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            client.publish(topic, payload, qos=0, retain=False)
        except NotConnected:
            self._born = False
            return False
        except MessageTooLarge as exc:
            self._figures.too_large += 1
            self._log_limited("too-large", "sparkplug: %s not published: %s", topic, exc)
            return False
        self._figures.published += 1
        return True

    def _birth(self) -> None:
        bdseq = self._bdseq.current
        if bdseq is None or self._client is None or not self._client.is_connected:
            return
        now = _ms(time.time())
        values = self._node_values()
        self._seq = 0
        metrics = [
            Metric(DataType.INT64, bdseq, name=BDSEQ, alias=1, timestamp_ms=now),
            Metric(DataType.BOOLEAN, False, name=REBIRTH, alias=2, timestamp_ms=now),
        ]
        for index, (name, datatype) in enumerate(NODE_METRICS):
            metrics.append(
                Metric(datatype, values[index], name=name, alias=3 + index, timestamp_ms=now)
            )
        if not self._send(
            node_topic(self._group, "NBIRTH", self._node),
            encode(Payload(now, 0, tuple(metrics))),
        ):
            return
        self._born = True
        self._last_rebirth = time.monotonic()
        self._figures.births += 1
        self._sent_values = values
        for device in self._devices.values():
            device.born = device.dead = False
            if device.ready():
                self._device_birth(device)
        self._history_wake.set()  # republish what was missed

    def _device_birth(self, device: _Device) -> None:
        now = _ms(time.time())
        metrics = []
        for metric in device.metrics.values():
            if metric.datatype is None or not fits(metric.datatype, metric.value):
                metric.datatype = datatype_of_value(metric.value)
            metrics.append(
                Metric(
                    metric.datatype,
                    metric.value,
                    name=metric.name,
                    alias=metric.alias,
                    timestamp_ms=metric.ts_ms if metric.ts_ms is not None else now,
                    properties=_quality(metric.quality),
                )
            )
            metric.sent_quality = metric.quality
        topic = device_topic(self._group, "DBIRTH", self._node, device.name)
        if not self._send(topic, encode(Payload(now, self._next_seq(), tuple(metrics)))):
            return
        device.born, device.dead = True, False
        if device.all_bad():
            self._device_death(device)

    def _device_death(self, device: _Device) -> None:
        topic = device_topic(self._group, "DDEATH", self._node, device.name)
        if self._send(topic, self._empty()):
            device.dead = True

    def _publish_device(self, device: _Device, updates: list[_Update]) -> None:
        if not device.born:
            if device.ready():
                self._device_birth(device)
            return
        if device.all_bad():
            if not device.dead:
                self._device_death(device)
            return
        if device.dead or any(
            metric.datatype is None or not fits(metric.datatype, value)
            for metric, value, _, _ in updates
        ):
            # Back from a DDEATH, or a value its announced datatype cannot carry (a tag of
            # unknown type): a new DBIRTH announces the device as it is now.
            self._device_birth(device)
            return
        metrics = []
        for metric, value, quality, ts_ms in updates:
            assert metric.datatype is not None
            properties: tuple[tuple[str, DataType, MetricValue], ...] = ()
            if quality != metric.sent_quality:
                properties = _quality(quality)
                metric.sent_quality = quality
            metrics.append(
                Metric(
                    metric.datatype,
                    value,
                    alias=metric.alias,
                    timestamp_ms=ts_ms,
                    properties=properties,
                )
            )
        topic = device_topic(self._group, "DDATA", self._node, device.name)
        try:
            payload = encode(
                Payload(_ms(time.time()), self._next_seq(), tuple(metrics)), checked=True
            )
        except PayloadError as exc:  # checked by fits() above; a bug if it happens
            log.error("sparkplug: DDATA of %s not encoded: %s", device.name, exc)
            return
        if self._send(topic, payload):
            self._remember(device.name, updates)
        else:
            self._keep([Change(device.name, m.name, v, q, ts) for m, v, q, ts in updates])

    def _node_values(self) -> tuple[MetricValue, ...]:
        """The node metrics' values, in NODE_METRICS order."""
        status = self._status()
        return (
            self._model.version,
            status.outbox_depth,
            status.uplink_online,
            self._history.count + len(self._pending),
            self._figures.history_dropped,
        )

    def _publish_status(self) -> None:
        if not self._born:
            return
        values = self._node_values()
        sent = self._sent_values
        if sent == values:
            return
        now = _ms(time.time())
        metrics = [
            Metric(datatype, values[index], alias=3 + index, timestamp_ms=now)
            for index, (_, datatype) in enumerate(NODE_METRICS)
            if sent is None or values[index] != sent[index]
        ]
        topic = node_topic(self._group, "NDATA", self._node)
        if self._send(topic, encode(Payload(now, self._next_seq(), tuple(metrics)))):
            self._sent_values = values

    # -- history --------------------------------------------------------------------------------

    def _keep(self, changes: list[Change]) -> None:
        room = MAX_PENDING - len(self._pending)
        if room < len(changes):
            # The history file cannot keep up (or failed): the excess is a gap, not silence.
            self._dropped(changes[max(room, 0) :], "waiting in memory for the file")
            changes = changes[: max(room, 0)]
        self._pending.extend(changes)
        self._history_wake.set()

    def _keep_recent(self) -> None:
        if self._recent:
            self._keep(
                [
                    Change(device, m.name, v, q, ts)
                    for _, device, updates in self._recent
                    for m, v, q, ts in updates
                ]
            )
            self._recent.clear()
            self._recent_values = 0

    def _remember(self, device: str, updates: list[_Update]) -> None:
        # One entry per message (the list the DDATA was made of): cheap on the live path.
        now = time.monotonic()
        recent = self._recent
        recent.append((now, device, updates))
        self._recent_values += len(updates)
        while recent and (
            now - recent[0][0] > self._recent_window or self._recent_values > MAX_RECENT
        ):
            self._recent_values -= len(recent.popleft()[2])

    def _dropped(self, changes: list[Change], where: str) -> None:
        if changes:
            times = [change.ts_ms for change in changes]
            self._report_gap(Dropped(len(changes), min(times), max(times)), where)

    def _report_gap(self, dropped: Dropped, where: str) -> None:
        self._figures.history_dropped += dropped.count
        log.warning(
            "sparkplug: %d changes dropped from the history (%s), readings of %s..%s",
            dropped.count,
            where,
            rfc3339(dropped.first_ms / 1000),
            rfc3339(dropped.last_ms / 1000),
        )
        if self._emit is None:
            return
        gap = Event(
            time.time(),
            "gap",
            value={
                "reason": "sparkplug_history_dropped",
                "ranges": [],
                "count": dropped.count,
                "first_ts": rfc3339(dropped.first_ms / 1000),
                "last_ts": rfc3339(dropped.last_ms / 1000),
                "detail": f"Sparkplug history {where}: not republished as historical DDATA",
            },
        )
        task = asyncio.get_running_loop().create_task(self._emit([gap]), name="sparkplug:gap")
        self._writes.add(task)  # kept referenced until done (the writes' set serves)
        task.add_done_callback(self._writes.discard)

    async def _write_pending(self) -> None:
        if not self._pending:
            return
        changes, self._pending = self._pending, []
        try:
            dropped = await asyncio.to_thread(self._history.append, changes)
        except sqlite3.Error as exc:
            self._log_limited("history-write", "sparkplug: history file not written: %s", exc)
            self._dropped(changes, "not written to the file")
            return
        if dropped is not None:
            self._report_gap(dropped, f"over its cap of {self._history.max_rows:,} changes")

    async def _history_loop(self) -> None:
        while True:
            await self._history_wake.wait()
            self._history_wake.clear()
            await self._write_pending()
            try:
                if self._born and self._history.count and await self._replay_some():
                    self._history_wake.set()  # more to republish
            except sqlite3.Error as exc:
                self._log_limited("history", "sparkplug: history file: %s", exc)
                self._history_wake.set()  # again later
                await asyncio.sleep(HISTORY_FLUSH * 25)
            await asyncio.sleep(HISTORY_FLUSH if not self._born else REPLAY_PAUSE)

    async def _replay_some(self) -> bool:
        """Republish the oldest stored changes as historical DDATA; False when none was sent."""
        # A device whose DBIRTH is still to come (its first poll) keeps its changes for later.
        unborn = [name for name, device in self._devices.items() if not device.born]
        rows = await asyncio.to_thread(self._history.oldest, REPLAY_METRICS, skip=unborn)
        if not rows or not self._born:
            return False
        by_device: dict[str, list[Metric]] = {}
        unusable: list[Change] = []
        for _, change in rows:
            device = self._devices.get(change.device)
            metric = device.metrics.get(change.metric) if device is not None else None
            if metric is None or metric.datatype is None or not fits(metric.datatype, change.value):
                unusable.append(change)  # left the config, or no longer of its datatype
                continue
            by_device.setdefault(change.device, []).append(
                Metric(
                    metric.datatype,
                    change.value,
                    alias=metric.alias,
                    timestamp_ms=change.ts_ms,
                    is_historical=True,
                    properties=_quality(change.quality),
                )
            )
        now = _ms(time.time())
        for name, metrics in by_device.items():
            payload = encode(Payload(now, self._next_seq(), tuple(metrics)))
            if not self._send(device_topic(self._group, "DDATA", self._node, name), payload):
                return False  # not connected any more: the rows stay for the next birth
            self._figures.history_replayed += len(metrics)
        if unusable:
            times = [change.ts_ms for change in unusable]
            self._report_gap(
                Dropped(len(unusable), min(times), max(times)),
                "of devices, tags or datatypes the config no longer has",
            )
        await asyncio.to_thread(self._history.delete, [row_id for row_id, _ in rows])
        return True

    # -- what the broker sends ---------------------------------------------------------------

    def _on_ncmd(self, message: Message) -> None:
        try:
            _, _, metrics = decode_received(message.payload)
        except PayloadError as exc:
            self._bad(message.topic, str(exc))
            return
        for metric in metrics:
            if (metric.name == REBIRTH or (metric.name is None and metric.alias == 2)) and (
                metric.value is True
            ):
                self._figures.rebirth_requests += 1
                self._rebirth = True
                self._wake.set()
            else:
                self._bad(message.topic, f"unknown node command {metric.name or metric.alias}")

    def _on_dcmd(self, message: Message) -> None:
        device_name = message.topic.rsplit("/", 1)[-1]
        if self._write is None:
            self._refuse(device_name, "sparkplug.commands is 'off' (docs/sparkplug.md, 'Commands')")
            return
        device = self._devices.get(device_name)
        if device is None or device.machine:
            self._refuse(device_name, "not a device with writable tags")
            return
        try:
            _, _, metrics = decode_received(message.payload)
        except PayloadError as exc:
            self._bad(message.topic, str(exc))
            return
        by_alias = {metric.alias: metric for metric in device.metrics.values()}
        for received in metrics:
            target = (
                device.metrics.get(received.name)
                if received.name is not None
                else by_alias.get(received.alias or 0)
            )
            if target is None:
                self._refuse(device_name, f"no metric {received.name or received.alias}")
                continue
            value = received.value
            if received.datatype is None and isinstance(value, int):
                # Sent by alias without a datatype: read the raw field as the birth's type.
                if target.datatype in _SIGNED_32 and value >= 2**31:
                    value -= 2**32
                elif target.datatype is DataType.INT64 and value >= 2**63:
                    value -= 2**64
            if len(self._writes) >= MAX_WRITES:
                self._refuse(device_name, f"{MAX_WRITES} writes already running")
                continue
            task = asyncio.get_running_loop().create_task(
                self._write_one(f"{device_name}/{target.name}", value),
                name=f"sparkplug:dcmd:{device_name}",
            )
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write_one(self, ref: str, value: MetricValue) -> None:
        assert self._write is not None
        try:
            outcome, detail = await self._write(ref, value)
        except Exception:  # a bug in the engine must not end the node
            log.exception("sparkplug: DCMD write to %s failed", ref)
            self._figures.writes_failed += 1
            return
        if outcome == "completed":
            self._figures.writes_completed += 1
            log.info("sparkplug: DCMD: %s", detail)
        elif outcome == "refused":
            self._refuse(ref.partition("/")[0], detail)
        else:
            self._figures.writes_failed += 1
            log.warning("sparkplug: DCMD: %s", detail)

    def _refuse(self, device: str, reason: str) -> None:
        self._figures.commands_refused += 1
        # One log line a minute per configured device (a peer's made-up names share one).
        key = f"dcmd:{device}" if device in self._devices else "dcmd:?"
        self._log_limited(key, "sparkplug: DCMD to %s refused: %s", device, reason)

    def _on_state(self, message: Message) -> None:
        online, timestamp = _parse_state(message.payload)
        if online is None or timestamp is None:
            self._bad(message.topic, "not a Sparkplug 3.0 STATE payload {online, timestamp}")
            return
        if self._host_timestamp is not None and timestamp < self._host_timestamp:
            return  # an older STATE than one already seen (spec 3.0: compare the timestamps)
        self._host_timestamp = timestamp
        was_online, self._host_online = self._host_online, online
        if online and not self._born:
            log.info("sparkplug: primary host %s is online", self._model.primary_host_id)
            self._birth()
        elif not online and was_online and self._born:
            log.warning(
                "sparkplug: primary host %s went offline: NDEATH, reconnecting",
                self._model.primary_host_id,
            )
            self._restart = True
            self._wake.set()

    def _bad(self, topic: str, reason: str) -> None:
        self._figures.bad_messages += 1
        self._log_limited("bad", "sparkplug: ignored a message on %s: %s", topic, reason)

    def _log_limited(self, key: str, text: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._figures.last_log.get(key, -LOG_EVERY) >= LOG_EVERY:
            self._figures.last_log[key] = now
            log.warning(text, *args)


def _scalar(value: Any) -> MetricValue:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, separators=(",", ":"))  # an array or object, as its JSON text


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _quality(quality: str | None) -> tuple[tuple[str, DataType, MetricValue], ...]:
    return ((QUALITY, DataType.INT32, QUALITY_CODES.get(quality or "bad", 0)),)


def _parse_state(payload: bytes) -> tuple[bool | None, int | None]:
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(document, dict):
        return None, None
    online, timestamp = document.get("online"), document.get("timestamp")
    if (
        not isinstance(online, bool)
        or not isinstance(timestamp, int)
        or isinstance(timestamp, bool)
    ):
        return None, None
    return online, timestamp
