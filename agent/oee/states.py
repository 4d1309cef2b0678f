"""Machine states for OEE (docs/oee.md "States"): what a state code means, and the published
state of `R/{machine}/state`. Pure: no I/O, no clock reads."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, TypedDict

from agent.settings.machines import MachineStateConfig
from sync.events import rfc3339


class StateCategory(IntEnum):
    """What a state code counts as. The order matters: from UNPLANNED_STOP on it is a stop."""

    RUNNING = 0
    PLANNED_STOP = 1
    UNPLANNED_STOP = 2
    # A code the machine's mapping does not list: it counts as unplanned downtime and, like
    # an unplanned stop, it is a stop (possibly a microstop).
    UNKNOWN = 3


# Module-level aliases for the hot paths: `StateCategory.RUNNING` is a class attribute lookup
# through the enum's metaclass, several times slower than a global.
RUNNING = StateCategory.RUNNING
PLANNED_STOP = StateCategory.PLANNED_STOP
UNPLANNED_STOP = StateCategory.UNPLANNED_STOP
UNKNOWN = StateCategory.UNKNOWN

PublishedState = Literal["running", "planned_stop", "unplanned_stop", "microstop", "unknown"]

# The published state of each category (a stop shorter than the threshold is a "microstop").
STATE_NAMES: tuple[PublishedState, ...] = ("running", "planned_stop", "unplanned_stop", "unknown")


def published_state(category: StateCategory | None, undecided_stop: bool) -> PublishedState:
    """What `R/{machine}/state` shows for `category` (None: no state read yet), given
    whether the open stop is still shorter than the threshold."""
    if category is None:
        return "unknown"
    if category == UNPLANNED_STOP and undecided_stop:
        return "microstop"
    return STATE_NAMES[category]


class StatePayload(TypedDict):
    """The `R/{machine}/state` JSON document (docs/topics.md)."""

    ts: str
    state: PublishedState
    code: object


@dataclass(frozen=True, slots=True)
class StateChange:
    """A change of the published machine state (`R/{machine}/state`, docs/topics.md)."""

    ts: float
    state: PublishedState
    code: object

    def payload(self) -> StatePayload:
        """The `R/{machine}/state` JSON document."""
        return {"ts": rfc3339(self.ts), "state": self.state, "code": self.code}


class StateLog:
    """Changes of the published state since the last `pop`, and when the current one began."""

    __slots__ = ("_changes", "since")

    def __init__(self) -> None:
        # Bounded: a caller that never pops (the replay) must not grow memory without end.
        self._changes: deque[StateChange] = deque(maxlen=1024)
        self.since = 0.0

    def record(self, ts: float, state: PublishedState, code: object) -> None:
        """The published state became `state` at `ts`."""
        self.since = ts
        self._changes.append(StateChange(ts, state, code))

    def pop(self) -> list[StateChange]:
        """The changes since the last call (at most the last 1,024)."""
        changes = list(self._changes)
        self._changes.clear()
        return changes


class StateCodes:
    """The machine's state table: which category each configured code belongs to."""

    __slots__ = ("_by_bool", "_by_value")

    def __init__(self, *, state: MachineStateConfig) -> None:
        # True == 1 in Python: bool codes live apart so that a bool tag's True does not match
        # the integer code 1 (the config keeps them distinct too). The first listing wins.
        self._by_value: dict[object, StateCategory] = {}
        self._by_bool: dict[object, StateCategory] = {}
        groups = (
            (state.running, RUNNING),
            (state.planned_stop, PLANNED_STOP),
            (state.unplanned_stop, UNPLANNED_STOP),
        )
        for codes, category in groups:
            for code in codes:
                table = self._by_bool if isinstance(code, bool) else self._by_value
                table.setdefault(code, category)

    def category(self, code: object) -> StateCategory:
        """The category of a state reading; UNKNOWN for a value the table does not list."""
        try:
            table = self._by_bool if code.__class__ is bool else self._by_value
            return table.get(code, UNKNOWN)
        except TypeError:  # unhashable (a list): not a code of the mapping
            return UNKNOWN
