"""The value rules every tag starts from (pure): a command parameter converted to the kind of
value a tag holds, and one equality with one tolerance.

A driver's tag config (``TagConfigBase.command_value`` / ``same_value``) calls these with what
its protocol knows (integer ranges, string lengths, scaling); the workflows, the drivers'
verified writes and their read-backs all compare through the tag, so one tag has one rule.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

ValueKind = Literal["bool", "int", "float", "string", "unknown"]
Scalar = bool | int | float | str | None

# Relative tolerance of a float comparison (absolute below 1.0): a float32 on the wire keeps
# about 7 significant digits, so a value written and read back may differ in the 8th.
FLOAT_TOLERANCE = 1e-6

_INTEGER_TEXT = re.compile(r"\s*-?\d{1,20}\s*")


def default_tolerance(expected: float) -> float:
    """The absolute tolerance for comparing with `expected` when a tag knows nothing better."""
    return FLOAT_TOLERANCE * max(1.0, abs(expected))


def short(value: Any) -> str:
    """`repr(value)` cut to 64 characters (values in error messages may come from a peer)."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def to_kind(
    value: Any,
    kind: ValueKind,
    *,
    int_range: tuple[int, int] | None = None,
    max_length: int | None = None,
) -> Any:
    """Convert a command parameter to `kind`; ValueError with the reason when it cannot.

    ``int_range`` bounds an integer (the tag's register width), ``max_length`` a string.
    """
    if kind == "unknown":
        return value
    if kind == "bool":
        return _to_bool(value)
    if kind == "string":
        return _to_string(value, max_length)
    if isinstance(value, bool | list | dict) or value is None:
        raise ValueError(f"{short(value)} is not a number")
    if kind == "int":
        return _to_int(value, int_range)
    return _to_float(value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{short(value)} is not a boolean")


def _to_string(value: Any, max_length: int | None) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float | str):
        text = str(value)
    else:
        raise ValueError(f"{short(value)} is not a string")
    if max_length is not None and len(text) > max_length:
        raise ValueError(f"{short(text)} is longer than the tag's {max_length} characters")
    return text


def _to_int(value: Any, int_range: tuple[int, int] | None) -> int:
    if isinstance(value, int):
        number = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and _INTEGER_TEXT.fullmatch(value)
    ):
        number = int(value)
    else:
        raise ValueError(f"{short(value)} is not an integer")
    if int_range is not None and not int_range[0] <= number <= int_range[1]:
        raise ValueError(f"{number} does not fit the tag ({int_range[0]}..{int_range[1]})")
    return number


def _to_float(value: Any) -> float:
    try:
        number = float(value)
    except (OverflowError, ValueError):
        raise ValueError(f"{short(value)} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{short(value)} is not finite")
    return number


def same_value(actual: Any, expected: Any, tolerance: float | None = None) -> bool:
    """Whether `actual` equals `expected`: booleans strictly, numbers within `tolerance`
    (absolute; default `default_tolerance`) when either is a float, lists element by element,
    anything else by ``==``."""
    if isinstance(expected, list) or isinstance(actual, list):
        return (
            isinstance(actual, list)
            and isinstance(expected, list)
            and len(actual) == len(expected)
            and all(same_value(a, e, tolerance) for a, e in zip(actual, expected, strict=True))
        )
    if isinstance(actual, bool) or isinstance(expected, bool):
        # True == 1 in Python: a boolean tag must not match the number 1.
        return type(actual) is type(expected) and actual == expected
    if isinstance(actual, int | float) and isinstance(expected, int | float):
        if isinstance(actual, float) or isinstance(expected, float):
            allowed = default_tolerance(float(expected)) if tolerance is None else tolerance
            return abs(float(actual) - float(expected)) <= allowed
        return actual == expected
    return bool(actual == expected)
