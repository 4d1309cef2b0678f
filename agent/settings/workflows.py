"""`[[workflows]]`: command sagas, their parameters and steps (docs/workflows.md)."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import (
    Discriminator,
    Field,
    Tag,
    field_validator,
)

from agent.settings.common import TagRef
from drivers.config import (
    ConfigModel,
    Duration,
    Name,
)


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

    write: TagRef = Field(
        description="device/tag to write; must be writable.", examples=["press1/product_code"]
    )
    value: StepValue = Field(
        description="Value or template; '{product}' alone keeps the parameter's type."
    )
    compensate_value: StepValue | None = Field(
        default=None,
        description="Written when compensating; unset: the value read before the write.",
    )


class WaitStep(ConfigModel):
    """Wait until a tag reads a value."""

    wait: TagRef = Field(description="device/tag to watch.", examples=["press1/state_code"])
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
    require_sender: bool = Field(
        default=False,
        description="Refuse commands that name no sender (the MQTT 5 user property 'sender'). "
        "The sender is a claim of the command's client, recorded unverified in the audit trail "
        "and the replies; only the broker's ACL decides who may publish commands.",
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
