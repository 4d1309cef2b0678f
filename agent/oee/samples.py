"""Recorded sample files for the offline OEE replay (docs/oee.md "Offline replay"): CSV
`ts,device,tag,value[,quality]` or JSONL, parsed into `Sample`s or their parts.

Every problem is reported as ``FILE:LINE: reason`` (`ReplayError`); the parsers below raise
`BadSample` with the reason and leave the location to the caller.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from sync.events import parse_rfc3339

QUALITIES = ("good", "uncertain", "bad")
CSV_COLUMNS = ("ts", "device", "tag", "value")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
CACHE_LIMIT = 100_000  # entries of a parse cache before it is emptied
_POW10 = tuple(10**n for n in range(10))


class ReplayError(Exception):
    """A sample file that cannot be replayed; the message is ``FILE:LINE: reason``."""


class BadSample(ValueError):
    """A row or value that cannot be used; the message is the reason (no location)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One recorded reading: epoch seconds, device, tag, value, quality, file line."""

    ts: float
    device: str
    tag: str
    value: object
    quality: str = "good"
    line: int = 0


def parse_ts(text: str, cache: dict[str, int]) -> float:
    """RFC 3339 text -> epoch seconds; the whole-second prefix is cached (the hot path)."""
    head = text[:19]
    base = cache.get(head)
    if base is not None:
        tail = text[19:]
        if tail == "Z":
            return float(base)
        if tail[:1] == "." and tail[-1:] == "Z":
            digits = tail[1:-1]
            if 0 < len(digits) <= 9 and digits.isascii() and digits.isdigit():
                # Integer arithmetic then one correctly rounded division: the same float as
                # parse_rfc3339 (datetime), so replayed and live timestamps are bit-identical.
                scale = _POW10[len(digits)]
                seconds: float = (base * scale + int(digits)) / scale
                return seconds
    return _parse_ts_slow(text, cache)


def _parse_ts_slow(text: str, cache: dict[str, int]) -> float:
    """Parse in full; a UTC ('Z') text also seeds the cache for the next ones of its second."""
    try:
        value = parse_rfc3339(text)
    except (ValueError, TypeError):
        raise BadSample(f"invalid timestamp {text!r}; write RFC 3339 with a zone") from None
    if not _is_z_suffix(text[19:]):
        return value
    try:
        naive = datetime.fromisoformat(text[:19])
    except ValueError:
        return value
    if naive.tzinfo is not None or naive.microsecond:
        return value
    if len(cache) >= CACHE_LIMIT:
        cache.clear()
    cache[text[:19]] = int(naive.replace(tzinfo=UTC).timestamp())
    return parse_ts(text, cache)


def _is_z_suffix(tail: str) -> bool:
    """Whether what follows the whole seconds is 'Z' or '.' + 1 to 9 digits + 'Z'."""
    if tail == "Z":
        return True
    digits = tail[1:-1]
    return (
        tail[:1] == "."
        and tail[-1:] == "Z"
        and 0 < len(digits) <= 9
        and digits.isascii()
        and digits.isdigit()
    )


def csv_value(text: str) -> object:
    """A CSV cell -> int, float, bool, None ('null') or the text itself."""
    stripped = text.strip()
    if not stripped:
        raise BadSample("empty value")
    try:
        return int(stripped)
    except ValueError:
        pass
    try:
        number = float(stripped)
    except ValueError:
        pass
    else:
        if math.isfinite(number):
            return number
    lowered = stripped.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    return stripped


def csv_quality(text: str) -> str:
    """A CSV quality cell, normalised: good, uncertain or bad."""
    quality = text.strip().lower()
    if quality not in QUALITIES:
        raise BadSample(f"invalid quality {text!r}; write good, uncertain or bad")
    return quality


def check_header(header: list[str]) -> list[str]:
    """The CSV header, normalised; it must be ts,device,tag,value[,quality]."""
    names = [name.strip().lower().lstrip("\ufeff") for name in header]
    if names not in (list(CSV_COLUMNS), [*CSV_COLUMNS, "quality"]):
        raise BadSample(
            f"header {','.join(header)!r}: expected 'ts,device,tag,value' (optionally ',quality')"
        )
    return names


def counter_value(value: object) -> int:
    """A counter reading (CSV text or JSON value) -> int, or BadSample."""
    if isinstance(value, bool):
        raise BadSample(f"counter value {value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise BadSample(f"counter value {value!r} is not an integer") from None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise BadSample(f"counter value {value!r} is not an integer")


def jsonl_sample(text: str, ts_cache: dict[str, int], line: int) -> Sample:
    """One JSONL line -> a Sample."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadSample(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise BadSample("expected a JSON object with ts, device, tag, value")
    for key in ("ts", "device", "tag", "value"):
        if key not in doc:
            raise BadSample(f"missing key {key!r}")
    ts_text, device, tag = doc["ts"], doc["device"], doc["tag"]
    if not isinstance(ts_text, str):
        raise BadSample(f"invalid timestamp {ts_text!r}; write RFC 3339 text")
    if not isinstance(device, str) or not isinstance(tag, str):
        raise BadSample("device and tag must be strings")
    quality = doc.get("quality", "good")
    if quality not in QUALITIES:
        raise BadSample(f"invalid quality {quality!r}; write good, uncertain or bad")
    ts = parse_ts(ts_text, ts_cache)
    return Sample(ts, device, tag, doc["value"], quality, line)


def read_samples(path: Path) -> Iterator[Sample]:
    """Stream a CSV or JSONL sample file as `Sample`s in file order (errors name the line)."""
    path = Path(path)
    try:
        handle = path.open("r", encoding="utf-8", newline="")
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_samples(path, handle)
        else:
            yield from _csv_samples(path, handle)


def _jsonl_samples(path: Path, handle: IO[str]) -> Iterator[Sample]:
    cache: dict[str, int] = {}
    for line, text in enumerate(handle, start=1):
        if text.strip():
            try:
                yield jsonl_sample(text, cache, line)
            except BadSample as exc:
                raise ReplayError(f"{path}:{line}: {exc}") from None


def _csv_samples(path: Path, handle: IO[str]) -> Iterator[Sample]:
    cache: dict[str, int] = {}
    reader = csv.reader(handle)
    header = next(reader, None)
    if header is None:
        return
    try:
        check_header(header)
    except BadSample as exc:
        raise ReplayError(f"{path}:{reader.line_num}: {exc}") from None
    with_quality = len(header) == 5
    for row in reader:
        if not row:
            continue
        try:
            if len(row) != len(header):
                raise BadSample(f"expected {len(header)} columns, got {len(row)}")
            quality = row[4].strip().lower() if with_quality else "good"
            if quality not in QUALITIES:
                raise BadSample(f"invalid quality {row[4]!r}")
            value = None if quality == "bad" else csv_value(row[3])
            yield Sample(parse_ts(row[0], cache), row[1], row[2], value, quality, reader.line_num)
        except BadSample as exc:
            raise ReplayError(f"{path}:{reader.line_num}: {exc}") from None
