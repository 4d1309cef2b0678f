"""OPC UA device and tag config (pure): endpoints, security, node ids, subscription keys."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from drivers.config import (
    DeviceConfigBase,
    Duration,
    Problem,
    TagConfigBase,
    as_written,
    redact_url,
)

SecurityPolicy = Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
SecurityMode = Literal["None", "Sign", "SignAndEncrypt"]

# ns=2;s=Filler.State | i=2258 | ns=3;g=<guid> | ns=1;b=<base64> | nsu=urn:...;s=Name
_NODE_ID = re.compile(
    r"^(?:(?:ns=\d{1,5}|nsu=[^;]+);)?"
    r"(?:i=\d{1,10}|s=.+|g=[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}"
    r"-[0-9A-Fa-f]{12}|b=[A-Za-z0-9+/=]+)$"
)


def check_node_id(text: str) -> str:
    """Validate an OPC UA NodeId string such as ``ns=2;s=Filler.State``."""
    if not _NODE_ID.fullmatch(text):
        raise ValueError(
            f"invalid node id {text!r}; write e.g. 'ns=2;s=Filler.State', 'i=2258' "
            "or 'ns=3;g=<guid>'"
        )
    return text


class OpcUaTagConfig(TagConfigBase):
    """One OPC UA variable: its node, and whether it is subscribed or polled."""

    node_id: str = Field(
        description="NodeId of the variable.", examples=["ns=2;s=Filler.State", "i=2258"]
    )
    mode: Literal["subscribe", "poll"] = Field(
        default="subscribe",
        description="subscribe: a monitored item (the server reports changes); poll: read "
        "every poll_interval in one batched Read.",
    )
    sampling_interval: Duration = Field(
        default=as_written("100ms"),
        ge=0,
        description="How often the server samples the value (subscribe mode).",
    )
    queue_size: int = Field(
        default=10,
        ge=1,
        le=10000,
        description="Server-side queue of the monitored item; the oldest value is discarded "
        "when it overflows.",
    )

    @field_validator("node_id")
    @classmethod
    def _check_node_id(cls, value: str) -> str:
        return check_node_id(value)


class OpcUaDeviceConfig(DeviceConfigBase):
    """An OPC UA server (a PLC or an OPC UA gateway)."""

    driver: Literal["opcua"] = Field(description="Protocol driver.")
    url: str = Field(
        description="Endpoint URL, opc.tcp://HOST:PORT[/PATH]; no user:password@ (set "
        "username and password_file).",
        examples=["opc.tcp://192.168.10.12:4840"],
    )
    security_policy: SecurityPolicy = Field(
        default="None", description="Security policy of the secure channel."
    )
    security_mode: SecurityMode = Field(
        default="None", description="Message security mode; Sign or SignAndEncrypt need a policy."
    )
    certificate: Path | None = Field(
        default=None,
        description="The agent's client certificate (DER or PEM). With private_key; created "
        "self-signed on first start when both files are absent. Default: "
        "{data_dir}/pki/agent-cert.der.",
    )
    private_key: Path | None = Field(
        default=None,
        description="The agent's private key (PEM). Default: {data_dir}/pki/agent-key.pem.",
    )
    server_certificate: Path | None = Field(
        default=None,
        description="The server's certificate; required for Sign/SignAndEncrypt. The agent "
        "refuses a server whose certificate differs.",
    )
    username: str | None = Field(default=None, description="User name token; unset: anonymous.")
    password: SecretStr | None = Field(default=None, description="Password (prefer password_file).")
    password_file: Path | None = Field(
        default=None,
        description="File holding the password; a relative path is looked up in "
        "$CREDENTIALS_DIRECTORY (systemd LoadCredential=) when set.",
    )
    publishing_interval: Duration = Field(
        default=as_written("500ms"),
        gt=0,
        description="Publishing interval of the device's subscription.",
    )
    session_timeout: Duration = Field(
        default=as_written("60s"), gt=0, description="Requested session timeout."
    )
    tags: tuple[OpcUaTagConfig, ...] = Field(default=(), description="The device's values.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        shown = redact_url(value)  # never echo a password (docs/install.md, "Secrets")
        parts = urlsplit(value)
        if parts.scheme != "opc.tcp" or not parts.hostname:
            raise ValueError(f"{shown!r}: write an endpoint as 'opc.tcp://HOST:PORT'")
        if "@" in parts.netloc:
            # asyncua would log in with them, bypassing username/password_file.
            raise ValueError(
                f"{shown!r}: credentials do not belong in the URL; set username and password_file"
            )
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"{shown!r}: invalid port") from exc
        return value

    def tag_list(self) -> tuple[TagConfigBase, ...]:
        """The device's tags."""
        return self.tags

    def problems(self) -> Iterator[Problem]:
        """Cross-field problems of this device (locations relative to the device)."""
        yield from super().problems()
        if self.security_mode != "None" and self.security_policy == "None":
            yield (
                ("security_policy",),
                f"security_mode {self.security_mode} needs a policy other than None",
            )
        if self.security_mode == "None" and self.security_policy != "None":
            yield (
                ("security_mode",),
                f"security_policy {self.security_policy} needs mode Sign or SignAndEncrypt",
            )
        if self.security_mode != "None" and self.server_certificate is None:
            yield (
                ("server_certificate",),
                "required with security_mode "
                f"{self.security_mode}: the agent never trusts a certificate it was not given",
            )
        if (self.certificate is None) != (self.private_key is None):
            yield (("certificate",), "certificate and private_key go together")
        if (self.password is not None or self.password_file is not None) and not self.username:
            yield (("username",), "required when a password is given")

    def warnings(self) -> Iterator[Problem]:
        """A password on a channel that neither signs nor encrypts."""
        if self.security_mode == "None" and (
            self.password is not None or self.password_file is not None
        ):
            # OPC 10000-4 7.41: the password is encrypted only when the server's user token
            # policy names a security policy; many servers offer None on a None endpoint.
            yield (
                ("security_mode",),
                "with security_mode None the password can cross the network in cleartext; "
                "use SignAndEncrypt",
            )
