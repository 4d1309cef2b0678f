"""Central ingest: S/sync batches from every gateway into PostgreSQL, then S/ack.

Flow per batch (docs/central.md, "What one batch does"): parse and validate (batch.py) -> one
transaction (commit.py) -> COMMIT -> publish ``S/ack`` with the stream's watermark. Nothing is
acked that is not committed (docs/delivery.md).

The watermark is computed over committed *ranges*, not rows: a batch is accepted only when it
is self-covering (every seq of ``[first_seq, last_seq]`` is one of its events or declared
dropped by one of its ``gap`` events), and it records its range and the ranges its gap events
declare. So the watermark never passes a seq that was neither stored nor declared dropped.
Out-of-order batches, resends and several replicas are all handled in the database under a
row lock on the stream, so the watermark only ever moves up.

PostgreSQL down: the batch in hand is retried with jittered back-off until it commits (asyncpg's
pool reconnects), no ack goes out meanwhile, and new messages wait in a bounded queue; when that
overflows the oldest are dropped unacked — the gateways resend them after their ack timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from sync.central.batch import (
    DEFAULT_EVENT_WINDOW,
    GATEWAY_ID,
    Batch,
    EventTimeOutOfWindow,
    EventTimeWindow,
    MalformedBatch,
    UncoveredSeqs,
    parse_batch,
)
from sync.central.commit import (
    DatabaseAvailability,
    commit_pooled,
    describe,
    is_refused_data,
    is_transient,
    prepare_connection,
)
from sync.central.maintenance import PartitionMaintenance, maintenance_connection
from sync.central.schema import SCHEMA_VERSION, migrate
from sync.central.stats import IngestStats, Senders
from sync.events import dumps, rfc3339
from sync.mqtt.client import Message, MqttClient, NotConnected

log = logging.getLogger("edge_agent.ingest")

_MAX_ACK_CACHE = 100_000
_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def presence_topic(sync_prefix: str, client_id: str) -> str:
    """``{sync_prefix}/_central/status/{replica}``: a replica's retained online/offline."""
    # Four levels: never matched by the gateways' {prefix}/+/sync and {prefix}/+/ack.
    return f"{sync_prefix}/_central/status/{_TOPIC_UNSAFE.sub('_', client_id)[:128]}"


def presence_payload(status: str) -> bytes:
    """``{"ts","status"}`` with status ``online`` or ``offline``."""
    return dumps({"ts": rfc3339(time.time()), "status": status})


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
        event_window: EventTimeWindow = DEFAULT_EVENT_WINDOW,
    ) -> None:
        """``mqtt`` must not be started yet: ``run`` subscribes, starts and closes it.

        Batches with an event dated outside ``event_window`` are malformed.
        """
        if not sync_prefix or "+" in sync_prefix or "#" in sync_prefix:
            raise ValueError(f"invalid sync_prefix {sync_prefix!r}")
        if shared_group is not None and not GATEWAY_ID.fullmatch(shared_group):
            raise ValueError(f"invalid shared_group {shared_group!r}")
        if pool_size < 1 or queue_size < 1:
            raise ValueError("need pool_size >= 1, queue_size >= 1")
        self.stats = IngestStats()
        self.senders = Senders()
        self._database = DatabaseAvailability(
            stats=self.stats, retry_min=retry_min, retry_max=retry_max
        )
        self._maintenance = PartitionMaintenance(
            dsn=dsn,
            connect_timeout=connect_timeout,
            database=self._database,
            stats=self.stats,
            months_ahead=months_ahead,
            retention_months=retention_months,
            interval=maintenance_interval,
            debounce=maintenance_debounce,
            event_window=event_window,
        )
        self._event_window = event_window
        self._dsn = dsn
        self._mqtt = mqtt
        self._prefix = sync_prefix
        self._group = shared_group
        self._pool_size = pool_size
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=queue_size)
        self._pool: Any = None
        self._ready = asyncio.Event()
        self._started = False
        self._commit_error_logged = False
        self._overflow_logged = False
        self._acked: dict[tuple[str, uuid.UUID], int] = {}
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
        return self._database.up

    @property
    def mqtt_connected(self) -> bool:
        """Whether the broker connection is up (the subscription is renewed on each connect)."""
        return self._mqtt.is_connected

    @property
    def ready(self) -> bool:
        """Consuming: schema in place, database up, subscribed on a live broker connection."""
        return self._ready.is_set() and self.db_up and self.mqtt_connected and self.subscribed

    @property
    def subscribed(self) -> bool:
        """Whether the broker granted the subscription on the current connection."""
        return self._mqtt.is_subscribed(self.topic)

    @property
    def queued(self) -> int:
        """Messages received and not yet taken by a worker."""
        return self._queue.qsize()

    @property
    def queue_size(self) -> int:
        """The queue's bound (the oldest message is dropped unacked past it)."""
        return self._queue.maxsize

    def acks_sent(self) -> Mapping[tuple[str, uuid.UUID], int]:
        """(gateway, stream) -> the highest watermark this replica sent in an S/ack (a live,
        read-only view of at most 100,000 streams)."""
        return MappingProxyType(self._acked)

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
            version = await self._database.retry(self._migrate)
            if version > SCHEMA_VERSION:
                log.warning(
                    "schema version %d is newer than this ingest's %d", version, SCHEMA_VERSION
                )
            # Not fatal when it fails: edge_events_default takes every row meanwhile.
            await self._maintenance.run_once()
            self._mqtt.subscribe(self.topic, self._on_message, qos=1)
            async with self._mqtt:
                try:
                    async with asyncio.TaskGroup() as tasks:
                        for number in range(self._pool_size):
                            tasks.create_task(self._worker(), name=f"ingest-worker-{number}")
                        tasks.create_task(self._maintenance.loop(), name="ingest-maintenance")
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

    async def _migrate(self) -> int:
        async with maintenance_connection(self._dsn, connect_timeout=self._connect_timeout) as conn:
            version: int = await migrate(conn)
        return version

    # -- receiving ------------------------------------------------------------------------------

    def _sender(self, topic: str) -> str:
        head, tail = f"{self._prefix}/", "/sync"
        if topic.startswith(head) and topic.endswith(tail):
            return topic[len(head) : -len(tail)]
        return topic

    def _on_message(self, message: Message) -> None:
        # Runs on the loop thread inside the MQTT client's read callback: queue and return at once.
        self.stats.messages += 1
        sender = self._sender(message.topic)
        self.senders.message(sender, time.time())
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
        self._queue.put_nowait((sender, message.payload))

    def _count_malformed(self, sender: str, reason: str) -> None:
        if self.stats.count_malformed(sender):
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
                batch = parse_batch(sender, payload, window=self._event_window)
            except MalformedBatch as exc:
                if isinstance(exc, UncoveredSeqs):
                    self.stats.uncovered += 1
                elif isinstance(exc, EventTimeOutOfWindow):
                    self.stats.out_of_window += 1
                self._count_malformed(sender, str(exc))
                continue
            self._maintenance.note_months(batch.months)
            acked = await self._commit_with_retry(batch)
            if acked is not None:
                self._publish_ack(batch, acked)

    async def _commit_with_retry(self, batch: Batch) -> int | None:
        attempt = 0
        while True:
            try:
                acked, inserted = await commit_pooled(self._pool, batch)
            except Exception as exc:
                if is_transient(exc):
                    self._database.failed(exc)
                    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
                        # A fail-over demoted our server: reconnect, the DSN leads to the
                        # new primary (the pool would otherwise keep these connections).
                        await self._pool.expire_connections()
                    attempt += 1
                    await asyncio.sleep(self._database.backoff(attempt))
                    continue
                if is_refused_data(exc):
                    self._count_malformed(batch.gateway, f"refused by PostgreSQL: {exc}")
                    return None
                # Not the data, not an outage (e.g. a table dropped by hand): skip unacked,
                # so that the gateway resends it once the problem is fixed.
                self.stats.commit_errors += 1
                if not self._commit_error_logged:
                    self._commit_error_logged = True
                    log.error("ingest: commit failed, batch not acked: %s", describe(exc))
                return None
            self._database.succeeded()
            self._commit_error_logged = False
            self.stats.batches_committed += 1
            self.stats.rows_inserted += inserted
            self.stats.rows_duplicate += len(batch.rows) - inserted
            return acked

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
        self.senders.acked(batch.gateway, time.time())
