"""Shift calendars -> UTC windows: breaks, midnight, DST in Europe/Berlin, days without shifts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from agent.oee.calendar import iter_shift_windows, shift_windows, window_at
from agent.settings.machines import CalendarConfig
from sync.events import parse_rfc3339


def cal(shifts: list[dict[str, Any]], tz: str = "UTC") -> CalendarConfig:
    return CalendarConfig.model_validate({"name": "cal", "timezone": tz, "shifts": shifts})


def utc(text: str) -> float:
    return parse_rfc3339(text if text.endswith("Z") else text + "Z")


EARLY = {
    "name": "early",
    "start": "06:00",
    "end": "14:00",
    "days": "mon-fri",
    "breaks": [["09:00", "09:15"], ["12:00", "12:30"]],
}
NIGHT_BERLIN = {"name": "night", "start": "22:00", "end": "06:00", "days": "daily"}


def test_plain_shift_with_breaks() -> None:
    # Monday 2026-03-02, UTC: 06:00-14:00 minus 09:00-09:15 and 12:00-12:30.
    [window] = shift_windows(cal([EARLY]), utc("2026-03-02T00:00:00"), utc("2026-03-03T00:00:00"))
    assert window.name == "early"
    assert (window.start, window.end) == (utc("2026-03-02T06:00:00"), utc("2026-03-02T14:00:00"))
    assert window.breaks == (
        (utc("2026-03-02T09:00:00"), utc("2026-03-02T09:15:00")),
        (utc("2026-03-02T12:00:00"), utc("2026-03-02T12:30:00")),
    )
    assert window.planned == (
        (utc("2026-03-02T06:00:00"), utc("2026-03-02T09:00:00")),
        (utc("2026-03-02T09:15:00"), utc("2026-03-02T12:00:00")),
        (utc("2026-03-02T12:30:00"), utc("2026-03-02T14:00:00")),
    )
    # 8 h = 28,800 s - 900 s - 1,800 s = 26,100 s of planned time.
    assert window.planned_seconds == 26100
    assert window.start_utc == datetime(2026, 3, 2, 6, tzinfo=UTC)


def test_spring_forward_night_lasts_7_hours() -> None:
    # Europe/Berlin springs forward on Sunday 2026-03-29 at 02:00 CET -> 03:00 CEST.
    # The night shift starting Saturday 22:00 CET (21:00Z) ends Sunday 06:00 CEST (04:00Z).
    calendar = cal([NIGHT_BERLIN], "Europe/Berlin")
    window = window_at(calendar, utc("2026-03-28T23:00:00"))
    assert window is not None
    assert window.start == utc("2026-03-28T21:00:00")
    assert window.end == utc("2026-03-29T04:00:00")
    assert window.end - window.start == 7 * 3600
    assert window.day.isoformat() == "2026-03-28"


def test_fall_back_night_lasts_9_hours() -> None:
    # Falls back on Sunday 2026-10-25 at 03:00 CEST -> 02:00 CET.
    # Saturday 22:00 CEST (20:00Z) until Sunday 06:00 CET (05:00Z) = 9 h.
    calendar = cal([NIGHT_BERLIN], "Europe/Berlin")
    window = window_at(calendar, utc("2026-10-25T01:30:00"))
    assert window is not None
    assert (window.start, window.end) == (utc("2026-10-24T20:00:00"), utc("2026-10-25T05:00:00"))
    assert window.end - window.start == 9 * 3600


def test_day_shift_on_dst_day_keeps_8_hours() -> None:
    shift = {"name": "early", "start": "06:00", "end": "14:00", "days": "daily"}
    [window] = shift_windows(
        cal([shift], "Europe/Berlin"), utc("2026-03-29T00:00:00"), utc("2026-03-29T12:00:00")
    )
    # 06:00 CEST = 04:00Z ... 14:00 CEST = 12:00Z.
    assert (window.start, window.end) == (utc("2026-03-29T04:00:00"), utc("2026-03-29T12:00:00"))


def test_break_in_the_skipped_hour_and_in_the_repeated_hour() -> None:
    shift = {**NIGHT_BERLIN, "breaks": [["02:00", "02:30"]]}
    calendar = cal([shift], "Europe/Berlin")
    spring = window_at(calendar, utc("2026-03-28T22:00:00"))
    assert spring is not None
    # 02:00 and 02:30 do not exist that night; read with the CET offset they are 01:00Z and
    # 01:30Z (= 03:00 and 03:30 CEST): the break keeps its 30 minutes.
    assert spring.breaks == ((utc("2026-03-29T01:00:00"), utc("2026-03-29T01:30:00")),)
    assert spring.planned_seconds == 7 * 3600 - 1800
    autumn = window_at(calendar, utc("2026-10-24T22:00:00"))
    assert autumn is not None
    # 02:00-02:30 happens twice; the first pass (CEST, +02:00) is taken: 00:00Z-00:30Z.
    assert autumn.breaks == ((utc("2026-10-25T00:00:00"), utc("2026-10-25T00:30:00")),)
    assert autumn.planned_seconds == 9 * 3600 - 1800


def test_shift_crossing_midnight_belongs_to_its_start_day() -> None:
    # Only Friday's night: Friday 22:00 -> Saturday 06:00; nothing starts on Saturday.
    night = {
        "name": "night",
        "start": "22:00",
        "end": "06:00",
        "days": "fri",
        "breaks": [["23:30", "00:30"]],
    }
    windows = shift_windows(cal([night]), utc("2026-03-02T00:00:00"), utc("2026-03-09T00:00:00"))
    assert len(windows) == 1
    [window] = windows
    assert window.day.isoformat() == "2026-03-06"  # a Friday
    assert (window.start, window.end) == (utc("2026-03-06T22:00:00"), utc("2026-03-07T06:00:00"))
    # The break crosses midnight too: one hour.
    assert window.breaks == ((utc("2026-03-06T23:30:00"), utc("2026-03-07T00:30:00")),)
    assert window_at(cal([night]), utc("2026-03-07T05:59:59")) == window
    assert window_at(cal([night]), utc("2026-03-07T06:00:00")) is None  # end is exclusive


def test_days_without_shifts_have_no_window() -> None:
    # Saturday and Sunday of a mon-fri calendar: no window, no planned time.
    assert shift_windows(cal([EARLY]), utc("2026-03-07T00:00:00"), utc("2026-03-09T00:00:00")) == []
    assert window_at(cal([EARLY]), utc("2026-03-07T10:00:00")) is None


def test_window_at_inside_a_break_and_outside() -> None:
    calendar = cal([EARLY])
    window = window_at(calendar, utc("2026-03-02T09:05:00"))
    assert window is not None
    assert window.name == "early"  # a break is inside the shift
    assert window_at(calendar, utc("2026-03-02T05:59:59")) is None
    assert window_at(calendar, datetime(2026, 3, 2, 13, 59, tzinfo=UTC)) == window


def test_end_at_24_00_and_ordering_of_several_shifts() -> None:
    shifts = [
        {"name": "late", "start": "14:00", "end": "24:00", "days": "daily"},
        {"name": "early", "start": "04:00", "end": "14:00", "days": "daily"},
    ]
    windows = shift_windows(cal(shifts), utc("2026-03-02T00:00:00"), utc("2026-03-03T00:00:00"))
    assert [w.name for w in windows] == ["early", "late"]
    assert windows[1].end == utc("2026-03-03T00:00:00")


def test_iteration_is_endless_in_time_order_and_empty_without_shifts() -> None:
    windows = iter_shift_windows(cal([EARLY]), utc("2026-03-06T10:00:00"))
    starts = [next(windows).start for _ in range(3)]
    # Friday's (running at 10:00), then Monday's and Tuesday's: the weekend has none.
    assert starts == [
        utc("2026-03-06T06:00:00"),
        utc("2026-03-09T06:00:00"),
        utc("2026-03-10T06:00:00"),
    ]
    assert list(iter_shift_windows(cal([]), 0.0)) == []


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        shift_windows(cal([EARLY]), datetime(2026, 3, 2), datetime(2026, 3, 3))
