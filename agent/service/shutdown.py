"""A stop that hangs is invisible (the loop idles, systemd kills us after TimeoutStopSec):
name what it is waiting for, so that the log explains the SIGKILL."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

log = logging.getLogger("edge_agent.runtime")


def awaiting(coro: object) -> list[str]:
    """`file:line function` of each coroutine in an await chain, outermost first."""
    frames: list[str] = []
    while coro is not None and len(frames) < 50:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            frames.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


async def report_slow_shutdown(stop: asyncio.Event, after: float) -> None:
    """Log every pending task's stack once if shutdown takes longer than `after` seconds."""
    await stop.wait()
    await asyncio.sleep(after)
    me = asyncio.current_task()
    lines = []
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        if task is me or task.done():
            continue
        lines.append(f"  {task.get_name()}: {' > '.join(awaiting(task.get_coro())) or '?'}")
    log.warning(
        "shutdown has taken more than %.0f s; still waiting on:\n%s", after, "\n".join(lines)
    )
