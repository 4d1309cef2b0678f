"""The history behind the rolling OEE window (docs/oee.md "The record", rolling windows).

Pure: no I/O, no clock reads. Only the live task keeps it; the replay reports shifts only.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

from agent.oee.records import PartCounts, WindowFigures
from agent.oee.states import PLANNED_STOP, RUNNING
from agent.oee.totals import EpisodePiece, Stop


class PartsCounted(NamedTuple):
    """Parts of a counter made, evenly, over [start, end] (a point when start == end)."""

    start: float
    end: float
    slot: int  # a CounterSlot
    parts: int
    product: str


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

    def add_parts(self, start: float, end: float, slot: int, parts: int, product: str) -> None:
        """`parts` of counter `slot` were made over [start, end] (docs/oee.md "Counters")."""
        counted = self._counted
        counted.append(PartsCounted(start, end, slot, parts, product))
        horizon = end - self.length
        while counted[0].end < horizon:
            counted.popleft()

    def trim(self, now: float) -> None:
        """Forget what lies wholly before the window that ends at `now`."""
        horizon = now - self.length
        pieces = self._pieces
        while pieces and pieces[0].end <= horizon:
            pieces.popleft()
        counted = self._counted
        while counted and counted[0].end < horizon:
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
        return WindowFigures(
            running_s=running,
            downtime_s=downtime,
            stops=len(stops),
            microstops=len(microstops),
            parts=self._parts_since(start),
        )

    def _parts_since(self, start: float) -> dict[str, PartCounts]:
        """Whole parts made from `start` on: parts made over a span that `start` cuts are
        prorated by time and rounded (the window gets the parts after the cut)."""
        found: dict[str, list[int]] = {}
        for piece_start, end, slot, count, product in self._counted:
            if end < start:
                continue
            if piece_start < start:
                count -= math.floor(count * (start - piece_start) / (end - piece_start) + 0.5)
                if not count:
                    continue
            counts = found.get(product)
            if counts is None:
                counts = found[product] = [0, 0, 0]
            counts[slot] += count
        return {product: (c[0], c[1], c[2]) for product, c in found.items()}


def _is_unplanned(stop: Stop | None) -> bool:
    assert stop is not None
    return stop.microstop is False
