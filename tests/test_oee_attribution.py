"""Counts where they were made, and per-product ideal rates (docs/oee.md "Counters",
"Products", "Final records"): hand-computed tables and a Hypothesis property.

Unless a case says otherwise: Monday 2026-03-02, UTC, shift "early" 06:00-14:00 with breaks
09:00-09:15 and 12:00-12:30; codes 1 running, 3 planned stop, 2 and 4 unplanned stop;
microstop threshold 2 min; ideal cycle time 1 s.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.oee.attribution import MAX_PIECES, split_whole
from agent.oee.counters import REJECT
from agent.oee.engine import OeeEngine
from tests.test_oee import EARLY, EARLY_NO_BREAKS, LATE, Event, at, calendar, feed, machine

PRODUCTS = {"product": "press1/product_code", "ideal_cycle_times": {"1": "1.2s", "2": "800ms"}}


def records_of(
    events: list[Event], end: str, *shifts: dict[str, Any], **overrides: Any
) -> tuple[dict[str, dict[str, Any]], OeeEngine]:
    """Feed `events` (see tests/test_oee.py `feed`; ('p', time, value) is a product reading)
    and return the final records by shift name, and the engine."""
    engine = OeeEngine(machine(**overrides), calendar(*(shifts or (EARLY,))))
    for event in events:
        if event[0] == "p":
            engine.on_product(at(event[1]), event[2])
        else:
            feed(engine, [event])
    return {r["window"]["name"]: r for r in engine.finish(at(end))}, engine


# ---------------------------------------------------------------------------------------------
# The same production, read every 1 s, 1 min and 10 min

# Running from 06:00; fault 07:00-07:30 (down); stopped for the 09:00-09:15 break (code 3);
# a 60 s microstop at 10:00; running through the 12:00-12:30 break; until 14:10.
STATES = [("06:00", 1), ("07:00", 2), ("07:30", 1), ("09:00", 3), ("09:15", 1)]
STATES += [("10:00", 2), ("10:01", 1)]
START, STOP = at("06:00"), at("14:10")


def made_by(t: float) -> int:
    """Parts made before `t`: one per second of running (codes 1; none while stopped)."""
    changes = [(at(when), code) for when, code in STATES] + [(STOP, 0)]
    made = 0
    for (since, code), (until, _) in itertools.pairwise(changes):
        if code == 1 and t > since:
            made += int(min(t, until) - since)
    return made


@pytest.mark.parametrize("every", [1, 60, 600], ids=["1s", "1min", "10min"])
def test_any_reading_interval_gives_the_same_quantities(every: int) -> None:
    # Parts made in planned time, one per running second: 06:00-07:00 3,600 + 07:30-09:00
    # 5,400 + 09:15-10:00 2,700 + 10:01-12:00 7,140 + 12:30-14:00 5,400 = 24,240 (the 1,800
    # made in the 12:00 break count nowhere). Rejects: one per 50 parts made, so the counter
    # reads made // 50: 06:00-09:00 9,000 // 50 = 180; 09:15-12:00 18,840 // 50 - 180 = 196;
    # 12:30-14:00 26,040 // 50 - 20,640 // 50 = 520 - 412 = 108; 180 + 196 + 108 = 484.
    # Every reading interval lies in one window, or (09:10-09:20) its running time does.
    events: list[Event] = [("s", when, code) for when, code in STATES]
    t = START
    while t <= STOP:
        made = made_by(t)
        events += [("c", t, "total", made), ("c", t, "reject", made // 50)]
        t += every
    events.sort(key=lambda event: at(event[1]) if isinstance(event[1], str) else event[1])
    engine = OeeEngine(machine(), calendar(EARLY))
    for event in events:
        ts = at(event[1]) if isinstance(event[1], str) else event[1]
        if event[0] == "s":
            engine.on_state(ts, event[2])
        else:
            engine.on_count(ts, event[2], event[3])
    [record] = engine.finish(STOP)
    assert (record["produced_quantity"], record["reject_quantity"]) == (24240, 484)
    assert record["good_quantity"] == 24240 - 484
    # APT = the running time + the 60 s microstop; down = the 07:00 fault.
    assert (record["actual_production_time_s"], record["unplanned_downtime_s"]) == (24300.0, 1800.0)
    assert record["performance"] == pytest.approx(24240 / 24300, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Readings exactly on break starts, shift ends and midnight

NIGHT_TUE = {"name": "night", "start": "00:00", "end": "06:00", "days": "tue"}
LATE_TO_MIDNIGHT = {"name": "late", "start": "16:00", "end": "00:00", "days": "mon"}


@pytest.mark.parametrize(
    ("events", "end", "shifts", "expected"),
    [
        pytest.param(
            # Read at 09:00, the break's first instant: the 3,600 parts were made 08:00-09:00.
            [
                ("s", "06:00", 1),
                ("c", "08:00", "total", 0),
                ("s", "09:00", 3),
                ("c", "09:00", "total", 3600),
                ("s", "09:15", 1),
            ],
            "14:00",
            (EARLY,),
            {"early": 3600},
            id="break-start",
        ),
        pytest.param(
            # Read at 09:15, the break's end, running through it: 08:45-09:00 (900 s) is in
            # the shift, 09:00-09:15 (900 s) in the break: 1,800 x 900/1,800 = 900.
            [("s", "06:00", 1), ("c", "08:45", "total", 0), ("c", "09:15", "total", 1800)],
            "14:00",
            (EARLY,),
            {"early": 900},
            id="break-end",
        ),
        pytest.param(
            # Read at 14:00, the end of early and start of late: the parts are early's.
            [("s", "06:00", 1), ("c", "13:00", "total", 0), ("c", "14:00", "total", 3600)],
            "15:00",
            (EARLY_NO_BREAKS, LATE),
            {"early": 3600, "late": 0},
            id="shift-end",
        ),
        pytest.param(
            # late ends at midnight, night starts there: read at 00:00 and 01:00.
            [
                ("s", "22:00", 1),
                ("c", "23:00", "total", 0),
                ("c", "2026-03-03T00:00", "total", 3600),
                ("c", "2026-03-03T01:00", "total", 7200),
            ],
            "2026-03-03T06:00",
            (LATE_TO_MIDNIGHT, NIGHT_TUE),
            {"late": 3600, "night": 3600},
            id="midnight",
        ),
        pytest.param(
            # Read at midnight after running outside every shift (Monday 22:00-24:00, with
            # only the Tuesday night shift): those parts count nowhere, not in night.
            [
                ("s", "22:00", 1),
                ("c", "22:00", "total", 0),
                ("c", "2026-03-03T00:00", "total", 7200),
                ("c", "2026-03-03T00:30", "total", 9000),
            ],
            "2026-03-03T06:00",
            (NIGHT_TUE,),
            {"night": 1800},
            id="midnight-after-no-shift",
        ),
    ],
)
def test_readings_on_boundaries(
    events: list[Event], end: str, shifts: tuple[dict[str, Any], ...], expected: dict[str, int]
) -> None:
    found, _ = records_of(events, end, *shifts, reject_count=None)
    assert {name: r["produced_quantity"] for name, r in found.items()} == expected


EARLY_ONE_BREAK = {**EARLY, "breaks": [["09:00", "09:15"]]}


@pytest.mark.parametrize(
    ("events", "wait", "expected"),
    [
        (
            [("c", "08:50", "total", 5000), ("s", "09:00", 3), ("c", "09:00", "total", 5600)],
            "10m",
            {"early": 600, "late": 0},
        ),
        (
            [
                ("s", "09:00", 3),
                ("c", "09:10", "total", 5600),
                ("s", "09:15", 1),
                ("c", "09:20", "total", 5900),
            ],
            "10m",
            {"early": 300, "late": 0},
        ),
        (
            [("c", "08:50", "total", 5000), ("c", "09:20", "total", 6800)],
            "10m",
            {"early": 900, "late": 0},
        ),
        (
            [("c", "13:55", "total", 20000), ("c", "14:05", "total", 20600)],
            "10m",
            {"early": 300, "late": 300},
        ),
        (
            [("c", "13:50", "total", 20000), ("c", "14:05", "total", 21000)],
            "10m",
            {"early": 667, "late": 333},
        ),
        (
            [("c", "13:50", "total", 3000), ("s", "13:50", 2), ("c", "14:20", "total", 3010)],
            "20m",
            {"early": 10, "late": 0},
        ),
        (
            [("c", "13:50", "total", 3000), ("s", "13:50", 2), ("c", "14:20", "total", 3010)],
            "10m",
            {"early": 0, "late": 10},
        ),
    ],
    ids=[
        "break-start",
        "after-break",
        "through-break",
        "shift-end",
        "rounding",
        "no-running-waiting",
        "no-running-late",
    ],
)
def test_docs_where_the_parts_go(events: list[Event], wait: str, expected: dict[str, int]) -> None:
    # docs/oee.md "Worked example: where the parts go", line by line (each line's first
    # reading is the counter's baseline, so a shift's parts are that line's only).
    found, _ = records_of(
        [("s", "06:00", 1), *events],
        "22:00",
        EARLY_ONE_BREAK,
        LATE,
        reject_count=None,
        count_wait=wait,
    )
    assert {name: r["produced_quantity"] for name, r in found.items()} == expected


def test_docs_worked_example_machine_stopping_for_its_breaks() -> None:
    # docs/oee.md "Worked example": the figures of tests/test_oee.py's first table case, but
    # the machine stops for its breaks, so every delta was made in planned time.
    events: list[Event] = [
        ("s", "06:00", 1),
        ("c", "06:00", "total", 0),
        ("c", "06:00", "reject", 0),
        ("s", "07:00", 2),
        ("s", "07:30", 1),
        ("s", "09:00", 3),
        ("s", "09:15", 1),
        ("s", "10:00", 4),
        ("c", "10:00", "total", 12000),
        ("s", "10:10", 1),
        ("s", "12:00", 3),
        ("s", "12:30", 1),
        ("c", "13:00", "reject", 250),
        ("c", "13:59:59", "total", 25000),
    ]
    found, _ = records_of(events, "14:00", ideal_cycle_time="900ms")
    record = found["early"]
    assert (record["planned_busy_time_s"], record["actual_production_time_s"]) == (26100, 23700)
    assert (record["produced_quantity"], record["reject_quantity"]) == (25000, 250)
    assert record["good_quantity"] == 24750
    assert record["performance"] == pytest.approx(0.9 * 25000 / 23700, abs=1e-12)
    assert (record["mtbf_s"], record["mttr_s"]) == (11850.0, 1200.0)


# ---------------------------------------------------------------------------------------------
# Products


def test_two_products_performance_is_sum_of_ideal_times_over_apt() -> None:
    # Product 1 (1.2 s) 06:00-09:00: 8,100 parts, 81 rejects. Changeover to product 2
    # (0.8 s) in the break (stopped, code 3). Product 2 09:15-12:00 and 12:30-14:00
    # (stopped in the 12:00 break): 17,000 parts, 170 rejects.
    # APT = 10,800 + 9,900 + 5,400 = 26,100 = PBT.
    # performance = (1.2 x 8,100 + 0.8 x 17,000) / 26,100 = (9,720 + 13,600) / 26,100.
    events: list[Event] = [
        ("p", "06:00", 1),
        ("s", "06:00", 1),
        ("c", "06:00", "total", 0),
        ("c", "06:00", "reject", 0),
        ("s", "09:00", 3),
        ("c", "09:00", "total", 8100),
        ("c", "09:00", "reject", 81),
        ("p", "09:05", 2),
        ("s", "09:15", 1),
        ("s", "12:00", 3),
        ("s", "12:30", 1),
        ("c", "14:00", "total", 25100),
        ("c", "14:00", "reject", 251),
    ]
    found, _ = records_of(events, "14:00", **PRODUCTS)
    record = found["early"]
    assert record["actual_production_time_s"] == 26100.0
    assert record["performance"] == pytest.approx((1.2 * 8100 + 0.8 * 17000) / 26100, abs=1e-9)
    assert record["products"] == {
        "1": {"produced": 8100, "good": 8019, "reject": 81, "ideal_cycle_time_s": 1.2},
        "2": {"produced": 17000, "good": 16830, "reject": 170, "ideal_cycle_time_s": 0.8},
    }
    assert (record["produced_quantity"], record["reject_quantity"]) == (25100, 251)
    assert record["good_quantity"] == 8019 + 16830
    assert list(record)[-1] == "products"  # an addition after the contract's keys


def test_product_change_at_a_break_splits_a_reading_by_ideal_rate() -> None:
    # Product 1 (1.2 s) until the break, changeover in it (09:05), product 2 (0.8 s) from
    # 09:15, each exactly at its ideal rate. Read at 06:00 (0), 08:30 (9,000 s / 1.2 = 7,500)
    # and 09:30: 08:30-09:00 made 1,800 / 1.2 = 1,500 of product 1 and 09:15-09:30
    # 900 / 0.8 = 1,125 of product 2, so the counter reads 7,500 + 2,625 = 10,125. The
    # reading's 2,625 are split by what each running time makes at its ideal rate:
    # 1,800 s x 1/1.2 = 1,500 and 900 s x 1/0.8 = 1,125 (in seconds at the default 1 s).
    # performance = (1.2 x 9,000 + 0.8 x 1,125) / (10,800 + 900) = 11,700 / 11,700 = 1.
    # (Split by time alone it would be 1,750 / 875 and a flagged 11,800 / 11,700.)
    events: list[Event] = [
        ("p", "06:00", 1),
        ("s", "06:00", 1),
        ("c", "06:00", "total", 0),
        ("c", "08:30", "total", 7500),
        ("s", "09:00", 3),
        ("p", "09:05", 2),
        ("s", "09:15", 1),
        ("c", "09:30", "total", 10125),
    ]
    found, _ = records_of(events, "09:30", reject_count=None, **PRODUCTS)
    record = found["early"]
    assert {key: p["produced"] for key, p in record["products"].items()} == {"1": 9000, "2": 1125}
    assert record["performance"] == 1.0
    assert record["performance_flagged"] is False


def test_unknown_product_uses_the_default_and_no_reading_is_null() -> None:
    # Parts before the first product reading are under "null"; product 7 is not in the
    # table: both at the default 1 s. 06:00-07:00 1,000 parts (null), 07:00-08:00 2,000 (7).
    events: list[Event] = [
        ("s", "06:00", 1),
        ("c", "06:00", "total", 0),
        ("p", "07:00", 7),
        ("c", "07:00", "total", 1000),
        ("c", "08:00", "total", 3000),
    ]
    found, _ = records_of(events, "08:00", reject_count=None, **PRODUCTS)
    products = found["early"]["products"]
    assert {key: (p["produced"], p["ideal_cycle_time_s"]) for key, p in products.items()} == {
        "null": (1000, 1.0),
        "7": (2000, 1.0),
    }


def test_machine_without_product_tag_has_no_products_key() -> None:
    found, _ = records_of([("s", "06:00", 1), ("c", "06:00", "total", 0)], "07:00")
    assert "products" not in found["early"]


def test_performance_above_one_is_flagged() -> None:
    # 4,000 parts in 3,600 s of running at an ideal 1 s: 1.111 > 1, the config is wrong.
    events: list[Event] = [("s", "06:00", 1), ("c", "06:00", "total", 0)]
    events.append(("c", "07:00", "total", 4000))
    found, _ = records_of(events, "07:00", reject_count=None)
    assert found["early"]["performance"] == pytest.approx(4000 / 3600)
    assert found["early"]["performance_flagged"] is True


# ---------------------------------------------------------------------------------------------
# Final records and late parts


def test_final_record_waits_for_the_counters_next_reading() -> None:
    # Read every 10 min, 13:55 and 14:05: the 13:55-14:05 delta (600) is half early's.
    engine = OeeEngine(machine(reject_count=None), calendar(EARLY_NO_BREAKS, LATE))
    feed(engine, [("s", "06:00", 1), ("c", "13:00", "total", 0), ("c", "13:55", "total", 3300)])
    feed(engine, [("a", "14:00:30")])
    assert engine.pop_finished() == []  # its last parts are still to be read
    feed(engine, [("c", "14:05", "total", 3900)])
    [early] = engine.pop_finished()
    assert early["produced_quantity"] == 3300 + 300
    [late] = engine.finish(at("15:00"))
    assert late["produced_quantity"] == 300


def test_parts_read_after_the_final_record_count_where_read() -> None:
    # count_wait 5 min: a reading until 14:05 (inclusive) would still count in early; after
    # it early is final with the parts read by 13:55 (3,300). The reading at 14:20 (+1,500,
    # made 13:55-14:20) comes too late for early's 300: they count in late, where they are
    # read, so late has all 1,500 and early's record never changes.
    engine = OeeEngine(machine(reject_count=None, count_wait="5m"), calendar(EARLY_NO_BREAKS, LATE))
    feed(engine, [("s", "06:00", 1), ("c", "13:00", "total", 0), ("c", "13:55", "total", 3300)])
    feed(engine, [("a", "14:05")])
    assert engine.pop_finished() == []
    feed(engine, [("a", "14:05:01")])
    [early] = engine.pop_finished()
    assert early["produced_quantity"] == 3300
    feed(engine, [("c", "14:20", "total", 4800)])
    assert engine.pop_finished() == []
    [late] = engine.finish(at("15:00"))
    assert late["produced_quantity"] == 1500
    assert engine.diagnostics().late_parts == 300


def test_parts_read_after_the_data_ends_count_nowhere_but_the_record_is_made() -> None:
    # The data ends at 14:00 before any reading after 13:55: early is final with 3,300.
    found, _ = records_of(
        [("s", "06:00", 1), ("c", "13:00", "total", 0), ("c", "13:55", "total", 3300)],
        "14:00",
        EARLY_NO_BREAKS,
        reject_count=None,
    )
    assert found["early"]["produced_quantity"] == 3300


@pytest.mark.parametrize(
    ("wait", "expected"),
    [
        # Read 10 parts at 14:20 with no running time since 13:50 (the machine has been down
        # since then): they belong to the latest running time, 13:50, in early...
        ("30m", {"early": 3010, "late": 0}),
        # ...also when read exactly count_wait after early's end...
        ("20m", {"early": 3010, "late": 0}),
        # ...unless early's record was final by then (10 min after its end): then in late.
        ("10m", {"early": 3000, "late": 10}),
    ],
)
def test_parts_without_running_time_go_to_the_running_time_before(
    wait: str, expected: dict[str, int]
) -> None:
    events: list[Event] = [
        ("s", "06:00", 1),
        ("c", "13:00", "total", 0),
        ("s", "13:50", 2),
        ("c", "13:50", "total", 3000),
        ("c", "14:20", "total", 3010),
    ]
    found, _ = records_of(
        events, "15:00", EARLY_NO_BREAKS, LATE, reject_count=None, count_wait=wait
    )
    assert {name: r["produced_quantity"] for name, r in found.items()} == expected


def test_parts_without_any_running_time_go_to_the_reading() -> None:
    # Down since the first state sample: no running time at all; the 5 parts count where
    # they are read (07:00, in early).
    found, _ = records_of(
        [("s", "06:00", 2), ("c", "06:00", "total", 0), ("c", "07:00", "total", 5)],
        "08:00",
        reject_count=None,
    )
    assert found["early"]["produced_quantity"] == 5


@pytest.mark.parametrize(
    ("fault_end", "expected"),
    [
        # The stop ends at 09:00:30 after 60 s: a microstop, so its time counts as running:
        # 08:59:00-08:59:30 running (30 s) + the microstop 08:59:30-09:00 (30 s) in early and
        # 09:00-09:00:15 (15 s) in the break: 30 x 60/75 = 24 in early.
        ("09:00:30", 24),
        # The stop lasts until 09:05 (over 2 min): downtime, so only the 30 s of running
        # made the parts: all 30 in early. The reading at 09:00:15 waited for the decision.
        ("09:05", 30),
    ],
)
def test_reading_during_an_undecided_stop_waits_for_its_decision(
    fault_end: str, expected: int
) -> None:
    events: list[Event] = [
        ("s", "06:00", 1),
        ("c", "08:59", "total", 0),
        ("s", "08:59:30", 2),
        ("c", "09:00:15", "total", 30),
        ("s", fault_end, 1),
    ]
    found, _ = records_of(events, "10:00", reject_count=None)
    assert found["early"]["produced_quantity"] == expected


# ---------------------------------------------------------------------------------------------
# Rolling window, memory


def test_rolling_window_prorates_a_reading_across_its_start() -> None:
    # Read at 08:30 and 09:50 while running (no breaks): 4,800 parts over 4,800 s. At 10:00
    # the window 09:00-10:00 has the part made after 09:00: 4,800 - 4,800 x 1,800/4,800 =
    # 3,000.
    engine = OeeEngine(machine(reject_count=None), calendar(EARLY_NO_BREAKS))
    feed(engine, [("s", "06:00", 1), ("c", "08:30", "total", 0), ("c", "09:50", "total", 4800)])
    feed(engine, [("a", "10:00")])
    record = engine.report_rolling()
    assert record is not None
    assert record["produced_quantity"] == 3000


def test_a_silent_counter_keeps_bounded_memory() -> None:
    # The reject counter is read at 06:00 and next at 13:00; meanwhile the machine stops
    # for 1 s every 3 s (7 h: 8,400 pieces of running time). Its pieces stay bounded, and
    # its 100 rejects still land in early (all its running time is in early).
    engine = OeeEngine(machine(microstop_threshold="0s"), calendar(EARLY_NO_BREAKS))
    feed(engine, [("c", "06:00", "total", 0), ("c", "06:00", "reject", 0)])
    t = at("06:00")
    made = 0
    longest = 0
    while t < at("13:00"):
        engine.on_state(t, 1)
        engine.on_state(t + 2, 3)
        made += 2
        engine.on_count(t + 3, "total", made)
        longest = max(longest, len(engine._attribution.counters[REJECT].pieces))
        t += 3
    engine.on_count(t, "reject", 100)
    [record] = engine.finish(at("14:00"))
    assert longest <= MAX_PIECES
    assert (record["produced_quantity"], record["reject_quantity"]) == (made, 100)


def test_split_whole_adds_up_to_the_total() -> None:
    assert split_whole(10, [1.0, 1.0, 1.0]) == [4, 3, 3]  # ties: the earlier first
    assert split_whole(12000, [11700.0, 900.0]) == [11143, 857]
    assert split_whole(7, [0.0, 0.0]) == [7, 0]
    assert split_whole(0, [5.0, 5.0]) == [0, 0]


# ---------------------------------------------------------------------------------------------
# Property: for any reading instants of the same production, the shift's quantities are the
# counters' increase within the shift's running time (running and microstops)

BEGIN = at("05:00")
END = at("15:00")


@st.composite
def productions(draw: st.DrawFn) -> dict[str, Any]:
    """Episodes of whole seconds from 05:00, a counter that grows while the machine runs
    (or is in a microstop), and a random set of whole-second reading instants."""
    threshold = draw(st.sampled_from([0, 30, 120, 300]))
    durations = draw(st.lists(st.integers(1, 2400), min_size=1, max_size=40))
    codes = draw(st.lists(st.sampled_from([1, 1, 1, 1, 2, 4, 3, 99]), min_size=len(durations)))
    episodes: list[tuple[int, int]] = []
    t = int(BEGIN)
    for duration, code in zip(durations, codes, strict=False):
        if t >= END:
            break
        episodes.append((t, code))
        t += duration
    rate = draw(st.integers(1, 3))
    reject_rate = draw(st.integers(0, rate))
    count = draw(st.integers(0, 200))
    instants = draw(st.lists(st.integers(int(BEGIN) + 1, int(END) - 1), max_size=count))
    return {
        "threshold": threshold,
        "episodes": episodes,
        "rate": rate,
        "reject_rate": reject_rate,
        "instants": sorted({int(BEGIN), *instants, int(END)}),
    }


def productive_spans(episodes: list[tuple[int, int]], threshold: int) -> list[tuple[int, int]]:
    """When the machine made parts: running, or in a stop shorter than the threshold (a
    stop runs from a stop code to the next running or planned-stop code, or the data end)."""
    spans: list[tuple[int, int]] = []
    bounds = [start for start, _ in episodes] + [int(END)]
    i = 0
    while i < len(episodes):
        start, code = episodes[i]
        j = i + 1
        if code not in (1, 3):
            while j < len(episodes) and episodes[j][1] not in (1, 3):
                j += 1
        end = min(bounds[j], int(END))
        if code == 1 or (code != 3 and 0 < end - start < threshold):
            spans.append((start, end))
        i = j
    return spans


def overlap(spans: list[tuple[int, int]], start: float, end: float) -> int:
    """Seconds of `spans` within [start, end)."""
    return sum(max(0, int(min(e, end) - max(s, start))) for s, e in spans)


EARLY_PLANNED = ((at("06:00"), at("09:00")), (at("09:15"), at("12:00")), (at("12:30"), at("14:00")))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(productions())
def test_any_sampling_counts_exactly_the_parts_made_in_the_shift(case: dict[str, Any]) -> None:
    spans = productive_spans(case["episodes"], case["threshold"])
    engine = OeeEngine(
        machine(microstop_threshold=f"{case['threshold']}s", count_wait="2h"), calendar(EARLY)
    )
    readings = [(t, "c") for t in case["instants"]] + [(t, "s") for t, _ in case["episodes"]]
    codes = dict(case["episodes"])
    for t, kind in sorted(readings, key=lambda r: (r[0], r[1] == "c")):  # states first
        if kind == "s":
            engine.on_state(t, codes[t])
        else:
            made = overlap(spans, BEGIN, t)  # the counter: parts made before the reading
            engine.on_count(t, "total", case["rate"] * made)
            engine.on_count(t, "reject", case["reject_rate"] * made)
    records = {r["window"]["name"]: r for r in engine.finish(END)}
    in_shift = sum(overlap(spans, start, end) for start, end in EARLY_PLANNED)
    record = records.get("early")
    produced = 0 if record is None else record["produced_quantity"]
    rejected = 0 if record is None else record["reject_quantity"]
    assert produced == case["rate"] * in_shift
    assert rejected == case["reject_rate"] * in_shift
