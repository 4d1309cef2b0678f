"""Sagas completed locally with ``on_uplink_failure = "continue"``: their central confirmation
is recorded (and replied) when the uplink returns and the central store acknowledges them."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable

from agent.workflows.audit import saga_event
from agent.workflows.journal import SagaJournal
from agent.workflows.saga_log import SagaLogError, SagaRecord
from sync.outbox.store import OutboxUnavailable

log = logging.getLogger("edge_agent.workflows")

RETRY_AFTER = 5.0  # seconds before recording a confirmation is tried again


class Confirmations:
    """Pending confirmations, oldest first."""

    def __init__(self) -> None:
        self._pending: deque[SagaRecord] = deque()
        self._wake = asyncio.Event()

    def add(self, saga: SagaRecord) -> None:
        """Record this saga's confirmation once the central store acknowledges it."""
        self._pending.append(saga)
        self._wake.set()

    def load(self, sagas: Iterable[SagaRecord]) -> None:
        """Sagas the log shows confirm-pending at the start, in the order they started."""
        self._pending = deque(sorted(sagas, key=lambda saga: saga.started_seq or 0))

    async def run(self, journal: SagaJournal) -> None:
        """Record confirmations as they arrive, until cancelled."""
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            saga = self._pending[0]
            try:
                await _confirm(journal, saga)
            except (SagaLogError, OutboxUnavailable) as exc:
                # Kept in the queue (and in the log): retried, and after a restart.
                log.error("saga %s: recording its confirmation failed: %s", saga.id, exc)
                await asyncio.sleep(RETRY_AFTER)
            else:
                self._pending.popleft()


async def _confirm(journal: SagaJournal, saga: SagaRecord) -> None:
    await journal.ensure_started(saga)
    assert saga.started_seq is not None
    await journal.outbox.wait_acked(saga.started_seq)
    saga.confirmed, saga.confirm_pending = True, False
    detail = "confirmed: the central store acknowledged the saga after the uplink returned"
    await journal.commit(saga, None, saga_event(saga, "confirmed", "confirm", "ok", detail))
    journal.replies.send(saga.workflow, saga.command_id, "completed", detail)
