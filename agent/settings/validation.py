"""Config validation in strict mode, and the cross-field checks of the parts that validate.

A config file is JSON-like data (TOML: strings, numbers, booleans, arrays, tables, dates), so
it is validated as JSON in pydantic's strict mode: a value must already have the type its key
documents. Pydantic's default, lax mode, converts text to numbers and booleans
(``unit_id = "1"``, ``scale = "0.1"``, ``writable = "yes"`` were accepted); strict mode refuses
them. JSON's own readings stay: a string names a path or an ISO date, an array fills a tuple,
an integer is a float. Every file and environment value reaches a settings model through
`validate_settings` or `validate_part`: the one rule, whatever the model.

When a file has errors the whole model cannot be built, so its cross-field checks
(``problems()``) cannot run as one; `ValidParts` runs those of every part that validates on
its own (a device, a tag, a calendar) and names the parts whose checks must wait.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import types
import typing
from collections.abc import Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, Tag, TypeAdapter, ValidationError

from drivers.config import Problem

KeyPath = tuple[str | int, ...]
ModelT = TypeVar("ModelT", bound=BaseModel)


def _json_default(value: object) -> str:
    if isinstance(value, dt.date | dt.time):  # TOML's dates and times (datetime is a date)
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not a config value")


def as_json(data: object) -> str:
    """Config data (parsed TOML, environment values) as JSON text."""
    return json.dumps(data, default=_json_default)


def validate_settings(cls: type[ModelT], data: object) -> ModelT:
    """A settings model from config data, strictly (ValidationError lists every error)."""
    return cls.model_validate_json(as_json(data), strict=True)


@functools.lru_cache(maxsize=64)  # one per section or item type of the config models
def _adapter(annotation: Any) -> TypeAdapter[object]:
    # `Any`: a type form (a union, an Annotated type), which mypy cannot spell as a value.
    adapter: TypeAdapter[object] = TypeAdapter(annotation)
    return adapter


def validate_part(annotation: object, data: object) -> object:
    """One part of a config (a section, a device, a tag) on its own, as `validate_settings`."""
    return _adapter(annotation).validate_json(as_json(data), strict=True)


def sequence_item(annotation: object) -> object | None:
    """X of ``tuple[X, ...]`` (the arrays of a config), else None."""
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            item: object = args[0]
            return item
    return None


def union_members(annotation: object) -> list[tuple[type[BaseModel], str | None]]:
    """The models an annotation may hold, each with its union tag (``driver:modbus``) if any:
    ``X``, ``X | None``, ``Annotated[X, ...]``, a tagged union of models."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *metadata = typing.get_args(annotation)
        tag = next((item.tag for item in metadata if isinstance(item, Tag)), None)
        return [(model, tag or member_tag) for model, member_tag in union_members(inner)]
    if origin in (typing.Union, types.UnionType):
        return [member for arg in typing.get_args(annotation) for member in union_members(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, None)]
    return []


def _checks_fields(model: type[BaseModel]) -> bool:
    return callable(getattr(model, "problems", None))


class ValidParts:
    """Walks config data that failed validation: the cross-field problems of every part that
    validates on its own, and the parts with cross-field checks that cannot run."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.waiting: list[KeyPath] = []  # parts whose own checks wait for their errors

    def walk(self, root: type[BaseModel], data: object, error_locs: list[KeyPath]) -> None:
        """Start at the root model, whose validation failed with errors at `error_locs`."""
        self._visit(root, data, (), error_locs)

    def _visit(
        self, annotation: object, value: object, loc: KeyPath, errors: list[KeyPath]
    ) -> None:
        members = union_members(annotation)
        if not members:
            return  # a scalar: nothing to check across fields
        if not errors:
            self._check(annotation, value, loc)
            return
        if any(_checks_fields(model) for model, _ in members):
            self.waiting.append(loc)
        model, errors = _member(members, errors)
        if model is not None and isinstance(value, dict):
            self._fields(model, value, loc, errors)

    def _fields(
        self, model: type[BaseModel], value: dict[str, Any], loc: KeyPath, errors: list[KeyPath]
    ) -> None:
        for name, field in model.model_fields.items():
            if name not in value:
                continue
            below = [error[1:] for error in errors if error and error[0] == name]
            item = sequence_item(field.annotation)
            if item is None or not isinstance(value[name], list):
                self._visit(field.annotation, value[name], (*loc, name), below)
                continue
            for index, element in enumerate(value[name]):
                at_index = [error[1:] for error in below if error and error[0] == index]
                self._visit(item, element, (*loc, name, index), at_index)

    def _check(self, annotation: object, value: object, loc: KeyPath) -> None:
        try:
            part = validate_part(annotation, value)
        except ValidationError:
            # Valid inside the whole file but not alone (a default the file's root fills in):
            # its checks wait with the others.
            self.waiting.append(loc)
            return
        problems = getattr(part, "problems", None)
        if callable(problems):
            found: Iterator[Problem] = problems()
            self.problems += [((*loc, *where), reason) for where, reason in found]


def _member(
    members: list[tuple[type[BaseModel], str | None]], errors: list[KeyPath]
) -> tuple[type[BaseModel] | None, list[KeyPath]]:
    """The model the errors are about, and the errors relative to it: a tagged union's errors
    start with the member's tag (``driver:modbus``); a plain model needs none."""
    if len(members) == 1 and members[0][1] is None:
        return members[0][0], errors
    for model, tag in members:
        tagged = [error[1:] for error in errors if error and error[0] == tag]
        if tagged:
            return model, tagged
    return None, errors  # the union itself was refused (e.g. an unknown driver)
