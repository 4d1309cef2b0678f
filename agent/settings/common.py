"""Config pieces both programs share: identifiers, topic and listen-address checks, the MQTT
connection keys, the HTTP endpoint."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from drivers.config import (
    ByteSize,
    ConfigModel,
    Duration,
    Problem,
    as_written,
    redact_url,
)

ENV_PREFIX = "EDGE_AGENT__"
GATEWAY_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
TAG_REF_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}/[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
# Each field that holds one names its own example (docs/configuration.md).
TagRef = Annotated[str, Field(pattern=TAG_REF_PATTERN)]
# Topic levels we generate must never contain MQTT wildcards or empty levels.
_TOPIC = re.compile(r"^[^/+#\s]+(/[^/+#\s]+)*$")


def check_topic(value: str) -> str:
    """Validate a topic prefix: levels separated by '/', no wildcards, no empty level."""
    if not _TOPIC.fullmatch(value):
        raise ValueError(
            f"invalid topic {value!r}: levels separated by '/', no '+', '#', spaces, "
            "leading/trailing '/' or empty levels"
        )
    return value


def check_listen(value: str) -> str:
    """Validate ``HOST:PORT`` (``[::1]:9108`` for IPv6)."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", value)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"{value!r}: write HOST:PORT, e.g. '127.0.0.1:9108'")
    return value


class TlsClientConfig(ConfigModel):
    """MQTT connection keys shared by the agent and the ingest."""

    url: str = Field(
        description="Broker URL, mqtt://HOST[:1883] or mqtts://HOST[:8883] (TLS); no "
        "user:password@ (set username and password_file).",
        examples=["mqtts://broker.plant.local:8883"],
    )
    username: str | None = Field(default=None, description="User name; unset: anonymous.")
    password: SecretStr | None = Field(default=None, description="Prefer password_file.")
    password_file: Path | None = Field(
        default=None,
        description="File holding the password; a relative path is looked up in "
        "$CREDENTIALS_DIRECTORY (systemd LoadCredential=) when set, else next to the config.",
    )
    ca_file: Path | None = Field(
        default=None, description="CA bundle to verify the broker (mqtts); unset: system CAs."
    )
    cert_file: Path | None = Field(
        default=None, description="Client certificate for mutual TLS (with key_file)."
    )
    key_file: Path | None = Field(default=None, description="Client key for mutual TLS.")
    key_password: SecretStr | None = Field(
        default=None, description="Passphrase of an encrypted key_file; prefer key_password_file."
    )
    key_password_file: Path | None = Field(
        default=None,
        description="File holding key_file's passphrase (looked up like password_file); an "
        "encrypted key without it is refused at start, never prompted for.",
    )
    alpn: tuple[str, ...] = Field(
        default=(),
        description="ALPN protocols offered in the TLS handshake, e.g. ['x-amzn-mqtt-ca'] for "
        "AWS IoT Core on port 443 (docs/mqtt.md, 'TLS, ALPN and port 443').",
        examples=[["x-amzn-mqtt-ca"]],
    )
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto",
        description="MQTT version: 'auto' tries 5 and falls back to 3.1.1 when the broker does "
        "not speak 5 (the log says which); '5' or '3.1.1' to insist (docs/mqtt.md, 'MQTT 3.1.1').",
    )
    client_id: str | None = Field(
        default=None,
        max_length=128,
        description="MQTT client id; default 'edge-agent-{gateway.id}' (ingest: random).",
    )
    keepalive: Duration = Field(
        default=as_written("30s"), ge=5, description="MQTT keep-alive interval."
    )
    # The agent receives commands (at most 16 KiB, docs/workflows.md), S/ack and status
    # messages: 2 MiB leaves room for a larger command (up to a mebibyte and a bit) to be
    # refused with a reply, and bounds what one packet may cost (a 200 MiB command once took
    # the agent to 743 MB).
    max_packet_size: ByteSize = Field(
        default=as_written("2MiB"),
        ge=64 * 1024,
        le=256 * 1024 * 1024,
        description="Largest MQTT packet taken from the broker (announced in CONNECT as the "
        "MQTT 5 Maximum Packet Size: the broker drops a larger message for this client; on "
        "MQTT 3.1.1, or from a broker that sends it anyway, the connection is closed and "
        "re-established).",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        shown = redact_url(value)  # never echo a password (docs/install.md, "Secrets")
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"{shown!r}: scheme must be mqtt:// or mqtts://")
        if "@" in parts.netloc:
            # The URL is printed in logs and by `edge-agent check`; the password must not be.
            raise ValueError(
                f"{shown!r}: credentials do not belong in the URL; set username and password_file"
            )
        if not parts.hostname:
            raise ValueError(f"{shown!r}: missing broker host")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"{shown!r}: invalid port") from exc
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"{shown!r}: a broker URL takes only host and port")
        return value

    @property
    def host(self) -> str:
        """Broker host name."""
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """Broker port (1883 for mqtt, 8883 for mqtts by default)."""
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS."""
        return urlsplit(self.url).scheme == "mqtts"

    def problems(self) -> Iterator[Problem]:
        """Cross-field problems of the connection keys."""
        if (self.cert_file is None) != (self.key_file is None):
            yield (("cert_file",), "cert_file and key_file go together (mutual TLS)")
        if not self.tls:
            for key in ("ca_file", "cert_file", "key_file"):
                if getattr(self, key) is not None:
                    yield ((key,), "TLS files need an mqtts:// url")
            if self.alpn:
                yield (("alpn",), "ALPN is part of TLS: it needs an mqtts:// url")
        if self.key_password is not None and self.key_file is None:
            yield (("key_password",), "a key passphrase needs key_file")
        for index, protocol in enumerate(self.alpn):
            if not 0 < len(protocol.encode()) < 256:
                yield (("alpn", index), "an ALPN protocol name is 1..255 bytes")
        if self.password is not None and not self.username:
            yield (("username",), "required when a password is given")

    def warnings(self) -> Iterator[Problem]:
        """A password sent where anyone on the network can read it."""
        if self.password is not None and not self.tls:
            yield (
                ("url",),
                "the password goes to the broker in cleartext over mqtt://; use mqtts://",
            )


class HttpConfig(ConfigModel):
    """Health and metrics endpoint, and the agent's status page (docs/page.md)."""

    listen: str = Field(
        default="127.0.0.1:9108",
        description="HOST:PORT of the status page at / and of /healthz /readyz /status "
        "/metrics; an address other than loopback needs token_file.",
    )
    enabled: bool = Field(default=True, description="Serve the endpoint at all.")
    token: SecretStr | None = Field(default=None, description="Prefer token_file.")
    token_file: Path | None = Field(
        default=None,
        description="File holding the access token of the page and /status (HTTP basic auth "
        "password, any user name, or 'Authorization: Bearer TOKEN'); required when listen is "
        "not loopback; looked up like mqtt.password_file (docs/page.md, 'Access').",
    )
    metrics_open: bool = Field(
        default=True,
        description="Serve /metrics without the token (for scrapers); /healthz and /readyz "
        "are always open.",
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        return check_listen(value)

    @property
    def host(self) -> str:
        """The address to bind (an IPv6 address without its brackets)."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The port to bind."""
        return int(self.listen.rpartition(":")[2])

    @property
    def loopback(self) -> bool:
        """Whether `listen` is a loopback address (only this machine can connect)."""
        return is_loopback(self.host)

    def problems(self) -> Iterator[Problem]:
        """An endpoint reachable from the network without credentials."""
        if self.enabled and not self.loopback and self.token is None and self.token_file is None:
            yield (
                ("listen",),
                f"{self.listen} is reachable from the network: set token_file "
                "(docs/page.md, 'Access')",
            )


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is loopback; a name other than localhost is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SettingsFile(BaseSettings):
    """A whole config file: pydantic checks its structure, `problems()` what spans fields."""

    # Unknown keys are errors, a loaded config is immutable, EDGE_AGENT__SECTION__KEY overrides
    # (each program's model adds its title).
    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
    )

    # A file's model, not a settings reader: the loader reads the environment itself (and
    # names the variable of a problem). BaseSettings.__init__, which pydantic would call on
    # every validation, reads os.environ again whatever environment the loader was given, and
    # re-validates everything in lax mode, which turned "1" into 1 even when strict mode was
    # asked for (agent/settings/validation.py).
    __init__ = BaseModel.__init__

    # What `problems()` checks beyond each section's own checks, for the line that says they
    # wait while the file has errors (agent/settings/validation.py); "" when nothing.
    CROSS_SECTION_CHECKS: ClassVar[str] = ""

    @classmethod
    def completed(cls, data: Any) -> Any:
        """The file's data with the defaults that derive from other keys filled in (the
        loader calls it before validation)."""
        return data

    def problems(self) -> Iterator[Problem]:
        """Every cross-field problem, with locations from the file's root."""
        return iter(())

    def warnings(self) -> Iterator[Problem]:
        """What is allowed but unsafe, with locations from the file's root (never refuses)."""
        return iter(())
