"""The agent's `[gateway]`, `[mqtt]` and `[buffer]` sections."""

from __future__ import annotations

from pathlib import Path

from pydantic import (
    Field,
    field_validator,
)

from agent.settings.common import GATEWAY_ID_PATTERN, TlsClientConfig, check_topic
from drivers.config import (
    ByteSize,
    ConfigModel,
    Duration,
    Name,
    as_written,
)


class GatewayConfig(ConfigModel):
    """Identity of this gateway and where it keeps its state."""

    id: str = Field(
        pattern=GATEWAY_ID_PATTERN,
        description="Gateway id ([A-Za-z0-9_-]{1,64}): its identity in topics and in the "
        "central store.",
        examples=["plant1-line3"],
    )
    site: Name = Field(description="Site (plant) name; first level of the default topic root.")
    area: Name = Field(description="Area name; second level of the default topic root.")
    line: Name = Field(description="Line name; third level of the default topic root.")
    data_dir: Path = Field(
        default=as_written("/var/lib/edge-agent"),
        description="Where the SQLite outbox, the saga log and generated certificates live.",
    )


class MqttConfig(TlsClientConfig):
    """The agent's broker connection, topics, and pacing of the durable sync path."""

    topic_root: str = Field(
        default="",
        description="Root R of live topics; default '{site}/{area}/{line}'.",
        examples=["plant1/assembly/line3"],
    )
    sync_enabled: bool = Field(
        default=True,
        description="false: live only, for a plant without a central store: live values, "
        "OEE and commands on MQTT, no S/sync; samples are not kept in the outbox "
        "(docs/delivery.md, 'Live only').",
    )
    sync_prefix: str = Field(
        default="edge", description="Durable path: {sync_prefix}/{gateway.id}/sync|ack."
    )
    sync_batch_events: int = Field(
        default=1000, ge=1, le=50000, description="Most events in one S/sync message."
    )
    sync_max_bytes: ByteSize = Field(
        default=as_written("256KiB"),
        ge=1024,
        description="Largest S/sync message; keep it under the broker's message size limit.",
    )
    sync_window: int = Field(
        default=32,
        ge=1,
        le=1000,
        description="Most S/sync batches sent but not yet acknowledged by the central store.",
    )
    ack_timeout: Duration = Field(
        default=as_written("30s"), gt=0, description="An unacknowledged batch is resent after this."
    )
    ack_warning_after: Duration = Field(
        default=as_written("2m"),
        gt=0,
        description="Events waiting this long, connected, for the central store's "
        "acknowledgement: a warning in the log, `status` degraded, /readyz 503, naming the "
        "likely cause (no ingest on sync_prefix, or batches refused by the broker).",
    )
    health_interval: Duration = Field(
        default=as_written("10s"),
        gt=0,
        description="How often R/_agent/health is published (retained, QoS 0).",
    )
    sync_max_rate: int = Field(
        default=0,
        ge=0,
        description="Most events per second on the durable path while a backlog drains, so "
        "that replay leaves the link to live values; 0: unlimited.",
    )

    @field_validator("topic_root")
    @classmethod
    def _check_topic_root(cls, value: str) -> str:
        return value if value == "" else check_topic(value)

    @field_validator("sync_prefix")
    @classmethod
    def _check_sync_prefix(cls, value: str) -> str:
        return check_topic(value)


class BufferConfig(ConfigModel):
    """The SQLite outbox."""

    max_size: ByteSize = Field(
        default=as_written("1GiB"),
        ge=1024 * 1024,
        description="Outbox cap. Past it the oldest samples are dropped first and a gap "
        "event records exactly what was dropped.",
    )
    commit_interval: Duration = Field(
        default=as_written("50ms"),
        gt=0,
        le=10,
        description="Appends are grouped into one transaction for at most this long; live "
        "values wait for it, and a window longer than a device's poll_interval merges that "
        "device's successive live values (docs/performance.md, 'Node-RED's job').",
    )
    commit_max_events: int = Field(
        default=1000, ge=1, le=100000, description="...or until this many are pending."
    )
