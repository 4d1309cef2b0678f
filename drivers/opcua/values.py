"""OPC UA values and JSON (pure): a Variant's value as JSON data, a DataValue as a Reading,
a JSON value converted to a node's data type for a write (docs/opcua.md, "Values" and
"Writes").

NaN and ±Infinity have no JSON representation: such a value (or an array holding one) is
published as ``null`` with quality ``bad`` and the reason in the reading's error.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import math
import uuid
from collections.abc import Callable
from enum import Enum
from typing import Any, Final, cast

from asyncua import ua

from drivers.base import JsonValue, Reading
from drivers.values import at_precision, single_precision

_VT = ua.VariantType
_INT_RANGES: Final[dict[ua.VariantType, tuple[int, int]]] = {
    _VT.SByte: (-(2**7), 2**7 - 1),
    _VT.Byte: (0, 2**8 - 1),
    _VT.Int16: (-(2**15), 2**15 - 1),
    _VT.UInt16: (0, 2**16 - 1),
    _VT.Int32: (-(2**31), 2**31 - 1),
    _VT.UInt32: (0, 2**32 - 1),
    _VT.Int64: (-(2**63), 2**63 - 1),
    _VT.UInt64: (0, 2**64 - 1),
}
_FLOAT_TYPES: Final = frozenset({_VT.Float, _VT.Double})
NUMERIC_TYPES: Final = frozenset(_INT_RANGES) | _FLOAT_TYPES
_ClassInfo = type[Any] | tuple[type[Any], ...]  # what isinstance() accepts
_FLOAT32_MAX: Final = 3.4028234663852886e38
_EPOCH_2000: Final = 946_684_800.0


class NotFinite(ValueError):
    """A float that JSON cannot carry (NaN, ±Infinity)."""


# ---------------------------------------------------------------------- reading: OPC UA -> JSON


def json_value(value: Any) -> JsonValue:
    """An OPC UA value as JSON data: numbers, booleans, strings, arrays as lists.

    DateTime becomes RFC 3339 UTC text, ByteString base64, LocalizedText its text, NodeId and
    QualifiedName their string form, structures an object of their fields. NaN/Inf raise
    NotFinite (see the module notes).
    """
    kind = type(value)
    # Exact-type checks first: nearly every value read is one of these (the hot path).
    if kind is int or kind is str or kind is bool or value is None:
        return cast(JsonValue, value)
    if kind is float:
        return _json_float(value)
    if kind is list or kind is tuple:
        return [json_value(item) for item in value]
    for types, convert in _JSON_CONVERTERS:
        if isinstance(value, types):
            return convert(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _json_structure(value)
    return str(value)


def _json_float(value: float) -> float:
    if math.isfinite(value):
        return value
    raise NotFinite(f"not a finite number ({value})")


def _json_datetime(value: dt.datetime) -> str:
    stamp = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
    return stamp.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_structure(value: Any) -> JsonValue:
    return {  # type: ignore[return-value]  # JSON object: a structure's fields
        field.name: json_value(getattr(value, field.name)) for field in dataclasses.fields(value)
    }


# In order: the first matching type converts (Enum before int, since an IntEnum is an int;
# the last three catch subclasses of the JSON types).
_JSON_CONVERTERS: Final[tuple[tuple[_ClassInfo, Callable[[Any], JsonValue]], ...]] = (
    (dt.datetime, _json_datetime),
    ((bytes, bytearray), lambda value: base64.b64encode(bytes(value)).decode("ascii")),
    (ua.Variant, lambda value: json_value(value.Value)),  # elements of a BaseDataType array
    (ua.LocalizedText, lambda value: value.Text),
    ((ua.NodeId, ua.QualifiedName), lambda value: value.to_string()),
    (ua.StatusCode, lambda value: status_name(value.value)),
    (uuid.UUID, str),
    (Enum, lambda value: json_value(value.value)),
    (int, int),
    (float, lambda value: _json_float(float(value))),
    (str, str),
)


def status_code(code: int) -> ua.StatusCode:
    """A ``ua.StatusCode`` of a numeric code."""
    return ua.StatusCode(cast(ua.UInt32, code))


def status_name(code: int) -> str:
    """``BadSensorFailure`` for a status code, ignoring the info bits (overflow etc.)."""
    for candidate in (code, code & 0xFFFF0000):
        name = status_code(candidate).name
        if name not in ("Good", "Uncertain", "Bad") or candidate in (0, 0x40000000, 0x80000000):
            return name
    return f"0x{code:08X}"


def _epoch(stamp: dt.datetime | None) -> float | None:
    if stamp is None:
        return None
    seconds = stamp.timestamp()
    # A server without a clock may send the minimum FILETIME (1601): treat as absent.
    return seconds if seconds > _EPOCH_2000 else None


def make_reading(tag: str, value: ua.DataValue | None, received: float) -> Reading:
    """One DataValue as a Reading: quality from the status code's severity, event time from
    SourceTimestamp, else ServerTimestamp, else the time of receipt."""
    if value is None:
        return Reading(tag, None, "bad", received, "no value")
    ts = _epoch(value.SourceTimestamp) or _epoch(value.ServerTimestamp) or received
    code = value.StatusCode.value if value.StatusCode is not None else 0
    severity = code >> 30
    if severity >= 2:
        # Bad: the value must not be used (Part 4 7.34); publish null with the status name.
        return Reading(tag, None, "bad", ts, status_name(code))
    variant = value.Value
    try:
        data = json_value(variant.Value if variant is not None else None)
    except NotFinite as exc:
        return Reading(tag, None, "bad", ts, str(exc))
    if variant is not None and variant.VariantType == _VT.Float:
        # asyncua widens a Float to a Python float (56.702999114990234): the float nearest its
        # shortest decimal is the same float32, written short (drivers/values.py).
        data = at_precision(data, decimals=None, single=True)
    if severity == 1:
        return Reading(tag, data, "uncertain", ts, status_name(code))
    return Reading(tag, data, "good", ts)


# ---------------------------------------------------------------------- writing: JSON -> OPC UA


def to_variant(
    value: JsonValue, vtype: ua.VariantType, array: bool | None
) -> tuple[ua.Variant, Any]:
    """Convert a JSON value to the node's type; returns the variant and the value a read-back
    must show. ``array``: the node holds an array (True), a scalar (False), either (None).
    Raises ValueError with a readable reason when it cannot be converted."""
    if array is None:
        array = isinstance(value, list)
    if array or isinstance(value, list):
        if not array:
            raise ValueError(f"expected a single {vtype.name}, got a list")
        if not isinstance(value, list):
            raise ValueError(f"expected a list of {vtype.name}, got {value!r}")
        items = [_to_scalar(item, vtype) for item in value]
        return ua.Variant(items, vtype, is_array=True), [_expected(item, vtype) for item in items]
    scalar = _to_scalar(value, vtype)
    return ua.Variant(scalar, vtype), _expected(scalar, vtype)


def _expected(value: Any, vtype: ua.VariantType) -> Any:
    if vtype == _VT.Float:
        return single_precision(value)  # what a read of the node shows (make_reading)
    try:
        return json_value(value)
    except NotFinite:
        return value


def _to_scalar(value: Any, vtype: ua.VariantType) -> Any:
    if value is None:
        raise ValueError("cannot write null")
    convert = _WRITE_CONVERTERS.get(vtype)
    if convert is None:
        raise ValueError(f"writing {vtype.name} values is not supported")
    return convert(value, vtype)


def _to_boolean(value: Any, vtype: ua.VariantType) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"expected a boolean, got {value!r}")


def _to_integer(value: Any, vtype: ua.VariantType) -> int:
    number: int
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        number = int(value.strip())
    else:
        raise ValueError(f"expected an integer, got {value!r}")
    low, high = _INT_RANGES[vtype]
    if not low <= number <= high:
        raise ValueError(f"{number} is out of range for {vtype.name} ({low}..{high})")
    return number


def _to_float(value: Any, vtype: ua.VariantType) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"cannot write {number}")
    if vtype == _VT.Float and abs(number) > _FLOAT32_MAX:
        raise ValueError(f"{number} does not fit a Float")
    return number


def _to_string(value: Any, vtype: ua.VariantType) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _to_localized_text(value: Any, vtype: ua.VariantType) -> ua.LocalizedText:
    return ua.LocalizedText(_to_string(value, vtype))


def _to_datetime(value: Any, vtype: ua.VariantType) -> dt.datetime:
    if not isinstance(value, str):
        raise ValueError(f"expected an RFC 3339 time, got {value!r}")
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def _to_byte_string(value: Any, vtype: ua.VariantType) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"expected base64 text, got {value!r}")
    return base64.b64decode(value, validate=True)


# The node types a write accepts, each with its converter (docs/opcua.md, "Writes").
_WRITE_CONVERTERS: Final[dict[ua.VariantType, Callable[[Any, ua.VariantType], Any]]] = {
    _VT.Boolean: _to_boolean,
    **dict.fromkeys(_INT_RANGES, _to_integer),
    **dict.fromkeys(_FLOAT_TYPES, _to_float),
    _VT.String: _to_string,
    _VT.LocalizedText: _to_localized_text,
    _VT.DateTime: _to_datetime,
    _VT.ByteString: _to_byte_string,
}

# The node types the driver writes (a browsed variable of another type is not offered as writable).
WRITE_TYPES: Final = frozenset(_WRITE_CONVERTERS)
