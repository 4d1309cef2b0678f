"""The MQTT client of either program, from its `[mqtt]` connection keys."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pydantic import SecretStr

from sync.mqtt.client import MqttClient, ProtocolChoice, TlsOptions, Will


class ConnectionKeys(Protocol):
    """The `[mqtt]` keys both programs share (agent.settings.common.TlsClientConfig)."""

    @property
    def host(self) -> str:
        """Broker host."""
        ...

    @property
    def port(self) -> int:
        """Broker port."""
        ...

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS."""
        ...

    @property
    def username(self) -> str | None:
        """User name; None: anonymous."""
        ...

    @property
    def password(self) -> SecretStr | None:
        """Password (read from password_file at load)."""
        ...

    @property
    def ca_file(self) -> Path | None:
        """CA bundle for TLS."""
        ...

    @property
    def cert_file(self) -> Path | None:
        """Client certificate (mutual TLS)."""
        ...

    @property
    def key_file(self) -> Path | None:
        """Client key (mutual TLS)."""
        ...

    @property
    def key_password(self) -> SecretStr | None:
        """Passphrase of the client key (read from key_password_file at load)."""
        ...

    @property
    def alpn(self) -> tuple[str, ...]:
        """ALPN protocols offered in the TLS handshake."""
        ...

    @property
    def protocol(self) -> ProtocolChoice:
        """MQTT version: auto, 5 or 3.1.1."""
        ...

    @property
    def keepalive(self) -> float:
        """Keep-alive interval, seconds."""
        ...

    @property
    def max_packet_size(self) -> int:
        """Largest packet taken from the broker, bytes."""
        ...


def mqtt_client(
    keys: ConnectionKeys, *, client_id: str, name: str, will: Will, birth: Will | None = None
) -> MqttClient:
    """An MQTT client for these connection keys (not started)."""
    tls = (
        TlsOptions(
            ca_file=str(keys.ca_file) if keys.ca_file else None,
            cert_file=str(keys.cert_file) if keys.cert_file else None,
            key_file=str(keys.key_file) if keys.key_file else None,
            key_password=keys.key_password.get_secret_value() if keys.key_password else None,
            alpn=keys.alpn,
        )
        if keys.tls
        else None
    )
    return MqttClient(
        host=keys.host,
        port=keys.port,
        client_id=client_id,
        username=keys.username,
        password=keys.password.get_secret_value() if keys.password else None,
        tls=tls,
        keepalive=keys.keepalive,
        protocol=keys.protocol,
        max_packet_size=keys.max_packet_size,
        will=will,
        birth=birth,
        name=name,
    )
