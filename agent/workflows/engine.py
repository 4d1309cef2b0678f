"""Command workflows (sagas): MQTT commands turned into PLC writes that complete or are undone.

A command arrives on ``R/_cmd/{workflow}`` as ``{"id", "params"}`` (agent/workflows/intake.py
queues and decodes it). The engine admits it: a known workflow, a new id (the saga log knows
every command id per workflow), valid parameters, no conflicting saga (exclusivity), within
the rate limit; it records the saga and starts it as a task it owns. Replies go to
``R/_cmd/{workflow}/reply``: ``accepted``, then ``completed`` / ``compensated`` / ``failed``
(or ``rejected`` at once).

A saga runs its steps in order (steps.py). Before every action its intent is committed to the
saga log and after it the outcome (journal.py), so that a crash leaves at most one step "in
doubt", which recovery (recovery.py) settles by reading the PLC back, never by writing again.
A failing step undoes the completed writes in reverse order (compensation.py); see
docs/workflows.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.settings.config_file import AgentSettings
from agent.workflows.audit import Audit, audit_event
from agent.workflows.commands import (
    SENDER_PROPERTY,
    Command,
    CommandRejected,
    TokenBucket,
    clip,
    validate_params,
)
from agent.workflows.compensation import Compensation
from agent.workflows.confirmations import Confirmations
from agent.workflows.failpoints import Failpoints
from agent.workflows.intake import CommandIntake, Round
from agent.workflows.journal import SagaJournal, describe_error
from agent.workflows.plan import Plan, saga_devices
from agent.workflows.plc import DEVICE_ERRORS, PlcIo, TagAccess
from agent.workflows.recovery import Recovery
from agent.workflows.replies import Replies, Status
from agent.workflows.saga_log import DuplicateCommand, SagaLog, SagaLogError, SagaRecord
from agent.workflows.stats import EngineStats
from agent.workflows.steps import SagaSteps
from drivers.base import Reading
from sync.mqtt.client import Message, MqttClient
from sync.outbox.store import Outbox
from sync.uplink.topics import command_topic

log = logging.getLogger("edge_agent.workflows")

SAGA_RETENTION = 30 * 86400.0  # finished sagas (and so their command ids) are kept this long


@dataclass(slots=True)
class _Active:
    saga: SagaRecord
    workflow: str
    devices: frozenset[str]
    exclusive: str
    stuck: str | None = None  # why it stopped acting (saga log failed, internal error)


@dataclass(frozen=True, slots=True)
class _Execution:
    """What runs sagas, built once the saga log is open."""

    saga_log: SagaLog
    journal: SagaJournal
    steps: SagaSteps
    recovery: Recovery


class WorkflowEngine:
    """Runs the configured workflows; `run()` until cancelled."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        outbox: Outbox,
        mqtt: MqttClient,
        devices: TagAccess,
        failpoints: Failpoints | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.stats = EngineStats()
        self._outbox = outbox
        self._mqtt = mqtt
        self._failpoints = failpoints if failpoints is not None else Failpoints.from_env()
        self._path = (data_dir or settings.gateway.data_dir) / "sagas.db"
        root = settings.mqtt.topic_root
        self._topic = command_topic(root, "+")
        self.plc = PlcIo(devices=devices, settings=settings)
        self.replies = Replies(mqtt=mqtt, topic_root=root, stats=self.stats)
        self.audit = Audit(outbox=outbox, stats=self.stats)
        self.intake = CommandIntake(
            command_prefix=command_topic(root, ""),
            replies=self.replies,
            audit=self.audit,
            stats=self.stats,
            admit=self._admit,
        )
        self.confirmations = Confirmations()
        self.plans: dict[str, Plan] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._take_plans(settings)
        self._running: dict[str, _Active] = {}
        self._direct_writes: set[str] = set()  # devices with a single write running (DCMD)
        self._uplink_down = asyncio.Event()
        self._execution: _Execution | None = None
        self._group: asyncio.TaskGroup | None = None
        self._unavailable: str | None = None
        self.ready = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def saga_log(self) -> SagaLog | None:
        """The open saga log (None before `run()` opened it, or when it cannot be used)."""
        return self._execution.saga_log if self._execution is not None else None

    @property
    def unavailable(self) -> str | None:
        """Why no command can run (the saga log cannot be used); None while they can."""
        return self._unavailable

    def observe(self, device: str, readings: list[Reading]) -> None:
        """Pipeline observer: every raw reading, for the waiting steps."""
        self.plc.observe(device, readings)

    def _on_message(self, message: Message) -> None:
        self.intake.on_message(message)

    def _on_connection(self, up: bool) -> None:
        if up:
            self._uplink_down.clear()
            self.replies.connected()
        else:
            self._uplink_down.set()

    async def run(self) -> None:
        """Open the saga log, resolve unfinished sagas, then serve commands until cancelled."""
        # Retain-As-Published: the broker keeps RETAIN on a retained command delivered live, so
        # that intake can refuse it (MQTT 5; on 3.1.1 only the stored copy is marked).
        self._mqtt.subscribe(self._topic, self._on_message, qos=1, retain_as_published=True)
        self._mqtt.add_listener(self._on_connection)
        self._on_connection(self._mqtt.is_connected)
        try:
            async with contextlib.AsyncExitStack() as stack:
                saga_log = await self._open_log()
                if saga_log is not None:
                    stack.push_async_callback(saga_log.close)
                async with asyncio.TaskGroup() as group:
                    self._group = group
                    group.create_task(self.replies.run(), name="workflows:replies")
                    if saga_log is not None and await self._start_from_log(saga_log):
                        assert self._execution is not None
                        group.create_task(
                            self.confirmations.run(self._execution.journal),
                            name="workflows:confirmations",
                        )
                    group.create_task(self.intake.run(), name="workflows:commands")
                    self.ready.set()
        finally:
            self._group = None
            self._execution = None
            self._mqtt.unsubscribe(self._topic)
            self._mqtt.remove_listener(self._on_connection)
            self.plc.cancel_waits()

    async def reconfigure(self, settings: AgentSettings) -> None:
        """Take the workflows of a reloaded config; running sagas finish with their old plan."""
        self._take_plans(settings)
        self.plc.settings = settings

    def _take_plans(self, settings: AgentSettings) -> None:
        plans = {workflow.name: Plan.of(settings, workflow) for workflow in settings.workflows}
        now = time.monotonic()
        for name, plan in plans.items():
            old = self.plans.get(name)
            if old is None or old.config.rate_limit != plan.config.rate_limit:
                count, period = plan.config.rate
                self._buckets[name] = TokenBucket(count, period, now=now)
        for name in set(self._buckets) - set(plans):
            del self._buckets[name]
        self.plans = plans

    async def _open_log(self) -> SagaLog | None:
        saga_log = SagaLog(self._path)
        try:
            await saga_log.open()
        except Exception as exc:
            # Without a saga log no command may run (nothing could be undone after a crash);
            # data collection goes on, and every command is rejected with the reason.
            self._unavailable = f"unavailable: the saga log cannot be opened ({exc})"
            log.error("workflows disabled: saga log %s: %s", self._path, exc)
            with contextlib.suppress(Exception):
                await saga_log.close()
            await self.audit.alarm(None, None, self._unavailable)
            return None
        if saga_log.recovered_from:
            await self.audit.alarm(
                None,
                None,
                f"the saga log was unreadable and was moved to {saga_log.recovered_from}; "
                "sagas in progress before this start are unknown: check the line",
            )
        return saga_log

    async def _start_from_log(self, saga_log: SagaLog) -> bool:
        """Load what the log says is unfinished and start resolving it; False if unreadable."""
        try:
            pruned = await saga_log.prune(time.time() - SAGA_RETENTION)
            pending = await saga_log.confirm_pending()
            unfinished = await saga_log.unfinished()
        except SagaLogError as exc:
            self._unavailable = f"unavailable: the saga log cannot be read ({exc})"
            log.error("workflows disabled: %s", self._unavailable)
            await self.audit.alarm(None, None, self._unavailable)
            return False
        self._execution = self._execution_for(saga_log)
        if pruned:
            log.info("saga log: %d finished sagas older than 30 days removed", pruned)
        self.confirmations.load(pending)
        if unfinished:
            log.warning("resolving %d unfinished saga(s) after a restart", len(unfinished))
        for saga in unfinished:
            plan = self.plans.get(saga.workflow)
            devices = plan.devices if plan is not None else saga_devices(saga)
            exclusive = plan.config.exclusive if plan is not None else "machine"
            self._start_task(saga, plan, devices, exclusive, recover=True)
        return True

    def _execution_for(self, saga_log: SagaLog) -> _Execution:
        journal = SagaJournal(
            saga_log=saga_log,
            outbox=self._outbox,
            audit=self.audit,
            replies=self.replies,
            stats=self.stats,
            failpoints=self._failpoints,
            confirm_later=self.confirmations.add,
        )
        compensation = Compensation(journal=journal, plc=self.plc)
        steps = SagaSteps(
            journal=journal,
            plc=self.plc,
            compensation=compensation,
            uplink_down=self._uplink_down,
        )
        recovery = Recovery(journal=journal, plc=self.plc, steps=steps, compensation=compensation)
        return _Execution(saga_log, journal, steps, recovery)

    def _start_task(
        self,
        saga: SagaRecord,
        plan: Plan | None,
        devices: frozenset[str],
        exclusive: str,
        *,
        recover: bool,
        sender: str | None = None,
    ) -> None:
        assert self._group is not None
        self._running[saga.id] = _Active(saga, saga.workflow, devices, exclusive)
        self._group.create_task(
            self._saga_task(saga, plan, recover, sender), name=f"saga:{saga.id}"
        )

    # -- admission ---------------------------------------------------------------------------

    async def _admit(self, workflow: str, command: Command, current: Round) -> None:
        """Start a saga for a decoded command, or reject it (the checks in docs/workflows.md)."""
        plan = self.plans.get(workflow)
        if plan is None:
            known = ", ".join(sorted(self.plans)) or "none"
            current.reject(
                workflow,
                command.id,
                f"unknown workflow {workflow!r} (known: {known})",
                sender=command.sender,
            )
            return
        execution = self._execution
        if self._unavailable is not None or execution is None:
            current.reject(
                workflow, command.id, self._unavailable or "unavailable", sender=command.sender
            )
            return
        saga_log = execution.saga_log
        try:
            existing = await saga_log.find(plan.name, command.id)
        except SagaLogError as exc:
            current.reject(
                workflow, command.id, f"unavailable: saga log: {exc}", sender=command.sender
            )
            return
        if existing is not None:
            self._duplicate(current, plan, command.id, existing)
            return
        try:
            params = self._validated(plan, command)
        except CommandRejected as rejection:
            current.reject(workflow, command.id, rejection.reason, sender=command.sender)
            return
        saga = SagaRecord(
            id=str(uuid.uuid4()),
            workflow=plan.name,
            command_id=command.id,
            params=params,
            state="running",
        )
        try:
            await saga_log.create(saga)
        except DuplicateCommand:
            found = await saga_log.find(plan.name, command.id)
            if found is not None:
                self._duplicate(current, plan, command.id, found)
            return
        except SagaLogError as exc:
            current.reject(
                workflow, command.id, f"unavailable: saga log: {exc}", sender=command.sender
            )
            return
        self.stats.accepted += 1
        detail = f"saga {saga.id}: {len(plan.config.steps)} steps"
        self.replies.send(plan.name, command.id, "accepted", detail, sender=command.sender)
        self._start_task(
            saga, plan, plan.devices, plan.config.exclusive, recover=False, sender=command.sender
        )

    def _validated(self, plan: Plan, command: Command) -> dict[str, Any]:
        """The command's parameters, checked; CommandRejected when it cannot start now."""
        if plan.config.require_sender and command.sender is None:
            raise CommandRejected(
                f'workflow {plan.name} requires a "{SENDER_PROPERTY}" (MQTT 5 user property)'
            )
        params = validate_params(command.params, plan.specs)
        plan.prepare_values(params)
        writing = sorted(plan.devices & self._direct_writes)
        if writing:
            raise CommandRejected(f"busy: a single write to {writing[0]} (Sparkplug DCMD) running")
        conflict = self._conflict(plan)
        if conflict is not None:
            running = f"busy: saga {conflict.saga.id} ({conflict.workflow})"
            if conflict.stuck:
                raise CommandRejected(f"{running} stopped: {conflict.stuck}")
            raise CommandRejected(f"{running} running")
        if not self._buckets[plan.name].take(time.monotonic()):
            raise CommandRejected(f"rate limited: at most {plan.config.rate_limit}")
        return params

    async def single_write(
        self, ref: str, value: Any, *, origin: str
    ) -> tuple[Literal["completed", "refused", "failed"], str]:
        """One guarded write from outside the workflows (a Sparkplug DCMD; docs/sparkplug.md,
        "Commands"): the tag must be writable and the value valid for it (a write step's
        validation), no saga and no other single write may be acting on its device
        (exclusivity), the previous value is read, the write is verified by reading back, and
        every outcome is a `workflow` audit event. (outcome, what happened)."""
        resolved = self.plc.settings.tag(ref)
        refused: str | None = None
        converted: Any = None
        device = ref.partition("/")[0]
        if resolved is None:
            refused = f"unknown tag {ref}"
        elif not resolved[1].writable:
            refused = f"{ref} is not writable (writable = false)"
        else:
            try:
                converted = resolved[1].command_value(value)
            except ValueError as exc:
                refused = f"invalid value for {ref}: {exc}"
        if refused is None:
            busy = [a for a in self._running.values() if device in a.devices]
            if busy:
                refused = f"busy: saga {busy[0].saga.id} ({busy[0].workflow}) acts on {device}"
            elif device in self._direct_writes:
                refused = f"busy: another single write to {device} running"
        if refused is not None:
            await self._single_audit(ref, origin, "refused", refused, value, None)
            return "refused", refused
        self._direct_writes.add(device)
        try:
            try:
                before = (await self.plc.read(ref)).value
                after = await self.plc.write(ref, converted)
            except DEVICE_ERRORS as exc:
                detail = f"write of {converted!r} to {ref} failed: {describe_error(exc)}"
                await self._single_audit(ref, origin, "failed", detail, converted, None)
                return "failed", detail
        finally:
            self._direct_writes.discard(device)
        detail = f"wrote {converted!r} to {ref}, read back {after!r}"
        await self._single_audit(ref, origin, "completed", detail, before, after)
        return "completed", detail

    async def _single_audit(
        self, ref: str, origin: str, result: str, detail: str, before: Any, after: Any
    ) -> None:
        await self.audit.append(
            [
                audit_event(
                    workflow=None,
                    command_id=None,
                    saga=None,
                    step=None,
                    action="single_write",
                    result=result,
                    detail=detail,
                    ref=ref,
                    before=before,
                    after=after,
                    sender=origin,
                )
            ]
        )

    def _duplicate(self, current: Round, plan: Plan, command_id: str, saga: SagaRecord) -> None:
        self.stats.duplicates += 1
        status: Status = "accepted" if not saga.finished else saga.state  # type: ignore[assignment]
        progress = f"saga {saga.id} is {saga.state}"
        detail = f"duplicate id: {progress}" + (f": {saga.detail}" if saga.detail else "")
        self.replies.send(plan.name, command_id, status, clip(detail))
        current.audits.append(
            audit_event(
                workflow=plan.name,
                command_id=command_id,
                saga=saga.id,
                step=None,
                action="duplicate",
                result=status,
                detail="the same id again: not run a second time",
            )
        )

    def _conflict(self, plan: Plan) -> _Active | None:
        for active in self._running.values():
            shares = bool(active.devices & plan.devices)
            if active.workflow == plan.name:
                return active
            if (plan.config.exclusive == "machine" or active.exclusive == "machine") and shares:
                return active
        return None

    # -- saga tasks --------------------------------------------------------------------------

    async def _saga_task(
        self, saga: SagaRecord, plan: Plan | None, recover: bool, sender: str | None
    ) -> None:
        execution = self._execution
        assert execution is not None
        try:
            if recover:
                await execution.recovery.recover(saga, plan)
            else:
                assert plan is not None
                await execution.journal.ensure_started(saga, sender=sender)
                await execution.steps.forward(saga, plan, 1)
        except Exception as exc:
            # The saga log or the outbox failed, or a bug: stop acting on the line. The saga
            # stays unfinished in the log and recovery resolves it at the next start.
            reason = f"internal error: {clip(str(exc) or type(exc).__name__)}"
            log.exception("saga %s (%s) stopped", saga.id, saga.workflow)
            active = self._running.get(saga.id)
            if active is not None:
                active.stuck = reason
            await self.audit.alarm(
                saga, None, f"saga stopped ({reason}); the line needs a person; restart resolves"
            )
            self.replies.send(
                saga.workflow,
                saga.command_id,
                "failed",
                f"{reason}: the line needs a person (the saga is resolved at the next restart)",
            )
            return
        self._running.pop(saga.id, None)
