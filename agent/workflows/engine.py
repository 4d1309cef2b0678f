"""Command workflows (sagas): MQTT commands turned into PLC writes that complete or are undone.

A command arrives on ``R/_cmd/{workflow}`` as ``{"id", "params"}``. The MQTT callback only
enqueues it (bounded queue; overflow is rejected "busy"); one command task validates it,
checks idempotency (the saga log knows every command id per workflow), exclusivity and the
rate limit, records the saga and starts it as a task owned by the engine. Replies go to
``R/_cmd/{workflow}/reply``: ``accepted``, then ``completed`` / ``compensated`` / ``failed``
(or ``rejected`` at once).

A saga runs its steps in order. Before every action its intent is committed to the saga log
(agent/saga_log.py) and after it the outcome, so that a crash leaves at most one step "in
doubt", which recovery settles by reading the PLC back, never by writing again. Every step
start and outcome is also a durable ``workflow`` event in the outbox (the audit trail).
A failing step undoes the completed writes in reverse order; see docs/workflows.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import string
import time
import unicodedata
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from agent.settings.config_file import AgentSettings
from agent.settings.workflows import (
    ConfirmStep,
    ParamSpec,
    StepValue,
    WaitStep,
    WorkflowConfig,
    WriteStep,
    template_fields,
)
from agent.workflows.failpoints import Failpoints
from agent.workflows.saga_log import (
    NEEDS_UNDO,
    DuplicateCommand,
    SagaLog,
    SagaLogError,
    SagaRecord,
    StepPhase,
    StepRecord,
)
from drivers.base import DriverError, DriverFault, DriverUnavailable, JsonValue, Reading
from drivers.config import TagConfigBase
from sync.events import Event, dumps, json_safe
from sync.mqtt.client import ConnectionLost, Message, MqttClient, NotConnected, PublishRejected
from sync.outbox.store import Outbox, OutboxUnavailable
from sync.uplink.topics import command_topic, reply_topic

log = logging.getLogger("edge_agent.workflows")

# -- limits ----------------------------------------------------------------------------------

MAX_PAYLOAD = 16 * 1024  # bytes of a command, checked before JSON parsing
MAX_DEPTH = 8  # JSON nesting of a command ({"params": {...}} is 2)
MAX_ID_LENGTH = 128
_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
COMMAND_QUEUE = 1024  # commands waiting for the command task; more are rejected "busy"
COMMAND_BATCH = 256  # commands handled per round (their audit events share one commit)
PENDING_REPLIES = 10_000  # replies kept while the broker is away; the oldest go first
REPLY_BATCH = 100  # replies in flight at once
# Rejections are audited one by one up to a burst of AUDIT_BURST and AUDIT_RATE per second
# after it; beyond that a flood is summarised in one event, so that hostile traffic cannot
# fill the outbox with events it may never drop.
AUDIT_BURST = 2000
AUDIT_RATE = 200.0
SETTLE_DEADLINE = 30.0  # reading back a write whose outcome is unknown, during a saga
RECOVERY_READ_DEADLINE = 120.0  # ...after a restart (the devices are connecting again)
RESUME_WINDOW = 600.0  # an interrupted saga older than this is compensated, not resumed
COMPENSATE_ATTEMPTS = 3
SAGA_RETENTION = 30 * 86400.0  # finished sagas (and so their command ids) are kept this long
_TEXT_LIMIT = 300  # characters of attacker-controlled text echoed in details

Status = Literal["accepted", "rejected", "completed", "compensated", "failed"]
_DriverErrors = (DriverError, TimeoutError, OSError)
# The value rules of a tag no longer in the config (a saga resolved after a reload).
_UNCONFIGURED = TagConfigBase(name="unconfigured")
_SETTLED: dict[str, StepPhase] = {
    "applied": "done",
    "not_applied": "not_applied",
    "unknown": "unknown",
}


class TagAccess(Protocol):
    """What the engine needs of the devices: single reads and verified single writes."""

    async def read(self, ref: str) -> Reading:
        """Read 'device/tag' now."""
        ...

    async def write(self, ref: str, value: JsonValue) -> JsonValue:
        """Write 'device/tag' once; the verified read-back value."""
        ...


# -- commands: decoding and validation (pure) -----------------------------------------------


class CommandRejected(Exception):
    """A command that is not executed; `reason` goes into the reply's detail."""

    def __init__(self, reason: str, command_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command_id = command_id


@dataclass(frozen=True, slots=True)
class Command:
    """A decoded command envelope (params not yet validated)."""

    id: str
    params: Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"duplicate key {_short(key)}")
        document[key] = value
    return document


def _parse_json(payload: bytes) -> Any:
    if len(payload) > MAX_PAYLOAD:
        raise CommandRejected(f"payload too large: {len(payload)} bytes (limit {MAX_PAYLOAD})")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandRejected("payload is not UTF-8") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        # The C decoder stops deep nesting at the interpreter's recursion limit.
        raise CommandRejected(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise CommandRejected(f"invalid JSON: {_clip(str(exc))}") from None


def _depth(document: Any) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if deepest > MAX_DEPTH:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def valid_command_id(value: Any) -> str | None:
    """The id if it is a string of 1..128 safe characters ([A-Za-z0-9_.:@-]), else None."""
    if isinstance(value, str) and _ID.fullmatch(value):
        return value
    return None


def decode_command(payload: bytes) -> Command:
    """Decode a command envelope; raise CommandRejected (with the id when one is readable)."""
    document = _parse_json(payload)
    command_id = valid_command_id(document.get("id")) if isinstance(document, dict) else None
    if _depth(document) > MAX_DEPTH:
        raise CommandRejected(f"JSON nested deeper than {MAX_DEPTH} levels", command_id)
    if not isinstance(document, dict):
        raise CommandRejected('a command is a JSON object {"id": ..., "params": {...}}')
    unknown = sorted(set(document) - {"id", "params"})
    if unknown:
        raise CommandRejected(f"unknown key(s) {_names(unknown)}", command_id)
    if "id" not in document:
        raise CommandRejected('missing "id"')
    if command_id is None:
        raise CommandRejected(
            f'"id" must be a string of 1..{MAX_ID_LENGTH} characters A-Z a-z 0-9 _ . : @ -'
        )
    if "params" not in document:
        raise CommandRejected('missing "params" (use {} for none)', command_id)
    return Command(command_id, document["params"])


def peek_command_id(payload: bytes) -> str | None:
    """The id of a command if it can be read cheaply and safely, else None."""
    try:
        document = _parse_json(payload)
    except CommandRejected:
        return None
    return valid_command_id(document.get("id")) if isinstance(document, dict) else None


def validate_params(params: Any, specs: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Check params against the declared specs (exactly the declared keys, all required)."""
    if not isinstance(params, dict):
        raise CommandRejected('"params" must be an object')
    unknown = sorted(set(params) - set(specs))
    if unknown:
        raise CommandRejected(f"unknown parameter(s) {_names(unknown)}")
    missing = sorted(set(specs) - set(params))
    if missing:
        raise CommandRejected(f"missing parameter(s) {_names(missing)}")
    return {name: _check_param(name, params[name], spec) for name, spec in specs.items()}


def _check_param(name: str, value: Any, spec: ParamSpec) -> Any:
    where = f"params.{name}"
    if spec.type == "bool":
        if not isinstance(value, bool):
            raise CommandRejected(f"{where}: expected true or false, got {_kind(value)}")
        return value
    if spec.type == "str":
        if not isinstance(value, str):
            raise CommandRejected(f"{where}: expected a string, got {_kind(value)}")
        if any(unicodedata.category(char) == "Cc" for char in value):
            raise CommandRejected(f"{where}: control characters are not allowed")
        length = len(value)
        if spec.low is not None and length < spec.low:
            raise CommandRejected(f"{where}: {length} characters, at least {int(spec.low)}")
        if spec.high is not None and length > spec.high:
            raise CommandRejected(f"{where}: {length} characters, at most {int(spec.high)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandRejected(f"{where}: expected a number, got {_kind(value)}")
    number: int | float
    if spec.type == "int":
        if not isinstance(value, int):
            raise CommandRejected(f"{where}: expected an integer, got {_short(value)}")
        number = value
    else:
        try:
            number = float(value)
        except OverflowError:
            raise CommandRejected(f"{where}: number out of range") from None
        if not math.isfinite(number):
            raise CommandRejected(f"{where}: must be finite")
    if spec.low is not None and number < spec.low:
        raise CommandRejected(f"{where}: {_short(number)} is below the minimum {_num(spec.low)}")
    if spec.high is not None and number > spec.high:
        raise CommandRejected(f"{where}: {_short(number)} is above the maximum {_num(spec.high)}")
    return number


def _num(bound: float) -> str:
    return str(int(bound)) if bound.is_integer() else str(bound)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), "an object" if isinstance(value, dict) else "an array"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _clip(text: str) -> str:
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 3] + "..."


def _names(names: list[str]) -> str:
    shown = ", ".join(_short(name) for name in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# -- step values -----------------------------------------------------------------------------

_FORMATTER = string.Formatter()


def render(value: StepValue, params: Mapping[str, Any]) -> JsonValue:
    """Fill a step value's template: ``"{p}"`` alone keeps p's type, others become strings."""
    if not isinstance(value, str):
        return value
    names = template_fields(value)
    if len(names) == 1 and value == "{" + names[0] + "}":
        result: JsonValue = params[names[0]]
        return result
    return _FORMATTER.vformat(value, (), dict(params))


# -- rate limit --------------------------------------------------------------------------------


class TokenBucket:
    """``count`` tokens per ``period`` seconds, at most ``count`` saved up (monotonic clock)."""

    def __init__(self, count: int, period: float, *, now: float) -> None:
        self.capacity = float(count)
        self.rate = count / period
        self.tokens = float(count)
        self.stamp = now

    def take(self, now: float) -> bool:
        """Take a token if one is available."""
        elapsed = max(0.0, now - self.stamp)  # monotonic: never negative, but be safe
        self.stamp = now
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


# -- the engine ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """A configured workflow, prepared for execution."""

    config: WorkflowConfig
    specs: dict[str, ParamSpec]
    devices: frozenset[str]
    tags: dict[str, TagConfigBase]  # every device/tag its steps use

    @property
    def name(self) -> str:
        """The workflow's name."""
        return self.config.name


@dataclass(slots=True)
class _Active:
    saga: SagaRecord
    workflow: str
    devices: frozenset[str]
    exclusive: str
    stuck: str | None = None  # why it stopped acting (saga log failed, internal error)


@dataclass(slots=True)
class _Waiter:
    expected: Any
    same: Callable[[Any, Any], bool]  # the tag's equality
    future: asyncio.Future[Any]
    last: Any = None


@dataclass(slots=True)
class EngineStats:
    """Counters for metrics and tests."""

    commands: int = 0
    accepted: int = 0
    rejected: int = 0
    busy_overflow: int = 0
    duplicates: int = 0
    replies_dropped: int = 0
    audit_failures: int = 0
    audits_suppressed: int = 0
    completed: int = 0
    compensated: int = 0
    failed: int = 0


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
        self._settings = settings
        self._outbox = outbox
        self._mqtt = mqtt
        self._write = devices.write
        self._read = devices.read
        self._fp = failpoints if failpoints is not None else Failpoints.from_env()
        self._path = (data_dir or settings.gateway.data_dir) / "sagas.db"
        self._root = settings.mqtt.topic_root
        self._command_prefix = command_topic(self._root, "")
        now = time.monotonic()
        self.plans: dict[str, Plan] = {}
        self._buckets: dict[str, TokenBucket] = {}
        for workflow in settings.workflows:
            self.plans[workflow.name] = _plan(settings, workflow)
            count, period = workflow.rate
            self._buckets[workflow.name] = TokenBucket(count, period, now=now)
        self._audit_budget = TokenBucket(AUDIT_BURST, AUDIT_BURST / AUDIT_RATE, now=now)
        self._queue: asyncio.Queue[Message] = asyncio.Queue(COMMAND_QUEUE)
        self._overflow: deque[tuple[str, str | None]] = deque()
        self._overflow_lost = 0
        self._running: dict[str, _Active] = {}
        self._waiters: dict[tuple[str, str], list[_Waiter]] = {}
        self._replies: deque[tuple[str, bytes]] = deque()
        self._reply_wake = asyncio.Event()
        self._link_down = asyncio.Event()
        self._confirms: deque[SagaRecord] = deque()
        self._confirm_wake = asyncio.Event()
        self._log: SagaLog | None = None
        self._group: asyncio.TaskGroup | None = None
        self._unavailable: str | None = None
        self.ready = asyncio.Event()
        self.stats = EngineStats()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def saga_log(self) -> SagaLog | None:
        """The open saga log (None before `run()` opened it)."""
        return self._log

    @property
    def running_sagas(self) -> dict[str, str]:
        """{saga id: workflow} of the sagas in progress."""
        return {saga_id: active.workflow for saga_id, active in self._running.items()}

    async def run(self) -> None:
        """Open the saga log, resolve unfinished sagas, then serve commands until cancelled."""
        topic = command_topic(self._root, "+")
        self._mqtt.subscribe(topic, self._on_message, qos=1)
        self._mqtt.add_listener(self._on_connection)
        self._on_connection(self._mqtt.is_connected)
        try:
            async with contextlib.AsyncExitStack() as stack:
                saga_log = await self._open_log()
                if saga_log is not None:
                    stack.push_async_callback(saga_log.close)
                async with asyncio.TaskGroup() as group:
                    self._group = group
                    group.create_task(self._reply_loop(), name="workflows:replies")
                    if saga_log is not None and await self._start_from_log(saga_log):
                        group.create_task(self._confirm_loop(), name="workflows:confirmations")
                    group.create_task(self._command_loop(), name="workflows:commands")
                    self.ready.set()
        finally:
            self._group = None
            self._log = None
            self._mqtt.unsubscribe(topic)
            self._mqtt.remove_listener(self._on_connection)
            for waiters in self._waiters.values():
                for waiter in waiters:
                    waiter.future.cancel()
            self._waiters.clear()

    async def reconfigure(self, settings: AgentSettings) -> None:
        """Take the workflows of a reloaded config; running sagas finish with their old plan."""
        plans = {workflow.name: _plan(settings, workflow) for workflow in settings.workflows}
        now = time.monotonic()
        for name, plan in plans.items():
            old = self.plans.get(name)
            if old is None or old.config.rate_limit != plan.config.rate_limit:
                count, period = plan.config.rate
                self._buckets[name] = TokenBucket(count, period, now=now)
        for name in set(self._buckets) - set(plans):
            del self._buckets[name]
        self._settings = settings
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
            await self._alarm(None, None, self._unavailable)
            return None
        if saga_log.recovered_from:
            await self._alarm(
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
            await self._alarm(None, None, self._unavailable)
            return False
        self._log = saga_log
        if pruned:
            log.info("saga log: %d finished sagas older than 30 days removed", pruned)
        self._confirms = deque(sorted(pending, key=lambda saga: saga.started_seq or 0))
        if unfinished:
            log.warning("resolving %d unfinished saga(s) after a restart", len(unfinished))
        for saga in unfinished:
            plan = self.plans.get(saga.workflow)
            devices = plan.devices if plan is not None else _row_devices(saga)
            exclusive = plan.config.exclusive if plan is not None else "machine"
            self._start_task(saga, plan, devices, exclusive, recover=True)
        return True

    def _start_task(
        self,
        saga: SagaRecord,
        plan: Plan | None,
        devices: frozenset[str],
        exclusive: str,
        *,
        recover: bool,
    ) -> None:
        assert self._group is not None
        self._running[saga.id] = _Active(saga, saga.workflow, devices, exclusive)
        self._group.create_task(self._saga_task(saga, plan, recover), name=f"saga:{saga.id}")

    # -- MQTT side -------------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        # Runs in the MQTT client's callback: enqueue only, never parse or wait here.
        self.stats.commands += 1
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self.stats.busy_overflow += 1
            workflow = message.topic[len(self._command_prefix) :]
            command_id = peek_command_id(message.payload)
            self._reply(workflow, command_id, "rejected", "busy: too many commands queued")
            if len(self._overflow) < COMMAND_QUEUE * 4:
                self._overflow.append((workflow, command_id))
            else:
                self._overflow_lost += 1

    def _on_connection(self, up: bool) -> None:
        if up:
            self._link_down.clear()
            self._reply_wake.set()
        else:
            self._link_down.set()

    def _reply(self, workflow: str, command_id: str | None, status: Status, detail: str) -> None:
        payload = dumps({"id": command_id, "status": status, "detail": detail})
        if len(self._replies) >= PENDING_REPLIES:
            # Bounded while the broker is away: the saga log keeps the truth.
            self._replies.popleft()
            self.stats.replies_dropped += 1
        self._replies.append((reply_topic(self._root, workflow), payload))
        self._reply_wake.set()

    async def _reply_loop(self) -> None:
        while True:
            if not self._replies:
                self._reply_wake.clear()
                await self._reply_wake.wait()
                continue
            await self._mqtt.wait_connected()
            batch = [self._replies.popleft() for _ in range(min(REPLY_BATCH, len(self._replies)))]
            sent: list[tuple[tuple[str, bytes], asyncio.Future[None]]] = []
            retry: list[tuple[str, bytes]] = []
            for index, (topic, payload) in enumerate(batch):
                try:
                    sent.append(((topic, payload), self._mqtt.publish_acked(topic, payload)))
                except NotConnected:
                    retry = batch[index:]
                    break
            results = await asyncio.gather(*(future for _, future in sent), return_exceptions=True)
            lost = [
                item
                for (item, _), result in zip(sent, results, strict=True)
                if isinstance(result, ConnectionLost) and not isinstance(result, PublishRejected)
            ]
            for ((topic, _payload), _future), result in zip(sent, results, strict=True):
                if isinstance(result, PublishRejected):
                    log.warning("reply on %s refused by the broker: %s", topic, result)
            # Unsent replies go back to the front, in order, for the next connection.
            self._replies.extendleft(reversed(lost + retry))
            if not sent:
                await asyncio.sleep(0.5)  # connected, yet the client refused: do not spin

    # -- commands --------------------------------------------------------------------------

    async def _command_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < COMMAND_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            audits: list[Event] = []
            for message in batch:
                try:
                    await self._handle(message, audits)
                except Exception:  # a bug must not stop command handling
                    log.exception("command on %s could not be handled", message.topic)
            self._audit_overflow(audits)
            if audits:
                await self._append(audits)
            # Each round yields to the event loop: a burst never starves the pollers.
            await asyncio.sleep(0)

    def _reject(
        self, audits: list[Event], workflow: str, command_id: str | None, reason: str
    ) -> None:
        self.stats.rejected += 1
        self._reply(workflow, command_id, "rejected", reason)
        if self._audit_budget.take(time.monotonic()):
            audits.append(
                _audit_event(
                    workflow=workflow,
                    command_id=command_id,
                    saga=None,
                    step=None,
                    action="reject",
                    result="rejected",
                    detail=reason,
                )
            )
        else:
            self.stats.audits_suppressed += 1

    def _audit_overflow(self, audits: list[Event]) -> None:
        while self._overflow:
            workflow, command_id = self._overflow.popleft()
            self.stats.rejected += 1
            if self._audit_budget.take(time.monotonic()):
                audits.append(
                    _audit_event(
                        workflow=workflow,
                        command_id=command_id,
                        saga=None,
                        step=None,
                        action="reject",
                        result="rejected",
                        detail="busy: too many commands queued",
                    )
                )
            else:
                self.stats.audits_suppressed += 1
        suppressed = self.stats.audits_suppressed + self._overflow_lost
        if suppressed and self._audit_budget.take(time.monotonic()):
            audits.append(
                _audit_event(
                    workflow=None,
                    command_id=None,
                    saga=None,
                    step=None,
                    action="reject",
                    result="suppressed",
                    detail=f"{suppressed} rejected commands not audited one by one (flood)",
                )
            )
            self.stats.audits_suppressed = 0
            self._overflow_lost = 0

    async def _handle(self, message: Message, audits: list[Event]) -> None:
        workflow = _clip(message.topic[len(self._command_prefix) :])
        try:
            command = decode_command(message.payload)
        except CommandRejected as rejection:
            self._reject(audits, workflow, rejection.command_id, rejection.reason)
            return
        if message.retain:
            # A retained command would run again for every new subscriber.
            self._reject(audits, workflow, command.id, "retained commands are not accepted")
            return
        plan = self.plans.get(workflow)
        if plan is None:
            known = ", ".join(sorted(self.plans)) or "none"
            self._reject(
                audits, workflow, command.id, f"unknown workflow {workflow!r} (known: {known})"
            )
            return
        if self._unavailable is not None or self._log is None:
            self._reject(audits, workflow, command.id, self._unavailable or "unavailable")
            return
        try:
            existing = await self._log.find(plan.name, command.id)
        except SagaLogError as exc:
            self._reject(audits, workflow, command.id, f"unavailable: saga log: {exc}")
            return
        if existing is not None:
            self._duplicate(audits, plan, command.id, existing)
            return
        try:
            params = validate_params(command.params, plan.specs)
            _prepare_values(plan, params)
        except CommandRejected as rejection:
            self._reject(audits, workflow, command.id, rejection.reason)
            return
        conflict = self._conflict(plan)
        if conflict is not None:
            why = f"busy: saga {conflict.saga.id} ({conflict.workflow}) running"
            if conflict.stuck:
                why = (
                    f"busy: saga {conflict.saga.id} ({conflict.workflow}) stopped: {conflict.stuck}"
                )
            self._reject(audits, workflow, command.id, why)
            return
        if not self._buckets[plan.name].take(time.monotonic()):
            self._reject(
                audits, workflow, command.id, f"rate limited: at most {plan.config.rate_limit}"
            )
            return
        saga = SagaRecord(
            id=str(uuid.uuid4()),
            workflow=plan.name,
            command_id=command.id,
            params=params,
            state="running",
        )
        try:
            await self._log.create(saga)
        except DuplicateCommand:
            found = await self._log.find(plan.name, command.id)
            if found is not None:
                self._duplicate(audits, plan, command.id, found)
            return
        except SagaLogError as exc:
            self._reject(audits, workflow, command.id, f"unavailable: saga log: {exc}")
            return
        self.stats.accepted += 1
        self._reply(
            plan.name, command.id, "accepted", f"saga {saga.id}: {len(plan.config.steps)} steps"
        )
        self._start_task(saga, plan, plan.devices, plan.config.exclusive, recover=False)

    def _duplicate(
        self, audits: list[Event], plan: Plan, command_id: str, saga: SagaRecord
    ) -> None:
        self.stats.duplicates += 1
        status: Status = "accepted" if not saga.finished else saga.state  # type: ignore[assignment]
        progress = f"saga {saga.id} is {saga.state}"
        detail = f"duplicate id: {progress}" + (f": {saga.detail}" if saga.detail else "")
        self._reply(plan.name, command_id, status, _clip(detail))
        audits.append(
            _audit_event(
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

    # -- saga execution ------------------------------------------------------------------

    async def _saga_task(self, saga: SagaRecord, plan: Plan | None, recover: bool) -> None:
        try:
            if recover:
                await self._recover(saga, plan)
            else:
                assert plan is not None
                await self._ensure_started(saga)
                await self._forward(saga, plan, 1)
        except Exception as exc:
            # The saga log or the outbox failed, or a bug: stop acting on the line. The saga
            # stays unfinished in the log and recovery resolves it at the next start.
            reason = f"internal error: {_clip(str(exc) or type(exc).__name__)}"
            log.exception("saga %s (%s) stopped", saga.id, saga.workflow)
            active = self._running.get(saga.id)
            if active is not None:
                active.stuck = reason
            await self._alarm(
                saga, None, f"saga stopped ({reason}); the line needs a person; restart resolves"
            )
            self._reply(
                saga.workflow,
                saga.command_id,
                "failed",
                f"{reason}: the line needs a person (the saga is resolved at the next restart)",
            )
            return
        self._running.pop(saga.id, None)

    async def _ensure_started(self, saga: SagaRecord) -> None:
        """Commit the saga's 'started' event (again if the outbox has a new stream)."""
        assert self._log is not None
        if saga.started_seq is not None and saga.started_stream == self._outbox.stream:
            return
        self._fp.hit("saga.after_accept")
        event = _audit_event(
            workflow=saga.workflow,
            command_id=saga.command_id,
            saga=saga.id,
            step="started",
            action="start",
            result="ok",
            detail="saga started" if saga.started_seq is None else "started event re-sent",
            extra={"params": saga.params},
        )
        first, _ = await self._outbox.append([event])
        saga.started_seq, saga.started_stream = first, self._outbox.stream
        await self._log.save(saga)

    async def _forward(self, saga: SagaRecord, plan: Plan, first: int) -> None:
        steps = plan.config.steps
        for idx in range(first, len(steps) + 1):
            step = steps[idx - 1]
            if isinstance(step, WriteStep):
                failed = await self._do_write(saga, plan, idx, step)
            elif isinstance(step, WaitStep):
                failed = await self._do_wait(saga, plan, idx, step)
            else:
                failed = await self._do_confirm(saga, plan, idx, step)
            self._fp.hit("saga.after_step_committed")
            if failed:
                await self._compensate(saga)
                return
        self._fp.hit("saga.before_finish")
        detail = f"{len(steps)} steps done"
        if saga.confirm_pending:
            detail += "; completed locally, the central confirmation follows via the outbox"
        await self._finish(saga, "completed", detail)

    async def _commit(self, saga: SagaRecord, row: StepRecord | None, audit: Event | None) -> None:
        """Commit the saga (and a step row) to the log and, at the same time, an audit event."""
        assert self._log is not None
        rows = (row,) if row is not None else ()
        if audit is None:
            await self._log.save(saga, *rows)
            return
        async with asyncio.TaskGroup() as group:
            group.create_task(self._log.save(saga, *rows), name=f"saga:{saga.id}:log")
            group.create_task(self._append([audit]), name=f"saga:{saga.id}:audit")

    def _step_event(
        self,
        saga: SagaRecord,
        row: StepRecord,
        action: str,
        result: str,
        detail: str,
        *,
        before: Any = None,
        after: Any = None,
    ) -> Event:
        return _audit_event(
            workflow=saga.workflow,
            command_id=saga.command_id,
            saga=saga.id,
            step=row.idx,
            action=action,
            result=result,
            detail=detail,
            ref=row.ref,
            before=before,
            after=after,
        )

    def _fail(self, saga: SagaRecord, reason: str) -> None:
        saga.state = "compensating"
        saga.detail = _clip(reason)

    async def _do_write(self, saga: SagaRecord, plan: Plan, idx: int, step: WriteStep) -> bool:
        ref = step.write
        saga.step = idx
        row = StepRecord(idx, "write", ref, "not_applied")
        try:
            value = plan.tags[ref].command_value(render(step.value, saga.params))
            target_template = (
                None
                if step.compensate_value is None
                else plan.tags[ref].command_value(render(step.compensate_value, saga.params))
            )
        except (ValueError, KeyError, IndexError) as exc:
            reason = f"step {idx}: cannot prepare the value for {ref}: {exc}"
            row.detail = reason
            self._fail(saga, reason)
            await self._commit(saga, row, self._step_event(saga, row, "write", "failed", reason))
            return True
        row.value = value
        try:
            reading = await self._read(ref)
            if reading.quality != "good":
                raise DriverUnavailable(reading.error or f"quality {reading.quality}")
        except _DriverErrors as exc:
            reason = f"step {idx}: cannot read {ref} before writing it: {_err(exc)}"
            row.detail = reason
            self._fail(saga, reason)
            await self._commit(saga, row, self._step_event(saga, row, "write", "failed", reason))
            return True
        previous = reading.value
        row.previous = previous
        row.target = previous if target_template is None else target_template
        row.phase = "intent"
        row.detail = f"about to write {value!r}, previous value {previous!r}"
        await self._commit(
            saga,
            row,
            self._step_event(saga, row, "write", "begin", row.detail, before=previous, after=value),
        )
        self._fp.hit("saga.before_write")
        error: BaseException | None = None
        read_back: Any = None
        try:
            read_back = await self._write(ref, value)
        except _DriverErrors as exc:
            error = exc
        self._fp.hit("saga.after_write_sent")
        if error is None:
            row.phase, row.result = "done", read_back
            row.detail = f"wrote {value!r} (read back {read_back!r}), previous value {previous!r}"
            await self._commit(
                saga,
                row,
                self._step_event(
                    saga, row, "write", "ok", row.detail, before=previous, after=read_back
                ),
            )
            return False
        # Refused or never sent: the driver says nothing changed, one read confirms it.
        # Otherwise the outcome is unknown and only reading back settles it.
        trusted = isinstance(error, DriverFault | DriverUnavailable)
        outcome, seen = await self._settle(
            ref, value, previous, 2.0 if trusted else SETTLE_DEADLINE
        )
        if outcome == "unknown" and trusted and seen is None:
            outcome = "not_applied"
        row.phase = _SETTLED[outcome]
        row.result = seen
        reason = f"step {idx}: write {value!r} to {ref} failed: {_err(error)}"
        row.detail = f"{reason}; settled by reading back: {outcome.replace('_', ' ')} ({seen!r})"
        self._fail(saga, reason)
        await self._commit(
            saga,
            row,
            self._step_event(saga, row, "write", "failed", row.detail, before=previous, after=seen),
        )
        return True

    def _rule(self, ref: str) -> TagConfigBase:
        """The tag's value rules (a tag that left the config: the generic ones)."""
        resolved = self._settings.tag(ref)
        return resolved[1] if resolved is not None else _UNCONFIGURED

    def _same(self, ref: str, actual: Any, expected: Any) -> bool:
        return self._rule(ref).same_value(actual, expected)

    async def _settle(
        self, ref: str, intended: Any, previous: Any, deadline: float
    ) -> tuple[Literal["applied", "not_applied", "unknown"], Any]:
        """Decide by reading back whether a write took effect."""
        reading = await self._read_good(ref, deadline)
        if reading is None:
            return "unknown", None
        if self._same(ref, reading.value, intended):
            return "applied", reading.value
        if self._same(ref, reading.value, previous):
            return "not_applied", reading.value
        return "unknown", reading.value

    async def _read_good(self, ref: str, deadline: float) -> Reading | None:
        """Read until a good value arrives or `deadline` seconds passed (None then)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline
        delay = 0.2
        while True:
            try:
                reading = await self._read(ref)
                if reading.quality == "good":
                    return reading
            except DriverFault:
                return None  # unknown tag or refused read: retrying will not help
            except _DriverErrors:
                pass
            remaining = until - loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)

    async def _do_wait(self, saga: SagaRecord, plan: Plan, idx: int, step: WaitStep) -> bool:
        ref = step.wait
        saga.step = idx
        row = StepRecord(idx, "wait", ref, "waiting")
        try:
            expected = plan.tags[ref].command_value(render(step.value, saga.params))
        except (ValueError, KeyError, IndexError) as exc:
            reason = f"step {idx}: cannot prepare the value to wait for on {ref}: {exc}"
            row.phase, row.detail = "timeout", reason
            self._fail(saga, reason)
            await self._commit(saga, row, self._step_event(saga, row, "wait", "failed", reason))
            return True
        row.value = expected
        row.detail = f"waiting up to {step.timeout:g}s for {ref} = {expected!r}"
        await self._commit(
            saga, row, self._step_event(saga, row, "wait", "begin", row.detail, after=expected)
        )
        self._fp.hit("saga.before_wait")
        reached, seen = await self._wait_for(ref, expected, step.timeout)
        row.result = seen
        if reached:
            row.phase = "done"
            row.detail = f"{ref} = {seen!r}"
            await self._commit(
                saga, row, self._step_event(saga, row, "wait", "ok", row.detail, after=seen)
            )
            return False
        row.phase = "timeout"
        reason = (
            f"step {idx}: {ref} did not reach {expected!r} within {step.timeout:g}s "
            f"(last value {seen!r})"
        )
        row.detail = reason
        self._fail(saga, reason)
        await self._commit(
            saga, row, self._step_event(saga, row, "wait", "timeout", reason, after=seen)
        )
        return True

    async def _wait_for(self, ref: str, expected: Any, limit: float) -> tuple[bool, Any]:
        """Wait until a good reading of `ref` equals `expected` (pipeline readings or a read)."""
        device, _, tag = ref.partition("/")
        key = (device, tag)
        waiter = _Waiter(
            expected, self._rule(ref).same_value, asyncio.get_running_loop().create_future()
        )
        self._waiters.setdefault(key, []).append(waiter)
        try:
            # One deadline for both: a stalled device must not stretch the step's timeout.
            async with asyncio.timeout(limit):
                # Registered first, read second: a change between the two is never missed.
                with contextlib.suppress(*_DriverErrors):
                    reading = await self._read(ref)
                    if reading.quality == "good":
                        self._offer(waiter, reading.value)
                return True, await waiter.future
        except TimeoutError:
            return False, waiter.last
        finally:
            waiters = self._waiters.get(key, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(key, None)
            if not waiter.future.done():
                waiter.future.cancel()

    @staticmethod
    def _offer(waiter: _Waiter, value: Any) -> None:
        waiter.last = value
        if not waiter.future.done() and waiter.same(value, waiter.expected):
            waiter.future.set_result(value)

    def observe(self, device: str, readings: list[Reading]) -> None:
        """Pipeline observer: every raw reading, checked against the waiting steps."""
        if not self._waiters:
            return
        for reading in readings:
            waiters = self._waiters.get((device, reading.tag))
            if waiters and reading.quality == "good":
                for waiter in waiters:
                    self._offer(waiter, reading.value)

    async def _do_confirm(self, saga: SagaRecord, plan: Plan, idx: int, step: ConfirmStep) -> bool:
        await self._ensure_started(saga)
        saga.step = idx
        row = StepRecord(idx, "confirm", None, "waiting", value=saga.started_seq)
        row.detail = (
            f"waiting up to {step.timeout:g}s for the central ack of seq {saga.started_seq}"
        )
        await self._commit(saga, row, self._step_event(saga, row, "confirm", "begin", row.detail))
        self._fp.hit("saga.before_confirm")
        assert saga.started_seq is not None
        confirmed, why = await self._wait_confirmed(saga.started_seq, step.timeout)
        if confirmed:
            row.phase, row.detail = "done", "the central store acknowledged the saga's start"
            saga.confirmed = True
            await self._commit(saga, row, self._step_event(saga, row, "confirm", "ok", row.detail))
            return False
        if plan.config.on_uplink_failure == "continue":
            row.phase = "deferred"
            row.detail = f"{why}; on_uplink_failure = continue: confirmation follows later"
            saga.confirm_pending = True
            await self._commit(
                saga, row, self._step_event(saga, row, "confirm", "deferred", row.detail)
            )
            return False
        row.phase = "uplink_failed"
        reason = f"step {idx}: the central store did not confirm: {why}"
        row.detail = reason
        self._fail(saga, reason)
        await self._commit(
            saga, row, self._step_event(saga, row, "confirm", "uplink_failed", reason)
        )
        return True

    async def _wait_confirmed(self, seq: int, limit: float) -> tuple[bool, str]:
        """Wait for the central ack of `seq`; fail when the uplink is down or on timeout."""
        if self._outbox.acked_seq >= seq:
            return True, ""
        if self._link_down.is_set():
            return False, "the uplink is down"
        acked = asyncio.create_task(self._outbox.wait_acked(seq), name=f"confirm:{seq}:ack")
        down = asyncio.create_task(self._link_down.wait(), name=f"confirm:{seq}:uplink")
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
        if self._outbox.acked_seq >= seq:
            return True, ""
        if down in done:
            return False, "the uplink went down"
        if acked in done:
            return False, f"outbox: {acked.exception()}"
        return False, f"no central ack within {limit:g}s"

    async def _finish(self, saga: SagaRecord, outcome: Status, detail: str) -> None:
        if outcome != "completed":
            saga.confirm_pending = False  # nothing left to confirm for an undone saga
        saga.state = outcome  # type: ignore[assignment]
        saga.outcome = outcome
        saga.detail = _clip(detail)
        await self._commit(
            saga,
            None,
            _audit_event(
                workflow=saga.workflow,
                command_id=saga.command_id,
                saga=saga.id,
                step="finished",
                action="finish",
                result=outcome,
                detail=saga.detail,
            ),
        )
        if outcome == "completed":
            self.stats.completed += 1
        elif outcome == "compensated":
            self.stats.compensated += 1
        else:
            self.stats.failed += 1
            await self._alarm(saga, _row_devices(saga), saga.detail)
        if saga.confirm_pending:
            self._confirms.append(saga)
            self._confirm_wake.set()
        log.log(
            logging.INFO if outcome == "completed" else logging.WARNING,
            "saga %s (%s, command %s) %s: %s",
            saga.id,
            saga.workflow,
            saga.command_id,
            outcome,
            saga.detail,
        )
        self._reply(saga.workflow, saga.command_id, outcome, saga.detail)

    # -- compensation ---------------------------------------------------------------------

    async def _compensate(self, saga: SagaRecord) -> None:
        """Undo the saga's writes in reverse order (state 'compensating' is committed)."""
        self._fp.hit("saga.before_compensate")
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
        self._fp.hit("saga.before_finish")
        if failed:
            await self._finish(
                saga,
                "failed",
                f"{reason}; compensation FAILED for step(s) {_steps(failed)}"
                + (f" (undone: {_steps(undone)})" if undone else "")
                + ": the line needs a person",
            )
        else:
            what = f"undone: step(s) {_steps(undone)}" if undone else "nothing to undo"
            await self._finish(saga, "compensated", f"{reason}; {what}")

    async def _undo(self, saga: SagaRecord, row: StepRecord) -> bool:
        """Restore one write (compensate_value or the captured previous value), verified."""
        assert row.ref is not None
        target = row.target
        if row.phase == "compensating":
            # In doubt after a restart: settled by reading back, not by writing again.
            reading = await self._read_good(row.ref, RECOVERY_READ_DEADLINE)
            if reading is not None and self._same(row.ref, reading.value, target):
                row.phase, row.result = "compensated", reading.value
                row.detail = f"restored {target!r} (settled by reading back after a restart)"
                await self._commit(
                    saga,
                    row,
                    self._step_event(saga, row, "compensate", "ok", row.detail, after=target),
                )
                self._fp.hit("saga.after_compensate_committed")
                return True
        row.phase = "compensating"
        row.detail = f"about to restore {target!r} (written was {row.value!r})"
        await self._commit(
            saga,
            row,
            self._step_event(
                saga, row, "compensate", "begin", row.detail, before=row.value, after=target
            ),
        )
        self._fp.hit("saga.before_compensate_write")
        error: BaseException | None = None
        read_back: Any = None
        done = False
        for attempt in range(COMPENSATE_ATTEMPTS):
            try:
                read_back = await self._write(row.ref, target)
                done = True
                break
            except DriverFault as exc:
                error = exc
                break  # refused: retrying the same request will not help
            except _DriverErrors as exc:
                error = exc
            # The outcome is unknown: read back before trying once more.
            reading = await self._read_good(row.ref, 5.0 * (attempt + 1))
            if reading is not None and self._same(row.ref, reading.value, target):
                read_back, done = reading.value, True
                break
        self._fp.hit("saga.after_compensate_sent")
        if done:
            row.phase, row.result = "compensated", read_back
            row.detail = f"restored {target!r} (read back {read_back!r})"
            await self._commit(
                saga,
                row,
                self._step_event(
                    saga, row, "compensate", "ok", row.detail, before=row.value, after=read_back
                ),
            )
        else:
            row.phase = "compensation_failed"
            row.detail = f"could not restore {target!r}: {_err(error)}"
            await self._commit(
                saga,
                row,
                self._step_event(
                    saga, row, "compensate", "failed", row.detail, before=row.value, after=target
                ),
            )
        self._fp.hit("saga.after_compensate_committed")
        return done

    # -- crash recovery ---------------------------------------------------------------------

    async def _recover(self, saga: SagaRecord, plan: Plan | None) -> None:
        """Resolve a saga left unfinished by a crash: settle, then resume or compensate."""
        assert self._log is not None
        age = time.time() - saga.updated
        await self._append(
            [
                _audit_event(
                    workflow=saga.workflow,
                    command_id=saga.command_id,
                    saga=saga.id,
                    step="recovery",
                    action="recover",
                    result="begin",
                    detail=f"unfinished after a restart: state {saga.state}, step {saga.step}",
                )
            ]
        )
        if saga.state == "compensating":
            await self._compensate(saga)
            return
        await self._ensure_started(saga)
        mismatch = _plan_mismatch(saga, plan)
        if mismatch is not None:
            self._fail(saga, f"not resumed after a restart: {mismatch}")
            await self._commit(saga, None, None)
            await self._compensate(saga)
            return
        assert plan is not None
        resume_at = 1
        for idx in sorted(saga.steps):
            row = saga.steps[idx]
            if row.phase in ("done", "deferred"):
                resume_at = idx + 1
                continue
            if row.kind == "write" and row.phase == "intent":
                assert row.ref is not None
                outcome, seen = await self._settle(
                    row.ref, row.value, row.previous, RECOVERY_READ_DEADLINE
                )
                row.result = seen
                row.phase = _SETTLED[outcome]
                row.detail = (
                    f"in doubt after a restart; read back {seen!r}: "
                    + {
                        "applied": "the write took effect",
                        "not_applied": "the write did not take effect; the step runs again",
                        "unknown": "neither the written nor the previous value: undo",
                    }[outcome]
                )
                if outcome == "unknown":
                    self._fail(saga, f"step {idx}: outcome unknown after a restart ({seen!r})")
                await self._commit(
                    saga,
                    row,
                    self._step_event(saga, row, "recover", outcome, row.detail, after=seen),
                )
                if outcome == "unknown":
                    await self._compensate(saga)
                    return
                resume_at = idx + 1 if outcome == "applied" else idx
            elif row.kind == "confirm" and row.phase == "waiting":
                if saga.started_seq is not None and self._outbox.acked_seq >= saga.started_seq:
                    row.phase, row.detail = "done", "acknowledged while the agent was down"
                    saga.confirmed = True
                    await self._commit(
                        saga, row, self._step_event(saga, row, "recover", "ok", row.detail)
                    )
                    resume_at = idx + 1
                else:
                    resume_at = idx  # wait again (a fresh timeout), then on_uplink_failure
            elif row.phase in ("waiting", "not_applied"):
                resume_at = idx  # a wait runs again with a fresh timeout; a write once more
            else:
                self._fail(saga, f"step {idx} ended {row.phase} before the restart")
                await self._commit(saga, None, None)
                await self._compensate(saga)
                return
            break
        # A saga idles legitimately during a wait or confirm step: its last commit may be as
        # old as that step's timeout before the crash.
        in_progress = saga.steps.get(resume_at)
        step_at = plan.config.steps[resume_at - 1] if resume_at <= len(plan.config.steps) else None
        slack = (
            step_at.timeout
            if in_progress is not None and isinstance(step_at, WaitStep | ConfirmStep)
            else 0.0
        )
        if not 0 <= age <= RESUME_WINDOW + slack:
            self._fail(
                saga,
                f"interrupted by an agent restart {age:.0f}s ago (more than "
                f"{RESUME_WINDOW + slack:.0f}s, or the clock moved back): not resumed",
            )
            await self._commit(saga, None, None)
            await self._compensate(saga)
            return
        log.info("saga %s (%s): resuming at step %d", saga.id, saga.workflow, resume_at)
        await self._forward(saga, plan, resume_at)

    # -- later confirmation ---------------------------------------------------------------------

    async def _confirm_loop(self) -> None:
        """Sagas completed locally: record the central confirmation when it arrives."""
        assert self._log is not None
        while True:
            if not self._confirms:
                self._confirm_wake.clear()
                await self._confirm_wake.wait()
                continue
            saga = self._confirms[0]
            try:
                await self._confirm_later(saga)
            except (SagaLogError, OutboxUnavailable) as exc:
                # Kept in the queue (and in the log): retried, and after a restart.
                log.error("saga %s: recording its confirmation failed: %s", saga.id, exc)
                await asyncio.sleep(5.0)
            else:
                self._confirms.popleft()

    async def _confirm_later(self, saga: SagaRecord) -> None:
        await self._ensure_started(saga)
        assert saga.started_seq is not None
        await self._outbox.wait_acked(saga.started_seq)
        saga.confirmed, saga.confirm_pending = True, False
        detail = "confirmed: the central store acknowledged the saga after the uplink returned"
        await self._commit(
            saga,
            None,
            _audit_event(
                workflow=saga.workflow,
                command_id=saga.command_id,
                saga=saga.id,
                step="confirmed",
                action="confirm",
                result="ok",
                detail=detail,
            ),
        )
        self._reply(saga.workflow, saga.command_id, "completed", detail)

    # -- events -------------------------------------------------------------------------------

    async def _append(self, events: list[Event]) -> None:
        # The saga log is the truth for the saga itself: an outbox that cannot take the audit
        # trail (disk full) must not stop a compensation, so this only logs and counts.
        try:
            await self._outbox.append(events)
        except (OutboxUnavailable, ValueError) as exc:
            self.stats.audit_failures += len(events)
            log.error("workflow audit events not stored: %s", exc)

    async def _alarm(
        self, saga: SagaRecord | None, devices: frozenset[str] | None, message: str
    ) -> None:
        device = sorted(devices)[0] if devices and len(devices) == 1 else None
        await self._append(
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
                            "message": _clip(message),
                        }
                    ),
                )
            ]
        )


# -- helpers ------------------------------------------------------------------------------


def _plan(settings: AgentSettings, workflow: WorkflowConfig) -> Plan:
    tags: dict[str, TagConfigBase] = {}
    for step in workflow.steps:
        ref = step.write if isinstance(step, WriteStep) else getattr(step, "wait", None)
        if ref is None:
            continue
        resolved = settings.tag(ref)
        if resolved is None:
            # `edge-agent check` refuses such a config; never reached with a loaded one.
            raise ValueError(f"workflow {workflow.name}: unknown tag {ref}")
        if isinstance(step, WriteStep) and not resolved[1].writable:
            raise ValueError(f"workflow {workflow.name}: {ref} is not writable")
        tags[ref] = resolved[1]
    devices = frozenset(ref.partition("/")[0] for ref in tags)
    return Plan(workflow, workflow.param_specs, devices, tags)


def _prepare_values(plan: Plan, params: Mapping[str, Any]) -> None:
    """Render and convert every step value now, so that a bad value is a rejection."""
    for idx, step in enumerate(plan.config.steps, start=1):
        if isinstance(step, ConfirmStep):
            continue
        ref = step.write if isinstance(step, WriteStep) else step.wait
        values = [step.value]
        if isinstance(step, WriteStep) and step.compensate_value is not None:
            values.append(step.compensate_value)
        for value in values:
            try:
                plan.tags[ref].command_value(render(value, params))
            except (ValueError, KeyError, IndexError) as exc:
                raise CommandRejected(f"step {idx} ({ref}): {_clip(str(exc))}") from None


def _plan_mismatch(saga: SagaRecord, plan: Plan | None) -> str | None:
    if plan is None:
        return f"workflow {saga.workflow!r} is no longer configured"
    steps = plan.config.steps
    for idx, row in saga.steps.items():
        if idx > len(steps):
            return f"workflow {saga.workflow!r} changed (fewer steps)"
        step = steps[idx - 1]
        ref = step.write if isinstance(step, WriteStep) else getattr(step, "wait", None)
        kind = "write" if isinstance(step, WriteStep) else "wait" if ref else "confirm"
        if row.kind != kind or row.ref != ref:
            return f"workflow {saga.workflow!r} changed (step {idx})"
    return None


def _row_devices(saga: SagaRecord) -> frozenset[str]:
    return frozenset(row.ref.partition("/")[0] for row in saga.steps.values() if row.ref)


def _steps(indexes: list[int]) -> str:
    return ", ".join(str(idx) for idx in sorted(indexes))


def _err(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return _clip(str(exc) or type(exc).__name__)


def _audit_event(
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
) -> Event:
    value: dict[str, Any] = {
        "command_id": command_id,
        "workflow": workflow,
        "saga": saga,
        "step": step,
        "action": action,
        "before": before,
        "after": after,
        "result": result,
        "detail": _clip(detail),
    }
    if extra:
        value.update(extra)
    device = ref.partition("/")[0] if ref else None
    return Event(time.time(), "workflow", device=device, tag=ref, value=json_safe(value))


__all__ = [
    "Command",
    "CommandRejected",
    "EngineStats",
    "Plan",
    "TagAccess",
    "TokenBucket",
    "WorkflowEngine",
    "decode_command",
    "peek_command_id",
    "render",
    "valid_command_id",
    "validate_params",
]
