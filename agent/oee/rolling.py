"""The history behind the rolling OEE window (docs/oee.md "The record", rolling windows).

Pure: no I/O, no clock reads. Only the live task keeps it; the replay reports shifts only.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from agent.oee.records import WindowFigures
from agent.oee.states import PLANNED_STOP, RUNNING
from agent.oee.totals import EpisodePiece, Stop


class PartsCounted(NamedTuple):
    """Parts a counter reading added, at the reading's time."""

    ts: float
    slot: int  # a CounterSlot
    parts: int


class RollingHistory:
    """Accounted episode pieces and counted parts of the last `length` seconds."""

    __slots__ = ("_counted", "_pieces", "length")

    def __init__(self, *, length: float) -> None:
        if length <= 0:
            raise ValueError(f"rolling window length must be > 0, not {length}")
        self.length = length
        self._pieces: deque[EpisodePiece] = deque()
        self._counted: deque[PartsCounted] = deque()

    def add_piece(self, piece: EpisodePiece) -> None:
        """A piece of an episode was accounted."""
        self._pieces.append(piece)

    def add_parts(self, ts: float, slot: int, parts: int) -> None:
        """A counter reading at `ts` (the latest time seen) added `parts`."""
        counted = self._counted
        counted.append(PartsCounted(ts, slot, parts))
        horizon = ts - self.length
        while counted[0].ts < horizon:
            counted.popleft()

    def trim(self, now: float) -> None:
        """Forget what lies wholly before the window that ends at `now`."""
        horizon = now - self.length
        pieces = self._pieces
        while pieces and pieces[0].end <= horizon:
            pieces.popleft()
        counted = self._counted
        while counted and counted[0].ts < horizon:
            counted.popleft()

    def figures(self, start: float, open_piece: EpisodePiece | None) -> WindowFigures:
        """What was counted from `start` on, the `open_piece` (not yet accounted) included.

        A stop is counted once however many pieces it has; a stop still shorter than the
        threshold counts as a microstop, as in the shift figures.
        """
        running = downtime = 0.0
        stops: set[int] = set()
        microstops: set[int] = set()
        pieces = list(self._pieces)
        if open_piece is not None:
            pieces.append(open_piece)
        for piece_start, end, category, stop in pieces:
            if end <= start:
                continue
            span = end - max(piece_start, start)
            if span <= 0:
                continue
            if category == RUNNING:
                running += span
            elif category != PLANNED_STOP:
                if _is_unplanned(stop):
                    downtime += span
                    stops.add(id(stop))
                else:  # a microstop, or a stop still shorter than the threshold
                    running += span
                    microstops.add(id(stop))
        parts = [0, 0, 0]
        for ts, slot, count in self._counted:
            if ts >= start:
                parts[slot] += count
        return WindowFigures(
            running_s=running,
            downtime_s=downtime,
            stops=len(stops),
            microstops=len(microstops),
            parts=(parts[0], parts[1], parts[2]),
        )


def _is_unplanned(stop: Stop | None) -> bool:
    assert stop is not None
    return stop.microstop is False
