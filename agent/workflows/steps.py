"""A saga's steps, forward: write (intent committed first, one write, verified), wait (for a
tag to read a value), confirm (the central store acknowledged the saga's start). A failing
step hands the saga to compensation (docs/workflows.md, "Steps")."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.settings.workflows import ConfirmStep, WaitStep, WriteStep
from agent.workflows.commands import render
from agent.workflows.compensation import Compensation
from agent.workflows.journal import SagaJournal, describe_error
from agent.workflows.plan import Plan
from agent.workflows.plc import DEVICE_ERRORS, Outcome, PlcIo
from agent.workflows.saga_log import SagaRecord, StepPhase, StepRecord
from drivers.base import DriverFault, DriverUnavailable

SETTLE_DEADLINE = 30.0  # reading back a write whose outcome is unknown, during a saga
# The phase a write step ends in, by what reading back showed.
SETTLED: dict[Outcome, StepPhase] = {
    "applied": "done",
    "not_applied": "not_applied",
    "unknown": "unknown",
}


class SagaSteps:
    """Runs a saga's steps from a given one to the end (or to its compensation)."""

    def __init__(
        self,
        *,
        journal: SagaJournal,
        plc: PlcIo,
        compensation: Compensation,
        uplink_down: asyncio.Event,
    ) -> None:
        self._journal = journal
        self._plc = plc
        self._compensation = compensation
        self._uplink_down = uplink_down

    async def forward(self, saga: SagaRecord, plan: Plan, first: int) -> None:
        """Run steps `first`.. of the plan; compensate at the first that fails."""
        failpoints = self._journal.failpoints
        steps = plan.config.steps
        for idx in range(first, len(steps) + 1):
            step = steps[idx - 1]
            if isinstance(step, WriteStep):
                failed = await self._write(saga, plan, idx, step)
            elif isinstance(step, WaitStep):
                failed = await self._wait(saga, plan, idx, step)
            else:
                failed = await self._confirm(saga, plan, idx, step)
            failpoints.hit("saga.after_step_committed")
            if failed:
                await self._compensation.compensate(saga)
                return
        failpoints.hit("saga.before_finish")
        detail = f"{len(steps)} steps done"
        if saga.confirm_pending:
            detail += "; completed locally, the central confirmation follows via the outbox"
        await self._journal.finish(saga, "completed", detail)

    async def _failed(self, saga: SagaRecord, row: StepRecord, result: str, reason: str) -> bool:
        row.detail = reason
        self._journal.fail(saga, reason)
        await self._journal.commit_step(saga, row, row.kind, result)
        return True

    # -- write -------------------------------------------------------------------------------

    async def _write(self, saga: SagaRecord, plan: Plan, idx: int, step: WriteStep) -> bool:
        ref = step.write
        saga.step = idx
        row = StepRecord(idx, "write", ref, "not_applied")
        rule = plan.tags[ref]
        try:
            value = rule.command_value(render(step.value, saga.params))
            target = (
                None
                if step.compensate_value is None
                else rule.command_value(render(step.compensate_value, saga.params))
            )
        except (ValueError, KeyError, IndexError) as exc:
            reason = f"step {idx}: cannot prepare the value for {ref}: {exc}"
            return await self._failed(saga, row, "failed", reason)
        row.value = value
        try:
            reading = await self._plc.read(ref)
            if reading.quality != "good":
                raise DriverUnavailable(reading.error or f"quality {reading.quality}")
        except DEVICE_ERRORS as exc:
            reason = f"step {idx}: cannot read {ref} before writing it: {describe_error(exc)}"
            return await self._failed(saga, row, "failed", reason)
        previous = reading.value
        row.previous = previous
        row.target = previous if target is None else target
        row.phase = "intent"
        row.detail = f"about to write {value!r}, previous value {previous!r}"
        await self._journal.commit_step(saga, row, "write", "begin", before=previous, after=value)
        return await self._send(saga, row, idx)

    async def _send(self, saga: SagaRecord, row: StepRecord, idx: int) -> bool:
        """The write itself, once; its outcome settled by reading back when in doubt."""
        assert row.ref is not None
        ref, value, previous = row.ref, row.value, row.previous
        failpoints = self._journal.failpoints
        failpoints.hit("saga.before_write")
        error: BaseException | None = None
        read_back: Any = None
        try:
            read_back = await self._plc.write(ref, value)
        except DEVICE_ERRORS as exc:
            error = exc
        failpoints.hit("saga.after_write_sent")
        if error is None:
            row.phase, row.result = "done", read_back
            row.detail = f"wrote {value!r} (read back {read_back!r}), previous value {previous!r}"
            await self._journal.commit_step(
                saga, row, "write", "ok", before=previous, after=read_back
            )
            return False
        # Refused or never sent: the driver says nothing changed, one read confirms it.
        # Otherwise the outcome is unknown and only reading back settles it.
        trusted = isinstance(error, DriverFault | DriverUnavailable)
        outcome, seen = await self._plc.settle(
            ref, value, previous, 2.0 if trusted else SETTLE_DEADLINE
        )
        if outcome == "unknown" and trusted and seen is None:
            outcome = "not_applied"
        row.phase = SETTLED[outcome]
        row.result = seen
        reason = f"step {idx}: write {value!r} to {ref} failed: {describe_error(error)}"
        row.detail = f"{reason}; settled by reading back: {outcome.replace('_', ' ')} ({seen!r})"
        self._journal.fail(saga, reason)
        await self._journal.commit_step(saga, row, "write", "failed", before=previous, after=seen)
        return True

    # -- wait --------------------------------------------------------------------------------

    async def _wait(self, saga: SagaRecord, plan: Plan, idx: int, step: WaitStep) -> bool:
        ref = step.wait
        saga.step = idx
        row = StepRecord(idx, "wait", ref, "waiting")
        try:
            expected = plan.tags[ref].command_value(render(step.value, saga.params))
        except (ValueError, KeyError, IndexError) as exc:
            row.phase = "timeout"
            reason = f"step {idx}: cannot prepare the value to wait for on {ref}: {exc}"
            return await self._failed(saga, row, "failed", reason)
        row.value = expected
        row.detail = f"waiting up to {step.timeout:g}s for {ref} = {expected!r}"
        await self._journal.commit_step(saga, row, "wait", "begin", after=expected)
        self._journal.failpoints.hit("saga.before_wait")
        reached, seen = await self._plc.wait_for(ref, expected, step.timeout)
        row.result = seen
        if reached:
            row.phase = "done"
            row.detail = f"{ref} = {seen!r}"
            await self._journal.commit_step(saga, row, "wait", "ok", after=seen)
            return False
        row.phase = "timeout"
        reason = (
            f"step {idx}: {ref} did not reach {expected!r} within {step.timeout:g}s "
            f"(last value {seen!r})"
        )
        row.detail = reason
        self._journal.fail(saga, reason)
        await self._journal.commit_step(saga, row, "wait", "timeout", after=seen)
        return True

    # -- confirm -----------------------------------------------------------------------------

    async def _confirm(self, saga: SagaRecord, plan: Plan, idx: int, step: ConfirmStep) -> bool:
        journal = self._journal
        await journal.ensure_started(saga)
        saga.step = idx
        row = StepRecord(idx, "confirm", None, "waiting", value=saga.started_seq)
        row.detail = (
            f"waiting up to {step.timeout:g}s for the central ack of seq {saga.started_seq}"
        )
        await journal.commit_step(saga, row, "confirm", "begin")
        journal.failpoints.hit("saga.before_confirm")
        assert saga.started_seq is not None
        confirmed, why = await self._wait_confirmed(saga.started_seq, step.timeout)
        if confirmed:
            row.phase, row.detail = "done", "the central store acknowledged the saga's start"
            saga.confirmed = True
            await journal.commit_step(saga, row, "confirm", "ok")
            return False
        if plan.config.on_uplink_failure == "continue":
            row.phase = "deferred"
            row.detail = f"{why}; on_uplink_failure = continue: confirmation follows later"
            saga.confirm_pending = True
            await journal.commit_step(saga, row, "confirm", "deferred")
            return False
        row.phase = "uplink_failed"
        reason = f"step {idx}: the central store did not confirm: {why}"
        row.detail = reason
        journal.fail(saga, reason)
        await journal.commit_step(saga, row, "confirm", "uplink_failed")
        return True

    async def _wait_confirmed(self, seq: int, limit: float) -> tuple[bool, str]:
        """Wait for the central ack of `seq`; fail when the uplink is down or on timeout."""
        outbox = self._journal.outbox
        if outbox.acked_seq >= seq:
            return True, ""
        if self._uplink_down.is_set():
            return False, "the uplink is down"
        acked = asyncio.create_task(outbox.wait_acked(seq), name=f"confirm:{seq}:ack")
        down = asyncio.create_task(self._uplink_down.wait(), name=f"confirm:{seq}:uplink")
        try:
            done, _ = await asyncio.wait(
                {acked, down}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (acked, down):
                task.cancel()
            await asyncio.wait({acked, down})
        if acked in done and not acked.cancelled() and acked.exception() is None:
            return True, ""
        if outbox.acked_seq >= seq:
            return True, ""
        if down in done:
            return False, "the uplink went down"
        if acked in done:
            return False, f"outbox: {acked.exception()}"
        return False, f"no central ack within {limit:g}s"
