"""Modbus device and tag config (pure): addresses, types, register counts, link URLs.

Kept apart from the driver so that `edge-agent check` and the register decoding tables can
use it without importing pymodbus.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import SplitResult, parse_qs, urlsplit

from pydantic import Field, field_validator

from drivers.config import (
    DeviceConfigBase,
    Duration,
    Problem,
    TagConfigBase,
    as_written,
    redact_url,
)
from drivers.modbus.codec import INTEGER_BITS, INTEGER_RANGES, encode_registers, unscale_value
from drivers.values import (
    JsonValue,
    at_precision,
    decimals_of,
    decimals_tolerance,
    default_tolerance,
    same_value,
    short,
    to_kind,
)

Area = Literal["co", "di", "ir", "hr"]
ModbusType = Literal[
    "bool",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
    "string",
]
ByteOrder = Literal["big", "little"]

# Registers per value; string is ceil(length / 2) and handled apart.
REGISTER_COUNT: dict[str, int] = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
MAX_ADDRESS = 65535
MAX_READ_REGISTERS = 125  # FC3/FC4 limit (Modbus spec: 125 registers per request)
MAX_READ_BITS = 2000  # FC1/FC2 limit
MAX_STRING_LENGTH = 2 * MAX_READ_REGISTERS

_ADDRESS = re.compile(r"^(co|di|ir|hr):(\d{1,5})(?:\.(\d{1,2}))?$")


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed Modbus address: area, zero-based offset, optional bit within a register."""

    area: Area
    offset: int
    bit: int | None = None

    @property
    def is_bit_area(self) -> bool:
        """Coils and discrete inputs hold bits; input and holding registers hold words."""
        return self.area in ("co", "di")

    def __str__(self) -> str:
        suffix = "" if self.bit is None else f".{self.bit}"
        return f"{self.area}:{self.offset}{suffix}"


def parse_address(text: str) -> Address:
    """Parse ``"hr:100"``, ``"co:5"``, ``"hr:100.3"`` (bit 3 of a register)."""
    match = _ADDRESS.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid Modbus address {text!r}; write AREA:OFFSET with AREA one of co (coil), "
            "di (discrete input), ir (input register), hr (holding register), e.g. 'hr:100' "
            "(zero-based), or 'hr:100.3' for bit 3 of a register"
        )
    area = match.group(1)
    offset = int(match.group(2))
    if offset > MAX_ADDRESS:
        raise ValueError(f"offset {offset} out of range 0..{MAX_ADDRESS} in {text!r}")
    bit = None if match.group(3) is None else int(match.group(3))
    if bit is not None:
        if area in ("co", "di"):
            raise ValueError(f"{text!r}: a bit index only applies to ir/hr registers")
        if bit > 15:
            raise ValueError(f"bit index {bit} out of range 0..15 in {text!r}")
    return Address(area, offset, bit)  # type: ignore[arg-type]


def register_count(type_: str, length: int | None) -> int:
    """Registers (or bits, for co/di) one value of this type occupies."""
    if type_ == "string":
        return ((length or 0) + 1) // 2
    return REGISTER_COUNT[type_]


@dataclass(frozen=True, slots=True)
class SerialLink:
    """An RTU serial line parsed from ``rtu:///dev/ttyUSB0?baudrate=19200&parity=E``."""

    port: str
    baudrate: int = 19200
    parity: Literal["N", "E", "O"] = "E"
    stopbits: int = 1
    bytesize: int = 8


@dataclass(frozen=True, slots=True)
class TcpLink:
    """A Modbus TCP endpoint parsed from ``tcp://host:502``."""

    host: str
    port: int = 502


def parse_modbus_url(url: str) -> TcpLink | SerialLink:
    """Parse a device URL: ``tcp://host[:port]`` or ``rtu:///dev/tty...?baudrate=..``."""
    parts = urlsplit(url)
    shown = redact_url(url)  # for messages: never echo a password (docs/install.md, "Secrets")
    if "@" in parts.netloc:
        raise ValueError(f"{shown!r}: Modbus has no login; remove the user:password@")
    if parts.scheme == "tcp":
        return _tcp_link(shown, parts)
    if parts.scheme == "rtu":
        return _serial_link(shown, parts)
    raise ValueError(
        f"{shown!r}: scheme must be 'tcp' (tcp://host:502) or 'rtu' (rtu:///dev/ttyUSB0?baudrate=19200)"
    )


def _tcp_link(url: str, parts: SplitResult) -> TcpLink:
    """The TCP link of `parts`; `url` (redacted) is for messages only."""
    if not parts.hostname:
        raise ValueError(f"{url!r}: missing host, write e.g. 'tcp://192.168.10.11:502'")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{url!r}: a tcp URL takes only host and port")
    try:
        port = parts.port or 502
    except ValueError as exc:
        raise ValueError(f"{url!r}: invalid port") from exc
    return TcpLink(parts.hostname, port)


_SERIAL_PARAMETERS = ("baudrate", "parity", "stopbits", "bytesize")


def _serial_link(url: str, parts: SplitResult) -> SerialLink:
    """The serial link of `parts`; `url` (redacted) is for messages only."""
    if parts.netloc:
        raise ValueError(
            f"{url!r}: write the serial device as a path with three slashes, "
            "e.g. 'rtu:///dev/ttyUSB0?baudrate=19200&parity=E&stopbits=1'"
        )
    if not parts.path.startswith("/"):
        raise ValueError(f"{url!r}: missing serial device path")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(query) - set(_SERIAL_PARAMETERS))
    if unknown:
        raise ValueError(
            f"{url!r}: unknown parameter(s) {', '.join(unknown)}; "
            f"known: {', '.join(_SERIAL_PARAMETERS)}"
        )

    def one(key: str, default: str) -> str:
        values = query.get(key, [default])
        if len(values) != 1:
            raise ValueError(f"{url!r}: {key} given more than once")
        return values[0]

    try:
        baudrate = int(one("baudrate", "19200"))
        stopbits = int(one("stopbits", "1"))
        bytesize = int(one("bytesize", "8"))
    except ValueError as exc:
        raise ValueError(f"{url!r}: baudrate, stopbits and bytesize are integers") from exc
    parity = one("parity", "E").upper()
    _check_serial_settings(url, baudrate, parity, stopbits, bytesize)
    return SerialLink(parts.path, baudrate, parity, stopbits, bytesize)  # type: ignore[arg-type]


def _check_serial_settings(
    url: str, baudrate: int, parity: str, stopbits: int, bytesize: int
) -> None:
    if baudrate <= 0:
        raise ValueError(f"{url!r}: baudrate must be positive")
    if parity not in ("N", "E", "O"):
        raise ValueError(f"{url!r}: parity must be N, E or O")
    if stopbits not in (1, 2):
        raise ValueError(f"{url!r}: stopbits must be 1 or 2")
    if bytesize not in (7, 8):
        raise ValueError(f"{url!r}: bytesize must be 7 or 8")


class ModbusTagConfig(TagConfigBase):
    """One Modbus value: where it lives, how its registers decode, how it scales."""

    address: str = Field(
        description="AREA:OFFSET, zero-based: co (coil), di (discrete input), ir (input "
        "register), hr (holding register); 'hr:100.3' is bit 3 of a register (type bool).",
        examples=["hr:100", "ir:0", "co:5", "hr:100.3"],
    )
    type: ModbusType = Field(
        default="uint16",
        description="Value type; co/di addresses are always bool. 32/64-bit values span "
        "2/4 registers.",
    )
    length: int | None = Field(
        default=None,
        ge=1,
        le=MAX_STRING_LENGTH,
        description="Characters of a string value (2 per register, high byte first). "
        "Required for type string.",
    )
    scale: float = Field(default=1.0, description="value = raw * scale + offset (numbers only).")
    offset: float = Field(default=0.0, description="value = raw * scale + offset (numbers only).")
    byte_order: ByteOrder | None = Field(
        default=None, description="Byte order within a register; unset: the device's."
    )
    word_order: ByteOrder | None = Field(
        default=None,
        description="Register order of 32/64-bit values; 'little' = low word first (the "
        "common 'word swap'); unset: the device's.",
    )

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_address(value)
        return value

    @property
    def parsed_address(self) -> Address:
        """The address, parsed (validated at load)."""
        return parse_address(self.address)

    @property
    def count(self) -> int:
        """Registers or bits this tag occupies."""
        return register_count(self.type, self.length)

    def value_kind(self) -> Literal["bool", "int", "float", "string"]:
        """What JSON type the decoded value has."""
        if self.type == "bool":
            return "bool"
        if self.type == "string":
            return "string"
        if self.type in INTEGER_BITS and not self.scaled:
            return "int"
        return "float"

    def value_type(self) -> str | None:
        """The register type of an unscaled integer, bool or string; int64 for values rounded
        to whole numbers (decimals 0 of a scaled integer or float); float32 for an unscaled
        float32 at its own precision; float64 for everything scaled or rounded to decimals."""
        if self.type in ("bool", "string") or (self.type in INTEGER_BITS and not self.scaled):
            return self.type
        decimals, _ = self.precision
        if decimals == 0:
            return "int64"
        if self.type == "float32" and not self.scaled and decimals is None:
            return "float32"
        return "float64"

    def command_value(self, value: Any) -> Any:
        """A command parameter as this tag's kind, refused unless the codec can encode it."""
        kind = self.value_kind()
        converted = to_kind(
            value,
            kind,
            int_range=INTEGER_RANGES[self.type] if kind == "int" else None,
            max_length=self.length if self.type == "string" else None,
        )
        if self.type != "bool":
            # What the driver's write would refuse (a '€' in a Latin-1 string, a scaled value
            # past the register's range, float32 overflow) is refused here, at validation
            # (docs/workflows.md, "Validation"). Byte and word order never change that.
            raw = unscale_value(converted, self.type, self.scale, self.offset)
            try:
                encode_registers(raw, self.type, length=self.length)
            except ValueError as exc:
                if not self.scaled:
                    raise
                raise ValueError(
                    f"{short(converted)} does not fit the tag (scale {self.scale:g}, offset "
                    f"{self.offset:g}): raw {exc}"
                ) from None
        return converted

    def same_value(self, actual: Any, expected: Any) -> bool:
        """Equality within what the registers can hold: half a raw step of a scaled integer,
        float32's 7 significant digits, exact for unscaled integers, booleans and strings;
        never finer than half a unit of the tag's `decimals`."""
        at_least = decimals_tolerance(self.decimals)
        if self.type in INTEGER_BITS and self.scaled:
            return same_value(actual, expected, abs(self.scale) / 2, at_least=at_least)
        if self.type == "float32" and isinstance(expected, int | float):
            scale = abs(float(expected))
            tolerance = max(default_tolerance(scale), 1e-6 * scale + 1e-6)
            return same_value(actual, expected, tolerance, at_least=at_least)
        return same_value(actual, expected, at_least=at_least)

    @property
    def scaled(self) -> bool:
        """Whether scale or offset change the raw value."""
        return self.scale != 1.0 or self.offset != 0.0

    def published_value(self, value: JsonValue) -> JsonValue:
        """The value at its precision (see `precision`)."""
        decimals, single = self.precision
        return at_precision(value, decimals=decimals, single=single)

    @functools.cached_property
    def precision(self) -> tuple[int | None, bool]:
        """(decimals, single) of `at_precision`: `decimals` when set; else a scaled integer at
        the decimals of its scale and offset (0.1 -> 1), a scaled float32 as a float32 (the
        driver already decodes an unscaled one short), anything else as decoded."""
        decimals = self.decimals
        if decimals is None and self.type in INTEGER_BITS and self.scaled:
            decimals = max(decimals_of(self.scale), decimals_of(self.offset))
        return decimals, self.type == "float32" and self.scaled

    def counter_bits(self) -> int | None:
        """Width of an unscaled integer counter (for rollover), else None."""
        if self.type in INTEGER_BITS and not self.scaled:
            return INTEGER_BITS[self.type]
        return None

    def problems(self) -> Iterator[Problem]:
        """Cross-field problems of this tag (locations relative to the tag)."""
        address = self.parsed_address
        yield from self._type_problems(address)
        yield from self._length_problems()
        yield from self._address_end_problems(address)
        yield from self._number_only_problems()
        yield from self._writable_problems(address)
        yield from self._byte_order_problems(address)

    def _type_problems(self, address: Address) -> Iterator[Problem]:
        """Bits (coils, discrete inputs, a bit of a register) are read as bool only."""
        if address.is_bit_area and self.type != "bool":
            yield (("type",), f"{address.area}: addresses hold bits; type must be bool")
        if address.bit is not None and self.type != "bool":
            yield (("type",), f"a bit address ({self.address}) needs type bool")

    def _length_problems(self) -> Iterator[Problem]:
        """A string needs its length; nothing else takes one."""
        if self.type == "string" and self.length is None:
            yield (("length",), "required for type string (number of characters)")
        if self.type != "string" and self.length is not None:
            yield (("length",), "only valid for type string")

    def _address_end_problems(self, address: Address) -> Iterator[Problem]:
        """A multi-register value must end within the address space."""
        end = address.offset + self.count - 1
        if end > MAX_ADDRESS:
            yield (
                ("address",),
                f"{self.type} at offset {address.offset} needs {self.count} registers and "
                f"would end at {end}, past the last address {MAX_ADDRESS}",
            )

    def _number_only_problems(self) -> Iterator[Problem]:
        """Scale, offset, deadband and decimals apply to numbers only; a scale of 0 loses the
        value."""
        numeric = self.type not in ("bool", "string")
        if not numeric and self.scaled:
            yield (("scale",), f"scale/offset only apply to numbers, not {self.type}")
        if self.scale == 0.0:
            yield (("scale",), "must not be 0")
        if not numeric and self.deadband is not None:
            yield (("deadband",), f"only applies to numbers, not {self.type}")
        if not numeric and self.decimals is not None:
            yield (("decimals",), f"only applies to numbers, not {self.type}")

    def _writable_problems(self, address: Address) -> Iterator[Problem]:
        """Discrete inputs and input registers cannot be written (no function code does)."""
        if self.writable and address.area in ("di", "ir"):
            yield (("writable",), f"{address.area}: addresses are read-only in Modbus")

    def _byte_order_problems(self, address: Address) -> Iterator[Problem]:
        """Byte and word order only mean something for registers."""
        if (self.byte_order or self.word_order) and address.is_bit_area:
            yield (("byte_order",), "byte/word order only apply to registers")


class ModbusDeviceConfig(DeviceConfigBase):
    """A Modbus TCP or RTU device (one PLC or one unit on a serial line)."""

    driver: Literal["modbus"] = Field(description="Protocol driver.")
    url: str = Field(
        description="tcp://HOST[:PORT] or rtu:///dev/DEVICE?baudrate=19200&parity=E&stopbits=1"
        "&bytesize=8",
        examples=["tcp://192.168.10.11:502", "rtu:///dev/ttyUSB0?baudrate=19200&parity=E"],
    )
    unit_id: int = Field(
        default=1,
        ge=0,
        le=255,
        description="Modbus unit (slave) id; 1..247 on serial lines.",
    )
    byte_order: ByteOrder = Field(default="big", description="Byte order within a register.")
    word_order: ByteOrder = Field(
        default="big",
        description="Register order of 32/64-bit values; 'little' = low word first.",
    )
    max_gap: int = Field(
        default=16,
        ge=0,
        le=MAX_READ_REGISTERS,
        description="Coalescing: tags whose addresses are at most this many registers (or "
        "bits) apart are read in one request.",
    )
    max_block_registers: int = Field(
        default=MAX_READ_REGISTERS,
        ge=1,
        le=MAX_READ_REGISTERS,
        description="Largest register block per request (some PLCs accept fewer than 125).",
    )
    max_block_bits: int = Field(
        default=MAX_READ_BITS,
        ge=1,
        le=MAX_READ_BITS,
        description="Largest coil/discrete-input block per request.",
    )
    frame_gap: Duration = Field(
        default=as_written("0s"),
        ge=0,
        description="Pause between requests on the link (slow serial devices need some).",
    )
    read_retries: int = Field(
        default=1,
        ge=0,
        le=5,
        description="Resends of a timed-out read. Writes are never resent.",
    )
    write_multiple: bool = Field(
        default=False,
        description="Write with FC15/FC16 only (some PLCs do not implement FC5/FC6).",
    )
    tags: tuple[ModbusTagConfig, ...] = Field(default=(), description="The device's values.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parse_modbus_url(value)
        return value

    @property
    def link(self) -> TcpLink | SerialLink:
        """The parsed link (validated at load)."""
        return parse_modbus_url(self.url)

    def tag_list(self) -> tuple[TagConfigBase, ...]:
        """The device's tags."""
        return self.tags

    def problems(self) -> Iterator[Problem]:
        """Cross-field problems of this device (locations relative to the device)."""
        yield from super().problems()
        if isinstance(self.link, SerialLink) and not 1 <= self.unit_id <= 247:
            yield (("unit_id",), "must be 1..247 on a serial line (0 is broadcast)")
        for index, tag in enumerate(self.tags):
            for loc, reason in tag.problems():
                yield (("tags", index, *loc), reason)
            count = tag.count
            if tag.parsed_address.is_bit_area:
                continue
            if count > self.max_block_registers:
                yield (
                    ("tags", index, "length"),
                    f"needs {count} registers, more than max_block_registers "
                    f"({self.max_block_registers})",
                )
