"""Register decoding/encoding for every type and order, and block coalescing (pure)."""

from __future__ import annotations

import math
import re
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus.codec import (
    DecodeError,
    decode_registers,
    encode_registers,
    plan_blocks,
    scale_value,
    unscale_value,
)
from drivers.modbus.config import ModbusTagConfig


def regs(data: bytes) -> list[int]:
    """Big-endian bytes -> registers (the wire order)."""
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


# (type, value, registers as the PLC sends them with byte_order big, word_order big)
BIG = [
    ("int16", -1234, regs(struct.pack(">h", -1234))),
    ("uint16", 65535, [0xFFFF]),
    ("int32", -123456, regs(struct.pack(">i", -123456))),
    ("uint32", 0xDEADBEEF, [0xDEAD, 0xBEEF]),
    ("int64", -1234567890123, regs(struct.pack(">q", -1234567890123))),
    ("uint64", 2**64 - 2, regs(struct.pack(">Q", 2**64 - 2))),
    ("float32", 21.5, regs(struct.pack(">f", 21.5))),
    ("float64", -0.125, regs(struct.pack(">d", -0.125))),
]


@pytest.mark.parametrize(("type_", "value", "registers"), BIG)
def test_big_endian_words(type_: str, value: float, registers: list[int]) -> None:
    assert decode_registers(registers, type_) == value
    assert encode_registers(value, type_) == registers


@pytest.mark.parametrize(("type_", "value", "registers"), BIG)
def test_word_swapped(type_: str, value: float, registers: list[int]) -> None:
    swapped = list(reversed(registers))
    assert decode_registers(swapped, type_, word_order="little") == value
    assert encode_registers(value, type_, word_order="little") == swapped


@pytest.mark.parametrize(("type_", "value", "registers"), BIG)
def test_byte_swapped(type_: str, value: float, registers: list[int]) -> None:
    byte_swapped = [((r & 0xFF) << 8) | (r >> 8) for r in registers]
    assert decode_registers(byte_swapped, type_, byte_order="little") == value
    assert encode_registers(value, type_, byte_order="little") == byte_swapped


@pytest.mark.parametrize(("type_", "value", "registers"), BIG)
def test_both_swapped(type_: str, value: float, registers: list[int]) -> None:
    both = [((r & 0xFF) << 8) | (r >> 8) for r in reversed(registers)]
    assert decode_registers(both, type_, byte_order="little", word_order="little") == value
    assert encode_registers(value, type_, byte_order="little", word_order="little") == both


def test_known_word_swap_of_uint32() -> None:
    # 0x12345678 low word first: [0x5678, 0x1234]
    assert decode_registers([0x5678, 0x1234], "uint32", word_order="little") == 0x12345678


@pytest.mark.parametrize(
    ("registers", "length", "byte_order", "text"),
    [
        ([0x4142, 0x4344], 4, "big", "ABCD"),
        ([0x4142, 0x4300], 4, "big", "ABC"),
        ([0x4142, 0x4300], 3, "big", "ABC"),
        ([0x4241, 0x4443], 4, "little", "ABCD"),
        ([0x0000, 0x0000], 4, "big", ""),
    ],
)
def test_strings(registers: list[int], length: int, byte_order: str, text: str) -> None:
    assert decode_registers(registers, "string", length=length, byte_order=byte_order) == text  # type: ignore[arg-type]


def test_string_encoding_pads_and_refuses_long() -> None:
    assert encode_registers("AB", "string", length=4) == [0x4142, 0x0000]
    assert encode_registers("ABC", "string", length=3) == [0x4142, 0x4300]
    assert encode_registers("café", "string", length=4) == [0x6361, 0x66E9]  # Latin-1
    with pytest.raises(ValueError, match="longer"):
        encode_registers("ABCDE", "string", length=4)


# (tag keys, command value, part of the reason): what the codec cannot encode, refused by the
# tag's command_value at validation with the codec's own reason (docs/workflows.md).
UNENCODABLE = [
    ({"type": "string", "length": 8}, "€uro", "Latin-1 characters only, not '€'"),
    ({"type": "string", "length": 8}, "日本", "Latin-1 characters only, not '日本'"),
    ({"type": "string", "length": 8}, "ok 🙂", "Latin-1 characters only"),
    ({"type": "string", "length": 8}, "A\x00B", "a NUL character would end the PLC string"),
    ({"type": "string", "length": 4}, "ABCDE", "longer than"),
    ({"type": "float32"}, 1e39, "does not fit float32"),
    ({"type": "int16", "scale": 0.1}, 5000, "raw 50000 does not fit int16"),
    ({"type": "uint16", "offset": 10.0}, 5, "raw -5 does not fit uint16"),
    ({"type": "uint16"}, 70000, "does not fit"),
]


@pytest.mark.parametrize(("keys", "value", "reason"), UNENCODABLE)
def test_what_the_codec_cannot_encode_is_refused_at_validation(
    keys: dict[str, object], value: object, reason: str
) -> None:
    tag = ModbusTagConfig(name="t", address="hr:10", **keys)
    raw = unscale_value(value, tag.type, tag.scale, tag.offset)  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # noqa: PT011 - the reason is the tag's, checked below
        encode_registers(raw, tag.type, length=tag.length)
    with pytest.raises(ValueError, match=re.escape(reason)):
        tag.command_value(value)


@pytest.mark.parametrize(
    ("keys", "value"),
    [
        ({"type": "string", "length": 8}, "café"),
        ({"type": "string", "length": 8}, "ORD-42"),
        ({"type": "float32"}, 3.0e38),
        ({"type": "int16", "scale": 0.1}, 3276.7),
        ({"type": "uint16", "offset": 10.0}, 10),
        ({"type": "uint64"}, 2**64 - 1),
    ],
)
def test_what_the_codec_encodes_is_accepted(keys: dict[str, object], value: object) -> None:
    tag = ModbusTagConfig(name="t", address="hr:10", **keys)
    converted = tag.command_value(value)
    raw = unscale_value(converted, tag.type, tag.scale, tag.offset)
    assert encode_registers(raw, tag.type, length=tag.length)


def test_bools_and_bits() -> None:
    assert decode_registers([0], "bool") is False
    assert decode_registers([7], "bool") is True
    assert decode_registers([0b1000], "bool", bit=3) is True
    assert decode_registers([0b1000], "bool", bit=2) is False


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_decode_errors(bad: float) -> None:
    with pytest.raises(DecodeError, match="finite"):
        decode_registers(regs(struct.pack(">f", bad)), "float32")
    with pytest.raises(ValueError, match="NaN"):
        encode_registers(bad, "float64")


@pytest.mark.parametrize(
    ("value", "type_"),
    [
        (70000, "uint16"),
        (-1, "uint32"),
        (2**31, "int32"),
        (1.5, "int16"),
        ("x", "int16"),
        (True, "int16"),
        (1e39, "float32"),
    ],
)
def test_encode_refuses_what_does_not_fit(value: object, type_: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        encode_registers(value, type_)  # type: ignore[arg-type]


def test_wrong_register_count_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_registers([1], "uint32")
    with pytest.raises(DecodeError):
        decode_registers([70000], "uint16")


def test_scaling() -> None:
    assert scale_value(215, 0.1, 0.0) == pytest.approx(21.5)
    assert scale_value(10, 1.0, 0.0) == 10
    assert isinstance(scale_value(10, 1.0, 0.0), int)
    assert scale_value(True, 2.0, 1.0) is True
    assert unscale_value(21.5, "int16", 0.1, 0.0) == 215
    assert unscale_value(21.54, "int16", 0.1, 0.0) == 215
    assert unscale_value(20.0, "float32", 2.0, 10.0) == 5.0


@given(
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.sampled_from(["big", "little"]),
    st.sampled_from(["big", "little"]),
)
def test_int32_round_trip(value: int, byte_order: str, word_order: str) -> None:
    registers = encode_registers(value, "int32", byte_order=byte_order, word_order=word_order)  # type: ignore[arg-type]
    assert (
        decode_registers(registers, "int32", byte_order=byte_order, word_order=word_order) == value
    )  # type: ignore[arg-type]


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float64_round_trip(value: float) -> None:
    for word_order in ("big", "little"):
        registers = encode_registers(value, "float64", word_order=word_order)  # type: ignore[arg-type]
        decoded = decode_registers(registers, "float64", word_order=word_order)  # type: ignore[arg-type]
        assert decoded == value or (math.isnan(value) and math.isnan(float(decoded)))


def tag(
    name: str, address: str, type_: str = "uint16", length: int | None = None
) -> ModbusTagConfig:
    return ModbusTagConfig(name=name, address=address, type=type_, length=length)  # type: ignore[arg-type]


def test_adjacent_tags_become_one_block() -> None:
    tags = [
        tag("a", "hr:100"),
        tag("b", "hr:101"),
        tag("c", "hr:102", "uint32"),
        tag("d", "hr:110"),
    ]
    blocks = plan_blocks(tags, max_gap=16, max_registers=125, max_bits=2000)
    assert [(b.area, b.start, b.count) for b in blocks] == [("hr", 100, 11)]


def test_gap_larger_than_max_gap_splits() -> None:
    tags = [tag("a", "hr:100"), tag("b", "hr:120")]
    blocks = plan_blocks(tags, max_gap=10, max_registers=125, max_bits=2000)
    assert [(b.start, b.count) for b in blocks] == [(100, 1), (120, 1)]
    blocks = plan_blocks(tags, max_gap=19, max_registers=125, max_bits=2000)
    assert [(b.start, b.count) for b in blocks] == [(100, 21)]


def test_areas_never_mix_and_bits_use_their_own_limit() -> None:
    tags = [
        tag("a", "hr:0"),
        tag("b", "ir:0"),
        tag("c", "co:0", "bool"),
        tag("d", "co:1999", "bool"),
        tag("e", "di:5", "bool"),
    ]
    blocks = plan_blocks(tags, max_gap=2000, max_registers=125, max_bits=2000)
    assert sorted((b.area, b.start, b.count) for b in blocks) == [
        ("co", 0, 2000),
        ("di", 5, 1),
        ("hr", 0, 1),
        ("ir", 0, 1),
    ]


def test_1000_tags_cost_tens_of_requests() -> None:
    tags = [tag(f"t{i}", f"hr:{1000 + i}") for i in range(1000)]
    blocks = plan_blocks(tags, max_gap=16, max_registers=125, max_bits=2000)
    assert len(blocks) == 8  # ceil(1000 / 125)
    assert all(b.count <= 125 for b in blocks)
    covered = [slot.tag.name for b in blocks for slot in b.slots]
    assert sorted(covered) == sorted(t.name for t in tags)


def test_block_limit_respects_multi_register_values() -> None:
    tags = [tag(f"t{i}", f"hr:{i * 4}", "uint64") for i in range(40)]  # 160 registers
    blocks = plan_blocks(tags, max_gap=0, max_registers=125, max_bits=2000)
    assert all(b.count <= 125 for b in blocks)
    assert [b.count for b in blocks] == [124, 36]


def test_split_isolates_halves() -> None:
    tags = [tag(f"t{i}", f"hr:{i}") for i in range(5)]
    (block,) = plan_blocks(tags, max_gap=0, max_registers=125, max_bits=2000)
    halves = block.split()
    assert halves is not None
    assert [(h.start, h.count) for h in halves] == [(0, 2), (2, 3)]
    single = plan_blocks(tags[:1], max_gap=0, max_registers=125, max_bits=2000)[0]
    assert single.split() is None


def test_bit_tags_share_their_register() -> None:
    tags = [tag("b0", "hr:10.0", "bool"), tag("b1", "hr:10.1", "bool"), tag("w", "hr:11")]
    (block,) = plan_blocks(tags, max_gap=0, max_registers=125, max_bits=2000)
    assert (block.start, block.count, len(block.slots)) == (10, 2, 3)


@pytest.mark.parametrize(("type_", "value", "registers"), BIG)
@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize("byte_order", ["big", "little"])
@pytest.mark.parametrize(("scale", "offset"), [(1.0, 0.0), (0.1, 5.0)])
def test_prebuilt_decoders_match_the_reference(
    type_: str,
    value: float,
    registers: list[int],
    word_order: str,
    byte_order: str,
    scale: float,
    offset: float,
) -> None:
    from drivers.modbus.codec import make_decoder

    wire = encode_registers(value, type_, byte_order=byte_order, word_order=word_order)  # type: ignore[arg-type]
    reference = scale_value(
        decode_registers(wire, type_, byte_order=byte_order, word_order=word_order),  # type: ignore[arg-type]
        scale,
        offset,
    )
    decoder = make_decoder(
        type_, byte_order=byte_order, word_order=word_order, scale=scale, offset=offset
    )  # type: ignore[arg-type]
    assert decoder(wire) == reference
    assert type(decoder(wire)) is type(reference)


def test_prebuilt_decoders_for_bits_strings_and_nan() -> None:
    from drivers.modbus.codec import make_decoder

    assert make_decoder("bool", bit=3)([0b1000]) is True
    assert make_decoder("string", length=4)([0x4142, 0x4300]) == "ABC"
    assert make_decoder("int16")([0xFFFF]) == -1
    assert make_decoder("uint16")([0xFFFF]) == 65535
    with pytest.raises(DecodeError, match="finite"):
        make_decoder("float32")(regs(struct.pack(">f", float("nan"))))
