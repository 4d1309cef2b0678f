"""The MQTT client against mosquitto for issue #18: Maximum Packet Size both ways, the RETAIN
flag of live deliveries (Retain-As-Published), User Properties of incoming messages, and the
`[mqtt] max_packet_size` key of both programs."""

from __future__ import annotations

import asyncio
import logging

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.central.settings import IngestMqttConfig
from agent.service.mqtt import mqtt_client
from agent.settings.gateway import MqttConfig
from sync.mqtt import wire
from sync.mqtt.client import (
    Message,
    MessageTooLarge,
    MqttClient,
    ProtocolChoice,
    PublishRejected,
    Will,
)
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.mqtt_client import MqttTestClient
from tests.fixtures.pool import MosquittoFactory
from tests.fixtures.ports import async_wait_until


def client_for(broker: MosquittoBroker, **options: object) -> MqttClient:
    settings: dict[str, object] = {
        "host": broker.host,
        "port": broker.port,
        "client_id": "limits",
        "reconnect_min": 0.05,
        "reconnect_max": 0.5,
        **options,
    }
    return MqttClient(**settings)  # type: ignore[arg-type]


async def subscribed(client: MqttClient, prefix: str, received: list[Message]) -> None:
    """Wait until the subscription to `prefix`/# is active: our own probe comes back."""

    async def probe_back() -> bool:
        client.publish(f"{prefix}/probe", b"?", qos=0)
        await asyncio.sleep(0.02)
        return any(message.topic == f"{prefix}/probe" for message in received)

    await async_wait_until(probe_back, timeout=10, message=f"subscription to {prefix}/#")


async def test_a_message_over_the_brokers_maximum_is_refused_before_sending(
    mosquitto_factory: MosquittoFactory,
) -> None:
    broker = mosquitto_factory(extra_config=["max_packet_size 1024"])
    async with client_for(broker) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        assert client.broker_max_packet_size == 1024
        fits = max(n for n in range(1024) if wire.publish_size(len("big/x"), n, 1, True) <= 1024)
        await asyncio.wait_for(client.publish_acked("big/x", b"f" * fits), 5)
        with pytest.raises(MessageTooLarge, match=r"of 1025 bytes .* Maximum Packet Size \(1024"):
            client.publish("big/x", b"f" * (fits + 1))
        future = client.publish_acked("big/x", b"f" * (fits + 1))
        with pytest.raises(PublishRejected, match="1025 bytes"):
            await future  # reported like the broker's own refusal (the forwarder cuts batches)
        assert isinstance(future.exception(), MessageTooLarge)
        await asyncio.wait_for(client.publish_acked("big/y", b"small"), 5)
        assert client.is_connected
        assert client.stats.lost == 0  # mosquitto would have disconnected us for 1,025 bytes


async def test_without_a_broker_maximum_there_is_none(mosquitto: MosquittoBroker) -> None:
    async with client_for(mosquitto) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        assert client.broker_max_packet_size is None
    async with client_for(mosquitto, protocol="3.1.1") as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        assert client.broker_max_packet_size is None


async def test_mosquitto_drops_what_is_over_our_announced_maximum(
    mosquitto: MosquittoBroker,
) -> None:
    # MQTT 5: the broker knows our limit from CONNECT and never sends more (3.1.2.11.4).
    received: list[Message] = []
    async with client_for(mosquitto, max_packet_size=1024) as client:
        client.subscribe("in/#", received.append)
        async with asyncio.timeout(10):
            await client.wait_connected()
        await subscribed(client, "in", received)
        with MqttTestClient.for_broker(mosquitto, protocol=mqtt.MQTTv5) as peer:
            await asyncio.to_thread(peer.publish, "in/big", b"b" * 2000)
            await asyncio.to_thread(peer.publish, "in/small", b"s")
        await async_wait_until(lambda: any(m.topic == "in/small" for m in received), timeout=10)
        assert not any(message.topic == "in/big" for message in received)
        assert client.stats.lost == 0


async def test_on_mqtt_311_an_oversized_message_closes_the_connection_and_we_reconnect(
    mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # 3.1.1 cannot announce a maximum: mosquitto sends it, the client refuses it on its
    # fixed header, closes, logs one line and reconnects.
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    received: list[Message] = []
    async with client_for(mosquitto, protocol="3.1.1", max_packet_size=1024) as client:
        client.subscribe("in/#", received.append)
        async with asyncio.timeout(10):
            await client.wait_connected()
        await subscribed(client, "in", received)
        with MqttTestClient.for_broker(mosquitto) as peer:
            await asyncio.to_thread(peer.publish, "in/big", b"b" * 2000)
            await async_wait_until(lambda: client.stats.refused_packets == 1, timeout=10)
            async with asyncio.timeout(10):
                await client.wait_connected()
            await subscribed(client, "in", received)
            await asyncio.to_thread(peer.publish, "in/small", b"s")
        await async_wait_until(lambda: any(m.topic == "in/small" for m in received), timeout=10)
        assert not any(message.topic == "in/big" for message in received)
    lines = [r.getMessage() for r in caplog.records if "lost:" in r.getMessage()]
    size = wire.publish_size(len("in/big"), 2000, 1, False)
    assert lines == [
        f"mqtt: connection to {mosquitto.host}:{mosquitto.port} lost: packet of {size} bytes "
        "from the broker is larger than max_packet_size (1024 bytes)"
    ]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_retain_as_published_keeps_the_flag_of_a_live_retained_message(
    mosquitto: MosquittoBroker, protocol: ProtocolChoice
) -> None:
    # Brokers clear RETAIN on live delivery (spec 3.3.1.3) unless the subscription asks for
    # Retain-As-Published; MQTT 3.1.1 has no such option, so there it stays cleared.
    kept: list[Message] = []
    cleared: list[Message] = []
    async with client_for(mosquitto, protocol=protocol) as client:
        client.subscribe("kept/#", kept.append, retain_as_published=True)
        client.subscribe("cleared/#", cleared.append)
        async with asyncio.timeout(10):
            await client.wait_connected()
        await subscribed(client, "kept", kept)
        await subscribed(client, "cleared", cleared)
        with MqttTestClient.for_broker(mosquitto) as peer:
            for topic in ("kept/cmd", "cleared/cmd"):
                await asyncio.to_thread(peer.client.publish, topic, b"run", 1, True)
        await async_wait_until(
            lambda: (
                any(m.topic == "kept/cmd" for m in kept)
                and any(m.topic == "cleared/cmd" for m in cleared)
            ),
            timeout=10,
        )
        [live_kept] = [m for m in kept if m.topic == "kept/cmd"]
        [live_cleared] = [m for m in cleared if m.topic == "cleared/cmd"]
        assert live_kept.retain is (protocol == "5")
        assert live_cleared.retain is False
        # A new subscription gets the stored copy, with RETAIN set, on either version.
        stored: list[Message] = []
        client.subscribe("cleared/cmd", stored.append)
        await async_wait_until(lambda: bool(stored), timeout=10, message="stored copy")
        assert stored[0].retain is True


async def test_user_properties_of_an_incoming_message(mosquitto: MosquittoBroker) -> None:
    received: list[Message] = []
    async with client_for(mosquitto) as client:
        client.subscribe("cmd/#", received.append)
        async with asyncio.timeout(10):
            await client.wait_connected()
        await subscribed(client, "cmd", received)
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [("sender", "operator-7"), ("role", "shift lead"), ("x", "é")]
        with MqttTestClient.for_broker(mosquitto, protocol=mqtt.MQTTv5) as peer:
            info = peer.client.publish("cmd/start", b"{}", qos=1, properties=properties)
            await asyncio.to_thread(info.wait_for_publish, 5)
        await async_wait_until(lambda: any(m.topic == "cmd/start" for m in received), timeout=10)
        [message] = [m for m in received if m.topic == "cmd/start"]
        assert message.user_properties == (
            ("sender", "operator-7"),
            ("role", "shift lead"),
            ("x", "é"),
        )
        probe = next(m for m in received if m.topic == "cmd/probe")
        assert probe.user_properties == ()


def test_max_packet_size_is_validated() -> None:
    for bad in (0, 255, wire.MAX_PACKET_SIZE + 1):
        with pytest.raises(ValueError, match="max_packet_size"):
            MqttClient(host="h", port=1883, client_id="x", max_packet_size=bad)
    assert MqttClient(host="h", port=1883, client_id="x").max_packet_size == wire.MAX_PACKET_SIZE


def test_the_programs_max_packet_size_key() -> None:
    agent = MqttConfig.model_validate({"url": "mqtt://broker"})
    ingest = IngestMqttConfig.model_validate({"url": "mqtt://broker"})
    assert agent.max_packet_size == 2 << 20
    assert ingest.max_packet_size == 16 << 20
    will = Will("t/status", lambda: b"offline")
    client = mqtt_client(agent, client_id="gw", name="mqtt", will=will)
    assert client.max_packet_size == 2 << 20
    set_small = MqttConfig.model_validate({"url": "mqtt://broker", "max_packet_size": "64KiB"})
    assert mqtt_client(set_small, client_id="gw", name="mqtt", will=will).max_packet_size == 65536
    with pytest.raises(ValueError, match="max_packet_size"):
        MqttConfig.model_validate({"url": "mqtt://broker", "max_packet_size": "1KiB"})


@pytest.mark.parametrize(
    ("extra", "will_retained", "will_qos", "sent_qos", "sent_retain"),
    [
        # The Will (retained, QoS 1) is refused with 0x9A, then sent again not retained.
        (["retain_available false"], False, 1, 1, False),
        # The Will's QoS 1 is refused with 0x9B, then sent again at QoS 0.
        (["max_qos 0"], True, 0, 0, True),
        (["max_qos 1"], True, 1, 1, True),
    ],
    ids=["retain_available-false", "max_qos-0", "max_qos-1"],
)
async def test_mosquittos_limits_are_honoured_and_the_will_follows_them(
    mosquitto_factory: MosquittoFactory,
    extra: list[str],
    will_retained: bool,
    will_qos: int,
    sent_qos: int,
    sent_retain: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: the CONNECT was refused forever for its Will ("Retain not supported" / "QoS not
    # supported"), or, where accepted, a retained or QoS 1 publish got the client dropped.
    caplog.set_level(logging.INFO, logger="edge_agent.mqtt")
    broker = mosquitto_factory(extra_config=extra)
    will = Will("lim/status", lambda: b"offline", qos=1, retain=True)
    seen: list[Message] = []
    # The watchers are our own clients: paho's QoS 1 would be refused by `max_qos 0` too.
    async with client_for(broker, client_id="watcher") as watcher:
        watcher.subscribe("lim/#", seen.append)
        async with asyncio.timeout(10):
            await watcher.wait_subscribed("lim/#")
        async with client_for(broker, will=will) as client:
            async with asyncio.timeout(10):
                await client.wait_connected()
            assert client.protocol_version == "5"
            for index in range(20):  # live values: retained QoS 1, fire and forget
                client.publish(f"lim/R/press1/t{index}", b"1", qos=1, retain=True)
            await asyncio.wait_for(
                client.publish_acked("lim/R/_agent/status", b"on", retain=True), 10
            )
            await async_wait_until(lambda: len(seen) == 21, timeout=10)
            assert {(m.qos, m.retain) for m in seen} == {(sent_qos, False)}
            assert client.stats.lost == 0
            assert client.stats.publish_refused == {}
            connection = client._connection
            assert connection is not None
            connection.abort()  # no DISCONNECT: the broker publishes the Will
            await async_wait_until(lambda: seen[-1].topic == "lim/status", timeout=10)
            assert seen[-1].payload == b"offline"
            assert seen[-1].qos == min(will_qos, sent_qos)
    stored: list[Message] = []
    async with client_for(broker, client_id="late") as late:  # what the broker stored
        late.subscribe("lim/#", stored.append)
        async with asyncio.timeout(10):
            await late.wait_subscribed("lim/#")
        # A barrier: mosquitto sends the stored messages before anything published later.
        late.publish("lim/marker", b"m", qos=1)  # QoS 1: queued behind the stored ones
        await async_wait_until(lambda: any(m.topic == "lim/marker" for m in stored), timeout=10)
    topics = {m.topic for m in stored}
    assert len(topics & {f"lim/R/press1/t{index}" for index in range(20)}) == (
        20 if sent_retain else 0
    )
    assert ("lim/status" in topics) is will_retained
    assert "cannot connect" not in caplog.text


async def test_a_batch_goes_out_through_the_brokers_window_in_order(
    mosquitto_factory: MosquittoFactory,
) -> None:
    # mosquitto announces Receive Maximum 20 (its max_inflight_messages) and a Maximum Packet
    # Size: a batch of 100 leaves 20 in flight and queues the rest in order, the one message
    # too large for the broker is handed back, and every other one arrives once, in order.
    broker = mosquitto_factory(extra_config=["max_inflight_messages 20", "max_packet_size 1024"])
    received: list[Message] = []
    async with client_for(broker) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        client.subscribe("batch/#", received.append)
        await subscribed(client, "batch", received)
        messages = [(f"batch/{index:03d}", f"{index}".encode()) for index in range(100)]
        messages[50] = ("batch/050", b"x" * 2000)
        assert client.window == 20
        acked_before = client.stats.acked
        too_large = client.publish_many(messages, retain=True)
        assert [(topic, type(exc)) for topic, exc in too_large] == [("batch/050", MessageTooLarge)]
        assert client.free_slots == 20 - 99  # 20 in flight, 79 queued
        assert client.bulk_room == 0
        assert not client.has_bulk_room
        async with asyncio.timeout(10):
            await client.wait_acked()

        def received_batch() -> list[Message]:
            return [message for message in received if message.topic != "batch/probe"]

        await async_wait_until(lambda: len(received_batch()) >= 99, timeout=10, message="99")
        assert client.bulk_room == 20 - 2  # an eighth of the window stays for the others
        assert client.stats.acked - acked_before == 99
        assert client.is_connected
        assert client.stats.lost == 0
    expected = [(topic, payload) for topic, payload in messages if topic != "batch/050"]
    assert [(message.topic, message.payload) for message in received_batch()] == expected
