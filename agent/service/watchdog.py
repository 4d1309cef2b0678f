"""The systemd watchdog of the daemon: WATCHDOG=1 only while the event loop turns *and* every
worker shows signs of life, plus a STATUS= summary for `systemctl status`.

The pings come from a task on the event loop, so a stuck loop (a blocking call, a busy
callback) stops them by construction. A task that died quietly (cancelled outside the
shutdown path) or a poller that stopped reporting makes `checks()` return problems and the
pings are withheld too; systemd then kills the service after WatchdogSec and restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from drivers.config import DeviceConfigBase

log = logging.getLogger("edge_agent.watchdog")

# A poller is never considered stuck before this many seconds of silence.
MIN_STALE_AFTER = 30.0
# How often STATUS= is refreshed when the watchdog itself is off or slower.
STATUS_INTERVAL = 10.0


class Notifier(Protocol):
    """What the watchdog needs of an SdNotifier."""

    def notify(self, **fields: str | int) -> bool:
        """Send KEY=VALUE fields; True if sent."""
        ...


class _Driver(Protocol):
    @property
    def polled_tags(self) -> Any:
        """Tags read by polling (empty for a push-only device)."""
        ...


class PollerLike(Protocol):
    """The parts of agent.daemon.poller.DevicePoller the liveness check reads."""

    @property
    def name(self) -> str:
        """Device name."""
        ...

    @property
    def config(self) -> DeviceConfigBase:
        """The device's config."""
        ...

    @property
    def last_activity(self) -> float:
        """time.monotonic() of the poller's latest sign of life."""
        ...

    @property
    def driver(self) -> _Driver | None:
        """The connected driver, or None while connecting."""
        ...


def stale_after(config: DeviceConfigBase) -> float:
    """Seconds of silence after which a poller counts as stuck (derived from its deadlines)."""
    # The longest legitimate gap between two activity marks of agent.daemon.poller.DevicePoller is a
    # connect attempt (timeout + 10 s) followed by the first read (read deadline), or a read
    # (read deadline) followed by the wait for the next tick (poll_interval). Twice the sum
    # leaves room for a slow submit; never less than MIN_STALE_AFTER.
    read_deadline = max(config.poll_interval, config.timeout) * 3 + 5.0
    longest = config.timeout + 10.0 + read_deadline + config.poll_interval
    return max(MIN_STALE_AFTER, 2.0 * longest)


def liveness_problems(
    pollers: Mapping[str, PollerLike],
    tasks: Iterable[asyncio.Task[Any]],
    *,
    now: float | None = None,
) -> list[str]:
    """Why the daemon is not healthy: dead tasks and silent pollers (empty: healthy)."""
    problems: list[str] = []
    for task in tasks:
        if task.done():
            problems.append(f"task {task.get_name()} ended{_how(task)}")
    current = time.monotonic() if now is None else now
    for name, poller in pollers.items():
        driver = poller.driver
        if driver is not None and not driver.polled_tags:
            # A connected push-only device (OPC UA subscriptions only) marks activity only
            # when values change; its subscription stream raises within seconds when the
            # server goes silent, so silence here is not a sign of a stuck poller.
            continue
        silent = current - poller.last_activity
        limit = stale_after(poller.config)
        if silent > limit:
            problems.append(f"device {name}: no activity for {silent:.0f} s (limit {limit:.0f} s)")
    return problems


def _how(task: asyncio.Task[Any]) -> str:
    if task.cancelled():
        return " (cancelled)"
    exc = task.exception()
    return f" ({type(exc).__name__}: {exc})" if exc is not None else ""


def status_line(health: Mapping[str, Any]) -> str:
    """One-line STATUS= summary from Runtime.health(): devices up/total, outbox, uplink."""
    devices: Mapping[str, str] = health.get("devices") or {}
    up = sum(1 for state in devices.values() if state == "up")
    parts = [f"devices {up}/{len(devices)} up", f"outbox {health.get('outbox_events', 0)} events"]
    oldest = health.get("oldest_unacked_s")
    if oldest is not None:
        parts.append(f"oldest unacked {oldest:.0f} s")
    parts.append(f"uplink {health.get('uplink', 'down')}")
    return ", ".join(parts)


class IngestLike(Protocol):
    """The parts of sync.central.ingest.Ingest the ingest's STATUS= line reads."""

    @property
    def db_up(self) -> bool:
        """False while the database fails."""
        ...

    @property
    def queued(self) -> int:
        """Messages received and not yet committed."""
        ...


def ingest_status_line(ingest: IngestLike, *, committed_rows: int) -> str:
    """One-line STATUS= summary of the central ingest."""
    return (
        f"database {'up' if ingest.db_up else 'down'}, {ingest.queued} messages queued, "
        f"{committed_rows} rows committed"
    )


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
