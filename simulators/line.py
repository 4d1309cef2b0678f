"""Deterministic model of one production machine, shared by the Modbus and OPC UA simulators.

Pure: no I/O, no asyncio, no clock reads. Time only moves through ``advance(dt_seconds)``
(simulated seconds) and every random draw comes from ``random.Random(seed)``, so the same seed
and the same sequence of ``advance()``/``write()`` calls always give the same values.

The simulation is event driven: ``advance`` jumps from event to event (cycle completed, fault,
starvation, changeover, end of a stop) instead of sampling on a fixed grid, so a large ``dt``
costs one loop iteration per event, not per millisecond.

Point names and write rules live in ``line_points.py``, the random stops (faults, starvation,
changeovers) in ``line_stops.py``.
"""

from __future__ import annotations

import math
import random
from typing import Final

from simulators.line_points import (
    PRODUCT_CODE_MAX,
    TARGET_QTY_MAX,
    MachineState,
    PointValue,
    check_name,
    check_uint,
    validate_point,
)
from simulators.line_stops import Episode, StopSchedule

__all__ = [
    "BulkBlock",
    "LineModel",
    "MachineState",
    "PointValue",
]

# Electrical power drawn per state (kW), integrated into energy_kwh.
_POWER_KW: Final = {0: 0.3, 1: 7.5, 2: 2.0, 3: 1.5, 4: 2.0}
# Temperature the machine settles at when running / not running, and how fast (s).
_TEMP_RUNNING_C: Final = 62.0
_TEMP_IDLE_C: Final = 28.0
_TEMP_TAU_S: Final = 240.0
# PLC scan counter frequency for cycle_counter16 (wraps every 655 simulated seconds).
_SCAN_HZ: Final = 100


class _Temperature:
    """Machine temperature: lags towards the running or idle level, drifts, is read with noise."""

    def __init__(self, *, seed: int) -> None:
        """Start at 55 °C with no drift; ``seed`` seeds the noise stream."""
        # Its own random stream: noise is drawn per advance() call and must not shift the
        # event draws, so that splitting the same time differently gives the same events.
        self._noise_rng = random.Random(f"noise-{seed}")
        self._base = 55.0
        self._drift = 0.0
        self.value = self._base

    def integrate(self, step: float, *, running: bool) -> None:
        """Move the true temperature forward by ``step`` seconds."""
        target = _TEMP_RUNNING_C if running else _TEMP_IDLE_C
        self._base = target + (self._base - target) * math.exp(-step / _TEMP_TAU_S)
        # Slow mean-reverting drift (ambient, sensor ageing): ±1-2 °C over tens of minutes.
        self._drift *= math.exp(-step / 1800.0)
        self._drift += self._noise_rng.gauss(0.0, 0.02 * math.sqrt(step))

    def measure(self) -> None:
        """Take a reading: the true temperature plus measurement noise."""
        self.value = round(self._base + self._drift + self._noise_rng.gauss(0.0, 0.15), 3)


class _Commands:
    """The latched command coils and their interlocks."""

    def __init__(
        self,
        *,
        start: bool = True,
        stop: bool = False,
        quality_hold: bool = False,
        maintenance_lock: bool = False,
    ) -> None:
        """Coils as given (the default: commanded on, nothing held or locked)."""
        # start and stop are mutually exclusive: writing one clears the other, so each reads
        # back as written and "commanded on" is simply ``start``.
        self.start = start
        self.stop = stop
        self.quality_hold = quality_hold
        self.maintenance_lock = maintenance_lock

    def write(self, point: str, value: bool) -> None:
        """Apply a validated write to the coil ``point``."""
        if point == "start":
            if self.maintenance_lock:
                return  # a locked-out machine ignores start; the coil stays False
            self.start = value
            if value:
                self.stop = False
        elif point == "stop":
            self.stop = value
            if value:
                self.start = False
        elif point == "quality_hold":
            self.quality_hold = value
        elif point == "maintenance_lock":
            self.maintenance_lock = value
            if value:
                # Lockout drops the run command: after unlocking, an explicit start is needed.
                self.start = False


class LineModel:
    """One machine of a production line: states, cycles, counters, temperature, energy."""

    def __init__(
        self,
        *,
        seed: int,
        ideal_cycle_time: float = 1.2,
        counter_bits: int = 32,
        reject_rate: float = 0.03,
        mean_time_between_faults_s: float = 600.0,
        microstop_share: float = 0.8,
        mean_time_between_starved_s: float = 1800.0,
        mean_time_between_changeovers_s: float = 7200.0,
        mean_slowdown: float = 0.06,
        initial_total: int = 0,
        initial_reject: int = 0,
        product_code: int = 1,
        product_name: str = "PART-A",
        target_qty: int = 0,
    ) -> None:
        """Create a running machine; all randomness derives from ``seed``."""
        if counter_bits not in (16, 32):
            raise ValueError("counter_bits must be 16 or 32")
        if not ideal_cycle_time > 0:
            raise ValueError("ideal_cycle_time must be > 0")
        if not 0.0 <= reject_rate <= 1.0:
            raise ValueError("reject_rate must be within 0..1")
        if mean_slowdown < 0:
            raise ValueError("mean_slowdown must be >= 0")
        self.seed: Final = seed
        self.ideal_cycle_time: Final = float(ideal_cycle_time)
        self.counter_bits: Final = counter_bits
        self.counter_modulus: Final = 1 << counter_bits
        self.reject_rate: Final = reject_rate
        self._mean_slowdown = mean_slowdown
        # Two streams: discrete events (cycles, rejects, stops) draw from _rng only when an
        # event fires, measurement noise from the temperature's own stream, so the event
        # trajectory does not depend on how the same total time is split into advance() calls
        # (the simulator's tick jitter).
        self._rng = random.Random(seed)

        mod = self.counter_modulus
        if not 0 <= initial_total < mod or not 0 <= initial_reject < mod:
            raise ValueError(f"initial counters must fit in {counter_bits} bits")
        self._total = initial_total
        self._reject = initial_reject
        self._good = (initial_total - initial_reject) % mod

        self._commands = _Commands()

        self._product_code = check_uint("product_code", product_code, PRODUCT_CODE_MAX)
        self._product_name = check_name(product_name)
        self._target_qty = check_uint("target_qty", target_qty, TARGET_QTY_MAX)
        self._order_count = 0
        self._order_done = False

        self._episode: Episode | None = None
        self._sim_time_s = 0.0
        self._runtime_s = 0.0
        self._energy_kwh = 0.0
        self._temperature = _Temperature(seed=seed)
        self._cycle_time_s = self._draw_cycle_time()
        self._cycle_remaining_s = self._cycle_time_s
        self._last_cycle_s = self._cycle_time_s
        # Drawn after the first cycle time: the order of draws from _rng is part of the seed's
        # trajectory.
        self._stops = StopSchedule(
            rng=self._rng,
            mean_time_between_faults_s=mean_time_between_faults_s,
            microstop_share=microstop_share,
            mean_time_between_starved_s=mean_time_between_starved_s,
            mean_time_between_changeovers_s=mean_time_between_changeovers_s,
        )
        self.revision = 0
        self.write_history: list[tuple[float, str, PointValue]] = []

    # ------------------------------------------------------------------ derived values

    @property
    def state(self) -> int:
        """Current state code (0 off, 1 running, 2 unplanned, 3 planned, 4 starved)."""
        if self._commands.maintenance_lock:
            return MachineState.PLANNED_STOP
        if not self._commands.start:
            return MachineState.OFF
        if self._commands.quality_hold:
            return MachineState.PLANNED_STOP
        if self._episode is not None:
            return self._episode.state
        return MachineState.RUNNING

    @property
    def fault_code(self) -> int:
        """Fault code 1..9 while in unplanned stop (2), else 0."""
        if self.state == MachineState.UNPLANNED_STOP and self._episode is not None:
            return self._episode.fault_code
        return 0

    @property
    def stop_reason(self) -> str:
        """Human-readable reason of the current stop ('' while running)."""
        state = self.state
        if state == MachineState.RUNNING:
            return ""
        if self._commands.maintenance_lock:
            return "maintenance_lock"
        if state == MachineState.OFF:
            return "order_done" if self._order_done else "stopped"
        if self._commands.quality_hold:
            return "quality_hold"
        return self._episode.reason if self._episode is not None else ""

    @property
    def total_count(self) -> int:
        """Cumulative produced parts, ``counter_bits`` wide, rolls over."""
        return self._total

    @property
    def reject_count(self) -> int:
        """Cumulative rejected parts, ``counter_bits`` wide, rolls over."""
        return self._reject

    @property
    def good_count(self) -> int:
        """Cumulative good parts, ``counter_bits`` wide, rolls over."""
        return self._good

    @property
    def temperature(self) -> float:
        """Machine temperature in °C."""
        return self._temperature.value

    @property
    def sim_time_s(self) -> float:
        """Simulated seconds since the model was created."""
        return self._sim_time_s

    @property
    def runtime_s(self) -> float:
        """Simulated seconds spent running."""
        return self._runtime_s

    @property
    def energy_kwh(self) -> float:
        """Energy consumed in kWh."""
        return self._energy_kwh

    @property
    def cycle_counter16(self) -> int:
        """PLC scan counter at 100 Hz of simulated time, uint16, wraps every 655 s."""
        return int(self._sim_time_s * _SCAN_HZ) & 0xFFFF

    @property
    def last_cycle_ms(self) -> int:
        """Duration of the last completed cycle in ms (uint16)."""
        return min(round(self._last_cycle_s * 1000), 0xFFFF)

    @property
    def product_code(self) -> int:
        """Current product code (0..9999)."""
        return self._product_code

    @property
    def product_name(self) -> str:
        """Current product name (ASCII, up to 16 characters)."""
        return self._product_name

    @property
    def target_qty(self) -> int:
        """Order quantity (0 = no order limit)."""
        return self._target_qty

    @property
    def order_count(self) -> int:
        """Parts produced since target_qty was last written."""
        return self._order_count

    @property
    def order_done(self) -> bool:
        """True once order_count reached a non-zero target_qty."""
        return self._order_done

    @property
    def start(self) -> bool:
        """Start coil (the machine is commanded on)."""
        return self._commands.start

    @property
    def stop(self) -> bool:
        """Stop coil (latched until start is written)."""
        return self._commands.stop

    @property
    def quality_hold(self) -> bool:
        """Quality hold coil."""
        return self._commands.quality_hold

    @property
    def maintenance_lock(self) -> bool:
        """Maintenance lock coil."""
        return self._commands.maintenance_lock

    def snapshot(self) -> dict[str, PointValue]:
        """Return every point's current value keyed by point name."""
        state = self.state
        mask16 = 0xFFFF
        return {
            "state": int(state),
            "fault_code": self.fault_code,
            "stop_reason": self.stop_reason,
            "running": state == MachineState.RUNNING,
            "faulted": state == MachineState.UNPLANNED_STOP,
            "starved": state == MachineState.STARVED,
            "order_done": self._order_done,
            "start": self._commands.start,
            "stop": self._commands.stop,
            "quality_hold": self._commands.quality_hold,
            "maintenance_lock": self._commands.maintenance_lock,
            "total_count": self._total,
            "reject_count": self._reject,
            "good_count": self._good,
            "total_count16": self._total & mask16,
            "reject_count16": self._reject & mask16,
            "last_cycle_ms": self.last_cycle_ms,
            "temperature": self._temperature.value,
            "product_code": self._product_code,
            "target_qty": self._target_qty,
            "order_count": self._order_count,
            "product_name": self._product_name,
            "runtime_s": self._runtime_s,
            "energy_kwh": self._energy_kwh,
            "cycle_counter16": self.cycle_counter16,
            "sim_time_s": self._sim_time_s,
        }

    # ------------------------------------------------------------------ commands / writes

    def validate(self, point: str, value: object) -> PointValue:
        """Return ``value`` normalised for ``point`` or raise ValueError (KeyError if unknown)."""
        return validate_point(point, value)

    def write(self, point: str, value: object) -> None:
        """Validate and apply a write to a writable point, and record it."""
        value = self.validate(point, value)
        self.write_history.append((self._sim_time_s, point, value))
        self.revision += 1
        if isinstance(value, bool):  # the command coils, the only bool points
            self._commands.write(point, value)
        elif point == "product_code":
            assert isinstance(value, int)
            self._product_code = value
        elif point == "target_qty":
            assert isinstance(value, int)
            # A new target starts a new order.
            self._target_qty = value
            self._order_count = 0
            self._order_done = False
        elif point == "product_name":
            assert isinstance(value, str)
            self._product_name = value

    def force_state(self, code: int, fault_code: int = 0, duration_s: float | None = None) -> None:
        """Put the machine into state ``code`` now (for tests); None duration = until changed."""
        episode = Episode.forced(code, fault_code, duration_s)
        self.revision += 1
        off = code == MachineState.OFF
        self._commands = _Commands(start=not off, stop=off)
        self._episode = episode

    # ------------------------------------------------------------------ time

    def advance(self, dt_seconds: float) -> None:
        """Advance the simulation by ``dt_seconds`` of simulated time."""
        if not (dt_seconds >= 0 and math.isfinite(dt_seconds)):
            raise ValueError(f"dt_seconds must be finite and >= 0, got {dt_seconds}")
        if dt_seconds == 0:
            return
        self.revision += 1
        remaining = float(dt_seconds)
        while remaining > 0:
            state = self.state
            step = remaining
            if state == MachineState.RUNNING:
                # Events that fell due together fire one per iteration, so clamp at 0.
                step = max(0.0, min(step, self._cycle_remaining_s, self._stops.next_due_in()))
            elif self._episode is not None:
                step = max(0.0, min(step, self._episode.remaining_s))
            self._integrate(state, step)
            remaining -= step
            if state == MachineState.RUNNING:
                self._run_events()
            if self._episode is not None and self._episode.remaining_s <= 0:
                self._episode = None
        # Measurement noise is drawn once per call so it does not depend on event density.
        self._temperature.measure()

    def _integrate(self, state: int, step: float) -> None:
        """Move continuous quantities forward by ``step`` seconds in ``state``."""
        self._sim_time_s += step
        self._energy_kwh += _POWER_KW[state] * step / 3600.0
        self._temperature.integrate(step, running=state == MachineState.RUNNING)
        if self._episode is not None:
            self._episode.remaining_s -= step
        if state == MachineState.RUNNING:
            self._runtime_s += step
            self._cycle_remaining_s -= step
            self._stops.elapse(step)

    def _run_events(self) -> None:
        """Fire whichever running-time events fell due at the current instant."""
        if self._cycle_remaining_s <= 0:
            self._complete_cycle()
        if self.state != MachineState.RUNNING:
            return  # the order just completed and stopped the machine
        episode = self._stops.due_stop()
        if episode is not None:
            self._episode = episode

    def _complete_cycle(self) -> None:
        """Count one part and start the next cycle."""
        mod = self.counter_modulus
        self._total = (self._total + 1) % mod
        if self._rng.random() < self.reject_rate:
            self._reject = (self._reject + 1) % mod
        else:
            self._good = (self._good + 1) % mod
        self._last_cycle_s = self._cycle_time_s
        self._cycle_time_s = self._draw_cycle_time()
        self._cycle_remaining_s = self._cycle_time_s
        self._order_count += 1
        if self._target_qty and self._order_count >= self._target_qty:
            # A finished order stops the machine by command, like a PLC batch counter.
            self._order_done = True
            self._commands.start = False

    def _draw_cycle_time(self) -> float:
        """Draw a cycle time, never faster than ideal, slower by ``mean_slowdown`` on average."""
        slowdown = abs(self._rng.gauss(0.0, self._mean_slowdown * math.sqrt(math.pi / 2)))
        return self.ideal_cycle_time * (1.0 + slowdown)


class BulkBlock:
    """Deterministic uint16 registers for load tests, a fixed share changing per simulated second.

    Register ``i`` at simulated second ``t`` is computed in O(1) without history: the registers
    are visited in a seeded random order, ``k = round(fraction * size)`` of them per second, and
    each visit adds the register's own odd step to its base value (mod 2**16). So exactly ``k``
    registers change between two consecutive seconds, and nothing is rebuilt per request.
    """

    def __init__(self, *, seed: int, size: int = 5000, change_fraction: float = 0.1) -> None:
        """Prepare ``size`` registers of which ``change_fraction`` change per simulated second."""
        if size <= 0:
            raise ValueError("size must be > 0")
        if not 0.0 <= change_fraction <= 1.0:
            raise ValueError("change_fraction must be within 0..1")
        rng = random.Random(f"bulk-{seed}")
        self.size: Final = size
        self.change_fraction: Final = change_fraction
        self._per_second = round(change_fraction * size)
        self._base = [rng.randrange(0x10000) for _ in range(size)]
        self._step = [rng.randrange(1, 0x10000, 2) for _ in range(size)]
        order = list(range(size))
        rng.shuffle(order)
        self._position = [0] * size
        for pos, index in enumerate(order):
            self._position[index] = pos

    def value(self, index: int, sim_time_s: float) -> int:
        """Value of register ``index`` at simulated time ``sim_time_s``."""
        visits = int(sim_time_s) * self._per_second
        full, rest = divmod(visits, self.size)
        count = full + (1 if self._position[index] < rest else 0)
        return (self._base[index] + count * self._step[index]) & 0xFFFF

    def values(self, start: int, count: int, sim_time_s: float) -> list[int]:
        """Values of registers ``start .. start+count-1`` at ``sim_time_s``."""
        if start < 0 or count < 0 or start + count > self.size:
            raise IndexError("bulk range out of bounds")
        visits = int(sim_time_s) * self._per_second
        full, rest = divmod(visits, self.size)
        base, step, position = self._base, self._step, self._position
        return [
            (base[i] + (full + (position[i] < rest)) * step[i]) & 0xFFFF
            for i in range(start, start + count)
        ]
