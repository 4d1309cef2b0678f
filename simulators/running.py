"""Running a simulator from the command line until SIGINT or SIGTERM (`edge-agent simulate`)."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

import uvloop

# serve(stop, out): run until `stop` is set, printing what an operator needs through `out`.
Serve = Callable[[asyncio.Event, Callable[[str], None]], Awaitable[None]]


def run_until_signalled(name: str, serve: Serve) -> int:
    """Run `serve` until SIGINT/SIGTERM; 0, or 1 with a one-line error (e.g. the port is
    taken) naming `edge-agent simulate {name}`."""

    def out(text: str) -> None:
        print(text, flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(stop, out)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        uvloop.run(run())
    except OSError as exc:
        print(f"edge-agent simulate {name}: {exc}", file=sys.stderr)
        return 1
    return 0
