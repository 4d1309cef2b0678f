"""The thin live side of OEE: feeds each machine's `OeeEngine` from the pipeline's readings,
publishes `R/{machine}/state` on every change and `R/{machine}/oee` every publish_interval,
and commits state changes and each shift's final record to the outbox (durable)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.oee.counters import CounterName
from agent.oee.engine import OeeDiagnostics, OeeEngine
from agent.oee.records import OeeRecord
from agent.oee.state_timeline import StateTimeline
from agent.settings.config_file import AgentSettings
from agent.settings.machines import CalendarConfig, MachineConfig
from drivers.base import Reading
from sync.events import Event, dumps, json_safe
from sync.uplink.topics import machine_state_payload, machine_state_topic, oee_topic

log = logging.getLogger("edge_agent.oee")

Publish = Callable[[str, bytes], None]
Emit = Callable[[list[Event]], Awaitable[None]]
# (machine, its running shift record, or the rolling one outside shifts), at every report.
Report = Callable[[str, dict[str, Any]], None]
TagRole = Literal["state", "product"] | CounterName  # what a machine reads from a tag

# Final shift records kept per machine for the status page.
FINISHED_KEPT = 5

# Re-anchor the engine clock to the wall clock only for big steps (a clock fixed after boot):
# small NTP slews and steps must not create or remove production time.
REANCHOR_STEP = 60.0


class EngineClock:
    """Wall-clock time that advances with the monotonic clock: never goes backwards, and an
    NTP step of the wall clock does not change elapsed times (unless it is huge)."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._anchor_wall = wall()
        self._anchor_mono = monotonic()
        self._last = self._anchor_wall
        self.reanchors = 0

    def now(self) -> float:
        """The engine's current time (epoch seconds)."""
        derived = self._anchor_wall + (self._monotonic() - self._anchor_mono)
        wall = self._wall()
        if abs(wall - derived) > REANCHOR_STEP:
            self._anchor_wall, self._anchor_mono = wall, self._monotonic()
            derived = wall
            self.reanchors += 1
        self._last = max(self._last, derived)
        return self._last


@dataclass(slots=True)
class _Machine:
    config: MachineConfig
    engine: OeeEngine
    state_ref: tuple[str, str]  # (device, tag)
    counters: dict[tuple[str, str], CounterName]  # (device, tag) -> which counter
    product_ref: tuple[str, str] | None  # (device, tag) of the product tag, if any
    calendar: CalendarConfig
    last_report: OeeRecord | None = None
    # What the status page shows: the reports of the last publish, the published states, the
    # last finished shifts (newest last).
    shift_report: OeeRecord | None = None
    rolling_report: OeeRecord | None = None
    timeline: StateTimeline = field(default_factory=StateTimeline)
    finished: deque[OeeRecord] = field(default_factory=lambda: deque(maxlen=FINISHED_KEPT))

    @classmethod
    def start(cls, settings: AgentSettings, machine: MachineConfig) -> _Machine:
        """A machine with a fresh engine."""
        calendar = next(c for c in settings.calendars if c.name == machine.calendar)
        counters: dict[tuple[str, str], CounterName] = {}
        refs: tuple[tuple[CounterName, str | None], ...] = (
            ("total", machine.total_count),
            ("reject", machine.reject_count),
            ("good", machine.good_count),
        )
        for which, ref in refs:
            if ref is not None:
                counters[_device_tag(ref)] = which
        engine = OeeEngine.from_settings(settings, machine)
        product = None if machine.product is None else _device_tag(machine.product)
        return cls(machine, engine, _device_tag(machine.state.tag), counters, product, calendar)


@dataclass(frozen=True, slots=True)
class MachineView:
    """What the status page reads of one machine."""

    config: MachineConfig
    engine: OeeEngine
    shift: OeeRecord | None
    rolling: OeeRecord | None
    timeline: StateTimeline
    finished: tuple[OeeRecord, ...]


def _device_tag(ref: str) -> tuple[str, str]:
    device, _, tag = ref.partition("/")
    return device, tag


class LiveOee:
    """All machines of a config; `observe` is a pipeline observer, `run` the periodic task."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        publish: Publish,
        emit: Emit,
        clock: EngineClock | None = None,
        report: Report | None = None,
    ) -> None:
        self._root = settings.mqtt.topic_root
        self._publish = publish
        self._emit = emit
        self._on_report = report
        self._clock = clock or EngineClock()
        self._machines: list[_Machine] = []
        self._by_tag: dict[tuple[str, str], list[tuple[_Machine, TagRole]]] = {}
        self._wakeup = asyncio.Event()
        self.reconfigure(settings)

    def reconfigure(self, settings: AgentSettings) -> None:
        """Apply a (reloaded) config: machines whose config and calendar are unchanged keep
        their engine and its figures; changed and new machines start a fresh engine."""
        kept = {
            m.config.name: m
            for m in self._machines
            if m.config in settings.machines and m.calendar in settings.calendars
        }
        self._machines = []
        self._by_tag = {}
        for machine in settings.machines:
            entry = kept.get(machine.name)
            if entry is None or entry.config != machine:
                entry = _Machine.start(settings, machine)
            self._machines.append(entry)
            self._by_tag.setdefault(entry.state_ref, []).append((entry, "state"))
            for key, which in entry.counters.items():
                self._by_tag.setdefault(key, []).append((entry, which))
            if entry.product_ref is not None:
                self._by_tag.setdefault(entry.product_ref, []).append((entry, "product"))

    @property
    def machines(self) -> dict[str, OeeRecord | None]:
        """The last shift (or rolling) report per machine, for the health data and the demo."""
        return {m.config.name: m.last_report for m in self._machines}

    def page_machines(self) -> list[MachineView]:
        """Each machine as the status page shows it (its engine, reports, states, shifts)."""
        return [
            MachineView(
                config=m.config,
                engine=m.engine,
                shift=m.shift_report,
                rolling=m.rolling_report,
                timeline=m.timeline,
                finished=tuple(m.finished),
            )
            for m in self._machines
        ]

    def engine(self, name: str) -> OeeEngine | None:
        """The engine of one machine."""
        return next((m.engine for m in self._machines if m.config.name == name), None)

    def diagnostics(self) -> dict[str, OeeDiagnostics]:
        """Per machine, the readings its engine corrected or ignored (for /metrics). A machine
        whose config changed starts a new engine, and so its counts start again at 0."""
        return {m.config.name: m.engine.diagnostics() for m in self._machines}

    @property
    def clock_reanchors(self) -> int:
        """How often the engine clock re-anchored to a wall clock that stepped (for /metrics)."""
        return self._clock.reanchors

    def observe(self, device: str, readings: list[Reading]) -> None:
        """Pipeline observer: every reading of a mapped tag goes into its engines."""
        now = self._clock.now()
        touched = False
        for reading in readings:
            targets = self._by_tag.get((device, reading.tag))
            if not targets:
                continue
            for machine, which in targets:
                touched = True
                if which == "state":
                    machine.engine.on_state(now, reading.value, reading.quality)
                elif which == "product":
                    machine.engine.on_product(now, reading.value, reading.quality)
                else:
                    machine.engine.on_count(now, which, reading.value, reading.quality)
        if touched:
            self._wakeup.set()

    async def run(self) -> None:
        """Publish state changes as they happen and reports every publish_interval."""
        next_report: dict[str, float] = {}
        while True:
            try:
                async with asyncio.timeout(1.0):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            now = self._clock.now()
            monotonic = time.monotonic()
            for machine in self._machines:
                machine.engine.advance(now)
                await self._flush(machine)
                if monotonic >= next_report.get(machine.config.name, 0.0):
                    next_report[machine.config.name] = monotonic + machine.config.publish_interval
                    self._report(machine)

    async def _flush(self, machine: _Machine) -> None:
        name = machine.config.name
        events: list[Event] = []
        changes = machine.engine.pop_state_changes()
        machine.timeline.add(changes)
        for change in changes:
            payload = change.payload()
            self._publish(
                machine_state_topic(self._root, name),
                machine_state_payload(change.ts, payload["state"], payload.get("code")),
            )
            events.append(Event(change.ts, "state", name, "state", json_safe(payload), "good"))
        for record in machine.engine.pop_finished():
            log.info(
                "machine %s: shift %s ended, OEE %s",
                name,
                record["window"].get("name"),
                record.get("oee"),
            )
            machine.finished.append(record)
            events.append(Event(self._clock.now(), "oee", name, "oee", json_safe(record), "good"))
            self._publish(oee_topic(self._root, name), dumps(json_safe(record)))
        if events:
            await self._emit(events)

    def _report(self, machine: _Machine) -> None:
        topic = oee_topic(self._root, machine.config.name)
        rolling = machine.engine.report_rolling()
        shift = machine.engine.report_shift()
        # Two retained records need two topics: R/{machine}/oee holds the running shift (then,
        # after it, that shift's final record), R/{machine}/oee/rolling the rolling window.
        if shift is not None:
            self._publish(topic, dumps(json_safe(shift)))
        if rolling is not None:
            self._publish(f"{topic}/rolling", dumps(json_safe(rolling)))
        machine.last_report = shift or rolling
        machine.shift_report, machine.rolling_report = shift, rolling
        if self._on_report is not None and machine.last_report is not None:
            self._on_report(machine.config.name, json_safe(machine.last_report))
