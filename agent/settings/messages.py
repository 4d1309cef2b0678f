"""One readable reason per config error: pydantic's errors reworded, with suggestions.

A key where it does not belong gets where it goes (``port`` -> in ``url``, ``scale`` on a
device -> a tag key), a near-miss choice gets the choice it misses (``type = "float"`` ->
``float32``), a quoted number or boolean gets how to write it. The loader adds the location,
``path.to.field: reason (line N)``.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from agent.settings.validation import KeyPath, sequence_item, union_members
from drivers.registry import DRIVER_TAG_PREFIX, DRIVERS
from drivers.values import short

STEP_TAG_PREFIX = "step:"
SECRET_KEYS = ("password", "dsn", "key_password", "token")


def dotted(loc: KeyPath) -> str:
    """('devices', 0, 'tags', 1, 'address') -> 'devices[0].tags[1].address'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(root)"


def is_union_tag(part: str | int) -> bool:
    """A union member's tag in an error location (``driver:modbus``), not a key."""
    return isinstance(part, str) and part.startswith((DRIVER_TAG_PREFIX, STEP_TAG_PREFIX))


def model_at(root: type[BaseModel], raw_loc: KeyPath) -> type[BaseModel] | None:
    """The model holding the value at `raw_loc` (union tags in it choose the member)."""
    annotation: object = root
    for part in raw_loc:
        if isinstance(part, int):
            annotation = sequence_item(annotation)
            continue
        members = union_members(annotation)
        tagged = [model for model, tag in members if tag == part]
        if tagged:
            annotation = tagged[0]
            continue
        if len(members) != 1:
            return None
        field = members[0][0].model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
    members = union_members(annotation)
    return members[0][0] if len(members) == 1 else None


# ---------------------------------------------------------------------- keys out of place


@dataclass(frozen=True, slots=True)
class Misplaced:
    """Keys people write that the config spells otherwise or keeps elsewhere: `reason` when
    the table they were written in has the key `where`, followed by that key's example (the
    first one holding `example_with`) when `example` is set."""

    keys: frozenset[str]
    where: str
    reason: str
    example: bool = False
    example_with: str = ""


def _misplaced(keys: str, where: str, reason: str, example_with: str | None = None) -> Misplaced:
    return Misplaced(
        frozenset(keys.split()), where, reason, example_with is not None, example_with or ""
    )


MISPLACED: tuple[Misplaced, ...] = (
    _misplaced("port tcp_port", "url", "put the port in url", ":"),
    _misplaced("port", "listen", "put the port in listen (HOST:PORT)", ":"),
    _misplaced("host hostname ip ip_address server endpoint", "url", "put the host in url", ""),
    _misplaced("host hostname ip", "listen", "put the host in listen (HOST:PORT)", ":"),
    _misplaced(
        "baudrate baud_rate parity stopbits stop_bits bytesize data_bits serial_port",
        "url",
        "serial settings go in url",
        "?baudrate",
    ),
    _misplaced(
        "interval scan_interval scan_rate poll_rate polling_interval cycle_time",
        "poll_interval",
        "did you mean 'poll_interval'?",
    ),
    _misplaced(
        "interval poll_interval scan_rate polling_interval",
        "address",
        "a tag is read at its device's poll_interval: set it on the device",
    ),
    _misplaced(
        "interval poll_interval polling_interval",
        "node_id",
        'set poll_interval on the device (with mode = "poll") or sampling_interval here',
    ),
    _misplaced("slave slave_id unit station station_id", "unit_id", "did you mean 'unit_id'?"),
    _misplaced("user user_name login", "username", "did you mean 'username'?"),
    _misplaced("tag", "tags", "write [[devices.tags]] (plural)"),
    _misplaced("topic topic_prefix prefix", "topic_root", "did you mean 'topic_root'?"),
)


def _example(parent: type[BaseModel], rule: Misplaced) -> str:
    """`, e.g. '<example>'` of the key a misplaced key belongs in (its examples or default)."""
    field = parent.model_fields[rule.where]
    candidates = [*(field.examples or []), field.default]
    chosen = next((c for c in candidates if isinstance(c, str) and rule.example_with in c), None)
    return f", e.g. {chosen!r}" if rule.example and chosen else ""


def unknown_key_reason(root: type[BaseModel], raw_loc: KeyPath) -> str:
    """Why a key is refused, and where it belongs when that is known."""
    key = str(raw_loc[-1]) if raw_loc else ""
    parent = model_at(root, raw_loc[:-1])
    if parent is None:
        return "unknown key"
    fields = parent.model_fields
    for rule in MISPLACED:
        if key in rule.keys and rule.where in fields:
            return f"unknown key; {rule.reason}{_example(parent, rule)}"
    # A key that exists as written in another table is most likely misplaced: that first,
    # then a near miss of a key of this table (`unit_id` on a tag is not a typo of `unit`).
    elsewhere = _tables_with(root, parent, key)
    if elsewhere:
        return f"unknown key here; {key} is a key of {' and of '.join(elsewhere)}"
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key; known keys: {', '.join(fields)}"


@functools.lru_cache(maxsize=8)
def _tables(root: type[BaseModel]) -> dict[type[BaseModel], tuple[tuple[str, ...], str]]:
    """Every model of a config file: its table path (``("devices", "tags")``) and label
    (``[[devices.tags]]``, with the driver of a driver's model)."""
    out: dict[type[BaseModel], tuple[tuple[str, ...], str]] = {}

    def walk(annotation: object, path: tuple[str, ...], array: bool, qualifier: str) -> None:
        for model, tag in union_members(annotation):
            if model in out:
                continue
            own = qualifier
            if tag is not None and tag.startswith(DRIVER_TAG_PREFIX):
                own = f' (driver = "{tag.removeprefix(DRIVER_TAG_PREFIX)}")'
            name = ".".join(path)
            label = "the top level" if not path else f"[[{name}]]" if array else f"[{name}]"
            out[model] = (path, label + own)
            for field_name, field in model.model_fields.items():
                item = sequence_item(field.annotation)
                inner = item if item is not None else field.annotation
                walk(inner, (*path, field_name), item is not None, own)

    walk(root, (), False, "")
    return out


def _tables_with(root: type[BaseModel], parent: type[BaseModel], key: str) -> list[str]:
    """Labels of the tables nearest `parent` (sharing most of its path) that have `key`."""
    tables = _tables(root)
    here = tables.get(parent, ((), ""))[0]
    found = [(path, label) for model, (path, label) in tables.items() if key in model.model_fields]
    if not found:
        return []
    best = max(_shared(path, here) for path, _ in found)
    return sorted({label for path, label in found if _shared(path, here) == best})[:2]


def _shared(path: tuple[str, ...], other: tuple[str, ...]) -> int:
    """How many leading keys two table paths share."""
    count = 0
    for mine, theirs in zip(path, other, strict=False):
        if mine != theirs:
            break
        count += 1
    return count


# ---------------------------------------------------------------------- values


def choice_reason(given: object, expected: str, what: str = "value") -> str:
    """A value outside a fixed set (``expected``: "'a', 'b' or 'c'"): the choice it nearly
    matches, else the set."""
    choices = re.findall(r"'([^']*)'", expected)
    if not isinstance(given, str) or not choices:
        return f"must be {expected}, got {given!r}"
    ratios = [difflib.SequenceMatcher(None, given.lower(), c.lower()).ratio() for c in choices]
    best = max(ratios)
    if best >= 0.6:
        # Equally close choices: the first one declared ('float32' before 'float64').
        return f"unknown {what} {given!r}; did you mean {choices[ratios.index(best)]!r}?"
    return f"unknown {what} {given!r}; one of: {', '.join(choices)}"


_TYPE_NAMES = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "text in quotes",
    "tuple_type": "an array [...]",
    "list_type": "an array [...]",
    "dict_type": "a table",
    "model_type": "a table",
    "date_type": "a date (2026-01-31)",
}


def type_reason(kind: str, value: object) -> str | None:
    """A value of the wrong TOML type: what the key takes, and how to write it."""
    wanted = _TYPE_NAMES.get(kind)
    if wanted is None:
        return None
    if isinstance(value, dict | list):
        shown = "a table" if isinstance(value, dict) else "an array"
    else:
        shown = short(value)  # a value from the file: at most 64 characters
    hint = _how_to_write(kind, value)
    return f"must be {wanted}, got {shown}" + (f": {hint}" if hint else "")


def _how_to_write(kind: str, value: object) -> str:
    if isinstance(value, str):
        text = value.strip()
        if kind == "int_type" and re.fullmatch(r"[-+]?\d+", text):
            return f"write {int(text)} without quotes"
        if kind == "float_type" and _is_number(text):
            return f"write {text} without quotes"
        if kind == "bool_type":
            word = text.lower()
            if word in ("true", "false"):
                return f"write {word} without quotes"
            return "write true or false without quotes"
    if kind == "int_type" and isinstance(value, float) and value.is_integer():
        return f"write {int(value)}"
    if kind == "bool_type" and isinstance(value, int) and value in (0, 1):
        return f"write {'true' if value else 'false'}"
    if kind == "string_type" and isinstance(value, int | float | bool):
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        return f'write "{shown}" in quotes'
    return ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_BOUNDS = (
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "too_short",
    "too_long",
    "string_pattern_mismatch",
)


def error_reason(root: type[BaseModel], error: ErrorDetails) -> tuple[KeyPath, str]:
    """The location (union tags removed) and the reason of one validation error."""
    raw_loc = tuple(error["loc"])
    loc = tuple(part for part in raw_loc if not is_union_tag(part))
    kind = error["type"]
    value = error.get("input")
    secret = bool(loc) and loc[-1] in SECRET_KEYS
    special: dict[str, Callable[[], str]] = {
        "extra_forbidden": lambda: unknown_key_reason(root, raw_loc),
        "missing": lambda: "required",
        "step_kind": lambda: "a step needs exactly one of the keys write, wait, confirm",
        "literal_error": lambda: choice_reason(value, str(error.get("ctx", {}).get("expected"))),
    }
    if kind == "unknown_driver":
        given = value.get("driver") if isinstance(value, dict) else None
        expected = " or ".join(repr(name) for name in DRIVERS)
        message = (
            choice_reason(given, expected, "driver")
            if given is not None
            else f"required: driver = one of {', '.join(DRIVERS)}"
        )
        return (*loc, "driver"), message
    if kind in special:
        return loc, special[kind]()
    typed = None if secret else type_reason(kind, value)
    if typed is not None:
        return loc, typed
    message = re.sub(r"^(Value error|Assertion failed), ", "", error["msg"])
    if kind.endswith(("_parsing", "pattern_mismatch")) or kind in _BOUNDS:
        shown = repr(value)
        if not secret and len(shown) <= 60 and not isinstance(value, dict | list):
            message += f", got {shown}"
    return loc, message
