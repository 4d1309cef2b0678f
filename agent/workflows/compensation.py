"""Undoing a saga (docs/workflows.md, "Compensation"): its writes restored in reverse order,
each to its compensate_value or to the value read before it was written, verified by reading
back; a write in doubt after a restart is settled by reading, never by writing again."""

from __future__ import annotations

from typing import Any

from agent.workflows.journal import SagaJournal, describe_error
from agent.workflows.plc import DEVICE_ERRORS, PlcIo
from agent.workflows.saga_log import NEEDS_UNDO, SagaRecord, StepRecord
from drivers.base import DriverFault

COMPENSATE_ATTEMPTS = 3
RECOVERY_READ_DEADLINE = 120.0  # reading back after a restart (the devices are reconnecting)


def _steps(indexes: list[int]) -> str:
    return ", ".join(str(idx) for idx in sorted(indexes))


class Compensation:
    """Undoes the completed writes of a saga whose state 'compensating' is committed."""

    def __init__(self, *, journal: SagaJournal, plc: PlcIo) -> None:
        self._journal = journal
        self._plc = plc

    async def compensate(self, saga: SagaRecord) -> None:
        """Undo the saga's writes in reverse order, then finish it compensated or failed."""
        failpoints = self._journal.failpoints
        failpoints.hit("saga.before_compensate")
        reason = saga.detail or "compensating"
        undone: list[int] = []
        failed: list[int] = []
        for idx in sorted(saga.steps, reverse=True):
            row = saga.steps[idx]
            if row.kind != "write" or row.phase not in NEEDS_UNDO:
                continue
            if await self._undo(saga, row):
                undone.append(idx)
            else:
                failed.append(idx)
        saga.detail = reason
        failpoints.hit("saga.before_finish")
        if failed:
            await self._journal.finish(
                saga,
                "failed",
                f"{reason}; compensation FAILED for step(s) {_steps(failed)}"
                + (f" (undone: {_steps(undone)})" if undone else "")
                + ": the line needs a person",
            )
        else:
            what = f"undone: step(s) {_steps(undone)}" if undone else "nothing to undo"
            await self._journal.finish(saga, "compensated", f"{reason}; {what}")

    async def _undo(self, saga: SagaRecord, row: StepRecord) -> bool:
        """Restore one write (compensate_value or the captured previous value), verified."""
        assert row.ref is not None
        journal = self._journal
        target = row.target
        if row.phase == "compensating" and await self._restored_before(saga, row):
            return True
        row.phase = "compensating"
        row.detail = f"about to restore {target!r} (written was {row.value!r})"
        await journal.commit_step(saga, row, "compensate", "begin", before=row.value, after=target)
        journal.failpoints.hit("saga.before_compensate_write")
        done, read_back, error = await self._restore(row.ref, target)
        journal.failpoints.hit("saga.after_compensate_sent")
        if done:
            row.phase, row.result = "compensated", read_back
            row.detail = f"restored {target!r} (read back {read_back!r})"
            await journal.commit_step(
                saga, row, "compensate", "ok", before=row.value, after=read_back
            )
        else:
            row.phase = "compensation_failed"
            row.detail = f"could not restore {target!r}: {describe_error(error)}"
            await journal.commit_step(
                saga, row, "compensate", "failed", before=row.value, after=target
            )
        journal.failpoints.hit("saga.after_compensate_committed")
        return done

    async def _restored_before(self, saga: SagaRecord, row: StepRecord) -> bool:
        """A compensation in doubt after a restart: settled if the PLC already shows it."""
        assert row.ref is not None
        target = row.target
        reading = await self._plc.read_good(row.ref, RECOVERY_READ_DEADLINE)
        if reading is None or not self._plc.same(row.ref, reading.value, target):
            return False
        row.phase, row.result = "compensated", reading.value
        row.detail = f"restored {target!r} (settled by reading back after a restart)"
        await self._journal.commit_step(saga, row, "compensate", "ok", after=target)
        self._journal.failpoints.hit("saga.after_compensate_committed")
        return True

    async def _restore(self, ref: str, target: Any) -> tuple[bool, Any, BaseException | None]:
        """Write `target` (up to COMPENSATE_ATTEMPTS times while the outcome is unknown);
        (restored, the value read back, the last error)."""
        error: BaseException | None = None
        for attempt in range(COMPENSATE_ATTEMPTS):
            try:
                return True, await self._plc.write(ref, target), None
            except DriverFault as exc:
                return False, None, exc  # refused: retrying the same request will not help
            except DEVICE_ERRORS as exc:
                error = exc
            # The outcome is unknown: read back before trying once more.
            reading = await self._plc.read_good(ref, 5.0 * (attempt + 1))
            if reading is not None and self._plc.same(ref, reading.value, target):
                return True, reading.value, error
        return False, None, error
