"""The simulator's variables in the running server: built from the node table, written as
the PLC itself writes them, and the model-backed ones turning client writes into commands.

Writes by clients to model-backed variables (start, product code, recipe, ...) go through a
value setter into ``LineModel.write``; an invalid value is refused with BadOutOfRange. asyncua
itself refuses a value whose variant type differs from the node's (BadTypeMismatch), like most
PLCs: clients must convert to the node's data type.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from asyncua import ua
from asyncua.common.node import Node
from asyncua.common.utils import ServiceError
from asyncua.server.address_space import NodeData
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes

from simulators.line import LineModel
from simulators.opcua.nodes import (
    BULK_GROUP,
    NAMESPACE_INDEX,
    NODE_TABLE,
    NODES_BY_NAME,
    TYPES,
    NodeSpec,
    bulk_name,
    make_node_id,
    model_values,
    node_name,
    original_type,
)
from simulators.opcua.values import coerce, same_value, status_code
from simulators.opcua.writes import WriteLog

__all__ = ["Variables"]

_VT = ua.VariantType

# Set while the simulator itself writes a variable (model ticks, set_value): the value setter
# must then store the value instead of treating it as a client's command to the model.
_INTERNAL_WRITE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "opcua_sim_internal_write", default=False
)

Setter = Callable[[NodeData, AttributeIds, ua.DataValue], None]


class Variables:
    """Node ids, current data types, last written values and injected status codes."""

    def __init__(self, *, model: LineModel, write_log: WriteLog) -> None:
        """Variables of ``model``; refused client writes are recorded in ``write_log``."""
        self._model = model
        self._write_log = write_log
        self._server: Server | None = None
        self._nodes: dict[str, ua.NodeId] = {}
        self._vtypes: dict[str, ua.VariantType] = {}
        self._cache: dict[str, Any] = {}  # last value the simulator wrote per variable
        self._status: dict[str, ua.StatusCode] = {}  # injected status per variable

    def name(self, node: str) -> str:
        """``Filler.State`` from either node form; KeyError if there is no such variable."""
        name = node_name(node)
        self.node_id(name)
        return name

    def node_id(self, node: str) -> ua.NodeId:
        """The NodeId of a variable; KeyError if there is none."""
        name = node_name(node)
        if name not in self._nodes:
            raise KeyError(f"no variable {name!r}")
        return self._nodes[name]

    def cached(self, name: str, default: Any = None) -> Any:
        """The value the simulator last wrote to ``name`` (``default`` if none)."""
        return self._cache.get(name, default)

    def type_changed(self, name: str) -> bool:
        """True if the variable's data type differs from the node table's."""
        return self._vtypes.get(name) != original_type(name)

    def changed_types(self) -> dict[str, str]:
        """Variables whose data type differs from the node table's, with their type now."""
        return {
            name: vtype.name
            for name, vtype in sorted(self._vtypes.items())
            if vtype != original_type(name)
        }

    def status_codes(self) -> dict[str, str]:
        """Injected status codes by variable."""
        return {name: code.name for name, code in sorted(self._status.items())}

    def detach(self) -> None:
        """The server stopped: writes fail until the next ``build()``."""
        self._server = None

    async def build(self, server: Server, bulk_values: Sequence[int]) -> None:
        """Objects/Filler/... and Objects/Bulk/Gnn/Bulk.nnnn, with initial values."""
        self._server = server
        parents: dict[str, Node] = {}
        values = model_values(self._model.snapshot())
        for spec in NODE_TABLE:
            parent = await _parent_of(server.nodes.objects, spec.name, parents)
            value = values.get(spec.name, spec.initial)
            await self._add_table_variable(server, parent, spec, value)
        if bulk_values:
            await self._add_bulk_variables(server, bulk_values)

    async def _add_table_variable(
        self, server: Server, parent: Node, spec: NodeSpec, value: Any
    ) -> None:
        vtype = TYPES[spec.type]
        var = await parent.add_variable(
            make_node_id(spec.name),
            ua.QualifiedName(spec.name.rsplit(".", 1)[-1], NAMESPACE_INDEX),
            ua.Variant(coerce(value, vtype, spec.array), vtype, is_array=spec.array),
            varianttype=vtype,
        )
        if spec.array:
            await var.write_value_rank(1)
        if spec.access == "rw":
            await var.set_writable()
            if spec.point is not None:
                server.set_attribute_value_setter(var.nodeid, self._model_setter(spec))
        self._nodes[spec.name] = var.nodeid
        self._vtypes[spec.name] = vtype
        self._cache[spec.name] = value

    async def _add_bulk_variables(self, server: Server, bulk_values: Sequence[int]) -> None:
        ns = NAMESPACE_INDEX
        folder = await server.nodes.objects.add_folder(
            make_node_id("Bulk"), ua.QualifiedName("Bulk", ns)
        )
        group: Node | None = None
        for index, value in enumerate(bulk_values):
            if index % BULK_GROUP == 0:
                label = f"G{index // BULK_GROUP:02d}"
                group = await folder.add_folder(
                    make_node_id(f"Bulk.{label}"), ua.QualifiedName(label, ns)
                )
            assert group is not None
            name = bulk_name(index)
            var = await group.add_variable(
                make_node_id(name),
                ua.QualifiedName(name, ns),
                ua.Variant(value, _VT.UInt16),
                varianttype=_VT.UInt16,
            )
            self._nodes[name] = var.nodeid
            self._vtypes[name] = _VT.UInt16

    def _model_setter(self, spec: NodeSpec) -> Setter:
        """Value setter of a model-backed writable variable: a client write is a command."""
        point = cast(str, spec.point)
        model = self._model

        def setter(node: NodeData, attr: AttributeIds, value: ua.DataValue) -> None:
            stored = value
            if not _INTERNAL_WRITE.get():
                raw = value.Value.Value if value.Value is not None else None
                try:
                    checked = model.validate(point, raw)
                except (ValueError, KeyError):
                    # Raised from here asyncua answers the Write with a ServiceFault, and its
                    # PostWrite callback never runs: record the refusal now.
                    self._write_log.record(spec.node_id, raw, "BadOutOfRange")
                    raise ServiceError(StatusCodes.BadOutOfRange) from None
                model.write(point, checked)
                actual = model_values(model.snapshot())[spec.name]
                if not same_value(actual, checked):
                    # The PLC logic overrides the command at once (Start while maintenance-
                    # locked): the node holds the model's value, monitored items see the
                    # written one now and the correction on the next tick.
                    vtype = self._vtypes[spec.name]
                    stored = dataclasses.replace(
                        value, Value=ua.Variant(coerce(actual, vtype), vtype)
                    )
                self._cache[spec.name] = checked
            node.attributes[attr].value = stored
            node.attributes[attr].value_callback = None

        return setter

    async def write(self, name: str, value: Any, *, now: datetime | None = None) -> None:
        """Write one variable as the PLC itself: current type, injected status, timestamps."""
        vtype = self._vtypes[name]
        spec = NODES_BY_NAME.get(name)
        array = spec.array if spec is not None else False
        try:
            converted = coerce(value, vtype, array) if value is not None else None
        except (ValueError, TypeError, OverflowError):
            converted = coerce([] if array else "" if vtype == _VT.String else 0, vtype, array)
        status = self._status.get(name, status_code(StatusCodes.Good))
        stamp = now or datetime.now(UTC)
        variant = (
            ua.Variant(converted, vtype, is_array=array)
            if converted is not None
            else ua.Variant(None, _VT.Null)
        )
        datavalue = ua.DataValue(
            variant,
            StatusCode=status,
            SourceTimestamp=cast(ua.DateTime, stamp),
            ServerTimestamp=cast(ua.DateTime, stamp),
        )
        server = self._running()
        token = _INTERNAL_WRITE.set(True)
        try:
            await server.write_attribute_value(self._nodes[name], datavalue)
        finally:
            _INTERNAL_WRITE.reset(token)
        self._cache[name] = value

    async def set_status(self, name: str, status: ua.StatusCode) -> None:
        """Give a variable a status code (Bad*: no value) and rewrite it; Good clears."""
        if status.value == StatusCodes.Good:
            self._status.pop(name, None)
        else:
            self._status[name] = status
        await self.write(name, self._cache.get(name))

    def clear_status(self, name: str) -> None:
        """Drop an injected status code; it shows with the variable's next write."""
        self._status.pop(name, None)

    async def change_type(self, name: str, vtype: ua.VariantType) -> None:
        """Change a variable's DataType (a PLC program change) and rewrite its value."""
        # asyncua refuses a value of another variant type than the stored one; a node whose
        # value is None accepts anything, so the DataType and the value are replaced directly.
        data = self._running().iserver.aspace[self._nodes[name]]
        data.attributes[AttributeIds.DataType].value = ua.DataValue(
            ua.Variant(make_node_id(vtype.value, 0), _VT.NodeId)
        )
        data.attributes[AttributeIds.Value].value = None
        self._vtypes[name] = vtype
        await self.write(name, self._cache.get(name))

    def _running(self) -> Server:
        if self._server is None:
            raise RuntimeError("simulator not started")
        return self._server


async def _parent_of(objects: Node, name: str, parents: dict[str, Node]) -> Node:
    """The object holding ``name`` (``Filler.Counters`` for ``Filler.Counters.Total``)."""
    path = name.rsplit(".", 1)[0]
    if path in parents:
        return parents[path]
    above = objects if "." not in path else await _parent_of(objects, path, parents)
    node = await above.add_object(
        make_node_id(path), ua.QualifiedName(path.rsplit(".", 1)[-1], NAMESPACE_INDEX)
    )
    parents[path] = node
    return node
