"""The central ingest's config file (`edge-agent ingest`, docs/central.md)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    SecretStr,
    field_validator,
)
from pydantic_settings import SettingsConfigDict

from agent.settings.common import HttpConfig, SettingsFile, TlsClientConfig, check_topic
from agent.settings.loader import load_settings
from drivers.config import (
    ByteSize,
    ConfigModel,
    Duration,
    Problem,
    as_written,
)
from sync.central.batch import MAX_FUTURE_LIMIT, EventTimeWindow


def parse_months(text: str) -> int:
    """Parse a retention such as ``"24 months"`` or ``"2 years"`` into months."""
    match = re.fullmatch(r"\s*(\d+)\s*(months?|years?)\s*", text)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"invalid retention {text!r}; write e.g. '24 months' or '2 years'")
    count = int(match.group(1))
    return count * 12 if match.group(2).startswith("year") else count


class IngestMqttConfig(TlsClientConfig):
    """The ingest's broker connection and subscription."""

    sync_prefix: str = Field(default="edge", description="Subscribes to {sync_prefix}/+/sync.")
    shared_group: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="MQTT 5 shared subscription group, so that several replicas split the load.",
    )
    # Must take the largest S/sync any gateway sends: its mqtt.sync_max_bytes (256 KiB by
    # default) plus the topic and a few header bytes. An S/sync over it is dropped by the
    # broker (MQTT 5), so that gateway's batch is never acknowledged; 16 MiB is 64 times the
    # default, and still bounds what one packet costs (an 87 MB S/sync took the ingest to 803 MB).
    max_packet_size: ByteSize = Field(
        default=as_written("16MiB"),
        ge=64 * 1024,
        le=256 * 1024 * 1024,
        description="Largest MQTT packet taken from the broker (the MQTT 5 Maximum Packet "
        "Size announced in CONNECT); keep it above every gateway's mqtt.sync_max_bytes, since "
        "a larger S/sync is never acknowledged.",
    )

    @field_validator("sync_prefix")
    @classmethod
    def _check_sync_prefix(cls, value: str) -> str:
        return check_topic(value)


class PostgresConfig(ConfigModel):
    """The central PostgreSQL."""

    dsn: SecretStr | None = Field(
        default=None,
        description="postgresql://USER@HOST:5432/DB (prefer dsn_file when it holds a password).",
    )
    dsn_file: Path | None = Field(default=None, description="File holding the DSN.")
    pool_size: int = Field(default=4, ge=1, le=100, description="Connections per replica.")

    def problems(self) -> Iterator[Problem]:
        """A DSN must come from somewhere."""
        if self.dsn is None:
            # dsn_file set but unread only when `check` tolerated its absence (a warning).
            if self.dsn_file is None:
                yield (("dsn",), "required (or dsn_file)")
        elif not self.dsn.get_secret_value().startswith(("postgresql://", "postgres://")):
            yield (("dsn",), "must start with postgresql://")


class PartitionsConfig(ConfigModel):
    """Monthly partitions of edge_events."""

    months_ahead: int = Field(default=3, ge=1, le=60, description="Partitions kept ready.")
    retention: str = Field(
        default="24 months",
        description="Partitions older than this are detached and dropped.",
        examples=["24 months", "2 years"],
    )
    maintenance_interval: Duration = Field(
        default=as_written("1h"), gt=0, description="How often partitions are maintained."
    )

    @field_validator("retention")
    @classmethod
    def _check_retention(cls, value: str) -> str:
        parse_months(value)
        return value

    @property
    def retention_months(self) -> int:
        """Retention in whole months."""
        return parse_months(self.retention)


class EventsConfig(ConfigModel):
    """Which event times the ingest accepts (docs/central.md, "Validation")."""

    oldest: date = Field(
        default=date(1970, 1, 1),
        gt=date(1, 1, 1),
        description="A batch with an event dated before this day (00:00 UTC) is malformed: "
        "never stored nor acked.",
        examples=["1970-01-01", "2020-01-01"],
    )
    max_future: Duration = Field(
        default=as_written("1d"),
        ge=0,
        le=MAX_FUTURE_LIMIT.total_seconds(),
        description="A batch with an event dated more than this after the ingest's clock is "
        "malformed; its gateway resends it, and it is accepted once within (at most 366d).",
    )

    def problems(self) -> Iterator[Problem]:
        """An ``oldest`` in the future would refuse every event."""
        if self.oldest > datetime.now(UTC).date():
            yield (("oldest",), "is in the future: every event would be refused")

    @property
    def window(self) -> EventTimeWindow:
        """The accepted event times."""
        return EventTimeWindow(
            oldest=datetime.combine(self.oldest, time(), UTC),
            max_future=timedelta(seconds=self.max_future),
        )


class IngestHttpConfig(HttpConfig):
    """Health and metrics of the ingest."""

    listen: str = Field(default="127.0.0.1:9109", description="HOST:PORT.")


class CentralSettings(SettingsFile):
    """The central ingest's config file (docs/central.md)."""

    model_config = SettingsConfigDict(title="edge-agent ingest configuration")

    mqtt: IngestMqttConfig
    postgres: PostgresConfig
    partitions: PartitionsConfig = Field(default_factory=PartitionsConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    http: IngestHttpConfig = Field(default_factory=IngestHttpConfig)

    def problems(self) -> Iterator[Problem]:
        """Every cross-field problem."""
        for loc, reason in self.mqtt.problems():
            yield (("mqtt", *loc), reason)
        for loc, reason in self.postgres.problems():
            yield (("postgres", *loc), reason)
        for loc, reason in self.events.problems():
            yield (("events", *loc), reason)
        for loc, reason in self.http.problems():
            yield (("http", *loc), reason)

    def warnings(self) -> Iterator[Problem]:
        """What is allowed but unsafe (a cleartext broker password)."""
        for loc, reason in self.mqtt.warnings():
            yield (("mqtt", *loc), reason)


def load_central_settings(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> CentralSettings:
    """Load and validate an ingest config file."""
    return load_settings(CentralSettings, path, environ=environ)


def central_schema() -> dict[str, Any]:
    """JSON Schema of the ingest config file."""
    schema = CentralSettings.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
