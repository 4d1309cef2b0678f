"""The OEE engine (ISO 22400-2): hand-computed tables, live behaviour, Hypothesis properties.

Every expected figure is worked out in the comments next to it. Unless a case says otherwise:
Monday 2026-03-02, calendar in UTC, shift "early" 06:00-14:00 with breaks 09:00-09:15 and
12:00-12:30, so planned time = 28,800 - 900 - 1,800 = 26,100 s; codes 1 running, 3 planned
stop, 2 and 4 unplanned stop, anything else unknown; microstop threshold 2 min.

Counter deltas are spread over the running time (and microstops) between their readings
(docs/oee.md "Counters"): a window's share of a delta is delta x its running time / all the
running time between the readings, rounded down, the leftover parts to the largest
remainders. Where the machine runs through a break, the break's share counts nowhere.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.oee.engine import OeeEngine, format_seconds
from agent.settings.machines import CalendarConfig, MachineConfig
from sync.events import parse_rfc3339, rfc3339

EARLY = {
    "name": "early",
    "start": "06:00",
    "end": "14:00",
    "days": "mon-fri",
    "breaks": [["09:00", "09:15"], ["12:00", "12:30"]],
}
LATE = {"name": "late", "start": "14:00", "end": "22:00", "days": "mon-fri"}
EARLY_NO_BREAKS = {"name": "early", "start": "06:00", "end": "14:00", "days": "mon-fri"}
KEYS = [
    "machine",
    "window",
    "availability",
    "performance",
    "quality",
    "oee",
    "planned_busy_time_s",
    "actual_production_time_s",
    "unplanned_downtime_s",
    "produced_quantity",
    "good_quantity",
    "reject_quantity",
    "microstops",
    "mtbf_s",
    "mttr_s",
    "performance_flagged",
]


def machine(**overrides: Any) -> MachineConfig:
    doc: dict[str, Any] = {
        "name": "press1",
        "state": {
            "tag": "press1/state_code",
            "running": [1],
            "planned_stop": [3],
            "unplanned_stop": [2, 4],
        },
        "total_count": "press1/total_count",
        "reject_count": "press1/reject_count",
        "ideal_cycle_time": "1s",
        "microstop_threshold": "2m",
        "calendar": "cal",
    }
    doc.update(overrides)
    return MachineConfig.model_validate(doc)


def calendar(*shifts: dict[str, Any], tz: str = "UTC") -> CalendarConfig:
    return CalendarConfig.model_validate({"name": "cal", "timezone": tz, "shifts": list(shifts)})


def at(text: str) -> float:
    """'07:00' -> Monday 2026-03-02 07:00Z; a full 'YYYY-MM-DDTHH:MM[:SS]' is taken as UTC."""
    if "T" not in text:
        text = "2026-03-02T" + text
    if text.count(":") == 1:
        text += ":00"
    return parse_rfc3339(text + "Z")


Event = tuple[Any, ...]


def feed(engine: OeeEngine, events: list[Event]) -> None:
    """('s', time, code[, quality]) is a state sample; ('c', time, which, value[, quality])."""
    for event in events:
        if event[0] == "s":
            engine.on_state(at(event[1]), event[2], *event[3:])
        elif event[0] == "c":
            engine.on_count(at(event[1]), event[2], event[3], *event[4:])
        else:
            engine.advance(at(event[1]))


def run(
    events: list[Event],
    end: str,
    *,
    cal: CalendarConfig | None = None,
    bits: dict[str, int | None] | None = None,
    **overrides: Any,
) -> tuple[list[dict[str, Any]], OeeEngine]:
    engine = OeeEngine(machine(**overrides), cal or calendar(EARLY), bits)
    feed(engine, events)
    return engine.finish(at(end)), engine


# ---------------------------------------------------------------------------------------------
# Hand-computed table

CASES = [
    pytest.param(
        # Faults 07:00-07:30 (1,800 s) and 10:00-10:10 (600 s, code 4): both >= 2 min.
        # down = 2,400; APT = 26,100 - 2,400 = 23,700; PBT = 26,100.
        # produced 12,000 + 13,000 = 25,000; reject 250; good 24,750.
        # The machine runs through both breaks, so the counters' parts made in them count
        # nowhere. total 0 -> 12,000 (06:00-10:00): running 11,700 s planned (06:00-07:00,
        # 07:30-09:00, 09:15-10:00) + 900 s in the break: 12,000 x 11,700/12,600 = 11,142.9
        # -> 11,143 (the break's 857.1 -> 857). 12,000 -> 25,000 (10:00-13:59:59): running
        # 6,600 + 5,399 = 11,999 s planned + 1,800 s in the break: 13,000 x 11,999/13,799 =
        # 11,304.2 -> 11,304 (the break's 1,695.8 -> 1,696). produced = 22,447.
        # reject 0 -> 250 (06:00-13:00): 20,100 s planned + 2,700 s in breaks: 250 x 20,100 /
        # 22,800 = 220.4 -> 220 (the breaks' 29.6 -> 30). good = 22,447 - 220 = 22,227.
        # availability = 23,700/26,100 = 0.908046; performance = 0.9 x 22,447/23,700;
        # quality = 22,227/22,447; MTBF = 23,700/2; MTTR = 2,400/2.
        [
            ("s", "06:00", 1),
            ("c", "06:00", "total", 0),
            ("c", "06:00", "reject", 0),
            ("s", "07:00", 2),
            ("s", "07:30", 1),
            ("s", "10:00", 4),
            ("c", "10:00", "total", 12000),
            ("s", "10:10", 1),
            ("c", "13:00", "reject", 250),
            ("c", "13:59:59", "total", 25000),
        ],
        {"ideal_cycle_time": "900ms"},
        {
            "planned_busy_time_s": 26100.0,
            "actual_production_time_s": 23700.0,
            "unplanned_downtime_s": 2400.0,
            "produced_quantity": 22447,
            "good_quantity": 22227,
            "reject_quantity": 220,
            "microstops": 0,
            "availability": 23700 / 26100,
            "performance": 0.9 * 22447 / 23700,
            "quality": 22227 / 22447,
            "oee": (23700 / 26100) * (0.9 * 22447 / 23700) * (22227 / 22447),
            "mtbf_s": 11850.0,
            "mttr_s": 1200.0,
            "performance_flagged": False,
        },
        id="plain-shift-breaks-downtime",
    ),
    pytest.param(
        # Changeover (code 3) 08:00-08:45 = 2,700 s; another 08:50-09:20 spans the break
        # 09:00-09:15: 600 + 300 = 900 s planned stop (the break is not counted twice).
        # PBT = 26,100 - 2,700 - 900 = 22,500 = APT; availability 1.
        # total 0 -> 18,000 (06:00-13:00): running 7,200 + 300 + 9,600 + 1,800 = 18,900 s
        # planned + 1,800 s through the 12:00 break: 18,000 x 18,900/20,700 = 16,434.8 ->
        # 16,435 (the break's 1,565.2 -> 1,565). performance = 1 s x 16,435/22,500; no
        # reject counted: quality 1.
        [
            ("s", "06:00", 1),
            ("c", "06:00", "total", 0),
            ("s", "08:00", 3),
            ("s", "08:45", 1),
            ("s", "08:50", 3),
            ("s", "09:20", 1),
            ("c", "13:00", "total", 18000),
        ],
        {},
        {
            "planned_busy_time_s": 22500.0,
            "actual_production_time_s": 22500.0,
            "unplanned_downtime_s": 0.0,
            "produced_quantity": 16435,
            "good_quantity": 16435,
            "reject_quantity": 0,
            "microstops": 0,
            "availability": 1.0,
            "performance": 16435 / 22500,
            "quality": 1.0,
            "oee": 16435 / 22500,
            "mtbf_s": None,
            "mttr_s": None,
        },
        id="changeover-planned-stop",
    ),
    pytest.param(
        # Threshold 120 s. Microstops (count as running): 60 s, 119 s, unknown code 99 for 30 s.
        # Stops: exactly 120 s (not shorter than the threshold); code 2 then 4 = one stop of
        # 60 + 90 = 150 s; unknown code 99 for 600 s. down = 120 + 150 + 600 = 870.
        # APT = 26,100 - 870 = 25,230; MTBF = 25,230/3 = 8,410; MTTR = 870/3 = 290.
        # total 0 -> 20,000 (06:00-13:00): running and microstops = 25,200 - 870 = 24,330 s,
        # of which 2,700 s in the breaks: 20,000 x 21,630/24,330 = 17,780.5 -> 17,781 (the
        # breaks' 2,219.5 -> 2,219). performance = 17,781/25,230. No reject counter
        # configured: every part is good.
        [
            ("s", "06:00", 1),
            ("c", "06:00", "total", 0),
            ("s", "07:00", 2),
            ("s", "07:01", 1),
            ("s", "07:10", 2),
            ("s", "07:11:59", 1),
            ("s", "07:20", 2),
            ("s", "07:22", 1),
            ("s", "07:30", 2),
            ("s", "07:31", 4),
            ("s", "07:32:30", 1),
            ("s", "08:00", 99),
            ("s", "08:00:30", 1),
            ("s", "08:10", 99),
            ("s", "08:20", 1),
            ("c", "13:00", "total", 20000),
        ],
        {"reject_count": None},
        {
            "planned_busy_time_s": 26100.0,
            "actual_production_time_s": 25230.0,
            "unplanned_downtime_s": 870.0,
            "produced_quantity": 17781,
            "good_quantity": 17781,
            "reject_quantity": 0,
            "microstops": 3,
            "availability": 25230 / 26100,
            "performance": 17781 / 25230,
            "quality": 1.0,
            "mtbf_s": 8410.0,
            "mttr_s": 290.0,
        },
        id="microstops-below-and-above-threshold",
    ),
    pytest.param(
        # 16-bit total, ideal cycle 0.1 s:
        # 65,000 -> 65,500: +500
        # 65,500 -> 200 (drop 65,300 > 32,768, implies 200 + 65,536 - 65,500 = 236 parts in
        #   60 s <= 16 + 10 x 60/0.1 = 6,016): rollover, +236
        # 200 -> 1,000: +800;  1,000 -> 5 (drop 995 < 32,768): PLC reset, +5
        # 5 -> 3,005: +3,000;  3,005 -> 40,005: +37,000 made 08:00-10:00, of which the 900 s
        #   of running in the 09:00 break count nowhere: 37,000 x 6,300/7,200 = 32,375
        # 40,005 -> 10 one second later (drop 39,995 > 32,768 but a rollover would mean 25,541
        #   parts in 1 s > 16 + 10 x 1/0.1 = 116): PLC reset, +10
        # 10 -> 11,000: +10,990.  produced = 500 + 236 + 800 + 5 + 3,000 + 32,375 + 10 +
        # 10,990 = 47,916; performance = 0.1 x 47,916/26,100.
        [
            ("s", "06:00", 1),
            ("c", "06:00", "total", 65000),
            ("c", "06:30", "total", 65500),
            ("c", "06:31", "total", 200),
            ("c", "07:00", "total", 1000),
            ("c", "07:01", "total", 5),
            ("c", "08:00", "total", 3005),
            ("c", "10:00", "total", 40005),
            ("c", "10:00:01", "total", 10),
            ("c", "11:00", "total", 11000),
        ],
        {"ideal_cycle_time": "100ms", "reject_count": None},
        {
            "planned_busy_time_s": 26100.0,
            "actual_production_time_s": 26100.0,
            "produced_quantity": 47916,
            "good_quantity": 47916,
            "performance": 0.1 * 47916 / 26100,
            "availability": 1.0,
            "quality": 1.0,
        },
        id="16bit-rollover-and-plc-reset",
    ),
    pytest.param(
        # Bad quality is ignored, never zero: the bad state 0 at 07:00 and the bad fault at
        # 09:30 change nothing; the bad counter 0s at 07:00 are no reset.
        # total 1,000 -> 1,500 (+500) -> 9,000 (+7,500); reject 10 -> 15: 5.
        # One real stop 10:00-10:05 = 300 s. APT = 25,800.
        # The +7,500 were made 08:00-13:00: 15,000 s running planned + 2,700 s through the
        # breaks: 7,500 x 15,000/17,700 = 6,355.9 -> 6,356 (the breaks' 1,144.1 -> 1,144).
        # produced = 500 + 6,356 = 6,856; good = 6,856 - 5 = 6,851.
        [
            ("s", "06:00", 1),
            ("c", "06:00", "total", 1000),
            ("c", "06:00", "reject", 10),
            ("s", "07:00", 0, "bad"),
            ("c", "07:00", "total", 0, "bad"),
            ("c", "07:00", "reject", 0, "bad"),
            ("c", "08:00", "total", 1500),
            ("c", "08:00", "reject", 15, "uncertain"),
            ("s", "09:30", 2, "bad"),
            ("s", "10:00", 2),
            ("s", "10:05", 1),
            ("c", "13:00", "total", 9000),
        ],
        {},
        {
            "planned_busy_time_s": 26100.0,
            "actual_production_time_s": 25800.0,
            "unplanned_downtime_s": 300.0,
            "produced_quantity": 6856,
            "reject_quantity": 5,
            "good_quantity": 6851,
            "quality": 6851 / 6856,
            "mtbf_s": 25800.0,
            "mttr_s": 300.0,
        },
        id="bad-quality-gaps",
    ),
    pytest.param(
        # Running all shift, counter stuck at 500: produced 0.
        # availability 1; performance = 1 x 0/26,100 = 0; quality 0/0 -> null; oee null.
        [("s", "06:00", 1), ("c", "06:00", "total", 500), ("c", "13:00", "total", 500)],
        {},
        {
            "planned_busy_time_s": 26100.0,
            "actual_production_time_s": 26100.0,
            "produced_quantity": 0,
            "availability": 1.0,
            "performance": 0.0,
            "quality": None,
            "oee": None,
            "performance_flagged": False,
        },
        id="zero-production",
    ),
    pytest.param(
        # Down all shift (one stop through both breaks): APT 0; availability 0/26,100 = 0;
        # performance x/0 -> null; quality null; oee null; MTBF = 0/1; MTTR = 26,100/1.
        [("s", "05:00", 2)],
        {},
        {
            "planned_busy_time_s": 26100.0,
            "actual_production_time_s": 0.0,
            "unplanned_downtime_s": 26100.0,
            "availability": 0.0,
            "performance": None,
            "quality": None,
            "oee": None,
            "mtbf_s": 0.0,
            "mttr_s": 26100.0,
            "microstops": 0,
        },
        id="down-all-shift",
    ),
    pytest.param(
        # Threshold 5 min. A fault 08:58-09:16 lasts 18 min (wall clock) across the break:
        # one unplanned stop whose planned part is 120 + 60 = 180 s.
        [("s", "06:00", 1), ("s", "08:58", 2), ("s", "09:16", 1)],
        {"microstop_threshold": "5m"},
        {
            "planned_busy_time_s": 26100.0,
            "actual_production_time_s": 25920.0,
            "unplanned_downtime_s": 180.0,
            "microstops": 0,
            "mtbf_s": 25920.0,
            "mttr_s": 180.0,
        },
        id="stop-across-a-break",
    ),
    pytest.param(
        # 32-bit reject counter wraps: 4,294,967,290 -> 5 = 5 + 2^32 - 4,294,967,290 = 11,
        # made 06:00-10:00: 13,500 s planned + 900 s in the break: 11 x 13,500/14,400 = 10.31
        # -> 10 (the break's 0.69 -> 1). total 0 -> 1,000 (06:00-11:00): 1,000 x 17,100/
        # 18,000 = 950. quality = (950 - 10)/950.
        [
            ("s", "06:00", 1),
            ("c", "06:00", "total", 0),
            ("c", "06:00", "reject", 4294967290),
            ("c", "10:00", "reject", 5),
            ("c", "11:00", "total", 1000),
        ],
        {},
        {"produced_quantity": 950, "reject_quantity": 10, "quality": 940 / 950},
        id="32bit-rollover",
    ),
]


@pytest.mark.parametrize(("events", "overrides", "expected"), CASES)
def test_table(events: list[Event], overrides: dict[str, Any], expected: dict[str, Any]) -> None:
    # The counters are a uint16 total and a uint32 reject counter (widths from the tag types).
    records, _ = run(events, "14:00", bits={"total": 16, "reject": 32}, **overrides)
    [record] = records
    assert list(record) == KEYS
    assert record["machine"] == "press1"
    assert record["window"] == {
        "kind": "shift",
        "name": "early",
        "start": "2026-03-02T06:00:00.000Z",
        "end": "2026-03-02T14:00:00.000Z",
        "complete": True,
        "shift_start": "2026-03-02T06:00:00.000Z",
        "shift_end": "2026-03-02T14:00:00.000Z",
    }
    for key, value in expected.items():
        if isinstance(value, float) and key not in ("mtbf_s", "mttr_s") and "_s" not in key:
            assert record[key] == pytest.approx(value, rel=1e-12), key
        else:
            assert record[key] == value, key
    if record["oee"] is not None:
        assert record["oee"] == record["availability"] * record["performance"] * record["quality"]


def test_rollover_and_reset_are_counted() -> None:
    _, engine = run(CASES[3].values[0], "14:00", bits={"total": 16}, reject_count=None)
    assert (engine.rollovers, engine.resets) == (1, 2)


def test_unknown_width_means_every_drop_is_a_reset() -> None:
    # OPC UA: no width. 65,500 -> 200 is a reset (+200), not a rollover.
    events: list[Event] = [
        ("s", "06:00", 1),
        ("c", "06:00", "total", 65000),
        ("c", "06:30", "total", 65500),
        ("c", "06:31", "total", 200),
    ]
    [record], engine = run(events, "14:00", bits={"total": None}, reject_count=None)
    assert record["produced_quantity"] == 500 + 200
    assert (engine.rollovers, engine.resets) == (0, 1)


def test_shift_across_midnight() -> None:
    # Night shift Monday 22:00 -> Tuesday 06:00 (mon only), break 02:00-02:30:
    # planned = 28,800 - 1,800 = 27,000 s. Fault Tue 05:00 -> 06:30: only 05:00-06:00 is
    # planned (3,600 s); what happens after 06:00 does not count.
    # Counts, where the machine ran: 0 -> 100 (21:00-21:59) before the shift: nowhere.
    # 100 -> 3,700 (21:59-23:00): 60 s before 22:00 and 3,600 s in the shift: 3,600 x
    # 3,600/3,660 = 3,541.0 -> 3,541. 3,700 -> 23,700 (23:00-05:00): 19,800 s planned,
    # 1,800 s through the break: 20,000 x 19,800/21,600 = 18,333.3 -> 18,333.
    # 23,700 -> 23,800 at 06:30: no running time since 05:00 (the fault), so the 100 belong
    # to the latest running time, 05:00 in the night shift - whose final record was made at
    # 06:10 (count_wait 10 min after its end): late parts count where they are read, 06:30,
    # in no shift. produced = 3,541 + 18,333 = 21,874.
    night = {
        "name": "night",
        "start": "22:00",
        "end": "06:00",
        "days": "mon",
        "breaks": [["02:00", "02:30"]],
    }
    events: list[Event] = [
        ("s", "21:00", 1),
        ("c", "21:00", "total", 0),
        ("c", "21:59", "total", 100),
        ("c", "23:00", "total", 3700),
        ("s", "2026-03-03T05:00", 2),
        ("c", "2026-03-03T05:00", "total", 23700),
        ("s", "2026-03-03T06:30", 1),
        ("c", "2026-03-03T06:30", "total", 23800),
    ]
    [record], engine = run(events, "2026-03-03T07:00", cal=calendar(night), reject_count=None)
    assert record["window"]["name"] == "night"
    assert record["window"]["start"] == "2026-03-02T22:00:00.000Z"
    assert record["window"]["end"] == "2026-03-03T06:00:00.000Z"
    assert record["window"]["complete"] is True
    assert record["planned_busy_time_s"] == 27000.0
    assert record["unplanned_downtime_s"] == 3600.0
    assert record["actual_production_time_s"] == 23400.0
    assert record["produced_quantity"] == 21874
    assert engine.diagnostics().late_parts == 100
    assert record["availability"] == 23400 / 27000
    assert record["performance"] == pytest.approx(21874 / 23400)
    assert record["performance_flagged"] is False
    assert (record["mtbf_s"], record["mttr_s"]) == (23400.0, 3600.0)


@pytest.mark.parametrize(
    ("first", "end", "shift_start", "hours"),
    [
        # Saturday 22:00 CET (21:00Z) -> Sunday 06:00 CEST (04:00Z): 7 h = 25,200 s.
        ("2026-03-28T20:00", "2026-03-29T05:00", "2026-03-28T21:00:00.000Z", 7),
        # Saturday 22:00 CEST (20:00Z) -> Sunday 06:00 CET (05:00Z): 9 h = 32,400 s.
        ("2026-10-24T19:00", "2026-10-25T06:00", "2026-10-24T20:00:00.000Z", 9),
    ],
)
def test_dst_night_in_berlin(first: str, end: str, shift_start: str, hours: int) -> None:
    # Running throughout; half the ideal output: produced = hours x 3,600 / 2 at 1 s, the
    # counter read at the shift's start and end (so that only the shift's parts are counted).
    night = {"name": "night", "start": "22:00", "end": "06:00", "days": "daily"}
    produced = hours * 3600 // 2
    shift_end = rfc3339(at(shift_start[:16]) + hours * 3600)[:16]
    events: list[Event] = [
        ("s", first, 1),
        ("c", shift_start[:16], "total", 0),
        ("c", shift_end, "total", produced),
    ]
    records, _ = run(events, end, cal=calendar(night, tz="Europe/Berlin"), reject_count=None)
    [record] = records
    assert record["window"]["shift_start"] == shift_start
    assert record["planned_busy_time_s"] == hours * 3600.0
    assert record["actual_production_time_s"] == hours * 3600.0
    assert record["availability"] == 1.0
    assert record["performance"] == 0.5
    assert record["oee"] == 0.5


def test_day_without_shifts_gives_no_record() -> None:
    # Saturday 2026-03-07, a mon-fri calendar: the machine runs and counts, nothing is planned.
    events: list[Event] = [
        ("s", "2026-03-07T05:00", 1),
        ("c", "2026-03-07T05:00", "total", 0),
        ("c", "2026-03-07T12:00", "total", 25000),
    ]
    engine = OeeEngine(machine(), calendar(EARLY))
    feed(engine, events)
    assert engine.report_shift() is None
    assert engine.finish(at("2026-03-07T20:00")) == []


def test_shift_cut_short_by_the_data() -> None:
    # First state at 07:00, data ends at 12:00: planned 07:00-09:00 + 09:15-12:00 =
    # 7,200 + 9,900 = 17,100 s. The time before the first sample is not observed.
    events: list[Event] = [("s", "07:00", 1), ("c", "07:00", "total", 0)]
    [record], _ = run(events, "12:00")
    assert record["window"] == {
        "kind": "shift",
        "name": "early",
        "start": "2026-03-02T07:00:00.000Z",
        "end": "2026-03-02T12:00:00.000Z",
        "complete": False,
        "shift_start": "2026-03-02T06:00:00.000Z",
        "shift_end": "2026-03-02T14:00:00.000Z",
    }
    assert record["planned_busy_time_s"] == 17100.0


# ---------------------------------------------------------------------------------------------
# Live behaviour


def test_microstop_across_shift_end_delays_the_final_record() -> None:
    # early 06:00-14:00 then late 14:00-22:00, no breaks. A 90 s fault 13:59:00-14:00:30
    # stays a microstop in both shifts: 60 s running + 1 microstop in early, 30 s in late.
    engine = OeeEngine(machine(), calendar(EARLY_NO_BREAKS, LATE))
    feed(engine, [("s", "06:00", 1), ("s", "13:59", 2), ("a", "14:00")])
    assert engine.pop_finished() == []  # the stop may still become an unplanned stop
    feed(engine, [("s", "14:00:30", 1)])
    [early] = engine.pop_finished()
    assert early["window"]["name"] == "early"
    assert (early["actual_production_time_s"], early["microstops"]) == (28800.0, 1)
    assert early["unplanned_downtime_s"] == 0.0
    [late] = engine.finish(at("22:00"))
    assert (late["actual_production_time_s"], late["microstops"]) == (28800.0, 1)


def test_stop_across_shift_end_counts_in_both_shifts() -> None:
    # Fault 13:59 -> 14:05 (6 min >= 2 min): early has 60 s down and 1 stop, late 300 s and 1.
    # The early record is final once the stop reaches the threshold at 14:01.
    engine = OeeEngine(machine(), calendar(EARLY_NO_BREAKS, LATE))
    feed(engine, [("s", "06:00", 1), ("s", "13:59", 2), ("a", "14:00:59")])
    assert engine.pop_finished() == []
    feed(engine, [("a", "14:01")])
    [early] = engine.pop_finished()
    assert (early["unplanned_downtime_s"], early["mttr_s"]) == (60.0, 60.0)
    feed(engine, [("s", "14:05", 1)])
    [late] = engine.finish(at("22:00"))
    assert (late["unplanned_downtime_s"], late["mttr_s"]) == (300.0, 300.0)


def test_provisional_microstop_in_the_live_report() -> None:
    engine = OeeEngine(machine(), calendar(EARLY))
    feed(engine, [("s", "06:00", 1), ("s", "07:00", 2), ("a", "07:01")])
    # 60 s into a fault: provisionally a microstop (running time), as the state topic says.
    record = engine.report_shift()
    assert record is not None
    assert (record["actual_production_time_s"], record["unplanned_downtime_s"]) == (3660.0, 0.0)
    assert record["microstops"] == 1
    assert record["window"]["end"] == "2026-03-02T07:01:00.000Z"
    assert record["window"]["complete"] is False
    feed(engine, [("a", "07:03")])
    # 3 min: an unplanned stop from its start: 180 s down, no microstop.
    record = engine.report_shift()
    assert record is not None
    assert (record["actual_production_time_s"], record["unplanned_downtime_s"]) == (3600.0, 180.0)
    assert (record["microstops"], record["mttr_s"]) == (0, 180.0)


def test_published_state_changes() -> None:
    engine = OeeEngine(machine(), calendar(EARLY))
    assert engine.state is None
    feed(
        engine,
        [
            ("s", "06:00", 1),
            ("s", "06:00:05", 1),  # unchanged: nothing published
            ("s", "07:00", 2),
            ("s", "07:00:30", 4),
            ("a", "07:02"),
            ("s", "07:05", 1),
            ("s", "07:06", 42),
        ],
    )
    changes = [(c.ts - at("06:00"), c.state, c.code) for c in engine.pop_state_changes()]
    assert changes == [
        (0.0, "running", 1),
        (3600.0, "microstop", 2),
        (3630.0, "microstop", 4),
        (3720.0, "unplanned_stop", 4),  # reached 2 min at 07:02
        (3900.0, "running", 1),
        (3960.0, "unknown", 42),
    ]
    assert engine.pop_state_changes() == []
    state = engine.state
    assert state is not None
    assert state.payload() == {"ts": "2026-03-02T07:06:00.000Z", "state": "unknown", "code": 42}


def test_rolling_window() -> None:
    # At 10:00 the last hour is 09:00-10:00: planned 09:15-10:00 = 2,700 s (break before).
    # Fault 09:30-09:40 = 600 s down; APT 2,100. 9,000 -> 10,800 (+1,800) was made over the
    # running time 08:00-09:30 and 09:40-09:50 = 6,000 s: 08:00-09:00 3,600 s (1,080
    # parts), the break 09:00-09:15 900 s (270, count nowhere), 09:15-09:30 900 s (270),
    # 09:40-09:50 600 s (180). In the window: 270 + 180 = 450 (the 08:00 delta lies before
    # it). performance = 450/2,100.
    engine = OeeEngine(machine(reject_count=None), calendar(EARLY))
    feed(
        engine,
        [
            ("s", "06:00", 1),
            ("c", "06:00", "total", 0),
            ("c", "08:00", "total", 9000),
            ("s", "09:30", 2),
            ("s", "09:40", 1),
            ("c", "09:50", "total", 10800),
            ("a", "10:00"),
        ],
    )
    record = engine.report_rolling()
    assert record is not None
    assert record["window"] == {
        "kind": "rolling",
        "name": "last_1h",
        "start": "2026-03-02T09:00:00.000Z",
        "end": "2026-03-02T10:00:00.000Z",
        "complete": True,
    }
    assert record["planned_busy_time_s"] == 2700.0
    assert record["unplanned_downtime_s"] == 600.0
    assert record["actual_production_time_s"] == 2100.0
    assert record["produced_quantity"] == 450
    assert record["performance"] == pytest.approx(450 / 2100)
    # The shift so far: 06:00-10:00 minus the break = 13,500 s; 600 s down; parts 9,000 +
    # 1,080 + 270 + 180 = 10,530.
    shift = engine.report_shift()
    assert shift is not None
    assert (shift["planned_busy_time_s"], shift["produced_quantity"]) == (13500.0, 10530)
    # After the shift the rolling window still sees 13:00-14:00, then nothing planned.
    feed(engine, [("a", "14:30")])
    late = engine.report_rolling()
    assert late is not None
    assert late["planned_busy_time_s"] == 1800.0  # 13:30-14:00
    feed(engine, [("a", "16:00")])
    idle = engine.report_rolling()
    assert idle is not None
    assert (idle["planned_busy_time_s"], idle["availability"], idle["oee"]) == (0.0, None, None)


def test_clock_going_backwards_never_makes_negative_time() -> None:
    engine = OeeEngine(machine(), calendar(EARLY))
    feed(engine, [("s", "07:00", 1), ("s", "06:59", 2), ("s", "07:10", 1), ("a", "07:05")])
    assert engine.clock_steps_back == 2
    [record] = engine.finish(at("14:00"))
    # The fault is clamped to 07:00 and lasts until 07:10: 600 s; nothing is negative.
    assert record["unplanned_downtime_s"] == 600.0
    assert min(v for v in record.values() if isinstance(v, float)) >= 0


def test_reject_above_produced_is_capped() -> None:
    # Counters sampled at different instants: 12 rejects vs 10 parts in this window.
    events: list[Event] = [
        ("s", "06:00", 1),
        ("c", "06:00", "total", 0),
        ("c", "06:00", "reject", 0),
        ("c", "07:00", "total", 10),
        ("c", "07:00", "reject", 12),
    ]
    [record], _ = run(events, "14:00")
    assert (record["produced_quantity"], record["reject_quantity"]) == (10, 10)
    assert (record["good_quantity"], record["quality"]) == (0, 0.0)


def test_good_counter_instead_of_reject() -> None:
    # Read at 09:00, the start of the break: all parts were made 06:00-09:00, in the shift.
    events: list[Event] = [
        ("s", "06:00", 1),
        ("c", "06:00", "total", 0),
        ("c", "06:00", "good", 0),
        ("c", "09:00", "total", 1000),
        ("c", "09:00", "good", 950),
    ]
    [record], _ = run(events, "14:00", reject_count=None, good_count="press1/good_count")
    assert (record["good_quantity"], record["reject_quantity"], record["quality"]) == (
        950,
        50,
        0.95,
    )


def test_bool_and_string_codes() -> None:
    state = {"tag": "m/s", "running": [True], "planned_stop": ["SETUP"], "unplanned_stop": [False]}
    engine = OeeEngine(machine(state=state), calendar(EARLY))
    # 1 is not True here: code 1 on a bool mapping is unknown.
    feed(engine, [("s", "06:00", True), ("s", "07:00", "SETUP"), ("s", "08:00", 1)])
    states = [c.state for c in engine.pop_state_changes()]
    assert states == ["running", "planned_stop", "unknown"]


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (3600, 5400, 90, 0.5, 86400)] == [
        "1h",
        "1h30m",
        "1m30s",
        "500ms",
        "1d",
    ]


# ---------------------------------------------------------------------------------------------
# Properties

START = at("05:00")
END = at("15:00")
CODES = [1, 1, 1, 1, 2, 4, 3, 99]


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    """Episodes of whole seconds from 05:00, counter increments with each state sample."""
    threshold = draw(st.sampled_from(["0s", "30s", "2m", "5m"]))
    ict = draw(st.sampled_from(["500ms", "1s", "2s"]))
    durations = draw(st.lists(st.integers(1, 2400), min_size=1, max_size=40))
    codes = draw(st.lists(st.sampled_from(CODES), min_size=len(durations), max_size=len(durations)))
    made = draw(st.lists(st.integers(0, 3000), min_size=len(durations), max_size=len(durations)))
    rejected = [draw(st.integers(0, m)) for m in made]
    t = START
    samples: list[tuple[float, str, Any]] = []
    total = reject = 0
    for duration, code, parts, bad in zip(durations, codes, made, rejected, strict=True):
        if t >= END:
            break
        samples.append((t, "state", code))
        total += parts
        reject += bad
        samples.append((t, "total", total))
        samples.append((t, "reject", reject))
        t += duration
    return {"threshold": threshold, "ict": ict, "samples": samples}


def replay_scenario(
    scenario: dict[str, Any], samples: list[tuple[float, str, Any]], end: float
) -> list[dict[str, Any]]:
    engine = OeeEngine(
        machine(microstop_threshold=scenario["threshold"], ideal_cycle_time=scenario["ict"]),
        calendar(EARLY),
    )
    for ts, kind, value in samples:
        if kind == "state":
            engine.on_state(ts, value)
        else:
            engine.on_count(ts, kind, value)
    return engine.finish(end)


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(scenarios())
def test_factors_are_fractions_and_oee_is_their_product(scenario: dict[str, Any]) -> None:
    for record in replay_scenario(scenario, scenario["samples"], END):
        for key in ("availability", "quality"):
            assert record[key] is None or 0.0 <= record[key] <= 1.0
        performance = record["performance"]
        assert performance is None or performance >= 0.0
        assert record["performance_flagged"] == (performance is not None and performance > 1.0)
        factors = (record["availability"], performance, record["quality"])
        if None in factors:
            assert record["oee"] is None
        else:
            assert record["oee"] == factors[0] * factors[1] * factors[2]
        assert record["planned_busy_time_s"] == round(
            record["actual_production_time_s"] + record["unplanned_downtime_s"], 3
        )
        assert record["good_quantity"] + record["reject_quantity"] == record["produced_quantity"]
        assert min(record[k] for k in KEYS[6:13]) >= 0


@PROPERTY
@given(scenarios(), st.data())
def test_splitting_a_shift_in_two_replays_adds_up(
    scenario: dict[str, Any], data: st.DataObject
) -> None:
    samples = scenario["samples"]
    # Split where a running episode starts, so that no stop is cut in two (a cut stop would be
    # two shorter stops, which may each be a microstop: a different, correct answer).
    cuts = [ts for ts, kind, value in samples if kind == "state" and value == 1 and ts > START]
    assume(cuts)
    cut = data.draw(st.sampled_from(cuts))
    whole = replay_scenario(scenario, samples, END)
    # The first replay ends with the readings at the cut: the parts made before the cut are
    # read there (a delta belongs to the running time before its reading).
    first = replay_scenario(scenario, [s for s in samples if s[0] <= cut], cut)
    # The second replay starts with the readings as of the cut (what a restarted gateway's
    # first poll sees): the counters' values at the cut become its baselines.
    before = {kind: value for ts, kind, value in samples if ts <= cut and kind != "state"}
    baseline = [(cut, kind, value) for kind, value in before.items()]
    second = replay_scenario(scenario, baseline + [s for s in samples if s[0] >= cut], END)
    assert len(whole) <= 1
    keys = [
        "planned_busy_time_s",
        "actual_production_time_s",
        "unplanned_downtime_s",
        "produced_quantity",
        "good_quantity",
        "reject_quantity",
        "microstops",
    ]
    total = {key: sum(record[key] for record in first + second) for key in keys}
    expected = {key: sum(record[key] for record in whole) for key in keys}
    assert total == expected


@PROPERTY
@given(scenarios(), st.integers(1, 5000), st.data())
def test_more_good_parts_never_lower_quality(
    scenario: dict[str, Any], extra: int, data: st.DataObject
) -> None:
    samples = scenario["samples"]
    totals = [i for i, sample in enumerate(samples) if sample[1] == "total"]
    start = data.draw(st.sampled_from(totals))
    more = [
        (ts, kind, value + extra if kind == "total" and i >= start else value)
        for i, (ts, kind, value) in enumerate(samples)
    ]
    for base, better in zip(
        replay_scenario(scenario, samples, END), replay_scenario(scenario, more, END), strict=True
    ):
        if base["quality"] is not None:
            assert better["quality"] is not None
            assert better["quality"] >= base["quality"]
