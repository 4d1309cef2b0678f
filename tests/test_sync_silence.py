"""When nothing acknowledges (issues #21, item 3, and #22): with no ingest running the forwarder
neither blames the broker's message size nor cuts batches, keeps one batch in flight, and its
resends back off until an ingest announces itself, which gets the window at once; after `warn_after` connected without an acknowledgement it says, once,
that no central store acknowledges and what to check; a stop does not wait for acks that cannot
come. docs/delivery.md, "When nothing acknowledges"."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from sync.mqtt.types import Message
from sync.outbox.store import Outbox
from sync.uplink.forwarder import DEFAULT_MAX_BYTES
from sync.uplink.presence import MAX_REPLICAS, CentralPresence
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import async_wait_until
from tests.test_forwarder import FakeCentral, all_acked, assert_complete, events, forwarding

ONLINE = b'{"ts":"2026-12-06T10:00:00Z","status":"online"}'
OFFLINE = b'{"ts":"2026-12-06T10:00:00Z","status":"offline"}'


def presence(replica: str, payload: bytes, *, retain: bool = False) -> Message:
    return Message(f"edge/_central/status/{replica}", payload, 1, retain)


@pytest.mark.parametrize(
    ("messages", "online", "heard", "announced_now"),
    [
        ([], [], False, None),
        ([presence("a", ONLINE, retain=True)], ["a"], True, False),
        ([presence("a", ONLINE)], ["a"], True, True),
        ([presence("a", ONLINE), presence("a", OFFLINE)], [], True, False),
        ([presence("a", ONLINE), presence("b", ONLINE)], ["a", "b"], True, True),
        # The retained announcement cleared: the replica is forgotten.
        ([presence("a", ONLINE, retain=True), presence("a", b"")], [], False, False),
        # Hostile or broken payloads change nothing.
        ([presence("a", b"{not json")], [], False, False),
        ([presence("a", b'["online"]')], [], False, False),
        ([presence("a", b'{"status":"maybe"}')], [], False, False),
        ([presence("a", b'{"status":1}')], [], False, False),
    ],
)
def test_presence(
    messages: list[Message], online: list[str], heard: bool, announced_now: bool | None
) -> None:
    central = CentralPresence()
    results = [central.observe(message) for message in messages]
    assert central.online == online
    assert central.heard is heard
    if announced_now is not None:
        assert results[-1] is announced_now


def test_presence_remembers_a_bounded_number_of_replicas() -> None:
    central = CentralPresence()
    for index in range(MAX_REPLICAS * 4):
        central.observe(presence(f"r{index}", ONLINE))
    assert len(central.online) == MAX_REPLICAS
    central.observe(presence("r0", OFFLINE))  # a known replica still updates
    assert "r0" not in central.online


async def test_no_ingest_cuts_nothing_says_so_once_and_a_stop_does_not_wait(
    tmp_path: Path, mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.forwarder")
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 26, commit_interval=0.01) as box:
        await box.append(events(0, 3000, size=60))  # batches far above MIN_BATCH_BYTES
        async with forwarding(box, mosquitto, ack_timeout=0.1, warn_after=1.0) as (forwarder, _):
            await async_wait_until(lambda: forwarder.stalls_total >= 3, message="3 stalls")
            await async_wait_until(lambda: bool(forwarder.problems()), message="the warning")
            (problem,) = forwarder.problems()
            assert problem.startswith("no central acknowledgement for ")
            assert problem.endswith(
                "is an ingest running on sync prefix 'edge'? (none announced itself on "
                "edge/_central/status/+)"
            )
            assert forwarder.batch_bytes == DEFAULT_MAX_BYTES  # nothing blamed on the size
            # A stop gives the forwarder a bounded drain: it returns at once, acks cannot come.
            async with asyncio.timeout(10):  # a guard against hanging, not a measure
                await forwarder.drain()
            assert box.acked_seq == 0
            # Resends back off while nobody listens: 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s ... instead
            # of one every 0.1 s (about 30 in these 3 s).
            await asyncio.sleep(3.0)  # the premise: a while with nobody listening
            assert forwarder.stalls_total <= 6
            # Nor is the outbox read into a broker nobody reads: one batch in flight (a probe
            # that an ingest without presence would acknowledge), sent once per stall.
            figures = {figure.name: figure.value for figure in forwarder.figures()}
            assert figures["sync_batches_in_flight"] == 1
            assert forwarder.batches_sent <= forwarder.stalls_total + 1
            # An ingest starts: it announces itself, the window goes at once (not after the
            # current backoff of seconds), and the log says so once.
            with FakeCentral(mosquitto) as central:
                await all_acked(box, central, within=5)
                assert forwarder.problems() == ()
        assert_complete(box, central)
    messages = [record.getMessage() for record in caplog.records]
    assert not [text for text in messages if "cut to" in text or "size limit" in text]
    warnings = [text for text in messages if "no central acknowledgement" in text]
    assert len(warnings) == 1, warnings
    assert [text for text in messages if "acknowledges again" in text]
    # The window went because the ingest announced itself, not because a backoff expired.
    assert "forwarder: resending from seq 1 (the central store is back online)" in messages


async def test_an_ingest_online_that_never_acks_points_at_the_broker(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 26, commit_interval=0.01) as box:
        await box.append(events(0, 10))
        with FakeCentral(mosquitto) as central:
            central.mute = True  # subscribed and online, but nothing comes back
            async with forwarding(box, mosquitto, ack_timeout=0.2, warn_after=0.5) as (
                forwarder,
                _,
            ):
                await async_wait_until(lambda: bool(forwarder.problems()), message="warning")
                (problem,) = forwarder.problems()
                replica = central.client._client_id.decode()
                assert f"although ingest {replica} is online" in problem
                assert "message size limit, ACL" in problem


async def test_the_warning_waits_for_a_connected_wait_not_an_idle_one(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    # Everything acked, then idle longer than warn_after: a new event starts a new wait.
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 26, commit_interval=0.01) as box:
        with FakeCentral(mosquitto) as central:
            # (A wait starts at the commit: a linger shorter than warn_after.)
            async with forwarding(box, mosquitto, warn_after=1.0, linger=0.2) as (forwarder, _):
                await box.append(events(0, 10))
                await all_acked(box, central)
                central.mute = True
                await asyncio.sleep(1.5)  # the premise: idle for longer than warn_after
                await box.append(events(10, 1))
                await async_wait_until(lambda: forwarder.batches_sent >= 2, message="sent")
                assert forwarder.problems() == ()  # not "no acknowledgement for 1.5 s"
                await async_wait_until(lambda: bool(forwarder.problems()), message="warning")


async def test_the_warning_stays_while_the_first_batch_lingers(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    # The wait is reported before the linger sends the first batch; that send does not start
    # a new wait (it did: /readyz answered 200 right after status said "degraded").
    async with (
        Outbox(tmp_path / "outbox.db", max_size=1 << 26, commit_interval=0.01) as box,
        forwarding(box, mosquitto, warn_after=0.3, linger=1.0) as (forwarder, _),
    ):
        await box.append(events(0, 10))
        await async_wait_until(lambda: bool(forwarder.problems()), message="the warning")
        assert forwarder.batches_sent == 0  # the premise: reported before the first send
        await async_wait_until(lambda: forwarder.batches_sent >= 1, message="sent")
        assert forwarder.problems() != ()
