"""Stopping never hangs on a cancellation that a driver library swallowed.

pymodbus awaits every reply with ``asyncio.wait_for``, which before Python 3.12 returns the
reply instead of raising when the cancellation lands in the same loop iteration (CPython
gh-86296). The daemon's SIGTERM then hung with the device's poll loop running on (seen in
bench/line_scale.py at 10,000 tags).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from agent.daemon.poller import DevicePoller
from agent.service.shutdown import report_slow_shutdown
from agent.service.tasks import cancel_and_wait, forget_taskgroup_cancel, raise_if_cancelled
from drivers.base import Driver, JsonValue, Reading
from drivers.config import DeviceConfigBase


async def test_raise_if_cancelled_restores_a_cancellation_wait_for_swallowed() -> None:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[int] = loop.create_future()
    reached: list[str] = []

    async def request() -> None:
        await asyncio.wait_for(reply, 10)  # what pymodbus does for every request
        reached.append("reply returned")
        raise_if_cancelled()
        reached.append("ran on after the cancellation")

    task = asyncio.create_task(request())
    await asyncio.sleep(0)  # the task now waits inside wait_for
    reply.set_result(1)  # the reply and the cancellation in the same loop iteration
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "ran on after the cancellation" not in reached


async def test_raise_if_cancelled_is_silent_in_a_task_nobody_cancelled() -> None:
    raise_if_cancelled()

    async def inner() -> str:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)
        return "unreachable"

    # A timeout's own cancellation is taken back by asyncio.timeout: not a pending cancel.
    with pytest.raises(TimeoutError):
        await inner()
    raise_if_cancelled()


class SwallowingDriver(Driver):
    """A driver whose library loses the cancellation whenever it arrives during a read."""

    def __init__(self, config: DeviceConfigBase) -> None:
        super().__init__(config)
        self.reads = 0
        self.swallowed = 0
        self.reading = asyncio.Event()

    async def connect(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    async def read(self) -> list[Reading]:
        """Wait for a 'reply'; a cancellation meanwhile is swallowed like wait_for does."""
        self.reads += 1
        self.reading.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.swallowed += 1  # the bug being modelled: return as if the reply came
        finally:
            self.reading.clear()
        return [Reading("t", self.reads, "good", 0.0)]

    async def read_tag(self, tag: str) -> Reading:
        """Not used."""
        raise NotImplementedError

    async def _write(self, tag: str, value: JsonValue) -> JsonValue:
        """Not used."""
        raise NotImplementedError

    @property
    def polled_tags(self) -> tuple[Any, ...]:
        """One polled tag, so that the poller runs its poll loop."""
        return ("t",)


async def test_poller_stops_although_the_driver_swallowed_the_cancellation() -> None:
    config = DeviceConfigBase.model_validate({"name": "d", "poll_interval": "10ms"})
    driver = SwallowingDriver(config)
    submitted = asyncio.Event()

    async def submit(device: str, readings: list[Reading]) -> None:
        submitted.set()

    poller = DevicePoller(config=config, driver_factory=lambda: driver, submit=submit)
    task = asyncio.create_task(poller.run(), name="device:d")
    async with asyncio.timeout(10):
        await submitted.wait()
    # Cancel while a read is in progress so that the driver swallows it.
    driver.reading.clear()
    async with asyncio.timeout(10):
        await driver.reading.wait()
    task.cancel()
    # wait(), not await: awaiting would pass a timeout's cancellation on to the poller.
    done, _ = await asyncio.wait([task], timeout=5)
    assert done, "the poller ran on after its cancellation was swallowed"
    assert task.cancelled()
    assert driver.swallowed == 1


async def test_forget_taskgroup_cancel_takes_back_a_failed_groups_cancel_request() -> None:
    task = asyncio.current_task()
    assert task is not None
    before = task.cancelling()

    async def fail() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("child failed")

    async def group_with_a_failing_child() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(fail())
            group.create_task(asyncio.sleep(10))

    with pytest.raises(ExceptionGroup):
        await group_with_a_failing_child()
    forget_taskgroup_cancel(before)
    assert task.cancelling() == before
    raise_if_cancelled()  # no longer misread as a pending cancellation
    await asyncio.sleep(0)  # and the task runs on normally


async def test_cancel_and_wait_repeats_until_a_swallowing_task_stops() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # like a library losing the first cancellation

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([task]), 10)
    assert task.cancelled()
    assert swallowed == 1


async def test_a_slow_stop_logs_what_each_task_waits_on(caplog: pytest.LogCaptureFixture) -> None:
    async def waits_for_a_reply() -> None:
        await asyncio.Event().wait()

    task = asyncio.create_task(waits_for_a_reply(), name="device:press1")
    await asyncio.sleep(0)
    stop = asyncio.Event()
    stop.set()
    with caplog.at_level(logging.WARNING, logger="edge_agent.runtime"):
        await report_slow_shutdown(stop, 0.01)
    task.cancel()
    await asyncio.wait([task])
    assert "shutdown has taken more than 0 s" in caplog.text
    assert "device:press1: test_cancellation.py:" in caplog.text
    assert "waits_for_a_reply > locks.py" in caplog.text
