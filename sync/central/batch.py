"""S/sync batches: parsing and validation, pure (no I/O), into rows ready for COPY.

What makes a batch malformed is listed in docs/central.md ("Validation"); the payload itself
is specified in docs/topics.md.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

from sync.events import EVENT_KINDS

GATEWAY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_SEQ = 2**63 - 1
KINDS = frozenset(EVENT_KINDS)
COLUMNS = ("gateway_id", "stream_id", "seq", "ts", "kind", "device", "tag", "value", "quality")

Row = tuple[str, uuid.UUID, int, datetime, str, str | None, str | None, str | None, str | None]

# One encoder for every value: json.dumps with options builds a new encoder per call.
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


class MalformedBatch(ValueError):
    """An S/sync message that breaks the contract; it is counted and skipped."""


@dataclass(frozen=True, slots=True)
class Batch:
    """A validated S/sync batch, its rows ready for COPY."""

    gateway: str
    stream: str  # exactly as sent: echoed in S/ack
    stream_id: uuid.UUID
    first_seq: int
    last_seq: int
    rows: list[Row]
    months: frozenset[int]  # UTC month indexes (year * 12 + month - 1) of the rows


def parse_batch(gateway: str, payload: bytes) -> Batch:
    """Validate an S/sync payload received on ``{prefix}/{gateway}/sync``; raise MalformedBatch."""
    try:
        return _parse_batch(gateway, payload)
    except MalformedBatch:
        raise
    except Exception as exc:  # e.g. RecursionError on absurd nesting: still just malformed
        raise MalformedBatch(f"{type(exc).__name__}: {exc}") from exc


def _fail(reason: str) -> NoReturn:
    raise MalformedBatch(reason)


def _reject_constant(name: str) -> NoReturn:
    # json.loads accepts NaN/Infinity by default; JSON (and jsonb) has no such values.
    _fail(f"non-JSON constant {name}")


def _parse_batch(gateway: str, payload: bytes) -> Batch:
    doc = _document(gateway, payload)
    stream = doc.get("stream")
    if not isinstance(stream, str):
        _fail("stream must be a UUID string")
    try:
        stream_id = uuid.UUID(stream)
    except ValueError:
        _fail(f"stream is not a UUID: {stream!r:.60}")
    first_seq = _seq(doc.get("first_seq"), "first_seq")
    last_seq = _seq(doc.get("last_seq"), "last_seq")
    if first_seq > last_seq:
        _fail(f"first_seq {first_seq} > last_seq {last_seq}")
    events = doc.get("events")
    if not isinstance(events, list):
        _fail("events must be a list")
    rows: list[Row] = []
    seen: set[int] = set()
    months: set[int] = set()
    for index, event in enumerate(events):
        where = f"events[{index}]"
        if not isinstance(event, dict):
            _fail(f"{where} is not an object")
        seq = _seq(event.get("seq"), f"{where}.seq")
        if not first_seq <= seq <= last_seq:
            _fail(f"{where}.seq {seq} outside [{first_seq}, {last_seq}]")
        if seq in seen:
            _fail(f"{where}.seq {seq} appears twice")
        seen.add(seq)
        row = _row(gateway, stream_id, seq, event, where)
        rows.append(row)
        months.add(row[3].year * 12 + row[3].month - 1)
    return Batch(gateway, stream, stream_id, first_seq, last_seq, rows, frozenset(months))


def _document(gateway: str, payload: bytes) -> dict[str, Any]:
    """The payload's JSON object, checked against the topic's gateway level."""
    if not GATEWAY_ID.fullmatch(gateway):
        _fail(f"topic gateway level {gateway!r:.80} is not a gateway id")
    try:
        doc = json.loads(payload, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(f"not JSON: {exc}")
    if not isinstance(doc, dict):
        _fail("not a JSON object")
    if doc.get("gateway") != gateway:
        _fail(f"gateway {doc.get('gateway')!r:.80} differs from the topic's {gateway!r}")
    return doc


def _row(gateway: str, stream_id: uuid.UUID, seq: int, event: dict[str, Any], where: str) -> Row:
    """One event (its seq already checked) as a row of edge_events."""
    ts = _timestamp(event.get("ts"), f"{where}.ts")
    kind = event.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        _fail(f"{where}.kind {kind!r:.40} is not one of {', '.join(EVENT_KINDS)}")
    value = event.get("value")
    # jsonb travels as its JSON text; JSON null is stored as SQL NULL.
    value_text = None if value is None else _encode_json(value)
    return (
        gateway,
        stream_id,
        seq,
        ts,
        kind,
        _text(event.get("device"), f"{where}.device"),
        _text(event.get("tag"), f"{where}.tag"),
        value_text,
        _text(event.get("quality"), f"{where}.quality"),
    )


def _seq(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SEQ:
        _fail(f"{where} must be an integer 1..2^63-1, got {value!r:.40}")
    return value


def _text(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        _fail(f"{where} must be a string or null")
    # PostgreSQL text cannot hold NUL, and lone surrogates cannot be encoded as UTF-8.
    if "\x00" in value:
        _fail(f"{where} contains a NUL character")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            _fail(f"{where} is not valid Unicode")
    return value


def _timestamp(value: Any, where: str) -> datetime:
    if not isinstance(value, str):
        _fail(f"{where} must be an RFC 3339 string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"{where} is not an RFC 3339 timestamp: {value!r:.40}")
    if moment.tzinfo is None:
        _fail(f"{where} has no time zone: {value!r:.40}")
    return moment.astimezone(UTC)
