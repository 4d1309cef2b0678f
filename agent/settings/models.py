"""The agent's and the ingest's config models (design §4, §8): validated once, then immutable.

Structure is checked by pydantic; everything that spans fields (references between sections,
unique names, address ranges) is checked by `problems()` afterwards, so that one run reports
every problem, each as ``path.to.field: reason``. Nothing is ever silently repaired.
"""

from __future__ import annotations

import re
import string
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import time
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import (
    Discriminator,
    Field,
    SecretStr,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from drivers.config import (
    ByteSize,
    ConfigModel,
    DeviceConfigBase,
    Duration,
    Name,
    Problem,
    TagConfigBase,
    as_written,
)
from drivers.registry import DeviceConfig

ENV_PREFIX = "EDGE_AGENT__"
GATEWAY_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
TAG_REF_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}/[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
TagRef = Annotated[str, Field(pattern=TAG_REF_PATTERN, examples=["press1/state"])]
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


# ---------------------------------------------------------------------------------------------
# [gateway] [mqtt] [buffer] [http]


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
        default=Path("/var/lib/edge-agent"),
        description="Where the SQLite outbox, the saga log and generated certificates live.",
    )


class TlsClientConfig(ConfigModel):
    """MQTT connection keys shared by the agent and the ingest."""

    url: str = Field(
        description="Broker URL, mqtt://HOST[:1883] or mqtts://HOST[:8883] (TLS).",
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
    client_id: str | None = Field(
        default=None,
        max_length=128,
        description="MQTT client id; default 'edge-agent-{gateway.id}' (ingest: random).",
    )
    keepalive: Duration = Field(
        default=as_written("30s"), ge=5, description="MQTT keep-alive interval."
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"{value!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"{value!r}: missing broker host")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"{value!r}: invalid port") from exc
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"{value!r}: a broker URL takes only host and port")
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
        if self.password is not None and not self.username:
            yield (("username",), "required when a password is given")


class MqttConfig(TlsClientConfig):
    """The agent's broker connection, topics, and pacing of the durable sync path."""

    topic_root: str = Field(
        default="",
        description="Root R of live topics; default '{site}/{area}/{line}'.",
        examples=["plant1/assembly/line3"],
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
        description="Appends are grouped into one transaction for at most this long.",
    )
    commit_max_events: int = Field(
        default=1000, ge=1, le=100000, description="...or until this many are pending."
    )


class HttpConfig(ConfigModel):
    """Health and metrics endpoint."""

    listen: str = Field(
        default="127.0.0.1:9108",
        description="HOST:PORT of /healthz /readyz /metrics; keep it on loopback unless the "
        "network is trusted.",
    )
    enabled: bool = Field(default=True, description="Serve the endpoint at all.")

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        return check_listen(value)


# ---------------------------------------------------------------------------------------------
# [[machines]] [[calendars]]

StateCode = int | str | bool


class MachineStateConfig(ConfigModel):
    """Which tag holds the machine state and which codes mean what (others are 'unknown')."""

    tag: TagRef = Field(description="device/tag holding the state code.")
    running: tuple[StateCode, ...] = Field(description="Codes meaning running.")
    planned_stop: tuple[StateCode, ...] = Field(
        default=(), description="Codes meaning a planned stop (changeover, maintenance)."
    )
    unplanned_stop: tuple[StateCode, ...] = Field(
        default=(), description="Codes meaning an unplanned stop (fault, starved, blocked)."
    )


class MachineConfig(ConfigModel):
    """One OEE calculation (ISO 22400-2)."""

    name: Name = Field(description="Machine name; topics R/{machine}/state and R/{machine}/oee.")
    state: MachineStateConfig
    total_count: TagRef = Field(description="Cumulative produced-parts counter (device/tag).")
    reject_count: TagRef | None = Field(
        default=None, description="Cumulative reject counter (or give good_count)."
    )
    good_count: TagRef | None = Field(
        default=None, description="Cumulative good-parts counter (or give reject_count)."
    )
    ideal_cycle_time: Duration = Field(gt=0, description="Ideal time per part.")
    microstop_threshold: Duration = Field(
        default=as_written("0s"),
        ge=0,
        description="Stops shorter than this count as running (a performance loss, not "
        "downtime) and are counted as microstops; 0s: none.",
    )
    calendar: Name = Field(description="Name of a [[calendars]] entry.")
    publish_interval: Duration = Field(
        default=as_written("60s"), gt=0, description="How often R/{machine}/oee is published."
    )
    rolling_window: Duration = Field(
        default=as_written("1h"), gt=0, description="Length of the rolling OEE window."
    )


_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_days(spec: str | tuple[str, ...]) -> frozenset[int]:
    """Parse ``"mon-fri"``, ``"mon,wed,fri"``, ``"daily"`` or a list of names into 0..6."""
    items = (spec,) if isinstance(spec, str) else spec
    days: set[int] = set()
    for item in items:
        for part in str(item).lower().replace(" ", "").split(","):
            if part in ("daily", "all"):
                days.update(range(7))
                continue
            if "-" in part:
                first, _, last = part.partition("-")
                if first not in _WEEKDAYS or last not in _WEEKDAYS:
                    raise ValueError(f"invalid day range {part!r}; write e.g. 'mon-fri'")
                start, end = _WEEKDAYS.index(first), _WEEKDAYS.index(last)
                span = (end - start) % 7
                days.update((start + i) % 7 for i in range(span + 1))
                continue
            if part not in _WEEKDAYS:
                raise ValueError(
                    f"invalid day {part!r}; use mon tue wed thu fri sat sun, ranges "
                    "like 'mon-fri', lists like 'mon,wed' or 'daily'"
                )
            days.add(_WEEKDAYS.index(part))
    if not days:
        raise ValueError("no days given")
    return frozenset(days)


def parse_clock(text: str) -> int:
    """Parse ``"HH:MM"`` (00:00..24:00) into minutes after midnight."""
    match = re.fullmatch(r"([01]\d|2[0-4]):([0-5]\d)", text)
    if match is None or (match.group(1) == "24" and match.group(2) != "00"):
        raise ValueError(f"invalid time {text!r}; write HH:MM, e.g. '06:00' or '24:00'")
    return int(match.group(1)) * 60 + int(match.group(2))


def _span(start: int, end: int) -> tuple[int, int]:
    # A shift whose end is not after its start crosses midnight.
    return (start, end if end > start else end + 1440)


class ShiftConfig(ConfigModel):
    """A shift: local start and end time, weekdays, breaks (all in the calendar's zone)."""

    name: Name = Field(description="Shift name, reported in the OEE window.")
    start: str = Field(description="Local start time HH:MM.", examples=["06:00"])
    end: str = Field(
        description="Local end time HH:MM; an end at or before the start crosses midnight.",
        examples=["14:00"],
    )
    days: str | tuple[str, ...] = Field(
        default="mon-fri",
        description="Weekdays the shift starts on: 'mon-fri', 'mon,wed', 'daily', or a list.",
    )
    breaks: tuple[tuple[str, str], ...] = Field(
        default=(), description="Planned breaks inside the shift, [[start, end], ...]."
    )

    @field_validator("start", "end")
    @classmethod
    def _check_clock(cls, value: str) -> str:
        parse_clock(value)
        return value

    @field_validator("days")
    @classmethod
    def _check_days(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        parse_days(value)
        return value

    @field_validator("breaks")
    @classmethod
    def _check_breaks(cls, value: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        for start, end in value:
            parse_clock(start)
            parse_clock(end)
        return value

    @property
    def weekdays(self) -> frozenset[int]:
        """Weekdays (0 = Monday) the shift starts on."""
        return parse_days(self.days)

    @property
    def minutes(self) -> tuple[int, int]:
        """(start, end) in minutes after the start day's midnight; end may pass 1440."""
        return _span(parse_clock(self.start), parse_clock(self.end))

    @property
    def break_minutes(self) -> tuple[tuple[int, int], ...]:
        """Breaks as (start, end) minutes after the shift day's midnight."""
        shift_start, _ = self.minutes
        spans = []
        for start_text, end_text in self.breaks:
            start, end = parse_clock(start_text), parse_clock(end_text)
            if start < shift_start:  # the break is after midnight in a night shift
                start, end = start + 1440, end + 1440
            spans.append(_span(start, end) if end <= start else (start, end))
        return tuple(spans)

    @property
    def start_time(self) -> time:
        """Local start time."""
        minutes = parse_clock(self.start)
        return time(minutes // 60 % 24, minutes % 60)

    def problems(self) -> Iterator[Problem]:
        """Cross-field problems of the shift."""
        if parse_clock(self.start) == 1440:
            yield (("start",), "a shift cannot start at 24:00; write 00:00")
        if parse_clock(self.start) == parse_clock(self.end) % 1440:
            yield (("end",), "the shift has no length (end equals start)")
        shift_start, shift_end = self.minutes
        previous: tuple[int, int] | None = None
        for index, (start, end) in enumerate(sorted(self.break_minutes)):
            if end <= start or start < shift_start or end > shift_end:
                yield (
                    ("breaks", index),
                    f"break {self.breaks[index][0]}-{self.breaks[index][1]} is not inside "
                    f"the shift {self.start}-{self.end}",
                )
            if previous is not None and start < previous[1]:
                yield (("breaks", index), "breaks overlap")
            previous = (start, end)


class CalendarConfig(ConfigModel):
    """Shift plan of one or more machines, in one IANA time zone."""

    name: Name = Field(description="Calendar name, referenced by machines.")
    timezone: str = Field(
        default="UTC",
        description="IANA time zone of the shift times; DST is handled.",
        examples=["Europe/Berlin"],
    )
    shifts: tuple[ShiftConfig, ...] = Field(default=(), description="The shifts.")

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name like 'Europe/Berlin'"
            ) from exc
        return value

    def problems(self) -> Iterator[Problem]:
        """Unique shift names; shifts never overlap within the week."""
        seen: dict[str, int] = {}
        week: list[tuple[int, int, int]] = []
        for index, shift in enumerate(self.shifts):
            for loc, reason in shift.problems():
                yield (("shifts", index, *loc), reason)
            if shift.name in seen:
                yield (
                    ("shifts", index, "name"),
                    f"duplicate shift name {shift.name!r} (also shifts[{seen[shift.name]}])",
                )
            seen.setdefault(shift.name, index)
            start, end = shift.minutes
            for day in shift.weekdays:
                week.append((day * 1440 + start, day * 1440 + end, index))
        week_len = 7 * 1440
        for i, (a_start, a_end, a_index) in enumerate(week):
            for b_start, b_end, b_index in week[i + 1 :]:
                if a_index == b_index and (a_start, a_end) == (b_start, b_end):
                    continue
                for shift_by in (-week_len, 0, week_len):
                    if a_start < b_end + shift_by and b_start + shift_by < a_end:
                        first, second = sorted((a_index, b_index))
                        yield (
                            ("shifts", second),
                            f"overlaps shifts[{first}] ({self.shifts[first].name})"
                            if first != second
                            else "overlaps itself on consecutive days (longer than 24 h?)",
                        )
                        break


# ---------------------------------------------------------------------------------------------
# [[workflows]]


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """A declared workflow parameter: type and inclusive range (length for strings)."""

    type: Literal["str", "int", "float", "bool"]
    low: float | None = None
    high: float | None = None


_PARAM = re.compile(r"^(str|int|float|bool)(?::(-?\d+(?:\.\d+)?)?\.\.(-?\d+(?:\.\d+)?)?)?$")


def parse_param_spec(text: str) -> ParamSpec:
    """Parse ``"str"``, ``"str:1..32"``, ``"int:1..9999"``, ``"float:0..1.5"``, ``"bool"``."""
    match = _PARAM.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid parameter type {text!r}; write str, str:MIN..MAX (length), int, "
            "int:MIN..MAX, float, float:MIN..MAX or bool"
        )
    kind = match.group(1)
    low = None if match.group(2) is None else float(match.group(2))
    high = None if match.group(3) is None else float(match.group(3))
    if kind == "bool" and (low is not None or high is not None):
        raise ValueError(f"{text!r}: bool takes no range")
    if kind in ("int", "str"):
        for bound in (low, high):
            if bound is not None and not bound.is_integer():
                raise ValueError(f"{text!r}: {kind} bounds are integers")
    if kind == "str" and low is not None and low < 0:
        raise ValueError(f"{text!r}: a string length cannot be negative")
    if low is not None and high is not None and low > high:
        raise ValueError(f"{text!r}: the lower bound is above the upper bound")
    return ParamSpec(kind, low, high)  # type: ignore[arg-type]


StepValue = bool | int | float | str


def template_fields(value: StepValue) -> list[str]:
    """Names of ``{param}`` placeholders in a step value (none for non-strings)."""
    if not isinstance(value, str):
        return []
    return [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]


class WriteStep(ConfigModel):
    """Write a value (literal or '{param}' template) to a writable tag."""

    write: TagRef = Field(description="device/tag to write; must be writable.")
    value: StepValue = Field(
        description="Value or template; '{product}' alone keeps the parameter's type."
    )
    compensate_value: StepValue | None = Field(
        default=None,
        description="Written when compensating; unset: the value read before the write.",
    )


class WaitStep(ConfigModel):
    """Wait until a tag reads a value."""

    wait: TagRef = Field(description="device/tag to watch.")
    value: StepValue = Field(description="Value (or template) to wait for.")
    timeout: Duration = Field(gt=0, description="Fail the step after this long.")


class ConfirmStep(ConfigModel):
    """Wait until the central store acknowledged the workflow's start event."""

    confirm: Literal["central"] = Field(description="Only 'central'.")
    timeout: Duration = Field(gt=0, description="Treat the uplink as failed after this long.")


_STEP_KEYS = ("write", "wait", "confirm")


def _step_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        keys = value.keys()
    elif isinstance(value, WriteStep | WaitStep | ConfirmStep):
        keys = type(value).model_fields.keys()
    else:
        return None  # not a table: reported as "a step needs exactly one of ..."
    found = [key for key in _STEP_KEYS if key in keys]
    return f"step:{found[0]}" if len(found) == 1 else None


WorkflowStep = Annotated[
    Union[  # noqa: UP007
        Annotated[WriteStep, Tag("step:write")],
        Annotated[WaitStep, Tag("step:wait")],
        Annotated[ConfirmStep, Tag("step:confirm")],
    ],
    Discriminator(
        _step_kind,
        custom_error_type="step_kind",
        custom_error_message="a step needs exactly one of the keys write, wait, confirm",
    ),
]


class WorkflowConfig(ConfigModel):
    """A command workflow (saga) started by a message on R/_cmd/{name}."""

    name: Name = Field(description="Workflow name; its command topic is R/_cmd/{name}.")
    description: str = Field(default="", description="What the workflow does, for people.")
    params: dict[str, str] = Field(
        default_factory=dict,
        description="Declared parameters: name -> str | str:MIN..MAX | int | int:MIN..MAX | "
        "float | float:MIN..MAX | bool. Commands with other or missing keys are rejected.",
    )
    on_uplink_failure: Literal["compensate", "continue"] = Field(
        default="compensate",
        description="compensate: undo the written steps when a confirm step cannot reach "
        "the central store; continue: finish locally, confirm later.",
    )
    exclusive: Literal["workflow", "machine"] = Field(
        default="workflow",
        description="At most one running saga per workflow, or per machine (the devices "
        "it writes).",
    )
    rate_limit: str = Field(
        default="10/1m",
        description="Most commands accepted per period, 'COUNT/DURATION'.",
        examples=["10/1m", "1/5s"],
    )
    steps: tuple[WorkflowStep, ...] = Field(min_length=1, description="The steps, in order.")

    @field_validator("params")
    @classmethod
    def _check_params(cls, value: dict[str, str]) -> dict[str, str]:
        for name, spec in value.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
                raise ValueError(f"invalid parameter name {name!r}")
            try:
                parse_param_spec(spec)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return value

    @field_validator("rate_limit")
    @classmethod
    def _check_rate(cls, value: str) -> str:
        parse_rate(value)
        return value

    @property
    def param_specs(self) -> dict[str, ParamSpec]:
        """Parsed parameter declarations."""
        return {name: parse_param_spec(spec) for name, spec in self.params.items()}

    @property
    def rate(self) -> tuple[int, float]:
        """(count, period seconds) of the rate limit."""
        return parse_rate(self.rate_limit)


def parse_rate(text: str) -> tuple[int, float]:
    """Parse ``"10/1m"`` into (10, 60.0)."""
    from drivers.config import parse_duration

    count, sep, period = text.partition("/")
    if not sep or not count.strip().isdigit() or int(count) < 1:
        raise ValueError(f"invalid rate {text!r}; write COUNT/DURATION, e.g. '10/1m'")
    seconds = parse_duration(period)
    if seconds <= 0:
        raise ValueError(f"invalid rate {text!r}: the period must be positive")
    return int(count), seconds


# ---------------------------------------------------------------------------------------------
# The agent's file


class AgentSettings(BaseSettings):
    """The whole agent config file (design §4)."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        title="edge-agent configuration",
    )

    gateway: GatewayConfig
    mqtt: MqttConfig
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    devices: tuple[DeviceConfig, ...] = Field(default=(), description="PLCs and other sources.")
    machines: tuple[MachineConfig, ...] = Field(default=(), description="OEE per machine.")
    calendars: tuple[CalendarConfig, ...] = Field(default=(), description="Shift plans.")
    workflows: tuple[WorkflowConfig, ...] = Field(default=(), description="Command sagas.")

    @model_validator(mode="before")
    @classmethod
    def _default_topic_root(cls, data: Any) -> Any:
        # topic_root defaults to {site}/{area}/{line}; filled before validation so that the
        # loaded model is complete and immutable.
        if isinstance(data, dict):
            gateway, mqtt = data.get("gateway"), data.get("mqtt")
            if isinstance(gateway, dict) and isinstance(mqtt, dict) and not mqtt.get("topic_root"):
                parts = [gateway.get(key) for key in ("site", "area", "line")]
                if all(isinstance(part, str) and part for part in parts):
                    data = {**data, "mqtt": {**mqtt, "topic_root": "/".join(parts)}}  # type: ignore[arg-type]
        return data

    # -- lookups ---------------------------------------------------------------------------

    def device(self, name: str) -> DeviceConfigBase | None:
        """The device of that name."""
        return next((device for device in self.devices if device.name == name), None)

    def tag(self, ref: str) -> tuple[DeviceConfigBase, TagConfigBase] | None:
        """Resolve 'device/tag'."""
        device_name, _, tag_name = ref.partition("/")
        device = self.device(device_name)
        if device is None:
            return None
        tag = next((tag for tag in device.tag_list() if tag.name == tag_name), None)
        return None if tag is None else (device, tag)

    @property
    def client_id(self) -> str:
        """MQTT client id of the agent."""
        return self.mqtt.client_id or f"edge-agent-{self.gateway.id}"

    @property
    def sync_topic_base(self) -> str:
        """S = {sync_prefix}/{gateway.id}."""
        return f"{self.mqtt.sync_prefix}/{self.gateway.id}"

    # -- cross-field checks ------------------------------------------------------------------

    def problems(self) -> Iterator[Problem]:
        """Every cross-field problem, with locations from the file's root."""
        for loc, reason in self.mqtt.problems():
            yield (("mqtt", *loc), reason)
        yield from _unique("devices", [device.name for device in self.devices], "device")
        yield from _unique("machines", [machine.name for machine in self.machines], "machine")
        yield from _unique("calendars", [cal.name for cal in self.calendars], "calendar")
        yield from _unique("workflows", [flow.name for flow in self.workflows], "workflow")
        for index, device in enumerate(self.devices):
            for loc, reason in device.problems():
                yield (("devices", index, *loc), reason)
        for index, calendar in enumerate(self.calendars):
            for loc, reason in calendar.problems():
                yield (("calendars", index, *loc), reason)
        for index, machine in enumerate(self.machines):
            yield from self._machine_problems(index, machine)
        for index, workflow in enumerate(self.workflows):
            yield from self._workflow_problems(index, workflow)

    def _ref_problem(self, loc: tuple[str | int, ...], ref: str) -> Iterator[Problem]:
        device_name, _, tag_name = ref.partition("/")
        if self.device(device_name) is None:
            yield (loc, f"unknown device {device_name!r} in {ref!r}")
        elif self.tag(ref) is None:
            yield (loc, f"device {device_name!r} has no tag {tag_name!r}")

    def _machine_problems(self, index: int, machine: MachineConfig) -> Iterator[Problem]:
        base: tuple[str | int, ...] = ("machines", index)
        yield from self._ref_problem((*base, "state", "tag"), machine.state.tag)
        state_tag = self.tag(machine.state.tag)
        if state_tag is not None and state_tag[1].value_kind() == "float":
            yield ((*base, "state", "tag"), "a state code tag must not be a float value")
        seen: dict[Any, str] = {}
        for group in ("running", "planned_stop", "unplanned_stop"):
            for code in getattr(machine.state, group):
                code_key = (type(code).__name__, code)
                if code_key in seen:
                    yield ((*base, "state", group), f"code {code!r} is also in {seen[code_key]}")
                seen.setdefault(code_key, group)
        counters: list[tuple[str, str]] = [("total_count", machine.total_count)]
        if machine.reject_count is not None and machine.good_count is not None:
            yield ((*base, "good_count"), "give reject_count or good_count, not both")
        for key in ("reject_count", "good_count"):
            ref = getattr(machine, key)
            if ref is not None:
                counters.append((key, ref))
        for key, ref in counters:
            yield from self._ref_problem((*base, key), ref)
            resolved = self.tag(ref)
            if resolved is not None and resolved[1].value_kind() not in ("int", "unknown"):
                yield (
                    (*base, key),
                    f"{ref} is a {resolved[1].value_kind()} value; a counter must be an "
                    "unscaled integer tag",
                )
        if machine.calendar not in {calendar.name for calendar in self.calendars}:
            yield ((*base, "calendar"), f"unknown calendar {machine.calendar!r}")
        device = self.device(machine.name)
        if device is not None:
            clash = {"state", "oee"} & {tag.name for tag in device.tag_list()}
            if clash:
                yield (
                    (*base, "name"),
                    f"topic clash: machine {machine.name!r} publishes "
                    f"R/{machine.name}/{sorted(clash)[0]}, which device {machine.name!r} "
                    "already uses for a tag; rename the machine or the tag",
                )

    def _workflow_problems(self, index: int, workflow: WorkflowConfig) -> Iterator[Problem]:
        base: tuple[str | int, ...] = ("workflows", index)
        declared = set(workflow.params)
        specs = workflow.param_specs
        for step_index, step in enumerate(workflow.steps):
            loc = (*base, "steps", step_index)
            if isinstance(step, WriteStep):
                yield from self._ref_problem((*loc, "write"), step.write)
                resolved = self.tag(step.write)
                if resolved is not None and not resolved[1].writable:
                    yield ((*loc, "write"), f"{step.write} is not writable (writable = true)")
                values = [("value", step.value)]
                if step.compensate_value is not None:
                    values.append(("compensate_value", step.compensate_value))
            elif isinstance(step, WaitStep):
                yield from self._ref_problem((*loc, "wait"), step.wait)
                values = [("value", step.value)]
            else:
                values = []
            for key, value in values:
                try:
                    names = template_fields(value)
                except ValueError as exc:
                    yield ((*loc, key), f"invalid template {value!r}: {exc}")
                    continue
                for name in names:
                    if name not in declared:
                        yield (
                            (*loc, key),
                            f"template refers to undeclared parameter {name!r}"
                            + (f"; declared: {', '.join(sorted(declared))}" if declared else ""),
                        )
                if isinstance(step, WriteStep) and not any(n not in declared for n in names):
                    resolved = self.tag(step.write)
                    if resolved is not None:
                        kind = _value_kind(value, specs)
                        wanted = resolved[1].value_kind()
                        if not _kind_fits(kind, wanted):
                            yield (
                                (*loc, key),
                                f"a {kind} value cannot be written to {step.write} "
                                f"(a {wanted} tag)",
                            )


def _value_kind(value: StepValue, specs: dict[str, ParamSpec]) -> str:
    """The JSON kind a step value will have once its template is filled."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    names = template_fields(value)
    if len(names) == 1 and value == "{" + names[0] + "}" and names[0] in specs:
        return {"str": "string", "int": "int", "float": "float", "bool": "bool"}[
            specs[names[0]].type
        ]
    return "string"


def _kind_fits(kind: str, wanted: str) -> bool:
    if wanted == "unknown" or kind == wanted:
        return True
    return wanted == "float" and kind == "int"


def _unique(section: str, names: list[str], what: str) -> Iterator[Problem]:
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            yield (
                (section, index, "name"),
                f"duplicate {what} name {name!r} ({section}[{seen[name]}])",
            )
        seen.setdefault(name, index)


# ---------------------------------------------------------------------------------------------
# The ingest's file (design §8)


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


class IngestHttpConfig(HttpConfig):
    """Health and metrics of the ingest."""

    listen: str = Field(default="127.0.0.1:9109", description="HOST:PORT.")


class CentralSettings(BaseSettings):
    """The central ingest's config file (design §8)."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        title="edge-agent ingest configuration",
    )

    mqtt: IngestMqttConfig
    postgres: PostgresConfig
    partitions: PartitionsConfig = Field(default_factory=PartitionsConfig)
    http: IngestHttpConfig = Field(default_factory=IngestHttpConfig)

    def problems(self) -> Iterator[Problem]:
        """Every cross-field problem."""
        for loc, reason in self.mqtt.problems():
            yield (("mqtt", *loc), reason)
        for loc, reason in self.postgres.problems():
            yield (("postgres", *loc), reason)
