"""Unit tests of the pure line model (simulators.line)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from simulators.line import BulkBlock, LineModel, MachineState


def steady(seed: int, **kwargs: Any) -> LineModel:
    """A model without random faults, starvation or changeovers."""
    return LineModel(
        seed=seed,
        mean_time_between_faults_s=math.inf,
        mean_time_between_starved_s=math.inf,
        mean_time_between_changeovers_s=math.inf,
        **kwargs,
    )


def trajectory(seed: int, steps: int = 3000, dt: float = 1.7) -> list[dict[str, object]]:
    """Snapshots after each of ``steps`` advances."""
    model = LineModel(seed=seed)
    out: list[dict[str, object]] = []
    for i in range(steps):
        model.advance(dt)
        if i % 500 == 0:
            model.write("product_code", i % 10)
        out.append(dict(model.snapshot()))
    return out


def test_same_seed_same_trajectory() -> None:
    assert trajectory(7) == trajectory(7)


def test_different_seed_different_trajectory() -> None:
    assert trajectory(7) != trajectory(8)


def test_event_trajectory_independent_of_step_size() -> None:
    fine, coarse = LineModel(seed=3), LineModel(seed=3)
    for _ in range(3600):
        fine.advance(1.0)
    for _ in range(36):
        coarse.advance(100.0)
    assert fine.total_count == coarse.total_count
    assert fine.reject_count == coarse.reject_count
    assert fine.state == coarse.state


def test_state_codes_and_fault_codes_over_a_long_run() -> None:
    model = LineModel(seed=11)
    seen: set[int] = set()
    for _ in range(20 * 3600):  # 20 h in 1 s steps
        model.advance(1.0)
        state = model.state
        assert state in {0, 1, 2, 3, 4}
        seen.add(state)
        if state == MachineState.UNPLANNED_STOP:
            assert 1 <= model.fault_code <= 9
        else:
            assert model.fault_code == 0
        assert model.good_count + model.reject_count == model.total_count  # no rollover here
    assert {1, 2, 3, 4} <= seen  # faults, changeovers and starvation all happened


def test_performance_below_one_and_plausible() -> None:
    model = steady(5)
    model.advance(3600.0)
    assert model.state == MachineState.RUNNING
    performance = model.ideal_cycle_time * model.total_count / model.runtime_s
    assert 0.85 < performance < 1.0
    assert 1200 <= model.last_cycle_ms < 2000
    assert 50.0 < model.temperature < 70.0
    assert model.energy_kwh == pytest.approx(7.5, rel=0.01)


@pytest.mark.parametrize("bits", [16, 32])
def test_total_count_rolls_over(bits: int) -> None:
    start = (1 << bits) - 5
    model = steady(1, counter_bits=bits, initial_total=start)
    model.advance(60.0)
    produced = model.order_count
    assert produced > 10
    assert model.total_count == (start + produced) % (1 << bits)
    assert model.total_count < start
    assert model.snapshot()["total_count16"] == model.total_count & 0xFFFF


@pytest.mark.parametrize("bits", [16, 32])
def test_reject_count_rolls_over(bits: int) -> None:
    start = (1 << bits) - 3
    model = steady(1, counter_bits=bits, reject_rate=1.0, initial_total=start, initial_reject=start)
    model.advance(30.0)
    assert model.reject_count == model.total_count < start
    assert model.good_count == 0


def test_invalid_counter_bits() -> None:
    with pytest.raises(ValueError, match="counter_bits"):
        LineModel(seed=1, counter_bits=24)
    with pytest.raises(ValueError, match="16 bits"):
        LineModel(seed=1, counter_bits=16, initial_total=70000)


def test_quality_hold_is_planned_stop() -> None:
    model = steady(2)
    model.write("quality_hold", True)
    assert model.state == MachineState.PLANNED_STOP
    count = model.total_count
    model.advance(60.0)
    assert model.state == MachineState.PLANNED_STOP
    assert model.total_count == count  # nothing produced while held
    model.write("quality_hold", False)
    assert model.state == MachineState.RUNNING


def test_quality_hold_wins_over_fault() -> None:
    model = LineModel(seed=2)
    model.force_state(2, fault_code=7)
    model.write("quality_hold", True)
    assert model.state == MachineState.PLANNED_STOP
    assert model.fault_code == 0
    model.write("quality_hold", False)
    assert (model.state, model.fault_code) == (2, 7)


def test_maintenance_lock_ignores_start() -> None:
    model = steady(2)
    model.write("maintenance_lock", True)
    assert model.state == MachineState.PLANNED_STOP
    model.write("start", True)
    assert model.state == MachineState.PLANNED_STOP
    assert model.start is False
    model.write("maintenance_lock", False)
    assert model.state == MachineState.OFF  # unlocking does not restart the machine
    model.write("start", True)
    assert model.state == MachineState.RUNNING


def test_start_after_stop_runs() -> None:
    model = steady(2)
    model.write("stop", True)
    assert model.state == MachineState.OFF
    assert (model.start, model.stop) == (False, True)
    count = model.total_count
    model.advance(30.0)
    assert model.total_count == count
    model.write("start", True)
    assert model.state == MachineState.RUNNING
    assert (model.start, model.stop) == (True, False)
    model.advance(30.0)
    assert model.total_count > count


def test_start_false_stops() -> None:
    model = steady(2)
    model.write("start", False)
    assert model.state == MachineState.OFF


def test_faults_recover_by_themselves() -> None:
    model = LineModel(seed=4)
    model.force_state(2, fault_code=3, duration_s=10.0)
    assert (model.state, model.fault_code) == (2, 3)
    model.advance(9.0)
    assert model.state == MachineState.UNPLANNED_STOP
    model.advance(1.5)
    assert model.state == MachineState.RUNNING


@pytest.mark.parametrize("code", [0, 1, 2, 3, 4])
def test_force_state(code: int) -> None:
    model = LineModel(seed=9)
    model.force_state(code)
    assert model.state == code
    model.advance(1000.0)
    assert model.state == code  # forced without duration: until changed


def test_force_state_rejects_bad_codes() -> None:
    model = LineModel(seed=9)
    with pytest.raises(ValueError, match="state code"):
        model.force_state(5)
    with pytest.raises(ValueError, match="fault_code"):
        model.force_state(2, fault_code=10)
    with pytest.raises(ValueError, match="fault_code"):
        model.force_state(1, fault_code=3)


@pytest.mark.parametrize(
    ("point", "value"),
    [
        ("product_code", 10000),
        ("product_code", -1),
        ("product_code", True),
        ("product_code", 1.5),
        ("target_qty", 1 << 32),
        ("target_qty", "12"),
        ("product_name", "X" * 17),
        ("product_name", "Käse"),
        ("product_name", "a\nb"),
        ("start", 1),
        ("quality_hold", "yes"),
        ("state", 1),
        ("total_count", 0),
    ],
)
def test_invalid_writes_rejected(point: str, value: object) -> None:
    model = LineModel(seed=1)
    before = model.snapshot()
    with pytest.raises(ValueError, match=point):
        model.write(point, value)
    assert model.snapshot() == before
    assert model.write_history == []


def test_unknown_point() -> None:
    with pytest.raises(KeyError):
        LineModel(seed=1).write("nope", 1)


def test_valid_writes_recorded() -> None:
    model = LineModel(seed=1)
    model.advance(5.0)
    model.write("product_code", 9999)
    model.write("product_name", "PART-B 16 chars!")
    model.write("target_qty", 0xFFFF_FFFF)
    snap = model.snapshot()
    assert (snap["product_code"], snap["product_name"], snap["target_qty"]) == (
        9999,
        "PART-B 16 chars!",
        0xFFFF_FFFF,
    )
    assert [(name, value) for _, name, value in model.write_history] == [
        ("product_code", 9999),
        ("product_name", "PART-B 16 chars!"),
        ("target_qty", 0xFFFF_FFFF),
    ]
    assert model.write_history[0][0] == pytest.approx(5.0)


def test_order_done_stops_machine_and_new_target_resets() -> None:
    model = steady(1)
    model.write("target_qty", 20)
    model.advance(600.0)
    assert model.order_done
    assert model.order_count == 20
    assert model.state == MachineState.OFF
    assert model.snapshot()["stop_reason"] == "order_done"
    model.write("target_qty", 5)
    assert not model.order_done
    assert model.order_count == 0
    model.write("start", True)
    model.advance(600.0)
    assert model.order_done
    assert model.order_count == 5


def test_cycle_counter16_wraps() -> None:
    model = LineModel(seed=1)
    seen = []
    for _ in range(20):
        model.advance(60.0)
        seen.append(model.cycle_counter16)
    assert all(0 <= value <= 0xFFFF for value in seen)
    assert any(b < a for a, b in itertools.pairwise(seen))


def test_snapshot_types() -> None:
    snap = LineModel(seed=1).snapshot()
    assert isinstance(snap["runtime_s"], float)
    assert isinstance(snap["energy_kwh"], float)
    assert isinstance(snap["temperature"], float)
    assert isinstance(snap["running"], bool)
    assert isinstance(snap["product_name"], str)


def test_advance_rejects_bad_dt() -> None:
    model = LineModel(seed=1)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="dt_seconds"):
            model.advance(bad)


def test_bulk_block_change_fraction_and_determinism() -> None:
    bulk = BulkBlock(seed=3, size=5000, change_fraction=0.1)
    again = BulkBlock(seed=3, size=5000, change_fraction=0.1)
    for second in range(0, 30):
        now = bulk.values(0, 5000, second)
        after = bulk.values(0, 5000, second + 1)
        assert sum(a != b for a, b in zip(now, after, strict=True)) == 500
        assert now == again.values(0, 5000, second)
    assert bulk.values(10, 5, 7.9) == [bulk.value(i, 7) for i in range(10, 15)]
    assert all(0 <= v <= 0xFFFF for v in bulk.values(0, 5000, 123456))
    assert BulkBlock(seed=4).values(0, 50, 0) != bulk.values(0, 50, 0)
    with pytest.raises(IndexError):
        bulk.values(4990, 20, 0)
