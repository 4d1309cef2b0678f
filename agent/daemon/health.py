"""What the daemon says about itself: the `R/_agent/health` document (docs/topics.md), the
/status document, readiness, the one-line STATUS= summary, and the liveness checks that feed
the systemd watchdog."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypedDict

from agent.oee.records import OeeRecord
from agent.service.watchdog import dead_tasks
from drivers.config import DeviceConfigBase
from sync.events import rfc3339
from sync.mqtt.client import MqttClient
from sync.outbox.store import Outbox

# A poller is never considered stuck before this many seconds of silence.
MIN_STALE_AFTER = 30.0


class HealthDocument(TypedDict):
    """`R/_agent/health` (retained, QoS 0, every `mqtt.health_interval`)."""

    ts: str
    stream: str
    committed_seq: int
    acked_seq: int
    outbox_events: int
    oldest_unacked_s: float | None
    dropped_total: int
    devices: dict[str, str]
    uplink: str
    sync: Literal["forwarding", "live-only"]


class DeviceDetail(TypedDict):
    """One device in /status."""

    state: str
    reason: str | None
    breaker: str
    polls: int
    last_poll_s: float


class StatusDocument(HealthDocument):
    """/status and `edge-agent status`: the health document plus details."""

    version: str
    uptime_s: float
    gateway: str
    device_detail: dict[str, DeviceDetail]
    uplink_error: str | None
    sync_problems: list[str]
    outbox_append_failures: int
    outbox_refusing: str | None  # why the outbox refuses events now (disk full), else None
    oee: dict[str, OeeRecord | None]


def health_document(
    outbox: Outbox,
    mqtt: MqttClient,
    devices: dict[str, str],
    *,
    now: float,
    sync_enabled: bool = True,
) -> HealthDocument:
    """The health document at `now` (epoch seconds)."""
    oldest = outbox.oldest_unacked_ts
    return {
        "ts": rfc3339(now),
        "stream": outbox.stream,
        "committed_seq": outbox.committed_seq,
        "acked_seq": outbox.acked_seq,
        "outbox_events": outbox.events_count,
        "oldest_unacked_s": None if oldest is None else round(max(0.0, now - oldest), 3),
        "dropped_total": outbox.dropped_total,
        "devices": devices,
        "uplink": "up" if mqtt.is_connected else "down",
        "sync": "forwarding" if sync_enabled else "live-only",
    }


class _Driver(Protocol):
    @property
    def polled_tags(self) -> Sequence[object]:
        """Tags read by polling (empty for a push-only device)."""
        ...


class PollerLike(Protocol):
    """The parts of agent.daemon.poller.DevicePoller the liveness check reads."""

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
    # The longest legitimate gap between two activity marks of DevicePoller is a connect
    # attempt (timeout + 10 s) followed by the first read (read deadline), or a read (read
    # deadline) followed by the wait for the next tick (poll_interval). Twice the sum leaves
    # room for a slow submit; never less than MIN_STALE_AFTER.
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
    problems = dead_tasks(tasks)
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


def status_line(health: Mapping[str, Any]) -> str:
    """One-line STATUS= summary from a health document: devices up/total, outbox, uplink."""
    devices: Mapping[str, str] = health.get("devices") or {}
    up = sum(1 for state in devices.values() if state == "up")
    parts = [f"devices {up}/{len(devices)} up", f"outbox {health.get('outbox_events', 0)} events"]
    oldest = health.get("oldest_unacked_s")
    if oldest is not None:
        parts.append(f"oldest unacked {oldest:.0f} s")
    parts.append(f"uplink {health.get('uplink', 'down')}")
    if health.get("sync") == "live-only":
        parts.append("live only")
    return ", ".join(parts)
