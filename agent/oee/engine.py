"""OEE per machine to ISO 22400-2 (design §7): a pure, incremental state machine.

No I/O, no clock reads, no asyncio. The caller feeds timestamped samples (epoch seconds) and
tells the engine that time passed; the engine answers with §7 records for the running shift,
for a rolling window, and - exactly once each - for every shift that ended. The live task and
the offline replay drive the very same methods, so they give identical figures for the same
samples. Every rule is written out in docs/oee.md; the comments here say why.

Accounting model: the machine's state is a sequence of *episodes* (one state code from one
sample to the next change). Time is counted only where an episode overlaps *planned time*
(a shift minus its breaks) and only after the first state sample (before it nothing is known).
Each overlap is added exactly once, when the episode or the planned interval ends, so the
figures never depend on how often the caller calls `advance` or reports.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent.oee.calendar import ShiftWindow, iter_shift_windows
from agent.settings.config_file import AgentSettings
from agent.settings.machines import CalendarConfig, MachineConfig
from sync.events import rfc3339

# State categories. UNKNOWN is a code the machine's mapping does not list: it counts as
# unplanned downtime and, like an unplanned stop, it is a stop (possibly a microstop).
RUNNING = 0
PLANNED_STOP = 1
UNPLANNED_STOP = 2
UNKNOWN = 3

CounterName = Literal["total", "reject", "good"]
TOTAL, REJECT, GOOD = 0, 1, 2
COUNTER_SLOTS: dict[str, int] = {"total": TOTAL, "reject": REJECT, "good": GOOD}

# A drop of a counter is a rollover only if the parts it implies could have been made since
# the previous sample at this many times the ideal rate (plus a small allowance): a PLC reset
# from high up the range must not turn into tens of thousands of phantom parts.
ROLLOVER_RATE_FACTOR = 10.0
ROLLOVER_ALLOWANCE = 16

_INF = math.inf
_STATE_NAMES = ("running", "planned_stop", "unplanned_stop", "unknown")


@dataclass(frozen=True, slots=True)
class StateChange:
    """A change of the published machine state (design §5 `R/{machine}/state`)."""

    ts: float
    state: str  # running | planned_stop | unplanned_stop | microstop | unknown
    code: Any

    def payload(self) -> dict[str, Any]:
        """The `R/{machine}/state` JSON document."""
        return {"ts": rfc3339(self.ts), "state": self.state, "code": self.code}


class _Stop:
    """One stop: a run of unplanned-stop / unknown codes, from leaving production to returning.

    `micro` is None while the stop is shorter than the threshold (provisionally a microstop),
    True once it ended short, False once it reached the threshold (an unplanned stop).
    """

    __slots__ = ("accs", "micro", "start")

    def __init__(self, start: float, micro: bool | None) -> None:
        self.start = start
        self.micro = micro
        self.accs: list[_Acc] = []  # shift windows this stop has planned time in, in order


class _Acc:
    """Running totals of one shift window (planned time only)."""

    __slots__ = (
        "counts",
        "down",
        "micro",
        "microstops",
        "obs_end",
        "obs_start",
        "pend",
        "pstop",
        "run",
        "stops",
        "window",
    )

    def __init__(self, window: ShiftWindow, obs_start: float | None) -> None:
        self.window = window
        self.obs_start = obs_start  # first observed instant in the window (None: not yet)
        self.obs_end = _INF
        self.run = 0.0  # running
        self.micro = 0.0  # microstops (count as running)
        self.pstop = 0.0  # planned-stop states
        self.down = 0.0  # unplanned stops and unknown states that reached the threshold
        self.pend = 0.0  # the open stop's time while it is still shorter than the threshold
        self.stops = 0
        self.microstops = 0
        self.counts = [0, 0, 0]  # produced (total), reject, good deltas


@dataclass(frozen=True, slots=True)
class _Totals:
    run: float
    pstop: float
    down: float
    stops: int
    microstops: int
    counts: tuple[int, int, int]


class OeeEngine:
    """OEE of one machine: feed samples in time order, read §7 records.

    Drive it like this (live task and replay alike): `on_state` / `on_count` for each reading,
    `advance(now)` when time passes without readings, `report_shift()` / `report_rolling()`
    for the figures so far, `pop_finished()` for final shift records (each exactly once),
    `pop_state_changes()` for `R/{machine}/state`, and `finish(end)` at the end of recorded
    data. Timestamps that go backwards are clamped to the latest one seen and counted.
    """

    def __init__(
        self,
        machine: MachineConfig,
        calendar: CalendarConfig,
        counter_bits: Mapping[str, int | None] | None = None,
        *,
        keep_history: bool = True,
    ) -> None:
        self.machine = machine
        self.calendar = calendar
        self._threshold = float(machine.microstop_threshold)
        self._ict = float(machine.ideal_cycle_time)
        self._rolling = float(machine.rolling_window)
        self._keep = keep_history
        bits = counter_bits or {}
        self._bits: list[int | None] = [bits.get(name) for name in ("total", "reject", "good")]
        self._codes: dict[Any, int] = {}
        self._bools: dict[bool, int] = {}
        groups = (
            (machine.state.running, RUNNING),
            (machine.state.planned_stop, PLANNED_STOP),
            (machine.state.unplanned_stop, UNPLANNED_STOP),
        )
        for codes, category in groups:
            for code in codes:
                # True == 1 in Python: bool codes live apart so that a bool tag's True does
                # not match the integer code 1 (the config keeps them distinct too).
                if isinstance(code, bool):
                    self._bools.setdefault(code, category)
                else:
                    self._codes.setdefault(code, category)

        # Timeline (calendar), prepared lazily from the first timestamp seen.
        self._windows: Iterator[ShiftWindow] | None = None
        self._upcoming: ShiftWindow | None = None
        self._win: ShiftWindow | None = None
        self._acc: _Acc | None = None
        self._ivs: tuple[tuple[float, float], ...] = ()
        self._iv_i = 0
        self._in_iv = False
        self._iv_end = _INF
        self._tl_next = -_INF  # next calendar boundary
        self._next_t = -_INF  # next instant with work to do (calendar or threshold)
        self._now = -_INF

        # Current episode.
        self._cat: int | None = None  # None: no state sample yet (nothing observed)
        self._code: Any = None
        self._cursor = 0.0  # where the not yet accounted part of the episode starts
        self._stop: _Stop | None = None
        self._first_obs: float | None = None
        self._since = 0.0  # when the published state last changed

        # Counters.
        self._last: list[int | None] = [None, None, None]
        self._last_ts: list[float] = [0.0, 0.0, 0.0]

        # Outputs.
        self._closing: list[_Acc] = []
        self._finished: list[dict[str, Any]] = []
        self._changes: deque[StateChange] = deque(maxlen=1024)
        self._hist: deque[tuple[float, float, int, _Stop | None]] = deque()
        self._count_hist: deque[tuple[float, int, int]] = deque()
        self._done = False

        # Diagnostics (exported as metrics by the live task).
        self.clock_steps_back = 0
        self.ignored_bad = 0
        self.invalid_values = 0
        self.rollovers = 0
        self.resets = 0

    @classmethod
    def from_settings(
        cls, settings: AgentSettings, machine: MachineConfig, *, keep_history: bool = True
    ) -> OeeEngine:
        """An engine for `machine`, with its calendar and counter widths from the config."""
        calendar = next((c for c in settings.calendars if c.name == machine.calendar), None)
        if calendar is None:
            raise ValueError(f"machine {machine.name!r}: unknown calendar {machine.calendar!r}")
        return cls(machine, calendar, counter_widths(settings, machine), keep_history=keep_history)

    # -- input -----------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """The latest timestamp seen (epoch seconds); -inf before the first."""
        return self._now

    def advance(self, ts: float) -> None:
        """Time passed until `ts` without a reading: close planned intervals and shifts."""
        if ts < self._now:
            self.clock_steps_back += 1
            return
        self._now = ts
        if ts >= self._next_t:
            self._advance_to(ts)
        if self._keep:
            self._trim(ts)

    def on_state(self, ts: float, code: Any, quality: str = "good") -> None:
        """A reading of the machine's state tag."""
        if quality == "bad":
            # A failed read says nothing about the machine: the last good state holds.
            self.ignored_bad += 1
            return
        if ts < self._now:
            self.clock_steps_back += 1
            ts = self._now
        self._now = ts
        if ts >= self._next_t:
            self._advance_to(ts)
        try:
            category = (
                self._bools.get(code, UNKNOWN)
                if code.__class__ is bool
                else self._codes.get(code, UNKNOWN)
            )
        except TypeError:  # unhashable (a list): not a code of the mapping
            category = UNKNOWN
        if category == self._cat and code == self._code:
            return
        self._change(ts, category, code)

    def on_count(self, ts: float, which: CounterName, value: Any, quality: str = "good") -> None:
        """A reading of a cumulative counter: which is 'total', 'reject' or 'good'."""
        slot = COUNTER_SLOTS.get(which)
        if slot is None:
            raise ValueError(f"unknown counter {which!r}; use 'total', 'reject' or 'good'")
        self.on_counter(slot, ts, value, quality)

    def on_counter(self, slot: int, ts: float, value: Any, quality: str = "good") -> None:
        """`on_count` with the counter as TOTAL, REJECT or GOOD (the replay's fast entry)."""
        if quality == "bad":
            # Not zero, not a reset: a bad read is no reading at all.
            self.ignored_bad += 1
            return
        if ts < self._now:
            self.clock_steps_back += 1
            ts = self._now
        self._now = ts
        if ts >= self._next_t:
            self._advance_to(ts)
        if value.__class__ is not int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                self.invalid_values += 1
                return
        last = self._last
        previous = last[slot]
        last[slot] = value
        stamps = self._last_ts
        previous_ts = stamps[slot]
        stamps[slot] = ts
        if previous is None:  # the first reading is the baseline
            return
        delta = value - previous
        if delta <= 0:
            if delta == 0:
                return
            delta = self._drop(slot, previous, value, ts - previous_ts)
            if delta <= 0:
                return
        # Parts count where their sample falls: inside planned time and after the first state.
        if self._in_iv and self._cat is not None:
            acc = self._acc
            assert acc is not None
            acc.counts[slot] += delta
            if self._keep:
                history = self._count_hist
                history.append((ts, slot, delta))
                horizon = ts - self._rolling
                while history[0][0] < horizon:
                    history.popleft()

    def _drop(self, slot: int, previous: int, value: int, elapsed: float) -> int:
        """Parts implied by a counter that went down: rollover, else a PLC reset."""
        bits = self._bits[slot]
        if bits is not None:
            span = 1 << bits
            wrapped = value - previous + span
            plausible = ROLLOVER_ALLOWANCE + ROLLOVER_RATE_FACTOR * elapsed / self._ict
            if previous - value > span >> 1 and wrapped <= plausible:
                self.rollovers += 1
                return wrapped
        # A PLC reset: counting restarts from the new value (parts made since the reset).
        self.resets += 1
        return value if value > 0 else 0

    # -- timeline --------------------------------------------------------------------------

    def _advance_to(self, t: float) -> None:
        """Process every calendar boundary and threshold crossing at or before `t`."""
        if self._windows is None:
            self._windows = iter_shift_windows(self.calendar, t)
            self._upcoming = next(self._windows, None)
            self._schedule()
        while self._next_t <= t:
            stop = self._stop
            if (
                stop is not None
                and stop.micro is None
                and stop.start + self._threshold < self._tl_next
            ):
                self._threshold_reached(stop, stop.start + self._threshold)
            else:
                self._boundary()
            self._schedule()

    def _schedule(self) -> None:
        win = self._win
        if win is None:
            upcoming = self._upcoming
            self._tl_next = _INF if upcoming is None else upcoming.start
        elif self._in_iv:
            self._tl_next = self._iv_end
        elif self._iv_i < len(self._ivs):
            self._tl_next = self._ivs[self._iv_i][0]
        else:
            self._tl_next = win.end
        stop = self._stop
        if stop is not None and stop.micro is None:
            self._next_t = min(self._tl_next, stop.start + self._threshold)
        else:
            self._next_t = self._tl_next

    def _boundary(self) -> None:
        t = self._tl_next
        win = self._win
        if win is None:  # a shift starts
            window = self._upcoming
            assert window is not None
            assert self._windows is not None
            self._win = window
            self._acc = _Acc(window, window.start if self._cat is not None else None)
            self._ivs = window.planned
            self._iv_i = 0
            self._in_iv = False
            self._upcoming = next(self._windows, None)
        elif self._in_iv:  # a planned interval ends (a break or the shift end follows)
            self._flush(t)
            self._in_iv = False
            self._iv_i += 1
        elif self._iv_i < len(self._ivs):  # a planned interval starts
            self._in_iv = True
            self._iv_end = self._ivs[self._iv_i][1]
            self._cursor = t
        else:  # the shift ends
            acc = self._acc
            assert acc is not None
            acc.obs_end = win.end
            self._win = None
            self._acc = None
            self._ivs = ()
            if acc.obs_start is not None:
                self._closing.append(acc)
                self._settle()

    def _flush(self, t: float) -> None:
        """Account the open episode from the cursor to `t` (an episode or interval end)."""
        category = self._cat
        cursor = self._cursor
        self._cursor = t
        if category is None or not self._in_iv or t <= cursor:
            return
        acc = self._acc
        assert acc is not None
        span = t - cursor
        stop = None
        if category == RUNNING:
            acc.run += span
        elif category == PLANNED_STOP:
            acc.pstop += span
        else:
            stop = self._stop
            assert stop is not None
            if stop.micro is None:
                acc.pend += span
            else:
                acc.down += span
            if not stop.accs or stop.accs[-1] is not acc:
                stop.accs.append(acc)
                if stop.micro is False:
                    acc.stops += 1
        if self._keep:
            self._hist.append((cursor, t, category, stop))

    def _threshold_reached(self, stop: _Stop, t: float) -> None:
        """The open stop lasted `microstop_threshold`: it is an unplanned stop after all."""
        stop.micro = False
        for acc in stop.accs:
            acc.down += acc.pend
            acc.pend = 0.0
            acc.stops += 1
        if self._cat == UNPLANNED_STOP:
            self._since = t
            self._changes.append(StateChange(t, "unplanned_stop", self._code))
        self._settle()

    def _end_stop(self) -> None:
        stop = self._stop
        assert stop is not None
        self._stop = None
        if stop.micro is None:
            # Ended before the threshold (else the crossing was processed first): a microstop,
            # whose time counts as running.
            stop.micro = True
            for acc in stop.accs:
                acc.micro += acc.pend
                acc.pend = 0.0
                acc.microstops += 1
            self._settle()

    def _change(self, ts: float, category: int, code: Any) -> None:
        old = self._cat
        if old is None:
            self._first_obs = ts
            if self._acc is not None:
                self._acc.obs_start = ts
        else:
            self._flush(ts)
            if old >= UNPLANNED_STOP and category < UNPLANNED_STOP:
                self._end_stop()
        if category >= UNPLANNED_STOP and self._stop is None:
            self._stop = _Stop(ts, None if self._threshold > 0 else False)
        self._cat = category
        self._code = code
        self._cursor = ts
        self._since = ts
        self._changes.append(StateChange(ts, self._state_name(), code))
        self._schedule()

    def _state_name(self) -> str:
        category = self._cat
        if category is None:
            return "unknown"
        stop = self._stop
        if category == UNPLANNED_STOP and stop is not None and stop.micro is None:
            return "microstop"
        return _STATE_NAMES[category]

    def _settle(self) -> None:
        """Emit the final record of every ended shift no open stop can still change."""
        if not self._closing:
            return
        stop = self._stop
        pending = stop.accs if stop is not None and stop.micro is None else ()
        keep: list[_Acc] = []
        for acc in self._closing:
            start = acc.obs_start
            if any(acc is other for other in pending):
                keep.append(acc)
            elif start is not None and acc.obs_end > start:
                self._finished.append(self._shift_record(acc, acc.obs_end, final=True))
        self._closing = keep

    def _trim(self, now: float) -> None:
        horizon = now - self._rolling
        hist = self._hist
        while hist and hist[0][1] <= horizon:
            hist.popleft()
        counts = self._count_hist
        while counts and counts[0][0] < horizon:
            counts.popleft()

    # -- output ----------------------------------------------------------------------------

    def pop_finished(self) -> list[dict[str, Any]]:
        """Final records of shifts that ended since the last call (each exactly once)."""
        finished, self._finished = self._finished, []
        return finished

    def pop_state_changes(self) -> list[StateChange]:
        """Changes of the published state since the last call (at most the last 1,024)."""
        changes = list(self._changes)
        self._changes.clear()
        return changes

    @property
    def state(self) -> StateChange | None:
        """The current published state (stamped when it began), None before any state sample."""
        if self._cat is None:
            return None
        return StateChange(self._since, self._state_name(), self._code)

    def current_window(self) -> ShiftWindow | None:
        """The shift window that contains `now`, if any."""
        return self._win

    def report_shift(self) -> dict[str, Any] | None:
        """The §7 record of the running shift so far (until `now`); None outside a shift."""
        acc = self._acc
        if acc is None or acc.obs_start is None or self._now <= acc.obs_start:
            return None
        return self._shift_record(acc, self._now, final=False)

    def report_rolling(self, seconds: float | None = None) -> dict[str, Any] | None:
        """The §7 record of the last `seconds` (default `rolling_window`) until `now`."""
        if not self._keep:
            raise RuntimeError("rolling windows need keep_history=True")
        length = self._rolling if seconds is None else min(float(seconds), self._rolling)
        now = self._now
        first = self._first_obs
        if first is None or now <= first:
            return None
        self._trim(now)
        low = max(now - length, first)
        run = pstop = down = 0.0
        stops: set[int] = set()
        micros: set[int] = set()
        pieces = list(self._hist)
        open_piece = self._open_piece(now)
        if open_piece is not None:
            pieces.append(open_piece)
        for start, end, category, stop in pieces:
            if end <= low:
                continue
            span = end - max(start, low)
            if span <= 0:
                continue
            if category == RUNNING:
                run += span
            elif category == PLANNED_STOP:
                pstop += span
            else:
                assert stop is not None
                if stop.micro is False:
                    down += span
                    stops.add(id(stop))
                else:  # a microstop, or a stop still shorter than the threshold
                    run += span
                    micros.add(id(stop))
        counts = [0, 0, 0]
        for ts, slot, delta in self._count_hist:
            if ts >= low:
                counts[slot] += delta
        totals = _Totals(
            run, pstop, down, len(stops), len(micros), (counts[0], counts[1], counts[2])
        )
        window = {
            "kind": "rolling",
            "name": f"last_{format_seconds(length)}",
            "start": rfc3339(low),
            "end": rfc3339(now),
            "complete": low == now - length,
        }
        return self._record(window, totals)

    def finish(self, end: float | None = None) -> list[dict[str, Any]]:
        """End of the recorded data at `end`: close everything, return the remaining records."""
        if self._done:
            return self.pop_finished()
        t = self._now if end is None or end < self._now else end
        if t == -_INF:
            self._done = True
            return []
        self._now = t
        self._advance_to(t)
        self._flush(t)
        if self._stop is not None and self._stop.micro is None:
            # Still shorter than the threshold when the data ends: it stays a microstop.
            self._end_stop()
        acc = self._acc
        if acc is not None and acc.obs_start is not None:
            acc.obs_end = t
            self._closing.append(acc)
        self._acc = None
        self._win = None
        self._in_iv = False
        self._settle()
        self._done = True
        return self.pop_finished()

    # -- records ---------------------------------------------------------------------------

    def _open_piece(self, now: float) -> tuple[float, float, int, _Stop | None] | None:
        category = self._cat
        if category is None or not self._in_iv or now <= self._cursor:
            return None
        return (self._cursor, min(now, self._iv_end), category, self._stop)

    def _shift_record(self, acc: _Acc, end: float, *, final: bool) -> dict[str, Any]:
        run = acc.run + acc.micro
        pstop = acc.pstop
        down = acc.down
        stops = acc.stops
        microstops = acc.microstops
        stop = self._stop
        open_stop = stop is not None and stop.micro is None and any(a is acc for a in stop.accs)
        if open_stop:  # provisionally a microstop: running time, one microstop
            run += acc.pend
            microstops += 1
        if not final and acc is self._acc:
            piece = self._open_piece(end)
            if piece is not None:
                span = piece[1] - piece[0]
                category = piece[2]
                if category == RUNNING:
                    run += span
                elif category == PLANNED_STOP:
                    pstop += span
                else:
                    assert stop is not None
                    counted = any(a is acc for a in stop.accs)
                    if stop.micro is False:
                        down += span
                        stops += 0 if counted else 1
                    else:
                        run += span
                        microstops += 0 if counted else 1
        window = acc.window
        assert acc.obs_start is not None
        start = acc.obs_start
        doc = {
            "kind": "shift",
            "name": window.name,
            "start": rfc3339(start),
            "end": rfc3339(end),
            "complete": start <= window.start and end >= window.end,
            "shift_start": rfc3339(window.start),
            "shift_end": rfc3339(window.end),
        }
        counts = acc.counts
        return self._record(
            doc, _Totals(run, pstop, down, stops, microstops, (counts[0], counts[1], counts[2]))
        )

    def _record(self, window: dict[str, Any], totals: _Totals) -> dict[str, Any]:
        # Times are rounded to milliseconds first and every factor is computed from the
        # rounded figures, so a record is self-consistent (availability == APT / PBT exactly).
        apt = round(totals.run, 3)
        down = round(totals.down, 3)
        pbt = round(apt + down, 3)
        produced, reject_count, good_count = totals.counts
        machine = self.machine
        if machine.reject_count is not None:
            reject = min(reject_count, produced)
            good = produced - reject
        elif machine.good_count is not None:
            good = min(good_count, produced)
            reject = produced - good
        else:  # no quality counter configured: every part counts as good
            good, reject = produced, 0
        availability = apt / pbt if pbt > 0 else None
        # 12 decimals: far below any meaning, but removes float noise such as 1.2 * 100 / 120
        # = 1.0000000000000002 that would otherwise flag an exactly ideal machine.
        performance = round(self._ict * produced / apt, 12) if apt > 0 else None
        quality = good / produced if produced > 0 else None
        oee = (
            availability * performance * quality
            if availability is not None and performance is not None and quality is not None
            else None
        )
        stops = totals.stops
        return {
            "machine": machine.name,
            "window": window,
            "availability": availability,
            "performance": performance,
            "quality": quality,
            "oee": oee,
            "planned_busy_time_s": pbt,
            "actual_production_time_s": apt,
            "unplanned_downtime_s": down,
            "produced_quantity": produced,
            "good_quantity": good,
            "reject_quantity": reject,
            "microstops": totals.microstops,
            "mtbf_s": round(apt / stops, 3) if stops else None,
            "mttr_s": round(down / stops, 3) if stops else None,
            "performance_flagged": performance is not None and performance > 1.0,
        }


def counter_widths(settings: AgentSettings, machine: MachineConfig) -> dict[str, int | None]:
    """Counter widths in bits from the config's tag types (None: unknown, e.g. OPC UA)."""
    widths: dict[str, int | None] = {}
    refs = (("total", machine.total_count), ("reject", machine.reject_count))
    for which, ref in (*refs, ("good", machine.good_count)):
        if ref is None:
            continue
        resolved = settings.tag(ref)
        widths[which] = None if resolved is None else resolved[1].counter_bits()
    return widths


def format_seconds(seconds: float) -> str:
    """3600 -> '1h', 5400 -> '1h30m', 90 -> '1m30s', 0.5 -> '500ms'."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    remaining = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if remaining >= size:
            count, remaining = divmod(remaining, size)
            parts.append(f"{count}{unit}")
    return "".join(parts)
