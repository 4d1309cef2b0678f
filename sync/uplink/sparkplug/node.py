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
born its births-to-be keep the newest value of each metric, and every change is kept as
history, as are the changes sent in the last moments before a connection loss; after the next
birth they are republished oldest first as historical DDATA (replay.py). DCMD writes go to the
workflow engine (commands.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sync.events import Event
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
from sync.sparkplug.history import Change, History
from sync.sparkplug.model import (
    BDSEQ,
    FIRST_NODE_METRIC_ALIAS,
    NODE_METRICS,
    OEE_FIGURES,
    REBIRTH,
    DeviceState,
    NodeModel,
    NodeStatus,
    Update,
    devices_of,
    metric_updates,
    ms,
    number,
    quality_property,
)
from sync.sparkplug.topics import device_topic, node_topic, state_topic
from sync.uplink.sink import SinkFigure
from sync.uplink.sparkplug.commands import DeviceCommands, Write
from sync.uplink.sparkplug.limited_log import LimitedLog
from sync.uplink.sparkplug.replay import Emit, HistoryKeeper

log = logging.getLogger("edge_agent.sparkplug")

NODE_STATUS_INTERVAL = 5.0  # seconds between looks at the node metrics (NDATA on change)
REBIRTH_SPACING = 1.0  # seconds: rebirth requests closer than this are served together


@dataclass(slots=True)
class _Figures:
    published: int = 0
    births: int = 0
    rebirth_requests: int = 0
    bad_messages: int = 0
    too_large: int = 0


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
        self._devices: dict[str, DeviceState] = devices_of(model)
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
        self._limited = LimitedLog(log)
        self._commands = DeviceCommands(
            devices=self._devices, limited=self._limited, bad_message=self._bad
        )
        self._history = HistoryKeeper(history, limited=self._limited, keepalive=keepalive)

    def reports_to(self, emit: Emit) -> None:
        """Where a `gap` event goes when history is dropped (the pipeline: outbox, sinks)."""
        self._history.reports_to(emit)

    def writes_to(self, write: Write) -> None:
        """Take DCMD writes (sparkplug.commands = 'writable'): each metric of a DCMD for a
        device's tag goes to `write`; without this every DCMD is refused."""
        self._commands.writes_to(write)

    # -- the Sink protocol ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The sink's name."""
        return "sparkplug"

    def offer_events(self, events: Sequence[Event]) -> None:
        """Samples of the config's tags, machine states and OEE records -> DDATA (or births)."""
        changed: dict[str, list[Update]] = {}
        for event in events:
            device = self._devices.get(event.device or "")
            if device is None:
                continue
            for metric, value, quality in metric_updates(device, event):
                ts_ms = ms(event.ts)
                metric.value, metric.quality, metric.ts_ms = value, quality, ts_ms
                changed.setdefault(device.name, []).append((metric, value, quality, ts_ms))
        if not self._born:
            # The next birth carries the newest values; the history file every change.
            for name, updates in changed.items():
                self._history.keep([Change(name, m.name, v, q, ts) for m, v, q, ts in updates])
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
            if key in OEE_FIGURES and number(value) != device.metrics[OEE_FIGURES[key]].value
        }
        if changed:
            self.offer_events([Event(time.time(), "oee", machine, "oee", changed, "good")])

    def retire(self, device: str, tags: Sequence[str]) -> None:
        """A device left the config: DDEATH, and it is no longer announced."""
        gone = self._devices.pop(device, None)
        if gone is not None and gone.born and not gone.dead and self._born:
            self._send(device_topic(self._group, "DDEATH", self._node, device), self._empty())

    async def run(self) -> None:
        """Connect, birth, serve; after the primary host went offline, NDEATH and again. Beside
        it, the history: what piled up is written, and after a birth republished."""
        # The node runs on when the file is unusable: every change it cannot publish is then
        # a gap (reported).
        await self._history.open()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._history.run(self), name="sparkplug:history")
                await self._connections()
        finally:
            await self._history.close()

    async def _connections(self) -> None:
        while not self._stopping:
            client = self._connect(
                Will(node_topic(self._group, "NDEATH", self._node), self._will_payload, 1, False)
            )
            client.add_listener(self._on_connection)
            client.subscribe(node_topic(self._group, "NCMD", self._node), self._on_ncmd)
            client.subscribe(f"spBv1.0/{self._group}/DCMD/{self._node}/+", self._commands.on_dcmd)
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
        self._commands.cancel()
        client = self._client
        if client is not None:
            # The DDATA sent before reach the broker before the NDEATH (one connection, in
            # order); what piled up unsent goes to the history file for the next start.
            await self._die(client)
        await self._history.write_pending()

    def figures(self) -> Sequence[SinkFigure]:
        """Messages published, births, rebirth requests, refused commands, bad messages."""
        figures, commands, history = self._figures, self._commands, self._history
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
                commands.refused,
            ),
            SinkFigure(
                "sparkplug_writes_completed",
                "DCMD writes written and read back.",
                commands.completed,
            ),
            SinkFigure(
                "sparkplug_writes_failed",
                "DCMD writes that the device refused or did not confirm.",
                commands.failed,
            ),
            SinkFigure(
                "sparkplug_history_pending",
                "Changes kept for republishing as historical DDATA.",
                history.pending,
                "gauge",
            ),
            SinkFigure(
                "sparkplug_history_replayed",
                "Changes republished as historical DDATA.",
                history.replayed,
            ),
            SinkFigure(
                "sparkplug_history_dropped",
                "Changes dropped from the history (its cap), each reported as a gap event.",
                history.dropped,
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
        metric = Metric(DataType.INT64, bdseq, name=BDSEQ, timestamp_ms=ms(time.time()))
        return encode(Payload(ms(time.time()), None, (metric,)))

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
            self._history.keep_recent()

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
                self._history.keep_recent()  # the host was gone before we heard: it may lack them
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
        return encode(Payload(ms(time.time()), self._next_seq(), ()))

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
            self._limited.warning("too-large", "sparkplug: %s not published: %s", topic, exc)
            return False
        self._figures.published += 1
        return True

    def _birth(self) -> None:
        bdseq = self._bdseq.current
        if bdseq is None or self._client is None or not self._client.is_connected:
            return
        now = ms(time.time())
        values = self._node_values()
        self._seq = 0
        metrics = [
            Metric(DataType.INT64, bdseq, name=BDSEQ, alias=1, timestamp_ms=now),
            Metric(DataType.BOOLEAN, False, name=REBIRTH, alias=2, timestamp_ms=now),
        ]
        for index, (name, datatype) in enumerate(NODE_METRICS):
            metrics.append(
                Metric(
                    datatype,
                    values[index],
                    name=name,
                    alias=FIRST_NODE_METRIC_ALIAS + index,
                    timestamp_ms=now,
                )
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
        self._history.wake()  # republish what was missed

    def _device_birth(self, device: DeviceState) -> None:
        now = ms(time.time())
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
                    properties=quality_property(metric.quality),
                )
            )
            metric.sent_quality = metric.quality
        topic = device_topic(self._group, "DBIRTH", self._node, device.name)
        if not self._send(topic, encode(Payload(now, self._next_seq(), tuple(metrics)))):
            return
        device.born, device.dead = True, False
        if device.all_bad():
            self._device_death(device)

    def _device_death(self, device: DeviceState) -> None:
        topic = device_topic(self._group, "DDEATH", self._node, device.name)
        if self._send(topic, self._empty()):
            device.dead = True

    def _publish_device(self, device: DeviceState, updates: list[Update]) -> None:
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
                properties = quality_property(quality)
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
                Payload(ms(time.time()), self._next_seq(), tuple(metrics)), checked=True
            )
        except PayloadError as exc:  # checked by fits() above; a bug if it happens
            log.error("sparkplug: DDATA of %s not encoded: %s", device.name, exc)
            return
        if self._send(topic, payload):
            self._history.remember(device.name, updates)
        else:
            self._history.keep([Change(device.name, m.name, v, q, ts) for m, v, q, ts in updates])

    def _node_values(self) -> tuple[MetricValue, ...]:
        """The node metrics' values, in NODE_METRICS order."""
        status = self._status()
        return (
            self._model.version,
            status.outbox_depth,
            status.uplink_online,
            self._history.pending,
            self._history.dropped,
        )

    def _publish_status(self) -> None:
        if not self._born:
            return
        values = self._node_values()
        sent = self._sent_values
        if sent == values:
            return
        now = ms(time.time())
        metrics = [
            Metric(datatype, values[index], alias=FIRST_NODE_METRIC_ALIAS + index, timestamp_ms=now)
            for index, (_, datatype) in enumerate(NODE_METRICS)
            if sent is None or values[index] != sent[index]
        ]
        topic = node_topic(self._group, "NDATA", self._node)
        if self._send(topic, encode(Payload(now, self._next_seq(), tuple(metrics)))):
            self._sent_values = values

    # -- history (sync/uplink/sparkplug/replay.py) ----------------------------------------------

    @property
    def born(self) -> bool:
        """Whether NBIRTH went out on the current connection."""
        return self._born

    def unborn_devices(self) -> list[str]:
        """Devices whose DBIRTH is still to come (their first poll): their history waits."""
        return [name for name, device in self._devices.items() if not device.born]

    def publish_historical(self, changes: Sequence[Change]) -> tuple[int, list[Change]] | None:
        """`changes` as historical DDATA per device: (metrics sent, changes of devices, tags
        or datatypes the config no longer has), or None when a send failed."""
        by_device: dict[str, list[Metric]] = {}
        unusable: list[Change] = []
        for change in changes:
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
                    properties=quality_property(change.quality),
                )
            )
        now = ms(time.time())
        for name, metrics in by_device.items():
            payload = encode(Payload(now, self._next_seq(), tuple(metrics)))
            if not self._send(device_topic(self._group, "DDATA", self._node, name), payload):
                return None  # not connected any more: the rows stay for the next birth
        return sum(len(metrics) for metrics in by_device.values()), unusable

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
        self._limited.warning("bad", "sparkplug: ignored a message on %s: %s", topic, reason)


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
