"""The forwarder: sends the outbox as S/sync batches and deletes what S/ack covers.

Contract (docs/topics.md, docs/delivery.md): ``{sync_prefix}/{gateway}/sync`` carries batches
``{"gateway","stream","first_seq","last_seq","events":[...]}`` at QoS 1. A batch claims exactly
its events, a run of consecutive seqs; seqs the cap dropped are skipped and declared by the
cap's gap event later in the stream. The central store answers on
``{sync_prefix}/{gateway}/ack`` with ``{"stream","acked_seq"}``, its contiguous watermark; only
that deletes events here — a PUBACK only means the broker has the message. An ack is taken
at once and its rows are deleted lazily, with the outbox's next insert transaction or a few
seconds later (`Outbox.take_ack`), never one transaction per ack.

Steady state: while no backlog waits, events are sent about once per ``linger`` (1 s) or as
soon as ``batch_events`` of them are committed, whichever comes first, so that a gateway
whose events trickle in sends one batch (and gets one ack) per second rather than one per
outbox commit. A backlog, a resend and a full batch go at once.

Flow control: at most ``window`` batches are unacknowledged. Without progress for
``ack_timeout`` seconds, and after every reconnect (the MQTT client forgets in-flight
messages: every connection starts empty), sending restarts from the lowest unacknowledged seq;
likewise when an ingest replica announces that it is (back) online on
``{sync_prefix}/_central/status/{replica}`` (batches sent while no replica was subscribed went
nowhere). Duplicates on the wire are expected and absorbed by the central store. ``max_rate``
paces the durable path so that a backlog replay leaves the link to live values.

Oversized messages: some brokers drop a message above their size limit silently, others
disconnect the client (mosquitto 2.0 with an MQTT 5 client) or reject it in the PUBACK. Each
shows up here as a stall: no progress within ack_timeout, or a lost connection or a refused
PUBACK with batches in flight. From the second stall in a row, when the stuck batch is clearly
larger (by a quarter) than any batch acknowledged so far, the byte budget is cut to half of it
(a PUBACK refusing it cuts at once; but "Not authorized" is the broker's ACL, not the size: it
is logged once, and the batch is resent after ack_timeout). A stall of a batch no larger than
those already acknowledged is the central store or the network, not the size: it is only
resent, unless four stalls in a row make that knowledge stale. Every 32 acknowledged batches
the budget doubles again; after a cut that followed successful batches only up to the size
known to pass, for 10 minutes, so that a real limit is probed once per 10 minutes and not every
few batches. A stall is evidence of a size limit only while a central store listens (an ingest
replica announces itself online, or acknowledged something): with no ingest running, one batch
at a time is in flight (a probe, which an ingest without presence would acknowledge), nothing
is cut, resends back off (ack_timeout doubled per stall, at most 5 minutes) until an ingest
announces itself, and after ``warn_after`` seconds connected without an acknowledgement the log,
status and /readyz say that no central store acknowledges (docs/delivery.md, "When nothing
acknowledges").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from sync.events import Event
from sync.mqtt.client import Message, MqttClient, NotConnected, PublishRejected
from sync.outbox.store import Batch, Outbox, OutboxUnavailable
from sync.uplink.acks import AckCheck
from sync.uplink.budget import MIN_BATCH_BYTES, BatchBudget
from sync.uplink.payloads import SyncPayloads
from sync.uplink.presence import CentralPresence
from sync.uplink.sink import SinkFigure

log = logging.getLogger("edge_agent.forwarder")

DEFAULT_MAX_BYTES = 256 * 1024
# Stalls in a row after which sizes acknowledged earlier no longer prove anything (the
# broker's limit may have been lowered).
_STALE_AFTER = 4
# Longest wait for a free slot of the MQTT client's in-flight window before acks and stalls
# are looked at again. Live values share the window, which is the broker's Receive Maximum
# (mosquitto: 20 by default), so on a busy line it is often full; the PUBACK that frees a
# slot wakes the wait at once.
_SPACE_WAIT = 0.5
_RETRY_AFTER = 1.0
# Longest wait between resends while no central store listens (see Forwarder._resend_after).
_BLIND_RESEND_MAX = 300.0
# In steady state, the longest an event waits for more to fill its batch.
LINGER = 1.0


@dataclass(slots=True)
class _Sent:
    first: int
    last: int
    size: int
    events: int
    epoch: int


class Forwarder:
    """Moves outbox batches to the central store over MQTT; run it with ``await run()``."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        client: MqttClient,
        gateway_id: str,
        sync_prefix: str,
        batch_events: int = 1000,
        window: int = 8,
        ack_timeout: float = 30.0,
        max_rate: int = 0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        warn_after: float = 120.0,
        linger: float = LINGER,
    ) -> None:
        if not gateway_id or any(char in gateway_id for char in "/+#"):
            raise ValueError(f"invalid gateway_id {gateway_id!r}: no '/', '+' or '#'")
        if not sync_prefix or any(char in sync_prefix for char in "+#"):
            raise ValueError(f"invalid sync_prefix {sync_prefix!r}: no '+' or '#'")
        if batch_events < 1:
            raise ValueError("batch_events must be >= 1")
        if window < 1:
            raise ValueError("window must be >= 1")
        if not ack_timeout > 0:
            raise ValueError("ack_timeout must be > 0")
        if max_rate < 0:
            raise ValueError("max_rate must be >= 0 (0: unlimited)")
        if not warn_after > 0:
            raise ValueError("warn_after must be > 0")
        if linger < 0:
            raise ValueError("linger must be >= 0")
        self._outbox = outbox
        self._client = client
        self.sync_topic = f"{sync_prefix}/{gateway_id}/sync"
        self._payloads = SyncPayloads(gateway_id=gateway_id, topic=self.sync_topic, client=client)
        self.ack_topic = f"{sync_prefix}/{gateway_id}/ack"
        self.central_topic = f"{sync_prefix}/_central/status/+"
        self._sync_prefix = sync_prefix
        self._presence = CentralPresence()
        self._warn_after = warn_after
        # Since when events have waited, connected, without an ack moving the watermark.
        self._quiet_since = time.monotonic()
        # Whether the last ack covered every committed event: the next commit starts a new
        # wait (not the linger's first send, which may come after the wait was reported).
        self._caught_up = False
        self._silence_reported = False
        # While pacing, keep each batch to about 200 ms worth of events so that the link sees
        # an even trickle rather than one large burst per second.
        self._batch_events = min(batch_events, max(1, max_rate // 5)) if max_rate else batch_events
        self._window = window
        self._ack_timeout = ack_timeout
        self._max_rate = max_rate
        self._budget = BatchBudget(max_bytes=max_bytes)
        self._wake = asyncio.Event()
        self._inflight: deque[_Sent] = deque()
        self._epoch = 0
        self._next_after = 0  # last seq covered by the latest batch sent (or the watermark)
        self._high_sent = 0  # highest seq ever sent: a batch at or below it is a resend
        self._central_acked = 0  # central watermark, already applied to the window
        self._ack_target = 0  # central watermark received, maybe not yet applied
        # The highest ack (and its topic) beyond the last seq sent, but within what was
        # committed: believable when the cap dropped every seq after the last one sent up to
        # it, which the outbox tells (see _settle_ack_beyond_sent).
        self._ack_beyond_sent: tuple[int, str] | None = None
        self._linger = linger
        # Since when committed events have waited to be sent in steady state (None: none wait).
        self._unsent_since: float | None = None
        self._last_progress = time.monotonic()
        self._stalls = 0  # consecutive stalls without progress
        self._reconnected = False
        self._lost_inflight = False
        self._central_back = False
        self._rejected: _Sent | None = None
        self._refusal_logged = False
        self._send_at = 0.0
        self._started = False
        self._acks = AckCheck()
        # (epoch, dropped_total) when the gap events were last sent ahead of the batches.
        self._declared: tuple[int, int] | None = None
        self._committed_at_start = 0  # set in run(): what the process before a restart sent
        self._oversized_logged = 0
        self._outbox_error: str | None = None
        # Counters for metrics and health.
        self.batches_sent = 0
        self.batches_resent = 0
        self.events_sent = 0
        self.acks_received = 0
        self.last_ack_ts: float | None = None
        self.stalls_total = 0

    # -- public state ------------------------------------------------------------------------

    @property
    def batch_bytes(self) -> int:
        """Current byte budget of one S/sync message (shrinks after stalls)."""
        return self._budget.bytes

    # -- the Sink protocol ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The sink's name."""
        return "forwarder"

    def offer_events(self, events: Sequence[Event]) -> None:
        """Nothing to do: the forwarder reads the outbox itself, which holds every committed
        event (also those appended outside the pipeline: workflow audits, lifecycle events)."""

    def retire(self, device: str, tags: Sequence[str]) -> None:
        """Nothing to do: events of a removed device still in the outbox are delivered."""

    async def drain(self) -> None:
        """Wait until the central store acknowledged everything committed, while connected and
        while a central store listens (a stop never waits for acks that cannot come)."""
        self._linger = 0.0  # what waits for a fuller batch goes now
        self._wake.set()
        if self._client.is_connected and self._central_listens() and not self._silence_reported:
            await self._outbox.wait_acked(self._outbox.committed_seq)

    def problems(self) -> Sequence[str]:
        """ "no central acknowledgement for ..." once events waited `warn_after` connected."""
        problem = self._silence_problem(time.monotonic())
        return () if problem is None else (problem,)

    def figures(self) -> Sequence[SinkFigure]:
        """Batches, events, acks and stalls of the durable path."""
        return (
            SinkFigure("sync_batches_sent", "S/sync batches sent.", self.batches_sent),
            SinkFigure("sync_batches_resent", "S/sync batches sent again.", self.batches_resent),
            SinkFigure("sync_events_sent", "Events sent on S/sync.", self.events_sent),
            SinkFigure("sync_acks_received", "S/ack messages applied.", self.acks_received),
            *self._acks.figures(),
            SinkFigure(
                "sync_stalls",
                "Times no ack came within ack_timeout (or a batch was refused).",
                self.stalls_total,
            ),
            SinkFigure(
                "sync_batches_in_flight",
                "S/sync batches sent and not yet acknowledged.",
                len(self._inflight),
                "gauge",
            ),
            SinkFigure(
                "sync_batch_bytes",
                "Current byte budget of one S/sync message.",
                self._budget.bytes,
                "gauge",
            ),
        )

    # -- main loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Forward forever; cancel the task to stop (the outbox keeps everything unacked)."""
        if self._started:
            raise RuntimeError("Forwarder.run() can be called once")
        self._started = True
        outbox = self._outbox
        self._central_acked = self._ack_target = outbox.acked_seq
        self._next_after = self._high_sent = outbox.acked_seq
        self._committed_at_start = outbox.committed_seq
        self._quiet_since = time.monotonic()
        self._caught_up = outbox.acked_seq >= outbox.committed_seq
        self._client.subscribe(self.ack_topic, self._on_ack_message, qos=1)
        self._client.subscribe(self.central_topic, self._on_central_status, qos=1)
        self._client.add_listener(self._on_connection)
        outbox.add_commit_listener(self._on_commit)
        try:
            while True:
                self._wake.clear()
                wake_at = await self._step(time.monotonic())
                timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            outbox.remove_commit_listener(self._on_commit)

    async def _step(self, now: float) -> float | None:
        """Do what can be done now; return when to look again (None: on the next event)."""
        try:
            await self._settle_ack_beyond_sent()
            await self._commit_ack_alarm()
            self._apply_acks(now)
            self._check_silence(now)
            self._check_stalls(now)
            wake_at = await self._send(now)
        except OutboxUnavailable as exc:
            self._report_outbox_error(exc)
            return time.monotonic() + _RETRY_AFTER
        deadlines = [wake_at] if wake_at is not None else []
        if self._inflight and self._client.is_connected:
            deadlines.append(self._last_progress + self._resend_after())
        if self._waiting() and self._client.is_connected and not self._silence_reported:
            deadlines.append(self._quiet_since + self._warn_after)
        return min(deadlines) if deadlines else None

    async def _settle_ack_beyond_sent(self) -> None:
        """Apply or refuse the ack beyond the last seq sent that waits for the outbox's word.

        The central watermark passes seqs declared dropped by a gap event (docs/topics.md), and
        the gap events go ahead of the batches: after a batch cut by a hole the cap left, the
        ingest acknowledges the end of the hole before this process has sent anything after
        it. Such an ack deletes nothing that is stored, so it is applied; with a window of
        one batch (no ingest known) refusing it would stall the stream for good."""
        pending, self._ack_beyond_sent = self._ack_beyond_sent, None
        if pending is None:
            return
        acked, topic = pending
        covered = max(self._high_sent, self._ack_target)
        if acked > covered:
            kept = await self._outbox.first_kept_after(covered)
            covered = self._outbox.committed_seq if kept is None else max(covered, kept - 1)
        accepted = self._acks.judge(
            acked, topic, sent_up_to=covered, committed_at_start=self._committed_at_start
        )
        if accepted is not None:
            self._take_ack(accepted)

    async def _commit_ack_alarm(self) -> None:
        alarm = self._acks.take_alarm()
        if alarm is not None:
            await self._outbox.append([alarm])

    def _apply_acks(self, now: float) -> None:
        """Move the window to the central watermark received."""
        target = self._ack_target
        if target > self._central_acked:
            self._central_acked = target
            while self._inflight and self._inflight[0].last <= target:
                self._budget.acked(self._inflight.popleft().size)
            self._next_after = max(self._next_after, target)
            # Taken at once, deleted with the outbox's next write (not one transaction per ack).
            self._outbox.take_ack(self._outbox.stream, target)
            self._last_progress = now
            self._quiet_since = now
            self._caught_up = target >= self._outbox.committed_seq
            if self._silence_reported:
                self._silence_reported = False
                log.info("forwarder: the central store acknowledges again (up to seq %d)", target)
            self._stalls = 0
            self._refusal_logged = False
            self._budget.maybe_grow(now)

    def _waiting(self) -> bool:
        """Whether committed events wait for the central store's acknowledgement."""
        return self._outbox.committed_seq > self._central_acked

    def _central_listens(self) -> bool:
        """Whether a central store is known to listen: a replica online, or an ack received."""
        return bool(self._presence.online) or self.acks_received > 0

    def _resend_after(self) -> float:
        """Seconds without progress before the window is sent again: ack_timeout while a central
        store listens; while none does, doubled per stall in a row up to _BLIND_RESEND_MAX, so
        that the window is not re-read and re-sent into a broker nobody reads. A replica that
        announces itself online triggers a resend at once."""
        if self._central_listens():
            return self._ack_timeout
        backoff: float = self._ack_timeout * 2.0 ** min(self._stalls, 16)
        return min(backoff, _BLIND_RESEND_MAX)

    def _silence_problem(self, now: float) -> str | None:
        if not self._client.is_connected or not self._waiting():
            return None  # while disconnected the uplink is the problem, reported as such
        silent = now - self._quiet_since
        if silent < self._warn_after:
            return None
        online = self._presence.online
        if online:
            return (
                f"no central acknowledgement for {silent:.0f} s although ingest "
                f"{', '.join(online)} is online: does the broker refuse or drop the batches on "
                f"{self.sync_topic} (message size limit, ACL)?"
            )
        return (
            f"no central acknowledgement for {silent:.0f} s: is an ingest running on sync "
            f"prefix {self._sync_prefix!r}? (none announced itself on {self.central_topic})"
        )

    def _check_silence(self, now: float) -> None:
        if self._silence_reported:
            return
        problem = self._silence_problem(now)
        if problem is not None:
            self._silence_reported = True
            log.warning("forwarder: %s", problem)

    def _check_stalls(self, now: float) -> None:
        rejected, self._rejected = self._rejected, None
        central_back, self._central_back = self._central_back, False
        if self._reconnected:
            self._reconnected = False
            if self._lost_inflight:
                self._stall(now, "connection lost with batches in flight")
            else:
                self._restart(now, "reconnected")
            self._lost_inflight = False
        elif rejected is not None and rejected.epoch == self._epoch:
            self._stall(now, "broker rejected a batch", rejected_size=rejected.size)
        elif central_back and self._inflight:
            # What is in flight may have gone nowhere (nobody subscribed, or lost with the
            # ingest process): resend now, not after ack_timeout. Not a stall.
            self._restart(now, "the central store is back online")
        elif (
            self._inflight
            and self._client.is_connected  # while disconnected the reconnect decides
            and now - self._last_progress >= self._resend_after()
        ):
            self._stall(now, f"no ack for {self._resend_after():g}s")

    def _stall(self, now: float, reason: str, *, rejected_size: int | None = None) -> None:
        self._stalls += 1
        self.stalls_total += 1
        if self._stalls >= _STALE_AFTER:
            self._budget.forget_proven()
            self._report_oversized()
        stuck = rejected_size
        # A silent stall hints at a size limit only if someone would have acknowledged.
        if stuck is None and self._inflight and self._stalls >= 2 and self._central_listens():
            head = self._inflight[0].size
            stuck = head if self._budget.is_evidence(head) else None
        if stuck is not None:
            self._budget.cut(now, stuck, reason)
        self._restart(now, reason)

    def _report_oversized(self) -> None:
        # A single event that cannot pass blocks the stream until the limit is raised: say so.
        head = self._inflight[0] if self._inflight else None
        if head is None or head.events != 1 or head.size <= MIN_BATCH_BYTES:
            return  # a small single event stuck is the central store being away, not its size
        if head.last == self._oversized_logged:
            return
        self._oversized_logged = head.last
        log.error(
            "forwarder: the S/sync message with the single event seq %d (%d bytes) has not "
            "been acknowledged after %d attempts; is the broker's message size limit below it?",
            head.last,
            head.size,
            self._stalls,
        )

    def _restart(self, now: float, reason: str) -> None:
        """Forget what is in flight and continue from the central watermark."""
        if self._inflight or self._next_after > self._central_acked:
            log.info("forwarder: resending from seq %d (%s)", self._central_acked + 1, reason)
        self._epoch += 1
        self._inflight.clear()
        self._next_after = self._central_acked
        self._last_progress = now

    async def _send(self, now: float) -> float | None:
        """Send batches while the window has room; return a pacing/poll time if one applies."""
        client = self._client
        await self._declare_drops()
        while len(self._inflight) < self._window_now() and client.is_connected:
            if not client.has_bulk_room:  # a backlog drain must not hold up live values
                try:
                    async with asyncio.timeout(_SPACE_WAIT):
                        await client.wait_bulk_room()
                except TimeoutError:
                    return time.monotonic()  # acks and stalls first, then try again
                now = time.monotonic()
                continue
            if self._max_rate and now < self._send_at:
                return self._send_at
            linger_until = self._linger_until(now)
            if linger_until is not None:
                return linger_until
            epoch = self._epoch
            batch = await self._outbox.read_batch(
                self._next_after,
                self._batch_events,
                self._payloads.events_budget(self._budget.bytes, self._outbox.stream),
            )
            self._outbox_error = None
            if epoch != self._epoch or self._reconnected or self._rejected is not None:
                self._wake.set()  # something changed while reading: decide again
                return None
            if not batch.events:
                return None
            payload = self.encode(batch)
            try:
                future = client.publish_acked(self.sync_topic, payload, qos=1)
            except NotConnected:
                return None  # the connection listener wakes us after the reconnect
            sent = _Sent(
                batch.first_seq, batch.last_seq, len(payload), len(batch.events), self._epoch
            )
            future.add_done_callback(partial(self._on_puback, sent))
            now = time.monotonic()
            if not self._inflight:
                self._last_progress = now  # the ack timer starts with the first batch out
            self._inflight.append(sent)
            self._next_after = batch.last_seq
            if self._next_after >= self._outbox.committed_seq:
                self._unsent_since = None
            self.batches_sent += 1
            self.events_sent += len(batch.events)
            if batch.first_seq <= self._high_sent:
                self.batches_resent += 1
            self._high_sent = max(self._high_sent, batch.last_seq)
            if self._max_rate:
                self._send_at = max(self._send_at, now) + len(batch.events) / self._max_rate
        return None

    def _linger_until(self, now: float) -> float | None:
        """When a short batch may go (None: now): in steady state, ``linger`` after the first
        event waiting, unless ``batch_events`` wait; a resend or a backlog goes at once."""
        unsent = self._outbox.committed_seq - self._next_after
        if unsent <= 0:
            self._unsent_since = None
            return None  # read_batch finds nothing
        if unsent >= self._batch_events or self._next_after < self._high_sent:
            return None
        if self._unsent_since is None:
            self._unsent_since = now
        due = self._unsent_since + self._linger
        return due if now < due else None

    def _on_commit(self) -> None:
        if self._caught_up:
            self._caught_up = False
            self._quiet_since = time.monotonic()  # everything was acknowledged: a new wait
        # Wake for the first event waiting (to set the linger timer) and for a full batch that
        # the window has room for, not for every commit in between.
        if self._unsent_since is None:
            self._unsent_since = time.monotonic()
            self._wake.set()
        elif (
            self._outbox.committed_seq - self._next_after >= self._batch_events
            and len(self._inflight) < self._window_now()
        ):
            self._wake.set()

    async def _declare_drops(self) -> None:
        """Send the gap events above the watermark ahead of the batches, once per epoch and
        after every new drop: seqs the cap dropped are declared only by a gap event later in
        the stream, and the central watermark cannot pass them before it has that event (a
        window full of batches after the hole would otherwise wait for it forever)."""
        key = (self._epoch, self._outbox.dropped_total)
        if key == self._declared or not self._outbox.dropped_total:
            return
        gaps = await self._outbox.read_gaps(self._central_acked)
        if self._payloads.send_alone(self._outbox.stream, gaps):
            self._declared = key

    def encode(self, batch: Batch) -> bytes:
        """The S/sync payload of `batch` (compact UTF-8 JSON)."""
        return self._payloads.encode(batch)

    def _report_outbox_error(self, exc: OutboxUnavailable) -> None:
        if self._outbox_error != str(exc):
            log.warning("forwarder: outbox unavailable: %s", exc)
            self._outbox_error = str(exc)

    # -- callbacks (event loop, from MqttClient) -------------------------------------------------

    def _on_ack_message(self, message: Message) -> None:
        acks = self._acks
        acked = acks.parse(message, stream=self._outbox.stream)
        if acked is None:
            return
        # Up to an ack already taken (which may have passed a hole beyond the last seq sent)
        # an ack changes nothing and needs no look at the outbox.
        known = max(self._high_sent, self._ack_target)
        if known < acked <= self._outbox.committed_seq:
            # Maybe the end of a hole the cap left: the outbox decides (in the forwarder task).
            if self._ack_beyond_sent is None or acked > self._ack_beyond_sent[0]:
                self._ack_beyond_sent = (acked, message.topic)
            self._wake.set()
            return
        accepted = acks.judge(
            acked, message.topic, sent_up_to=known, committed_at_start=self._committed_at_start
        )
        if accepted is None:
            if acks.alarm_pending:
                self._wake.set()
            return
        self._take_ack(accepted)

    def _take_ack(self, acked: int) -> None:
        self.acks_received += 1
        self.last_ack_ts = time.time()
        if acked > self._ack_target:
            self._ack_target = acked
            self._wake.set()

    def _on_central_status(self, message: Message) -> None:
        # A retained announcement, delivered because we (re)subscribed, tells who is online;
        # only a live one means a replica has just (re)started: resend what may have gone
        # nowhere.
        listened = self._central_listens()
        if self._presence.observe(message):
            self._central_back = True
            self._wake.set()
        elif self._central_listens() and not listened:
            self._wake.set()  # a retained "online": the whole window may go now

    def _window_now(self) -> int:
        """Batches that may be in flight now: the window while a central store listens; one
        (a probe) while none is known to, so that the outbox is not read and sent into a
        broker nobody reads (an ingest that announces itself, or an ack of the probe from one
        that does not, opens the window)."""
        return self._window if self._central_listens() else 1

    def _on_connection(self, up: bool) -> None:
        if up:
            self._reconnected = True
            self._quiet_since = time.monotonic()  # silence counts while connected
        else:
            self._lost_inflight = self._lost_inflight or bool(self._inflight)
        self._wake.set()

    def _on_puback(self, sent: _Sent, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, PublishRejected):
            # The broker refused this message (a PUBACK with a failure reason code).
            if exc.not_authorized:
                # Its ACL, not the size: a resend at once would be refused at once, in a loop.
                # The batch stays in flight and goes again after ack_timeout, as when a broker
                # drops a denied PUBLISH silently (MQTT 3.1.1). docs/install.md, "Broker ACL".
                self._report_not_authorized()
                return
            self._rejected = sent
            self._wake.set()

    def _report_not_authorized(self) -> None:
        if self._refusal_logged:
            return  # once until a batch gets through
        self._refusal_logged = True
        log.error(
            "forwarder: the broker refused S/sync on %s: Not authorized; its ACL must let this "
            "gateway's MQTT user write that topic (the user name is the gateway id, "
            'docs/install.md, "Broker ACL"); sending again every %gs',
            self.sync_topic,
            self._ack_timeout,
        )
