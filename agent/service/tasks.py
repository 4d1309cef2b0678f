"""Task helpers for cancellations that asyncio or a library loses on Python 3.11."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator

# How often a stop re-sends the cancellation to tasks that have not finished yet.
CANCEL_REPEAT = 1.0


def raise_if_cancelled() -> None:
    """Raise CancelledError if this task was cancelled but a library call returned normally."""
    # asyncio.wait_for before Python 3.12 returns the inner result instead of raising when the
    # reply and the cancellation land in the same loop iteration (CPython gh-86296); pymodbus
    # awaits every reply that way. The task would run on with its cancellation lost, and the
    # TaskGroup stopping it would wait forever (seen as a hung SIGTERM at 10,000 tags).
    # Only meaningful in a task that hosts no TaskGroup: see forget_taskgroup_cancel.
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def forget_taskgroup_cancel(before: int) -> None:
    """Take back the cancel request a failed TaskGroup left on this task (Python 3.11)."""
    # When a child fails, 3.11's TaskGroup cancels its parent to wake it and, if the parent
    # was already waiting in __aexit__, never calls uncancel(): cancelling() stays raised for
    # good, and the next TaskGroup or asyncio.timeout in this task misreads it.
    task = asyncio.current_task()
    if task is not None:
        while task.cancelling() > before:
            task.uncancel()


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]]) -> None:
    """Cancel tasks and wait until all are done, cancelling again every CANCEL_REPEAT s."""
    # Repeating is the safety net for a cancellation a library swallowed anywhere.
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=CANCEL_REPEAT)
        for task in pending:
            task.cancel()


def leaf_exceptions(error: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, or `error` itself."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaf_exceptions(inner)
    else:
        yield error
