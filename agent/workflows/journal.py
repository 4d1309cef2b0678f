"""Recording a saga: every intent and outcome is committed to the saga log and, at the same
time, as an audit event to the outbox; the final state is replied to the command's sender."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from agent.workflows.audit import Audit, audit_event, saga_event
from agent.workflows.commands import clip
from agent.workflows.failpoints import Failpoints
from agent.workflows.plan import saga_devices
from agent.workflows.replies import Replies, Status
from agent.workflows.saga_log import SagaLog, SagaRecord, StepRecord
from agent.workflows.stats import EngineStats
from sync.events import Event
from sync.outbox.store import Outbox

log = logging.getLogger("edge_agent.workflows")


def describe_error(exc: BaseException | None) -> str:
    """A device error in a detail: "timeout", else its (clipped) message."""
    if exc is None:
        return "unknown error"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return clip(str(exc) or type(exc).__name__)


class SagaJournal:
    """The saga log, the audit trail and the replies, kept in step."""

    def __init__(
        self,
        *,
        saga_log: SagaLog,
        outbox: Outbox,
        audit: Audit,
        replies: Replies,
        stats: EngineStats,
        failpoints: Failpoints,
        confirm_later: Callable[[SagaRecord], None],
    ) -> None:
        self.saga_log = saga_log
        self.outbox = outbox
        self.audit = audit
        self.replies = replies
        self.stats = stats
        self.failpoints = failpoints
        self._confirm_later = confirm_later

    async def commit(self, saga: SagaRecord, row: StepRecord | None, audit: Event | None) -> None:
        """Commit the saga (and a step row) to the log and, at the same time, an audit event."""
        rows = (row,) if row is not None else ()
        if audit is None:
            await self.saga_log.save(saga, *rows)
            return
        async with asyncio.TaskGroup() as group:
            group.create_task(self.saga_log.save(saga, *rows), name=f"saga:{saga.id}:log")
            group.create_task(self.audit.append([audit]), name=f"saga:{saga.id}:audit")

    async def commit_step(
        self,
        saga: SagaRecord,
        row: StepRecord,
        action: str,
        result: str,
        *,
        before: Any = None,
        after: Any = None,
    ) -> None:
        """Commit a step row with its audit event (the row's detail is the event's)."""
        await self.commit(
            saga, row, self.step_event(saga, row, action, result, before=before, after=after)
        )

    @staticmethod
    def step_event(
        saga: SagaRecord,
        row: StepRecord,
        action: str,
        result: str,
        *,
        before: Any = None,
        after: Any = None,
    ) -> Event:
        """The audit event of one step."""
        return audit_event(
            workflow=saga.workflow,
            command_id=saga.command_id,
            saga=saga.id,
            step=row.idx,
            action=action,
            result=result,
            detail=row.detail or "",
            ref=row.ref,
            before=before,
            after=after,
        )

    @staticmethod
    def fail(saga: SagaRecord, reason: str) -> None:
        """Mark the saga for compensation (committed with the next commit)."""
        saga.state = "compensating"
        saga.detail = clip(reason)

    async def ensure_started(self, saga: SagaRecord, *, sender: str | None = None) -> None:
        """Commit the saga's 'started' event (again if the outbox has a new stream); the first
        one names the command's claimed sender."""
        if saga.started_seq is not None and saga.started_stream == self.outbox.stream:
            return
        self.failpoints.hit("saga.after_accept")
        event = audit_event(
            workflow=saga.workflow,
            command_id=saga.command_id,
            saga=saga.id,
            step="started",
            action="start",
            result="ok",
            detail="saga started" if saga.started_seq is None else "started event re-sent",
            extra={"params": saga.params},
            sender=sender,
        )
        first, _ = await self.outbox.append([event])
        saga.started_seq, saga.started_stream = first, self.outbox.stream
        await self.saga_log.save(saga)

    async def finish(self, saga: SagaRecord, outcome: Status, detail: str) -> None:
        """Commit the saga's final state, count it, alarm on failure, reply."""
        if outcome != "completed":
            saga.confirm_pending = False  # nothing left to confirm for an undone saga
        saga.state = outcome  # type: ignore[assignment]
        saga.outcome = outcome
        saga.detail = clip(detail)
        await self.commit(saga, None, saga_event(saga, "finished", "finish", outcome, saga.detail))
        if outcome == "completed":
            self.stats.completed += 1
        elif outcome == "compensated":
            self.stats.compensated += 1
        else:
            self.stats.failed += 1
            await self.audit.alarm(saga, saga_devices(saga), saga.detail)
        if saga.confirm_pending:
            self._confirm_later(saga)
        log.log(
            logging.INFO if outcome == "completed" else logging.WARNING,
            "saga %s (%s, command %s) %s: %s",
            saga.id,
            saga.workflow,
            saga.command_id,
            outcome,
            saga.detail,
        )
        self.replies.send(saga.workflow, saga.command_id, outcome, saga.detail)
