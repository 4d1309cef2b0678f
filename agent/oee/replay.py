"""Offline OEE (`edge-agent oee -c FILE --replay FILE.csv|FILE.jsonl`): the live engine over
recorded samples.

The same `OeeEngine` methods the live task calls are fed here, sample by sample in time order,
so the replay and the live engine give identical figures. Input rows may come in any order:
a file already in time order per machine is streamed (constant memory); otherwise it is read
again into compact per-machine columns and sorted (stable: equal timestamps keep file order).
Every problem in the file is reported as ``FILE:LINE: reason``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from agent.oee.counters import GOOD, REJECT, TOTAL
from agent.oee.engine import OeeEngine
from agent.oee.records import OeeRecord
from agent.settings.config_file import AgentSettings
from sync.events import parse_rfc3339

STATE = -1  # role of a row: STATE, or the counter slot TOTAL / REJECT / GOOD
QUALITIES = ("good", "uncertain", "bad")
CSV_COLUMNS = ("ts", "device", "tag", "value")
_POW10 = tuple(10**n for n in range(10))
_MISSING = object()
_CACHE_LIMIT = 100_000
_FULL_CACHE_LIMIT = 1_000_000  # a week of 1 s timestamps fits


class ReplayError(Exception):
    """A sample file that cannot be replayed; the message is ``FILE:LINE: reason``."""


class _Unsorted(Exception):
    """Raised by the streaming pass when a machine's rows go back in time."""


class _BadValue(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Sample:
    """One recorded reading: epoch seconds, device, tag, value, quality, file line."""

    ts: float
    device: str
    tag: str
    value: Any
    quality: str = "good"
    line: int = 0


@dataclass(slots=True)
class ReplayResult:
    """Records (ordered by shift start, then machine) and what the file contained."""

    records: list[OeeRecord] = field(default_factory=list)
    rows: int = 0
    used: int = 0  # rows of a tag some machine uses
    sorted_input: bool = True
    first_ts: float | None = None
    last_ts: float | None = None
    machines_without_state: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Parsing helpers


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
    try:
        value = parse_rfc3339(text)
    except (ValueError, TypeError):
        raise _BadValue(f"invalid timestamp {text!r}; write RFC 3339 with a zone") from None
    tail = text[19:]
    digits = tail[1:-1]
    z_family = tail == "Z" or (
        tail[:1] == "."
        and tail[-1:] == "Z"
        and 0 < len(digits) <= 9
        and digits.isascii()
        and digits.isdigit()
    )
    if not z_family:
        return value
    try:
        naive = datetime.fromisoformat(text[:19])
    except ValueError:
        return value
    if naive.tzinfo is not None or naive.microsecond:
        return value
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[text[:19]] = int(naive.replace(tzinfo=UTC).timestamp())
    return parse_ts(text, cache)


def csv_value(text: str) -> Any:
    """A CSV cell -> int, float, bool, None ('null') or the text itself."""
    stripped = text.strip()
    if not stripped:
        raise _BadValue("empty value")
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


def check_header(header: list[str]) -> list[str]:
    """The CSV header, normalised; it must be ts,device,tag,value[,quality]."""
    names = [name.strip().lower().lstrip("\ufeff") for name in header]
    if names not in (list(CSV_COLUMNS), [*CSV_COLUMNS, "quality"]):
        raise _BadValue(
            f"header {','.join(header)!r}: expected 'ts,device,tag,value' (optionally ',quality')"
        )
    return names


def counter_value(value: Any) -> int:
    """A counter reading (CSV text or JSON value) -> int, or _BadValue."""
    if isinstance(value, bool):
        raise _BadValue(f"counter value {value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise _BadValue(f"counter value {value!r} is not an integer") from None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise _BadValue(f"counter value {value!r} is not an integer")


# ---------------------------------------------------------------------------------------------
# The replay


class _Replayer:
    """One pass over a sample file, feeding engines directly or into per-machine columns."""

    def __init__(self, settings: AgentSettings, path: Path, *, buffered: bool) -> None:
        self.settings = settings
        self.path = path
        self.buffered = buffered
        self.engines = [
            OeeEngine.from_settings(settings, machine, keep_history=False)
            for machine in settings.machines
        ]
        # device -> tag -> [(machine index, role)]
        self.refs: dict[str, dict[str, list[tuple[int, int]]]] = {}
        for index, machine in enumerate(settings.machines):
            self._add(machine.state.tag, index, STATE)
            self._add(machine.total_count, index, TOTAL)
            if machine.reject_count is not None:
                self._add(machine.reject_count, index, REJECT)
            if machine.good_count is not None:
                self._add(machine.good_count, index, GOOD)
        count = len(self.engines)
        self.col_ts = [array("d") for _ in range(count)]
        self.col_role = [array("b") for _ in range(count)]
        self.col_value: list[list[Any]] = [[] for _ in range(count)]
        self.col_quality: list[list[str]] = [[] for _ in range(count)]
        self.col_sorted = [True] * count
        self.seen_state = [False] * count
        self.result = ReplayResult()

    def _add(self, ref: str, index: int, role: int) -> None:
        device, _, tag = ref.partition("/")
        self.refs.setdefault(device, {}).setdefault(tag, []).append((index, role))

    def error(self, line: int, reason: str) -> ReplayError:
        return ReplayError(f"{self.path}:{line}: {reason}")

    # -- reading ----------------------------------------------------------------------------

    def read(self) -> None:
        try:
            handle = self.path.open("r", encoding="utf-8", newline="")
        except FileNotFoundError:
            raise ReplayError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise ReplayError(f"{self.path}: is a directory") from None
        except OSError as exc:
            raise ReplayError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        with handle:
            try:
                if self.path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
                    self._read_jsonl(handle)
                else:
                    self._read_csv(handle)
            except UnicodeDecodeError as exc:
                raise ReplayError(f"{self.path}: not valid UTF-8 ({exc.reason})") from None

    def _read_csv(self, handle: IO[str]) -> None:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise self.error(reader.line_num, f"invalid CSV: {exc}") from None
        if header is None:
            return
        try:
            names = check_header(header)
        except _BadValue as exc:
            raise self.error(reader.line_num, str(exc)) from None
        with_quality = len(names) == 5
        width = len(names)

        # Hot loop: locals only. A timestamp repeats over the rows of one poll, so it is
        # parsed once per change of the text.
        refs = self.refs
        engines = self.engines
        on_state = [engine.on_state for engine in engines]
        on_counter = [engine.on_counter for engine in engines]
        buffered = self.buffered
        col_ts, col_role, col_value, col_quality = (
            self.col_ts,
            self.col_role,
            self.col_value,
            self.col_quality,
        )
        col_sorted = self.col_sorted
        seen_state = self.seen_state
        machine_last = [-math.inf] * len(engines)
        ts_cache: dict[str, int] = {}
        ts_full: dict[str, float] = {}
        state_cache: dict[str, Any] = {}
        last_text: str | None = None
        ts = 0.0
        first = math.inf
        last = -math.inf
        rows = used = 0
        quality = "good"
        try:
            for row in reader:
                count = len(row)
                if count == 4 and not with_quality:
                    ts_text, device, tag, raw = row
                elif count == width:
                    ts_text, device, tag, raw, quality = row
                    if quality not in QUALITIES:
                        quality = quality.strip().lower()
                        if quality not in QUALITIES:
                            raise _BadValue(
                                f"invalid quality {row[4]!r}; write good, uncertain or bad"
                            )
                elif count == 0:
                    continue
                else:
                    raise _BadValue(f"expected {width} columns ({','.join(names)}), got {count}")
                rows += 1
                if ts_text != last_text:
                    # Rows of one poll share a timestamp (the check above); rows in another
                    # order still repeat it, so whole texts are cached too.
                    cached = ts_full.get(ts_text)
                    if cached is None:
                        ts = parse_ts(ts_text, ts_cache)
                        if len(ts_full) >= _FULL_CACHE_LIMIT:
                            ts_full.clear()
                        ts_full[ts_text] = ts
                    else:
                        ts = cached
                    last_text = ts_text
                    if ts > last:
                        last = ts
                    if ts < first:
                        first = ts
                tags = refs.get(device)
                if tags is None:
                    continue
                targets = tags.get(tag)
                if targets is None:
                    continue
                used += 1
                for index, role in targets:
                    value: Any
                    if quality == "bad":
                        value = None  # ignored by the engine whatever it holds
                    elif role == STATE:
                        value = state_cache.get(raw, _MISSING)
                        if value is _MISSING:
                            try:
                                value = csv_value(raw)
                            except _BadValue as exc:
                                raise _BadValue(f"{device}/{tag}: {exc}") from None
                            if len(state_cache) < _CACHE_LIMIT:
                                state_cache[raw] = value
                    else:
                        try:
                            value = int(raw)
                        except ValueError:
                            try:
                                value = counter_value(raw)
                            except _BadValue as exc:
                                raise _BadValue(f"{device}/{tag}: {exc}") from None
                    if buffered:
                        if ts < machine_last[index]:
                            col_sorted[index] = False
                        else:
                            machine_last[index] = ts
                        col_ts[index].append(ts)
                        col_role[index].append(role)
                        col_value[index].append(value)
                        col_quality[index].append(quality)
                    else:
                        if ts < machine_last[index]:
                            raise _Unsorted
                        machine_last[index] = ts
                        if role == STATE:
                            on_state[index](ts, value, quality)
                        else:
                            on_counter[index](role, ts, value, quality)
                    if role == STATE and quality != "bad":
                        seen_state[index] = True
        except _BadValue as exc:
            raise self.error(reader.line_num, str(exc)) from None
        except csv.Error as exc:
            raise self.error(reader.line_num, f"invalid CSV: {exc}") from None
        self._note(rows, used, first, last)

    def _read_jsonl(self, handle: IO[str]) -> None:
        ts_cache: dict[str, int] = {}
        first = math.inf
        last = -math.inf
        rows = used = 0
        machine_last = [-math.inf] * len(self.engines)
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                sample = _jsonl_sample(text, ts_cache, line)
            except _BadValue as exc:
                raise self.error(line, str(exc)) from None
            rows += 1
            last = max(last, sample.ts)
            first = min(first, sample.ts)
            targets = self.refs.get(sample.device, {}).get(sample.tag)
            if targets is None:
                continue
            used += 1
            try:
                self._dispatch(sample, targets, machine_last)
            except _BadValue as exc:
                raise self.error(line, f"{sample.device}/{sample.tag}: {exc}") from None
        self._note(rows, used, first, last)

    def _dispatch(
        self, sample: Sample, targets: list[tuple[int, int]], machine_last: list[float]
    ) -> None:
        """Feed (or buffer) one parsed sample; the general, slower path of `_read_csv`."""
        ts, quality = sample.ts, sample.quality
        for index, role in targets:
            value: Any = sample.value
            if quality != "bad" and role != STATE:
                value = counter_value(value)
            if self.buffered:
                if ts < machine_last[index]:
                    self.col_sorted[index] = False
                else:
                    machine_last[index] = ts
                self.col_ts[index].append(ts)
                self.col_role[index].append(role)
                self.col_value[index].append(value)
                self.col_quality[index].append(quality)
            else:
                if ts < machine_last[index]:
                    raise _Unsorted
                machine_last[index] = ts
                engine = self.engines[index]
                if role == STATE:
                    engine.on_state(ts, value, quality)
                else:
                    engine.on_counter(role, ts, value, quality)
            if role == STATE and quality != "bad":
                self.seen_state[index] = True

    def _note(self, rows: int, used: int, first: float, last: float) -> None:
        result = self.result
        result.rows, result.used = rows, used
        if rows:
            result.first_ts, result.last_ts = first, last

    # -- feeding and finishing --------------------------------------------------------------

    def feed_columns(self) -> None:
        """Buffered mode: feed each machine's rows in (stable) time order."""
        for index, engine in enumerate(self.engines):
            ts_col = self.col_ts[index]
            roles, values, qualities = (
                self.col_role[index],
                self.col_value[index],
                self.col_quality[index],
            )
            order: Iterable[int] = range(len(ts_col))
            if not self.col_sorted[index]:
                self.result.sorted_input = False
                order = sorted(order, key=ts_col.__getitem__)  # timsort: stable, run-aware
            on_state, on_counter = engine.on_state, engine.on_counter
            for i in order:
                role = roles[i]
                if role == STATE:
                    on_state(ts_col[i], values[i], qualities[i])
                else:
                    on_counter(role, ts_col[i], values[i], qualities[i])
            # Release the columns as soon as the machine is done.
            self.col_ts[index] = array("d")
            self.col_role[index] = array("b")
            self.col_value[index] = []
            self.col_quality[index] = []

    def finish(self) -> ReplayResult:
        result = self.result
        end = result.last_ts
        records: list[tuple[str, int, OeeRecord]] = []
        for index, engine in enumerate(self.engines):
            if not self.seen_state[index]:
                result.machines_without_state.append(engine.machine.name)
            for record in engine.finish(end):
                records.append((record["window"]["shift_start"], index, record))
        records.sort(key=lambda item: (item[0], item[1]))
        result.records = [record for _, _, record in records]
        return result


def _jsonl_sample(text: str, ts_cache: dict[str, int], line: int) -> Sample:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadValue(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise _BadValue("expected a JSON object with ts, device, tag, value")
    for key in ("ts", "device", "tag", "value"):
        if key not in doc:
            raise _BadValue(f"missing key {key!r}")
    ts_text, device, tag = doc["ts"], doc["device"], doc["tag"]
    if not isinstance(ts_text, str):
        raise _BadValue(f"invalid timestamp {ts_text!r}; write RFC 3339 text")
    if not isinstance(device, str) or not isinstance(tag, str):
        raise _BadValue("device and tag must be strings")
    quality = doc.get("quality", "good")
    if quality not in QUALITIES:
        raise _BadValue(f"invalid quality {quality!r}; write good, uncertain or bad")
    ts = parse_ts(ts_text, ts_cache)
    return Sample(ts, device, tag, doc["value"], quality, line)


def run_replay(settings: AgentSettings, path: Path) -> ReplayResult:
    """Replay a CSV or JSONL sample file through one OEE engine per machine."""
    path = Path(path)
    replayer = _Replayer(settings, path, buffered=False)
    try:
        replayer.read()
    except _Unsorted:
        # Out of order: start again, this time into per-machine columns that are sorted.
        replayer = _Replayer(settings, path, buffered=True)
        replayer.read()
        replayer.feed_columns()
    return replayer.finish()


def replay(settings: AgentSettings, path: Path) -> list[OeeRecord]:
    """§7 records, one per machine per shift covered by the file, by shift start then machine."""
    return run_replay(settings, path).records


def read_samples(path: Path) -> Iterator[Sample]:
    """Stream a CSV or JSONL sample file as `Sample`s in file order (errors name the line)."""
    path = Path(path)
    cache: dict[str, int] = {}
    try:
        handle = path.open("r", encoding="utf-8", newline="")
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
            for line, text in enumerate(handle, start=1):
                if text.strip():
                    try:
                        yield _jsonl_sample(text, cache, line)
                    except _BadValue as exc:
                        raise ReplayError(f"{path}:{line}: {exc}") from None
            return
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        try:
            check_header(header)
        except _BadValue as exc:
            raise ReplayError(f"{path}:{reader.line_num}: {exc}") from None
        with_quality = len(header) == 5
        for row in reader:
            if not row:
                continue
            try:
                if len(row) != len(header):
                    raise _BadValue(f"expected {len(header)} columns, got {len(row)}")
                quality = row[4].strip().lower() if with_quality else "good"
                if quality not in QUALITIES:
                    raise _BadValue(f"invalid quality {row[4]!r}")
                value = None if quality == "bad" else csv_value(row[3])
                yield Sample(
                    parse_ts(row[0], cache), row[1], row[2], value, quality, reader.line_num
                )
            except _BadValue as exc:
                raise ReplayError(f"{path}:{reader.line_num}: {exc}") from None


def replay_samples(settings: AgentSettings, samples: Iterable[Sample]) -> list[OeeRecord]:
    """§7 records from samples in any order (the same engine calls as `replay`)."""
    ordered = sorted(samples, key=lambda sample: sample.ts)
    replayer = _Replayer(settings, Path("<samples>"), buffered=False)
    machine_last = [-math.inf] * len(replayer.engines)
    for sample in ordered:
        targets = replayer.refs.get(sample.device, {}).get(sample.tag)
        if targets is not None:
            try:
                replayer._dispatch(sample, targets, machine_last)
            except _BadValue as exc:
                raise ReplayError(f"<samples>:{sample.line}: {exc}") from None
    if ordered:
        replayer._note(len(ordered), 0, ordered[0].ts, ordered[-1].ts)
    return replayer.finish().records


# ---------------------------------------------------------------------------------------------
# The command


def cmd_oee(args: argparse.Namespace) -> int:
    """`edge-agent oee -c FILE --replay FILE`: one JSON record per line on stdout."""
    from agent.settings.loader import ConfigError, load_agent_settings

    try:
        settings = load_agent_settings(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if not settings.machines:
        print(f"{args.config}: no [[machines]] to compute OEE for", file=sys.stderr)
        return 2
    try:
        result = run_replay(settings, Path(args.replay))
    except ReplayError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    write: Callable[[str], Any] = sys.stdout.write
    for record in result.records:
        write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
    for name in result.machines_without_state:
        print(
            f"{args.replay}: machine {name!r}: no good sample of its state tag; no record",
            file=sys.stderr,
        )
    return 0
