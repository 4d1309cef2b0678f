"""Final shift records: each emitted exactly once, when nothing can change it any more
(docs/oee.md "Final records"). Pure: no I/O, no clock reads.

An ended shift window waits while (a) the open stop, still shorter than the threshold, has
time in it (it may yet turn its microstop into downtime), or (b) a counter's parts are not
attributed up to the window's end (its next reading carries the parts made before the end),
but (b) for at most `count_wait` after the end. Once its record is made the window is
`final`: parts that arrive for it later count where their reading lands.
"""

from __future__ import annotations

import math

from agent.oee.records import OeeRecord, oee_record, shift_window
from agent.oee.totals import ShiftTotals, Stop
from agent.settings.machines import MachineConfig


class FinalRecords:
    """Ended shift windows of one machine, held back while they may still change, and their
    records once final."""

    __slots__ = ("_machine", "_ready", "_wait", "deadline", "waiting")

    def __init__(self, *, machine: MachineConfig) -> None:
        self._machine = machine
        self._wait = float(machine.count_wait)
        self.waiting: list[ShiftTotals] = []
        self._ready: list[OeeRecord] = []
        # When the next window stops waiting for its counters (inf: none does).
        self.deadline = math.inf

    def add(self, totals: ShiftTotals) -> None:
        """A shift window ended (`observed_until` set); `release` decides when it is final."""
        self.waiting.append(totals)

    def release(
        self, undecided: Stop | None, counted_until: float, now: float, *, force: bool = False
    ) -> None:
        """Make the record of every ended window that can no longer change: no time of
        `undecided` (the open stop still shorter than the threshold) in it, and every
        counter's parts attributed up to its end (`counted_until`) or `count_wait` passed
        (at `now`). `force`: the data ended, every window is final."""
        if not self.waiting:
            return
        waiting: list[ShiftTotals] = []
        deadline = math.inf
        for totals in self.waiting:
            end = totals.observed_until
            counts_due = end + self._wait
            # At `counts_due` itself a reading is still in time: the engine releases the
            # window after that reading (or at the next instant after it).
            counting = counted_until < end and now < counts_due
            if not force and (counting or (undecided is not None and undecided.in_shift(totals))):
                waiting.append(totals)
                if counting:
                    deadline = min(deadline, counts_due)
                continue
            totals.final = True
            start = totals.observed_from
            if start is not None and end > start:
                figures = totals.figures(undecided, None)
                window = shift_window(totals.window, start, end)
                self._ready.append(oee_record(self._machine, window, figures))
        self.waiting[:] = waiting  # in place: the engine's hot path holds the list
        self.deadline = deadline

    def pop(self) -> list[OeeRecord]:
        """The final records made since the last call."""
        ready, self._ready = self._ready, []
        return ready
