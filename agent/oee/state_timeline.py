"""A machine's recent published states as segments, for the status page's timeline bar.

Pure: no I/O, no clock reads. Bounded: the newest `MAX_CHANGES` changes are kept, enough for
a state change every 8 s over a 9-hour shift; a busier machine's bar starts later.
"""

from __future__ import annotations

from collections import deque
from typing import TypedDict

from agent.oee.states import PublishedState, StateChange

MAX_CHANGES = 4096


class Segment(TypedDict):
    """One stretch of one published state (epoch seconds)."""

    state: PublishedState
    code: object
    start: float
    end: float


class StateTimeline:
    """The published state changes of one machine, newest last."""

    __slots__ = ("_changes",)

    def __init__(self, limit: int = MAX_CHANGES) -> None:
        self._changes: deque[StateChange] = deque(maxlen=limit)

    def add(self, changes: list[StateChange]) -> None:
        """Record changes of the published state (in time order)."""
        self._changes.extend(changes)

    def segments(self, start: float, end: float) -> list[Segment]:
        """The states over [start, end]: one segment per change in it, plus the state that was
        in effect at `start` (cut to start there); nothing before the first change known."""
        out: list[Segment] = []
        changes = list(self._changes)
        for index, change in enumerate(changes):
            following = changes[index + 1].ts if index + 1 < len(changes) else end
            if following <= start or change.ts >= end:
                continue
            segment_end = min(following, end)
            segment_start = max(change.ts, start)
            if segment_end > segment_start or change.ts >= start:
                out.append(
                    {
                        "state": change.state,
                        "code": change.code,
                        "start": segment_start,
                        "end": segment_end,
                    }
                )
        return out
