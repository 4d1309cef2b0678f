"""Values at the precision they have (issue #21, item 5): float32 as the shortest decimal that
reads back as the same float32, scaled values at the decimals of their scale, `decimals` per
tag, integers as integers; the same text live, in the outbox and in `probe`."""

from __future__ import annotations

import random
import struct
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal
from fractions import Fraction
from typing import Any

import pytest
from asyncua import ua
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.daemon.pipeline import Pipeline
from agent.probe import ProbeRow, format_table, value_text
from drivers.base import JsonValue, Reading
from drivers.modbus.codec import decode_registers, encode_registers, make_decoder
from drivers.modbus.config import ModbusTagConfig
from drivers.opcua.config import OpcUaTagConfig
from drivers.opcua.values import make_reading
from drivers.values import at_precision, decimals_of, round_to, single_precision
from sync.events import Event
from sync.outbox.codec import StoredEvent, encode_event
from sync.uplink.topics import sample_payload
from tests.fixtures.sinks import RecordingSink

F32 = struct.Struct("<f")
BITS = struct.Struct("<I")


# ---------------------------------------------------------------------- the float32 reference


def reads_back(number: float, bits: bytes) -> bool:
    """`number` packs to the float32 `bits` (the definition the agent promises)."""
    try:
        return F32.pack(number) == bits
    except OverflowError:
        return False


def shortest_reference(single: float) -> tuple[int, set[float]]:
    """By brute force: the fewest significant digits whose decimal reads back as `single`, and
    the floats of the nearest such decimals. At each length only the decimals just below and
    just above `single` can read back: the decimals that do form an interval around it."""
    bits = F32.pack(single)
    exact = Decimal(single)
    for digits in range(1, 10):
        candidates = {
            Context(prec=digits, rounding=rounding).plus(exact)
            for rounding in (ROUND_FLOOR, ROUND_CEILING)
        }
        good = [c for c in candidates if reads_back(float(c), bits)]
        if good:
            distance = min(abs(Fraction(c) - Fraction(single)) for c in good)
            return digits, {
                float(c) for c in good if abs(Fraction(c) - Fraction(single)) == distance
            }
    raise AssertionError(f"no decimal of 9 digits reads back as {single!r}")


def nearest_float32(exact: Fraction) -> bytes:
    """The float32 nearest a decimal, rounded once (as strtof does; ties to even)."""
    guess = BITS.unpack(F32.pack(float(exact)))[0]
    best: tuple[Fraction, int, int] | None = None
    for candidate in (guess - 1, guess, guess + 1):
        if not 0 <= candidate < 2**32 or candidate >> 23 & 0xFF == 0xFF:
            continue
        value = Fraction(F32.unpack(BITS.pack(candidate))[0])
        key = (abs(value - exact), candidate & 1, candidate)
        best = key if best is None or key < best else best
    assert best is not None
    return BITS.pack(best[2])


def significant_digits(text: str) -> int:
    return len(Decimal(text).normalize().as_tuple().digits)


def check_single(bits: bytes) -> None:
    single = F32.unpack(bits)[0]
    published = single_precision(single)
    text = repr(published)  # what json, the payloads and the outbox write
    assert reads_back(float(text), bits), (single, text)
    # No shorter text reads back, and of the shortest the nearest is taken.
    digits, nearest = shortest_reference(single)
    assert significant_digits(text) == digits, (single, text, digits)
    assert published in nearest, (single, text, nearest)
    # A parser that rounds the decimal straight to float32 (C's strtof) gets it too.
    assert nearest_float32(Fraction(Decimal(text))) == bits, (single, text)


def finite_float32_bits(pattern: int) -> bytes | None:
    if pattern >> 23 & 0xFF == 0xFF or pattern & 0x7FFFFFFF == 0:
        return None  # NaN, infinities, zeros: not published as numbers / nothing to shorten
    return BITS.pack(pattern)


@settings(max_examples=3000, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_float32_is_published_as_its_shortest_decimal(pattern: int) -> None:
    bits = finite_float32_bits(pattern)
    if bits is not None:
        check_single(bits)


def test_float32_shortest_on_the_awkward_patterns() -> None:
    # Powers of two (the step below is half the step above), their neighbours, the subnormals
    # (fewer digits), the normal boundary, the largest float32, and a seeded sample.
    patterns = set()
    for exponent in range(256 - 1):
        for mantissa in (0, 1, 2, 0x7FFFFF, 0x7FFFFE, 0x400000):
            patterns.add(exponent << 23 | mantissa)
    patterns.update(range(1, 2000))
    rng = random.Random(21)
    patterns.update(rng.getrandbits(32) for _ in range(20000))
    checked = 0
    for pattern in sorted(patterns):
        for signed in (pattern, pattern | 0x80000000):
            bits = finite_float32_bits(signed)
            if bits is not None:
                check_single(bits)
                checked += 1
    assert checked > 40000


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (56.702999114990234, "56.703"),  # the float32 of issue #21
        (0.10000000149011612, "0.1"),
        (1.5, "1.5"),
        (57.0, "57.0"),
        (-12.345000267028809, "-12.345"),
        (0.3333333432674408, "0.33333334"),
        (16777217.0, "16777216.0"),  # not a float32: rounded to one first
        (1.401298464324817e-45, "1e-45"),  # the smallest subnormal
        (3.4028234663852886e38, "3.4028235e+38"),  # the largest float32
        (9.5367431640625e-07, "9.536743e-07"),  # 2**-20
        (1e39, "1e+39"),  # beyond float32: unchanged
        (-0.0, "-0.0"),
    ],
)
def test_single_precision_table(value: float, text: str) -> None:
    assert repr(single_precision(value)) == text


# ---------------------------------------------------------------------- decimals and precision


@pytest.mark.parametrize(
    ("number", "decimals"),
    [(0.1, 1), (0.25, 2), (0.001, 3), (1.0, 0), (10.0, 0), (2.5, 1), (1e-05, 5), (-273.15, 2)],
)
def test_decimals_of_a_scale(number: float, decimals: int) -> None:
    assert decimals_of(number) == decimals


@pytest.mark.parametrize(
    ("value", "decimals", "single", "expected"),
    [
        (56.900000000000006, 1, False, "56.9"),
        (58.300000000000004, 1, False, "58.3"),
        (56.94, 1, False, "56.9"),
        (0.30000000000000004, 2, False, "0.3"),
        (56.6, 0, False, "57"),  # decimals 0: an integer
        (1e300, 1, False, "1e+300"),
        (5.670300000000001, None, True, "5.6703"),
        (5.670300000000001, None, False, "5.670300000000001"),  # float64: as read
        (42, 1, False, "42"),  # integers stay integers
        (True, 0, False, "True"),
        ("PART-A", 1, True, "'PART-A'"),
        (None, 1, True, "None"),
        ([1.25, 2.0, 3], 1, False, "[1.2, 2.0, 3]"),  # half to even
    ],
)
def test_at_precision(value: JsonValue, decimals: int | None, single: bool, expected: str) -> None:
    assert repr(at_precision(value, decimals=decimals, single=single)) == expected


def test_round_to_keeps_what_cannot_be_rounded() -> None:
    assert round_to(float("inf"), 1) == float("inf")
    assert type(round_to(2.5, 0)) is int


def modbus_tag(**keys: Any) -> ModbusTagConfig:
    return ModbusTagConfig.model_validate({"name": "t", "address": "hr:0", **keys})


# (tag keys, value as decoded, text published)
PUBLISHED: list[tuple[dict[str, Any], JsonValue, str]] = [
    ({"type": "int16", "scale": 0.1}, 569 * 0.1, "56.9"),  # 56.900000000000006
    ({"type": "int16", "scale": 0.1}, 583 * 0.1, "58.3"),
    ({"type": "uint16", "scale": 0.25}, 7 * 0.25, "1.75"),
    ({"type": "uint32", "scale": 0.001}, 123457 * 0.001, "123.457"),
    ({"type": "int16", "scale": 0.1, "offset": -273.15}, 3000 * 0.1 - 273.15, "26.85"),
    ({"type": "int16", "scale": 10.0}, 56 * 10.0, "560"),  # integral scale: an integer
    ({"type": "int16", "scale": 0.1, "decimals": 0}, 569 * 0.1, "57"),
    ({"type": "int16", "scale": 0.01, "decimals": 1}, 5694 * 0.01, "56.9"),
    ({"type": "int16"}, 569, "569"),  # integers as integers
    ({"type": "float32"}, 56.703, "56.703"),  # the driver decodes a float32 short
    ({"type": "float32", "scale": 0.1}, 56.703 * 0.1, "5.6703"),
    ({"type": "float32", "decimals": 2}, 56.703, "56.7"),
    ({"type": "float64"}, 0.1 + 0.2, "0.30000000000000004"),  # float64: as read
    ({"type": "float64", "decimals": 3}, 0.1 + 0.2, "0.3"),
    ({"type": "bool"}, True, "True"),
    ({"type": "string", "length": 8}, "PART-A", "'PART-A'"),
    ({"type": "int16", "scale": 0.1}, None, "None"),  # a bad reading
]


@pytest.mark.parametrize(("keys", "value", "text"), PUBLISHED)
def test_modbus_tag_publishes_at_its_precision(
    keys: dict[str, Any], value: JsonValue, text: str
) -> None:
    assert repr(modbus_tag(**keys).published_value(value)) == text


def test_opcua_tag_decimals() -> None:
    tag = OpcUaTagConfig(name="t", node_id="ns=2;s=X", decimals=2)
    assert tag.published_value(12.3456) == 12.35
    assert tag.published_value([1.005, 2]) == [1.0, 2]  # 1.005 is 1.00499999...
    assert OpcUaTagConfig(name="t", node_id="ns=2;s=X").published_value(0.1 + 0.2) == 0.1 + 0.2


@pytest.mark.parametrize(
    ("keys", "actual", "expected", "same"),
    [
        # decimals: values that are published as the same text are the same value
        ({"type": "float32", "decimals": 1}, 56.74, 56.7, True),
        ({"type": "float32", "decimals": 1}, 56.76, 56.7, False),
        ({"type": "float64", "decimals": 0}, 56.6, 57, True),
        ({"type": "int16", "scale": 0.1}, 56.900000000000006, 56.9, True),
        ({"type": "int16", "scale": 0.1}, 57.0, 56.9, False),
        ({"type": "float32"}, 56.703, 56.702999114990234, True),
        ({"type": "float64"}, 56.74, 56.7, False),
    ],
)
def test_same_value_follows_the_published_precision(
    keys: dict[str, Any], actual: float, expected: float, same: bool
) -> None:
    assert modbus_tag(**keys).same_value(actual, expected) is same


def test_decimals_key_is_checked() -> None:
    assert modbus_tag(type="int16", decimals=2).decimals == 2
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        modbus_tag(type="int16", decimals=-1)
    problems = list(modbus_tag(type="bool", decimals=1).problems())
    assert (("decimals",), "only applies to numbers, not bool") in problems


# ---------------------------------------------------------------------- where values are read


def float32_registers(value: float) -> list[int]:
    return encode_registers(value, "float32")


def test_modbus_decodes_a_float32_short() -> None:
    registers = float32_registers(56.703)
    assert repr(decode_registers(registers, "float32")) == "56.703"
    assert repr(make_decoder("float32")(registers)) == "56.703"
    little = encode_registers(56.703, "float32", word_order="little")
    assert repr(make_decoder("float32", word_order="little")(little)) == "56.703"
    # Scaled: the raw float32 short, then scaled (the tag's precision rounds the result).
    assert make_decoder("float32", scale=0.1)(registers) == 56.703 * 0.1


def test_opcua_float_reads_short_double_as_read() -> None:
    def reading(value: Any, vtype: ua.VariantType) -> JsonValue:
        data = ua.DataValue(ua.Variant(value, vtype))
        return make_reading("t", data, 1.0).value

    widened = F32.unpack(F32.pack(56.703))[0]
    assert widened == 56.702999114990234  # what asyncua hands over for a Float
    assert repr(reading(widened, ua.VariantType.Float)) == "56.703"
    assert reading([widened, 0.5], ua.VariantType.Float) == [56.703, 0.5]
    assert reading(0.1 + 0.2, ua.VariantType.Double) == 0.1 + 0.2


# ---------------------------------------------------------------------- where values go


async def test_events_carry_the_published_value_and_observers_the_read_one() -> None:
    tag = modbus_tag(type="int16", scale=0.1)
    published: list[Event] = []
    observed: list[JsonValue] = []
    pipeline = Pipeline(sinks=[RecordingSink(published.extend)], clock=lambda: 0.0)
    pipeline.configure_tag(
        "press", "t", deadband=None, max_interval=60.0, published=tag.published_value
    )
    pipeline.add_observer(lambda _, readings: observed.extend(r.value for r in readings))
    values = [569 * 0.1, 56.9, 56.94, 583 * 0.1]  # 56.900000000000006, 56.9, 56.94, 58.3...
    for value in values:
        await pipeline.submit("press", [Reading("t", value, "good", 5.0)])
    # 56.94 publishes as 56.9, the same text as before: no event (the dedup compares the
    # published values); OEE and wait steps get every value as read.
    assert [event.value for event in published] == [56.9, 58.3]
    assert observed == values
    payload = sample_payload(5.0, published[0].value, "good")
    assert b'"value":56.9,' in payload
    row = encode_event(published[1])  # the outbox row, and the S/sync object made from it
    assert row[4] == "58.3"
    assert '"value":58.3,' in StoredEvent(1, *row[:1], "sample", *row[2:]).wire()


async def test_deadband_compares_published_values() -> None:
    tag = modbus_tag(type="int16", scale=0.1, deadband=0.5)
    published: list[Event] = []
    pipeline = Pipeline(sinks=[RecordingSink(published.extend)], clock=lambda: 0.0)
    pipeline.configure_tag(
        "press", "t", deadband=0.5, max_interval=60.0, published=tag.published_value
    )
    # As read: 0.1, 0.6000000000000001 (0.5000000000000001 beyond 0.1), 0.7000000000000001;
    # as published: 0.1, 0.6 (not beyond 0.5: no event), 0.7.
    for raw in (1, 6, 7):
        await pipeline.submit("press", [Reading("t", raw * 0.1, "good", 5.0)])
    assert [event.value for event in published] == [0.1, 0.7]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        ("PART-A", "PART-A"),
        (56.9, "56.9"),
        (56.703, "56.703"),
        (569, "569"),
        (None, ""),
        ([1.5, True, "x"], '[1.5,true,"x"]'),
    ],
)
def test_probe_value_text_is_the_payload_text(value: JsonValue, text: str) -> None:
    assert value_text(value) == text
    if value is not None and not isinstance(value, str):
        assert f'"value":{text},'.encode() in sample_payload(0.0, value, "good")


def test_probe_table_shows_payload_texts() -> None:
    rows = [
        ProbeRow("press1", "running", True, "good", 1.0),
        ProbeRow("press1", "product", "PART-A", "good", 1.0),
        ProbeRow("press1", "temperature", 58.3, "good", 1.0),
    ]
    table = format_table(rows)
    assert "running      true" in table
    assert "product      PART-A" in table
    assert "temperature  58.3" in table
    assert "'" not in table
    assert "True" not in table
