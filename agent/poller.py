"""One task per device: connect with jittered backoff, poll on a fixed schedule, consume
pushed readings, and turn outages into one bad-quality event and one log line each way."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import pybreaker
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from drivers.base import Driver, DriverError, Reading
from drivers.config import DeviceConfigBase

log = logging.getLogger("edge_agent.poller")

DeviceState = Literal["up", "down", "open"]
Submit = Callable[[str, list[Reading]], Awaitable[None]]
DriverFactory = Callable[[], Driver]

RECONNECT_MAX = 10.0  # seconds, the cap of the jittered exponential backoff


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
        self.state: DeviceState = "down"
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
        self._was_down_logged = False
        self._connected_once = False

    @property
    def name(self) -> str:
        """Device name."""
        return self.config.name

    @property
    def breaker_state(self) -> str:
        """closed | open | half-open."""
        return str(self.breaker.current_state)

    async def run(self) -> None:
        """Connect, poll, reconnect; forever."""
        while True:
            driver = await self._connect()
            try:
                await self._run_connected(driver)
            except* (DriverError, pybreaker.CircuitBreakerError, OSError) as group:
                await self._went_down(_first_reason(group))
            except* Exception as group:
                # A bug (ours or a library's) must not take the daemon down: log it with its
                # traceback, treat the device as down, reconnect with a fresh driver.
                log.error("device %s: unexpected error", self.name, exc_info=group.exceptions[0])
                await self._went_down(f"internal error: {_first_reason(group)}")
            finally:
                self.driver = None
                await driver.close()

    async def _connect(self) -> Driver:
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
                if self.breaker.current_state == pybreaker.STATE_OPEN:
                    await self._went_down("circuit breaker open", state="open")
                driver = self._factory()
                try:
                    with self.breaker.calling():
                        async with asyncio.timeout(self.config.timeout + 10.0):
                            await driver.connect()
                except BaseException as exc:
                    await driver.close()
                    if isinstance(exc, DriverError | OSError | TimeoutError):
                        await self._went_down(_describe(exc))
                    raise
                self.driver = driver
                self.reconnects += 1 if self._connected_once else 0
                self._connected_once = True
                return driver
        raise AssertionError("unreachable")

    async def _sleep(self, seconds: float) -> None:
        # While waiting to reconnect the poller is healthy (it is doing its job).
        deadline = self._clock() + seconds
        while (remaining := deadline - self._clock()) > 0:
            self.last_activity = self._clock()
            await asyncio.sleep(min(remaining, 1.0))

    async def _run_connected(self, driver: Driver) -> None:
        stream = driver.subscriptions()
        async with asyncio.TaskGroup() as group:
            if driver.polled_tags:
                group.create_task(self._poll_loop(driver), name=f"poll:{self.name}")
            if stream is not None:
                group.create_task(self._consume(stream), name=f"subscription:{self.name}")
            if not driver.polled_tags and stream is None:
                group.create_task(self._idle(), name=f"idle:{self.name}")
            await self._came_up()

    async def _idle(self) -> None:
        while True:
            self.last_activity = self._clock()
            await asyncio.sleep(1.0)

    async def _poll_loop(self, driver: Driver) -> None:
        interval = self.config.poll_interval
        next_tick = self._clock()
        while True:
            started = self._clock()
            self.last_activity = started
            with self.breaker.calling():
                async with asyncio.timeout(max(interval, self.config.timeout) * 3 + 5.0):
                    readings = await driver.read()
            self.polls += 1
            self.last_poll_duration = self._clock() - started
            if self.state != "up":
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
            self.last_activity = self._clock()
            if readings:
                await self._submit(self.name, readings)

    async def _came_up(self) -> None:
        if self.state == "up":
            return
        if self._was_down_logged:
            log.info("device %s recovered", self.name)
        else:
            log.info("device %s connected", self.name)
        self._was_down_logged = False
        self.state = "up"
        self.reason = None

    async def _went_down(self, reason: str, *, state: DeviceState = "down") -> None:
        self.poll_errors += 1
        if self.breaker.current_state == pybreaker.STATE_OPEN:
            state = "open"
        transition = self.state == "up" or not self._was_down_logged
        self.state = state
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
