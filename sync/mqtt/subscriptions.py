"""The client's subscriptions: sent on every connection, answered by SUBACK/UNSUBACK, and the
handlers incoming messages go to."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sync.mqtt import wire
from sync.mqtt.connection import Connection
from sync.mqtt.types import Message, MessageHandler

log = logging.getLogger("edge_agent.mqtt")


@dataclass(frozen=True, slots=True)
class Subscription:
    """A topic filter, its QoS and the handler of its messages."""

    topic: str
    qos: int
    handler: MessageHandler
    no_local: bool = False
    retain_as_published: bool = False


class Subscriptions:
    """The subscriptions of one client, kept across reconnects (every connection starts clean)."""

    def __init__(self, *, name: str) -> None:
        self._name = name
        self._subscriptions: list[Subscription] = []

    def add(self, subscription: Subscription) -> None:
        """Keep `subscription` for this and every later connection."""
        self._subscriptions.append(subscription)

    def remove(self, topic: str) -> None:
        """Forget every subscription to the filter `topic`."""
        self._subscriptions = [sub for sub in self._subscriptions if sub.topic != topic]

    # -- requests -----------------------------------------------------------------------------

    def subscribe(self, connection: Connection, subscription: Subscription) -> None:
        """Send SUBSCRIBE for one subscription."""
        mid = connection.new_mid()
        connection.requests[mid] = subscription.topic
        connection.write(
            wire.encode_subscribe(
                mid,
                subscription.topic,
                subscription.qos,
                no_local=subscription.no_local,
                v5=connection.v5,
                retain_as_published=subscription.retain_as_published,
            )
        )

    def subscribe_all(self, connection: Connection) -> None:
        """Send SUBSCRIBE for every subscription (a new connection knows none of them)."""
        for subscription in self._subscriptions:
            self.subscribe(connection, subscription)

    def unsubscribe(self, connection: Connection, topic: str) -> None:
        """Send UNSUBSCRIBE for the filter `topic`."""
        mid = connection.new_mid()
        connection.requests[mid] = topic
        connection.write(wire.encode_unsubscribe(mid, topic, v5=connection.v5))

    # -- answers and messages -----------------------------------------------------------------

    def on_suback(self, connection: Connection, body: memoryview) -> None:
        """SUBACK: log every filter the broker refused (the client keeps running without it)."""
        if len(body) < 3:
            raise wire.MalformedPacket("SUBACK too short")
        mid = (body[0] << 8) | body[1]
        pos = 2
        v5 = connection.v5
        if v5:
            _, pos = wire.parse_properties(body, pos, len(body))
        topic = connection.requests.pop(mid, "?")
        for code in bytes(body[pos:]):
            if code >= 0x80:
                log.warning(
                    "%s: the broker refused the subscription to %s: %s",
                    self._name,
                    topic,
                    wire.reason_name(code, v5=True) if v5 else "Failure",
                )

    def on_unsuback(self, connection: Connection, body: memoryview) -> None:
        """UNSUBACK: the packet identifier is free again."""
        if len(body) >= 2:
            connection.requests.pop((body[0] << 8) | body[1], None)

    def deliver(self, message: Message) -> None:
        """Call the handler of every subscription whose filter matches the message's topic."""
        for subscription in self._subscriptions:
            if wire.topic_matches(_strip_share(subscription.topic), message.topic):
                try:
                    subscription.handler(message)
                except Exception:  # one broken handler must not break the connection
                    log.exception("%s: handler for %s failed", self._name, subscription.topic)


def _strip_share(topic: str) -> str:
    # "$share/group/a/b" delivers messages whose topic is "a/b".
    if topic.startswith("$share/"):
        return topic.split("/", 2)[2]
    return topic
