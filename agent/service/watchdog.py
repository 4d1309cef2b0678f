"""The systemd watchdog of both programs: WATCHDOG=1 only while the event loop turns *and*
the program's checks find no problem, plus a STATUS= summary for `systemctl status`.

The pings come from a task on the event loop, so a stuck loop (a blocking call, a busy
callback) stops them by construction. A task that died quietly (cancelled outside the
shutdown path) or, in the daemon, a poller that stopped reporting (agent/daemon/health.py)
makes `checks()` return problems and the pings are withheld too; systemd then kills the
service after WatchdogSec and restarts it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

log = logging.getLogger("edge_agent.watchdog")

# How often STATUS= is refreshed when the watchdog itself is off or slower.
STATUS_INTERVAL = 10.0


class Notifier(Protocol):
    """What the watchdog needs of an SdNotifier."""

    def notify(self, **fields: str | int) -> bool:
        """Send KEY=VALUE fields; True if sent."""
        ...


def dead_tasks(tasks: Iterable[asyncio.Task[Any]]) -> list[str]:
    """One problem per task that ended (a long-running program's tasks never end on their own)."""
    problems = []
    for task in tasks:
        if task.done():
            problems.append(f"task {task.get_name()} ended{_how(task)}")
    return problems


def _how(task: asyncio.Task[Any]) -> str:
    if task.cancelled():
        return " (cancelled)"
    exc = task.exception()
    return f" ({type(exc).__name__}: {exc})" if exc is not None else ""


async def watchdog_loop(
    notifier: Notifier,
    checks: Callable[[], list[str]],
    interval: float | None,
    *,
    status: Callable[[], str] | None = None,
    status_interval: float = STATUS_INTERVAL,
) -> None:
    """Ping WATCHDOG=1 every `interval` s while `checks()` finds no problem; refresh STATUS=.

    `interval` None: no watchdog configured, only STATUS= is kept current. Runs until
    cancelled; never raises because of a failing check or status callback.
    """
    periods = [p for p in (interval, status_interval if status is not None else None) if p]
    if not periods:
        return
    period = min(periods)
    withheld: str | None = None  # the problem we are withholding pings for
    last_status: str | None = None
    while True:
        problems = _run_checks(checks)
        if problems and withheld is None:
            log.error("watchdog: withholding keep-alive pings: %s", "; ".join(problems))
        elif not problems and withheld is not None:
            log.warning("watchdog: healthy again, keep-alive pings resumed")
        withheld = problems[0] if problems else None
        fields: dict[str, str | int] = {}
        if interval is not None and not problems:
            fields["WATCHDOG"] = 1
        text = _run_status(status) if status is not None else None
        if withheld is not None:
            text = f"unhealthy: {withheld}" + (f" | {text}" if text else "")
        if text is not None and text != last_status:
            fields["STATUS"] = text
            last_status = text
        if fields:
            notifier.notify(**fields)
        await asyncio.sleep(period)


def _run_checks(checks: Callable[[], list[str]]) -> list[str]:
    try:
        return list(checks())
    except Exception as exc:
        # A broken check must not keep pinging blindly: report it as a problem.
        log.debug("watchdog check failed", exc_info=True)
        return [f"watchdog check failed: {type(exc).__name__}: {exc}"]


def _run_status(status: Callable[[], str]) -> str | None:
    try:
        return status()
    except Exception:
        log.debug("status summary failed", exc_info=True)
        return None
