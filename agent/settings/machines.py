"""`[[machines]]` (one OEE calculation each, docs/oee.md) and `[[calendars]]` (shift plans)."""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Iterator
from datetime import time
from typing import Annotated

from pydantic import (
    Field,
    field_validator,
)

from agent.settings.common import TagRef
from drivers.config import (
    ConfigModel,
    Duration,
    Name,
    Problem,
    as_written,
)

StateCode = int | str | bool
PositiveDuration = Annotated[Duration, Field(gt=0)]


class MachineStateConfig(ConfigModel):
    """Which tag holds the machine state and which codes mean what (others are 'unknown')."""

    tag: TagRef = Field(
        description="device/tag holding the state code.", examples=["press1/state_code"]
    )
    running: tuple[StateCode, ...] = Field(description="Codes meaning running.")
    planned_stop: tuple[StateCode, ...] = Field(
        default=(), description="Codes meaning a planned stop (changeover, maintenance)."
    )
    unplanned_stop: tuple[StateCode, ...] = Field(
        default=(), description="Codes meaning an unplanned stop (fault, starved, blocked)."
    )


class MachineConfig(ConfigModel):
    """One OEE calculation (ISO 22400-2)."""

    name: Name = Field(description="Machine name; topics R/{machine}/state and R/{machine}/oee.")
    state: MachineStateConfig
    total_count: TagRef = Field(
        description="Cumulative produced-parts counter (device/tag).",
        examples=["press1/total_count"],
    )
    reject_count: TagRef | None = Field(
        default=None, description="Cumulative reject counter (or give good_count)."
    )
    good_count: TagRef | None = Field(
        default=None, description="Cumulative good-parts counter (or give reject_count)."
    )
    ideal_cycle_time: Duration = Field(
        gt=0, description="Ideal time per part (of a product ideal_cycle_times does not list)."
    )
    product: TagRef | None = Field(
        default=None,
        description="device/tag holding the product (or recipe) being made; parts are "
        "counted per product, and a product change ends an episode (docs/oee.md).",
    )
    ideal_cycle_times: dict[str, PositiveDuration] = Field(
        default_factory=dict,
        description="Ideal time per part for each product value, e.g. "
        '{ "1" = "1.2s", "2" = "800ms" }; keys are the product tag\'s values written as text '
        "(1, ABC, true). Needs product.",
    )
    microstop_threshold: Duration = Field(
        default=as_written("0s"),
        ge=0,
        description="Stops shorter than this count as running (a performance loss, not "
        "downtime) and are counted as microstops; 0s: none.",
    )
    calendar: Name = Field(description="Name of a [[calendars]] entry.")
    count_wait: Duration = Field(
        default=as_written("10m"),
        ge=0,
        description="How long a shift's final record waits after the shift end for each "
        "counter's next reading (it carries the parts made before the end); parts that "
        "arrive later count where their reading lands (docs/oee.md).",
    )
    publish_interval: Duration = Field(
        default=as_written("60s"), gt=0, description="How often R/{machine}/oee is published."
    )
    rolling_window: Duration = Field(
        default=as_written("1h"), gt=0, description="Length of the rolling OEE window."
    )

    @field_validator("ideal_cycle_times")
    @classmethod
    def _check_products(cls, value: dict[str, float]) -> dict[str, float]:
        for key in value:
            if not key.strip():
                raise ValueError("a product value cannot be empty")
        return value

    def ideal_cycle_time_of(self, product: str) -> float:
        """The ideal time per part of `product` (its product key, agent/oee/products.py)."""
        return float(self.ideal_cycle_times.get(product, self.ideal_cycle_time))


_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_days(spec: str | tuple[str, ...]) -> frozenset[int]:
    """Parse ``"mon-fri"``, ``"mon,wed,fri"``, ``"daily"`` or a list of names into 0..6."""
    items = (spec,) if isinstance(spec, str) else spec
    days: set[int] = set()
    for item in items:
        for part in str(item).lower().replace(" ", "").split(","):
            if part in ("daily", "all"):
                days.update(range(7))
                continue
            if "-" in part:
                first, _, last = part.partition("-")
                if first not in _WEEKDAYS or last not in _WEEKDAYS:
                    raise ValueError(f"invalid day range {part!r}; write e.g. 'mon-fri'")
                start, end = _WEEKDAYS.index(first), _WEEKDAYS.index(last)
                span = (end - start) % 7
                days.update((start + i) % 7 for i in range(span + 1))
                continue
            if part not in _WEEKDAYS:
                raise ValueError(
                    f"invalid day {part!r}; use mon tue wed thu fri sat sun, ranges "
                    "like 'mon-fri', lists like 'mon,wed' or 'daily'"
                )
            days.add(_WEEKDAYS.index(part))
    if not days:
        raise ValueError("no days given")
    return frozenset(days)


def parse_clock(text: str) -> int:
    """Parse ``"HH:MM"`` (00:00..24:00) into minutes after midnight."""
    match = re.fullmatch(r"([01]\d|2[0-4]):([0-5]\d)", text)
    if match is None or (match.group(1) == "24" and match.group(2) != "00"):
        raise ValueError(f"invalid time {text!r}; write HH:MM, e.g. '06:00' or '24:00'")
    return int(match.group(1)) * 60 + int(match.group(2))


def _span(start: int, end: int) -> tuple[int, int]:
    # A shift whose end is not after its start crosses midnight.
    return (start, end if end > start else end + 1440)


class ShiftConfig(ConfigModel):
    """A shift: local start and end time, weekdays, breaks (all in the calendar's zone)."""

    name: Name = Field(description="Shift name, reported in the OEE window.")
    start: str = Field(description="Local start time HH:MM.", examples=["06:00"])
    end: str = Field(
        description="Local end time HH:MM; an end at or before the start crosses midnight.",
        examples=["14:00"],
    )
    days: str | tuple[str, ...] = Field(
        default="mon-fri",
        description="Weekdays the shift starts on: 'mon-fri', 'mon,wed', 'daily', or a list.",
    )
    breaks: tuple[tuple[str, str], ...] = Field(
        default=(), description="Planned breaks inside the shift, [[start, end], ...]."
    )

    @field_validator("start", "end")
    @classmethod
    def _check_clock(cls, value: str) -> str:
        parse_clock(value)
        return value

    @field_validator("days")
    @classmethod
    def _check_days(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        parse_days(value)
        return value

    @field_validator("breaks")
    @classmethod
    def _check_breaks(cls, value: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        for start, end in value:
            parse_clock(start)
            parse_clock(end)
        return value

    @property
    def weekdays(self) -> frozenset[int]:
        """Weekdays (0 = Monday) the shift starts on."""
        return parse_days(self.days)

    @property
    def minutes(self) -> tuple[int, int]:
        """(start, end) in minutes after the start day's midnight; end may pass 1440."""
        return _span(parse_clock(self.start), parse_clock(self.end))

    @property
    def break_minutes(self) -> tuple[tuple[int, int], ...]:
        """Breaks as (start, end) minutes after the shift day's midnight."""
        shift_start, _ = self.minutes
        spans = []
        for start_text, end_text in self.breaks:
            start, end = parse_clock(start_text), parse_clock(end_text)
            if start < shift_start:  # the break is after midnight in a night shift
                start, end = start + 1440, end + 1440
            spans.append(_span(start, end) if end <= start else (start, end))
        return tuple(spans)

    @property
    def start_time(self) -> time:
        """Local start time."""
        minutes = parse_clock(self.start)
        return time(minutes // 60 % 24, minutes % 60)

    def problems(self) -> Iterator[Problem]:
        """Cross-field problems of the shift."""
        if parse_clock(self.start) == 1440:
            yield (("start",), "a shift cannot start at 24:00; write 00:00")
        if parse_clock(self.start) == parse_clock(self.end) % 1440:
            yield (("end",), "the shift has no length (end equals start)")
        shift_start, shift_end = self.minutes
        previous: tuple[int, int] | None = None
        for index, (start, end) in enumerate(sorted(self.break_minutes)):
            if end <= start or start < shift_start or end > shift_end:
                yield (
                    ("breaks", index),
                    f"break {self.breaks[index][0]}-{self.breaks[index][1]} is not inside "
                    f"the shift {self.start}-{self.end}",
                )
            if previous is not None and start < previous[1]:
                yield (("breaks", index), "breaks overlap")
            previous = (start, end)


class CalendarConfig(ConfigModel):
    """Shift plan of one or more machines, in one IANA time zone."""

    name: Name = Field(description="Calendar name, referenced by machines.")
    timezone: str = Field(
        default="UTC",
        description="IANA time zone of the shift times; DST is handled.",
        examples=["Europe/Berlin"],
    )
    shifts: tuple[ShiftConfig, ...] = Field(default=(), description="The shifts.")

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name like 'Europe/Berlin'"
            ) from exc
        return value

    def problems(self) -> Iterator[Problem]:
        """Unique shift names; shifts never overlap within the week."""
        seen: dict[str, int] = {}
        week: list[tuple[int, int, int]] = []
        for index, shift in enumerate(self.shifts):
            for loc, reason in shift.problems():
                yield (("shifts", index, *loc), reason)
            if shift.name in seen:
                yield (
                    ("shifts", index, "name"),
                    f"duplicate shift name {shift.name!r} (also shifts[{seen[shift.name]}])",
                )
            seen.setdefault(shift.name, index)
            start, end = shift.minutes
            for day in shift.weekdays:
                week.append((day * 1440 + start, day * 1440 + end, index))
        week_len = 7 * 1440
        for i, (a_start, a_end, a_index) in enumerate(week):
            for b_start, b_end, b_index in week[i + 1 :]:
                if a_index == b_index and (a_start, a_end) == (b_start, b_end):
                    continue
                for shift_by in (-week_len, 0, week_len):
                    if a_start < b_end + shift_by and b_start + shift_by < a_end:
                        first, second = sorted((a_index, b_index))
                        yield (
                            ("shifts", second),
                            f"overlaps shifts[{first}] ({self.shifts[first].name})"
                            if first != second
                            else "overlaps itself on consecutive days (longer than 24 h?)",
                        )
                        break
