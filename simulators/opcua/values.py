"""Value conversions of the simulator: to a node's variant type, to JSON, status codes."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final, cast

from asyncua import ua
from asyncua.ua.status_codes import StatusCodes

__all__ = ["coerce", "json_value", "same_value", "status_code"]

_VT = ua.VariantType
_INT_RANGES: Final[Mapping[ua.VariantType, tuple[int, int]]] = {
    _VT.SByte: (-(2**7), 2**7 - 1),
    _VT.Byte: (0, 2**8 - 1),
    _VT.Int16: (-(2**15), 2**15 - 1),
    _VT.UInt16: (0, 2**16 - 1),
    _VT.Int32: (-(2**31), 2**31 - 1),
    _VT.UInt32: (0, 2**32 - 1),
    _VT.Int64: (-(2**63), 2**63 - 1),
    _VT.UInt64: (0, 2**64 - 1),
}


def coerce(value: Any, vtype: ua.VariantType, array: bool = False) -> Any:
    """Convert ``value`` to the Python value asyncua encodes as ``vtype``; ValueError if not."""
    if array:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return [coerce(item, vtype) for item in value]
    if vtype == _VT.Boolean:
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "on")
        return bool(value)
    if vtype in _INT_RANGES:
        return _integer(value, vtype)
    if vtype in (_VT.Float, _VT.Double):
        return float(value)  # float("NaN"), float("-Infinity") work too
    if vtype == _VT.String:
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)
    if vtype == _VT.DateTime:
        if isinstance(value, datetime):
            return value
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if vtype == _VT.ByteString:
        if isinstance(value, bytes):
            return value
        return str(value).encode()
    raise ValueError(f"unsupported type {vtype.name}")


def _integer(value: Any, vtype: ua.VariantType) -> int:
    """``value`` as an integer within the range of ``vtype``; ValueError if not."""
    low, high = _INT_RANGES[vtype]
    if isinstance(value, str):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not an integer")
    number = int(value)
    if not low <= number <= high:
        raise ValueError(f"{number} out of range for {vtype.name}")
    return number


def json_value(value: Any) -> Any:
    """A value as JSON-friendly data for the write log and the status command."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list):
        return [json_value(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def same_value(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN (so an unchanged NaN is not rewritten every tick)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and bool(a == b)


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(cast(ua.UInt32, code))


def status_code(text: str | int) -> ua.StatusCode:
    """``BadSensorFailure``, ``Uncertain``, ``Good`` or a number (``0x80320000``)."""
    if isinstance(text, int):
        return _status(text)
    stripped = text.strip()
    if stripped[:1].isdigit():
        return _status(int(stripped, 0))
    value = getattr(StatusCodes, stripped, None)
    if not isinstance(value, int):
        raise ValueError(f"unknown status code {text!r}")
    return _status(value)
