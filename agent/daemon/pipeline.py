"""Readings -> events: report by exception with deadband, heartbeats, quality transitions.

The filter is pure (time is passed in); `Pipeline` commits events to the durable outbox first,
then offers them to every sink (sync/uplink/sink.py), and hands every raw reading to observers
(OEE, workflow wait steps), which need each value, not only the published ones. A poller does
not wait for the commit: its events are queued for the outbox's next group commit and offered
to the sinks, in order, when it returned (docs/delivery.md, "Accepted means committed"); it
waits only while the outbox's queue is full.

An event carries the value at its tag's precision (`TagConfigBase.published_value`: 56.9, not
56.900000000000006), and the filter compares those: a change finer than what is published
would publish the same text again. Observers get the readings as read: OEE sums and averages
what it is given, and rounding each reading first would add one rounding error per reading.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from drivers.base import JsonValue, Reading
from sync.events import Event
from sync.outbox.store import OnCommit
from sync.uplink.sink import Sink

log = logging.getLogger("edge_agent.pipeline")

Observer = Callable[[str, list[Reading]], None]
Precision = Callable[[JsonValue], JsonValue]


class Durable(Protocol):
    """Where events are committed before they are published: the outbox (`Outbox.submit`)."""

    def submit(self, events: Sequence[Event], on_commit: OnCommit) -> None:
        """Queue `events`; `on_commit` runs once they are committed (None) or refused."""
        ...

    async def room(self) -> None:
        """Wait while the commit queue is full."""
        ...


@dataclass(slots=True, eq=False)
class _Uncommitted:
    """Events submitted to the outbox, published once they and all before them are done."""

    events: list[Event]
    done: bool = False
    error: Exception | None = field(default=None)


def as_read(value: JsonValue) -> JsonValue:
    """The precision of a tag whose config sets none: the value as the driver read it."""
    return value


@dataclass(slots=True)
class TagFilter:
    """Decides which readings of one tag become events."""

    deadband: float | None
    max_interval: float
    published: Precision = as_read  # the tag's `published_value`
    value: JsonValue = None  # the last published value, at the tag's precision
    quality: str | None = None
    published_at: float = -math.inf  # monotonic time of the last event
    ts: float = 0.0  # wall time of the last reading

    def offer(self, reading: Reading, now: float) -> bool:
        """Whether `reading` (at monotonic `now`) must be published; updates the state (its
        value at the tag's precision is then `value`)."""
        value = self.published(reading.value)
        publish = self._changed(reading.quality, value) or (
            reading.quality != "bad" and now - self.published_at >= self.max_interval
        )
        if publish:
            self.value = value
            self.quality = reading.quality
            self.published_at = now
        self.ts = reading.ts
        return publish

    def _changed(self, quality: str, new: JsonValue) -> bool:
        if quality != self.quality:
            return True
        if quality == "bad":
            return False  # once per transition, not once per poll
        old = self.value
        if type(old) is not type(new):
            return True
        if (
            self.deadband is not None
            and isinstance(new, int | float)
            and isinstance(old, int | float)
            and not isinstance(new, bool)
        ):
            return abs(new - old) > self.deadband
        return bool(new != old)

    def heartbeat_due(self, now: float) -> bool:
        """A good value that has not been published for max_interval."""
        return (
            self.quality in ("good", "uncertain") and now - self.published_at >= self.max_interval
        )


class Pipeline:
    """Per-tag filters, the commit, and the fan-out to sinks."""

    def __init__(
        self,
        *,
        sinks: Sequence[Sink],
        durable: Durable | None = None,
        live: Sequence[Sink] = (),
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._sinks = tuple(sinks)
        self._durable = durable
        # The sinks of live values (newest value per topic): they still get the samples the
        # outbox refuses (disk full), so that dashboards keep showing the line.
        self._live = tuple(live)
        self.durable_error: str | None = None
        self._clock = clock
        self._wall = wall
        self._filters: dict[tuple[str, str], TagFilter] = {}
        self._observers: list[Observer] = []
        self.events_total = 0
        self._durable_down = False
        # Submitted to the outbox and not yet published, in submit order.
        self._uncommitted: deque[_Uncommitted] = deque()
        self._settled = asyncio.Event()

    @property
    def durable_down(self) -> bool:
        """Whether the last durable append failed (the outbox refuses events)."""
        return self._durable_down

    def configure_tag(
        self,
        device: str,
        tag: str,
        *,
        deadband: float | None,
        max_interval: float,
        published: Precision = as_read,
    ) -> None:
        """Register (or re-register after a reload) the filter of a tag; `published` gives a
        value at the tag's precision."""
        old = self._filters.get((device, tag))
        new = TagFilter(deadband, max_interval, published)
        if old is not None:
            new.value, new.quality, new.published_at, new.ts = (
                old.value,
                old.quality,
                old.published_at,
                old.ts,
            )
        self._filters[(device, tag)] = new

    def latest(self, device: str, tag: str) -> TagFilter | None:
        """The filter of a tag: its last published value and quality, its last reading's time
        (read-only, for the status page)."""
        return self._filters.get((device, tag))

    def forget_device(self, device: str) -> None:
        """Drop the filters of a removed device."""
        for key in [key for key in self._filters if key[0] == device]:
            del self._filters[key]

    def add_observer(self, observer: Observer) -> None:
        """Receive every raw reading (unfiltered)."""
        self._observers.append(observer)

    async def submit(self, device: str, readings: list[Reading]) -> None:
        """Filter readings into events; commit them durably, then publish them live."""
        now = self._clock()
        events: list[Event] = []
        for reading in readings:
            tag_filter = self._filters.get((device, reading.tag))
            if tag_filter is None:
                continue
            if tag_filter.offer(reading, now):
                events.append(
                    Event(
                        reading.ts, "sample", device, reading.tag, tag_filter.value, reading.quality
                    )
                )
        for observer in self._observers:
            try:
                # As read, not at the published precision: OEE sums and averages them, and a
                # rounding per reading would add up (see the module notes).
                observer(device, readings)
            except Exception:  # an observer bug must not stop polling
                log.exception("observer failed on readings of %s", device)
        await self.emit(events)

    async def emit(self, events: list[Event]) -> None:
        """Queue ready-made events for the commit; they are offered to every sink once it
        returned (waits only while the outbox's commit queue is full).

        Nothing goes on the durable path before its commit, and events are published in the
        order they were emitted. If the outbox refuses the events (disk full), only the live
        sinks get their samples (the newest value per topic, not a record), the outbox counts
        them for its ``append_failed`` gap, and their tags are offered again on the next reading
        so that nothing is skipped once it works again.
        """
        if not events:
            return
        if self._durable is None:
            self._publish(events)
            return
        await self._durable.room()
        entry = _Uncommitted(events)
        self._uncommitted.append(entry)
        try:
            self._durable.submit(events, partial(self._committed, entry))
        except Exception as exc:  # closed, or an event that cannot be stored
            self._committed(entry, exc)

    async def settle(self) -> None:
        """Wait until every event emitted so far is committed and published (or refused)."""
        while self._uncommitted:
            self._settled.clear()
            await self._settled.wait()

    def _committed(self, entry: _Uncommitted, error: Exception | None) -> None:
        entry.done, entry.error = True, error
        while self._uncommitted and self._uncommitted[0].done:
            done = self._uncommitted.popleft()
            if done.error is not None:
                self._refused(done.events, done.error)
                continue
            if self._durable_down:
                log.info("the outbox accepts events again")
                self._durable_down = False
                self.durable_error = None
            self._publish(done.events)
        if not self._uncommitted:
            self._settled.set()

    def _publish(self, events: list[Event]) -> None:
        self.events_total += len(events)
        for sink in self._sinks:
            try:
                sink.offer_events(events)
            except Exception:  # one uplink's bug must not stop the others or polling
                log.exception("sink %s failed on %d events", sink.name, len(events))

    def _refused(self, events: list[Event], exc: Exception) -> None:
        if not self._durable_down:
            log.error("events not accepted by the outbox: %s", exc)
            self._durable_down = True
        self.durable_error = str(exc)[:300]
        samples = [event for event in events if event.kind == "sample"]
        for sink in self._live:
            try:
                sink.offer_events(samples)
            except Exception:  # one uplink's bug must not stop the others or polling
                log.exception("sink %s failed on %d refused events", sink.name, len(samples))
        for event in events:
            if event.kind == "sample" and event.device and event.tag:
                tag_filter = self._filters.get((event.device, event.tag))
                if tag_filter is not None:
                    tag_filter.quality = None  # forces the next reading through

    async def heartbeats(self) -> None:
        """Every second, re-publish values unchanged for their max_interval."""
        while True:
            await asyncio.sleep(1.0)
            now = self._clock()
            wall = self._wall()
            events = []
            for (device, tag), tag_filter in self._filters.items():
                if tag_filter.heartbeat_due(now):
                    tag_filter.published_at = now
                    events.append(
                        Event(wall, "sample", device, tag, tag_filter.value, tag_filter.quality)
                    )
            await self.emit(events)
