"""Cumulative PLC counters to part counts (docs/oee.md "Counters"): baselines, rollover
versus reset. Pure: no I/O, no clock reads."""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Literal

CounterName = Literal["total", "reject", "good"]


class CounterSlot(IntEnum):
    """Which counter a reading is of; also the index into part-count lists."""

    TOTAL = 0  # produced parts
    REJECT = 1
    GOOD = 2


# Module-level aliases for the hot paths (see agent/oee/states.py).
TOTAL = CounterSlot.TOTAL
REJECT = CounterSlot.REJECT
GOOD = CounterSlot.GOOD
COUNTER_SLOTS: dict[str, CounterSlot] = {"total": TOTAL, "reject": REJECT, "good": GOOD}

# A drop of a counter is a rollover only if the parts it implies could have been made since
# the previous sample at this many times the ideal rate (plus a small allowance): a PLC reset
# from high up the range must not turn into tens of thousands of phantom parts.
ROLLOVER_RATE_FACTOR = 10.0
ROLLOVER_ALLOWANCE = 16


class CounterReadings:
    """The last good reading of each counter, and the parts each new reading adds."""

    __slots__ = (
        "_bits",
        "_ideal_cycle_time",
        "_last",
        "_last_ts",
        "invalid_values",
        "resets",
        "rollovers",
    )

    def __init__(self, *, counter_bits: Mapping[str, int | None], ideal_cycle_time: float) -> None:
        if ideal_cycle_time <= 0:
            raise ValueError(f"ideal cycle time must be > 0, not {ideal_cycle_time}")
        # Width in bits per counter (None: unknown, every drop is then a reset).
        self._bits: list[int | None] = [counter_bits.get(name) for name in COUNTER_SLOTS]
        self._ideal_cycle_time = ideal_cycle_time
        self._last: list[int | None] = [None, None, None]
        self._last_ts: list[float] = [0.0, 0.0, 0.0]
        self.invalid_values = 0  # readings that are not integers (ignored)
        self.rollovers = 0
        self.resets = 0

    def parts(self, slot: int, ts: float, value: object) -> int | None:
        """Parts made since the previous good reading of counter `slot` (0 for the first);
        None for a value that is no integer (ignored, and counted in `invalid_values`)."""
        if type(value) is not int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                self.invalid_values += 1
                return None
        last = self._last
        previous = last[slot]
        last[slot] = value
        stamps = self._last_ts
        previous_ts = stamps[slot]
        stamps[slot] = ts
        if previous is None:  # the first reading is the baseline
            return 0
        delta = value - previous
        if delta < 0:
            return self._drop(slot, previous, value, ts - previous_ts)
        return delta

    def _drop(self, slot: int, previous: int, value: int, elapsed: float) -> int:
        """Parts implied by a counter that went down: rollover, else a PLC reset."""
        bits = self._bits[slot]
        if bits is not None:
            span = 1 << bits
            wrapped = value - previous + span
            plausible = ROLLOVER_ALLOWANCE + ROLLOVER_RATE_FACTOR * elapsed / self._ideal_cycle_time
            if previous - value > span >> 1 and wrapped <= plausible:
                self.rollovers += 1
                return wrapped
        # A PLC reset: counting restarts from the new value (parts made since the reset).
        self.resets += 1
        return value if value > 0 else 0
