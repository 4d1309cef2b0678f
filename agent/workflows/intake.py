"""Commands in: the MQTT callback only queues them (bounded; overflow is rejected "busy"); one
task decodes them in rounds and hands each valid one to the engine's admission. Rejections are
replied at once and audited, one by one up to a budget and summarised beyond it, so that a
flood cannot fill the outbox with events it may never drop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace

from agent.workflows.audit import Audit, audit_event
from agent.workflows.commands import (
    Command,
    CommandRejected,
    TokenBucket,
    clip,
    decode_command,
    peek_command_id,
    sender_of,
)
from agent.workflows.replies import Replies
from agent.workflows.stats import EngineStats
from sync.events import Event
from sync.mqtt.client import Message

log = logging.getLogger("edge_agent.workflows")

COMMAND_QUEUE = 1024  # commands waiting for the command task; more are rejected "busy"
COMMAND_BATCH = 256  # commands handled per round (their audit events share one commit)
# Rejections are audited one by one up to a burst of AUDIT_BURST and AUDIT_RATE per second
# after it; beyond that a flood is summarised in one event.
AUDIT_BURST = 2000
AUDIT_RATE = 200.0
BUSY = "busy: too many commands queued"


class Round:
    """The audit events of one round of commands (committed together)."""

    def __init__(self, intake: CommandIntake) -> None:
        self._intake = intake
        self.audits: list[Event] = []

    def reject(
        self, workflow: str, command_id: str | None, reason: str, *, sender: str | None = None
    ) -> None:
        """Reply ``rejected`` and audit it (within the audit budget)."""
        self._intake.reject(self.audits, workflow, command_id, reason, sender=sender)


Admit = Callable[[str, Command, Round], Awaitable[None]]


class CommandIntake:
    """The queue between the MQTT callback and the engine's admission."""

    def __init__(
        self,
        *,
        command_prefix: str,
        replies: Replies,
        audit: Audit,
        stats: EngineStats,
        admit: Admit,
    ) -> None:
        self._prefix = command_prefix
        self._replies = replies
        self._audit = audit
        self._stats = stats
        self._admit = admit
        self._queue: asyncio.Queue[Message] = asyncio.Queue(COMMAND_QUEUE)
        self._overflow: deque[tuple[str, str | None]] = deque()
        self._overflow_lost = 0
        self._budget = TokenBucket(AUDIT_BURST, AUDIT_BURST / AUDIT_RATE, now=time.monotonic())

    def on_message(self, message: Message) -> None:
        """The MQTT callback: enqueue only, never parse or wait here."""
        self._stats.commands += 1
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self._stats.busy_overflow += 1
            workflow = message.topic[len(self._prefix) :]
            command_id = peek_command_id(message.payload)
            self._replies.send(workflow, command_id, "rejected", BUSY)
            if len(self._overflow) < COMMAND_QUEUE * 4:
                self._overflow.append((workflow, command_id))
            else:
                self._overflow_lost += 1

    async def run(self) -> None:
        """Handle queued commands in rounds until cancelled."""
        while True:
            batch = [await self._queue.get()]
            while len(batch) < COMMAND_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            current = Round(self)
            for message in batch:
                try:
                    await self._handle(message, current)
                except Exception:  # a bug must not stop command handling
                    log.exception("command on %s could not be handled", message.topic)
            self._audit_overflow(current.audits)
            if current.audits:
                await self._audit.append(current.audits)
            # Each round yields to the event loop: a burst never starves the pollers.
            await asyncio.sleep(0)

    async def _handle(self, message: Message, current: Round) -> None:
        workflow = clip(message.topic[len(self._prefix) :])
        try:
            command = decode_command(message.payload)
        except CommandRejected as rejection:
            current.reject(workflow, rejection.command_id, rejection.reason)
            return
        try:
            command = replace(command, sender=sender_of(message.user_properties))
        except CommandRejected as rejection:
            current.reject(workflow, command.id, rejection.reason)
            return
        if message.retain:
            # A retained command would run again for every new subscriber.
            current.reject(
                workflow, command.id, "retained commands are not accepted", sender=command.sender
            )
            return
        await self._admit(workflow, command, current)

    def reject(
        self,
        audits: list[Event],
        workflow: str,
        command_id: str | None,
        reason: str,
        *,
        sender: str | None = None,
    ) -> None:
        """Reply ``rejected`` and audit it into `audits` (within the audit budget)."""
        self._stats.rejected += 1
        self._replies.send(workflow, command_id, "rejected", reason, sender=sender)
        self._audit_rejection(audits, workflow, command_id, reason, sender)

    def _audit_rejection(
        self,
        audits: list[Event],
        workflow: str,
        command_id: str | None,
        reason: str,
        sender: str | None = None,
    ) -> None:
        if self._budget.take(time.monotonic()):
            audits.append(
                audit_event(
                    workflow=workflow,
                    command_id=command_id,
                    saga=None,
                    step=None,
                    action="reject",
                    result="rejected",
                    detail=reason,
                    sender=sender,
                )
            )
        else:
            self._stats.audits_suppressed += 1

    def _audit_overflow(self, audits: list[Event]) -> None:
        while self._overflow:
            workflow, command_id = self._overflow.popleft()
            self._stats.rejected += 1
            self._audit_rejection(audits, workflow, command_id, BUSY)
        suppressed = self._stats.audits_suppressed + self._overflow_lost
        if suppressed and self._budget.take(time.monotonic()):
            audits.append(
                audit_event(
                    workflow=None,
                    command_id=None,
                    saga=None,
                    step=None,
                    action="reject",
                    result="suppressed",
                    detail=f"{suppressed} rejected commands not audited one by one (flood)",
                )
            )
            self._stats.audits_suppressed = 0
            self._overflow_lost = 0
