"""Pure Modbus helpers: register decoding/encoding for every type and word order, and the
block planner that coalesces tags into as few requests as the protocol limits allow."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from drivers.values import short, single_precision

if TYPE_CHECKING:  # the config imports this module: its tags refuse what cannot be encoded
    from drivers.modbus.config import Address, ByteOrder, ModbusTagConfig

INTEGER_BITS: dict[str, int] = {
    "int16": 16,
    "uint16": 16,
    "int32": 32,
    "uint32": 32,
    "int64": 64,
    "uint64": 64,
}
INTEGER_RANGES: dict[str, tuple[int, int]] = {
    name: (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if name.startswith("int") else (0, 2**bits - 1)
    for name, bits in INTEGER_BITS.items()
}

_STRUCT = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "int64": ">q",
    "uint64": ">Q",
    "float32": ">f",
    "float64": ">d",
}

Value = bool | int | float | str

# Largest finite float32 (struct.pack would raise OverflowError past it).
_FLOAT32_MAX = 3.4028234663852886e38


class DecodeError(ValueError):
    """Registers that do not make a valid value (e.g. NaN, wrong count)."""


def _registers_to_bytes(
    registers: Sequence[int], byte_order: ByteOrder, word_order: ByteOrder
) -> bytes:
    # Modbus itself is big-endian within a register; "little" byte order means the PLC
    # stores each register's bytes swapped. Word order "little" = low word first.
    ordered = reversed(registers) if word_order == "little" else registers
    out = bytearray()
    for register in ordered:
        if not 0 <= register <= 0xFFFF:
            raise DecodeError(f"register value {register} out of 0..65535")
        high, low = register >> 8, register & 0xFF
        out += bytes((low, high)) if byte_order == "little" else bytes((high, low))
    return bytes(out)


def _bytes_to_registers(data: bytes, byte_order: ByteOrder, word_order: ByteOrder) -> list[int]:
    registers = []
    for index in range(0, len(data), 2):
        high, low = data[index], data[index + 1]
        if byte_order == "little":
            high, low = low, high
        registers.append(high << 8 | low)
    if word_order == "little":
        registers.reverse()
    return registers


def decode_registers(
    registers: Sequence[int],
    type_: str,
    *,
    byte_order: ByteOrder = "big",
    word_order: ByteOrder = "big",
    length: int | None = None,
    bit: int | None = None,
) -> Value:
    """Decode the raw registers of one value (unscaled)."""
    if type_ == "bool":
        if len(registers) != 1:
            raise DecodeError(f"bool needs 1 register, got {len(registers)}")
        register = registers[0]
        if bit is not None:
            return bool(register >> bit & 1)
        return register != 0
    if type_ == "string":
        if length is None:
            raise DecodeError("string needs a length")
        # Strings are byte sequences: word order does not apply, byte order does.
        data = _registers_to_bytes(registers, byte_order, "big")[:length]
        return data.split(b"\x00", 1)[0].decode("latin-1")
    fmt = _STRUCT.get(type_)
    if fmt is None:
        raise DecodeError(f"unknown type {type_!r}")
    data = _registers_to_bytes(registers, byte_order, word_order)
    if len(data) != struct.calcsize(fmt):
        raise DecodeError(
            f"{type_} needs {struct.calcsize(fmt) // 2} registers, got {len(registers)}"
        )
    value: int | float = struct.unpack(fmt, data)[0]
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN/Inf: the reading becomes bad quality with the reason.
        raise DecodeError(f"not a finite number ({value})")
    if type_ == "float32":
        # The float nearest the float32's shortest decimal (56.703, not 56.702999114990234):
        # the same float32, so nothing is lost (drivers/values.py, `single_precision`).
        return single_precision(value)
    return value


Decoder = Callable[[Sequence[int]], Value]


def make_decoder(
    type_: str,
    *,
    byte_order: ByteOrder = "big",
    word_order: ByteOrder = "big",
    length: int | None = None,
    bit: int | None = None,
    scale: float = 1.0,
    offset: float = 0.0,
) -> Decoder:
    """A decoder for one tag, built once: same results as `decode_registers` + `scale_value`,
    with fast paths for the common one-register integers (the hot path of every poll)."""
    scaled = not (scale == 1.0 and offset == 0.0)
    if type_ in ("uint16", "int16") and byte_order == "big" and not scaled:
        if type_ == "uint16":
            return lambda registers: registers[0]
        return lambda registers: registers[0] - 0x10000 if registers[0] & 0x8000 else registers[0]
    fmt = _STRUCT.get(type_)
    if fmt is not None and type_ != "string":
        unpack = struct.Struct(fmt).unpack
        size = struct.calcsize(fmt)
        is_float = type_.startswith("float")
        single = type_ == "float32"

        def decode(registers: Sequence[int]) -> Value:
            data = _registers_to_bytes(registers, byte_order, word_order)
            if len(data) != size:
                raise DecodeError(f"{type_} needs {size // 2} registers, got {len(registers)}")
            value: int | float = unpack(data)[0]
            if is_float and not math.isfinite(value):
                raise DecodeError(f"not a finite number ({value})")
            if single:
                value = single_precision(value)  # as decode_registers
            return value * scale + offset if scaled else value

        return decode

    def generic(registers: Sequence[int]) -> Value:
        raw = decode_registers(
            registers, type_, byte_order=byte_order, word_order=word_order, length=length, bit=bit
        )
        return scale_value(raw, scale, offset)

    return generic


def encode_registers(
    value: Value,
    type_: str,
    *,
    byte_order: ByteOrder = "big",
    word_order: ByteOrder = "big",
    length: int | None = None,
) -> list[int]:
    """Encode one raw (unscaled) value into registers; raises ValueError when it does not fit."""
    if type_ == "bool":
        return [1 if _expect_bool(value) else 0]
    if type_ == "string":
        return _encode_string(value, length, byte_order)
    fmt = _STRUCT.get(type_)
    if fmt is None:
        raise ValueError(f"unknown type {type_!r}")
    if type_ in INTEGER_BITS:
        number: int | float = _integer_in_range(value, type_)
    else:
        number = _finite_float(value, type_)
    return _bytes_to_registers(struct.pack(fmt, number), byte_order, word_order)


def _expect_bool(value: Value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected a boolean, got {value!r}")
    return value


def _encode_string(value: Value, length: int | None, byte_order: ByteOrder) -> list[int]:
    """Latin-1 bytes, NUL-padded to the tag's length (strings have no word order)."""
    if not isinstance(value, str) or length is None:
        raise ValueError(f"expected a string, got {value!r}")
    # One byte per character, read back as Latin-1 (decode_registers): anything else would
    # be written as something the read-back cannot match.
    unwritable = sorted({char for char in value if ord(char) > 0xFF})
    if unwritable:
        shown = "".join(unwritable[:8])
        raise ValueError(
            f"{short(value)}: a PLC string holds Latin-1 characters only, not {shown!r}"
        )
    if "\x00" in value:
        raise ValueError(f"{short(value)}: a NUL character would end the PLC string")
    data = value.encode("latin-1")
    if len(data) > length:
        raise ValueError(f"{short(value)} is longer than {length} characters")
    data = data.ljust(length + (length % 2), b"\x00")
    return _bytes_to_registers(data, byte_order, "big")


def _integer_in_range(value: Value, type_: str) -> int:
    """An integer (or a float with no fraction) within the type's range."""
    if isinstance(value, bool) or not isinstance(value, int):
        if not (isinstance(value, float) and value.is_integer()):
            raise ValueError(f"expected an integer for {type_}, got {value!r}")
        value = int(value)
    low, high = INTEGER_RANGES[type_]
    if not low <= value <= high:
        raise ValueError(f"{value} does not fit {type_} ({low}..{high})")
    return value


def _finite_float(value: Value, type_: str) -> int | float:
    """A finite number that the float type can hold."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number for {type_}, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError("NaN and infinity cannot be written")
    if type_ == "float32" and abs(float(value)) > _FLOAT32_MAX:
        raise ValueError(f"{value} does not fit float32")
    return value


def scale_value(raw: Value, scale: float, offset: float) -> Value:
    """Apply value = raw * scale + offset (identity keeps integers integers)."""
    if isinstance(raw, (bool, str)):
        return raw
    if scale == 1.0 and offset == 0.0:
        return raw
    return raw * scale + offset


def unscale_value(value: Value, type_: str, scale: float, offset: float) -> Value:
    """Invert scale/offset for a write; integers are rounded to the nearest raw step."""
    if isinstance(value, (bool, str)) or (scale == 1.0 and offset == 0.0):
        return value
    raw = (value - offset) / scale
    if type_ in INTEGER_BITS:
        return round(raw)
    return raw


@dataclass(frozen=True, slots=True)
class TagSlot:
    """A tag's place in a block."""

    tag: ModbusTagConfig
    address: Address
    count: int


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: an area, a start offset, a count, and the tags it covers."""

    area: str
    start: int
    count: int
    slots: tuple[TagSlot, ...]

    @property
    def end(self) -> int:
        """Last offset covered."""
        return self.start + self.count - 1

    def split(self) -> tuple[Block, Block] | None:
        """Two halves by tag (None for a single tag): isolates an illegal address."""
        if len(self.slots) < 2:
            return None
        middle = len(self.slots) // 2
        return make_block(self.area, self.slots[:middle]), make_block(
            self.area, self.slots[middle:]
        )


def make_block(area: str, slots: Sequence[TagSlot]) -> Block:
    """The smallest block covering these slots."""
    start = min(slot.address.offset for slot in slots)
    end = max(slot.address.offset + slot.count - 1 for slot in slots)
    return Block(area, start, end - start + 1, tuple(slots))


def plan_blocks(
    tags: Iterable[ModbusTagConfig],
    *,
    max_gap: int,
    max_registers: int,
    max_bits: int,
) -> list[Block]:
    """Coalesce tags into blocks: same area, at most `max_gap` unused addresses between
    neighbours, at most `max_registers` registers (or `max_bits` bits) per request."""
    by_area: dict[str, list[TagSlot]] = {}
    for tag in tags:
        address = tag.parsed_address
        by_area.setdefault(address.area, []).append(TagSlot(tag, address, tag.count))
    blocks: list[Block] = []
    for area in ("co", "di", "ir", "hr"):
        slots = sorted(by_area.get(area, []), key=lambda s: (s.address.offset, s.count))
        limit = max_bits if area in ("co", "di") else max_registers
        current: list[TagSlot] = []
        start = end = 0
        for slot in slots:
            slot_start = slot.address.offset
            slot_end = slot_start + slot.count - 1
            if current and (
                slot_start - end - 1 <= max_gap and max(end, slot_end) - start + 1 <= limit
            ):
                current.append(slot)
                end = max(end, slot_end)
                continue
            if current:
                blocks.append(make_block(area, current))
            current, start, end = [slot], slot_start, slot_end
        if current:
            blocks.append(make_block(area, current))
    return blocks
