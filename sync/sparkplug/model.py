"""What the edge node announces and the state of each metric, pure (docs/sparkplug.md).

The config's devices and machines become Sparkplug devices whose metrics get aliases in config
order: 1 is bdSeq, 2 Node Control/Rebirth, then the node metrics, then every device's tags and
every machine's metrics. `metric_updates` maps one committed event onto the metrics it changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sync.events import Event
from sync.sparkplug.codec import DataType, MetricValue

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
FIRST_NODE_METRIC_ALIAS = 3
MACHINE_METRICS: tuple[tuple[str, DataType | None], ...] = (
    ("State", DataType.STRING),
    ("State Code", None),  # the machine's code, as its state tag reads it
    ("OEE/Availability", DataType.DOUBLE),
    ("OEE/Performance", DataType.DOUBLE),
    ("OEE/Quality", DataType.DOUBLE),
    ("OEE/OEE", DataType.DOUBLE),
)
# An OEE record's figure -> the machine metric that carries it.
OEE_FIGURES = {
    "availability": "OEE/Availability",
    "performance": "OEE/Performance",
    "quality": "OEE/Quality",
    "oee": "OEE/OEE",
}


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
class MetricState:
    """One metric of a device: its alias, datatype, newest value and what the host heard."""

    name: str
    alias: int
    datatype: DataType | None
    value: MetricValue = None
    quality: str | None = None  # None: nothing read yet
    ts_ms: int | None = None
    sent_quality: str | None = None  # the quality the host last heard of


@dataclass(slots=True)
class DeviceState:
    """One Sparkplug device (a config device or a machine) and whether the host knows it."""

    name: str
    metrics: dict[str, MetricState]
    machine: bool
    born: bool = False  # a DBIRTH went out since the last NBIRTH
    dead: bool = False  # a DDEATH went out after it

    def ready(self) -> bool:
        """Whether it can be born: a machine always, a device once every tag has reported."""
        return self.machine or all(metric.quality is not None for metric in self.metrics.values())

    def all_bad(self) -> bool:
        """Whether every tag of a (non-machine) device reads bad: a DDEATH is due."""
        return not self.machine and all(m.quality == "bad" for m in self.metrics.values())


# A metric's change as offered: (metric, value, quality, reading time in ms).
Update = tuple[MetricState, MetricValue, str, int]


def devices_of(model: NodeModel) -> dict[str, DeviceState]:
    """The node's devices with their metrics' aliases: devices' tags, then machines."""
    devices: dict[str, DeviceState] = {}
    alias = FIRST_NODE_METRIC_ALIAS - 1 + len(NODE_METRICS)
    for device in model.devices:
        metrics = {}
        for tag in device.tags:
            alias += 1
            metrics[tag.name] = MetricState(tag.name, alias, tag.datatype)
        devices[device.name] = DeviceState(device.name, metrics, machine=False)
    for machine in model.machines:
        metrics = {}
        for name, datatype in MACHINE_METRICS:
            alias += 1
            metrics[name] = MetricState(name, alias, datatype)
        devices[machine] = DeviceState(machine, metrics, machine=True)
    return devices


def metric_updates(device: DeviceState, event: Event) -> list[tuple[MetricState, MetricValue, str]]:
    """The metrics of `device` that `event` changes: a tag's sample, a machine's state (name
    and code) or OEE figures; nothing for any other event."""
    quality = event.quality or "good"
    if event.kind == "sample" and not device.machine:
        metric = device.metrics.get(event.tag or "")
        if metric is None:
            return []
        return [(metric, scalar(event.value), quality)]
    if not device.machine or not isinstance(event.value, dict):
        return []
    if event.kind == "state":
        return [
            (device.metrics["State"], scalar(event.value.get("state")), quality),
            (device.metrics["State Code"], scalar(event.value.get("code")), quality),
        ]
    if event.kind == "oee":
        return [
            (device.metrics[name], number(event.value.get(key)), quality)
            for key, name in OEE_FIGURES.items()
            if key in event.value
        ]
    return []


def ms(ts: float) -> int:
    """Unix seconds -> Sparkplug milliseconds (0 for an unknown time)."""
    return int(ts * 1000 + 0.5) if ts > 0 else 0


def scalar(value: Any) -> MetricValue:
    """A value as a metric carries it: an array or object as its JSON text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, separators=(",", ":"))


def number(value: Any) -> float | None:
    """An OEE figure as a double (None unless a number)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def quality_property(quality: str | None) -> tuple[tuple[str, DataType, MetricValue], ...]:
    """The metric property that carries a reading's quality (OPC DA code)."""
    return ((QUALITY, DataType.INT32, QUALITY_CODES.get(quality or "bad", 0)),)
