"""The simulator's fixed register map: the table, address checks, and register images.

One row per value (``REGISTER_MAP``, printed on start and copied in simulators/README.md).
Requests must lie wholly inside one contiguous run of rows (``span``), anything else is
exception 2. The line's input and holding registers are rendered from a ``LineModel`` as whole
images, which the store caches per model revision.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from simulators.line import LineModel

__all__ = [
    "BULK_COUNT",
    "BULK_START",
    "BYTESWAP_CONST",
    "FC_AREA",
    "HR_LINE_START",
    "INT16_CONST",
    "INT32_CONST",
    "INT64_CONST",
    "REGISTER_MAP",
    "SPARE_COUNT",
    "SPARE_START",
    "UINT32_CONST",
    "Area",
    "MapEntry",
    "holding_image",
    "input_image",
    "parse_ref",
    "register_map_table",
    "span",
]

Area = Literal["co", "di", "ir", "hr"]
_AREAS: Final[tuple[Area, ...]] = ("co", "di", "ir", "hr")
_AREA_BY_NAME: Final[dict[str, Area]] = {a: a for a in _AREAS}

# Function code -> area. pymodbus calls the datastore with the request's function code.
FC_AREA: Final[dict[int, Area]] = {
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


def span(area: Area, address: int, count: int, writable: bool) -> tuple[int, int] | None:
    """Return the interval wholly containing ``address .. address+count-1``, else None."""
    for start, end in (_WRITABLE if writable else _READABLE)[area]:
        if start <= address and address + count <= end:
            return start, end
    return None


def parse_ref(ref: int | str) -> tuple[Area | None, int]:
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


def register_map_table() -> str:
    """Render the register map as a Markdown table (printed on start, copied in the README)."""
    lines = [
        "| address | type | name | access | notes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for e in REGISTER_MAP:
        lines.append(f"| {e.ref} | {e.type} | {e.name} | {e.access} | {e.description} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- register images


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


def input_image(m: LineModel) -> list[int]:
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


HR_LINE_START: Final = 100
_HR_LINE_END: Final = 218


def holding_image(m: LineModel) -> list[int]:
    """Holding registers hr:100-217 from the model (holes are 0 and never served)."""
    image = [0] * (_HR_LINE_END - HR_LINE_START)
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
