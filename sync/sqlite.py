"""aiosqlite helpers shared by the outbox and the saga log."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiosqlite


async def connect(path: str | Path, **kwargs: Any) -> aiosqlite.Connection:
    """`aiosqlite.connect` that cannot leak its connection when the caller is cancelled.

    Each aiosqlite connection owns a non-daemon thread: a connection opened by a cancelled
    caller and never closed keeps the interpreter from exiting (a daemon that ignores SIGTERM).
    """
    task = asyncio.ensure_future(aiosqlite.connect(path, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            connection = await task  # finish opening, then close: the thread must end
            await connection.close()
        raise
