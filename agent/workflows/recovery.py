"""Crash recovery (docs/workflows.md, "Crash recovery"): a saga the log shows unfinished after
a restart is settled by reading the PLC back (never by writing again), then resumed where it
stopped if its workflow is unchanged and it was interrupted recently, else compensated."""

from __future__ import annotations

import logging
import time

from agent.settings.workflows import ConfirmStep, WaitStep
from agent.workflows.audit import saga_event
from agent.workflows.compensation import RECOVERY_READ_DEADLINE, Compensation
from agent.workflows.journal import SagaJournal
from agent.workflows.plan import Plan
from agent.workflows.plc import PlcIo
from agent.workflows.saga_log import SagaRecord, StepRecord
from agent.workflows.steps import SETTLED, SagaSteps

log = logging.getLogger("edge_agent.workflows")

RESUME_WINDOW = 600.0  # an interrupted saga older than this is compensated, not resumed
_IN_DOUBT = {
    "applied": "the write took effect",
    "not_applied": "the write did not take effect; the step runs again",
    "unknown": "neither the written nor the previous value: undo",
}


class Recovery:
    """Resolves the sagas a crash left unfinished."""

    def __init__(
        self, *, journal: SagaJournal, plc: PlcIo, steps: SagaSteps, compensation: Compensation
    ) -> None:
        self._journal = journal
        self._plc = plc
        self._steps = steps
        self._compensation = compensation

    async def recover(self, saga: SagaRecord, plan: Plan | None) -> None:
        """Settle the step in progress, then resume or compensate."""
        journal = self._journal
        age = time.time() - saga.updated
        detail = f"unfinished after a restart: state {saga.state}, step {saga.step}"
        await journal.audit.append([saga_event(saga, "recovery", "recover", "begin", detail)])
        if saga.state == "compensating":
            await self._compensation.compensate(saga)
            return
        await journal.ensure_started(saga)
        if plan is None:
            mismatch: str | None = f"workflow {saga.workflow!r} is no longer configured"
        else:
            mismatch = plan.mismatch(saga)
        if mismatch is not None or plan is None:
            await self._abandon(saga, f"not resumed after a restart: {mismatch}")
            return
        resume_at = await self._resume_point(saga)
        if resume_at is None:
            return  # compensated
        window = RESUME_WINDOW + _slack(saga, plan, resume_at)
        if not 0 <= age <= window:
            await self._abandon(
                saga,
                f"interrupted by an agent restart {age:.0f}s ago (more than "
                f"{window:.0f}s, or the clock moved back): not resumed",
            )
            return
        log.info("saga %s (%s): resuming at step %d", saga.id, saga.workflow, resume_at)
        await self._steps.forward(saga, plan, resume_at)

    async def _abandon(self, saga: SagaRecord, reason: str) -> None:
        self._journal.fail(saga, reason)
        await self._journal.commit(saga, None, None)
        await self._compensation.compensate(saga)

    async def _resume_point(self, saga: SagaRecord) -> int | None:
        """The step to resume at, once the step in progress is settled; None if compensated."""
        for idx in sorted(saga.steps):
            row = saga.steps[idx]
            if row.phase not in ("done", "deferred"):
                return await self._settle(saga, idx, row)
        return max(saga.steps, default=0) + 1

    async def _settle(self, saga: SagaRecord, idx: int, row: StepRecord) -> int | None:
        if row.kind == "write" and row.phase == "intent":
            return await self._settle_write(saga, idx, row)
        if row.kind == "confirm" and row.phase == "waiting":
            started = saga.started_seq
            if started is None or self._journal.outbox.acked_seq < started:
                return idx  # wait again (a fresh timeout), then on_uplink_failure
            row.phase, row.detail = "done", "acknowledged while the agent was down"
            saga.confirmed = True
            await self._journal.commit_step(saga, row, "recover", "ok")
            return idx + 1
        if row.phase in ("waiting", "not_applied"):
            return idx  # a wait runs again with a fresh timeout; a write once more
        await self._abandon(saga, f"step {idx} ended {row.phase} before the restart")
        return None

    async def _settle_write(self, saga: SagaRecord, idx: int, row: StepRecord) -> int | None:
        """A write whose intent was committed but not its outcome: read back what happened."""
        assert row.ref is not None
        outcome, seen = await self._plc.settle(
            row.ref, row.value, row.previous, RECOVERY_READ_DEADLINE
        )
        row.result = seen
        row.phase = SETTLED[outcome]
        row.detail = f"in doubt after a restart; read back {seen!r}: " + _IN_DOUBT[outcome]
        if outcome == "unknown":
            self._journal.fail(saga, f"step {idx}: outcome unknown after a restart ({seen!r})")
        await self._journal.commit_step(saga, row, "recover", outcome, after=seen)
        if outcome == "unknown":
            await self._compensation.compensate(saga)
            return None
        return idx + 1 if outcome == "applied" else idx


def _slack(saga: SagaRecord, plan: Plan, resume_at: int) -> float:
    """A saga idles legitimately during a wait or confirm step: its last commit may be as old
    as that step's timeout before the crash."""
    steps = plan.config.steps
    step = steps[resume_at - 1] if resume_at <= len(steps) else None
    if saga.steps.get(resume_at) is not None and isinstance(step, WaitStep | ConfirmStep):
        return step.timeout
    return 0.0
