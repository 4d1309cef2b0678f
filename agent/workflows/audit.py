"""The audit trail (docs/workflows.md): every command, step and outcome as a durable
``workflow`` event in the outbox, and ``alarm`` events when the line needs a person."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from agent.workflows.commands import clip
from agent.workflows.saga_log import SagaRecord
from agent.workflows.stats import EngineStats
from sync.events import Event, json_safe
from sync.outbox.store import Outbox, OutboxUnavailable

log = logging.getLogger("edge_agent.workflows")

ALARMS_KEPT = 20  # the newest alarms the status page shows


@dataclass(frozen=True, slots=True)
class Alarm:
    """An alarm raised since the start: when, which saga, what the person has to do."""

    ts: float
    workflow: str | None
    saga: str | None
    devices: tuple[str, ...]
    message: str


def audit_event(
    *,
    workflow: str | None,
    command_id: str | None,
    saga: str | None,
    step: int | str | None,
    action: str,
    result: str,
    detail: str,
    ref: str | None = None,
    before: Any = None,
    after: Any = None,
    extra: dict[str, Any] | None = None,
    sender: str | None = None,
) -> Event:
    """One ``workflow`` event: who asked, which saga and step, what was done, with what result."""
    value: dict[str, Any] = {
        "command_id": command_id,
        "sender": sender,
        "sender_verified": False,  # a claim of the command's client, not checked by anyone
        "workflow": workflow,
        "saga": saga,
        "step": step,
        "action": action,
        "before": before,
        "after": after,
        "result": result,
        "detail": clip(detail),
    }
    if extra:
        value.update(extra)
    device = ref.partition("/")[0] if ref else None
    return Event(time.time(), "workflow", device=device, tag=ref, value=json_safe(value))


def saga_event(saga: SagaRecord, step: str, action: str, result: str, detail: str) -> Event:
    """An audit event of a saga as a whole (start, finish, recovery, confirmation)."""
    return audit_event(
        workflow=saga.workflow,
        command_id=saga.command_id,
        saga=saga.id,
        step=step,
        action=action,
        result=result,
        detail=detail,
    )


class Audit:
    """Appends audit and alarm events to the outbox."""

    def __init__(self, *, outbox: Outbox, stats: EngineStats) -> None:
        self._outbox = outbox
        self._stats = stats
        self.alarms: deque[Alarm] = deque(maxlen=ALARMS_KEPT)  # newest last

    async def append(self, events: list[Event]) -> None:
        """Commit events; a refusal is logged and counted, never raised."""
        # The saga log is the truth for the saga itself: an outbox that cannot take the audit
        # trail (disk full) must not stop a compensation, so this only logs and counts.
        try:
            await self._outbox.append(events)
        except (OutboxUnavailable, ValueError) as exc:
            self._stats.audit_failures += len(events)
            log.error("workflow audit events not stored: %s", exc)

    async def alarm(
        self, saga: SagaRecord | None, devices: frozenset[str] | None, message: str
    ) -> None:
        """A critical ``alarm`` event: the line needs a person."""
        device = sorted(devices)[0] if devices and len(devices) == 1 else None
        self.alarms.append(
            Alarm(
                time.time(),
                saga.workflow if saga else None,
                saga.id if saga else None,
                tuple(sorted(devices or ())),
                clip(message),
            )
        )
        await self.append(
            [
                Event(
                    time.time(),
                    "alarm",
                    device=device,
                    value=json_safe(
                        {
                            "source": "workflow",
                            "severity": "critical",
                            "workflow": saga.workflow if saga else None,
                            "command_id": saga.command_id if saga else None,
                            "saga": saga.id if saga else None,
                            "devices": sorted(devices) if devices else [],
                            "message": clip(message),
                        }
                    ),
                )
            ]
        )
