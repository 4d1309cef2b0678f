"""The line model's vocabulary: state codes, points by name, and the value rules of a write.

Shared by ``LineModel.validate`` and, through it, by both simulators, which refuse a write the
model would refuse (Modbus exception 3, OPC UA ``BadOutOfRange``) before changing anything.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

__all__ = [
    "PRODUCT_CODE_MAX",
    "PRODUCT_NAME_MAX",
    "READ_ONLY_POINTS",
    "TARGET_QTY_MAX",
    "WRITABLE_POINTS",
    "MachineState",
    "PointValue",
    "check_name",
    "check_uint",
    "validate_point",
]

PointValue = bool | int | float | str


class MachineState(IntEnum):
    """Machine state codes as exposed by the PLC (hr:100 / ir:1)."""

    OFF = 0
    RUNNING = 1
    UNPLANNED_STOP = 2
    PLANNED_STOP = 3
    STARVED = 4


PRODUCT_CODE_MAX: Final = 9999
PRODUCT_NAME_MAX: Final = 16
TARGET_QTY_MAX: Final = 0xFFFF_FFFF

WRITABLE_POINTS: Final = frozenset(
    {
        "start",
        "stop",
        "quality_hold",
        "maintenance_lock",
        "product_code",
        "target_qty",
        "product_name",
    }
)
_BOOL_POINTS: Final = frozenset({"start", "stop", "quality_hold", "maintenance_lock"})

READ_ONLY_POINTS: Final = frozenset(
    {
        "state",
        "fault_code",
        "stop_reason",
        "running",
        "faulted",
        "starved",
        "order_done",
        "total_count",
        "reject_count",
        "good_count",
        "total_count16",
        "reject_count16",
        "last_cycle_ms",
        "temperature",
        "order_count",
        "runtime_s",
        "energy_kwh",
        "cycle_counter16",
        "sim_time_s",
    }
)


def validate_point(point: str, value: object) -> PointValue:
    """Return ``value`` normalised for ``point`` or raise ValueError (KeyError if unknown)."""
    if point not in WRITABLE_POINTS:
        if point in READ_ONLY_POINTS:
            raise ValueError(f"{point} is read-only")
        raise KeyError(point)
    if point in _BOOL_POINTS:
        if not isinstance(value, bool):
            raise ValueError(f"{point} must be a bool, got {value!r}")
        return value
    if point == "product_name":
        return check_name(value)
    return check_uint(point, value, PRODUCT_CODE_MAX if point == "product_code" else TARGET_QTY_MAX)


def check_uint(point: str, value: object, limit: int) -> int:
    """Validate an integer point within 0..limit."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{point} must be an int, got {value!r}")
    if not 0 <= value <= limit:
        raise ValueError(f"{point} must be within 0..{limit}, got {value}")
    return value


def check_name(value: object) -> str:
    """Validate a product name: printable ASCII, at most 16 characters."""
    if not isinstance(value, str):
        raise ValueError(f"product_name must be a str, got {value!r}")
    if len(value) > PRODUCT_NAME_MAX:
        raise ValueError(f"product_name longer than {PRODUCT_NAME_MAX} characters")
    if any(not 0x20 <= ord(ch) <= 0x7E for ch in value):
        raise ValueError("product_name must be printable ASCII")
    return value
