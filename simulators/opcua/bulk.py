"""Which bulk load-test values a tick writes: one simulated second's changes, spread out."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator

from simulators.line import BulkBlock

__all__ = ["BulkChanges"]


class BulkChanges:
    """The bulk values changed in the current simulated second and not yet written."""

    def __init__(self, *, bulk: BulkBlock, count: int, sim_time_s: float) -> None:
        """Track registers ``0 .. count-1`` of ``bulk`` from ``sim_time_s`` on."""
        if not 0 < count <= bulk.size:
            raise ValueError("count must be within 1..bulk.size")
        self._bulk = bulk
        self._count = count
        self._second = int(sim_time_s)
        self._values = bulk.values(0, count, sim_time_s)
        self._pending: OrderedDict[int, int] = OrderedDict()

    @property
    def values(self) -> list[int]:
        """The current values, register by register."""
        return list(self._values)

    def due(self, sim_time_s: float, simulated_per_tick: float) -> Iterator[tuple[int, int]]:
        """(index, value) pairs this tick writes, each taken off the pending ones as yielded.

        Spread one simulated second's changes over the ticks of that second, as a PLC whose
        values change at their own moments (and so that no tick blocks the server for the
        whole batch): each tick writes its share of what is still pending.
        """
        second = int(sim_time_s)
        if second != self._second:
            self._collect(second, sim_time_s)
        pending = self._pending
        if not pending:
            return
        left = 1.0 - (sim_time_s - second)
        ticks_left = max(1.0, left / simulated_per_tick) if simulated_per_tick > 0 else 1.0
        for _ in range(math.ceil(len(pending) / ticks_left)):
            yield pending.popitem(last=False)

    def _collect(self, second: int, sim_time_s: float) -> None:
        """A new simulated second: queue every value that differs from the last second's."""
        self._second = second
        values = self._bulk.values(0, self._count, sim_time_s)
        old = self._values
        self._values = values
        pending = self._pending
        for index, value in enumerate(values):
            if value != old[index]:
                pending[index] = value
                pending.move_to_end(index)
