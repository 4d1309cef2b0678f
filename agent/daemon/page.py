"""The status page's document (`/api/page`, docs/page.md): what the gateway is doing, for the
person at the line. Read-only: it reads the running parts, never changes them, and holds no
config secret (the broker shows as host and port, tags as name and value)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypedDict

from agent import __version__
from agent.daemon.poller import DevicePoller
from agent.oee.live import MachineView
from agent.oee.records import OeeRecord
from agent.oee.state_timeline import Segment
from agent.workflows.engine import WorkflowEngine
from agent.workflows.saga_log import SagaLogError, SagaRecord
from sync.events import json_safe
from sync.uplink.forwarder import Forwarder
from sync.uplink.topics import value_text

if TYPE_CHECKING:
    from agent.daemon.runtime import Runtime

log = logging.getLogger("edge_agent.page")

SAGAS_SHOWN = 20
# Tags per device in one document: a person reads a few hundred rows, not 10,000, and the
# document's cost stays bounded at line scale (the filter box finds the others).
TAGS_SHOWN = 200
# The page asks again this often: no slower than the fastest device's poll (within bounds), so
# that a new value shows within one poll interval and one refresh (docs/page.md).
MIN_REFRESH = 0.5
MAX_REFRESH = 2.0


class Overview(TypedDict):
    """The gateway as a whole."""

    gateway: str
    version: str
    uptime_s: float
    verdict: str  # healthy | degraded | starting
    reasons: list[str]
    broker: str
    uplink: str
    uplink_error: str | None
    sync: str
    last_ack_age_s: float | None
    committed_seq: int
    acked_seq: int
    outbox_events: int
    oldest_unacked_s: float | None
    dropped_total: int


class TagRow(TypedDict):
    """One tag: its value as on MQTT (JSON text), unit, quality and last reading's time."""

    name: str
    value: str | None
    unit: str | None
    quality: str | None
    ts: float | None
    writable: bool


class DeviceRow(TypedDict):
    """One device: its state since when and why, its polling, its tags."""

    name: str
    driver: str
    state: str
    since: float
    reason: str | None
    poll_interval_s: float
    last_poll_s: float
    polls: int
    poll_errors: int
    skipped_ticks: int
    reconnects: int
    tags_total: int
    tags_matching: int  # of tags_total, those the filter keeps (the first TAGS_SHOWN shown)
    tags: list[TagRow]


class MachineRow(TypedDict):
    """One machine: its state, the running shift's timeline and records."""

    name: str
    state: str | None
    code: Any
    since: float | None
    window: dict[str, Any] | None  # the shift: name, start, end (epoch s); None outside one
    timeline: list[Segment]
    shift: OeeRecord | None
    rolling: OeeRecord | None
    finished: list[OeeRecord]


class StepRow(TypedDict):
    """One saga step."""

    idx: int
    kind: str
    ref: str | None
    phase: str
    value: Any
    previous: Any
    result: Any
    detail: str | None


class SagaRow(TypedDict):
    """One saga with its steps."""

    id: str
    workflow: str
    command_id: str
    state: str
    detail: str | None
    created: float
    updated: float
    steps: list[StepRow]


class AlarmRow(TypedDict):
    """A 'needs a person' alarm."""

    ts: float
    workflow: str | None
    saga: str | None
    devices: list[str]
    message: str


class Workflows(TypedDict):
    """Sagas and alarms."""

    configured: list[str]
    unavailable: str | None
    alarms: list[AlarmRow]
    sagas: list[SagaRow]


class PageDocument(TypedDict):
    """/api/page."""

    now: float
    refresh_s: float
    overview: Overview
    devices: list[DeviceRow]
    machines: list[MachineRow]
    workflows: Workflows


async def page_document(runtime: Runtime, *, tag_filter: str = "") -> PageDocument | None:
    """The page's document now (None before the gateway runs); `tag_filter` keeps the devices
    and tags whose name contains it (case-insensitive)."""
    gateway = runtime.gateway
    status = runtime.status()
    if gateway is None or status is None:
        return None
    now = time.time()
    settings = runtime.settings
    forwarder = next((s for s in gateway.sinks if isinstance(s, Forwarder)), None)
    last_ack = None if forwarder is None else forwarder.last_ack_ts
    overview: Overview = {
        "gateway": settings.gateway.id,
        "version": __version__,
        "uptime_s": round(now - runtime.started_at, 1),
        "verdict": "healthy",
        "reasons": [],
        "broker": f"{settings.mqtt.host}:{settings.mqtt.port}",
        "uplink": status["uplink"],
        "uplink_error": status["uplink_error"],
        "sync": status["sync"],
        "last_ack_age_s": None if last_ack is None else round(max(0.0, now - last_ack), 1),
        "committed_seq": status["committed_seq"],
        "acked_seq": status["acked_seq"],
        "outbox_events": status["outbox_events"],
        "oldest_unacked_s": status["oldest_unacked_s"],
        "dropped_total": status["dropped_total"],
    }
    reasons = health_reasons(runtime)
    overview["reasons"] = reasons
    overview["verdict"] = (
        "starting" if reasons == ["starting"] else "degraded" if reasons else "healthy"
    )
    pollers = gateway.devices.pollers
    needle = tag_filter.strip().lower()
    devices = [_device(poller, runtime, needle) for poller in pollers.values()]
    machines = [_machine(view, now) for view in gateway.oee.page_machines()]
    intervals = [poller.config.poll_interval for poller in pollers.values()]
    refresh = min(MAX_REFRESH, max(MIN_REFRESH, min(intervals, default=MAX_REFRESH)))
    return {
        "now": now,
        "refresh_s": refresh,
        "overview": overview,
        "devices": devices,
        "machines": machines,
        "workflows": await _workflows(gateway.workflows),
    }


def health_reasons(runtime: Runtime) -> list[str]:
    """Why the gateway is not healthy, in plain words (empty: healthy)."""
    reasons = [*runtime.readiness_problems(), *runtime.liveness_problems()]
    gateway = runtime.gateway
    if gateway is None:
        return reasons
    mqtt = gateway.mqtt
    if not mqtt.is_connected:
        error = mqtt.last_error
        reasons.append("the broker is not connected" + (f": {error}" if error else ""))
    for name, poller in gateway.devices.pollers.items():
        state = poller.state
        if state != "up":
            what = "is down" if state == "down" else "is down, retries paused (breaker open)"
            why = f": {poller.reason}" if poller.reason else ""
            reasons.append(f"device {name} {what}{why}")
    outbox = gateway.outbox
    if outbox.dropped_total:
        reasons.append(f"{outbox.dropped_total} samples dropped because the buffer was full")
    if outbox.append_failures:
        reasons.append(f"the outbox refused {outbox.append_failures} appends (disk?)")
    return list(dict.fromkeys(reasons))  # the same reason once


def _device(poller: DevicePoller, runtime: Runtime, needle: str) -> DeviceRow:
    config = poller.config
    pipeline = runtime.gateway.pipeline if runtime.gateway is not None else None
    tags: list[TagRow] = []
    every = config.tag_list()
    matching = (
        every
        if not needle or needle in config.name.lower()
        else [tag for tag in every if needle in tag.name.lower()]
    )
    for tag in matching[:TAGS_SHOWN]:
        latest = None if pipeline is None else pipeline.latest(config.name, tag.name)
        seen = latest is not None and latest.quality is not None
        tags.append(
            {
                "name": tag.name,
                "value": value_text(latest.value) if latest is not None and seen else None,
                "unit": tag.unit,
                "quality": latest.quality if latest is not None else None,
                "ts": latest.ts if latest is not None and seen else None,
                "writable": tag.writable,
            }
        )
    return {
        "name": config.name,
        "driver": str(getattr(config, "driver", "")),
        "state": poller.state,
        "since": poller.state_since,
        "reason": poller.reason,
        "poll_interval_s": float(config.poll_interval),
        "last_poll_s": round(poller.last_poll_duration, 4),
        "polls": poller.polls,
        "poll_errors": poller.poll_errors,
        "skipped_ticks": poller.skipped_ticks,
        "reconnects": poller.reconnects,
        "tags_total": len(every),
        "tags_matching": len(matching),
        "tags": tags,
    }


def _machine(view: MachineView, now: float) -> MachineRow:
    engine = view.engine
    state = engine.state
    window = engine.current_window()
    if window is not None:
        start, end = window.start, window.end
        shift: dict[str, Any] | None = {"name": window.name, "start": start, "end": end}
    else:
        # Outside a shift: the rolling window's span.
        start, end, shift = now - float(view.config.rolling_window), now, None
    return {
        "name": view.config.name,
        "state": None if state is None else state.state,
        "code": json_safe(None if state is None else state.code),
        "since": None if state is None else state.ts,
        "window": shift,
        "timeline": _json_segments(view.timeline.segments(start, min(end, now))),
        "shift": json_safe(view.shift),
        "rolling": json_safe(view.rolling),
        "finished": [json_safe(record) for record in reversed(view.finished)],  # newest first
    }


def _json_segments(segments: Sequence[Segment]) -> list[Segment]:
    return [{**segment, "code": json_safe(segment["code"])} for segment in segments]


async def _workflows(engine: WorkflowEngine) -> Workflows:
    saga_log = engine.saga_log
    sagas: list[SagaRecord] = []
    if saga_log is not None:
        try:
            sagas = await saga_log.recent(SAGAS_SHOWN)
        except SagaLogError as exc:
            log.warning("page: cannot read the saga log: %s", exc)
    return {
        "configured": sorted(engine.plans),
        "unavailable": engine.unavailable,
        "alarms": [
            {
                "ts": alarm.ts,
                "workflow": alarm.workflow,
                "saga": alarm.saga,
                "devices": list(alarm.devices),
                "message": alarm.message,
            }
            for alarm in reversed(engine.audit.alarms)
        ],
        "sagas": [_saga(saga) for saga in sagas],
    }


def _saga(saga: SagaRecord) -> SagaRow:
    return {
        "id": saga.id,
        "workflow": saga.workflow,
        "command_id": saga.command_id,
        "state": saga.state,
        "detail": saga.detail,
        "created": saga.created,
        "updated": saga.updated,
        "steps": [
            {
                "idx": step.idx,
                "kind": step.kind,
                "ref": step.ref,
                "phase": step.phase,
                "value": json_safe(step.value),
                "previous": json_safe(step.previous),
                "result": json_safe(step.result),
                "detail": step.detail,
            }
            for step in sorted(saga.steps.values(), key=lambda step: step.idx)
        ],
    }
