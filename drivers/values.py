"""The value rules every tag starts from (pure): a command parameter converted to the kind of
value a tag holds, one equality with one tolerance, and the precision a value is published at.

A driver's tag config (``TagConfigBase.command_value`` / ``same_value`` / ``published_value``)
calls these with what its protocol knows (integer ranges, string lengths, scaling, float32);
the workflows, the drivers' verified writes and their read-backs all compare through the tag,
and the live topics, the outbox and ``edge-agent probe`` all show a value through the tag, so
one tag has one rule.

Precision (docs/topics.md, "Values"): a float32 is the float nearest the shortest decimal that
reads back as the same float32 (``56.703``, not ``56.702999114990234``); a value rounded to
``decimals`` is the float nearest that decimal (``56.9``, not ``56.900000000000006``), an
integer with ``decimals = 0``. Python's ``repr`` and ``json`` write such a float with the
short text, so every encoder that writes floats as ``repr`` writes the published text.
"""

from __future__ import annotations

import decimal
import functools
import math
import re
import struct
from typing import Any, Final, Literal

ValueKind = Literal["bool", "int", "float", "string", "unknown"]
Scalar = bool | int | float | str | None
JsonValue = bool | int | float | str | list[Any] | None

# Relative tolerance of a float comparison (absolute below 1.0): a float32 on the wire keeps
# about 7 significant digits, so a value written and read back may differ in the 8th.
FLOAT_TOLERANCE = 1e-6

_INTEGER_TEXT = re.compile(r"\s*-?\d{1,20}\s*")

_FLOAT32: Final = struct.Struct("<f")
_FLOAT32_MIN_NORMAL: Final = 2.0**-126
# 9 significant digits identify every float32 (IEEE 754-2008, 5.12.2).
_FLOAT32_DIGITS: Final = 9
# Floor and ceiling to N significant digits, for the decimal on the far side of a float32.
_FLOOR: Final = tuple(
    decimal.Context(prec=max(1, n), rounding=decimal.ROUND_FLOOR) for n in range(10)
)
_CEILING: Final = tuple(
    decimal.Context(prec=max(1, n), rounding=decimal.ROUND_CEILING) for n in range(10)
)


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


def same_value(
    actual: Any, expected: Any, tolerance: float | None = None, *, at_least: float = 0.0
) -> bool:
    """Whether `actual` equals `expected`: booleans strictly, numbers within `tolerance`
    (absolute; default `default_tolerance`) and never less than `at_least` when either is a
    float, lists element by element, anything else by ``==``."""
    if isinstance(expected, list) or isinstance(actual, list):
        return (
            isinstance(actual, list)
            and isinstance(expected, list)
            and len(actual) == len(expected)
            and all(
                same_value(a, e, tolerance, at_least=at_least)
                for a, e in zip(actual, expected, strict=True)
            )
        )
    if isinstance(actual, bool) or isinstance(expected, bool):
        # True == 1 in Python: a boolean tag must not match the number 1.
        return type(actual) is type(expected) and actual == expected
    if isinstance(actual, int | float) and isinstance(expected, int | float):
        if isinstance(actual, float) or isinstance(expected, float):
            allowed = default_tolerance(float(expected)) if tolerance is None else tolerance
            return abs(float(actual) - float(expected)) <= max(allowed, at_least)
        return actual == expected
    return bool(actual == expected)


def single_precision(value: float) -> float:
    """`value` as a float32, written short: the float nearest the shortest decimal that reads
    back (``float(text)`` packed as a float32) as the same float32, the nearest such decimal
    when two of that length do. Beyond float32's range, NaN and infinities: `value` itself."""
    try:
        bits = _FLOAT32.pack(value)
    except OverflowError:
        return value
    return _shortest_float32(bits)


# Bounded (a few hundred kB): a polled value mostly repeats, and the search costs microseconds.
@functools.lru_cache(maxsize=4096)
def _shortest_float32(bits: bytes) -> float:
    single: float = _FLOAT32.unpack(bits)[0]
    if single == 0.0 or not math.isfinite(single):
        return single
    # A normal float32's step is under 0.12 of a unit of its 6th digit: of the decimals of 6
    # digits or fewer only the nearest 6-digit one can read back (and "%.6g" drops trailing
    # zeros). A subnormal holds fewer digits (the smallest is "1e-45"): search from one.
    first = 6 if abs(single) >= _FLOAT32_MIN_NORMAL else 1
    # The decimals that read back as `single` lie within half a float32 step either side of
    # it (give or take float()'s own rounding), so the nearest decimal of N digits is the one
    # to try: the one on the other side could read back instead only if N-digit decimals were
    # one float32 step apart to 1 part in 2**27, and no power of ten but 1 is within 0.4 % of
    # a power of two in float32's range (where the step is 1, `single` is an integer: its own
    # nearest decimal). At a power of two the step below is half the step above: there the
    # decimal above is tried too (Decimal is slow, and rarely needed).
    lopsided = not int.from_bytes(bits, "little") & 0x7FFFFF
    for digits in range(first, _FLOAT32_DIGITS + 1):
        number = float(f"{single:.{digits}g}")  # the nearest decimal of `digits` digits
        if _reads_back(number, bits):
            return number
        if lopsided:
            rounding = _CEILING if number < single else _FLOOR
            other = float(rounding[digits].plus(decimal.Decimal(single)))
            if _reads_back(other, bits):
                return other
    return single  # not reached: 9 digits always read back (see _FLOAT32_DIGITS)


def _reads_back(number: float, bits: bytes) -> bool:
    try:
        return _FLOAT32.pack(number) == bits
    except OverflowError:  # a decimal past the largest float32
        return False


def decimals_of(number: float) -> int:
    """Decimals of a number as written: 0.1 -> 1, 0.25 -> 2, 0.001 -> 3, 10 -> 0, 1e-05 -> 5."""
    exponent = decimal.Decimal(repr(float(number))).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def round_to(value: float, decimals: int) -> float | int:
    """`value` rounded to `decimals` (half to even); an int when `decimals` is 0."""
    if not math.isfinite(value):
        return value
    if decimals == 0:
        return round(value)
    return round(value, decimals)


def at_precision(value: JsonValue, *, decimals: int | None, single: bool = False) -> JsonValue:
    """A value as published: floats rounded to `decimals` when set, else as float32 when
    `single`, else unchanged; integers, booleans, strings and null unchanged; lists item by
    item."""
    if type(value) is float:
        if decimals is not None:
            return round_to(value, decimals)
        return single_precision(value) if single else value
    if isinstance(value, list):
        return [at_precision(item, decimals=decimals, single=single) for item in value]
    return value


def decimals_tolerance(decimals: int | None) -> float:
    """Half a unit of the last published decimal (0 when there is no such decimal): two
    values this close may be published as the same text, so a tag holds them the same."""
    return 0.0 if decimals is None else 0.5 * 10.0**-decimals
