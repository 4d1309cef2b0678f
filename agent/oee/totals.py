"""Running totals of a shift window, and the stops that feed them (docs/oee.md "Stops and
microstops"). Pure: no I/O, no clock reads."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

from agent.oee.calendar import ShiftWindow
from agent.oee.records import WindowFigures
from agent.oee.states import PLANNED_STOP, RUNNING, StateCategory


class Stop:
    """One stop: a run of unplanned-stop / unknown codes, from leaving production to returning.

    `microstop` is None while the stop is shorter than the threshold (undecided: provisionally
    a microstop), True once it ended short, False once it reached the threshold (an unplanned
    stop). Its time waits in each shift's `undecided_s` until it is decided.
    """

    __slots__ = ("microstop", "shifts", "start", "threshold_at")

    def __init__(self, *, start: float, threshold: float) -> None:
        if threshold < 0:
            raise ValueError(f"microstop threshold must be >= 0, not {threshold}")
        self.start = start
        self.threshold_at = start + threshold  # when it becomes an unplanned stop
        # Threshold 0: every stop is an unplanned stop from the start.
        self.microstop: bool | None = None if threshold > 0 else False
        self.shifts: list[ShiftTotals] = []  # shift windows it has planned time in, in order

    def in_shift(self, totals: ShiftTotals) -> bool:
        """Whether the stop has planned time in that shift window."""
        return any(shift is totals for shift in self.shifts)

    def add(self, totals: ShiftTotals, span: float) -> None:
        """`span` seconds of this stop in the planned time of `totals`."""
        if self.microstop is None:
            totals.undecided_s += span
        else:
            totals.downtime_s += span
        if not self.shifts or self.shifts[-1] is not totals:
            # A stop across a shift end counts once in each shift it has planned time in.
            self.shifts.append(totals)
            if self.microstop is False:
                totals.stops += 1

    def reach_threshold(self) -> None:
        """It lasted `microstop_threshold`: an unplanned stop from its start after all."""
        self.microstop = False
        for totals in self.shifts:
            totals.downtime_s += totals.undecided_s
            totals.undecided_s = 0.0
            totals.stops += 1

    def end_short(self) -> None:
        """It ended before the threshold: a microstop, whose time counts as running."""
        self.microstop = True
        for totals in self.shifts:
            totals.microstop_s += totals.undecided_s
            totals.undecided_s = 0.0
            totals.microstops += 1


class EpisodePiece(NamedTuple):
    """A stretch of one episode (one state) in planned time, accounted or still open."""

    start: float
    end: float
    category: StateCategory
    stop: Stop | None  # the stop it belongs to (stop categories only)


class ShiftTotals:
    """Running totals of one shift window (planned time only)."""

    __slots__ = (
        "downtime_s",
        "final",
        "microstop_s",
        "microstops",
        "observed_from",
        "observed_until",
        "parts",
        "running_s",
        "stops",
        "undecided_s",
        "window",
    )

    def __init__(self, *, window: ShiftWindow, observed_from: float | None) -> None:
        self.window = window
        self.observed_from = observed_from  # first observed instant in the window (None: not yet)
        self.observed_until = math.inf  # set when the window closes
        self.running_s = 0.0
        self.microstop_s = 0.0  # microstops (count as running)
        self.downtime_s = 0.0  # unplanned stops and unknown states that reached the threshold
        self.undecided_s = 0.0  # the open stop's time while it is still shorter than the threshold
        self.stops = 0
        self.microstops = 0
        # Per product key: produced, reject, good parts (indexed by CounterSlot).
        self.parts: dict[str, list[int]] = {}
        self.final = False  # its final record is made: its figures never change again

    def parts_of(self, product: str) -> list[int]:
        """The part counts of `product` (produced, reject, good), to add to."""
        counts = self.parts.get(product)
        if counts is None:
            counts = self.parts[product] = [0, 0, 0]
        return counts

    def figures(self, current_stop: Stop | None, open_piece: EpisodePiece | None) -> WindowFigures:
        """The figures so far: an undecided `current_stop` counts as a microstop, and the
        `open_piece` (the episode since its last accounting, live reports only) is added."""
        running = self.running_s + self.microstop_s
        microstops = self.microstops
        stop = current_stop
        if stop is not None and stop.microstop is None and stop.in_shift(self):
            # Provisionally a microstop: its time counts as running, and it counts once.
            running += self.undecided_s
            microstops += 1
        figures = WindowFigures(
            running_s=running,
            downtime_s=self.downtime_s,
            stops=self.stops,
            microstops=microstops,
            parts={product: (c[0], c[1], c[2]) for product, c in self.parts.items()},
        )
        return figures if open_piece is None else self._with_open_piece(figures, open_piece)

    def _with_open_piece(self, figures: WindowFigures, piece: EpisodePiece) -> WindowFigures:
        span = piece.end - piece.start
        if piece.category == RUNNING:
            return replace(figures, running_s=figures.running_s + span)
        if piece.category == PLANNED_STOP:
            return figures
        stop = piece.stop
        assert stop is not None
        new = 0 if stop.in_shift(self) else 1  # not yet counted in this shift
        if stop.microstop is False:
            return replace(figures, downtime_s=figures.downtime_s + span, stops=figures.stops + new)
        return replace(
            figures, running_s=figures.running_s + span, microstops=figures.microstops + new
        )
