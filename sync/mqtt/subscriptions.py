"""The client's subscriptions: sent on every connection, answered by SUBACK/UNSUBACK, and the
handlers incoming messages go to.

Every subscription's state on the current connection is kept: asked, granted, or refused with
the broker's reason. A gateway that cannot subscribe to its ack or command topic is not ready
(docs/mqtt.md, "Failures and backoff"), and whoever needs a subscription active before it says
"ready" can wait for its SUBACK.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sync.mqtt import wire
from sync.mqtt.connection import Connection
from sync.mqtt.types import Message, MessageHandler

log = logging.getLogger("edge_agent.mqtt")

SHARE_PREFIX = "$share/"


@dataclass(frozen=True, slots=True)
class Subscription:
    """A topic filter, its QoS and the handler of its messages."""

    topic: str
    qos: int
    handler: MessageHandler
    no_local: bool = False
    retain_as_published: bool = False


def check_topic_filter(topic: str) -> str:
    """The filter messages are matched against (without a `$share/{group}/` prefix); raises
    ValueError for a filter the broker would refuse (spec 4.7, 4.8.2)."""
    if topic.startswith(SHARE_PREFIX):
        group, slash, topic = topic[len(SHARE_PREFIX) :].partition("/")
        if not group or "+" in group or "#" in group or not slash or not topic:
            raise ValueError(
                f"invalid shared subscription {SHARE_PREFIX}{group}{slash}{topic!s}: "
                "write $share/GROUP/FILTER"
            )
    if not topic or "\x00" in topic:
        raise ValueError(f"invalid topic filter {topic!r}")
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"invalid topic filter {topic!r}: '#' must be a whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"invalid topic filter {topic!r}: '+' must be a whole level")
    return topic


class Subscriptions:
    """The subscriptions of one client, kept across reconnects (every connection starts clean)."""

    def __init__(self, *, name: str) -> None:
        self._name = name
        self._subscriptions: list[Subscription] = []
        self._matching: dict[str, str] = {}  # filter as subscribed -> filter messages match
        # On the current connection: filters the broker granted, and refused (with why).
        self._granted: dict[str, asyncio.Event] = {}
        self.refused: dict[str, str] = {}

    def add(self, subscription: Subscription) -> None:
        """Keep `subscription` for this and every later connection (ValueError: bad filter)."""
        self._matching[subscription.topic] = check_topic_filter(subscription.topic)
        self._subscriptions.append(subscription)
        self._granted.setdefault(subscription.topic, asyncio.Event())

    def remove(self, topic: str) -> None:
        """Forget every subscription to the filter `topic`."""
        self._subscriptions = [sub for sub in self._subscriptions if sub.topic != topic]
        self._matching.pop(topic, None)
        self._granted.pop(topic, None)
        self.refused.pop(topic, None)

    def is_granted(self, topic: str) -> bool:
        """Whether the broker granted the subscription to `topic` on this connection."""
        granted = self._granted.get(topic)
        return granted is not None and granted.is_set()

    async def wait_granted(self, topic: str) -> None:
        """Wait until the broker granted the subscription to `topic` (KeyError: unknown)."""
        await self._granted[topic].wait()

    # -- requests -----------------------------------------------------------------------------

    def subscribe(
        self, connection: Connection, subscription: Subscription, *, shared_allowed: bool
    ) -> None:
        """Send SUBSCRIBE for one subscription."""
        topic = subscription.topic
        self._granted[topic].clear()
        if topic.startswith(SHARE_PREFIX) and not shared_allowed:
            self._refuse(topic, "the broker does not support shared subscriptions")
            return
        mid = connection.new_mid()
        connection.requests[mid] = topic
        connection.write(
            wire.encode_subscribe(
                mid,
                topic,
                subscription.qos,
                no_local=subscription.no_local,
                v5=connection.v5,
                retain_as_published=subscription.retain_as_published,
            )
        )

    def subscribe_all(self, connection: Connection, *, shared_allowed: bool) -> None:
        """Send SUBSCRIBE for every subscription (a new connection knows none of them)."""
        for subscription in self._subscriptions:
            self.subscribe(connection, subscription, shared_allowed=shared_allowed)

    def connection_lost(self) -> None:
        """The connection is gone, and with it every subscription it had."""
        for granted in self._granted.values():
            granted.clear()

    def unsubscribe(self, connection: Connection, topic: str) -> None:
        """Send UNSUBSCRIBE for the filter `topic`."""
        mid = connection.new_mid()
        connection.requests[mid] = topic
        connection.write(wire.encode_unsubscribe(mid, topic, v5=connection.v5))

    # -- answers and messages -----------------------------------------------------------------

    def on_suback(self, connection: Connection, body: memoryview) -> None:
        """SUBACK: the subscription is granted, or refused with the broker's reason (logged;
        the client keeps running without it)."""
        if len(body) < 3:
            raise wire.MalformedPacket("SUBACK too short")
        mid = (body[0] << 8) | body[1]
        pos = 2
        v5 = connection.v5
        reason_string = None
        if v5:
            properties, pos = wire.parse_properties(body, pos, len(body))
            detail = properties.get(wire.REASON_STRING)
            reason_string = detail if isinstance(detail, str) and detail else None
        topic = connection.requests.pop(mid, None)
        codes = bytes(body[pos:])
        if topic is None or len(codes) != 1:
            # One filter per SUBSCRIBE is all this client sends (spec 3.9.3: one code each).
            raise wire.ProtocolError(f"SUBACK for packet identifier {mid} that was not asked")
        code = codes[0]
        if code >= 0x80:
            reason = wire.reason_name(code) if v5 else "Failure"
            if reason_string:
                reason = f"{reason} ({reason_string})"
            self._refuse(topic, reason)
        elif topic in self._granted:
            self._granted[topic].set()
            if self.refused.pop(topic, None) is not None:
                log.info(
                    "%s: the broker granted the subscription to %s (recovered)", self._name, topic
                )

    def on_unsuback(self, connection: Connection, body: memoryview) -> None:
        """UNSUBACK: the packet identifier is free again; a refusal is logged (MQTT 5)."""
        if len(body) < 2:
            raise wire.MalformedPacket("UNSUBACK too short")
        topic = connection.requests.pop((body[0] << 8) | body[1], "?")
        if not connection.v5:
            return
        _, pos = wire.parse_properties(body, 2, len(body))
        for code in bytes(body[pos:]):
            if code >= 0x80:
                log.warning(
                    "%s: the broker refused to unsubscribe from %s: %s",
                    self._name,
                    topic,
                    wire.reason_name(code),
                )

    def _refuse(self, topic: str, reason: str) -> None:
        if self.refused.get(topic) != reason:
            log.warning(
                "%s: the broker refused the subscription to %s: %s", self._name, topic, reason
            )
        self.refused[topic] = reason

    def deliver(self, message: Message) -> None:
        """Call the handler of every subscription whose filter matches the message's topic."""
        for subscription in self._subscriptions:
            if wire.topic_matches(self._matching[subscription.topic], message.topic):
                try:
                    subscription.handler(message)
                except Exception:  # one broken handler must not break the connection
                    log.exception("%s: handler for %s failed", self._name, subscription.topic)
