"""The simulator's address space as data: namespace, node table, bulk names, model values.

Every variable has a string node id in the namespace ``urn:edge-agent:simulator`` (index 2:
index 1 is the server's application URI). The node table is printed on start and copied in
simulators/README.md; ``Bulk.0000`` .. ``Bulk.4999`` (``BulkBlock``) are the load-test
variables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, cast

from asyncua import ua

from simulators.line import PointValue

__all__ = [
    "APPLICATION_URI",
    "BULK_COUNT",
    "BULK_GROUP",
    "CONST_BYTES",
    "CONST_DATETIME",
    "NAMESPACE_INDEX",
    "NAMESPACE_URI",
    "NODES_BY_NAME",
    "NODE_TABLE",
    "TYPES",
    "NodeSpec",
    "bulk_name",
    "make_node_id",
    "model_values",
    "node_name",
    "node_table",
    "original_type",
]

NAMESPACE_URI: Final = "urn:edge-agent:simulator"
# Namespace 1 is always the server's application URI: it must differ from NAMESPACE_URI or
# register_namespace() would hand back index 1 instead of 2.
APPLICATION_URI: Final = "urn:edge-agent:simulator:server"
NAMESPACE_INDEX: Final = 2
BULK_COUNT: Final = 5000
BULK_GROUP: Final = 100  # variables per bulk sub-folder (asyncua adds references in O(n))

_VT = ua.VariantType
TYPES: Final[Mapping[str, ua.VariantType]] = {
    "Boolean": _VT.Boolean,
    "SByte": _VT.SByte,
    "Byte": _VT.Byte,
    "Int16": _VT.Int16,
    "UInt16": _VT.UInt16,
    "Int32": _VT.Int32,
    "UInt32": _VT.UInt32,
    "Int64": _VT.Int64,
    "UInt64": _VT.UInt64,
    "Float": _VT.Float,
    "Double": _VT.Double,
    "String": _VT.String,
    "DateTime": _VT.DateTime,
    "ByteString": _VT.ByteString,
}

CONST_DATETIME: Final = datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
CONST_BYTES: Final = b"\x01\x02\xff"


@dataclass(frozen=True)
class NodeSpec:
    """One variable of the simulator's address space (string node id in namespace 2)."""

    name: str  # the string identifier, e.g. "Filler.State"
    type: str  # OPC UA built-in data type name, e.g. "UInt16"
    access: Literal["r", "rw"]
    description: str
    array: bool = False
    point: str | None = None  # LineModel point behind a writable variable
    initial: Any = None  # constants and plain-memory setpoints

    @property
    def node_id(self) -> str:
        """The node id as written in the agent's config."""
        return f"ns={NAMESPACE_INDEX};s={self.name}"

    @property
    def type_label(self) -> str:
        """``Double`` or ``Int32[]``."""
        return self.type + ("[]" if self.array else "")


_n = NodeSpec
NODE_TABLE: Final[tuple[NodeSpec, ...]] = (
    _n("Filler.State", "UInt16", "r", "0 off 1 run 2 unplanned 3 planned 4 starved"),
    _n("Filler.FaultCode", "UInt16", "r", "1..9 while state 2, else 0"),
    _n("Filler.StopReason", "String", "r", "why the machine stands ('' while running)"),
    _n("Filler.Running", "Boolean", "r", "state == 1"),
    _n("Filler.OrderDone", "Boolean", "r", "order count reached TargetQty"),
    _n("Filler.Counters.Total", "UInt32", "r", "bottles filled, rolls over"),
    _n("Filler.Counters.Rejected", "UInt32", "r", "bottles rejected, rolls over"),
    _n("Filler.Counters.Good", "UInt32", "r", "good bottles, rolls over"),
    _n("Filler.Counters.Order", "UInt32", "r", "bottles since TargetQty was written"),
    _n("Filler.Temperature", "Double", "r", "°C"),
    _n("Filler.FillLevel", "Float", "r", "ml in the last bottle (498..502)"),
    _n("Filler.ZoneTemperatures", "Double", "r", "4 zones, °C", array=True),
    _n("Filler.LastCycleMs", "UInt16", "r", "last cycle time in ms"),
    _n("Filler.CycleCounter", "UInt16", "r", "PLC scan counter 100 Hz, wraps"),
    _n("Filler.EnergyKwh", "Double", "r", "kWh"),
    _n("Filler.RuntimeS", "Double", "r", "seconds running"),
    _n("Filler.Start", "Boolean", "rw", "run command (ignored while locked)", point="start"),
    _n("Filler.Stop", "Boolean", "rw", "stop command; true stops, clears Start", point="stop"),
    _n("Filler.QualityHold", "Boolean", "rw", "while true: state 3", point="quality_hold"),
    _n(
        "Filler.MaintenanceLock",
        "Boolean",
        "rw",
        "while true: state 3, Start ignored",
        point="maintenance_lock",
    ),
    _n("Filler.ProductCode", "UInt16", "rw", "0..9999 (else BadOutOfRange)", point="product_code"),
    _n("Filler.TargetQty", "UInt32", "rw", "writing starts an order", point="target_qty"),
    _n("Filler.Recipe", "String", "rw", "product name, ASCII, <= 16 chars", point="product_name"),
    _n("Filler.Setpoints.SpeedBpm", "Double", "rw", "plain memory", initial=120.0),
    _n("Filler.Setpoints.FillTarget", "Float", "rw", "plain memory", initial=500.0),
    _n("Filler.Setpoints.Offset", "Int16", "rw", "plain memory", initial=0),
    _n("Filler.Setpoints.BatchSize", "Int32", "rw", "plain memory", initial=24),
    _n("Filler.Setpoints.Operator", "String", "rw", "plain memory", initial=""),
    _n(
        "Filler.Setpoints.Zones",
        "Int32",
        "rw",
        "plain memory",
        array=True,
        initial=[60, 62, 64, 66],
    ),
    _n("Filler.Const.Boolean", "Boolean", "r", "constant true", initial=True),
    _n("Filler.Const.SByte", "SByte", "r", "constant -100", initial=-100),
    _n("Filler.Const.Byte", "Byte", "r", "constant 200", initial=200),
    _n("Filler.Const.Int16", "Int16", "r", "constant -1234", initial=-1234),
    _n("Filler.Const.UInt16", "UInt16", "r", "constant 65535", initial=65535),
    _n("Filler.Const.Int32", "Int32", "r", "constant -123456", initial=-123456),
    _n("Filler.Const.UInt32", "UInt32", "r", "constant 0xDEADBEEF", initial=0xDEADBEEF),
    _n("Filler.Const.Int64", "Int64", "r", "constant -1234567890123", initial=-1234567890123),
    _n("Filler.Const.UInt64", "UInt64", "r", "constant 2**64-1", initial=2**64 - 1),
    _n("Filler.Const.Float", "Float", "r", "constant 1.5", initial=1.5),
    _n("Filler.Const.Double", "Double", "r", "constant pi", initial=math.pi),
    _n("Filler.Const.String", "String", "r", "constant 'edge-agent'", initial="edge-agent"),
    _n(
        "Filler.Const.DateTime",
        "DateTime",
        "r",
        "constant 2024-01-02T03:04:05.678Z",
        initial=CONST_DATETIME,
    ),
    _n("Filler.Const.ByteString", "ByteString", "r", "constant 01 02 FF", initial=CONST_BYTES),
)
NODES_BY_NAME: Final[Mapping[str, NodeSpec]] = {spec.name: spec for spec in NODE_TABLE}


def bulk_name(index: int) -> str:
    """``Bulk.0042``."""
    return f"Bulk.{index:04d}"


def node_name(node: str) -> str:
    """``Filler.State`` from ``Filler.State`` or ``ns=2;s=Filler.State``."""
    prefix = f"ns={NAMESPACE_INDEX};s="
    return node[len(prefix) :] if node.startswith(prefix) else node


def make_node_id(identifier: int | str, namespace: int = NAMESPACE_INDEX) -> ua.NodeId:
    """An asyncua NodeId (string identifiers in the simulator's namespace by default)."""
    return ua.NodeId(cast(ua.String, identifier), cast(ua.Int16, namespace))


def original_type(name: str) -> ua.VariantType:
    """A variable's data type as the node table declares it (bulk variables: UInt16)."""
    spec = NODES_BY_NAME.get(name)
    return TYPES[spec.type] if spec is not None else _VT.UInt16


def model_values(snapshot: Mapping[str, PointValue]) -> dict[str, Any]:
    """Values of the model-backed variables from a ``LineModel.snapshot()``."""
    temp = float(snapshot["temperature"])
    total = int(snapshot["total_count"])
    return {
        "Filler.State": snapshot["state"],
        "Filler.FaultCode": snapshot["fault_code"],
        "Filler.StopReason": snapshot["stop_reason"],
        "Filler.Running": snapshot["running"],
        "Filler.OrderDone": snapshot["order_done"],
        "Filler.Counters.Total": total,
        "Filler.Counters.Rejected": snapshot["reject_count"],
        "Filler.Counters.Good": snapshot["good_count"],
        "Filler.Counters.Order": min(int(snapshot["order_count"]), 0xFFFF_FFFF),
        "Filler.Temperature": temp,
        # A deterministic per-bottle wobble of the fill level (not part of the line model).
        "Filler.FillLevel": 500.0 + ((total * 7919) % 41 - 20) / 10.0,
        "Filler.ZoneTemperatures": [round(temp + d, 3) for d in (0.0, 1.5, -0.8, 0.3)],
        "Filler.LastCycleMs": snapshot["last_cycle_ms"],
        "Filler.CycleCounter": snapshot["cycle_counter16"],
        "Filler.EnergyKwh": snapshot["energy_kwh"],
        "Filler.RuntimeS": snapshot["runtime_s"],
        "Filler.Start": snapshot["start"],
        "Filler.Stop": snapshot["stop"],
        "Filler.QualityHold": snapshot["quality_hold"],
        "Filler.MaintenanceLock": snapshot["maintenance_lock"],
        "Filler.ProductCode": snapshot["product_code"],
        "Filler.TargetQty": snapshot["target_qty"],
        "Filler.Recipe": snapshot["product_name"],
    }


def node_table() -> str:
    """Render the node table as Markdown (printed on start, copied in the README)."""
    lines = [
        "| node id | type | access | notes |",
        "| --- | --- | --- | --- |",
    ]
    for spec in NODE_TABLE:
        lines.append(f"| {spec.node_id} | {spec.type_label} | {spec.access} | {spec.description} |")
    lines.append(
        f"| ns={NAMESPACE_INDEX};s=Bulk.0000 .. Bulk.4999 | UInt16 | r | "
        "load test; see bulk_change_fraction |"
    )
    return "\n".join(lines)
