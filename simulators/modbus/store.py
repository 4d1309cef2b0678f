"""The pymodbus datastore of the simulator: answers each request from the unit's line model.

pymodbus 3.16's own datastores cannot express the register map exactly (simulators/README.md,
"pymodbus 3.16 notes"), so ``LineStore`` subclasses ``SimCore``, what the server calls
(``async_getValues`` / ``async_setValues`` / ``device_ids``), and is assigned to
``server.context`` after the server is constructed. Nothing is rebuilt per request: the line
images are cached per model revision and bulk registers are computed for the requested slice.
"""

from __future__ import annotations

from collections.abc import Mapping

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.simulator.simcore import SimCore

from simulators.line import BulkBlock, LineModel
from simulators.modbus.faults import Faults
from simulators.modbus.registers import (
    BULK_START,
    FC_AREA,
    HR_LINE_START,
    SPARE_COUNT,
    SPARE_START,
    Area,
    holding_image,
    input_image,
    span,
)
from simulators.modbus.writelog import WriteLog

__all__ = ["LineStore", "Unit"]

_COIL_POINTS = ("start", "stop", "quality_hold", "maintenance_lock")


class Unit:
    """A unit id's model plus its plain-memory and bulk registers and render cache."""

    def __init__(self, *, model: LineModel, bulk: BulkBlock) -> None:
        """Serve ``model`` and ``bulk``; the spare registers start at 0."""
        self.model = model
        self.bulk = bulk
        self.spare = [0] * SPARE_COUNT
        self._input_rev = -1
        self._input: list[int] = []
        self._holding_rev = -1
        self._holding: list[int] = []

    def input_image(self) -> list[int]:
        """Input registers, re-rendered only when the model changed."""
        if self._input_rev != self.model.revision:
            self._input = input_image(self.model)
            self._input_rev = self.model.revision
        return self._input

    def holding_image(self) -> list[int]:
        """Line holding registers, re-rendered only when the model changed."""
        if self._holding_rev != self.model.revision:
            self._holding = holding_image(self.model)
            self._holding_rev = self.model.revision
        return self._holding


class LineStore(SimCore):
    """pymodbus datastore answering from the line models (swapped into ``server.context``)."""

    def __init__(
        self,
        *,
        units: Mapping[int, Unit],
        faults: Faults,
        write_log: WriteLog,
        silent_unknown_units: bool,
    ) -> None:
        """Bind to the simulator's units, faults and write log."""
        super().__init__([])
        self._units = units
        self._faults = faults
        self._write_log = write_log
        # RTU: a device stays silent for other unit ids. TCP: answer like a gateway (0x0B).
        self._silent_unknown = silent_unknown_units
        self._echo: tuple[int, int, int, list[int] | list[bool]] | None = None

    def device_ids(self) -> list[int]:
        """Configured unit ids."""
        return list(self._units)

    def _unit(self, device_id: int) -> Unit | ExcCodes:
        """Look up a unit, or the answer for an unknown one."""
        unit = self._units.get(device_id)
        if unit is not None:
            return unit
        if self._silent_unknown:
            # With ignore_missing_devices=True pymodbus sends nothing for this exception.
            raise NoSuchIdException(f"unit {device_id}")
        return ExcCodes.GATEWAY_NO_RESPONSE

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        """Serve a read (also the read-back half of function codes 5, 6, 22 and 23)."""
        faults = self._faults
        if faults.stalled():
            raise NoSuchIdException("stalled")  # swallowed: no response at all
        unit = self._unit(device_id)
        if isinstance(unit, ExcCodes):
            return unit
        area = FC_AREA.get(func_code)
        if area is None:
            return ExcCodes.ILLEGAL_FUNCTION
        if (code := faults.exception_for(area, address, count)) is not None:
            return code
        echo, self._echo = self._echo, None
        if echo is not None and echo[:3] == (device_id, func_code, address):
            # Write single coil/register: the response echoes the request (Modbus spec), even
            # where the model ignored it (start while maintenance-locked).
            return echo[3]
        readable = span(area, address, count, writable=False)
        if readable is None:
            return ExcCodes.ILLEGAL_ADDRESS
        return self._read(unit, area, readable[0], address, count)

    def _read(
        self, unit: Unit, area: Area, span_start: int, address: int, count: int
    ) -> list[int] | list[bool]:
        """Values of a validated range."""
        m = unit.model
        end = address + count
        if area == "co":
            return [m.start, m.stop, m.quality_hold, m.maintenance_lock][address:end]
        if area == "di":
            state = m.state
            return [state == 1, state == 2, state == 4, m.order_done][address:end]
        if area == "ir":
            return unit.input_image()[address:end]
        if span_start == SPARE_START:
            return unit.spare[address - SPARE_START : end - SPARE_START]
        if span_start == BULK_START:
            return unit.bulk.values(address - BULK_START, count, m.sim_time_s)
        image = unit.holding_image()
        return image[address - HR_LINE_START : end - HR_LINE_START]

    async def async_setValues(
        self,
        device_id: int,
        func_code: int,
        address: int,
        values: list[int] | list[bool],
    ) -> ExcCodes | None:
        """Serve a write: apply it to the model or memory, and log it."""
        if self._faults.stalled():
            self._write_log.append(device_id, func_code, address, values, "dropped")
            raise NoSuchIdException("stalled")
        try:
            result = self._write(device_id, func_code, address, values)
        except NoSuchIdException:
            self._write_log.append(device_id, func_code, address, values, "dropped")
            raise
        self._write_log.append(
            device_id,
            func_code,
            address,
            values,
            "ok" if result is None else f"exception {int(result)}",
        )
        if result is None and func_code in (5, 6):
            # Consumed by the read-back pymodbus does right after this call, in the same task
            # and without a suspension point in between, so no other request can interleave.
            self._echo = (device_id, func_code, address, values)
        return result

    def _write(
        self, device_id: int, func_code: int, address: int, values: list[int] | list[bool]
    ) -> ExcCodes | None:
        """Validate and apply a write; the exception code on failure."""
        unit = self._unit(device_id)
        if isinstance(unit, ExcCodes):
            return unit
        area = FC_AREA.get(func_code)
        if area not in ("co", "hr"):
            return ExcCodes.ILLEGAL_FUNCTION
        count = len(values)
        if (code := self._faults.exception_for(area, address, count)) is not None:
            return code
        writable = span(area, address, count, writable=True)
        if writable is None:
            return ExcCodes.ILLEGAL_ADDRESS
        if area == "co":
            for offset, value in enumerate(values):
                unit.model.write(_COIL_POINTS[address + offset], bool(value))
            return None
        regs = [int(v) for v in values]
        if writable[0] == SPARE_START:
            unit.spare[address - SPARE_START : address - SPARE_START + count] = regs
            return None
        return _write_line_holding(unit, writable[0], address, regs)


def _write_line_holding(
    unit: Unit, span_start: int, address: int, regs: list[int]
) -> ExcCodes | None:
    """Apply a write to the model-backed holding registers (hr:200-202 or hr:210-217)."""
    # Overlay the write on the current image so that a write of part of a multi-register
    # value (e.g. only hr:202) keeps the other words.
    image = list(unit.holding_image())
    base = address - HR_LINE_START
    image[base : base + len(regs)] = regs
    touched = range(address, address + len(regs))
    updates: list[tuple[str, object]] = []
    if 200 in touched:
        updates.append(("product_code", image[100]))
    if 201 in touched or 202 in touched:
        updates.append(("target_qty", (image[101] << 16) | image[102]))
    if span_start == 210:
        raw = b"".join(word.to_bytes(2, "big") for word in image[110:118])
        try:
            updates.append(("product_name", raw.split(b"\0", 1)[0].decode("ascii")))
        except UnicodeDecodeError:
            return ExcCodes.ILLEGAL_VALUE
    m = unit.model
    try:
        # Validate everything first so a rejected write changes nothing.
        checked = [(name, m.validate(name, raw_value)) for name, raw_value in updates]
    except ValueError:
        return ExcCodes.ILLEGAL_VALUE
    for name, point_value in checked:
        m.write(name, point_value)
    return None
