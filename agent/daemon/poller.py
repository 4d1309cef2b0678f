"""One task per device: connect with jittered backoff, poll on a fixed schedule, consume
pushed readings, and turn outages into one bad-quality event and one log line each way."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Literal

import pybreaker
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from agent.service.tasks import forget_taskgroup_cancel, raise_if_cancelled
from drivers.base import Driver, DriverError, DriverUnavailable, JsonValue, Reading
from drivers.config import DeviceConfigBase

log = logging.getLogger("edge_agent.poller")

DeviceState = Literal["up", "down", "open"]
Submit = Callable[[str, list[Reading]], Awaitable[None]]
DriverFactory = Callable[[], Driver]

# Cap of the jittered exponential reconnect backoff (<= 10 s): with the connect and the first
# poll it keeps a returning device's values flowing again within 10 s.
RECONNECT_MAX = 8.0


class DevicePoller:
    """Owns one device's connection and schedule; `run()` never returns until cancelled."""

    def __init__(
        self,
        *,
        config: DeviceConfigBase,
        driver_factory: DriverFactory,
        submit: Submit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._factory = driver_factory
        self._submit = submit
        self._clock = clock
        self._state: DeviceState = "down"
        self.reason: str | None = "not connected yet"
        self.driver: Driver | None = None
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=config.breaker_failures,
            reset_timeout=config.breaker_reset,
            # A cancelled task is a shutdown, not a device failure.
            exclude=[asyncio.CancelledError],
            name=config.name,
        )
        self.polls = 0
        self.poll_errors = 0
        self.skipped_ticks = 0
        self.reconnects = 0
        self.last_poll_duration = 0.0
        self.last_activity = clock()  # watchdog: the poller is alive
        self.state_since = time.time()  # wall time of the last up/down transition (the page)
        self.on_poll: Callable[[str, float], None] | None = None  # metrics hook
        self._was_down_logged = False
        self._internal_logged: str | None = None  # the unexpected error last logged in full
        self._connected_once = False

    @property
    def name(self) -> str:
        """Device name."""
        return self.config.name

    @property
    def state(self) -> DeviceState:
        """up, down, or open (down and the circuit breaker is open: not even trying)."""
        if self._state != "up" and self.breaker.current_state == pybreaker.STATE_OPEN:
            return "open"
        return self._state

    @property
    def breaker_state(self) -> str:
        """closed | open | half-open."""
        return str(self.breaker.current_state)

    def _connected_driver(self) -> Driver:
        driver = self.driver
        if driver is None or self._state != "up":
            raise DriverUnavailable(f"device {self.name} is {self.state}: {self.reason or ''}")
        return driver

    async def write(self, tag: str, value: JsonValue) -> JsonValue:
        """Write once through the current connection and return the verified read-back value.

        Raises DriverUnavailable when the device is not up (the caller decides; never queued).
        """
        driver = self._connected_driver()
        async with asyncio.timeout(self.config.timeout * 4 + 5.0):
            return await driver.write(tag, value)

    async def read_tag(self, tag: str) -> Reading:
        """Read one tag now through the current connection."""
        driver = self._connected_driver()
        async with asyncio.timeout(self.config.timeout * 3 + 5.0):
            return await driver.read_tag(tag)

    async def run(self) -> None:
        """Connect, poll, reconnect; forever."""
        task = asyncio.current_task()
        while True:
            driver, first = await self._connect()
            before = task.cancelling() if task is not None else 0
            try:
                await self._run_connected(driver, first)
            except* (DriverError, pybreaker.CircuitBreakerError, OSError) as group:
                forget_taskgroup_cancel(before)
                await self._went_down(_first_reason(group))
            except* Exception as group:
                forget_taskgroup_cancel(before)
                # A bug (ours or a library's) must not take the daemon down: log it with its
                # traceback, treat the device as down, reconnect with a fresh driver.
                await self._went_down(self._internal_error(_first_exception(group)))
            finally:
                self.driver = None
                await driver.close()

    async def _connect(self) -> tuple[Driver, list[Reading] | None]:
        """A connected driver and, for polled devices, its first poll.

        The first poll is inside the same breaker call as the connect: a stalled PLC accepts
        TCP connections but never answers, and a successful connect alone would reset the
        breaker's failure count every time.
        """
        retrying = AsyncRetrying(
            wait=wait_random_exponential(multiplier=0.5, max=RECONNECT_MAX),
            retry=retry_if_exception_type(
                (DriverError, pybreaker.CircuitBreakerError, OSError, TimeoutError)
            ),
            sleep=self._sleep,
        )
        async for attempt in retrying:
            with attempt:
                self.last_activity = self._clock()
                driver = self._factory()
                first: list[Reading] | None = None
                try:
                    with self.breaker.calling():
                        async with asyncio.timeout(self.config.timeout + 10.0):
                            await driver.connect()
                        if driver.polled_tags:
                            async with asyncio.timeout(self._read_deadline):
                                first = await driver.read()
                except (DriverError, OSError, TimeoutError, pybreaker.CircuitBreakerError) as exc:
                    await driver.close()
                    await self._went_down(_describe(exc))
                    raise
                except Exception as exc:
                    # A bug, or a library error that is none of the above (pyserial raises
                    # termios.error when a serial adapter or a pty refuses the line settings):
                    # this device is down and retried; the others and the daemon go on.
                    await driver.close()
                    await self._went_down(self._internal_error(exc))
                    # What the failed library call held lives on in its frames: pymodbus'
                    # half-built serial transport keeps the port open and locked, and the
                    # next attempt would fail with "could not lock port" instead.
                    traceback.clear_frames(exc.__traceback__)
                    raise DriverUnavailable(str(exc) or type(exc).__name__) from exc
                except BaseException:
                    await driver.close()
                    raise
                self.driver = driver
                self.reconnects += 1 if self._connected_once else 0
                self._connected_once = True
                return driver, first
        raise AssertionError("unreachable")

    def _internal_error(self, exc: BaseException) -> str:
        """The down reason of an unexpected error; its traceback is logged once per reason."""
        kind = type(exc)
        name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}"
        )
        reason = f"internal error: {name}: {exc}" if str(exc) else f"internal error: {name}"
        if reason != self._internal_logged:
            self._internal_logged = reason
            log.error("device %s: unexpected error", self.name, exc_info=exc)
        return reason

    async def _sleep(self, seconds: float) -> None:
        # While waiting to reconnect the poller is healthy (it is doing its job).
        deadline = self._clock() + seconds
        while (remaining := deadline - self._clock()) > 0:
            self.last_activity = self._clock()
            await asyncio.sleep(min(remaining, 1.0))

    @property
    def _read_deadline(self) -> float:
        return max(self.config.poll_interval, self.config.timeout) * 3 + 5.0

    async def _run_connected(self, driver: Driver, first: list[Reading] | None) -> None:
        stream = driver.subscriptions()
        async with asyncio.TaskGroup() as group:
            if driver.polled_tags:
                group.create_task(self._poll_loop(driver, first), name=f"poll:{self.name}")
            if stream is not None:
                group.create_task(self._consume(stream), name=f"subscription:{self.name}")
            if not driver.polled_tags and stream is None:
                group.create_task(self._idle(), name=f"idle:{self.name}")
            if not driver.polled_tags:
                # Push-only devices are up once connected; polled ones after a good poll (a
                # stalled PLC accepts TCP connections but never answers).
                await self._came_up()

    async def _idle(self) -> None:
        while True:
            self.last_activity = self._clock()
            await asyncio.sleep(1.0)

    async def _poll_loop(self, driver: Driver, first: list[Reading] | None) -> None:
        interval = self.config.poll_interval
        next_tick = self._clock()
        while True:
            # A driver library may have swallowed our cancellation (see raise_if_cancelled):
            # polling on would keep the device's TaskGroup, and so shutdown, waiting forever.
            raise_if_cancelled()
            started = self._clock()
            self.last_activity = started
            if first is not None:
                readings, first = first, None
            else:
                with self.breaker.calling():
                    async with asyncio.timeout(self._read_deadline):
                        readings = await driver.read()
            self.polls += 1
            self.last_poll_duration = self._clock() - started
            if self.on_poll is not None:
                self.on_poll(self.name, self.last_poll_duration)
            if self._state != "up":
                await self._came_up()
            await self._submit(self.name, readings)
            next_tick += interval
            now = self._clock()
            if now > next_tick:
                # Overran: skip the ticks we missed instead of polling back to back.
                missed = math.ceil((now - next_tick) / interval)
                self.skipped_ticks += missed
                next_tick += missed * interval
            await asyncio.sleep(next_tick - now)

    async def _consume(self, stream: object) -> None:
        async for readings in stream:  # type: ignore[attr-defined]
            raise_if_cancelled()
            self.last_activity = self._clock()
            if readings:
                await self._submit(self.name, readings)

    async def _came_up(self) -> None:
        if self._state == "up":
            return
        if self._was_down_logged:
            log.info("device %s recovered", self.name)
        else:
            log.info("device %s connected", self.name)
        self._was_down_logged = False
        self._internal_logged = None
        self._state = "up"
        self.state_since = time.time()
        self.reason = None

    async def _went_down(self, reason: str) -> None:
        self.poll_errors += 1
        transition = self._state == "up" or not self._was_down_logged
        if self._state == "up":
            self.state_since = time.time()
        self._state = "down"
        if "circuit breaker" not in reason:
            self.reason = reason
        if transition:
            log.warning("device %s down: %s", self.name, reason)
            self._was_down_logged = True
            # One bad-quality event per tag on the transition (the pipeline dedups repeats).
            now = time.time()
            await self._submit(
                self.name,
                [Reading(tag.name, None, "bad", now, reason) for tag in self.config.tag_list()],
            )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, pybreaker.CircuitBreakerError):
        return "circuit breaker open"
    return str(exc) or type(exc).__name__


def _first_reason(group: BaseExceptionGroup[BaseException]) -> str:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_reason(exc)
        return _describe(exc)
    return "unknown error"


def _first_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_exception(first) if isinstance(first, BaseExceptionGroup) else first
