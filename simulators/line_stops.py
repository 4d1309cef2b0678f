"""Random stops of a running machine: faults, starvation and changeovers.

Each kind of stop falls due after an exponentially distributed stretch of *running* time (the
machine cannot fault while it stands), so the schedule only moves while the line runs. The
means and durations are in simulators/README.md ("The line model").
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from simulators.line_points import MachineState

__all__ = ["Episode", "StopSchedule"]


@dataclass
class Episode:
    """A stop in progress: fault, changeover or starvation, with the time it still lasts."""

    state: MachineState
    remaining_s: float
    fault_code: int = 0
    reason: str = ""

    @classmethod
    def forced(cls, code: int, fault_code: int, duration_s: float | None) -> Episode | None:
        """The stop ``LineModel.force_state`` puts the machine in (None for off and running)."""
        if code not in {member.value for member in MachineState}:
            raise ValueError(f"state code must be 0..4, got {code}")
        if code == MachineState.UNPLANNED_STOP:
            fault_code = fault_code or 1
            if not 1 <= fault_code <= 9:
                raise ValueError("fault_code must be within 1..9")
        elif fault_code:
            raise ValueError("fault_code is only valid with state 2")
        remaining = math.inf if duration_s is None else float(duration_s)
        if not remaining > 0:
            raise ValueError("duration_s must be > 0")
        if code in (MachineState.OFF, MachineState.RUNNING):
            return None
        reason = {
            MachineState.UNPLANNED_STOP: "forced_fault",
            MachineState.PLANNED_STOP: "forced_planned_stop",
            MachineState.STARVED: "forced_starved",
        }[MachineState(code)]
        return cls(MachineState(code), remaining, fault_code, reason)


class StopSchedule:
    """When the next fault, starvation and changeover fall due, and what each stop looks like."""

    def __init__(
        self,
        *,
        rng: random.Random,
        mean_time_between_faults_s: float,
        microstop_share: float,
        mean_time_between_starved_s: float,
        mean_time_between_changeovers_s: float,
    ) -> None:
        """Draw the first due times from ``rng`` (shared with the model's other event draws)."""
        if not 0.0 <= microstop_share <= 1.0:
            raise ValueError("microstop_share must be within 0..1")
        for name, mean in (
            ("mean_time_between_faults_s", mean_time_between_faults_s),
            ("mean_time_between_starved_s", mean_time_between_starved_s),
            ("mean_time_between_changeovers_s", mean_time_between_changeovers_s),
        ):
            if not mean > 0:
                raise ValueError(f"{name} must be > 0 (math.inf disables the event)")
        self._rng = rng
        self._mtbf_s = mean_time_between_faults_s
        self._microstop_share = microstop_share
        self._mtb_starved_s = mean_time_between_starved_s
        self._mtb_changeover_s = mean_time_between_changeovers_s
        self._next_fault_in = self._draw_exp(self._mtbf_s)
        self._next_starved_in = self._draw_exp(self._mtb_starved_s)
        self._next_changeover_in = self._draw_exp(self._mtb_changeover_s)

    def next_due_in(self) -> float:
        """Running time until the first stop falls due (may be <= 0 when several fell due)."""
        return min(self._next_fault_in, self._next_starved_in, self._next_changeover_in)

    def elapse(self, running_s: float) -> None:
        """Count ``running_s`` seconds of running time towards every stop."""
        self._next_fault_in -= running_s
        self._next_starved_in -= running_s
        self._next_changeover_in -= running_s

    def due_stop(self) -> Episode | None:
        """The stop that fell due, if any (one per call, fault first), and redraw its due time."""
        if self._next_fault_in <= 0:
            self._next_fault_in = self._draw_exp(self._mtbf_s)
            if self._rng.random() < self._microstop_share:
                # Jams and the like: short stops (< 2 min) that OEE counts as microstops.
                code = self._rng.randint(1, 3)
                duration = self._rng.uniform(5.0, 90.0)
            else:
                code = self._rng.randint(4, 9)
                duration = self._rng.uniform(150.0, 900.0)
            return Episode(MachineState.UNPLANNED_STOP, duration, code, "fault")
        if self._next_starved_in <= 0:
            self._next_starved_in = self._draw_exp(self._mtb_starved_s)
            duration = self._rng.uniform(15.0, 240.0)
            return Episode(MachineState.STARVED, duration, 0, "starved")
        if self._next_changeover_in <= 0:
            self._next_changeover_in = self._draw_exp(self._mtb_changeover_s)
            duration = self._rng.uniform(300.0, 900.0)
            return Episode(MachineState.PLANNED_STOP, duration, 0, "changeover")
        return None

    def _draw_exp(self, mean: float) -> float:
        """Draw an exponential running-time interval (``inf`` disables the event)."""
        if math.isinf(mean):
            return math.inf
        return self._rng.expovariate(1.0 / mean)
