"""Steps of the wall clock (an NTP correction, a person setting the time): detected, logged and
recorded where they happen (docs/reliability.md, "Clock steps").

Every duration, timeout and backoff of the agent runs on the monotonic clock; event timestamps
are the wall clock, so a step moves the timestamps of the events after it. Once a second the
wall clock's progress is compared with the monotonic clock's: a difference of more than
`STEP_THRESHOLD` is a step, committed as one ``agent`` event
``{"event": "clock_step", "step_s": ...}`` (negative: stepped back) among the events it
separates, so that a central consumer knows where event times jump.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from sync.events import Event

log = logging.getLogger("edge_agent.clock")

# NTP slews at most 500 ppm (0.5 ms per second): a second-to-second difference beyond this is a
# step, not a slew.
STEP_THRESHOLD = 1.0
CHECK_INTERVAL = 1.0


class ClockStepWatch:
    """Compares the wall clock with the monotonic clock; `check` returns a step's event."""

    def __init__(
        self,
        wall: Callable[[], float] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        # Looked up when the watch is made (not when this module is imported): a test that
        # injects the wall clock by replacing time.time before the daemon starts is seen.
        self._wall = wall or time.time
        self._monotonic = monotonic or time.monotonic
        self._last_wall = self._wall()
        self._last_monotonic = self._monotonic()
        self.steps = 0

    def check(self) -> Event | None:
        """The ``clock_step`` event when the wall clock stepped since the last check."""
        wall, monotonic = self._wall(), self._monotonic()
        step = (wall - self._last_wall) - (monotonic - self._last_monotonic)
        self._last_wall, self._last_monotonic = wall, monotonic
        if abs(step) <= STEP_THRESHOLD:
            return None
        self.steps += 1
        log.warning(
            "the wall clock stepped %s by %.3f s: event timestamps jump here; durations, "
            "timeouts and backoffs are unaffected (monotonic clock)",
            "back" if step < 0 else "forward",
            abs(step),
        )
        return Event(wall, "agent", value={"event": "clock_step", "step_s": round(step, 3)})

    async def run(self, emit: Callable[[list[Event]], Awaitable[None]]) -> None:
        """Check every `CHECK_INTERVAL` until cancelled; commit each step's event."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            event = self.check()
            if event is not None:
                await emit([event])
