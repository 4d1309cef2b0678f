"""Failpoints: named places in the saga code where a test can make the agent die (kill -9).

Tests only. Set ``EDGE_AGENT_FAILPOINTS`` before the agent starts, e.g.
``saga.after_write_sent=kill`` (the first time that point is reached) or
``saga.before_write=kill@3`` (the third time); several entries are separated by commas.
Actions: ``kill`` sends SIGKILL to the agent's own process (nothing is flushed, exactly like a
power cut of the process); ``raise`` raises `FailpointError` (for in-process tests).

Unset, a failpoint costs one attribute test: the variable is read once, when a
`Failpoints` object is made at startup, into an immutable mapping; the only mutable state is
the hit counters, owned by that object.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

ENV_VAR = "EDGE_AGENT_FAILPOINTS"

# Every failpoint the saga code has; a misspelt name in the variable is an error, not a test
# that silently never kills anything.
KNOWN_POINTS: frozenset[str] = frozenset(
    {
        "saga.after_accept",  # saga row committed; before the started event and the reply
        "saga.before_write",  # write intent committed; the write is not sent yet
        "saga.after_write_sent",  # the write returned; its result is not committed yet
        "saga.after_step_committed",  # a step's outcome committed; the next step not begun
        "saga.before_wait",  # wait intent committed
        "saga.before_confirm",  # confirm intent committed
        "saga.before_finish",  # every step settled; the final state not committed yet
        "saga.before_compensate",  # state 'compensating' committed; nothing undone yet
        "saga.before_compensate_write",  # compensation intent committed; write not sent
        "saga.after_compensate_sent",  # compensation write returned; result not committed
        "saga.after_compensate_committed",  # a compensation's outcome committed
    }
)

Action = Literal["kill", "raise"]
_ENTRY = re.compile(r"^([a-z_.]+)=(kill|raise)(?:@([1-9][0-9]{0,5}))?$")


class FailpointError(Exception):
    """Raised by a failpoint whose action is ``raise``."""


@dataclass(frozen=True, slots=True)
class Failpoint:
    """What to do at a point, and on which hit (None: every hit)."""

    action: Action
    hit: int | None = None


def parse_failpoints(text: str) -> Mapping[str, Failpoint]:
    """Parse ``"name=kill@3,other=raise"`` into an immutable mapping (ValueError if invalid)."""
    points: dict[str, Failpoint] = {}
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        match = _ENTRY.fullmatch(entry)
        if match is None:
            raise ValueError(f"{ENV_VAR}: invalid entry {entry!r}; write NAME=kill[@N]")
        name, action, hit = match.group(1), match.group(2), match.group(3)
        if name not in KNOWN_POINTS:
            raise ValueError(
                f"{ENV_VAR}: unknown failpoint {name!r}; known: {', '.join(sorted(KNOWN_POINTS))}"
            )
        points[name] = Failpoint(action, int(hit) if hit else None)  # type: ignore[arg-type]
    return MappingProxyType(points)


class Failpoints:
    """The armed failpoints of one agent process, with their hit counters."""

    def __init__(self, points: Mapping[str, Failpoint] | None = None) -> None:
        self._points: Mapping[str, Failpoint] = MappingProxyType(dict(points or {}))
        self._hits: dict[str, int] = {}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Failpoints:
        """Read ``EDGE_AGENT_FAILPOINTS`` once (unset or empty: nothing armed)."""
        source = os.environ if environ is None else environ
        return cls(parse_failpoints(source.get(ENV_VAR, "")))

    @property
    def armed(self) -> bool:
        """Whether any failpoint is armed."""
        return bool(self._points)

    def hits(self, name: str) -> int:
        """How often `name` was reached (counted only while something is armed)."""
        return self._hits.get(name, 0)

    def hit(self, name: str) -> None:
        """Reach failpoint `name`: do nothing unless armed for this hit."""
        if not self._points:
            return
        count = self._hits.get(name, 0) + 1
        self._hits[name] = count
        point = self._points.get(name)
        if point is None or (point.hit is not None and point.hit != count):
            return
        if point.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise FailpointError(f"failpoint {name} (hit {count})")
