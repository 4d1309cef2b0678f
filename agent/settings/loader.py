"""Load a config file: read, parse TOML, apply env overrides and secrets, validate.

Every failure becomes a `ConfigError` holding one readable line per problem,
``path.to.field: reason (line N)``; nothing here ever lets a traceback reach a user.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings
from pydantic_settings.sources import EnvSettingsSource

from agent.settings.common import ENV_PREFIX, SettingsFile
from agent.settings.config_file import AgentSettings
from agent.settings.toml_lines import Path as KeyPath
from agent.settings.toml_lines import key_lines, line_of
from agent.settings.workflows import ConfirmStep as _ConfirmStep
from agent.settings.workflows import WaitStep, WriteStep
from drivers.config import Problem, redact_urls
from drivers.registry import DRIVER_TAG_PREFIX, DRIVERS

SettingsT = TypeVar("SettingsT", bound=SettingsFile)

# Keys whose value may instead come from a file: `password_file` -> `password`.
SECRET_KEYS = ("password", "dsn")
MAX_CONFIG_BYTES = 4 * 1024 * 1024
_STEP_MODELS: dict[str, type[BaseModel]] = {
    "step:write": WriteStep,
    "step:wait": WaitStep,
    "step:confirm": _ConfirmStep,
}


# Which secret files a command needs (docs/install.md "Secrets"): `run` and `ingest` need every
# one; `probe` only the devices'; `check`, `status` and `oee --replay` none. A missing file
# that a command does not need becomes a warning, so the README's `check` of the example config
# passes on a fresh clone and says what `run` will still need.
SecretsNeeded = Callable[[KeyPath], bool]


def every_secret(_path: KeyPath) -> bool:
    """The daemons (`run`, `ingest`) need every secret file."""
    return True


def no_secret(_path: KeyPath) -> bool:
    """`check`, `status` and `oee --replay` read no secret."""
    return False


def device_secrets(path: KeyPath) -> bool:
    """`probe` logs in to the devices and never to the broker."""
    return bool(path) and path[0] == "devices"


class ConfigError(Exception):
    """A config that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_agent_settings(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    secrets_needed: SecretsNeeded = every_secret,
) -> AgentSettings:
    """Load and validate an agent config file (docs/configuration.md)."""
    return load_settings_with_warnings(
        AgentSettings, path, environ=environ, secrets_needed=secrets_needed
    )[0]


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a config file"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: permission denied"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: {len(data)} bytes; a config file is at most 4 MiB"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [
                f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                "save the file as UTF-8"
            ]
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise ConfigError([f"{path}: the file is empty"])
    return text


def _parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        if match:
            reason = message[: match.start()].strip()
            raise ConfigError(
                [f"{path}:{match.group(1)}: invalid TOML: {reason} (column {match.group(2)})"]
            ) from None
        if "end of document" in message:
            line = text.count("\n") + 1
            reason = re.sub(r"\s*\(at end of document\)", "", message)
            raise ConfigError([f"{path}:{line}: invalid TOML: {reason} (at end of file)"]) from None
        raise ConfigError([f"{path}: invalid TOML: {message}"]) from None


def _env_values(cls: type[BaseSettings], environ: Mapping[str, str] | None) -> dict[str, Any]:
    """Values from EDGE_AGENT__SECTION__KEY variables, nested like the file."""
    if environ is None:
        return dict(EnvSettingsSource(cls)())
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(environ)
        return dict(EnvSettingsSource(cls)())
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _env_paths(values: Mapping[str, Any], prefix: KeyPath = ()) -> dict[KeyPath, str]:
    """Leaf paths that came from the environment, with the variable that set them."""
    out: dict[KeyPath, str] = {}
    for key, value in values.items():
        path = (*prefix, key)
        if isinstance(value, Mapping):
            out.update(_env_paths(value, path))
        else:
            out[path] = ENV_PREFIX + "__".join(str(part).upper() for part in path)
    return out


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _secret_dirs(config_path: Path, environ: Mapping[str, str]) -> list[Path]:
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    dirs = [Path(credentials)] if credentials else []
    dirs.append(config_path.resolve().parent)
    return dirs


class _SecretFindings:
    """What resolving the `X_file` references found: problems, and files missing but unneeded."""

    def __init__(self, needed: SecretsNeeded) -> None:
        self.needed = needed
        self.problems: list[tuple[KeyPath, str]] = []
        self.unneeded_missing: list[tuple[KeyPath, str]] = []


def _resolve_secrets(node: Any, path: KeyPath, dirs: list[Path], found: _SecretFindings) -> Any:
    """Replace every `X_file` secret reference by reading it into `X` (X: password, dsn)."""
    if isinstance(node, list):
        return [_resolve_secrets(item, (*path, i), dirs, found) for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    problems = found.problems
    out = {key: _resolve_secrets(value, (*path, key), dirs, found) for key, value in node.items()}
    for key in SECRET_KEYS:
        file_key = f"{key}_file"
        if file_key not in out:
            continue
        if key in out:
            problems.append(((*path, file_key), f"set {key} or {file_key}, not both"))
            continue
        reference = out[file_key]
        if not isinstance(reference, str) or not reference:
            continue  # the model reports the type error
        candidate = Path(reference)
        candidates = [candidate] if candidate.is_absolute() else [d / candidate for d in dirs]
        for option in candidates:
            try:
                secret = option.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(((*path, file_key), f"cannot read {option}: {exc}"))
                break
            secret = secret.rstrip("\r\n")
            if not secret:
                problems.append(((*path, file_key), f"{option} is empty"))
            out[key] = secret
            break
        else:
            where = " or ".join(str(option) for option in candidates)
            if found.needed((*path, file_key)):
                problems.append(((*path, file_key), f"no such file: {where}"))
            else:
                reason = f"no such file: {where}; the service will not start without it"
                found.unneeded_missing.append(((*path, file_key), reason))
    return out


def load_settings(
    cls: type[SettingsT],
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    secrets_needed: SecretsNeeded = every_secret,
) -> SettingsT:
    """Load and validate a config file of either program into its settings model."""
    return load_settings_with_warnings(cls, path, environ=environ, secrets_needed=secrets_needed)[0]


def load_settings_with_warnings(
    cls: type[SettingsT],
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    secrets_needed: SecretsNeeded = every_secret,
) -> tuple[SettingsT, list[str]]:
    """`load_settings`, and one line per warning (``path.to.field: reason (line N)``)."""
    path = Path(path)
    env = dict(os.environ) if environ is None else dict(environ)
    text = _read_text(path)
    raw = _parse_toml(path, text)
    lines = key_lines(text)
    try:
        env_values = _env_values(cls, env)
    except Exception as exc:  # pydantic-settings raises SettingsError on undecodable JSON
        raise ConfigError([redact_urls(f"environment: {exc}")]) from None
    env_paths = _env_paths(env_values)
    data = _deep_merge(raw, env_values)
    secrets = _SecretFindings(secrets_needed)
    data = _resolve_secrets(data, (), _secret_dirs(path, env), secrets)
    secret_problems = secrets.problems

    def where(loc: KeyPath) -> str:
        for end in range(len(loc), 0, -1):
            variable = env_paths.get(loc[:end])
            if variable is not None:
                return f" (from {variable})"
        line = line_of(lines, loc)
        return f" (line {line})" if line is not None else ""

    def located(found: Iterable[Problem]) -> list[str]:
        return [f"{dotted(loc)}: {reason}{where(loc)}" for loc, reason in found]

    try:
        settings: SettingsT = cls.model_validate(data)
    except ValidationError as exc:
        messages = [_format_error(cls, error, where) for error in exc.errors()]
        raise ConfigError(_dedupe([*messages, *located(secret_problems)])) from None
    messages = located([*secret_problems, *settings.problems()])
    if messages:
        raise ConfigError(_dedupe(messages))
    return settings, _dedupe(located([*secrets.unneeded_missing, *settings.warnings()]))


def _dedupe(messages: list[str]) -> list[str]:
    # Every line a user sees passes here: a URL's password is never echoed (docs/install.md).
    return list(dict.fromkeys(redact_urls(message) for message in messages))


def dotted(loc: Iterable[str | int]) -> str:
    """('devices', 0, 'tags', 1, 'address') -> 'devices[0].tags[1].address'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(root)"


def _is_union_tag(part: str | int) -> bool:
    return isinstance(part, str) and part.startswith((DRIVER_TAG_PREFIX, "step:"))


def _model_at(root: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class that holds the value at `loc` (union tags in `loc` choose the member)."""
    current: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if isinstance(part, str) and part.startswith(DRIVER_TAG_PREFIX):
            spec = DRIVERS.get(part[len(DRIVER_TAG_PREFIX) :])
            current = spec.config if spec else None
            continue
        if isinstance(part, str) and part in _STEP_MODELS:
            current = _STEP_MODELS[part]
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _unwrap_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    """tuple[X, ...] / X | None / Annotated[X, ...] -> X when X is a model."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap_model(typing.get_args(annotation)[0])
    if origin in (tuple, list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            inner = _unwrap_model(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
        return None
    return annotation


def _format_error(cls: type[BaseModel], error: ErrorDetails, where: Any) -> str:
    raw_loc = tuple(error["loc"])
    loc = tuple(part for part in raw_loc if not _is_union_tag(part))
    kind = error["type"]
    message = error["msg"]
    value = error.get("input")
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        parent = _model_at(cls, raw_loc[:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(key, list(parent.model_fields), n=1, cutoff=0.6)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
            else:
                hint = f"; known keys: {', '.join(parent.model_fields)}"
        message = f"unknown key{hint}"
    elif kind == "missing":
        message = "required"
    elif kind == "unknown_driver":
        given = value.get("driver") if isinstance(value, dict) else None
        message = (
            f"unknown driver {given!r}; known drivers: {', '.join(DRIVERS)}"
            if given is not None
            else f"required: driver = one of {', '.join(DRIVERS)}"
        )
        loc = (*loc, "driver")
    elif kind == "step_kind":
        message = "a step needs exactly one of the keys write, wait, confirm"
    else:
        message = re.sub(r"^(Value error|Assertion failed), ", "", message)
        if kind.endswith(("_type", "_parsing", "literal_error", "pattern_mismatch")) or kind in (
            "greater_than",
            "greater_than_equal",
            "less_than",
            "less_than_equal",
            "too_short",
            "too_long",
            "string_pattern_mismatch",
        ):
            shown = repr(value)
            secret = bool(loc) and loc[-1] in SECRET_KEYS
            if not secret and len(shown) <= 60 and not isinstance(value, dict | list):
                message += f", got {shown}"
    return f"{dotted(loc)}: {message}{where(loc)}"
