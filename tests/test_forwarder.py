"""sync.uplink.forwarder.Forwarder against a private mosquitto and a tiny fake central store that acks
the contiguous watermark by the coverage rule: order, outages, lost acks, size limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from sync.events import Event, parse_rfc3339, rfc3339
from sync.mqtt.client import MqttClient
from sync.outbox.store import Outbox
from sync.uplink.forwarder import MIN_BATCH_BYTES, Forwarder
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.pool import MosquittoFactory
from tests.fixtures.ports import async_wait_until

GATEWAY = "gw1"
PREFIX = "edge"


class FakeCentral:
    """The ingest's side of the contract in miniature (its own paho client and thread).

    Stores every event of every S/sync batch, keeps per stream the seqs covered by batches and
    answers each batch with S/ack = the highest seq such that every seq <= it is covered.
    """

    def __init__(self, broker: MosquittoBroker, *, present: bool = True) -> None:
        self.broker = broker
        # Announce itself online (retained) on entering and offline on leaving, as the ingest
        # does (docs/topics.md): the forwarder infers a size limit only while one listens.
        self.present = present
        self.lock = threading.Lock()
        self.events: dict[int, dict[str, Any]] = {}
        self.received: list[int] = []  # every seq received, duplicates included
        self.batches: list[tuple[int, int, int]] = []  # first_seq, last_seq, payload bytes
        self.covered: list[tuple[int, int]] = []  # ranges beyond the watermark
        self.watermark = 0
        self.stream: str | None = None
        self.errors: list[str] = []
        self.live: list[tuple[str, float]] = []
        self.mute = False  # store, but never ack
        self.drop_larger_than: int | None = None  # ignore such messages (a silent drop)
        self.silently_dropped = 0
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"central-{uuid.uuid4().hex[:8]}"
        )
        # paho annotates these as int but takes float: a fast reconnect after a broker restart.
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.2)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *_args: self.subscribed.set()

    def __enter__(self) -> FakeCentral:
        self.client.connect(self.broker.host, self.broker.port, keepalive=5)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise TimeoutError("fake central could not subscribe")
        if self.present:
            self.announce("online", retain=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.present:
            self.announce("offline", retain=True)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, *_args: Any) -> None:
        client.subscribe([(f"{PREFIX}/+/sync", 1), ("line/#", 1)])

    def _on_message(self, client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic.startswith("line/"):
            with self.lock:
                self.live.append((message.topic, time.monotonic()))
            return
        if self.drop_larger_than is not None and len(message.payload) > self.drop_larger_than:
            self.silently_dropped += 1
            return
        try:
            ack = self._store(message.topic, bytes(message.payload))
        except Exception as exc:  # recorded and checked by the tests
            self.errors.append(repr(exc))
            return
        if ack is not None and not self.mute:
            client.publish(f"{PREFIX}/{GATEWAY}/ack", json.dumps(ack), qos=1)

    def _store(self, topic: str, payload: bytes) -> dict[str, Any] | None:
        doc = json.loads(payload)
        assert topic == f"{PREFIX}/{GATEWAY}/sync", topic
        assert set(doc) == {"gateway", "stream", "first_seq", "last_seq", "events"}
        assert doc["gateway"] == GATEWAY
        first, last = doc["first_seq"], doc["last_seq"]
        seqs = [event["seq"] for event in doc["events"]]
        assert seqs, "empty batch"
        assert seqs == sorted(set(seqs)), "seqs not strictly increasing"
        with self.lock:
            if self.stream is None:
                self.stream = doc["stream"]
            assert doc["stream"] == self.stream
            self.batches.append((first, last, len(payload)))
            for event in doc["events"]:
                assert set(event) == {"seq", "ts", "kind", "device", "tag", "value", "quality"}
                assert event["ts"].endswith("Z")
                self.received.append(event["seq"])
                known = self.events.setdefault(event["seq"], event)
                assert known == event, "a seq came back with different content"
            # Coverage rule (docs/central.md): a batch covers its own range (exactly its
            # events, docs/topics.md) and every range its gap events declare dropped.
            assert seqs == list(range(first, last + 1)), "a batch claims a seq it lacks"
            self.covered.append((first, last))
            for event in doc["events"]:
                if event["kind"] == "gap":
                    self.covered.extend(tuple(r) for r in event["value"]["ranges"])
            self.covered.sort()
            while self.covered and self.covered[0][0] <= self.watermark + 1:
                self.watermark = max(self.watermark, self.covered.pop(0)[1])
            return {"stream": self.stream, "acked_seq": self.watermark}

    def announce(self, status: str = "online", *, retain: bool = False) -> None:
        """Publish this replica's presence as the ingest does on every (re)connect."""
        info = self.client.publish(
            f"{PREFIX}/_central/status/{self.client._client_id.decode()}",
            json.dumps({"ts": rfc3339(time.time()), "status": status}),
            1,
            retain,
        )
        info.wait_for_publish(5)

    def publish_ack(self, stream: str, acked_seq: int) -> None:
        """Send an ack as the central store would (e.g. for another stream)."""
        info = self.client.publish(
            f"{PREFIX}/{GATEWAY}/ack", json.dumps({"stream": stream, "acked_seq": acked_seq}), 1
        )
        info.wait_for_publish(5)

    def gap_declared(self) -> set[int]:
        """Seqs declared dropped by the gap events received."""
        with self.lock:
            return {
                seq
                for event in self.events.values()
                if event["kind"] == "gap"
                for first, last in event["value"]["ranges"]
                for seq in range(first, last + 1)
            }


def live_count_above(central: FakeCentral, count: int) -> bool:
    return len(central.live) > count


def events(start: int, count: int, size: int = 20) -> list[Event]:
    now = time.time()
    return [
        Event(now, "sample", "press1", f"t{(start + i) % 10}", f"{start + i:0{size}d}", "good")
        for i in range(count)
    ]


@contextlib.asynccontextmanager
async def forwarding(
    outbox: Outbox, broker: MosquittoBroker, **options: Any
) -> AsyncIterator[tuple[Forwarder, MqttClient]]:
    """An MqttClient and a running Forwarder; the forwarder's own failure fails the test."""
    async with MqttClient(
        host=broker.host,
        port=broker.port,
        client_id=f"edge-agent-{GATEWAY}",
        reconnect_min=0.05,
        reconnect_max=0.3,
    ) as client:
        forwarder = Forwarder(
            outbox=outbox, client=client, gateway_id=GATEWAY, sync_prefix=PREFIX, **options
        )
        task = asyncio.create_task(forwarder.run(), name="forwarder")
        try:
            yield forwarder, client
        finally:
            task.cancel()
            await asyncio.wait([task])
            if not task.cancelled():  # run() never returns and never swallows the cancellation
                raise AssertionError("the forwarder did not end cancelled") from task.exception()


async def all_acked(outbox: Outbox, central: FakeCentral, within: float = 15) -> None:
    await async_wait_until(
        lambda: (
            outbox.committed_seq > 0
            and outbox.acked_seq == outbox.committed_seq
            and outbox.events_count == 0
        ),
        timeout=within,
        message=f"every event acked (acked {outbox.acked_seq} of {outbox.committed_seq}, "
        f"central watermark {central.watermark})",
    )
    assert central.errors == []


def assert_complete(outbox: Outbox, central: FakeCentral) -> None:
    """Every seq of the stream reached the central store or is declared by a gap event."""
    with central.lock:
        received = set(central.events)
    assert central.stream == outbox.stream
    expected = set(range(1, outbox.committed_seq + 1))
    # (A dropped event may also have reached the central store before its ack came back.)
    assert received | central.gap_declared() == expected


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    # Acks are deleted lazily (ack_delay after the last one when nothing is appended):
    # shorter than the product's 2 s so that waiting for "everything deleted" stays quick.
    async with Outbox(
        tmp_path / "outbox.db", max_size=1 << 26, commit_interval=0.01, ack_delay=0.2
    ) as box:
        yield box


async def test_everything_is_acked_in_order(outbox: Outbox, mosquitto: MosquittoBroker) -> None:
    await outbox.append(events(0, 2000))
    with FakeCentral(mosquitto) as central:
        async with forwarding(outbox, mosquitto, batch_events=300, window=4) as (forwarder, _):
            for k in range(10):  # more while it runs
                await outbox.append(events(2000 + k * 100, 100))
            await all_acked(outbox, central)
    assert_complete(outbox, central)
    assert outbox.committed_seq == 3000
    # In order and tiled: each batch starts right after the previous one, the first at 1.
    firsts = [first for first, _, _ in central.batches]
    assert firsts[0] == 1
    for (_, last, _), (first, _, _) in zip(central.batches, central.batches[1:], strict=False):
        assert first == last + 1
    assert central.received == list(range(1, 3001))  # no duplicate without a fault
    assert max(last - first + 1 for first, last, _ in central.batches) <= 300
    assert forwarder.events_sent == 3000
    assert forwarder.batches_sent == len(central.batches)
    assert forwarder.batches_resent == 0
    assert forwarder.acks_received >= 1
    assert forwarder.last_ack_ts is not None
    event = central.events[1]
    assert event["kind"] == "sample"
    assert event["ts"] == rfc3339(parse_rfc3339(event["ts"]))


async def test_an_event_larger_than_max_bytes_goes_alone(
    outbox: Outbox, mosquitto: MosquittoBroker
) -> None:
    big = Event(time.time(), "workflow", "press1", None, {"log": "x" * 10_000}, None)
    await outbox.append([*events(0, 50), big, *events(51, 50)])
    with FakeCentral(mosquitto) as central:
        async with forwarding(outbox, mosquitto, max_bytes=4096):
            await all_acked(outbox, central)
    assert_complete(outbox, central)
    assert (51, 51) in [(first, last) for first, last, _ in central.batches]
    assert all(size <= 4096 for first, _, size in central.batches if first != 51)


async def test_broker_killed_mid_stream_loses_nothing(
    outbox: Outbox, mosquitto: MosquittoBroker
) -> None:
    with FakeCentral(mosquitto) as central:
        # What the forwarder resends right after its reconnect may reach the broker before the
        # central store has resubscribed (no persistent sessions here): the ack timeout covers it.
        options = {"batch_events": 200, "window": 8, "ack_timeout": 1.0}
        async with forwarding(outbox, mosquitto, **options) as (_, client):
            for k in range(10):
                await outbox.append(events(k * 100, 100))
            await async_wait_until(lambda: outbox.acked_seq >= 500, message="first acks")
            mosquitto.kill()
            await async_wait_until(lambda: not client.is_connected, message="loss noticed")
            for k in range(10, 30):  # the outbox keeps accepting while the broker is away
                await outbox.append(events(k * 100, 100))
            await mosquitto.arestart()
            await all_acked(outbox, central)
            assert client.stats.lost >= 1
    assert outbox.committed_seq == 3000
    assert_complete(outbox, central)


async def test_unacked_batches_are_resent_after_the_timeout(
    outbox: Outbox, mosquitto: MosquittoBroker
) -> None:
    with FakeCentral(mosquitto) as central:
        central.mute = True
        async with forwarding(outbox, mosquitto, ack_timeout=0.3) as (forwarder, client):
            await outbox.append(events(0, 100))
            await async_wait_until(
                lambda: central.received.count(1) >= 2, message="seq 1 sent again"
            )
            assert forwarder.batches_resent >= 1
            # The broker acknowledged every publish (PUBACK): nothing is deleted for that.
            await async_wait_until(lambda: client.stats.acked >= 2, message="PUBACKs")
            assert outbox.events_count == 100
            assert outbox.acked_seq == 0
            central.mute = False
            await all_acked(outbox, central)
    assert_complete(outbox, central)


async def test_broker_message_size_limit_is_adapted_to(
    tmp_path: Path, mosquitto_factory: MosquittoFactory
) -> None:
    # mosquitto 2.0 drops a too-large PUBLISH; to an MQTT 5 client it answers with a PUBACK
    # that paho cannot parse, so the connection drops. The forwarder sees stalls and halves.
    limit = 3000
    broker = mosquitto_factory(extra_config=[f"message_size_limit {limit}"])
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 24, commit_interval=0.01) as box:
        await box.append(events(0, 600, size=60))
        with FakeCentral(broker) as central:
            async with forwarding(box, broker, batch_events=1000) as (forwarder, _):
                await all_acked(box, central, within=30)
        assert_complete(box, central)
        assert forwarder.stalls_total >= 2
        assert forwarder.batch_bytes < 256 * 1024
        assert max(size for _, _, size in central.batches) <= limit


async def test_silently_dropped_batches_shrink_until_they_pass(
    outbox: Outbox, mosquitto: MosquittoBroker
) -> None:
    # Somewhere on the way (a bridge, a cluster node) messages above 3 KB vanish without
    # a word: only the ack timeout tells.
    await outbox.append(events(0, 2000, size=60))
    with FakeCentral(mosquitto) as central:
        central.drop_larger_than = 3000
        async with forwarding(outbox, mosquitto, ack_timeout=0.3) as (forwarder, _):
            await all_acked(outbox, central, within=30)
    assert central.silently_dropped >= 2
    assert forwarder.stalls_total >= 2
    # Growing back probed the limit once and then stayed below it (the ceiling).
    assert MIN_BATCH_BYTES <= forwarder.batch_bytes <= 3000
    assert forwarder.stalls_total <= 12
    assert_complete(outbox, central)


async def test_a_central_outage_does_not_shrink_batches(
    outbox: Outbox, mosquitto: MosquittoBroker
) -> None:
    with FakeCentral(mosquitto) as central:
        async with forwarding(outbox, mosquitto, ack_timeout=0.5) as (forwarder, _):
            await outbox.append(events(0, 1000))
            await async_wait_until(lambda: outbox.acked_seq == 1000, message="first acks")
            central.mute = True  # the ingest is down; batches of this size got through before
            await outbox.append(events(1000, 1000))
            await async_wait_until(lambda: forwarder.stalls_total >= 3, message="3 stalls")
            assert forwarder.batch_bytes == 256 * 1024
            central.mute = False
            await all_acked(outbox, central)
    assert_complete(outbox, central)


async def test_acks_for_another_stream_are_ignored(
    outbox: Outbox, mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.forwarder")
    with FakeCentral(mosquitto) as central:
        central.mute = True
        async with forwarding(outbox, mosquitto, ack_timeout=30) as (forwarder, _):
            await outbox.append(events(0, 100))
            await async_wait_until(lambda: len(central.received) >= 100, message="batch sent")
            old_stream = str(uuid.uuid4())  # e.g. the stream before a corruption recovery
            await asyncio.to_thread(central.publish_ack, old_stream, 100)
            await asyncio.to_thread(central.publish_ack, old_stream, 100)
            # Same publisher, same topic: ordered. Once this one is applied, the others were seen.
            await asyncio.to_thread(central.publish_ack, outbox.stream, 10)
            await async_wait_until(lambda: outbox.acked_seq == 10, message="our ack applied")
            await async_wait_until(lambda: outbox.events_count == 90, message="deleted")
            assert forwarder.acks_received == 1
    assert [r.message for r in caplog.records].count(
        f"forwarder: ignoring ack for stream {old_stream} (ours is {outbox.stream})"
    ) == 1


async def test_an_ack_beyond_what_was_sent_deletes_nothing(
    outbox: Outbox, mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # A forged (or buggy) ack: the stream in another spelling of the same UUID, and a seq far
    # beyond anything sent. It must not delete a single event (docs/delivery.md).
    caplog.set_level(logging.ERROR, logger="edge_agent.forwarder")
    with FakeCentral(mosquitto) as central:
        central.mute = True
        async with forwarding(outbox, mosquitto, ack_timeout=30) as (forwarder, _):
            await outbox.append(events(0, 100))
            await async_wait_until(lambda: len(central.received) >= 100, message="batch sent")
            spelled = f"urn:uuid:{{{outbox.stream.upper()}}}".replace("{", "").replace("}", "")
            await asyncio.to_thread(central.publish_ack, spelled, 10**9)
            await asyncio.to_thread(central.publish_ack, "{" + outbox.stream + "}", 10**9)
            # Ordered behind the forged ones: a true ack, in yet another spelling.
            await asyncio.to_thread(central.publish_ack, outbox.stream.upper(), 10)
            await async_wait_until(lambda: outbox.acked_seq == 10, message="true ack applied")
            assert outbox.committed_seq == 101  # the 100 events and the alarm event
            # Nothing but seqs 1..10 is deleted (lazily: with the next write or soon after).
            await async_wait_until(lambda: outbox.events_count == 91, message="deleted")
            figures = {figure.name: figure.value for figure in forwarder.figures()}
            assert figures["sync_acks_refused"] == 2
            assert forwarder.acks_received == 1
            await async_wait_until(
                lambda: any(e["kind"] == "alarm" for e in list(central.events.values())),
                message="the alarm event reached the central store",
            )
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # rate-limited: one line for the burst
    assert "nothing was deleted" in errors[0]


async def test_drops_while_the_central_is_away_are_declared(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    async with Outbox(tmp_path / "outbox.db", max_size=128 * 1024, commit_interval=0.005) as box:
        with FakeCentral(mosquitto) as central:
            central.mute = True
            async with forwarding(box, mosquitto, ack_timeout=0.5, batch_events=100):
                k = 0
                while box.dropped_total < 1000:
                    await box.append(events(k, 50, size=100))
                    k += 50
                central.mute = False
                await all_acked(box, central)
        assert_complete(box, central)
        assert box.dropped_total == len(central.gap_declared())


async def test_an_ack_for_the_end_of_a_hole_after_the_last_batch_is_applied(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    # The cap dropped the samples right after seq 1; the gap event that declares them goes
    # ahead of the batches, so the ingest's watermark passes the hole as soon as it has seq 1
    # and acknowledges a seq this process never sent. When the batch before a hole is the
    # last of a full window (here a window of one), refusing that ack stalled the stream for
    # good: every resend got the same ack.
    async with Outbox(tmp_path / "outbox.db", max_size=64 * 1024, commit_interval=0.005) as box:
        await box.append([Event(time.time(), "state", "press1", "state", 1)])
        k = 0
        while box.dropped_total < 200:
            await box.append(events(k, 50, size=100))
            k += 50
        with FakeCentral(mosquitto, present=False) as central:
            async with forwarding(box, mosquitto, window=1, ack_timeout=60.0) as (forwarder, _):
                await all_acked(box, central, within=20)
                figures = {figure.name: figure.value for figure in forwarder.figures()}
                assert figures["sync_acks_refused"] == 0
                assert figures["sync_acks_ignored"] == 0
                assert forwarder.stalls_total == 0  # not rescued by a resend
        assert_complete(box, central)


async def test_live_values_flow_while_a_backlog_drains(
    outbox: Outbox, mosquitto: MosquittoBroker
) -> None:
    for k in range(8):
        await outbox.append(events(k * 1000, 1000))
    with FakeCentral(mosquitto) as central:
        started = time.monotonic()
        async with forwarding(outbox, mosquitto, max_rate=4000) as (_, client):
            await client.wait_connected()
            await async_wait_until(lambda: outbox.acked_seq > 0, message="replay started")
            delays = []
            for i in range(10):
                sent = time.monotonic()
                await client.publish_acked(f"line/press1/t{i}", b'{"value":1}')
                await async_wait_until(partial(live_count_above, central, i), message="live")
                delays.append(central.live[i][1] - sent)
                backlog = outbox.events_count
                assert backlog > 0, "the backlog drained before the live values went out"
            await all_acked(outbox, central)
        drained = time.monotonic() - started
    # Live values did not queue behind 8,000 backlog events; the replay kept to its pace.
    assert max(delays) < 1.0
    assert drained >= 8000 / 4000 * 0.7
    assert_complete(outbox, central)


def test_arguments_are_validated() -> None:
    outbox = Outbox(Path("/nonexistent/outbox.db"), max_size=1 << 20)
    client = MqttClient(host="127.0.0.1", port=1, client_id="x")
    good: dict[str, Any] = {
        "outbox": outbox,
        "client": client,
        "gateway_id": GATEWAY,
        "sync_prefix": PREFIX,
    }
    Forwarder(**good)
    for key, value in (
        ("gateway_id", "a/b"),
        ("sync_prefix", "edge/#"),
        ("batch_events", 0),
        ("window", 0),
        ("ack_timeout", 0),
        ("max_rate", -1),
        ("max_bytes", 100),
    ):
        with pytest.raises(ValueError, match=key):
            Forwarder(**{**good, key: value})


async def test_batches_that_went_nowhere_are_resent_when_the_central_store_announces_itself(
    outbox: Outbox, mosquitto: MosquittoBroker
) -> None:
    # The broker restarted and the agent reconnected before any ingest subscribed: the window
    # went nowhere. Without the announcement this waits for the (here 300 s) ack timeout.
    async with forwarding(outbox, mosquitto, ack_timeout=300, window=2) as (forwarder, client):
        await outbox.append(events(0, 500))
        # The broker has it (PUBACK) and had no subscriber for it.
        await async_wait_until(lambda: client.stats.acked >= 1, message="batch at the broker")
        with FakeCentral(mosquitto, present=False) as central:
            assert central.received == []  # subscribed after the batch was published
            central.announce("offline")  # only "online" means the batches can arrive now
            central.announce("online")
            await all_acked(outbox, central, within=20)
    assert_complete(outbox, central)
    assert forwarder.stalls_total == 0  # a restart, not a stall (no batch size inference)
    assert forwarder.batches_resent >= 1


async def test_batches_leave_an_eighth_of_the_brokers_window_to_live_values(
    outbox: Outbox, mosquitto_factory: MosquittoFactory
) -> None:
    # mosquitto announces max_inflight_messages as its Receive Maximum: the client's window.
    broker = mosquitto_factory(extra_config=["max_inflight_messages 16"])
    with FakeCentral(broker) as central:
        async with forwarding(outbox, broker, batch_events=100) as (forwarder, client):
            async with asyncio.timeout(10):
                await client.wait_connected()
            assert client.window == 16
            await asyncio.to_thread(broker.pause)  # SIGSTOP: no PUBACK comes back
            try:
                for index in range(14):  # live values hold 14 slots; 2 stay free
                    client.publish(f"line/t{index}", b"1", qos=1, retain=True)
                await outbox.append(events(0, 500))
                # A negative: give the forwarder time to (wrongly) use the last 2 slots.
                await asyncio.sleep(0.5)
                assert client.stats.published == 14
                assert forwarder.batches_sent == 0
            finally:
                await asyncio.to_thread(broker.resume)
            await all_acked(outbox, central)
    assert_complete(outbox, central)


async def test_batches_fit_the_maximum_packet_size_the_broker_announces(
    tmp_path: Path, mosquitto_factory: MosquittoFactory
) -> None:
    # mosquitto announces max_packet_size in its MQTT 5 CONNACK: batches are cut to it from
    # the start, instead of being refused (or the connection dropped) and then halved.
    limit = 4096
    broker = mosquitto_factory(extra_config=[f"max_packet_size {limit}"])
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 24, commit_interval=0.01) as box:
        await box.append(events(0, 600, size=60))
        with FakeCentral(broker) as central:
            async with forwarding(box, broker, batch_events=1000) as (forwarder, _):
                await all_acked(box, central, within=30)
        assert_complete(box, central)
        assert forwarder.stalls_total == 0
        assert forwarder.batches_resent == 0
        topic = len(f"{PREFIX}/{GATEWAY}/sync")
        assert max(size for _, _, size in central.batches) + topic + 8 <= limit
