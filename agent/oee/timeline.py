"""The calendar as a timeline: shift windows and their planned intervals, boundary by boundary.

Pure: no I/O, no clock reads. The engine asks for the next boundary, accounts the time up to
it, and then crosses it (docs/oee.md "Calendar and time zones").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from enum import Enum

from agent.oee.calendar import Interval, ShiftWindow, iter_shift_windows
from agent.settings.machines import CalendarConfig


class Boundary(Enum):
    """What happens at a calendar boundary."""

    SHIFT_START = "shift start"
    PLANNED_START = "planned interval start"
    PLANNED_END = "planned interval end"  # a break or the shift end follows
    SHIFT_END = "shift end"


class PlannedTimeline:
    """Walks a calendar's shift windows and their planned intervals (shift minus breaks)."""

    __slots__ = (
        "_calendar",
        "_index",
        "_planned",
        "_upcoming",
        "_windows",
        "in_planned",
        "next_boundary",
        "planned_end",
        "window",
    )

    def __init__(self, *, calendar: CalendarConfig) -> None:
        self._calendar = calendar
        # Prepared lazily from the first timestamp seen (`start`).
        self._windows: Iterator[ShiftWindow] | None = None
        self._upcoming: ShiftWindow | None = None
        self.window: ShiftWindow | None = None  # the shift window we are in, if any
        self._planned: tuple[Interval, ...] = ()  # its planned intervals
        self._index = 0  # the planned interval that is open or comes next
        self.in_planned = False  # inside a planned interval (planned time)
        self.planned_end = math.inf  # end of the open planned interval
        self.next_boundary = -math.inf  # when the next boundary comes (after `schedule`)

    @property
    def started(self) -> bool:
        """Whether `start` was called."""
        return self._windows is not None

    def start(self, t: float) -> None:
        """Begin the walk with the first shift window that ends after `t`."""
        self._windows = iter_shift_windows(self._calendar, t)
        self._upcoming = next(self._windows, None)

    def _next_kind(self) -> Boundary:
        if self.window is None:
            return Boundary.SHIFT_START
        if self.in_planned:
            return Boundary.PLANNED_END
        if self._index < len(self._planned):
            return Boundary.PLANNED_START
        return Boundary.SHIFT_END

    def schedule(self) -> float:
        """Work out when the next boundary comes (`next_boundary`) and return it."""
        kind = self._next_kind()
        if kind is Boundary.SHIFT_START:
            upcoming = self._upcoming
            self.next_boundary = math.inf if upcoming is None else upcoming.start
        elif kind is Boundary.PLANNED_END:
            self.next_boundary = self.planned_end
        elif kind is Boundary.PLANNED_START:
            self.next_boundary = self._planned[self._index][0]
        else:
            assert self.window is not None
            self.next_boundary = self.window.end
        return self.next_boundary

    def cross(self) -> Boundary:
        """Step over the next boundary (the caller accounted the time before it); say which."""
        kind = self._next_kind()
        if kind is Boundary.SHIFT_START:
            window = self._upcoming
            assert window is not None
            assert self._windows is not None
            self.window = window
            self._planned = window.planned
            self._index = 0
            self.in_planned = False
            self._upcoming = next(self._windows, None)
        elif kind is Boundary.PLANNED_END:
            self.in_planned = False
            self._index += 1
        elif kind is Boundary.PLANNED_START:
            self.in_planned = True
            self.planned_end = self._planned[self._index][1]
        else:
            self.window = None
            self._planned = ()
        return kind

    def close(self) -> None:
        """The data ended: no shift and no planned time any more."""
        self.window = None
        self.in_planned = False
