"""Shift calendars (`[[calendars]]`, docs/configuration.md) turned into concrete UTC windows.

Pure: no I/O, no clock reads. Everything is epoch seconds (UTC floats) so that the OEE engine's
per-sample path never touches a datetime.

Rules (docs/oee.md has the full list):

* A shift belongs to the weekday it starts on; an end at or before the start crosses midnight.
* Local start, local end and every break bound are converted to UTC *independently*, so a
  22:00-06:00 shift lasts 7 h on the night clocks spring forward and 9 h when they fall back.
* A wall time that does not exist (skipped by spring-forward) is read with the offset in force
  before the change (02:30 in Europe/Berlin becomes 03:30 CEST); an ambiguous wall time (repeated
  by fall-back) is its first occurrence. This is what ``zoneinfo`` does with ``fold=0``.
* Days whose weekday no shift lists yield no window: no planned time, no OEE record.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from agent.settings.machines import CalendarConfig, ShiftConfig

Interval = tuple[float, float]
TimeLike = float | int | datetime


@dataclass(frozen=True, slots=True)
class ShiftWindow:
    """One occurrence of a shift: UTC bounds (epoch s), breaks, and planned time between them."""

    name: str
    day: date  # local calendar day the shift starts on
    start: float
    end: float
    breaks: tuple[Interval, ...]  # clipped to [start, end], sorted, non-overlapping
    planned: tuple[Interval, ...]  # [start, end) minus the breaks; the calendar's planned time

    @property
    def start_utc(self) -> datetime:
        """Start as an aware UTC datetime."""
        return datetime.fromtimestamp(self.start, tz=UTC)

    @property
    def planned_seconds(self) -> float:
        """Shift time minus breaks, in seconds."""
        return sum(end - start for start, end in self.planned)


def _epoch(value: TimeLike) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime: give an aware (UTC) datetime or epoch seconds")
        return value.timestamp()
    return float(value)


def _local_to_epoch(day: date, minutes: int, zone: zoneinfo.ZoneInfo) -> float:
    """Wall time `minutes` after local midnight of `day` (may pass 1440) -> epoch seconds."""
    days, rest = divmod(minutes, 1440)
    moment = day + timedelta(days=days)
    # fold=0: a skipped wall time uses the pre-transition offset, a repeated one its first pass.
    local = datetime(
        moment.year, moment.month, moment.day, rest // 60, rest % 60, tzinfo=zone, fold=0
    )
    return local.timestamp()


def _window(shift: ShiftConfig, day: date, zone: zoneinfo.ZoneInfo) -> ShiftWindow:
    start_min, end_min = shift.minutes
    start = _local_to_epoch(day, start_min, zone)
    end = _local_to_epoch(day, end_min, zone)
    breaks: list[Interval] = []
    for b_start_min, b_end_min in sorted(shift.break_minutes):
        b_start = max(start, _local_to_epoch(day, b_start_min, zone))
        b_end = min(end, _local_to_epoch(day, b_end_min, zone))
        if b_end <= b_start:
            continue  # a break inside the hour a spring-forward skipped has no length
        if breaks and b_start < breaks[-1][1]:
            b_start = breaks[-1][1]  # overlapping breaks (refused by `check`) are merged
            if b_end <= b_start:
                continue
        breaks.append((b_start, b_end))
    planned: list[Interval] = []
    cursor = start
    for b_start, b_end in breaks:
        if b_start > cursor:
            planned.append((cursor, b_start))
        cursor = max(cursor, b_end)
    if end > cursor:
        planned.append((cursor, end))
    return ShiftWindow(shift.name, day, start, end, tuple(breaks), tuple(planned))


def _day_windows(calendar: CalendarConfig, day: date, zone: zoneinfo.ZoneInfo) -> list[ShiftWindow]:
    weekday = day.weekday()
    found = [_window(shift, day, zone) for shift in calendar.shifts if weekday in shift.weekdays]
    found.sort(key=lambda window: window.start)
    return found


def iter_shift_windows(calendar: CalendarConfig, start: TimeLike) -> Iterator[ShiftWindow]:
    """Every shift window ending after `start`, in time order, without end (none if no shifts)."""
    if not calendar.shifts:
        return
    zone = zoneinfo.ZoneInfo(calendar.timezone)
    begin = _epoch(start)
    # A shift is shorter than 24 h and belongs to its start day, so starting two local days
    # early cannot miss a window that is still running at `begin`.
    day = datetime.fromtimestamp(begin, tz=zone).date() - timedelta(days=2)
    previous_end = float("-inf")
    while True:
        for window in _day_windows(calendar, day, zone):
            if window.end <= begin or window.end <= previous_end:
                continue
            if window.start < previous_end:
                # Overlapping shifts are refused by `check`; if one slips through, the later
                # one starts where the earlier ends so that time is never counted twice.
                window = _clip_start(window, previous_end)
            previous_end = window.end
            yield window
        day += timedelta(days=1)


def _clip_start(window: ShiftWindow, start: float) -> ShiftWindow:
    breaks = tuple((max(s, start), e) for s, e in window.breaks if e > start)
    planned = tuple((max(s, start), e) for s, e in window.planned if e > start)
    return ShiftWindow(window.name, window.day, start, window.end, breaks, planned)


def shift_windows(calendar: CalendarConfig, start: TimeLike, end: TimeLike) -> list[ShiftWindow]:
    """Shift windows overlapping [start, end), in time order."""
    stop = _epoch(end)
    found: list[ShiftWindow] = []
    for window in iter_shift_windows(calendar, start):
        if window.start >= stop:
            break
        found.append(window)
    return found


def window_at(calendar: CalendarConfig, ts: TimeLike) -> ShiftWindow | None:
    """The shift window containing `ts` (start <= ts < end), or None outside every shift."""
    moment = _epoch(ts)
    for window in iter_shift_windows(calendar, moment):
        return window if window.start <= moment else None
    return None
