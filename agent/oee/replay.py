"""Offline OEE (`edge-agent oee -c FILE --replay FILE.csv|FILE.jsonl`): the live engine over
recorded samples.

The same `OeeEngine` methods the live task calls are fed here, sample by sample in time order,
so the replay and the live engine give identical figures. Input rows may come in any order:
a file already in time order per machine is streamed (constant memory); otherwise it is read
again into compact per-machine columns and sorted (stable: equal timestamps keep file order).
Every problem in the file is reported as ``FILE:LINE: reason``. The file formats are in
agent/oee/samples.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from agent.oee.counters import GOOD, REJECT, TOTAL
from agent.oee.engine import OeeEngine
from agent.oee.records import OeeRecord
from agent.oee.samples import (
    CACHE_LIMIT,
    JSONL_SUFFIXES,
    QUALITIES,
    BadSample,
    ReplayError,
    Sample,
    check_header,
    counter_value,
    csv_quality,
    csv_value,
    jsonl_sample,
    parse_ts,
)
from agent.oee.samples import read_samples as read_samples  # the tests import it from here
from agent.settings.config_file import AgentSettings
from sync.events import rfc3339

STATE = -1  # role of a row: STATE, PRODUCT, or the counter slot TOTAL / REJECT / GOOD
PRODUCT = -2
_MISSING = object()
_FULL_CACHE_LIMIT = 1_000_000  # a week of 1 s timestamps fits

StateSink = Callable[[float, object, str], None]  # (ts, value, quality)
CounterSink = Callable[[int, float, object, str], None]  # (slot, ts, value, quality)


class _Unsorted(Exception):
    """Raised by the streaming pass when a machine's rows go back in time."""


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
    # Machines with state samples but not one record: (name, first state sample, data end).
    machines_without_planned_time: list[tuple[str, float, float]] = field(default_factory=list)


class _Timestamps:
    """A CSV file's timestamp texts to epoch seconds (cached), and the first and last seen."""

    __slots__ = ("_seconds", "first", "known", "last")

    def __init__(self) -> None:
        self._seconds: dict[str, int] = {}  # whole-second prefixes (see parse_ts)
        # Rows of one poll share a timestamp; rows in another order still repeat it, so whole
        # texts are cached too.
        self.known: dict[str, float] = {}
        self.first = math.inf
        self.last = -math.inf

    def parse(self, text: str) -> float:
        """The epoch seconds of `text` (BadSample if it is no RFC 3339 timestamp).

        The hot loop looks `known` up itself and calls this only for a text not seen yet
        (a text seen before cannot change `first` or `last`).
        """
        ts = self.known.get(text)
        if ts is not None:
            return ts
        ts = parse_ts(text, self._seconds)
        if len(self.known) >= _FULL_CACHE_LIMIT:
            self.known.clear()
        self.known[text] = ts
        if ts > self.last:
            self.last = ts
        if ts < self.first:
            self.first = ts
        return ts


class _MachineColumns:
    """One machine's rows in compact columns, kept when the file is not in time order."""

    __slots__ = ("in_order", "qualities", "roles", "timestamps", "values")

    def __init__(self) -> None:
        self.timestamps = array("d")
        self.roles = array("b")
        self.values: list[object] = []
        self.qualities: list[str] = []
        self.in_order = True

    def add_state(self, ts: float, value: object, quality: str) -> None:
        """Keep a state row (the signature of `OeeEngine.on_state`)."""
        self.timestamps.append(ts)
        self.roles.append(STATE)
        self.values.append(value)
        self.qualities.append(quality)

    def add_counter(self, slot: int, ts: float, value: object, quality: str) -> None:
        """Keep a counter row (the signature of `OeeEngine.on_counter`)."""
        self.timestamps.append(ts)
        self.roles.append(slot)
        self.values.append(value)
        self.qualities.append(quality)

    def add_product(self, ts: float, value: object, quality: str) -> None:
        """Keep a product row (the signature of `OeeEngine.on_product`)."""
        self.timestamps.append(ts)
        self.roles.append(PRODUCT)
        self.values.append(value)
        self.qualities.append(quality)

    def feed(self, engine: OeeEngine) -> None:
        """Feed the rows to `engine` in (stable) time order, then let them go."""
        stamps, roles, values, qualities = self.timestamps, self.roles, self.values, self.qualities
        order: Iterable[int] = range(len(stamps))
        if not self.in_order:
            order = sorted(order, key=stamps.__getitem__)  # timsort: stable, run-aware
        on_state, on_counter, on_product = engine.on_state, engine.on_counter, engine.on_product
        for i in order:
            role = roles[i]
            if role >= 0:
                on_counter(role, stamps[i], values[i], qualities[i])
            elif role == STATE:
                on_state(stamps[i], values[i], qualities[i])
            else:
                on_product(stamps[i], values[i], qualities[i])
        # Release the columns as soon as the machine is done.
        self.timestamps = array("d")
        self.roles = array("b")
        self.values = []
        self.qualities = []


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
        self.refs = _tag_roles(settings)
        # Where each machine's rows go: straight into its engine, or into its columns.
        self.columns = [_MachineColumns() for _ in self.engines] if buffered else []
        self.on_state: list[StateSink]
        self.on_counter: list[CounterSink]
        self.on_product: list[StateSink]
        if buffered:
            self.on_state = [columns.add_state for columns in self.columns]
            self.on_counter = [columns.add_counter for columns in self.columns]
            self.on_product = [columns.add_product for columns in self.columns]
        else:
            self.on_state = [engine.on_state for engine in self.engines]
            self.on_counter = [engine.on_counter for engine in self.engines]
            self.on_product = [engine.on_product for engine in self.engines]
        self.seen_state = [False] * len(self.engines)
        self.result = ReplayResult()

    def error(self, line: int, reason: str) -> ReplayError:
        return ReplayError(f"{self.path}:{line}: {reason}")

    def _out_of_order(self, index: int) -> None:
        """Machine `index` has a row earlier than its previous one."""
        if not self.buffered:
            raise _Unsorted
        self.columns[index].in_order = False

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
                if self.path.suffix.lower() in JSONL_SUFFIXES:
                    self._read_jsonl(handle)
                else:
                    self._read_csv(handle)
            except UnicodeDecodeError as exc:
                raise ReplayError(f"{self.path}: not valid UTF-8 ({exc.reason})") from None

    def _read_csv(self, handle: IO[str]) -> None:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                return
            names = check_header(header)
            self._read_csv_rows(reader, names)
        except BadSample as exc:
            raise self.error(reader.line_num, str(exc)) from None
        except csv.Error as exc:
            raise self.error(reader.line_num, f"invalid CSV: {exc}") from None

    def _read_csv_rows(self, reader: Iterable[list[str]], names: list[str]) -> None:
        """The hot loop: locals only, and a timestamp is parsed once per change of its text
        (the rows of one poll share it)."""
        width = len(names)
        with_quality = width == 5
        refs = self.refs
        on_state, on_counter, on_product = self.on_state, self.on_counter, self.on_product
        out_of_order = self._out_of_order
        seen_state = self.seen_state
        machine_last = [-math.inf] * len(self.engines)
        stamps = _Timestamps()
        known_stamps = stamps.known
        state_cache: dict[str, object] = {}
        last_text: str | None = None
        ts = 0.0
        rows = used = 0
        quality = "good"
        for row in reader:
            count = len(row)
            if count == width:
                if with_quality:
                    ts_text, device, tag, raw, quality = row
                    if quality not in QUALITIES:
                        quality = csv_quality(quality)
                else:
                    ts_text, device, tag, raw = row
            elif count == 0:
                continue
            else:
                raise BadSample(f"expected {width} columns ({','.join(names)}), got {count}")
            rows += 1
            if ts_text != last_text:
                last_text = ts_text
                known = known_stamps.get(ts_text)
                ts = stamps.parse(ts_text) if known is None else known
            tags = refs.get(device)
            if tags is None:
                continue
            targets = tags.get(tag)
            if targets is None:
                continue
            used += 1
            for index, role in targets:
                value: object
                if quality == "bad":
                    value = None  # ignored by the engine whatever it holds
                elif role >= 0:
                    try:
                        value = int(raw)
                    except ValueError:
                        value = _counter_value(raw, device, tag)
                else:  # a state or product code: few values, cached
                    value = state_cache.get(raw, _MISSING)
                    if value is _MISSING:
                        value = _state_value(raw, state_cache, device, tag)
                    if role == STATE:
                        seen_state[index] = True
                if ts < machine_last[index]:
                    out_of_order(index)
                else:
                    machine_last[index] = ts
                if role >= 0:
                    on_counter[index](role, ts, value, quality)
                elif role == STATE:
                    on_state[index](ts, value, quality)
                else:
                    on_product[index](ts, value, quality)
        self._note(rows, used, stamps.first, stamps.last)

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
                sample = jsonl_sample(text, ts_cache, line)
            except BadSample as exc:
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
            except BadSample as exc:
                raise self.error(line, f"{sample.device}/{sample.tag}: {exc}") from None
        self._note(rows, used, first, last)

    def _dispatch(
        self, sample: Sample, targets: list[tuple[int, int]], machine_last: list[float]
    ) -> None:
        """Feed (or buffer) one parsed sample; the general, slower path of `_read_csv_rows`."""
        ts, quality = sample.ts, sample.quality
        for index, role in targets:
            value = sample.value
            if quality != "bad" and role >= 0:
                value = counter_value(value)
            if ts < machine_last[index]:
                self._out_of_order(index)
            else:
                machine_last[index] = ts
            if role >= 0:
                self.on_counter[index](role, ts, value, quality)
            elif role == STATE:
                self.on_state[index](ts, value, quality)
                if quality != "bad":
                    self.seen_state[index] = True
            else:
                self.on_product[index](ts, value, quality)

    def _note(self, rows: int, used: int, first: float, last: float) -> None:
        result = self.result
        result.rows, result.used = rows, used
        if rows:
            result.first_ts, result.last_ts = first, last

    # -- feeding and finishing --------------------------------------------------------------

    def feed_columns(self) -> None:
        """Buffered mode: feed each machine's rows in (stable) time order."""
        for columns, engine in zip(self.columns, self.engines, strict=True):
            if not columns.in_order:
                self.result.sorted_input = False
            columns.feed(engine)

    def finish(self) -> ReplayResult:
        result = self.result
        end = result.last_ts
        records: list[tuple[str, int, OeeRecord]] = []
        for index, engine in enumerate(self.engines):
            if not self.seen_state[index]:
                result.machines_without_state.append(engine.machine.name)
            finished = engine.finish(end)
            for record in finished:
                records.append((record["window"]["shift_start"], index, record))
            first = engine.observed_from
            if not finished and first is not None and end is not None:
                # Observed, and still no record: the data and the calendar never meet.
                result.machines_without_planned_time.append((engine.machine.name, first, end))
        records.sort(key=lambda item: (item[0], item[1]))
        result.records = [record for _, _, record in records]
        return result


def _tag_roles(settings: AgentSettings) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """device -> tag -> [(machine index, role)] for every tag a machine uses."""
    refs: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for index, machine in enumerate(settings.machines):
        uses = [(machine.state.tag, STATE), (machine.total_count, TOTAL)]
        if machine.product is not None:
            uses.append((machine.product, PRODUCT))
        if machine.reject_count is not None:
            uses.append((machine.reject_count, REJECT))
        if machine.good_count is not None:
            uses.append((machine.good_count, GOOD))
        for ref, role in uses:
            device, _, tag = ref.partition("/")
            # A plain int: it indexes the engine's per-counter lists on every row, and an
            # IntEnum member does that measurably slower.
            refs.setdefault(device, {}).setdefault(tag, []).append((index, int(role)))
    return refs


def _state_value(raw: str, cache: dict[str, object], device: str, tag: str) -> object:
    """A state cell's value, remembered for the next rows (a state takes few values)."""
    try:
        value = csv_value(raw)
    except BadSample as exc:
        raise BadSample(f"{device}/{tag}: {exc}") from None
    if len(cache) < CACHE_LIMIT:
        cache[raw] = value
    return value


def _counter_value(raw: str, device: str, tag: str) -> int:
    """A counter cell that is not a plain integer: '12.0' is 12, anything else an error."""
    try:
        return counter_value(raw)
    except BadSample as exc:
        raise BadSample(f"{device}/{tag}: {exc}") from None


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
    """OEE records, one per machine per shift covered by the file, by shift start then machine."""
    return run_replay(settings, path).records


def replay_samples(settings: AgentSettings, samples: Iterable[Sample]) -> list[OeeRecord]:
    """OEE records from samples in any order (the same engine calls as `replay`)."""
    ordered = sorted(samples, key=lambda sample: sample.ts)
    replayer = _Replayer(settings, Path("<samples>"), buffered=False)
    machine_last = [-math.inf] * len(replayer.engines)
    for sample in ordered:
        targets = replayer.refs.get(sample.device, {}).get(sample.tag)
        if targets is not None:
            try:
                replayer._dispatch(sample, targets, machine_last)
            except BadSample as exc:
                raise ReplayError(f"<samples>:{sample.line}: {exc}") from None
    if ordered:
        replayer._note(len(ordered), 0, ordered[0].ts, ordered[-1].ts)
    return replayer.finish().records


# ---------------------------------------------------------------------------------------------
# The command


def cmd_oee(args: argparse.Namespace) -> int:
    """`edge-agent oee -c FILE --replay FILE`: one JSON record per line on stdout."""
    from agent.settings.loader import ConfigError, load_agent_settings, no_secret

    try:
        settings = load_agent_settings(args.config, secrets_needed=no_secret)
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
    write: Callable[[str], object] = sys.stdout.write
    for record in result.records:
        write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
    for name in result.machines_without_state:
        print(
            f"{args.replay}: machine {name!r}: no good sample of its state tag; no record",
            file=sys.stderr,
        )
    for name, first, end in result.machines_without_planned_time:
        print(
            f"{args.replay}: no planned time for machine {name!r} between {rfc3339(first)} "
            f"and {rfc3339(end)}: check the calendar's days and time zone",
            file=sys.stderr,
        )
    if not result.records:
        print(f"{args.replay}: no machine produced an OEE record", file=sys.stderr)
        return 1  # an empty answer must not look like success to a script
    return 0
