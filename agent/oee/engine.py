"""OEE per machine to ISO 22400-2 (docs/oee.md): a pure, incremental state machine.

No I/O, no clock reads, no asyncio. The caller feeds timestamped samples (epoch seconds) and
tells the engine that time passed; the engine answers with OEE records for the running shift,
for a rolling window, and - exactly once each - for every shift that ended. The live task and
the offline replay drive the very same methods, so they give identical figures for the same
samples. Every rule is written out in docs/oee.md; the comments here say why.

Accounting model: the machine's state is a sequence of *episodes* (one state code from one
sample to the next change). Time is counted only where an episode overlaps *planned time*
(a shift minus its breaks) and only after the first state sample (before it nothing is known).
Each overlap is added exactly once, when the episode or the planned interval ends, so the
figures never depend on how often the caller calls `advance` or reports.

Parts are counted where they were made: each counter delta is spread over the running time
between its two readings (`attribution`), so the engine hands every piece of running time it
accounts - in planned time or not - to the attribution as well.

The engine wires pure parts together (all in agent/oee/): `states` (codes to categories, the
published state), `timeline` (the calendar's shifts and planned intervals), `totals` (a shift's
running totals and the stops that feed them), `counters` (readings to parts), `products`
(product keys and ideal rates), `attribution` (parts to the running time that made them),
`rolling` (the rolling window's history), `final_records` (when a shift's record is final) and
`records` (the record itself).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.oee.attribution import PartsAttribution
from agent.oee.calendar import ShiftWindow
from agent.oee.counters import COUNTER_SLOTS, CounterName, CounterReadings
from agent.oee.final_records import FinalRecords
from agent.oee.products import NO_PRODUCT, IdealRates, product_key
from agent.oee.records import OeeRecord, oee_record, rolling_window, shift_window
from agent.oee.records import format_seconds as format_seconds  # tests import it from here
from agent.oee.rolling import RollingHistory
from agent.oee.states import (
    RUNNING,
    UNPLANNED_STOP,
    PublishedState,
    StateCategory,
    StateChange,
    StateCodes,
    StateLog,
    published_state,
)
from agent.oee.timeline import Boundary, PlannedTimeline
from agent.oee.totals import EpisodePiece, ShiftTotals, Stop
from agent.settings.machines import CalendarConfig, MachineConfig


class _CounterTag(Protocol):
    def counter_bits(self) -> int | None: ...


class OeeSettings(Protocol):
    """What an engine needs of the agent's settings (`AgentSettings` has it); a protocol so
    that the pure engine does not import the settings loader and, through it, the drivers."""

    @property
    def calendars(self) -> Sequence[CalendarConfig]: ...

    def tag(self, ref: str) -> tuple[object, _CounterTag] | None: ...


@dataclass(frozen=True, slots=True)
class OeeDiagnostics:
    """Readings an engine corrected or ignored (docs/oee.md; exported as metrics)."""

    clock_steps_back: int  # timestamps earlier than the latest seen, clamped
    ignored_bad: int  # bad-quality readings
    invalid_values: int  # counter readings that are not integers
    rollovers: int  # counter drops taken as a rollover
    resets: int  # counter drops taken as a PLC reset
    late_parts: int  # parts whose window was final when they were read: counted where read


class OeeEngine:
    """OEE of one machine: feed samples in time order, read OEE records.

    Drive it like this (live task and replay alike): `on_state` / `on_count` for each reading,
    `advance(now)` when time passes without readings, `report_shift()` / `report_rolling()`
    for the figures so far, `pop_finished()` for final shift records (each exactly once),
    `pop_state_changes()` for `R/{machine}/state`, and `finish(end)` at the end of recorded
    data; `on_product` for the product tag, if the machine has one. Timestamps that go
    backwards are clamped to the latest one seen and counted.
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
        self._microstop_threshold = float(machine.microstop_threshold)
        self._states = StateCodes(state=machine.state)
        rates = IdealRates(machine)
        # Rollover plausibility at the fastest product's rate: the most parts a drop may imply.
        self._counters = CounterReadings(
            counter_bits=counter_bits or {}, ideal_cycle_time=rates.fastest
        )
        self._history = (
            RollingHistory(length=float(machine.rolling_window)) if keep_history else None
        )
        self._attribution = PartsAttribution(rates=rates, history=self._history)
        self._spreads = self._attribution.counters
        self._product = NO_PRODUCT  # the product running (its key), part of the episode
        self._sink: list[int] | None = None  # the current window's part counts of _product
        self._timeline = PlannedTimeline(calendar=calendar)
        self._totals: ShiftTotals | None = None  # the current shift window's
        self._next_event = -math.inf  # next instant with work to do (calendar or threshold)
        self._now = -math.inf

        # Current episode.
        self._category: StateCategory | None = None  # None: no state sample yet (unobserved)
        self._code: object = None
        self._accounted_until = 0.0  # where the not yet accounted part of the episode starts
        self._stop: Stop | None = None  # the open stop (stop categories only)
        self._observed_from: float | None = None  # the first state sample

        # Outputs.
        self._final_records = FinalRecords(machine=machine)
        self._waiting = self._final_records.waiting  # the same list, for the hot path
        self._state_log = StateLog()
        self._finished = False

        # Diagnostics (see `diagnostics`).
        self.clock_steps_back = 0
        self.ignored_bad = 0

    @classmethod
    def from_settings(
        cls, settings: OeeSettings, machine: MachineConfig, *, keep_history: bool = True
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

    @property
    def observed_from(self) -> float | None:
        """The first good state sample's time; None before it."""
        return self._observed_from

    def advance(self, ts: float) -> None:
        """Time passed until `ts` without a reading: close planned intervals and shifts."""
        if ts < self._now:
            self.clock_steps_back += 1
            return
        self._now = ts
        if ts >= self._next_event:
            self._advance_to(ts)
        if self._history is not None:
            self._history.trim(ts)

    def on_state(self, ts: float, code: object, quality: str = "good") -> None:
        """A reading of the machine's state tag."""
        if quality == "bad":
            # A failed read says nothing about the machine: the last good state holds.
            self.ignored_bad += 1
            return
        if ts < self._now:
            self.clock_steps_back += 1
            ts = self._now
        self._now = ts
        if ts >= self._next_event:
            self._advance_to(ts)
        category = self._states.category(code)
        if category == self._category and code == self._code:
            return
        self._change(ts, category, code)

    def on_count(self, ts: float, which: CounterName, value: object, quality: str = "good") -> None:
        """A reading of a cumulative counter: which is 'total', 'reject' or 'good'."""
        slot = COUNTER_SLOTS.get(which)
        if slot is None:
            raise ValueError(f"unknown counter {which!r}; use 'total', 'reject' or 'good'")
        self.on_counter(slot, ts, value, quality)

    def on_counter(self, slot: int, ts: float, value: object, quality: str = "good") -> None:
        """`on_count` with the counter as a `CounterSlot` (the replay's fast entry)."""
        if quality == "bad":
            # Not zero, not a reset: a bad read is no reading at all.
            self.ignored_bad += 1
            return
        if ts < self._now:
            self.clock_steps_back += 1
            ts = self._now
        self._now = ts
        if ts >= self._next_event:
            self._advance_to(ts)
        parts = self._counters.parts(slot, ts, value)
        if parts is None:
            return
        counter = self._spreads[slot]
        since = counter.spread_from
        if counter.idle and (
            not parts or (self._category is RUNNING and self._accounted_until <= since)
        ):
            # The hot path: no parts (a stopped machine), or the machine ran all the time
            # since the counter's last reading, in one episode, so its parts belong to that
            # episode's window and product. Nothing else waits for attribution.
            counter.spread_from = ts
            if parts and self._timeline.in_planned:
                sink = self._sink
                if sink is None:
                    totals = self._totals
                    assert totals is not None
                    sink = self._sink = totals.parts_of(self._product)
                sink[slot] += parts
                if self._history is not None:
                    self._history.add_parts(since, ts, slot, parts, self._product)
        else:
            category = self._category
            window = self._totals if self._timeline.in_planned and category is not None else None
            running = self._accounted_until if category is RUNNING else None
            undecided = self._undecided_stop
            self._attribution.reading(slot, ts, parts, self._product, window, running, undecided)
        if self._waiting:
            self._release_final_records(ts)
            self._schedule()

    def on_product(self, ts: float, value: object, quality: str = "good") -> None:
        """A reading of the machine's product tag: a change of product ends the episode."""
        if quality == "bad":
            self.ignored_bad += 1  # as for the state: the last good product holds
            return
        self.advance(ts)  # a timestamp going back is counted, and the change made at `now`
        key = product_key(value)
        if key != self._product:
            self._account(self._now)  # what ran so far ran as the old product
            self._product = key
            self._sink = None

    # -- timeline --------------------------------------------------------------------------

    def _advance_to(self, t: float) -> None:
        """Process every calendar boundary and threshold crossing at or before `t`."""
        timeline = self._timeline
        if not timeline.started:
            timeline.start(t)
            self._schedule()
        while True:
            # The earliest of: a calendar boundary, the open stop reaching the threshold,
            # ended windows no longer waiting for their counters (ties in that order).
            stop = self._undecided_stop
            boundary = timeline.next_boundary
            threshold = math.inf if stop is None else stop.threshold_at
            deadline = self._final_records.deadline
            if boundary <= threshold and boundary <= deadline:
                if boundary > t:
                    return
                self._cross_boundary()
            elif threshold <= deadline:
                if threshold > t:
                    return
                assert stop is not None
                self._threshold_reached(stop)
            else:
                if deadline >= t:
                    return  # a reading at the deadline itself is still in time
                self._release_final_records(deadline)
            self._schedule()

    def _schedule(self) -> None:
        """Work out `_next_event`: the next calendar boundary, threshold crossing, or end of
        a final record's wait for the counters."""
        boundary = min(self._timeline.schedule(), self._final_records.deadline)
        stop = self._undecided_stop
        self._next_event = boundary if stop is None else min(boundary, stop.threshold_at)

    @property
    def _undecided_stop(self) -> Stop | None:
        """The open stop while it is shorter than the threshold (provisionally a microstop)."""
        stop = self._stop
        return stop if stop is not None and stop.microstop is None else None

    def _cross_boundary(self) -> None:
        """Step over the next calendar boundary, the time before it accounted."""
        timeline = self._timeline
        t = timeline.next_boundary
        # The time up to the boundary is accounted where it lies: in the planned interval that
        # ends, or (running time only, for the counters) outside planned time.
        self._account(t)
        self._sink = None
        crossed = timeline.cross()
        if crossed is Boundary.SHIFT_START:
            window = timeline.window
            assert window is not None
            observed = window.start if self._category is not None else None
            self._totals = ShiftTotals(window=window, observed_from=observed)
        elif crossed is Boundary.SHIFT_END:
            totals = self._totals
            assert totals is not None
            totals.observed_until = totals.window.end
            self._totals = None
            if totals.observed_from is not None:
                self._final_records.add(totals)
                self._release_final_records(t)

    def _account(self, t: float) -> None:
        """Account the open episode up to `t` (an episode or planned interval end, or a
        change of product)."""
        category = self._category
        since = self._accounted_until
        self._accounted_until = t
        if category is None or t <= since:
            return
        stop = self._stop if category >= UNPLANNED_STOP else None
        target = None
        if self._timeline.in_planned:
            target = self._totals
            assert target is not None
            if category == RUNNING:
                target.running_s += t - since
            elif stop is not None:
                stop.add(target, t - since)
            if self._history is not None:
                self._history.add_piece(EpisodePiece(since, t, category, stop))
        if category == RUNNING or (stop is not None and stop.microstop is not False):
            # Running time, or a stop that may turn out a microstop: counters may spread
            # their parts over it (docs/oee.md "Counters").
            self._attribution.add_piece(since, t, target, self._product, stop)

    def _threshold_reached(self, stop: Stop) -> None:
        """The open stop lasted `microstop_threshold`: it is an unplanned stop after all."""
        stop.reach_threshold()
        if self._category == UNPLANNED_STOP:
            self._state_log.record(stop.threshold_at, "unplanned_stop", self._code)
        self._attribution.stop_decided()
        self._release_final_records(stop.threshold_at)

    def _end_stop(self) -> None:
        stop = self._stop
        assert stop is not None
        self._stop = None
        if stop.microstop is None:
            # Ended before the threshold (else the crossing was processed first).
            stop.end_short()
            self._attribution.stop_ended_short(stop)
            self._attribution.stop_decided()
            self._release_final_records(self._now)

    def _change(self, ts: float, category: StateCategory, code: object) -> None:
        old = self._category
        if old is None:
            self._observed_from = ts
            if self._totals is not None:
                self._totals.observed_from = ts
        else:
            self._account(ts)
            if old >= UNPLANNED_STOP and category < UNPLANNED_STOP:
                self._end_stop()
        if category >= UNPLANNED_STOP and self._stop is None:
            self._stop = Stop(start=ts, threshold=self._microstop_threshold)
        self._category = category
        self._code = code
        self._accounted_until = ts
        self._state_log.record(ts, self._published_state(), code)
        self._schedule()

    def _published_state(self) -> PublishedState:
        return published_state(self._category, self._undecided_stop is not None)

    def _release_final_records(self, now: float, *, force: bool = False) -> None:
        counted_until = self._attribution.counted_until()
        self._final_records.release(self._undecided_stop, counted_until, now, force=force)

    # -- output ----------------------------------------------------------------------------

    def pop_finished(self) -> list[OeeRecord]:
        """Final records of shifts that ended since the last call (each exactly once)."""
        return self._final_records.pop()

    def pop_state_changes(self) -> list[StateChange]:
        """Changes of the published state since the last call (at most the last 1,024)."""
        return self._state_log.pop()

    @property
    def state(self) -> StateChange | None:
        """The current published state (stamped when it began), None before any state sample."""
        if self._category is None:
            return None
        return StateChange(self._state_log.since, self._published_state(), self._code)

    def current_window(self) -> ShiftWindow | None:
        """The shift window that contains `now`, if any."""
        return self._timeline.window

    @property
    def invalid_values(self) -> int:
        """Counter readings that are not integers (ignored)."""
        return self._counters.invalid_values

    @property
    def rollovers(self) -> int:
        """Counter drops taken as a rollover."""
        return self._counters.rollovers

    @property
    def resets(self) -> int:
        """Counter drops taken as a PLC reset."""
        return self._counters.resets

    def diagnostics(self) -> OeeDiagnostics:
        """What the engine corrected or ignored so far."""
        return OeeDiagnostics(
            clock_steps_back=self.clock_steps_back,
            ignored_bad=self.ignored_bad,
            invalid_values=self.invalid_values,
            rollovers=self.rollovers,
            resets=self.resets,
            late_parts=self._attribution.late_parts,
        )

    def report_shift(self) -> OeeRecord | None:
        """The record of the running shift so far (until `now`); None outside a shift."""
        totals = self._totals
        now = self._now
        if totals is None or totals.observed_from is None or now <= totals.observed_from:
            return None
        window = shift_window(totals.window, totals.observed_from, now)
        return oee_record(self.machine, window, totals.figures(self._stop, self._open_piece(now)))

    def report_rolling(self, seconds: float | None = None) -> OeeRecord | None:
        """The record of the last `seconds` (default `rolling_window`) until `now`."""
        history = self._history
        if history is None:
            raise RuntimeError("rolling windows need keep_history=True")
        length = history.length if seconds is None else min(float(seconds), history.length)
        now = self._now
        first = self._observed_from
        if first is None or now <= first:
            return None
        history.trim(now)
        start = max(now - length, first)
        figures = history.figures(start, self._open_piece(now))
        return oee_record(self.machine, rolling_window(length, start, now), figures)

    def finish(self, end: float | None = None) -> list[OeeRecord]:
        """End of the recorded data at `end`: close everything, return the remaining records."""
        if self._finished:
            return self.pop_finished()
        t = self._now if end is None or end < self._now else end
        if t == -math.inf:
            self._finished = True
            return []
        self._now = t
        self._advance_to(t)
        self._account(t)
        if self._undecided_stop is not None:
            # Still shorter than the threshold when the data ends: it stays a microstop.
            self._end_stop()
        totals = self._totals
        if totals is not None and totals.observed_from is not None:
            totals.observed_until = t
            self._final_records.add(totals)
        self._totals = None
        self._timeline.close()
        self._release_final_records(t, force=True)
        self._finished = True
        return self.pop_finished()

    # -- records ---------------------------------------------------------------------------

    def _open_piece(self, now: float) -> EpisodePiece | None:
        """The open episode's part not yet accounted, up to `now` (live reports only)."""
        category = self._category
        timeline = self._timeline
        if category is None or not timeline.in_planned or now <= self._accounted_until:
            return None
        end = min(now, timeline.planned_end)
        return EpisodePiece(self._accounted_until, end, category, self._stop)


def counter_widths(settings: OeeSettings, machine: MachineConfig) -> dict[str, int | None]:
    """Counter widths in bits from the config's tag types (None: unknown, e.g. OPC UA)."""
    widths: dict[str, int | None] = {}
    refs = (("total", machine.total_count), ("reject", machine.reject_count))
    for which, ref in (*refs, ("good", machine.good_count)):
        if ref is None:
            continue
        resolved = settings.tag(ref)
        widths[which] = None if resolved is None else resolved[1].counter_bits()
    return widths
