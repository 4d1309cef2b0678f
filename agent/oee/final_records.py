"""Final shift records: each emitted exactly once, when no open stop can change it any more
(docs/oee.md "Stops and microstops"). Pure: no I/O, no clock reads."""

from __future__ import annotations

from agent.oee.records import OeeRecord, oee_record, shift_window
from agent.oee.totals import ShiftTotals, Stop
from agent.settings.machines import MachineConfig


class FinalRecords:
    """Ended shift windows of one machine, held back while an undecided stop has time in
    them (it may still turn their microstop into downtime), and their records once final."""

    __slots__ = ("_machine", "_ready", "_waiting")

    def __init__(self, *, machine: MachineConfig) -> None:
        self._machine = machine
        self._waiting: list[ShiftTotals] = []
        self._ready: list[OeeRecord] = []

    def add(self, totals: ShiftTotals) -> None:
        """A shift window ended (`observed_until` set); `release` decides when it is final."""
        self._waiting.append(totals)

    def release(self, undecided: Stop | None) -> None:
        """Make the records of every ended window that `undecided` (the open stop still
        shorter than the threshold, if any) has no time in."""
        if not self._waiting:
            return
        waiting: list[ShiftTotals] = []
        for totals in self._waiting:
            start = totals.observed_from
            if undecided is not None and undecided.in_shift(totals):
                waiting.append(totals)
            elif start is not None and totals.observed_until > start:
                end = totals.observed_until
                figures = totals.figures(undecided, None)
                window = shift_window(totals.window, start, end)
                self._ready.append(oee_record(self._machine, window, figures))
        self._waiting = waiting

    def pop(self) -> list[OeeRecord]:
        """The final records made since the last call."""
        ready, self._ready = self._ready, []
        return ready
