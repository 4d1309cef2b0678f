"""A saga's I/O with the line: single reads and writes through the devices, reading back until
a good value arrives, deciding whether a write took effect, and waiting for a tag to reach a
value (fed by every raw reading of the pipeline). Values compare by their tag's rules."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from agent.settings.config_file import AgentSettings
from drivers.base import DriverError, DriverFault, JsonValue, Reading
from drivers.config import TagConfigBase

Outcome = Literal["applied", "not_applied", "unknown"]

# What a device call may raise: the driver's errors, a deadline, a lost socket.
DEVICE_ERRORS = (DriverError, TimeoutError, OSError)
# The value rules of a tag no longer in the config (a saga resolved after a reload).
_UNCONFIGURED = TagConfigBase(name="unconfigured")


class TagAccess(Protocol):
    """What the engine needs of the devices: single reads and verified single writes."""

    async def read(self, ref: str) -> Reading:
        """Read 'device/tag' now."""
        ...

    async def write(self, ref: str, value: JsonValue) -> JsonValue:
        """Write 'device/tag' once; the verified read-back value."""
        ...


@dataclass(slots=True)
class _Waiter:
    expected: Any
    same: Callable[[Any, Any], bool]  # the tag's equality
    future: asyncio.Future[Any]
    last: Any = None

    def offer(self, value: Any) -> None:
        self.last = value
        if not self.future.done() and self.same(value, self.expected):
            self.future.set_result(value)


class PlcIo:
    """The engine's reads, writes and waits, by 'device/tag'."""

    def __init__(self, *, devices: TagAccess, settings: AgentSettings) -> None:
        self._devices = devices
        self.settings = settings  # replaced on reload: the rules of the current config
        self._waiters: dict[tuple[str, str], list[_Waiter]] = {}

    async def read(self, ref: str) -> Reading:
        """Read a tag now."""
        return await self._devices.read(ref)

    async def write(self, ref: str, value: JsonValue) -> JsonValue:
        """Write a tag once; the verified read-back value."""
        return await self._devices.write(ref, value)

    def rule(self, ref: str) -> TagConfigBase:
        """The tag's value rules (a tag that left the config: the generic ones)."""
        resolved = self.settings.tag(ref)
        return resolved[1] if resolved is not None else _UNCONFIGURED

    def same(self, ref: str, actual: Any, expected: Any) -> bool:
        """Whether two values of a tag are equal, by the tag's rules."""
        return self.rule(ref).same_value(actual, expected)

    async def settle(
        self, ref: str, intended: Any, previous: Any, deadline: float
    ) -> tuple[Outcome, Any]:
        """Decide by reading back whether a write took effect."""
        reading = await self.read_good(ref, deadline)
        if reading is None:
            return "unknown", None
        if self.same(ref, reading.value, intended):
            return "applied", reading.value
        if self.same(ref, reading.value, previous):
            return "not_applied", reading.value
        return "unknown", reading.value

    async def read_good(self, ref: str, deadline: float) -> Reading | None:
        """Read until a good value arrives or `deadline` seconds passed (None then)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline
        delay = 0.2
        while True:
            try:
                reading = await self.read(ref)
                if reading.quality == "good":
                    return reading
            except DriverFault:
                return None  # unknown tag or refused read: retrying will not help
            except DEVICE_ERRORS:
                pass
            remaining = until - loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)

    async def wait_for(self, ref: str, expected: Any, limit: float) -> tuple[bool, Any]:
        """Wait until a good reading of `ref` equals `expected` (pipeline readings or a read);
        (reached, the last value seen)."""
        device, _, tag = ref.partition("/")
        key = (device, tag)
        waiter = _Waiter(
            expected, self.rule(ref).same_value, asyncio.get_running_loop().create_future()
        )
        self._waiters.setdefault(key, []).append(waiter)
        try:
            # One deadline for both: a stalled device must not stretch the step's timeout.
            async with asyncio.timeout(limit):
                # Registered first, read second: a change between the two is never missed.
                with contextlib.suppress(*DEVICE_ERRORS):
                    reading = await self.read(ref)
                    if reading.quality == "good":
                        waiter.offer(reading.value)
                return True, await waiter.future
        except TimeoutError:
            return False, waiter.last
        finally:
            waiters = self._waiters.get(key, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(key, None)
            if not waiter.future.done():
                waiter.future.cancel()

    def observe(self, device: str, readings: list[Reading]) -> None:
        """Pipeline observer: every raw reading, checked against the waiting steps."""
        if not self._waiters:
            return
        for reading in readings:
            waiters = self._waiters.get((device, reading.tag))
            if waiters and reading.quality == "good":
                for waiter in waiters:
                    waiter.offer(reading.value)

    def cancel_waits(self) -> None:
        """Stop every wait (the engine stops)."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.future.cancel()
        self._waiters.clear()
