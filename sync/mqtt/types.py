"""The values the MQTT client hands out and takes: messages, Will/birth, TLS options, counters."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass

MessageHandler = Callable[["Message"], None]
ConnectionListener = Callable[[bool], None]


@dataclass(frozen=True, slots=True)
class Message:
    """An incoming message.

    `retain`: the RETAIN flag as delivered; see `MqttClient.subscribe` for when a broker sets
    it. `user_properties`: the MQTT 5 User Property pairs of the PUBLISH, in order; whoever
    published the message chose them, the broker does not vouch for them.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    user_properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Will:
    """The Last Will: published by the broker when the connection dies without DISCONNECT."""

    topic: str
    payload: Callable[[], bytes]
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS for mqtts://: CA bundle (None: system CAs), client certificate for mutual TLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        """Build the verifying client context (hostname checked, TLS >= 1.2)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


@dataclass(slots=True)
class MqttStats:
    """Counters for metrics."""

    published: int = 0
    acked: int = 0
    received: int = 0
    connects: int = 0
    connect_failures: int = 0
    lost: int = 0
    refused_packets: int = 0  # connections closed on a malformed or oversized incoming packet
