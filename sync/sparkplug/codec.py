"""Sparkplug B payloads as plain values, pure: metrics with their datatypes in, protobuf bytes
out, and back (docs/sparkplug.md, "Datatypes").

The protobuf classes are generated (`sparkplug_b_pb2`, from `sparkplug_b.proto`); nothing
outside this module touches them. Where a value goes follows the specification's table of
datatypes: the 8-, 16- and 32-bit integers in `int_value` (uint32; negative ones as 32-bit two's
complement), the 64-bit ones and DateTime (ms since the epoch) in `long_value` (uint64, two's
complement), Float in `float_value`, Double in `double_value`, Boolean in `boolean_value`,
String and Text in `string_value`. A null value is `is_null = true` and no value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from google.protobuf.message import DecodeError

from sync.sparkplug import sparkplug_b_pb2 as pb

MetricValue = bool | int | float | str | None


class DataType(IntEnum):
    """The Sparkplug basic datatypes edge-agent sends (spec 3.0, "Data Types")."""

    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14


class PayloadError(ValueError):
    """Bytes that are not a Sparkplug B payload, or a value its datatype cannot carry."""


INTEGER_RANGES: Final[dict[DataType, tuple[int, int]]] = {
    DataType.INT8: (-(2**7), 2**7 - 1),
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT8: (0, 2**8 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.UINT64: (0, 2**64 - 1),
    DataType.DATETIME: (0, 2**64 - 1),
}
_INT_FIELD: Final = frozenset(
    {
        DataType.INT8,
        DataType.INT16,
        DataType.INT32,
        DataType.UINT8,
        DataType.UINT16,
        DataType.UINT32,
    }
)

# The names of the tag types of docs/configuration.md (and of drivers' configs) -> datatype.
TAG_TYPES: Final[dict[str, DataType]] = {
    "int8": DataType.INT8,
    "int16": DataType.INT16,
    "int32": DataType.INT32,
    "int64": DataType.INT64,
    "uint8": DataType.UINT8,
    "uint16": DataType.UINT16,
    "uint32": DataType.UINT32,
    "uint64": DataType.UINT64,
    "float": DataType.FLOAT,
    "float32": DataType.FLOAT,
    "double": DataType.DOUBLE,
    "float64": DataType.DOUBLE,
    "bool": DataType.BOOLEAN,
    "boolean": DataType.BOOLEAN,
    "string": DataType.STRING,
    "datetime": DataType.DATETIME,
}


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric. With a `name` it is a definition (births, NDEATH, commands by name): name,
    alias and datatype are written; without one it is data: the alias only (spec 3.0,
    "payloads-alias-data-cmd-requirement", "payloads-metric-datatype-not-req").
    `value` None is sent as `is_null`; `properties` are (key, datatype, value) triples."""

    datatype: DataType
    value: MetricValue
    name: str | None = None
    alias: int | None = None
    timestamp_ms: int | None = None
    is_historical: bool = False
    properties: tuple[tuple[str, DataType, MetricValue], ...] = ()


@dataclass(frozen=True, slots=True)
class Payload:
    """A Sparkplug B payload: when it was sent (ms), its seq (None: NDEATH, STATE-less), metrics."""

    timestamp_ms: int | None
    seq: int | None
    metrics: tuple[Metric, ...]


@dataclass(frozen=True, slots=True)
class ReceivedMetric:
    """A metric as a peer sent it (NCMD, DCMD): what it names, its datatype if given, its value."""

    name: str | None
    alias: int | None
    datatype: DataType | None
    value: MetricValue


def datatype_for_kind(kind: str, *, tag_type: str | None = None) -> DataType | None:
    """The datatype of a tag from its declared type or, failing that, the kind of its values
    ('bool', 'int', 'float', 'string'); None: not known before a value arrives."""
    if tag_type is not None and tag_type in TAG_TYPES:
        return TAG_TYPES[tag_type]
    return {
        "bool": DataType.BOOLEAN,
        "int": DataType.INT64,
        "float": DataType.DOUBLE,
        "string": DataType.STRING,
    }.get(kind)


def datatype_of_value(value: MetricValue) -> DataType:
    """The datatype a value of unknown tag type is sent as (the first value decides)."""
    if isinstance(value, bool):
        return DataType.BOOLEAN
    if isinstance(value, int):
        return DataType.INT64 if value < 2**63 else DataType.UINT64
    if isinstance(value, float):
        return DataType.DOUBLE
    return DataType.STRING


def fits(datatype: DataType, value: MetricValue) -> bool:
    """Whether `value` can be sent as `datatype` without loss of kind (None always can)."""
    kind = type(value)
    if kind is float:  # the common case first: this runs for every value sent
        return datatype is DataType.DOUBLE or datatype is DataType.FLOAT
    if value is None:
        return True
    if datatype in INTEGER_RANGES:
        low, high = INTEGER_RANGES[datatype]
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if datatype in (DataType.FLOAT, DataType.DOUBLE):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if datatype is DataType.BOOLEAN:
        return isinstance(value, bool)
    return isinstance(value, str)


def encode(payload: Payload, *, checked: bool = False) -> bytes:
    """The protobuf bytes of a payload; PayloadError when a value does not fit its datatype
    (`checked`: the caller made sure with `fits`, on the hot path of live data)."""
    message = pb.Payload()
    if payload.timestamp_ms is not None:
        message.timestamp = payload.timestamp_ms
    if payload.seq is not None:
        message.seq = payload.seq
    for metric in payload.metrics:
        out = message.metrics.add()
        if metric.name is not None:
            out.name = metric.name
            out.datatype = metric.datatype
        if metric.alias is not None:
            out.alias = metric.alias
        if metric.timestamp_ms is not None:
            out.timestamp = metric.timestamp_ms
        if metric.is_historical:
            out.is_historical = True
        _set_value(out, metric.datatype, metric.value, metric.name, metric.alias, checked)
        if metric.properties:
            for key, datatype, value in metric.properties:
                out.properties.keys.append(key)
                prop = out.properties.values.add()
                prop.type = datatype
                _set_value(prop, datatype, value, f"property {key}", None, False)
    return message.SerializeToString()


def _set_value(
    out: pb.Payload.Metric | pb.Payload.PropertyValue,
    datatype: DataType,
    value: MetricValue,
    name: str | None,
    alias: int | None,
    checked: bool,
) -> None:
    if value is None:
        out.is_null = True
        return
    if type(value) is float and datatype is DataType.DOUBLE:
        out.double_value = value  # the common case first
        return
    if not checked and not fits(datatype, value):
        what = name if name is not None else f"alias {alias}"
        raise PayloadError(f"{what}: {value!r} is not a {datatype.name} value")
    if datatype in _INT_FIELD:
        assert isinstance(value, int)
        out.int_value = value & 0xFFFFFFFF
    elif datatype in INTEGER_RANGES:
        assert isinstance(value, int)
        out.long_value = value & 0xFFFFFFFFFFFFFFFF
    elif datatype is DataType.FLOAT:
        assert isinstance(value, int | float)
        out.float_value = value
    elif datatype is DataType.DOUBLE:
        assert isinstance(value, int | float)
        out.double_value = value
    elif datatype is DataType.BOOLEAN:
        assert isinstance(value, bool)
        out.boolean_value = value
    else:
        assert isinstance(value, str)
        out.string_value = value


def decode_received(data: bytes) -> tuple[int | None, int | None, Sequence[ReceivedMetric]]:
    """(timestamp ms, seq, metrics) of a payload a peer sent; PayloadError if malformed."""
    message = pb.Payload()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise PayloadError(f"not a Sparkplug B payload: {exc}") from None
    metrics = []
    for metric in message.metrics:
        datatype = _datatype(metric.datatype) if metric.HasField("datatype") else None
        metrics.append(
            ReceivedMetric(
                metric.name if metric.HasField("name") else None,
                metric.alias if metric.HasField("alias") else None,
                datatype,
                _value(metric, datatype),
            )
        )
    return (
        message.timestamp if message.HasField("timestamp") else None,
        message.seq if message.HasField("seq") else None,
        tuple(metrics),
    )


def _datatype(number: int) -> DataType:
    try:
        return DataType(number)
    except ValueError:
        raise PayloadError(f"unsupported datatype {number}") from None


def _value(metric: pb.Payload.Metric, datatype: DataType | None) -> MetricValue:
    if metric.is_null:
        return None
    field = metric.WhichOneof("value")
    if field is None:
        return None
    if field == "int_value":
        raw = metric.int_value
        if datatype in (DataType.INT8, DataType.INT16, DataType.INT32):
            return raw - 2**32 if raw >= 2**31 else raw
        return raw
    if field == "long_value":
        raw = metric.long_value
        if datatype is DataType.INT64:
            return raw - 2**64 if raw >= 2**63 else raw
        return raw
    if field == "float_value":
        return metric.float_value
    if field == "double_value":
        return metric.double_value
    if field == "boolean_value":
        return metric.boolean_value
    if field == "string_value":
        return metric.string_value
    raise PayloadError(f"metric {metric.name or metric.alias}: unsupported value field {field}")
