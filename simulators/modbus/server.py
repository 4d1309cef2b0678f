"""Modbus TCP / RTU simulator of a production line: one ``LineModel`` per unit id (pymodbus 3.16).

Design:

* pymodbus' own ``ModbusTcpServer`` / ``ModbusSerialServer`` do the framing. Their datastore is
  replaced by ``_LineStore``, a ``SimCore`` subclass that answers from the line model on each
  request (fixed register map below, exception 2 for every address outside it, including a
  request that only partly covers a hole). Nothing is rebuilt per request: the small line
  images are cached per model revision and bulk registers are computed for the requested
  slice only.
* Fault injection happens in two places: the store (stall = no answer and no execution,
  exception mode) and pymodbus' ``trace_packet`` hook on the way out (wrong transaction id,
  garbage, and a belt-and-braces drop while stalled). ``close_connections`` closes pymodbus'
  per-client protocols. No proxy is needed.
* A background task advances every model by ``speed`` x elapsed monotonic time at ~10 Hz.
* Every write request that reaches the datastore is appended to the write log (memory and an
  ``O_APPEND`` JSON-lines file written with one ``os.write`` before the response is sent, so a
  SIGKILL loses nothing that was answered).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final, Literal

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.framer import FramerRTU, FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.base import ModbusBaseServer
from pymodbus.simulator.simcore import SimCore

from simulators.line import BulkBlock, LineModel
from simulators.ptybridge import PtyBridge

__all__ = [
    "DEFAULT_PORT",
    "REGISTER_MAP",
    "MapEntry",
    "ModbusSimulator",
    "WriteRecord",
    "main",
    "register_map_table",
    "send_control",
    "serve",
]

DEFAULT_PORT: Final = 5020
Area = Literal["co", "di", "ir", "hr"]
_AREAS: Final[tuple[Area, ...]] = ("co", "di", "ir", "hr")
_AREA_BY_NAME: Final[dict[str, Area]] = {a: a for a in _AREAS}

# Function code -> area. pymodbus calls the datastore with the request's function code.
_FC_AREA: Final[dict[int, Area]] = {
    1: "co",
    5: "co",
    15: "co",
    2: "di",
    4: "ir",
    3: "hr",
    6: "hr",
    16: "hr",
    22: "hr",
    23: "hr",
}

# Constant test values for the decoders (ir:23-32).
INT16_CONST: Final = -1234
INT32_CONST: Final = -123456
INT64_CONST: Final = -1234567890123
UINT32_CONST: Final = 0xDEADBEEF
BYTESWAP_CONST: Final = 0x1234  # served as 0x3412: the bytes of the register are swapped

SPARE_START: Final = 300
SPARE_COUNT: Final = 100
BULK_START: Final = 1000
BULK_COUNT: Final = 5000


@dataclass(frozen=True)
class MapEntry:
    """One row of the fixed register map."""

    area: Area
    address: int
    count: int
    type: str
    name: str
    access: Literal["r", "rw"]
    description: str

    @property
    def ref(self) -> str:
        """Address in config syntax, e.g. ``hr:102-103``."""
        if self.count == 1:
            return f"{self.area}:{self.address}"
        return f"{self.area}:{self.address}-{self.address + self.count - 1}"


_e = MapEntry  # short alias for the table below


REGISTER_MAP: Final[tuple[MapEntry, ...]] = (
    _e("co", 0, 1, "bool", "start", "rw", "run command; true runs (ignored while locked)"),
    _e("co", 1, 1, "bool", "stop", "rw", "stop command; true stops and clears start"),
    _e("co", 2, 1, "bool", "quality_hold", "rw", "while true: planned stop (state 3)"),
    _e("co", 3, 1, "bool", "maintenance_lock", "rw", "while true: state 3, start ignored"),
    _e("di", 0, 1, "bool", "running", "r", "state == 1"),
    _e("di", 1, 1, "bool", "faulted", "r", "state == 2"),
    _e("di", 2, 1, "bool", "starved", "r", "state == 4"),
    _e("di", 3, 1, "bool", "order_done", "r", "order_count reached target_qty"),
    _e("ir", 0, 1, "int16", "temperature", "r", "°C x10 (scale 0.1)"),
    _e("ir", 1, 1, "uint16", "state", "r", "0 off 1 run 2 unplanned 3 planned 4 starved"),
    _e("ir", 2, 2, "uint32", "total_count", "r", "word order big (high word first)"),
    _e("ir", 4, 2, "uint32", "total_count", "r", "word order little (low word first)"),
    _e("ir", 6, 2, "float32", "temperature", "r", "°C, word order big"),
    _e("ir", 8, 2, "float32", "temperature", "r", "°C, word order little"),
    _e("ir", 10, 4, "uint64", "runtime_ms", "r", "runtime_s x1000, word order big"),
    _e("ir", 14, 4, "float64", "energy_kwh", "r", "kWh, word order big"),
    _e("ir", 18, 4, "float64", "energy_kwh", "r", "kWh, word order little"),
    _e("ir", 22, 1, "uint16", "cycle_counter16", "r", "PLC scan counter 100 Hz, wraps"),
    _e("ir", 23, 1, "int16", "const_int16", "r", f"constant {INT16_CONST}"),
    _e("ir", 24, 2, "int32", "const_int32", "r", f"constant {INT32_CONST}, big"),
    _e("ir", 26, 4, "int64", "const_int64", "r", f"constant {INT64_CONST}, big"),
    _e("ir", 30, 2, "uint32", "const_uint32", "r", f"constant 0x{UINT32_CONST:X}, big"),
    _e("ir", 32, 1, "uint16", "const_byteswap", "r", "0x1234 stored byte-swapped: 0x3412"),
    _e("hr", 100, 1, "uint16", "state", "r", "same code as ir:1"),
    _e("hr", 101, 1, "uint16", "fault_code", "r", "1..9 while state 2, else 0"),
    _e("hr", 102, 2, "uint32", "total_count", "r", "word order big, rolls over"),
    _e("hr", 104, 2, "uint32", "reject_count", "r", "word order big, rolls over"),
    _e("hr", 106, 2, "uint32", "good_count", "r", "word order big, rolls over"),
    _e("hr", 108, 1, "uint16", "total_count16", "r", "low 16 bits of total_count"),
    _e("hr", 109, 1, "uint16", "reject_count16", "r", "low 16 bits of reject_count"),
    _e("hr", 110, 1, "uint16", "last_cycle_ms", "r", "last cycle time in ms"),
    _e("hr", 200, 1, "uint16", "product_code", "rw", "0..9999 (else exception 3)"),
    _e("hr", 201, 2, "uint32", "target_qty", "rw", "word order big; writing starts an order"),
    _e("hr", 210, 8, "string", "product_name", "rw", "16 ASCII chars, high byte first, NUL pad"),
    _e("hr", SPARE_START, SPARE_COUNT, "uint16", "spare", "rw", "plain memory"),
    _e("hr", BULK_START, BULK_COUNT, "uint16", "bulk", "r", "see --bulk-change-fraction"),
)


def _merge(entries: Iterable[MapEntry]) -> tuple[tuple[int, int], ...]:
    """Merge adjacent map entries into sorted half-open address intervals."""
    spans: list[list[int]] = []
    for entry in sorted(entries, key=lambda e: e.address):
        end = entry.address + entry.count
        if spans and spans[-1][1] == entry.address:
            spans[-1][1] = end
        else:
            spans.append([entry.address, end])
    return tuple((start, end) for start, end in spans)


_READABLE: Final = {a: _merge(e for e in REGISTER_MAP if e.area == a) for a in _AREAS}
_WRITABLE: Final = {
    a: _merge(e for e in REGISTER_MAP if e.area == a and e.access == "rw") for a in _AREAS
}


def _span(area: Area, address: int, count: int, writable: bool) -> tuple[int, int] | None:
    """Return the interval wholly containing ``address .. address+count-1``, else None."""
    for start, end in (_WRITABLE if writable else _READABLE)[area]:
        if start <= address and address + count <= end:
            return start, end
    return None


def register_map_table() -> str:
    """Render the register map as a Markdown table (printed on start, copied in the README)."""
    lines = [
        "| address | type | name | access | notes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for e in REGISTER_MAP:
        lines.append(f"| {e.ref} | {e.type} | {e.name} | {e.access} | {e.description} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- encoding


def _words(fmt: str, value: float, *, little_word_order: bool = False) -> list[int]:
    """Pack ``value`` big-endian and split into registers (optionally low word first)."""
    raw = struct.pack(">" + fmt, value)
    words = [(raw[i] << 8) | raw[i + 1] for i in range(0, len(raw), 2)]
    return words[::-1] if little_word_order else words


def _name_words(name: str) -> list[int]:
    """Encode the product name: 2 ASCII chars per register, high byte first, NUL padded."""
    raw = name.encode("ascii").ljust(16, b"\0")
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, 16, 2)]


def _constant_words() -> list[int]:
    """Registers ir:23-32, which never change."""
    return [
        *_words("h", INT16_CONST),
        *_words("i", INT32_CONST),
        *_words("q", INT64_CONST),
        *_words("I", UINT32_CONST),
        ((BYTESWAP_CONST & 0xFF) << 8) | (BYTESWAP_CONST >> 8),
    ]


_CONSTANTS: Final = _constant_words()


def _input_image(m: LineModel) -> list[int]:
    """Input registers ir:0-32 from the model."""
    temp = m.temperature
    total = m.total_count
    return [
        max(-32768, min(32767, round(temp * 10))) & 0xFFFF,
        int(m.state),
        *_words("I", total),
        *_words("I", total, little_word_order=True),
        *_words("f", temp),
        *_words("f", temp, little_word_order=True),
        *_words("Q", int(m.runtime_s * 1000)),
        *_words("d", m.energy_kwh),
        *_words("d", m.energy_kwh, little_word_order=True),
        m.cycle_counter16,
        *_CONSTANTS,
    ]


_HR_LINE_START: Final = 100
_HR_LINE_END: Final = 218


def _holding_image(m: LineModel) -> list[int]:
    """Holding registers hr:100-217 from the model (holes are 0 and never served)."""
    image = [0] * (_HR_LINE_END - _HR_LINE_START)
    image[0:11] = [
        int(m.state),
        m.fault_code,
        *_words("I", m.total_count),
        *_words("I", m.reject_count),
        *_words("I", m.good_count),
        m.total_count & 0xFFFF,
        m.reject_count & 0xFFFF,
        m.last_cycle_ms,
    ]
    image[100:103] = [m.product_code, *_words("I", m.target_qty)]
    image[110:118] = _name_words(m.product_name)
    return image


# ---------------------------------------------------------------------- write log


@dataclass(frozen=True)
class WriteRecord:
    """One write request received by the simulator."""

    ts: str
    unit: int
    function_code: int
    address: int
    values: list[int]  # registers, or bools (a subtype of int) for coils
    result: str  # "ok", "exception N" or "dropped" (stalled: neither executed nor answered)

    def to_json(self) -> str:
        """Serialise as one JSON line (without the newline)."""
        return json.dumps(asdict(self), separators=(",", ":"))


def _utc_now() -> str:
    """Wall-clock time as RFC 3339 UTC with milliseconds and Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------- per-unit state


@dataclass
class _Unit:
    """A unit id's model plus its plain-memory and bulk registers and render cache."""

    unit_id: int
    model: LineModel
    bulk: BulkBlock
    spare: list[int] = field(default_factory=lambda: [0] * SPARE_COUNT)
    _input_rev: int = -1
    _input: list[int] = field(default_factory=list)
    _holding_rev: int = -1
    _holding: list[int] = field(default_factory=list)

    def input_image(self) -> list[int]:
        """Input registers, re-rendered only when the model changed."""
        if self._input_rev != self.model.revision:
            self._input = _input_image(self.model)
            self._input_rev = self.model.revision
        return self._input

    def holding_image(self) -> list[int]:
        """Line holding registers, re-rendered only when the model changed."""
        if self._holding_rev != self.model.revision:
            self._holding = _holding_image(self.model)
            self._holding_rev = self.model.revision
        return self._holding


# ---------------------------------------------------------------------- fault state


@dataclass
class _Faults:
    """Switchable faults shared by every transport of one simulator."""

    stall_until: float | None = None  # monotonic deadline; math.inf = until unstalled
    exception_code: ExcCodes | None = None
    exception_any: frozenset[int] | None = None  # addresses matched in every area
    exception_refs: frozenset[tuple[str, int]] = frozenset()
    wrong_tid: bool = False
    garbage: bool = False

    def stalled(self) -> bool:
        """True while requests must be swallowed."""
        if self.stall_until is None:
            return False
        if time.monotonic() < self.stall_until:
            return True
        self.stall_until = None
        return False

    def exception_for(self, area: Area, address: int, count: int) -> ExcCodes | None:
        """The injected exception code if it applies to this request."""
        code = self.exception_code
        if code is None:
            return None
        if self.exception_any is None and not self.exception_refs:
            return code
        for addr in range(address, address + count):
            if (self.exception_any and addr in self.exception_any) or (
                (area, addr) in self.exception_refs
            ):
                return code
        return None

    def as_dict(self) -> dict[str, object]:
        """Current fault switches, JSON friendly."""
        stall: float | str | None = None
        if self.stalled() and self.stall_until is not None:
            remaining = self.stall_until - time.monotonic()
            stall = "forever" if math.isinf(remaining) else round(remaining, 3)
        return {
            "stall": stall,
            "exception": None if self.exception_code is None else int(self.exception_code),
            "exception_addresses": sorted(self.exception_any or ())
            + [f"{a}:{n}" for a, n in sorted(self.exception_refs)],
            "wrong_transaction_id": self.wrong_tid,
            "garbage": self.garbage,
        }


# ---------------------------------------------------------------------- datastore


class _LineStore(SimCore):
    """pymodbus datastore answering from the line models (swapped into ``server.context``)."""

    def __init__(self, sim: ModbusSimulator, *, silent_unknown_units: bool) -> None:
        """Bind to the simulator's units, faults and write log."""
        super().__init__([])
        self._sim = sim
        # RTU: a device stays silent for other unit ids. TCP: answer like a gateway (0x0B).
        self._silent_unknown = silent_unknown_units
        self._echo: tuple[int, int, int, list[int] | list[bool]] | None = None

    def device_ids(self) -> list[int]:
        """Configured unit ids."""
        return list(self._sim.units)

    def _unit(self, device_id: int) -> _Unit | ExcCodes:
        """Look up a unit, or the answer for an unknown one."""
        unit = self._sim._units.get(device_id)
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
        faults = self._sim._faults
        if faults.stalled():
            raise NoSuchIdException("stalled")  # swallowed: no response at all
        unit = self._unit(device_id)
        if isinstance(unit, ExcCodes):
            return unit
        area = _FC_AREA.get(func_code)
        if area is None:
            return ExcCodes.ILLEGAL_FUNCTION
        if (code := faults.exception_for(area, address, count)) is not None:
            return code
        echo, self._echo = self._echo, None
        if echo is not None and echo[:3] == (device_id, func_code, address):
            # Write single coil/register: the response echoes the request (Modbus spec), even
            # where the model ignored it (start while maintenance-locked).
            return echo[3]
        span = _span(area, address, count, writable=False)
        if span is None:
            return ExcCodes.ILLEGAL_ADDRESS
        return self._read(unit, area, span[0], address, count)

    def _read(
        self, unit: _Unit, area: Area, span_start: int, address: int, count: int
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
        return image[address - _HR_LINE_START : end - _HR_LINE_START]

    async def async_setValues(
        self,
        device_id: int,
        func_code: int,
        address: int,
        values: list[int] | list[bool],
    ) -> ExcCodes | None:
        """Serve a write: apply it to the model or memory, and log it."""
        faults = self._sim._faults
        if faults.stalled():
            self._sim._log_write(device_id, func_code, address, values, "dropped")
            raise NoSuchIdException("stalled")
        try:
            result = self._write(device_id, func_code, address, values)
        except NoSuchIdException:
            self._sim._log_write(device_id, func_code, address, values, "dropped")
            raise
        self._sim._log_write(
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
        area = _FC_AREA.get(func_code)
        if area not in ("co", "hr"):
            return ExcCodes.ILLEGAL_FUNCTION
        count = len(values)
        if (code := self._sim._faults.exception_for(area, address, count)) is not None:
            return code
        span = _span(area, address, count, writable=True)
        if span is None:
            return ExcCodes.ILLEGAL_ADDRESS
        m = unit.model
        if area == "co":
            names = ("start", "stop", "quality_hold", "maintenance_lock")
            for offset, value in enumerate(values):
                m.write(names[address + offset], bool(value))
            return None
        regs = [int(v) for v in values]
        if span[0] == SPARE_START:
            unit.spare[address - SPARE_START : address - SPARE_START + count] = regs
            return None
        # Model-backed registers: overlay the write on the current image so that a write of
        # part of a multi-register value (e.g. only hr:202) keeps the other words.
        image = list(unit.holding_image())
        base = address - _HR_LINE_START
        image[base : base + count] = regs
        touched = range(address, address + count)
        updates: list[tuple[str, object]] = []
        if 200 in touched:
            updates.append(("product_code", image[100]))
        if 201 in touched or 202 in touched:
            updates.append(("target_qty", (image[101] << 16) | image[102]))
        if span[0] == 210:
            raw = b"".join(word.to_bytes(2, "big") for word in image[110:118])
            try:
                updates.append(("product_name", raw.split(b"\0", 1)[0].decode("ascii")))
            except UnicodeDecodeError:
                return ExcCodes.ILLEGAL_VALUE
        try:
            # Validate everything first so a rejected write changes nothing.
            checked = [(name, m.validate(name, raw_value)) for name, raw_value in updates]
        except ValueError:
            return ExcCodes.ILLEGAL_VALUE
        for name, point_value in checked:
            m.write(name, point_value)
        return None


# ---------------------------------------------------------------------- simulator


def _parse_ref(ref: int | str) -> tuple[Area | None, int]:
    """Parse an address (``105`` = any area, or ``"hr:105"``)."""
    if isinstance(ref, int):
        return None, ref
    text = ref.strip()
    if ":" not in text:
        return None, int(text)
    name, _, number = text.partition(":")
    area = _AREA_BY_NAME.get(name)
    if area is None:
        raise ValueError(f"unknown area {name!r} in {ref!r} (use co, di, ir or hr)")
    return area, int(number)


class ModbusSimulator:
    """A Modbus TCP and/or RTU server in front of one LineModel per unit, with fault injection."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = DEFAULT_PORT,
        seed: int = 1,
        speed: float = 1.0,
        units: int = 1,
        serial: str | None = None,
        baudrate: int = 19200,
        write_log: str | os.PathLike[str] | None = None,
        bulk_change_fraction: float = 0.1,
        control_port: int | None = None,
        tick_interval: float = 0.1,
        model_factory: Callable[[int, int], LineModel] | None = None,
    ) -> None:
        """Configure; nothing is opened before ``start()`` / ``async with``.

        ``port=None`` disables TCP, ``port=0`` picks a free port (see ``.port``). Unit ``u``
        gets seed ``seed + u - 1``. ``model_factory(unit, seed)`` overrides the LineModel.
        """
        if port is None and serial is None:
            raise ValueError("enable TCP (port) or RTU (serial)")
        if not 1 <= units <= 247:
            raise ValueError("units must be within 1..247")
        if speed < 0 or not math.isfinite(speed):
            raise ValueError("speed must be finite and >= 0")
        if tick_interval <= 0:
            raise ValueError("tick_interval must be > 0")
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.serial = serial
        self.serial_device: str | None = None
        self.baudrate = baudrate
        self.seed = seed
        self.speed = speed
        self.tick_interval = tick_interval
        self.write_log_path = Path(write_log) if write_log is not None else None
        self._requested_control_port = control_port
        self.control_port: int | None = None
        factory = model_factory or (lambda _unit, unit_seed: LineModel(seed=unit_seed))
        self._units: dict[int, _Unit] = {}
        for unit_id in range(1, units + 1):
            unit_seed = seed + unit_id - 1
            self._units[unit_id] = _Unit(
                unit_id,
                factory(unit_id, unit_seed),
                BulkBlock(seed=unit_seed, size=BULK_COUNT, change_fraction=bulk_change_fraction),
            )
        self._faults = _Faults()
        self._garbage_rng = random.Random(f"garbage-{seed}")
        self._writes: deque[WriteRecord] = deque(maxlen=100_000)
        self._log_fd: int | None = None
        self._tcp: ModbusTcpServer | None = None
        self._rtu: ModbusSerialServer | None = None
        self._bridge: PtyBridge | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._control: asyncio.Server | None = None
        self._control_tasks: set[asyncio.Task[None]] = set()
        self._started = False

    # ------------------------------------------------------------ public API

    @property
    def units(self) -> tuple[int, ...]:
        """Served unit ids."""
        return tuple(self._units)

    def model(self, unit: int = 1) -> LineModel:
        """The LineModel behind ``unit``."""
        return self._units[unit].model

    @property
    def connections(self) -> int:
        """Number of open TCP client connections."""
        return len(self._tcp.active_connections) if self._tcp is not None else 0

    @property
    def writes(self) -> list[WriteRecord]:
        """Write requests received so far (the in-memory write log, oldest first)."""
        return list(self._writes)

    async def start(self) -> None:
        """Open the write log, start the servers, the model ticker and the control channel."""
        if self._started:
            raise RuntimeError("simulator already started")
        self._started = True
        try:
            if self.write_log_path is not None:
                self._log_fd = os.open(
                    self.write_log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
                )
            if self.serial == "pty":
                self._bridge = PtyBridge()
                self._bridge.open()
            await self._start_servers()
            self._ticker = asyncio.create_task(self._tick_loop(), name="modbus-sim-ticker")
            if self._requested_control_port is not None:
                self._control = await asyncio.start_server(
                    self._control_client, "127.0.0.1", self._requested_control_port
                )
                self.control_port = self._control.sockets[0].getsockname()[1]
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop everything started by ``start()``; idempotent."""
        if self._control is not None:
            self._control.close()
            self._control = None
        tasks = [t for t in (self._ticker, *self._control_tasks) if t is not None]
        self._ticker = None
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                # asyncio.wait does not raise the tasks' CancelledError but does propagate a
                # cancellation of close() itself (after which the finally still cleans up).
                await asyncio.wait(tasks)
        finally:
            self._close_servers()
            if self._bridge is not None:
                self._bridge.close()
                self._bridge = None
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None
            self._started = False

    async def __aenter__(self) -> ModbusSimulator:
        """Start the simulator."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the simulator."""
        await self.close()

    # ------------------------------------------------------------ faults

    def close_connections(self) -> int:
        """Drop every TCP client connection now; returns how many were closed."""
        if self._tcp is None:
            return 0
        connections = list(self._tcp.active_connections.values())
        for connection in connections:
            connection.close()
        return len(connections)

    def stall(self, seconds: float | None = None) -> None:
        """Swallow requests (no execution, no answer, connections stay open); None = forever."""
        if seconds is not None and seconds <= 0:
            self.unstall()
            return
        self._faults.stall_until = time.monotonic() + (math.inf if seconds is None else seconds)

    def unstall(self) -> None:
        """Answer requests again."""
        self._faults.stall_until = None

    def exception(self, code: int | None, addresses: Iterable[int | str] | None = None) -> None:
        """Answer matching requests with exception ``code`` (None or 0 turns it off).

        ``addresses``: None = every request; ints match any area, ``"hr:100"`` one area. A
        request matches if its range covers one of them. Matching writes are not executed.
        """
        faults = self._faults
        if not code:
            faults.exception_code = None
            faults.exception_any = None
            faults.exception_refs = frozenset()
            return
        exc_code = ExcCodes(code)
        any_area: set[int] = set()
        refs: set[tuple[str, int]] = set()
        for ref in addresses or ():
            area, number = _parse_ref(ref)
            if area is None:
                any_area.add(number)
            else:
                refs.add((area, number))
        faults.exception_code = exc_code
        faults.exception_any = frozenset(any_area) if any_area else None
        faults.exception_refs = frozenset(refs)

    def wrong_transaction_id(self, on: bool = True) -> None:
        """Answer with a mismatching MBAP transaction id (RTU: a wrong unit id, valid CRC)."""
        self._faults.wrong_tid = on

    def garbage(self, on: bool = True) -> None:
        """Replace every answer with random bytes (the request is still executed)."""
        self._faults.garbage = on

    def clear_faults(self) -> None:
        """Turn every injected fault off."""
        self._faults = _Faults()

    def faults(self) -> dict[str, object]:
        """Current fault switches."""
        return self._faults.as_dict()

    async def restart(self) -> None:
        """Stop and start the servers again on the same port (clients are disconnected)."""
        self._close_servers()
        await self._start_servers()

    # ------------------------------------------------------------ internals

    async def _start_servers(self) -> None:
        """Start the TCP and/or RTU server."""
        if self._requested_port is not None:
            port = self.port if self.port is not None else self._requested_port
            tcp = ModbusTcpServer(
                [],
                framer=FramerType.SOCKET,
                address=(self.host, port),
                ignore_missing_devices=True,
                trace_packet=self._make_trace(rtu=False),
            )
            tcp.context = _LineStore(self, silent_unknown_units=False)
            await self._listen(tcp, f"{self.host}:{port}")
            if not isinstance(tcp.transport, asyncio.Server):
                raise RuntimeError("pymodbus TCP server has no listening socket")
            self.port = int(tcp.transport.sockets[0].getsockname()[1])
            self._tcp = tcp
        if self.serial is not None:
            device = self._bridge.a if self._bridge is not None else self.serial
            rtu = ModbusSerialServer(
                [],
                framer=FramerType.RTU,
                port=device,
                baudrate=self.baudrate,
                ignore_missing_devices=True,
                trace_packet=self._make_trace(rtu=True),
            )
            rtu.context = _LineStore(self, silent_unknown_units=True)
            await self._listen(rtu, device)
            self._rtu = rtu
            self.serial_device = self._bridge.b if self._bridge is not None else device

    @staticmethod
    async def _listen(server: ModbusBaseServer, where: str) -> None:
        """Start listening or raise OSError with a readable one-line message."""
        # pymodbus logs the OSError as a warning and only raises "Could not start listen":
        # catch that log record (and keep it off stderr) to put the real reason in our error.
        reasons: list[str] = []

        def capture(record: logging.LogRecord) -> bool:
            message = record.getMessage()
            if message.startswith("Failed to start server"):
                reasons.append(message.removeprefix("Failed to start server").strip())
                return False
            return True

        pymodbus_logger = logging.getLogger("pymodbus.logging")
        pymodbus_logger.addFilter(capture)
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            reason = reasons[-1] if reasons else "in use or not accessible"
            raise OSError(f"cannot listen on {where}: {reason}") from exc
        finally:
            pymodbus_logger.removeFilter(capture)

    def _close_servers(self) -> None:
        """Close the servers and every client connection (listening sockets close at once)."""
        for server in (self._tcp, self._rtu):
            if server is not None:
                # close() rather than shutdown(): same effect for a background server, typed.
                server.close()
        self._tcp = None
        self._rtu = None

    def _make_trace(self, *, rtu: bool) -> Callable[[bool, bytes], bytes]:
        """pymodbus trace_packet hook: mangle outgoing frames according to the faults."""

        def trace(sending: bool, data: bytes) -> bytes:
            if not sending or not data:
                return data
            faults = self._faults
            if faults.stalled():
                return b""  # anything not stopped in the store (e.g. decode errors) too
            if faults.garbage:
                junk = bytearray(self._garbage_rng.randbytes(len(data)))
                if not rtu:
                    junk[2] |= 0x80  # non-zero MBAP protocol id: never a valid frame
                return bytes(junk)
            if faults.wrong_tid:
                return _wrong_unit_rtu(data) if rtu else _wrong_tid_tcp(data)
            return data

        return trace

    def _log_write(
        self,
        unit: int,
        function_code: int,
        address: int,
        values: Sequence[int] | Sequence[bool],
        result: str,
    ) -> None:
        """Append a write request to the in-memory and file write log."""
        record = WriteRecord(
            _utc_now(),
            unit,
            function_code,
            address,
            list(values),
            result,
        )
        self._writes.append(record)
        if self._log_fd is not None:
            # One small O_APPEND write, synchronously and before the response goes out, so a
            # write the client saw answered is on disk (page cache) even after a SIGKILL.
            os.write(self._log_fd, (record.to_json() + "\n").encode())

    async def _tick_loop(self) -> None:
        """Advance every model by speed x elapsed monotonic time, ~10 times a second."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_interval)
            now = time.monotonic()
            dt = (now - last) * self.speed
            last = now
            if dt > 0:
                for unit in self._units.values():
                    unit.model.advance(dt)

    # ------------------------------------------------------------ control channel

    async def _control_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one control connection: one command per line, one reply line each."""
        task = asyncio.current_task()
        if task is not None:
            self._control_tasks.add(task)
        try:
            while line := await reader.readline():
                try:
                    reply = await self._control_command(line.decode("utf-8", "replace"))
                except (ValueError, KeyError, IndexError, OSError) as exc:
                    reply = f"error {type(exc).__name__}: {exc}"
                writer.write(reply.encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            if task is not None:
                self._control_tasks.discard(task)

    async def _control_command(self, line: str) -> str:
        """Execute one control command and return the reply line."""
        words = line.split()
        if not words:
            raise ValueError("empty command")
        cmd, args = words[0].lower(), words[1:]
        if cmd == "ping":
            return "ok"
        if cmd == "status":
            return "ok " + json.dumps(self._status(), separators=(",", ":"))
        if cmd == "close":
            return f"ok {self.close_connections()}"
        if cmd == "stall":
            self.stall(float(args[0]) if args else None)
            return "ok"
        if cmd == "unstall":
            self.unstall()
            return "ok"
        if cmd == "exception":
            if not args:
                raise ValueError("usage: exception CODE [ADDR ...] | exception off")
            self.exception(0 if args[0] == "off" else int(args[0], 0), args[1:] or None)
            return "ok"
        if cmd in ("wrong_tid", "garbage"):
            on = _parse_on(args)
            (self.wrong_transaction_id if cmd == "wrong_tid" else self.garbage)(on)
            return "ok"
        if cmd == "clear":
            self.clear_faults()
            return "ok"
        if cmd == "restart":
            await self.restart()
            return "ok"
        if cmd == "speed":
            speed = float(args[0])
            if speed < 0 or not math.isfinite(speed):
                raise ValueError("speed must be finite and >= 0")
            self.speed = speed
            return "ok"
        if cmd == "force_state":
            unit, code = int(args[0]), int(args[1])
            self.model(unit).force_state(code, int(args[2]) if len(args) > 2 else 0)
            return "ok"
        if cmd == "write":
            unit, point = int(args[0]), args[1]
            self.model(unit).write(point, json.loads(" ".join(args[2:])))
            return "ok"
        raise ValueError(f"unknown command {cmd!r}")

    def _status(self) -> dict[str, object]:
        """Simulator status for the control channel."""
        return {
            "port": self.port,
            "serial": self.serial_device,
            "speed": self.speed,
            "faults": self.faults(),
            "connections": self.connections,
            "writes": len(self._writes),
            "units": {str(u): unit.model.snapshot() for u, unit in self._units.items()},
        }


def _parse_on(args: list[str]) -> bool:
    """Parse ``on``/``off`` (default on)."""
    if not args or args[0].lower() in ("on", "1", "true"):
        return True
    if args[0].lower() in ("off", "0", "false"):
        return False
    raise ValueError(f"expected on or off, got {args[0]!r}")


def _wrong_tid_tcp(frame: bytes) -> bytes:
    """Change the MBAP transaction id; never to 0, which the pymodbus client accepts for any."""
    tid = int.from_bytes(frame[0:2], "big")
    wrong = tid % 0xFFFF + 1
    return wrong.to_bytes(2, "big") + frame[2:]


def _wrong_unit_rtu(frame: bytes) -> bytes:
    """RTU has no transaction id: answer as another unit id, with a valid CRC."""
    body = bytes([frame[0] % 247 + 1]) + frame[1:-2]
    return body + FramerRTU.compute_CRC(body).to_bytes(2, "big")


async def send_control(port: int, command: str, *, host: str = "127.0.0.1") -> str:
    """Send one command to a simulator's control port; return the text after ``ok``.

    Wrap it in ``asyncio.timeout()`` to bound it (``restart`` can take a moment).
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(command.strip().encode() + b"\n")
        await writer.drain()
        reply = (await reader.readline()).decode().rstrip("\n")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    if reply == "ok" or reply.startswith("ok "):
        return reply[3:]
    raise RuntimeError(f"simulator control: {reply or 'connection closed'}")


# ---------------------------------------------------------------------- CLI


async def serve(
    simulator: ModbusSimulator, stop: asyncio.Event, *, out: Callable[[str], None] = print
) -> None:
    """Run ``simulator`` until ``stop`` is set, printing the map and the endpoints."""
    async with simulator:
        out(register_map_table())
        if simulator.port is not None:
            out(f"modbus simulator listening on {simulator.host}:{simulator.port}")
        if simulator.serial_device is not None:
            out(f"modbus simulator RTU on {simulator.serial_device}")
        if simulator.control_port is not None:
            out(f"modbus simulator control on 127.0.0.1:{simulator.control_port}")
        if simulator.write_log_path is not None:
            out(f"modbus simulator write log {simulator.write_log_path}")
        out(
            f"units {', '.join(map(str, simulator.units))}, seed {simulator.seed}, "
            f"speed {simulator.speed:g}"
        )
        await stop.wait()


def _parser() -> argparse.ArgumentParser:
    """Command-line options of ``edge-agent simulate modbus``."""
    p = argparse.ArgumentParser(
        prog="edge-agent simulate modbus",
        description="Modbus TCP/RTU simulator of a production line (register map in the README).",
    )
    p.add_argument("--host", default="127.0.0.1", help="TCP address to bind (default 127.0.0.1)")
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"TCP port, 0 = any free (default {DEFAULT_PORT}; no TCP with --serial unless given)",
    )
    p.add_argument("--seed", type=int, default=1, help="model seed of unit 1 (unit u: seed+u-1)")
    p.add_argument("--speed", type=float, default=1.0, help="simulated seconds per second")
    p.add_argument(
        "--serial",
        metavar="PATH",
        help="serve RTU on this serial device; 'pty' creates a pty pair and prints its path",
    )
    p.add_argument("--baudrate", type=int, default=19200, help="RTU baud rate (default 19200)")
    p.add_argument("--write-log", metavar="FILE", help="append every write request as JSON lines")
    p.add_argument("--units", type=int, default=1, help="number of unit ids 1..N (default 1)")
    p.add_argument(
        "--bulk-change-fraction",
        type=float,
        default=0.1,
        help="share of the 5,000 bulk registers changing per simulated second (default 0.1)",
    )
    p.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="fault-injection control port on 127.0.0.1 (0 = any free; see the README)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the Modbus simulator until SIGINT/SIGTERM; 0 ok, 1 runtime error, 2 usage."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    port = args.port
    if port is None and args.serial is None:
        port = DEFAULT_PORT
    try:
        simulator = ModbusSimulator(
            host=args.host,
            port=port,
            seed=args.seed,
            speed=args.speed,
            units=args.units,
            serial=args.serial,
            baudrate=args.baudrate,
            write_log=args.write_log,
            bulk_change_fraction=args.bulk_change_fraction,
            control_port=args.control_port,
        )
    except ValueError as exc:
        print(f"edge-agent simulate modbus: {exc}", file=sys.stderr)
        return 2

    def out(text: str) -> None:
        print(text, flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(simulator, stop, out=out)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"edge-agent simulate modbus: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
