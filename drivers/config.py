"""Config primitives shared by every driver's config model (and re-used by `agent.settings.models`).

Durations and sizes are written as strings in the config file (``"500ms"``, ``"2GiB"``) and
parsed exactly once, at load: models hold plain ``float`` seconds and ``int`` bytes.
Bare numbers are refused rather than guessed at: ``5`` could mean seconds or milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from drivers.values import (
    JsonValue,
    ValueKind,
    at_precision,
    decimals_tolerance,
    same_value,
    to_kind,
)

# A problem found by a cross-field check: (location relative to the checked model, reason).
# Warnings (`warnings()` beside `problems()`) have the same shape but never refuse a config.
Problem = tuple[tuple[str | int, ...], str]

# The userinfo of a URL in a message, "user:password@", with or without a scheme in front: the
# password is everything up to the last "@" of the token (quotes and spaces end a token in a
# message, so a lone URL goes through `redact_url`); "scheme://" is never "user:password".
_URL_PASSWORD = re.compile(
    r"(?P<head>(?:\b[A-Za-z][A-Za-z0-9+.-]*://)?[^\s'\"/@:]*):(?!//)[^\s'\"]*@"
)

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
DURATION_PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h|d|w))+$"

_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
SIZE_PATTERN = r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)")


def redact_url(url: str) -> str:
    """One URL for a message: the password of its userinfo, whatever it holds, as ``***``."""
    if "@" not in url:
        return url
    head, _, host = url.rpartition("@")  # as urlsplit: the host follows the last "@"
    scheme, separator, userinfo = head.partition("://")
    if not separator:
        scheme, userinfo = "", head
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{separator}{user}{':***' if colon else ''}@{host}"


def redact_urls(text: str) -> str:
    """A message with the password of every URL's userinfo in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def parse_duration(text: str) -> float:
    """Parse ``"250ms"``, ``"2s"``, ``"5m"``, ``"1h30m"``, ``"30d"`` into seconds."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty duration; write e.g. '500ms', '2s', '5m', '30d'")
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(stripped):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(stripped) or pos == 0:
        raise ValueError(
            f"invalid duration {text!r}; write a number and a unit (ms, s, m, h, d, w), "
            "e.g. '500ms', '2s', '5m', '30d'"
        )
    return total


def parse_size(text: str) -> int:
    """Parse ``"2GiB"``, ``"512MiB"``, ``"100MB"``, ``"4096B"`` into bytes."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid size {text!r}; write a number and a unit (B, KB, MB, GB, KiB, MiB, GiB, "
            "TiB), e.g. '2GiB'"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _duration_before(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a duration must be a string such as '2s', not a boolean")
    if isinstance(value, int | float):
        raise ValueError(
            f"a duration needs a unit: write {value!r} as e.g. '{value}s' or '{value}ms'"
        )
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError(f"a duration must be a string such as '2s', got {type(value).__name__}")


def _size_before(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a size must be a string such as '1GiB', not a boolean")
    if isinstance(value, int | float):
        raise ValueError(f"a size needs a unit: write {value!r} as e.g. '{value}MiB'")
    if isinstance(value, str):
        return parse_size(value)
    raise ValueError(f"a size must be a string such as '1GiB', got {type(value).__name__}")


Duration = Annotated[
    float,
    BeforeValidator(_duration_before),
    WithJsonSchema(
        {"type": "string", "pattern": DURATION_PATTERN},
        mode="validation",
    ),
]
"""Seconds, written in the config as ``"500ms"``, ``"2s"``, ``"5m"``, ``"1h30m"``, ``"30d"``."""

ByteSize = Annotated[
    int,
    BeforeValidator(_size_before),
    WithJsonSchema(
        {"type": "string", "pattern": SIZE_PATTERN},
        mode="validation",
    ),
]
"""Bytes, written in the config as ``"512MiB"``, ``"2GiB"``, ``"100MB"``."""


def as_written(text: str) -> Any:
    """A default given as it would be written in the file ("1s", "1GiB"); parsed at load."""
    return text


NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
# Device, tag and machine names become MQTT topic levels: no '/', '+', '#', spaces.
Name = Annotated[str, Field(pattern=NAME_PATTERN)]

Quality = Literal["good", "uncertain", "bad"]


class ConfigModel(BaseModel):
    """Base of every config model: unknown keys are errors, loaded config is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class TagConfigBase(ConfigModel):
    """Keys every tag has, whatever the driver."""

    name: Name = Field(description="Tag name; the last level of its topic `R/{device}/{tag}`.")
    deadband: float | None = Field(
        default=None,
        ge=0,
        description="Report a numeric value only when it moved more than this (engineering "
        "units) since the last published value. Unset: every change is published.",
    )
    max_interval: Duration | None = Field(
        default=None,
        description="Re-publish an unchanged value at least this often (heartbeat). "
        "Unset: the device's `max_interval`.",
    )
    writable: bool = Field(
        default=False,
        description="Only writable tags may be written by workflows.",
    )
    decimals: int | None = Field(
        default=None,
        ge=0,
        le=17,
        description="Publish numbers rounded to this many decimals (0: as integers), live, in "
        "the outbox and in `probe`; values within half a unit of the last decimal are equal for "
        "workflow waits and write read-backs. Unset: the precision the value has: a scaled "
        "Modbus integer at the decimals of its scale and offset (scale 0.1: one), a float32 as "
        "the shortest decimal that reads back as the same float32, anything else as read "
        '(docs/topics.md, "Values").',
    )

    unit: str | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="Engineering unit shown beside the value on the status page (e.g. 'degC', "
        "'bar', 'parts/min'); not part of the MQTT payload.",
        examples=["degC"],
    )

    def value_kind(self) -> ValueKind:
        """The JSON type of the tag's value when the config tells it, else 'unknown'."""
        return "unknown"

    def value_type(self) -> str | None:
        """The type of the published values when the config tells it (int16, uint32, float32,
        float64, int64, bool, string...); None: whatever the device sends."""
        return None

    def command_value(self, value: Any) -> Any:
        """The value a command parameter writes to this tag; ValueError saying why not."""
        return to_kind(value, self.value_kind())

    def same_value(self, actual: Any, expected: Any) -> bool:
        """Whether a value of this tag equals an expected one (this tag's one tolerance)."""
        return same_value(actual, expected, at_least=decimals_tolerance(self.decimals))

    def published_value(self, value: JsonValue) -> JsonValue:
        """The value as the live topic, the outbox and `probe` show it: at this tag's
        precision (drivers/values.py, `at_precision`)."""
        return at_precision(value, decimals=self.decimals)

    def counter_bits(self) -> int | None:
        """Width of an unscaled integer counter (for rollover) when the config tells it."""
        return None


class DeviceConfigBase(ConfigModel):
    """Keys every device has, whatever the driver."""

    name: Name = Field(description="Device name; the first level of its tags' topics.")
    poll_interval: Duration = Field(
        default=as_written("1s"), gt=0, description="How often polled tags are read."
    )
    timeout: Duration = Field(
        default=as_written("1s"), gt=0, description="Deadline of one request."
    )
    max_interval: Duration = Field(
        default=as_written("60s"),
        gt=0,
        description="Heartbeat: an unchanged value is re-published at least this often.",
    )

    breaker_failures: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Circuit breaker: consecutive failed connects or polls that open it.",
    )
    breaker_reset: Duration = Field(
        default=as_written("5s"),
        gt=0,
        description="Circuit breaker: how long it stays open before one trial.",
    )

    def problems(self) -> Iterator[Problem]:
        """Cross-field problems of this device (locations relative to the device)."""
        seen: dict[str, int] = {}
        for index, tag in enumerate(self.tag_list()):
            if tag.name in seen:
                yield (
                    ("tags", index, "name"),
                    f"duplicate tag name {tag.name!r} (also tags[{seen[tag.name]}])",
                )
            else:
                seen[tag.name] = index

    def warnings(self) -> Iterator[Problem]:
        """What is allowed but unsafe (e.g. a password in cleartext); never refuses a config."""
        return iter(())

    def tag_list(self) -> tuple[TagConfigBase, ...]:
        """The device's tags (each driver's model holds them; the base model has none)."""
        return ()
