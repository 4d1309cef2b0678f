"""Faults injected into the simulator's variables: pinned values, status codes, data types.

Each fault lasts until ``release()`` of its variable or ``release_all()``; the transport
stall is ``StallSwitch`` (simulators/opcua/transport.py).
"""

from __future__ import annotations

from typing import Any

from simulators.line import BulkBlock, LineModel
from simulators.opcua.nodes import NODES_BY_NAME, TYPES, model_values, original_type
from simulators.opcua.values import status_code
from simulators.opcua.variables import Variables

__all__ = ["VariableFaults"]


class VariableFaults:
    """Pinned values, injected status codes and changed data types, and their undoing."""

    def __init__(self, *, variables: Variables, model: LineModel, bulk: BulkBlock) -> None:
        """Faults of ``variables``; released ones go back to ``model`` / ``bulk`` values."""
        self._variables = variables
        self._model = model
        self._bulk = bulk
        self._pinned: set[str] = set()  # variables whose value set_value() fixed

    def pinned(self, name: str) -> bool:
        """True if the model no longer updates the variable."""
        return name in self._pinned

    def report(self) -> dict[str, object]:
        """Pinned variables, injected status codes and changed types, for ``status``."""
        return {
            "pinned": sorted(self._pinned),
            "status_codes": self._variables.status_codes(),
            "types": self._variables.changed_types(),
        }

    async def set_status(self, node: str, code: str | int) -> None:
        """Give a variable a status code (Bad*: the server then holds no value); Good clears."""
        name = self._variables.name(node)
        await self._variables.set_status(name, status_code(code))

    async def set_value(self, node: str, value: Any) -> None:
        """Fix a variable's value (converted to its current type) until released."""
        name = self._variables.name(node)
        self._pinned.add(name)
        await self._variables.write(name, value)

    async def change_type(self, node: str, type_name: str) -> None:
        """Change a variable's DataType at runtime; the current value is converted."""
        name = self._variables.name(node)
        if type_name not in TYPES:
            raise ValueError(f"unknown type {type_name!r}; one of {', '.join(TYPES)}")
        await self._variables.change_type(name, TYPES[type_name])

    async def release(self, node: str) -> None:
        """Undo set_value/set_status/change_type for one variable."""
        name = self._variables.name(node)
        self._pinned.discard(name)
        self._variables.clear_status(name)
        if self._variables.type_changed(name):
            await self._variables.change_type(name, original_type(name))
        await self._variables.write(name, self._model_or_initial(name))

    async def release_all(self) -> None:
        """Every variable back to its own type, value and Good status."""
        variables = self._variables
        faulty = set(self._pinned) | set(variables.status_codes()) | set(variables.changed_types())
        for name in sorted(faulty):
            await self.release(name)

    def _model_or_initial(self, name: str) -> Any:
        """The value a released variable goes back to."""
        if name.startswith("Bulk."):
            index = int(name.split(".", 1)[1])
            return self._bulk.value(index, self._model.sim_time_s)
        values = model_values(self._model.snapshot())
        if name in values:
            return values[name]
        return self._variables.cached(name, NODES_BY_NAME[name].initial)
