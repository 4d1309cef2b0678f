"""The values the MQTT client hands out and takes: messages, Will/birth, TLS options, counters."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

MessageHandler = Callable[["Message"], None]
ConnectionListener = Callable[[bool], None]
# `auto`: MQTT 5, and 3.1.1 when the broker does not speak 5 (docs/mqtt.md, "MQTT 3.1.1").
ProtocolChoice = Literal["auto", "5", "3.1.1"]
PROTOCOL_CHOICES: tuple[ProtocolChoice, ...] = ("auto", "5", "3.1.1")


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
    """TLS for mqtts://: CA bundle (None: system CAs), client certificate for mutual TLS (its
    key's passphrase, if any), and the ALPN protocols to offer (e.g. AWS IoT Core on 443)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: str | None = field(default=None, repr=False)
    alpn: tuple[str, ...] = ()

    def context(self) -> ssl.SSLContext:
        """Build the verifying client context (hostname checked, TLS >= 1.2)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            try:
                # Always a callable: without one OpenSSL asks for an encrypted key's
                # passphrase on the terminal, which a service under systemd does not have.
                context.load_cert_chain(self.cert_file, self.key_file, password=self._passphrase)
            except ssl.SSLError as exc:
                key = self.key_file or self.cert_file
                if self.key_password is not None:
                    raise ValueError(f"{key}: the key's password is wrong ({exc.reason})") from None
                raise ValueError(
                    f"{key}: not a usable certificate and key ({exc.reason})"
                ) from None
        if self.alpn:
            context.set_alpn_protocols(list(self.alpn))
        return context

    def _passphrase(self) -> str:
        if self.key_password is None:
            key = self.key_file or self.cert_file
            raise ValueError(f"{key}: the key is encrypted; set key_password_file")
        return self.key_password


@dataclass(slots=True)
class MqttStats:
    """Counters for metrics."""

    published: int = 0
    acked: int = 0
    connects: int = 0
    connect_failures: int = 0
    lost: int = 0
    refused_packets: int = 0  # connections closed on a malformed or oversized incoming packet
    # PUBACKs with a failure reason code, per reason code (MQTT 5 only: 3.1.1 has none).
    publish_refused: dict[int, int] = field(default_factory=dict)
    takeovers: int = 0  # connections closed because another client took our client id
