"""The Sparkplug B payload codec (sync/sparkplug/codec.py, issue #23): each datatype in the
protobuf field the specification names, read back by Eclipse Tahu's decoder; values that do not
fit refused; a Hypothesis round trip; hostile bytes refused with a PayloadError."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.sparkplug import sparkplug_b_pb2 as pb
from sync.sparkplug.codec import (
    INTEGER_RANGES,
    DataType,
    Metric,
    MetricValue,
    Payload,
    PayloadError,
    datatype_for_kind,
    datatype_of_value,
    decode_received,
    encode,
)
from tests.fixtures.sparkplug import tahu_decode

D = DataType

# (datatype, value, protobuf field, raw field value, Tahu's type name)
CASES: list[tuple[DataType, MetricValue, str, object, str]] = [
    (D.INT8, -128, "int_value", 0xFFFFFF80, "Int8"),
    (D.INT8, 127, "int_value", 127, "Int8"),
    (D.INT16, -2, "int_value", 0xFFFFFFFE, "Int16"),
    (D.INT32, -(2**31), "int_value", 2**31, "Int32"),
    (D.INT64, -(2**63), "long_value", 2**63, "Int64"),
    (D.INT64, 2**63 - 1, "long_value", 2**63 - 1, "Int64"),
    (D.UINT8, 255, "int_value", 255, "UInt8"),
    (D.UINT16, 65535, "int_value", 65535, "UInt16"),
    (D.UINT32, 4_000_000_000, "int_value", 4_000_000_000, "UInt32"),
    (D.UINT64, 2**64 - 1, "long_value", 2**64 - 1, "UInt64"),
    (D.FLOAT, 56.703, "float_value", struct.unpack("<f", struct.pack("<f", 56.703))[0], "Float"),
    (D.DOUBLE, 56.9, "double_value", 56.9, "Double"),
    (D.BOOLEAN, True, "boolean_value", True, "Boolean"),
    (D.BOOLEAN, False, "boolean_value", False, "Boolean"),
    (D.STRING, "Widget-A ü", "string_value", "Widget-A ü", "String"),
    (D.DATETIME, 1_765_000_000_123, "long_value", 1_765_000_000_123, "DateTime"),
    (D.TEXT, "line\ntwo", "string_value", "line\ntwo", "Text"),
]


def one(
    datatype: DataType,
    value: MetricValue,
    *,
    is_historical: bool = False,
    properties: tuple[tuple[str, DataType, MetricValue], ...] = (),
) -> bytes:
    metric = Metric(
        datatype,
        value,
        name="m",
        alias=7,
        timestamp_ms=1_765_000_000_000,
        is_historical=is_historical,
        properties=properties,
    )
    return encode(Payload(1_765_000_000_500, 3, (metric,)))


@pytest.mark.parametrize(("datatype", "value", "field", "raw", "tahu_type"), CASES)
def test_value_field(
    datatype: DataType, value: MetricValue, field: str, raw: object, tahu_type: str
) -> None:
    message = pb.Payload()
    message.ParseFromString(one(datatype, value))
    metric = message.metrics[0]
    assert metric.WhichOneof("value") == field
    assert getattr(metric, field) == raw
    assert metric.datatype == datatype
    assert (metric.name, metric.alias, metric.timestamp) == ("m", 7, 1_765_000_000_000)
    assert (message.timestamp, message.seq) == (1_765_000_000_500, 3)


def test_tahu_reads_every_datatype() -> None:
    """One node process decodes every case: value and type as Tahu understands them."""
    decoded = tahu_decode([one(datatype, value) for datatype, value, *_ in CASES])
    for (datatype, value, _field, raw, tahu_type), payload in zip(CASES, decoded, strict=True):
        (metric,) = payload.metrics
        assert metric.type == tahu_type, datatype
        expected = raw if datatype is D.FLOAT else value
        assert metric.value == expected, (datatype, value)
        assert (metric.name, metric.alias, metric.timestamp) == ("m", 7, 1_765_000_000_000)
        assert (payload.timestamp, payload.seq) == (1_765_000_000_500, 3)


def test_null_historical_and_properties() -> None:
    data = one(
        D.DOUBLE,
        None,
        is_historical=True,
        properties=(("Quality", D.INT32, 0), ("reason", D.STRING, "timeout")),
    )
    message = pb.Payload()
    message.ParseFromString(data)
    metric = message.metrics[0]
    assert metric.is_null
    assert metric.WhichOneof("value") is None
    assert metric.is_historical
    assert list(metric.properties.keys) == ["Quality", "reason"]
    (payload,) = tahu_decode([data])
    (tahu,) = payload.metrics
    assert tahu.value is None
    assert tahu.is_null
    assert tahu.is_historical
    assert tahu.properties == {"Quality": 0, "reason": "timeout"}


def test_data_form_has_alias_only() -> None:
    """Without a name a metric is data: alias and value, no name, no datatype."""
    data = encode(Payload(1, 4, (Metric(D.INT16, -3, alias=9, timestamp_ms=5),)))
    message = pb.Payload()
    message.ParseFromString(data)
    metric = message.metrics[0]
    assert not metric.HasField("name")
    assert not metric.HasField("datatype")
    assert (metric.alias, metric.int_value, metric.timestamp) == (9, 0xFFFFFFFD, 5)


def test_no_seq_when_none() -> None:
    """NDEATH carries no seq."""
    message = pb.Payload()
    message.ParseFromString(encode(Payload(1, None, (Metric(D.UINT64, 3, name="bdSeq"),))))
    assert not message.HasField("seq")


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        (D.INT8, 128),
        (D.INT16, -(2**15) - 1),
        (D.UINT8, -1),
        (D.UINT32, 2**32),
        (D.UINT64, 2**64),
        (D.INT64, 1.5),
        (D.INT32, True),
        (D.BOOLEAN, 1),
        (D.STRING, 5),
        (D.DOUBLE, "5"),
        (D.DATETIME, -1),
    ],
)
def test_value_that_does_not_fit_is_refused(datatype: DataType, value: MetricValue) -> None:
    with pytest.raises(PayloadError, match=f"m: .* is not a {datatype.name} value"):
        one(datatype, value)


@pytest.mark.parametrize(
    ("kind", "tag_type", "expected"),
    [
        ("int", "int16", D.INT16),
        ("int", "uint32", D.UINT32),
        ("int", "uint64", D.UINT64),
        ("float", "float32", D.FLOAT),
        ("float", "float64", D.DOUBLE),
        ("bool", "bool", D.BOOLEAN),
        ("string", "string", D.STRING),
        ("int", "datetime", D.DATETIME),
        ("float", None, D.DOUBLE),
        ("int", None, D.INT64),
        ("unknown", None, None),
    ],
)
def test_datatype_for_kind(kind: str, tag_type: str | None, expected: DataType | None) -> None:
    assert datatype_for_kind(kind, tag_type=tag_type) == expected


def test_datatype_of_value() -> None:
    assert [datatype_of_value(v) for v in (True, 3, 2**63, 1.5, "x", None)] == [
        D.BOOLEAN,
        D.INT64,
        D.UINT64,
        D.DOUBLE,
        D.STRING,
        D.STRING,
    ]


def values_of(datatype: DataType) -> st.SearchStrategy[MetricValue]:
    if datatype in INTEGER_RANGES:
        low, high = INTEGER_RANGES[datatype]
        return st.integers(low, high)
    if datatype is D.FLOAT:
        return st.floats(width=32, allow_nan=False)
    if datatype is D.DOUBLE:
        return st.floats(allow_nan=False)
    if datatype is D.BOOLEAN:
        return st.booleans()
    return st.text()


@st.composite
def metrics(draw: st.DrawFn) -> Metric:
    datatype = draw(st.sampled_from(list(DataType)))
    value = draw(st.none() | values_of(datatype))
    named = draw(st.booleans())
    return Metric(
        datatype,
        value,
        name=draw(st.text(min_size=1)) if named else None,
        alias=draw(st.integers(0, 2**64 - 1)),
        timestamp_ms=draw(st.none() | st.integers(0, 2**64 - 1)),
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(metrics(), max_size=8),
    st.none() | st.integers(0, 255),
    st.none() | st.integers(0, 2**64 - 1),
)
def test_round_trip(items: list[Metric], seq: int | None, timestamp: int | None) -> None:
    timestamp_ms, got_seq, received = decode_received(encode(Payload(timestamp, seq, tuple(items))))
    assert (timestamp_ms, got_seq) == (timestamp, seq)
    assert len(received) == len(items)
    for sent, got in zip(items, received, strict=True):
        assert got.name == sent.name
        assert got.alias == sent.alias
        assert got.datatype == (sent.datatype if sent.name is not None else None)
        if sent.name is None and sent.datatype in (D.INT8, D.INT16, D.INT32):
            # Without the datatype a reader cannot know that int_value was signed.
            assert got.value == (None if sent.value is None else int(sent.value) & 0xFFFFFFFF)
        elif sent.name is None and sent.datatype is D.INT64:
            assert got.value == (None if sent.value is None else int(sent.value) % 2**64)
        elif isinstance(sent.value, float):
            assert isinstance(got.value, float)
            assert got.value == sent.value or (math.isnan(got.value) and math.isnan(sent.value))
        else:
            assert got.value == sent.value


@pytest.mark.parametrize(
    "data",
    [
        b"\xff",  # no such field encoding
        b"\x12\x05\x0a\x03ab",  # a metric cut short
        b"\x12\x02\x20\x63",  # datatype 99
        b"\x08" + b"\xff" * 11,  # a varint longer than 10 bytes
    ],
)
def test_hostile_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_received(data)
