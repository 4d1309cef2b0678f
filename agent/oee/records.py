"""The OEE record (docs/oee.md "The record"): its shape, and how figures become one.

Pure: no I/O, no clock reads. Records are plain dicts (JSON documents) typed as TypedDicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NotRequired, TypedDict

from agent.oee.calendar import ShiftWindow
from agent.oee.products import IdealRates
from agent.settings.machines import MachineConfig
from sync.events import rfc3339


class OeeWindow(TypedDict):
    """The span a record covers; `shift_start` / `shift_end` on shift windows only."""

    kind: Literal["shift", "rolling"]
    name: str
    start: str
    end: str
    complete: bool
    shift_start: NotRequired[str]
    shift_end: NotRequired[str]


class ProductQuantities(TypedDict):
    """One product's parts in a window (`products` of a record, machines with a product tag)."""

    produced: int
    good: int
    reject: int
    ideal_cycle_time_s: float


class OeeRecord(TypedDict):
    """One OEE record (`R/{machine}/oee`, the outbox's `oee` events, the replay's output)."""

    machine: str
    window: OeeWindow
    availability: float | None
    performance: float | None
    quality: float | None
    oee: float | None
    planned_busy_time_s: float
    actual_production_time_s: float
    unplanned_downtime_s: float
    produced_quantity: int
    good_quantity: int
    reject_quantity: int
    microstops: int
    mtbf_s: float | None
    mttr_s: float | None
    performance_flagged: bool
    products: NotRequired[dict[str, ProductQuantities]]  # only with a product tag


PartCounts = tuple[int, int, int]  # produced, reject, good deltas (indexed by CounterSlot)


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowFigures:
    """What was counted in a window, unrounded: the input of a record."""

    running_s: float  # actual production time: running states and microstops
    downtime_s: float  # unplanned stops and unknown states that reached the threshold
    stops: int  # unplanned stops (for MTBF / MTTR)
    microstops: int
    parts: Mapping[str, PartCounts]  # per product key (agent/oee/products.py)


def shift_window(window: ShiftWindow, start: float, end: float) -> OeeWindow:
    """The `window` of a shift record covering [start, end] of the shift `window`."""
    return {
        "kind": "shift",
        "name": window.name,
        "start": rfc3339(start),
        "end": rfc3339(end),
        "complete": start <= window.start and end >= window.end,
        "shift_start": rfc3339(window.start),
        "shift_end": rfc3339(window.end),
    }


def rolling_window(length: float, start: float, end: float) -> OeeWindow:
    """The `window` of a rolling record of `length` seconds, observed over [start, end]."""
    return {
        "kind": "rolling",
        "name": f"last_{format_seconds(length)}",
        "start": rfc3339(start),
        "end": rfc3339(end),
        "complete": start == end - length,
    }


def oee_record(machine: MachineConfig, window: OeeWindow, figures: WindowFigures) -> OeeRecord:
    """The record of `machine` for `window` from its figures."""
    # Times are rounded to milliseconds first and every factor is computed from the rounded
    # figures, so a record is self-consistent (availability == APT / PBT exactly).
    apt = round(figures.running_s, 3)
    down = round(figures.downtime_s, 3)
    pbt = round(apt + down, 3)
    rates = IdealRates(machine)
    products: dict[str, ProductQuantities] = {}
    produced = good = reject = 0
    ideal_time = 0.0  # sum of ideal cycle time x parts over the products
    for product, parts in figures.parts.items():
        good_p, reject_p = _good_and_reject(machine, parts)
        ideal = rates.ideal_cycle_time(product)
        products[product] = {
            "produced": parts[0],
            "good": good_p,
            "reject": reject_p,
            "ideal_cycle_time_s": ideal,
        }
        produced += parts[0]
        good += good_p
        reject += reject_p
        ideal_time += ideal * parts[0]
    availability = apt / pbt if pbt > 0 else None
    # 12 decimals: far below any meaning, but removes float noise such as 1.2 * 100 / 120
    # = 1.0000000000000002 that would otherwise flag an exactly ideal machine.
    performance = round(ideal_time / apt, 12) if apt > 0 else None
    quality = good / produced if produced > 0 else None
    stops = figures.stops
    record: OeeRecord = {
        "machine": machine.name,
        "window": window,
        "availability": availability,
        "performance": performance,
        "quality": quality,
        "oee": _product(availability, performance, quality),
        "planned_busy_time_s": pbt,
        "actual_production_time_s": apt,
        "unplanned_downtime_s": down,
        "produced_quantity": produced,
        "good_quantity": good,
        "reject_quantity": reject,
        "microstops": figures.microstops,
        "mtbf_s": round(apt / stops, 3) if stops else None,
        "mttr_s": round(down / stops, 3) if stops else None,
        "performance_flagged": performance is not None and performance > 1.0,
    }
    if machine.product is not None:
        record["products"] = products
    return record


def _good_and_reject(machine: MachineConfig, parts: PartCounts) -> tuple[int, int]:
    produced, reject_count, good_count = parts
    # Counters sampled at different instants can disagree at a window edge: the quality
    # counter is capped at the produced count so that good + reject == produced (per
    # product, so that the products add up to the record's quantities).
    if machine.reject_count is not None:
        reject = min(reject_count, produced)
        return produced - reject, reject
    if machine.good_count is not None:
        good = min(good_count, produced)
        return good, produced - good
    return produced, 0  # no quality counter configured: every part counts as good


def _product(
    availability: float | None, performance: float | None, quality: float | None
) -> float | None:
    if availability is None or performance is None or quality is None:
        return None
    return availability * performance * quality


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
