"""Every refusal of the broker is visible (issue #19): a PUBACK with a failure reason counted
per reason and logged once per topic prefix per minute (live values have no future, and used
to vanish as "acked"), a SUBACK failure kept per filter (the gateway's /readyz lists it, see
tests/test_broker_acl.py), an UNSUBACK failure logged; topic filters checked before they are
sent (`$share/g` without a filter made every incoming PUBLISH raise IndexError)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from sync.mqtt import wire
from sync.mqtt.client import Message, MqttClient, PublishRejected
from sync.mqtt.subscriptions import check_topic_filter
from tests.fixtures.daemon import config_text, running, settings_for
from tests.fixtures.fake_broker import CONNACK_V5, ScriptedBroker
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import async_wait_until, free_port


@contextlib.asynccontextmanager
async def connected(broker: ScriptedBroker) -> AsyncIterator[MqttClient]:
    """A client connected to the fake broker on a free port."""
    server = await asyncio.start_server(broker.handle, "127.0.0.1", 0)
    broker.port = server.sockets[0].getsockname()[1]
    client = MqttClient(host="127.0.0.1", port=broker.port, client_id="r", reconnect_min=0.05)
    async with server, client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        yield client


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_refused_live_values_are_counted_per_reason_and_logged_per_prefix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    # 0x97 Quota exceeded; "S": the durable path's batches
    reasons = {"press1": wire.NOT_AUTHORIZED, "oven1": 0x97, "S": wire.NOT_AUTHORIZED}

    def puback_reason(topic: str) -> int:
        return next((code for device, code in reasons.items() if f"/{device}/" in topic), 0)

    broker = ScriptedBroker(puback_reason=puback_reason)
    async with connected(broker) as client:
        for index in range(5):  # as the live publisher sends them: no future
            client.publish(f"gw/R/press1/tag{index}", b"1", retain=True)
        client.publish("gw/R/oven1/temp", b"2", retain=True)
        client.publish("gw/R/filler/level", b"3", retain=True)
        future = client.publish_acked("gw/S/sync", b"batch")  # its owner reports it
        with pytest.raises(PublishRejected):
            await asyncio.wait_for(future, 5)
        async with asyncio.timeout(5):
            await client.wait_acked()
        assert client.stats.publish_refused == {wire.NOT_AUTHORIZED: 6, 0x97: 1}
        assert client.stats.acked == 1  # filler's value: a refusal is no acknowledgement
    assert warnings(caplog) == [
        "mqtt: the broker refused the message to gw/R/press1/tag0: Not authorized (0x87)",
        "mqtt: the broker refused the message to gw/R/oven1/temp: Quota exceeded (0x97)",
    ]


async def test_the_refusal_log_reports_what_it_held_back_a_minute_later(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    clock = [1000.0]
    monkeypatch.setattr("sync.mqtt.refusals.time.monotonic", lambda: clock[0])
    broker = ScriptedBroker(puback_reason=lambda topic: wire.NOT_AUTHORIZED)
    async with connected(broker) as client:
        for index in range(4):
            client.publish(f"gw/R/press1/t{index}", b"1")
        async with asyncio.timeout(5):
            await client.wait_acked()
        clock[0] += 60.0
        client.publish("gw/R/press1/t9", b"1")
        async with asyncio.timeout(5):
            await client.wait_acked()
    assert warnings(caplog) == [
        "mqtt: the broker refused the message to gw/R/press1/t0: Not authorized (0x87)",
        "mqtt: the broker refused the message to gw/R/press1/t9: Not authorized (0x87) "
        "(3 more under gw/R/press1/ since the last report)",
    ]


async def test_a_refused_subscription_is_kept_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    broker = ScriptedBroker(suback_code=wire.NOT_AUTHORIZED)
    async with connected(broker) as client:
        client.subscribe("edge/gw/ack", lambda message: None)
        await async_wait_until(lambda: bool(client.refused_subscriptions))
        assert client.refused_subscriptions == {"edge/gw/ack": "Not authorized"}
        assert not client.is_subscribed("edge/gw/ack")
        connection = client._connection
        assert connection is not None
        connection.abort()  # refused again on the next connection: not logged again
        await async_wait_until(lambda: len(broker.sessions) == 2 and client.is_connected)
        await async_wait_until(lambda: len(broker.sessions[1].packets) >= 1)
    assert (
        warnings(caplog).count(
            "mqtt: the broker refused the subscription to edge/gw/ack: Not authorized"
        )
        == 1
    )


async def test_a_granted_subscription_can_be_waited_for() -> None:
    broker = ScriptedBroker()
    async with connected(broker) as client:
        client.subscribe("cmd/#", lambda message: None)
        async with asyncio.timeout(5):
            await client.wait_subscribed("cmd/#")
        assert client.is_subscribed("cmd/#")
        assert client.refused_subscriptions == {}
        at_loss: list[bool] = []
        client.add_listener(lambda up: at_loss.append(client.is_subscribed("cmd/#")))
        connection = client._connection
        assert connection is not None
        connection.abort()
        await async_wait_until(lambda: len(at_loss) >= 2)  # lost, then connected again
        assert at_loss[:2] == [False, False]  # until the new connection's SUBACK
        async with asyncio.timeout(5):
            await client.wait_subscribed("cmd/#")


async def test_an_unsuback_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(CONNACK_V5)
        while data := await reader.read(1024):
            if data[0] == 0xA2:  # UNSUBSCRIBE: refused, 0x87 Not authorized
                writer.write(b"\xb0\x04" + data[2:4] + b"\x00\x87")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, MqttClient(host="127.0.0.1", port=port, client_id="u") as client:
        async with asyncio.timeout(5):
            await client.wait_connected()
        client.unsubscribe("cmd/#")
        await async_wait_until(lambda: bool(warnings(caplog)))
    assert warnings(caplog) == [
        "mqtt: the broker refused to unsubscribe from cmd/#: Not authorized"
    ]


@pytest.mark.parametrize(
    ("topic", "error"),
    [
        ("$share/g", "invalid shared subscription $share/g: write $share/GROUP/FILTER"),
        ("$share/g/", "invalid shared subscription $share/g/: write $share/GROUP/FILTER"),
        ("$share//a", "invalid shared subscription $share//a: write $share/GROUP/FILTER"),
        ("$share/g+/a", "invalid shared subscription $share/g+/a: write $share/GROUP/FILTER"),
        ("", "invalid topic filter ''"),
        ("a/#/b", "invalid topic filter 'a/#/b': '#' must be a whole last level"),
        ("a/b#", "invalid topic filter 'a/b#': '#' must be a whole last level"),
        ("a/b+/c", "invalid topic filter 'a/b+/c': '+' must be a whole level"),
        ("a/\x00", "invalid topic filter 'a/\\x00'"),
    ],
)
def test_a_bad_topic_filter_is_refused_before_it_is_sent(topic: str, error: str) -> None:
    client = MqttClient(host="127.0.0.1", port=1, client_id="f")
    with pytest.raises(ValueError, match=f"^{re.escape(error)}$"):
        client.subscribe(topic, lambda message: None)


@pytest.mark.parametrize(
    ("topic", "matches"),
    [
        ("$share/ingest/edge/+/sync", "edge/+/sync"),
        ("edge/+/sync", "edge/+/sync"),
        ("#", "#"),
        ("$SYS/#", "$SYS/#"),
    ],
)
def test_the_filter_messages_match(topic: str, matches: str) -> None:
    assert check_topic_filter(topic) == matches


async def test_a_shared_subscription_delivers_its_filters_messages() -> None:
    received: list[Message] = []
    publish = b"\x30\x0e\x00\x0bedge/g/sync\x00"  # QoS 0 PUBLISH to edge/g/sync, no payload
    broker = ScriptedBroker(lambda index: (publish,))
    async with connected(broker) as client:
        client.subscribe("$share/ingest/edge/+/sync", received.append)
        await async_wait_until(lambda: bool(received))
        assert client.is_connected
    assert [m.topic for m in received] == ["edge/g/sync"]


async def test_shared_subscriptions_a_broker_does_not_support_are_not_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    # CONNACK with Shared Subscription Available = 0 (MQTT 5, 3.2.2.3.13)
    broker = ScriptedBroker(connack=b"\x20\x05\x00\x00\x02\x2a\x00")
    async with connected(broker) as client:
        client.subscribe("$share/ingest/edge/+/sync", lambda message: None)
        assert client.refused_subscriptions == {
            "$share/ingest/edge/+/sync": "the broker does not support shared subscriptions"
        }
    assert not [kind for kind, _ in broker.sessions[0].packets if kind == 0x82]


@dataclass(frozen=True)
class BrokerAddress:
    """What tests.fixtures.daemon.config_text reads of a broker."""

    url: str


async def test_a_gateway_whose_subscriptions_are_refused_is_not_ready(tmp_path: Path) -> None:
    # mosquitto's acl_file grants every SUBSCRIBE and filters at delivery; EMQX, HiveMQ and
    # mosquitto's dynamic-security plugin answer SUBACK 0x87, as this broker does.
    broker = ScriptedBroker(suback_code=wire.NOT_AUTHORIZED)
    server = await asyncio.start_server(broker.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    address = cast(MosquittoBroker, BrokerAddress(f"mqtt://127.0.0.1:{port}"))
    text = config_text(address, tmp_path / "data", [("press1", free_port())])
    async with server, running(settings_for(tmp_path, text)) as runtime:
        gateway = runtime.gateway
        assert gateway is not None
        await async_wait_until(lambda: len(gateway.mqtt.refused_subscriptions) == 3)
        problems = runtime.readiness_problems()
    assert sorted(problems) == [
        f"the broker refused the subscription to {topic}: Not authorized"
        for topic in sorted(
            [
                "edge/plant1-line3/ack",
                "edge/_central/status/+",
                "plant1/assembly/line3/_cmd/+",
            ]
        )
    ]
