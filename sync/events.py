"""The event record (the outbox's schema) and the wire formats shared by every topic."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

EventKind = Literal["sample", "state", "count", "oee", "alarm", "workflow", "gap", "agent"]
EVENT_KINDS: tuple[str, ...] = (
    "sample",
    "state",
    "count",
    "oee",
    "alarm",
    "workflow",
    "gap",
    "agent",
)


@dataclass(frozen=True, slots=True)
class Event:
    """One event: `ts` is epoch seconds (UTC) of the gateway's event time."""

    ts: float
    kind: EventKind
    device: str | None = None
    tag: str | None = None
    value: Any = None
    quality: str | None = None


@functools.lru_cache(maxsize=16)
def rfc3339(ts: float) -> str:
    """Epoch seconds -> '2026-11-28T22:10:35.123Z' (UTC, milliseconds, 'Z')."""
    # Cached: every reading of one poll carries the same stamp, and its events are stamped
    # twice (the live payload, the S/sync batch); a few entries cover devices polled at once.
    seconds, ms = divmod(round(ts * 1000), 1000)
    return f"{_second_text(seconds)}.{ms:03d}Z"


@functools.lru_cache(maxsize=256)
def _second_text(seconds: int) -> str:
    # Every event is stamped: format each second once (events come in bursts per second).
    # Small on purpose: events arrive in time order, and a cache that keeps filling for an
    # hour (one entry per second) reads as a memory leak on a long-running gateway.
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def parse_rfc3339(text: str) -> float:
    """'2026-11-28T22:10:35.123Z' (or any ISO 8601 with offset) -> epoch seconds."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"timestamp without a time zone: {text!r}")
    return moment.timestamp()


def json_safe(value: Any) -> Any:
    """Make a value JSON-safe: NaN/Inf become None (JSON has no representation for them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    return value


def dumps(document: Any) -> bytes:
    """Compact UTF-8 JSON; refuses NaN/Inf (call json_safe first)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
