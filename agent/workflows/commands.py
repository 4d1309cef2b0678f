"""Commands on ``R/_cmd/{workflow}`` (docs/workflows.md): decoding, validation of parameters
against the declared specs, step value templates, the rate limit. Pure: no I/O, no clock."""

from __future__ import annotations

import json
import math
import re
import string
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.settings.workflows import ParamSpec, StepValue, template_fields
from drivers.base import JsonValue

MAX_PAYLOAD = 16 * 1024  # bytes of a command, checked before JSON parsing
MAX_DEPTH = 8  # JSON nesting of a command ({"params": {...}} is 2)
MAX_ID_LENGTH = 128
_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
TEXT_LIMIT = 300  # characters of attacker-controlled text echoed in details


class CommandRejected(Exception):
    """A command that is not executed; `reason` goes into the reply's detail."""

    def __init__(self, reason: str, command_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command_id = command_id


@dataclass(frozen=True, slots=True)
class Command:
    """A decoded command envelope (params not yet validated)."""

    id: str
    params: Any
    # Who says they sent it: the MQTT 5 user property "sender". Unverified: any client may set
    # it; only a broker that sets or checks it per login makes it trustworthy (docs/workflows.md).
    sender: str | None = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"duplicate key {short(key)}")
        document[key] = value
    return document


def _parse_json(payload: bytes) -> Any:
    if len(payload) > MAX_PAYLOAD:
        raise CommandRejected(f"payload too large: {len(payload)} bytes (limit {MAX_PAYLOAD})")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandRejected("payload is not UTF-8") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        # The C decoder stops deep nesting at the interpreter's recursion limit.
        raise CommandRejected(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise CommandRejected(f"invalid JSON: {clip(str(exc))}") from None


def _depth(document: Any) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if deepest > MAX_DEPTH:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def valid_command_id(value: Any) -> str | None:
    """The id if it is a string of 1..128 safe characters ([A-Za-z0-9_.:@-]), else None."""
    if isinstance(value, str) and _ID.fullmatch(value):
        return value
    return None


def decode_command(payload: bytes) -> Command:
    """Decode a command envelope; raise CommandRejected (with the id when one is readable)."""
    document = _parse_json(payload)
    command_id = valid_command_id(document.get("id")) if isinstance(document, dict) else None
    if _depth(document) > MAX_DEPTH:
        raise CommandRejected(f"JSON nested deeper than {MAX_DEPTH} levels", command_id)
    if not isinstance(document, dict):
        raise CommandRejected('a command is a JSON object {"id": ..., "params": {...}}')
    unknown = sorted(set(document) - {"id", "params"})
    if unknown:
        raise CommandRejected(f"unknown key(s) {_names(unknown)}", command_id)
    if "id" not in document:
        raise CommandRejected('missing "id"')
    if command_id is None:
        raise CommandRejected(
            f'"id" must be a string of 1..{MAX_ID_LENGTH} characters A-Z a-z 0-9 _ . : @ -'
        )
    if "params" not in document:
        raise CommandRejected('missing "params" (use {} for none)', command_id)
    return Command(command_id, document["params"])


SENDER_PROPERTY = "sender"


def sender_of(user_properties: tuple[tuple[str, str], ...]) -> str | None:
    """The command's claimed sender (the user property "sender"), None if it names none;
    CommandRejected when it is ambiguous or not a name (the same characters as an id)."""
    senders = [value for key, value in user_properties if key == SENDER_PROPERTY]
    if not senders:
        return None
    if len(senders) > 1:
        raise CommandRejected(f'more than one "{SENDER_PROPERTY}" user property')
    sender = valid_command_id(senders[0])
    if sender is None:
        raise CommandRejected(
            f'the "{SENDER_PROPERTY}" user property must be 1..{MAX_ID_LENGTH} characters '
            "A-Z a-z 0-9 _ . : @ -"
        )
    return sender


def peek_command_id(payload: bytes) -> str | None:
    """The id of a command if it can be read cheaply and safely, else None."""
    try:
        document = _parse_json(payload)
    except CommandRejected:
        return None
    return valid_command_id(document.get("id")) if isinstance(document, dict) else None


def validate_params(params: Any, specs: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Check params against the declared specs (exactly the declared keys, all required)."""
    if not isinstance(params, dict):
        raise CommandRejected('"params" must be an object')
    unknown = sorted(set(params) - set(specs))
    if unknown:
        raise CommandRejected(f"unknown parameter(s) {_names(unknown)}")
    missing = sorted(set(specs) - set(params))
    if missing:
        raise CommandRejected(f"missing parameter(s) {_names(missing)}")
    return {name: _check_param(name, params[name], spec) for name, spec in specs.items()}


def _check_param(name: str, value: Any, spec: ParamSpec) -> Any:
    where = f"params.{name}"
    if spec.type == "bool":
        if not isinstance(value, bool):
            raise CommandRejected(f"{where}: expected true or false, got {_kind(value)}")
        return value
    if spec.type == "str":
        return _check_text(where, value, spec)
    return _check_number(where, value, spec)


def _check_text(where: str, value: Any, spec: ParamSpec) -> str:
    if not isinstance(value, str):
        raise CommandRejected(f"{where}: expected a string, got {_kind(value)}")
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise CommandRejected(f"{where}: control characters are not allowed")
    length = len(value)
    if spec.low is not None and length < spec.low:
        raise CommandRejected(f"{where}: {length} characters, at least {int(spec.low)}")
    if spec.high is not None and length > spec.high:
        raise CommandRejected(f"{where}: {length} characters, at most {int(spec.high)}")
    return value


def _check_number(where: str, value: Any, spec: ParamSpec) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandRejected(f"{where}: expected a number, got {_kind(value)}")
    number: int | float
    if spec.type == "int":
        if not isinstance(value, int):
            raise CommandRejected(f"{where}: expected an integer, got {short(value)}")
        number = value
    else:
        try:
            number = float(value)
        except OverflowError:
            raise CommandRejected(f"{where}: number out of range") from None
        if not math.isfinite(number):
            raise CommandRejected(f"{where}: must be finite")
    if spec.low is not None and number < spec.low:
        raise CommandRejected(f"{where}: {short(number)} is below the minimum {_num(spec.low)}")
    if spec.high is not None and number > spec.high:
        raise CommandRejected(f"{where}: {short(number)} is above the maximum {_num(spec.high)}")
    return number


def _num(bound: float) -> str:
    return str(int(bound)) if bound.is_integer() else str(bound)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), "an object" if isinstance(value, dict) else "an array"
    )


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def clip(text: str) -> str:
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 3] + "..."


def _names(names: list[str]) -> str:
    shown = ", ".join(short(name) for name in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


_FORMATTER = string.Formatter()


def render(value: StepValue, params: Mapping[str, Any]) -> JsonValue:
    """Fill a step value's template: ``"{p}"`` alone keeps p's type, others become strings."""
    if not isinstance(value, str):
        return value
    names = template_fields(value)
    if len(names) == 1 and value == "{" + names[0] + "}":
        result: JsonValue = params[names[0]]
        return result
    return _FORMATTER.vformat(value, (), dict(params))


class TokenBucket:
    """``count`` tokens per ``period`` seconds, at most ``count`` saved up (monotonic clock)."""

    def __init__(self, count: int, period: float, *, now: float) -> None:
        self.capacity = float(count)
        self.rate = count / period
        self.tokens = float(count)
        self.stamp = now

    def take(self, now: float) -> bool:
        """Take a token if one is available."""
        elapsed = max(0.0, now - self.stamp)  # monotonic: never negative, but be safe
        self.stamp = now
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
