"""Central ingest: S/sync batches from every gateway into PostgreSQL, then S/ack (design §5-§8).

Flow per batch: parse and validate -> one transaction { COPY the rows into a per-connection
temporary table, ``INSERT INTO edge_events ... ON CONFLICT DO NOTHING``, record the batch's
seq range and advance the stream's watermark (``edge_commit_range``) } -> COMMIT -> publish
``S/ack`` with the watermark. Nothing is acked that is not committed.

The watermark is computed over committed batch *ranges*, not rows: a batch covers every seq in
``[first_seq, last_seq]`` (seqs absent from ``events`` were dropped at the gateway and declared
by a ``gap`` event). Out-of-order batches, resends and several replicas are all handled in the
database under a row lock on the stream, so the watermark only ever moves up.

PostgreSQL down: the batch in hand is retried with jittered back-off until it commits (asyncpg's
pool reconnects), no ack goes out meanwhile, and new messages wait in a bounded queue; when that
overflows the oldest are dropped unacked — the gateways resend them after their ack timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from sync.central.partitions import kept_window, maintain_partitions
from sync.central.schema import SCHEMA_VERSION, migrate
from sync.events import EVENT_KINDS, dumps, rfc3339
from sync.mqtt.client import Message, MqttClient, NotConnected

log = logging.getLogger("edge_agent.ingest")

T = TypeVar("T")

GATEWAY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_SEQ = 2**63 - 1
KINDS = frozenset(EVENT_KINDS)
COLUMNS = ("gateway_id", "stream_id", "seq", "ts", "kind", "device", "tag", "value", "quality")
STAGING_TABLE = "edge_ingest_batch"
_MAX_SENDERS = 10_000  # distinct senders tracked for malformed counts and log-once
_MAX_ACK_CACHE = 100_000

Row = tuple[str, uuid.UUID, int, datetime, str, str | None, str | None, str | None, str | None]

_COLUMN_LIST = ", ".join(COLUMNS)
_CREATE_STAGING = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING_TABLE} (
  gateway_id text, stream_id uuid, seq bigint, ts timestamptz, kind text,
  device text, tag text, value jsonb, quality text
) ON COMMIT DELETE ROWS
"""
_INSERT = (
    f"INSERT INTO edge_events ({_COLUMN_LIST}) "
    f"SELECT {_COLUMN_LIST} FROM {STAGING_TABLE} ON CONFLICT DO NOTHING"
)
_COMMIT_RANGE = "SELECT edge_commit_range($1, $2, $3, $4)"
_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
# One encoder for every value: json.dumps with options builds a new encoder per call.
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def presence_topic(sync_prefix: str, client_id: str) -> str:
    """``{sync_prefix}/_central/status/{replica}``: a replica's retained online/offline."""
    # Four levels: never matched by the gateways' {prefix}/+/sync and {prefix}/+/ack.
    return f"{sync_prefix}/_central/status/{_TOPIC_UNSAFE.sub('_', client_id)[:128]}"


def presence_payload(status: str) -> bytes:
    """``{"ts","status"}`` with status ``online`` or ``offline``."""
    return dumps({"ts": rfc3339(time.time()), "status": status})


# -- parsing ----------------------------------------------------------------------------------


class MalformedBatch(ValueError):
    """An S/sync message that breaks the contract; it is counted and skipped."""


@dataclass(frozen=True, slots=True)
class Batch:
    """A validated S/sync batch, its rows ready for COPY."""

    gateway: str
    stream: str  # exactly as sent: echoed in S/ack
    stream_id: uuid.UUID
    first_seq: int
    last_seq: int
    rows: list[Row]
    months: frozenset[int]  # UTC month indexes (year * 12 + month - 1) of the rows


def _fail(reason: str) -> NoReturn:
    raise MalformedBatch(reason)


def _reject_constant(name: str) -> NoReturn:
    # json.loads accepts NaN/Infinity by default; JSON (and jsonb) has no such values.
    _fail(f"non-JSON constant {name}")


def _seq(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SEQ:
        _fail(f"{where} must be an integer 1..2^63-1, got {value!r:.40}")
    return value


def _text(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        _fail(f"{where} must be a string or null")
    # PostgreSQL text cannot hold NUL, and lone surrogates cannot be encoded as UTF-8.
    if "\x00" in value:
        _fail(f"{where} contains a NUL character")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            _fail(f"{where} is not valid Unicode")
    return value


def _timestamp(value: Any, where: str) -> datetime:
    if not isinstance(value, str):
        _fail(f"{where} must be an RFC 3339 string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"{where} is not an RFC 3339 timestamp: {value!r:.40}")
    if moment.tzinfo is None:
        _fail(f"{where} has no time zone: {value!r:.40}")
    return moment.astimezone(UTC)


def parse_batch(gateway: str, payload: bytes) -> Batch:
    """Validate an S/sync payload received on ``{prefix}/{gateway}/sync``; raise MalformedBatch."""
    try:
        return _parse_batch(gateway, payload)
    except MalformedBatch:
        raise
    except Exception as exc:  # e.g. RecursionError on absurd nesting: still just malformed
        raise MalformedBatch(f"{type(exc).__name__}: {exc}") from exc


def _parse_batch(gateway: str, payload: bytes) -> Batch:
    if not GATEWAY_ID.fullmatch(gateway):
        _fail(f"topic gateway level {gateway!r:.80} is not a gateway id")
    try:
        doc = json.loads(payload, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(f"not JSON: {exc}")
    if not isinstance(doc, dict):
        _fail("not a JSON object")
    if doc.get("gateway") != gateway:
        _fail(f"gateway {doc.get('gateway')!r:.80} differs from the topic's {gateway!r}")
    stream = doc.get("stream")
    if not isinstance(stream, str):
        _fail("stream must be a UUID string")
    try:
        stream_id = uuid.UUID(stream)
    except ValueError:
        _fail(f"stream is not a UUID: {stream!r:.60}")
    first_seq = _seq(doc.get("first_seq"), "first_seq")
    last_seq = _seq(doc.get("last_seq"), "last_seq")
    if first_seq > last_seq:
        _fail(f"first_seq {first_seq} > last_seq {last_seq}")
    events = doc.get("events")
    if not isinstance(events, list):
        _fail("events must be a list")
    rows: list[Row] = []
    seen: set[int] = set()
    months: set[int] = set()
    for index, event in enumerate(events):
        where = f"events[{index}]"
        if not isinstance(event, dict):
            _fail(f"{where} is not an object")
        seq = _seq(event.get("seq"), f"{where}.seq")
        if not first_seq <= seq <= last_seq:
            _fail(f"{where}.seq {seq} outside [{first_seq}, {last_seq}]")
        if seq in seen:
            _fail(f"{where}.seq {seq} appears twice")
        seen.add(seq)
        ts = _timestamp(event.get("ts"), f"{where}.ts")
        kind = event.get("kind")
        if not isinstance(kind, str) or kind not in KINDS:
            _fail(f"{where}.kind {kind!r:.40} is not one of {', '.join(EVENT_KINDS)}")
        value = event.get("value")
        # jsonb travels as its JSON text; JSON null is stored as SQL NULL.
        value_text = None if value is None else _encode_json(value)
        rows.append(
            (
                gateway,
                stream_id,
                seq,
                ts,
                kind,
                _text(event.get("device"), f"{where}.device"),
                _text(event.get("tag"), f"{where}.tag"),
                value_text,
                _text(event.get("quality"), f"{where}.quality"),
            )
        )
        months.add(ts.year * 12 + ts.month - 1)
    return Batch(gateway, stream, stream_id, first_seq, last_seq, rows, frozenset(months))


# -- errors -------------------------------------------------------------------------------------

# The server or the connection is away or overloaded: retry the same batch later.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,  # class 08, includes ConnectionDoesNotExistError
    asyncpg.OperatorInterventionError,  # class 57: shutdown, crash, starting up, cancelled
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.PostgresSystemError,  # class 58: I/O error
    asyncpg.TransactionRollbackError,  # class 40: deadlock or serialization failure
    asyncpg.ReadOnlySQLTransactionError,  # a fail-over left us on a read-only standby
    # PostgreSQL killed mid-COPY can leave asyncpg's protocol confused ("cannot switch to state
    # 15; another operation (2) is in progress", seen in bench/soak.py); the connection is
    # terminated (see commit_pooled) and the batch retried on a fresh one.
    asyncpg.InternalClientError,
)
# The batch's content was refused: it is malformed.
_DATA: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    UnicodeError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether a database error means 'try again later' rather than 'this batch is bad'."""
    return isinstance(exc, _TRANSIENT)


# Server-reported errors after which the session is gone or ending anyway.
_SESSION_ENDING: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.PostgresSystemError,
)


def connection_survives(exc: BaseException) -> bool:
    """Whether a connection may go back to the pool after ``exc`` ended a commit on it.

    Only an error the server reported for a statement leaves the session in a known state
    (the transaction rolled back, the protocol idle). After anything else - a lost socket,
    or asyncpg's protocol confused by a FATAL message that arrived while it was idle (a
    PostgreSQL shutdown or crash: the next command then fails with "cannot switch to state
    21; another operation (2) is in progress" and the ROLLBACK with "another operation is in
    progress") - the pool's reset would run on a broken session: asyncio reports "Resetting
    connection with an active transaction" and the reset fails too.
    """
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _SESSION_ENDING)


async def commit_pooled(pool: Any, batch: Batch) -> tuple[int, int]:
    """``commit_batch`` on a connection of ``pool``; a connection in doubt is terminated."""
    async with pool.acquire() as conn:
        try:
            return await commit_batch(conn, batch)
        except BaseException as exc:  # a cancellation mid-command leaves the session in doubt too
            if not connection_survives(exc):
                # Never reused: the pool opens a fresh one. A connection that closed by itself
                # has already been handed back to the pool, whose proxy then refuses every call
                # ("connection has been released back to the pool"): nothing left to do.
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
            raise


def is_orphaned_asyncpg_waiter(context: dict[str, Any]) -> bool:
    """Whether an asyncio exception report is asyncpg's orphaned waiter of a lost connection.

    asyncpg (0.32) creates a command's waiter before it switches the protocol state; when the
    switch fails (the FATAL case of ``connection_survives``) the command raises but its waiter
    stays behind, and the connection's end sets ``ConnectionDoesNotExistError`` on it that
    nobody reads: asyncio then reports "Future exception was never retrieved". The failure
    itself reached the commit, which retries it, so the report says nothing new.
    """
    return context.get("message") == "Future exception was never retrieved" and isinstance(
        context.get("exception"), asyncpg.ConnectionDoesNotExistError
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__


# -- the service --------------------------------------------------------------------------------


@dataclass(slots=True)
class IngestStats:
    """Counters for metrics and tests."""

    messages: int = 0
    batches_committed: int = 0
    rows_inserted: int = 0
    rows_duplicate: int = 0
    malformed: int = 0
    malformed_by_sender: dict[str, int] = field(default_factory=dict)
    commit_errors: int = 0
    db_failures: int = 0
    acks_published: int = 0
    acks_unsent: int = 0
    overflow_dropped: int = 0
    maintenance_runs: int = 0
    maintenance_failures: int = 0


async def prepare_connection(conn: Any) -> None:
    """Create the session's staging table (the pool's ``init``; once per connection)."""
    await conn.execute(_CREATE_STAGING)


async def commit_batch(conn: Any, batch: Batch) -> tuple[int, int]:
    """Commit a batch in one transaction; return (stream watermark, rows newly inserted).

    ``conn`` must have been through ``prepare_connection``. Rows already stored (a resend,
    another replica) are absorbed by ``ON CONFLICT DO NOTHING``; the batch's range is recorded
    and the watermark advanced under the stream's row lock in the same transaction.
    """
    inserted = 0
    async with conn.transaction():
        if batch.rows:
            await conn.copy_records_to_table(STAGING_TABLE, records=batch.rows, columns=COLUMNS)
            status = await conn.execute(_INSERT)
            inserted = int(status.rsplit(" ", 1)[-1])
        acked = await conn.fetchval(
            _COMMIT_RANGE, batch.gateway, batch.stream_id, batch.first_seq, batch.last_seq
        )
    return int(acked), inserted


class Ingest:
    """One ingest replica; ``await ingest.run()`` until cancelled."""

    def __init__(
        self,
        *,
        dsn: str,
        mqtt: MqttClient,
        sync_prefix: str = "edge",
        shared_group: str | None = None,
        months_ahead: int = 3,
        retention_months: int = 24,
        maintenance_interval: float = 3600.0,
        pool_size: int = 4,
        queue_size: int = 256,
        command_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        retry_min: float = 0.2,
        retry_max: float = 5.0,
        maintenance_debounce: float | None = 10.0,
    ) -> None:
        """``mqtt`` must not be started yet: ``run`` subscribes, starts and closes it."""
        if not sync_prefix or "+" in sync_prefix or "#" in sync_prefix:
            raise ValueError(f"invalid sync_prefix {sync_prefix!r}")
        if shared_group is not None and not GATEWAY_ID.fullmatch(shared_group):
            raise ValueError(f"invalid shared_group {shared_group!r}")
        if months_ahead < 0 or retention_months < 1:
            raise ValueError("need months_ahead >= 0 and retention_months >= 1")
        if maintenance_interval <= 0 or pool_size < 1 or queue_size < 1:
            raise ValueError("need maintenance_interval > 0, pool_size >= 1, queue_size >= 1")
        if not 0 < retry_min <= retry_max:
            raise ValueError("need 0 < retry_min <= retry_max")
        self._dsn = dsn
        self._mqtt = mqtt
        self._prefix = sync_prefix
        self._group = shared_group
        self._months_ahead = months_ahead
        self._retention_months = retention_months
        self._interval = maintenance_interval
        self._pool_size = pool_size
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._debounce = maintenance_debounce
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=queue_size)
        self._pool: Any = None
        self._ready = asyncio.Event()
        self._started = False
        self._db_down_since: float | None = None
        self._commit_error_logged = False
        self._overflow_logged = False
        self._malformed_logged: set[str] = set()
        self._acked: dict[tuple[str, uuid.UUID], int] = {}
        self._covered: frozenset[int] = frozenset()
        self._wake = asyncio.Event()
        self._maintenance_ok = True
        self._last_maintenance = 0.0
        self.stats = IngestStats()
        # Announce every (re)connect: a gateway whose batches went nowhere while we were away
        # (no subscriber, or lost with our process) resends at once instead of after its
        # ack_timeout. Sent after the subscription, on the same connection, so in order.
        mqtt.add_listener(self._on_connection)

    # -- public state ---------------------------------------------------------------------------

    @property
    def topic(self) -> str:
        """The subscription: ``{prefix}/+/sync``, as ``$share/{group}/...`` with a group."""
        topic = f"{self._prefix}/+/sync"
        return f"$share/{self._group}/{topic}" if self._group else topic

    @property
    def presence_topic(self) -> str:
        """Where this replica announces itself (retained ``online``/``offline``)."""
        return presence_topic(self._prefix, self._mqtt.client_id)

    def _on_connection(self, up: bool) -> None:
        if up:
            with contextlib.suppress(NotConnected):
                self._mqtt.publish(
                    self.presence_topic, presence_payload("online"), qos=1, retain=True
                )

    @property
    def db_up(self) -> bool:
        """False from a failed database call until the next successful commit."""
        return self._db_down_since is None

    @property
    def queued(self) -> int:
        """Messages received and not yet taken by a worker."""
        return self._queue.qsize()

    async def wait_ready(self) -> None:
        """Wait until the schema exists and the MQTT client runs (subscribed on connect)."""
        await self._ready.wait()

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Create the schema, maintain partitions, consume S/sync until cancelled."""
        if self._started:
            raise RuntimeError("an Ingest runs once")
        self._started = True
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,  # connect on demand: a database that is down at start is retried below
            max_size=self._pool_size,
            init=prepare_connection,
            command_timeout=self._command_timeout,
            timeout=self._connect_timeout,
            server_settings={"application_name": "edge-agent-ingest"},
        )
        try:
            version = await self._retry_db(self._migrate)
            if version > SCHEMA_VERSION:
                log.warning(
                    "schema version %d is newer than this ingest's %d", version, SCHEMA_VERSION
                )
            # Not fatal when it fails: edge_events_default takes every row meanwhile.
            await self._maintain()
            self._mqtt.subscribe(self.topic, self._on_message, qos=1)
            async with self._mqtt:
                try:
                    async with asyncio.TaskGroup() as tasks:
                        for number in range(self._pool_size):
                            tasks.create_task(self._worker(), name=f"ingest-worker-{number}")
                        tasks.create_task(self._maintenance_loop(), name="ingest-maintenance")
                        log.info("ingest: consuming %s", self.topic)
                        self._ready.set()
                finally:
                    offline = (self.presence_topic, presence_payload("offline"), True)
                    await self._mqtt.close(final_publish=offline)
        finally:
            self._ready.clear()
            await self._close_pool()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        closed = False
        try:
            await asyncio.wait_for(pool.close(), timeout=5.0)
            closed = True
        except TimeoutError:
            pass  # a connection stuck on an unreachable server: terminated below
        finally:
            if not closed:
                pool.terminate()

    @contextlib.asynccontextmanager
    async def _own_connection(self) -> AsyncIterator[Any]:
        """A connection outside the pool, without the pool's command timeout.

        For migrations and partition maintenance: they may wait for another replica's
        advisory lock or move many rows, and must not take a connection from the commits.
        """
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout,
            server_settings={"application_name": "edge-agent-ingest-maintenance"},
        )
        try:
            yield conn
        except BaseException:
            conn.terminate()  # the server rolls back and releases the locks of the session
            raise
        await conn.close(timeout=5.0)

    async def _migrate(self) -> int:
        async with self._own_connection() as conn:
            version: int = await migrate(conn)
        return version

    async def _retry_db(self, call: Callable[[], Awaitable[T]]) -> T:
        """Await ``call()`` until it succeeds; only transient database errors are retried."""
        attempt = 0
        while True:
            try:
                result = await call()
            except Exception as exc:
                if not is_transient(exc):
                    raise  # wrong password, unknown database...: a configuration error
                self._db_failed(exc)
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))
                continue
            self._db_ok()
            return result

    # -- receiving ------------------------------------------------------------------------------

    def _sender(self, topic: str) -> str:
        head, tail = f"{self._prefix}/", "/sync"
        if topic.startswith(head) and topic.endswith(tail):
            return topic[len(head) : -len(tail)]
        return topic

    def _on_message(self, message: Message) -> None:
        # Runs on the loop thread inside the MQTT client's read callback: queue and return at once.
        self.stats.messages += 1
        if self._queue.full():
            # The oldest is the likeliest to have been resent already by its gateway.
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
            self.stats.overflow_dropped += 1
            if not self._overflow_logged:
                self._overflow_logged = True
                log.warning(
                    "ingest: queue full (%d); dropping the oldest messages unacked "
                    "(their gateways resend them)",
                    self._queue.maxsize,
                )
        self._queue.put_nowait((self._sender(message.topic), message.payload))

    def _count_malformed(self, sender: str, reason: str) -> None:
        self.stats.malformed += 1
        counts = self.stats.malformed_by_sender
        key = sender if sender in counts or len(counts) < _MAX_SENDERS else "(other)"
        counts[key] = counts.get(key, 0) + 1
        if key not in self._malformed_logged:
            self._malformed_logged.add(key)
            log.warning(
                "ingest: malformed S/sync message from %r skipped: %s "
                "(logged once per sender; see the malformed counters)",
                sender[:80],
                reason,
            )

    # -- committing -----------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            sender, payload = await self._queue.get()
            if self._queue.empty():
                self._overflow_logged = False
            try:
                batch = parse_batch(sender, payload)
            except MalformedBatch as exc:
                self._count_malformed(sender, str(exc))
                continue
            self._note_months(batch)
            acked = await self._commit_with_retry(batch)
            if acked is not None:
                self._publish_ack(batch, acked)

    async def _commit_with_retry(self, batch: Batch) -> int | None:
        attempt = 0
        while True:
            try:
                acked, inserted = await self._commit(batch)
            except Exception as exc:
                if is_transient(exc):
                    self._db_failed(exc)
                    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
                        # A fail-over demoted our server: reconnect, the DSN leads to the
                        # new primary (the pool would otherwise keep these connections).
                        await self._pool.expire_connections()
                    attempt += 1
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                if isinstance(exc, _DATA):
                    self._count_malformed(batch.gateway, f"refused by PostgreSQL: {exc}")
                    return None
                # Not the data, not an outage (e.g. a table dropped by hand): skip unacked,
                # so that the gateway resends it once the problem is fixed.
                self.stats.commit_errors += 1
                if not self._commit_error_logged:
                    self._commit_error_logged = True
                    log.error("ingest: commit failed, batch not acked: %s", _describe(exc))
                return None
            self._db_ok()
            self._commit_error_logged = False
            self.stats.batches_committed += 1
            self.stats.rows_inserted += inserted
            self.stats.rows_duplicate += len(batch.rows) - inserted
            return acked

    async def _commit(self, batch: Batch) -> tuple[int, int]:
        return await commit_pooled(self._pool, batch)

    def _publish_ack(self, batch: Batch, acked: int) -> None:
        key = (batch.gateway, batch.stream_id)
        # Two workers may finish commits of one stream in either order: never send a lower
        # watermark after a higher one (both are committed, so the max is too).
        acked = max(acked, self._acked.get(key, 0))
        if key not in self._acked and len(self._acked) >= _MAX_ACK_CACHE:
            self._acked.pop(next(iter(self._acked)))
        self._acked[key] = acked
        payload = dumps({"stream": batch.stream, "acked_seq": acked})
        try:
            self._mqtt.publish(f"{self._prefix}/{batch.gateway}/ack", payload, qos=1)
        except NotConnected:
            # Committed but not acked: the gateway resends, the resend is absorbed and acked.
            self.stats.acks_unsent += 1
            return
        self.stats.acks_published += 1

    # -- database availability ---------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._retry_max, self._retry_min * 2 ** min(attempt - 1, 20))
        # Jitter: replicas (and workers) hitting a database that just came back spread out.
        return random.uniform(ceiling / 2, ceiling)

    def _db_failed(self, exc: BaseException) -> None:
        self.stats.db_failures += 1
        if isinstance(exc, asyncpg.TransactionRollbackError):
            return  # a conflict with a concurrent commit, not an outage: just retry
        if self._db_down_since is None:
            self._db_down_since = time.monotonic()
            log.warning(
                "ingest: PostgreSQL unavailable (%s): no acks until it is back; retrying",
                _describe(exc),
            )

    def _db_ok(self) -> None:
        if self._db_down_since is not None:
            log.info(
                "ingest: PostgreSQL available again after %.1f s",
                time.monotonic() - self._db_down_since,
            )
            self._db_down_since = None

    # -- partition maintenance ------------------------------------------------------------------

    def _note_months(self, batch: Batch) -> None:
        """Wake maintenance early when rows land in a kept month that has no partition."""
        if self._debounce is None or batch.months <= self._covered:
            return
        oldest, newest = kept_window(
            datetime.now(UTC),
            months_ahead=self._months_ahead,
            retention_months=self._retention_months,
        )
        if any(oldest <= month <= newest for month in batch.months - self._covered):
            self._wake.set()

    async def _maintenance_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # After a failure, try again sooner than the regular interval.
            delay = self._interval if self._maintenance_ok else min(self._interval, 30.0)
            woke = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
                    woke = True
            if woke and self._debounce is not None:
                # Rows just went to the default partition: adopt them soon, not per batch.
                pause = self._last_maintenance + self._debounce - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
            self._wake.clear()
            await self._maintain()

    async def _maintain(self) -> None:
        self._last_maintenance = asyncio.get_running_loop().time()
        try:
            async with self._own_connection() as conn:
                report = await maintain_partitions(
                    conn,
                    months_ahead=self._months_ahead,
                    retention_months=self._retention_months,
                )
        except Exception as exc:
            self._maintenance_ok = False
            self.stats.maintenance_failures += 1
            if is_transient(exc):
                self._db_failed(exc)  # logged once per outage
            else:
                log.warning("ingest: partition maintenance failed: %s", _describe(exc))
            return
        self._maintenance_ok = True
        self._covered = report.covered
        self.stats.maintenance_runs += 1


async def run_ingest(
    *,
    dsn: str,
    mqtt: MqttClient,
    sync_prefix: str = "edge",
    shared_group: str | None = None,
    months_ahead: int = 3,
    retention_months: int = 24,
    maintenance_interval: float = 3600.0,
    pool_size: int = 4,
) -> None:
    """Run one ingest replica until cancelled (entry point of ``edge-agent ingest``)."""
    ingest = Ingest(
        dsn=dsn,
        mqtt=mqtt,
        sync_prefix=sync_prefix,
        shared_group=shared_group,
        months_ahead=months_ahead,
        retention_months=retention_months,
        maintenance_interval=maintenance_interval,
        pool_size=pool_size,
    )
    await ingest.run()
