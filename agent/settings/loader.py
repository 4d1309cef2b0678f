"""Load a config file: read, parse TOML, apply env overrides and secrets, validate.

Every failure becomes a `ConfigError` holding one readable line per problem,
``path.to.field: reason (line N)``; nothing here ever lets a traceback reach a user.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings
from pydantic_settings.sources import EnvSettingsSource

from agent.settings.common import ENV_PREFIX, SettingsFile
from agent.settings.config_file import AgentSettings
from agent.settings.messages import SECRET_KEYS, error_reason, model_at
from agent.settings.messages import dotted as dotted  # re-exported: the programs' messages
from agent.settings.toml_lines import Path as KeyPath
from agent.settings.toml_lines import key_lines, line_of
from agent.settings.validation import ValidParts, validate_part, validate_settings
from drivers.config import Problem, redact_urls

SettingsT = TypeVar("SettingsT", bound=SettingsFile)

MAX_CONFIG_BYTES = 4 * 1024 * 1024


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


def _typed_env(cls: type[SettingsFile], values: dict[str, Any], prefix: KeyPath = ()) -> None:
    """An environment variable is text: where the text is not a valid value of its key but
    its JSON reading is a number or a boolean (``64``, ``0.5``, ``true``), that reading is
    the value. The file's values are never read so (agent/settings/validation.py)."""
    for key, value in values.items():
        path = (*prefix, key)
        if isinstance(value, dict):
            _typed_env(cls, value, path)
            continue
        model = model_at(cls, prefix)
        field = model.model_fields.get(key) if model is not None else None
        if field is not None and isinstance(value, str):
            values[key] = _env_value(field.annotation, value)


def _env_value(annotation: Any, text: str) -> Any:
    try:
        validate_part(annotation, text)
    except ValidationError:
        pass
    else:
        return text
    try:
        parsed = json.loads(text)
    except ValueError:
        return text  # refused as text, naming the variable
    return parsed if isinstance(parsed, bool | int | float) else text


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
    _typed_env(cls, env_values)
    env_paths = _env_paths(env_values)
    data = _deep_merge(raw, env_values)
    secrets = _SecretFindings(secrets_needed)
    data = cls.completed(_resolve_secrets(data, (), _secret_dirs(path, env), secrets))
    locate = _Locator(lines, env_paths)
    try:
        settings = validate_settings(cls, data)
    except ValidationError as exc:
        errors = exc.errors()
        parts = ValidParts()
        parts.walk(cls, data, [tuple(error["loc"]) for error in errors])
        found = [error_reason(cls, error) for error in errors]
        messages = locate.in_line_order([*found, *secrets.problems, *parts.problems])
        raise ConfigError(_dedupe([*messages, *_waiting(cls, parts.waiting)])) from None
    messages = locate.in_line_order([*secrets.problems, *settings.problems()])
    if messages:
        raise ConfigError(_dedupe(messages))
    warnings = locate.in_line_order([*secrets.unneeded_missing, *settings.warnings()])
    return settings, _dedupe(warnings)


class _Locator:
    """Where a problem is: the line of its key in the file, or the variable that set it."""

    def __init__(self, lines: dict[KeyPath, int], env_paths: dict[KeyPath, str]) -> None:
        self._lines = lines
        self._env_paths = env_paths

    def _variable(self, loc: KeyPath) -> str | None:
        for end in range(len(loc), 0, -1):
            variable = self._env_paths.get(loc[:end])
            if variable is not None:
                return variable
        return None

    def in_line_order(self, found: Iterable[Problem]) -> list[str]:
        """``path.to.field: reason (line N)`` per problem, in the order of the file's lines
        (those set by a variable, or with no line, after them in the order found)."""
        located: list[tuple[float, str]] = []
        for loc, reason in found:
            variable = self._variable(loc)
            line = None if variable is not None else line_of(self._lines, loc)
            where = f" (from {variable})" if variable else f" (line {line})" if line else ""
            located.append((math.inf if line is None else line, f"{dotted(loc)}: {reason}{where}"))
        return [message for _, message in sorted(located, key=lambda item: item[0])]


_WAITING_SHOWN = 5


def _waiting(cls: type[SettingsFile], waiting: list[KeyPath]) -> list[str]:
    """The one line naming the cross-field checks that wait for the errors to be fixed."""
    names = [dotted(loc) for loc in waiting if loc]
    if len(names) > _WAITING_SHOWN:
        names = [*names[:_WAITING_SHOWN], f"{len(names) - _WAITING_SHOWN} more parts"]
    if () in waiting and cls.CROSS_SECTION_CHECKS:
        names.append(cls.CROSS_SECTION_CHECKS)
    if not names:
        return []
    listed = ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]
    return [f"(root): the cross-field checks of {listed} wait until the errors above are fixed"]


def _dedupe(messages: list[str]) -> list[str]:
    # Every line a user sees passes here: a URL's password is never echoed (docs/install.md).
    return list(dict.fromkeys(redact_urls(message) for message in messages))
