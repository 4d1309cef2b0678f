"""The outbox's row format: events as stored rows, and stored events as S/sync wire objects.

Pure functions and values, no I/O. The kind codes are part of the file format.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

from sync.events import Event, json_safe, rfc3339

# Kinds are stored as small integers (one byte per row instead of up to eight). The mapping
# is part of the file format: never renumber, only append.
KIND_CODES: dict[str, int] = {
    "sample": 0,
    "state": 1,
    "count": 2,
    "oee": 3,
    "alarm": 4,
    "workflow": 5,
    "gap": 6,
    "agent": 7,
}
KIND_NAMES: dict[int, str] = {code: name for name, code in KIND_CODES.items()}
SAMPLE_KIND = KIND_CODES["sample"]

# An event as stored, without its seq: (ts, kind code, device, tag, value JSON, quality).
Row = tuple[float, int, str | None, str | None, str | None, str | None]
# A row of the events table: (seq, *Row).
StoredRow = tuple[int, float, int, str | None, str | None, str | None, str | None]


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored in the outbox, with its seq; `value_json` is the stored JSON text."""

    seq: int
    ts: float
    kind: str
    device: str | None
    tag: str | None
    value_json: str | None
    quality: str | None

    @property
    def value(self) -> Any:
        """The decoded value."""
        return None if self.value_json is None else json.loads(self.value_json)

    def to_event(self) -> Event:
        """The plain event record (without seq)."""
        return Event(self.ts, self.kind, self.device, self.tag, self.value, self.quality)  # type: ignore[arg-type]

    def wire(self) -> str:
        """This event as an object of the S/sync ``events`` array (compact JSON)."""
        return (
            f'{{"seq":{self.seq},"ts":"{rfc3339(self.ts)}","kind":"{self.kind}",'
            f'"device":{_quote(self.device)},"tag":{_quote(self.tag)},'
            f'"value":{self.value_json or "null"},"quality":{_quote(self.quality)}}}'
        )


def encode_event(event: Event) -> Row:
    """An event as a stored row (without seq); raises ValueError if it cannot be stored."""
    kind = KIND_CODES.get(event.kind)
    if kind is None:
        raise ValueError(f"unknown event kind {event.kind!r}")
    ts = event.ts
    if type(ts) is not float:
        ts = float(ts)
    if not math.isfinite(ts):
        raise ValueError(f"event ts must be finite, got {event.ts!r}")
    return (ts, kind, event.device, event.tag, _encode_value(event.value), event.quality)


def _encode_value(value: Any) -> str | None:
    # Fast paths for the common scalar types; same text as json.dumps would produce.
    kind = type(value)
    if value is None:
        return None
    if kind is float:
        return repr(value) if math.isfinite(value) else None
    if kind is int:
        return str(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is str:
        return json.dumps(value, ensure_ascii=False)
    try:
        return json.dumps(
            json_safe(value), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"event value is not JSON-serialisable: {exc}") from exc


def _quote(text: str | None) -> str:
    if text is None:
        return "null"
    return _quote_text(text)


@functools.lru_cache(maxsize=16384)
def _quote_text(text: str) -> str:
    # Device, tag and quality strings repeat endlessly: quote each once.
    return json.dumps(text, ensure_ascii=False)
