"""sync.uplink.live.LivePublisher: newest value per topic, first-offer order, the in-flight window,
a connection lost mid-flush, and a real broker seeing every topic once and in order."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sync.mqtt.client import (
    ConnectionListener,
    MessageTooLarge,
    MqttClient,
    NotConnected,
    bulk_reserve,
)
from sync.uplink.live import LivePublisher
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.mqtt_client import MqttTestClient


class WindowedLink:
    """Stands in for MqttClient (the project's own class): a window of `space` publishes, a
    link that is lost once `fail_at` were published, and a record of what was sent."""

    def __init__(
        self,
        *,
        space: int = 1000,
        fail_at: int | None = None,
        window: int | None = None,
        max_payload: int | None = None,
    ) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.max_payload = max_payload  # the broker's Maximum Packet Size, as payload bytes
        self.space = space
        self.window = space if window is None else window
        self.fail_at = fail_at
        self.is_connected = True
        self.listeners: list[ConnectionListener] = []
        self._room = asyncio.Event()

    def add_listener(self, listener: ConnectionListener) -> None:
        self.listeners.append(listener)

    @property
    def free_slots(self) -> int:
        return self.space

    @property
    def bulk_room(self) -> int:
        return max(0, self.space - bulk_reserve(self.window))  # the client's own rule

    async def wait_bulk_room(self) -> None:
        while self.bulk_room == 0:
            self._room.clear()
            await self._room.wait()

    def ack(self, count: int) -> None:
        self.space += count
        self._room.set()

    async def wait_acked(self) -> None:
        return None

    def publish_many(
        self, messages: list[tuple[str, bytes]], *, retain: bool
    ) -> list[tuple[str, MessageTooLarge]]:
        assert retain
        assert len(messages) <= self.bulk_room, "a batch never takes the reserve"
        if self.fail_at is not None and len(self.sent) >= self.fail_at:
            self.is_connected = False
            raise NotConnected("connection lost")
        too_large = []
        for topic, payload in messages:
            if self.max_payload is not None and len(payload) > self.max_payload:
                error = MessageTooLarge(f"{len(payload)} bytes, more than the broker's maximum")
                too_large.append((topic, error))
                continue
            self.space -= 1
            self.sent.append((topic, payload))
        return too_large

    def reconnect(self) -> None:
        self.is_connected, self.fail_at = True, None
        for listener in self.listeners:
            listener(True)


def publisher(link: WindowedLink) -> LivePublisher:
    return LivePublisher(link, topic_root="site/a/l")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("offers", "sent"),
    [
        ([], []),
        ([("a", b"1")], [("a", b"1")]),
        ([("a", b"1"), ("b", b"1"), ("c", b"1")], [("a", b"1"), ("b", b"1"), ("c", b"1")]),
        # A topic offered again before the flush keeps its place and goes out once, newest.
        ([("a", b"1"), ("b", b"1"), ("a", b"2")], [("a", b"2"), ("b", b"1")]),
        ([("a", b"1"), ("a", b"2"), ("a", b"3")], [("a", b"3")]),
        # An empty payload (the tag was removed) deletes the retained value: it is sent too.
        ([("a", b"1"), ("a", b"")], [("a", b"")]),
    ],
)
async def test_flush_sends_the_newest_payload_once_in_first_offer_order(
    offers: list[tuple[str, bytes]], sent: list[tuple[str, bytes]]
) -> None:
    link = WindowedLink()
    live = publisher(link)
    for topic, payload in offers:
        live.offer(topic, payload)
    await live.drain()
    assert link.sent == sent
    assert live.pending == 0


async def test_a_full_window_waits_and_later_offers_join_the_flush() -> None:
    link = WindowedLink(space=2, window=2)
    live = publisher(link)
    for topic in "abcd":
        live.offer(topic, b"1")
    flush = asyncio.create_task(live.drain())
    await asyncio.sleep(0)
    assert [topic for topic, _ in link.sent] == ["a", "b"]
    live.offer("c", b"2")  # still pending: newest payload, same place
    live.offer("e", b"1")
    link.ack(10)
    await asyncio.wait_for(flush, 5)
    assert link.sent == [("a", b"1"), ("b", b"1"), ("c", b"2"), ("d", b"1"), ("e", b"1")]


@pytest.mark.parametrize(
    ("window", "used"), [(1, 1), (7, 7), (8, 7), (10, 9), (20, 18), (1000, 875)]
)
async def test_live_values_leave_an_eighth_of_the_window_to_the_durable_path(
    window: int, used: int
) -> None:
    link = WindowedLink(space=window)
    live = publisher(link)
    for index in range(2 * window):
        live.offer(f"t/{index}", b"1")
    flush = asyncio.create_task(live.drain())
    for _ in range(10):  # the flush yields every 256 publishes
        await asyncio.sleep(0)
    assert len(link.sent) == used
    assert link.free_slots == window - used
    link.ack(1)  # one more goes out, the reserve stays free
    await asyncio.sleep(0)
    assert len(link.sent) == used + 1
    assert link.free_slots == window - used
    link.ack(2 * window)
    await asyncio.wait_for(flush, 5)
    assert len(link.sent) == 2 * window


async def test_a_connection_lost_mid_flush_keeps_the_rest_in_order() -> None:
    link = WindowedLink(space=2, window=2, fail_at=2)
    live = publisher(link)
    for topic in "abcde":
        live.offer(topic, b"1")
    flush = asyncio.create_task(live.drain())
    await asyncio.sleep(0)
    assert [topic for topic, _ in link.sent] == ["a", "b"]  # the window is full
    link.ack(2)  # the next batch (c, d) finds the connection lost
    await asyncio.wait_for(flush, 5)
    assert live.pending == 3  # c and d (refused) and e wait for the connection, in order
    live.offer("d", b"2")
    link.is_connected, link.fail_at = True, None  # back, before the listener has run
    link.ack(3)
    await live.drain()
    assert link.sent[2:] == [("c", b"1"), ("d", b"2"), ("e", b"1")]


async def test_a_reconnect_publishes_every_topic_again() -> None:
    link = WindowedLink()
    live = publisher(link)
    for topic in "abcde":
        live.offer(topic, b"1")
    live.offer("b", b"2")
    await live.drain()
    link.reconnect()
    await live.drain()
    assert link.sent[5:] == [("a", b"1"), ("b", b"2"), ("c", b"1"), ("d", b"1"), ("e", b"1")]


async def test_every_topic_reaches_a_real_broker_once_and_in_order(
    mosquitto: MosquittoBroker,
) -> None:
    topics = [
        f"site/a/l/plc/Tag.{index:05d}" for index in range(900)
    ]  # under the broker queue (1,000)
    with MqttTestClient.for_broker(mosquitto) as subscriber:
        subscriber.subscribe("site/a/l/#")
        async with MqttClient(
            host=mosquitto.host, port=mosquitto.port, client_id="live-test", max_inflight=50
        ) as client:
            async with asyncio.timeout(10):
                await client.wait_connected()
            live = LivePublisher(client, topic_root="site/a/l")
            for topic in topics:
                live.offer(topic, b"old")
            for topic in topics[::3]:
                live.offer(topic, b"new")
            async with asyncio.timeout(30):
                await live.drain()
        received = [subscriber.wait_for_message(timeout=10) for _ in topics]
    assert [message.topic for message in received] == topics
    assert [message.payload for message in received] == [
        b"new" if index % 3 == 0 else b"old" for index in range(len(topics))
    ]
    assert subscriber.messages.empty()


async def test_a_value_too_large_for_the_broker_is_dropped_once_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.live")
    link = WindowedLink(max_payload=100)
    live = publisher(link)
    live.offer("a", b"1")
    live.offer("big", b"x" * 500)
    live.offer("c", b"3")
    await live.drain()
    assert link.sent == [("a", b"1"), ("c", b"3")]  # the others go on
    live.offer("big", b"y" * 500)
    await live.drain()
    assert live.dropped_too_large == 2
    assert live.pending == 0
    figures = {figure.name: figure.value for figure in live.figures()}
    assert figures["live_dropped_too_large"] == 2
    assert len(caplog.records) == 1  # logged once per topic
    assert "big not published" in caplog.records[0].getMessage()
