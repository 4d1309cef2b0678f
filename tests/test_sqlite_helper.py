"""A cancelled open never leaves an aiosqlite thread behind (it would block the exit)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from sync import sqlite
from tests.fixtures.ports import async_wait_until


def sqlite_threads() -> int:
    return sum(1 for t in threading.enumerate() if "_connection_worker_thread" in repr(t._target))  # type: ignore[attr-defined]


async def test_cancelled_connect_closes_the_connection(tmp_path: Path) -> None:
    before = sqlite_threads()
    for _ in range(20):
        task = asyncio.create_task(sqlite.connect(tmp_path / "x.db"))
        await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            await task.result().close()
    await async_wait_until(lambda: sqlite_threads() == before, timeout=10)
