"""S/sync batches: parsing and validation, pure (no I/O), into rows ready for COPY.

What makes a batch malformed is listed in docs/central.md ("Validation"); the payload itself
is specified in docs/topics.md. A batch is acked only as far as it is *self-covering*: every
seq of ``[first_seq, last_seq]`` is one of its events or declared dropped by one of its gap
events (docs/central.md, "What the ingest acknowledges").
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from sync.events import EVENT_KINDS

GATEWAY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_SEQ = 2**63 - 1
KINDS = frozenset(EVENT_KINDS)
COLUMNS = ("gateway_id", "stream_id", "seq", "ts", "kind", "device", "tag", "value", "quality")

# A gap event of this reason declares seqs of the *previous* stream (sync/outbox/recovery.py).
OTHER_STREAM_GAP = "corruption_recovery"
# Events dated from here on are accepted; datetime.min would travel as -infinity (asyncpg).
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_FUTURE_LIMIT = timedelta(days=366)

SeqRange = tuple[int, int]
Row = tuple[str, uuid.UUID, int, datetime, str, str | None, str | None, str | None, str | None]

# One encoder for every value: json.dumps with options builds a new encoder per call.
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


class MalformedBatch(ValueError):
    """An S/sync message that breaks the contract; it is counted and skipped."""


class UncoveredSeqs(MalformedBatch):
    """A batch claims a seq that is neither one of its events nor declared dropped."""


class EventTimeOutOfWindow(MalformedBatch):
    """An event's time is outside the window the ingest accepts (docs/central.md)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EventTimeWindow:
    """The event times the ingest accepts: from ``oldest`` to ``max_future`` past its clock."""

    oldest: datetime = EPOCH
    max_future: timedelta = timedelta(days=1)

    def __post_init__(self) -> None:
        if self.oldest.tzinfo is None:
            raise ValueError("oldest needs a time zone")
        if self.oldest <= datetime.min.replace(tzinfo=UTC):
            raise ValueError("oldest must be after 0001-01-01 (stored as -infinity)")
        if not timedelta(0) <= self.max_future <= MAX_FUTURE_LIMIT:
            raise ValueError(f"max_future must be between 0 and {MAX_FUTURE_LIMIT.days} days")

    def bounds(self, now: datetime | None = None) -> tuple[datetime, datetime]:
        """[earliest, latest] accepted event time at ``now`` (default: the current time)."""
        moment = now if now is not None else datetime.now(UTC)
        return self.oldest, moment + self.max_future

    def describe(self) -> str:
        """``[oldest, now + max_future]`` for messages, as the config file writes them."""
        seconds = self.max_future.total_seconds()
        ahead = f"{seconds:g}s"
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds and seconds % size == 0:
                ahead = f"{seconds // size:g}{unit}"
                break
        return f"[{self.oldest.isoformat()}, now + {ahead}]"


DEFAULT_EVENT_WINDOW = EventTimeWindow()


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
    # What the commit records for the watermark: [first_seq, last_seq] and every range its gap
    # events declare dropped in this stream (possibly below first_seq), merged, sorted.
    covered: tuple[SeqRange, ...]


def parse_batch(
    gateway: str,
    payload: bytes,
    *,
    window: EventTimeWindow = DEFAULT_EVENT_WINDOW,
    now: datetime | None = None,
) -> Batch:
    """Validate an S/sync payload received on ``{prefix}/{gateway}/sync``; raise MalformedBatch.

    Event times must lie in ``window`` at ``now`` (default: the current time).
    """
    try:
        return _parse_batch(gateway, payload, _Times(window, *window.bounds(now)))
    except MalformedBatch:
        raise
    except Exception as exc:  # e.g. RecursionError on absurd nesting: still just malformed
        raise MalformedBatch(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _Times:
    """The accepted event times of one parse."""

    window: EventTimeWindow
    earliest: datetime
    latest: datetime


def _fail(reason: str) -> NoReturn:
    raise MalformedBatch(reason)


def _reject_constant(name: str) -> NoReturn:
    # json.loads accepts NaN/Infinity by default; JSON (and jsonb) has no such values.
    _fail(f"non-JSON constant {name}")


def _parse_batch(gateway: str, payload: bytes, times: _Times) -> Batch:
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
    declared: list[SeqRange] = []
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
        row = _row(gateway, stream_id, seq, event, where, times)
        rows.append(row)
        months.add(row[3].year * 12 + row[3].month - 1)
        if row[4] == "gap":
            declared.extend(_declared(event.get("value"), seq, f"{where}.value"))
    hole = _first_uncovered(first_seq, last_seq, seen, declared)
    if hole is not None:
        raise UncoveredSeqs(
            f"seq {hole} of [{first_seq}, {last_seq}] is neither an event of the batch nor "
            "declared dropped by one of its gap events"
        )
    covered = _merged([(first_seq, last_seq), *declared])
    return Batch(gateway, stream, stream_id, first_seq, last_seq, rows, frozenset(months), covered)


def _declared(value: Any, seq: int, where: str) -> list[SeqRange]:
    """The seqs of this stream that the gap event ``seq`` declares dropped (docs/topics.md)."""
    if not isinstance(value, dict) or not isinstance(value.get("ranges"), list):
        _fail(f"{where} of a gap event must be an object with a 'ranges' list")
    # A corruption_recovery gap names the previous stream's unacknowledged seqs: checked for
    # form, but they declare nothing of this stream.
    own_stream = value.get("reason") != OTHER_STREAM_GAP
    ranges: list[SeqRange] = []
    for index, item in enumerate(value["ranges"]):
        at = f"{where}.ranges[{index}]"
        if not isinstance(item, list) or len(item) != 2:
            _fail(f"{at} must be [first, last], got {item!r:.40}")
        first, last = _seq(item[0], f"{at}[0]"), _seq(item[1], f"{at}[1]")
        if first > last:
            _fail(f"{at} [{first}, {last}] has first > last")
        # A gap event is written after the seqs it declares: a declaration at or above its
        # own seq would let a sender cover seqs it has not even assigned yet.
        if own_stream and last >= seq:
            _fail(f"{at} [{first}, {last}] is not below the gap event's own seq {seq}")
        ranges.append((first, last))
    return ranges if own_stream else []


def _first_uncovered(
    first_seq: int, last_seq: int, seqs: set[int], declared: list[SeqRange]
) -> int | None:
    """The lowest seq of [first_seq, last_seq] neither in ``seqs`` nor declared, or None."""
    if len(seqs) == last_seq - first_seq + 1:
        return None  # the usual batch: every seq is an event (all are distinct and in range)
    # Never expand a declared range into seqs: it may span up to 2^63.
    spans = sorted([(seq, seq) for seq in seqs] + declared)
    expected = first_seq
    for low, high in spans:
        if low > expected:
            break
        expected = max(expected, high + 1)
        if expected > last_seq:
            return None
    return expected


def _merged(ranges: list[SeqRange]) -> tuple[SeqRange, ...]:
    """Sorted, disjoint, non-adjacent ranges covering the same seqs as ``ranges``."""
    merged: list[list[int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return tuple((low, high) for low, high in merged)


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


def _row(
    gateway: str,
    stream_id: uuid.UUID,
    seq: int,
    event: dict[str, Any],
    where: str,
    times: _Times,
) -> Row:
    """One event (its seq already checked) as a row of edge_events."""
    ts = _timestamp(event.get("ts"), f"{where}.ts", times)
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


def _timestamp(value: Any, where: str, times: _Times) -> datetime:
    if not isinstance(value, str):
        _fail(f"{where} must be an RFC 3339 string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"{where} is not an RFC 3339 timestamp: {value!r:.40}")
    if moment.tzinfo is None:
        _fail(f"{where} has no time zone: {value!r:.40}")
    try:
        utc = moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        utc = None
    # Year 1 and 9999 would be stored as -infinity/+infinity, which partition maintenance
    # cannot place; a gateway clock that far off is broken anyway (docs/central.md).
    if utc is None or not times.earliest <= utc <= times.latest:
        raise EventTimeOutOfWindow(
            f"{where} {value!r:.40} is outside the accepted event times {times.window.describe()}"
        )
    return utc
