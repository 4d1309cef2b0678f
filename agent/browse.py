"""`edge-agent browse`: an OPC UA server's address space as a tree, or as ready
``[[devices.tags]]`` blocks (docs/opcua.md, "Browsing a server").

The connection is a device's: a device config built from the flags, or a configured device
(``-c FILE --device NAME``), connected by the OPC UA driver itself (its security, pinned
server certificate, login and error messages). This module builds that config and the text;
the browsing is ``drivers/opcua/browse.py``, the text ``drivers/opcua/browse_text.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import uvloop
from pydantic import ValidationError

from agent.daemon.devices import driver_context
from agent.settings.loader import load_agent_settings, no_secret
from agent.settings.toml_lines import Path as KeyPath
from drivers.base import DriverContext, DriverError
from drivers.opcua.browse import BadStartNode, BrowseLimits
from drivers.opcua.browse_text import (
    BrowseResult,
    namespace_index_form,
    printable,
    toml_blocks,
    tree_lines,
)
from drivers.opcua.config import OpcUaDeviceConfig
from drivers.opcua.driver import OpcUaDriver

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1  # unreachable, refused (security, login), or failed while browsing
EXIT_USAGE: Final = 2  # bad flags or config, a start node that is wrong or not on the server
EXIT_STOPPED: Final = 3  # the node bound was reached: what was found is printed
PASSWORD_ENV: Final = "EDGE_AGENT_OPCUA_PASSWORD"
# The device keys the flags set, and the flag that sets each (for messages).
_FLAGS: Final[Mapping[str, str]] = {
    "url": "URL",
    "security_policy": "--security-policy",
    "security_mode": "--security-mode",
    "certificate": "--certificate",
    "private_key": "--private-key",
    "server_certificate": "--server-certificate",
    "username": "--username",
    "password": "--password-file",
    "timeout": "--timeout",
}


class BrowseUsageError(Exception):
    """Flags that cannot be used: one line per problem, exit 2."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Target:
    """The server to browse: a device config and what the driver gets with it."""

    device: OpcUaDeviceConfig
    context: DriverContext
    configured: bool = False  # a configured device: its tags are known


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the command prints (stdout, then stderr lines) and its exit code."""

    code: int
    text: str = ""
    messages: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------- the device


def _connection_flags(args: argparse.Namespace) -> list[str]:
    given = [
        flag
        for key, flag in _FLAGS.items()
        if key not in ("url", "password") and getattr(args, key) is not None
    ]
    if args.password_file is not None:
        given.append("--password-file")
    return given


def target_from_flags(args: argparse.Namespace, environ: Mapping[str, str]) -> Target:
    """A device config from URL and the security flags (validated as a configured one)."""
    values: dict[str, Any] = {
        "name": "browse",
        "driver": "opcua",
        "url": args.url,
    }
    for key in ("security_policy", "security_mode", "username", "timeout"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    for key in ("certificate", "private_key", "server_certificate"):
        if getattr(args, key) is not None:
            values[key] = str(getattr(args, key))
    password = _password(args, environ)
    if password is not None:
        values["password"] = password
    try:
        device = OpcUaDeviceConfig.model_validate(values)
    except ValidationError as exc:
        raise BrowseUsageError([_flag_problem(error) for error in exc.errors()]) from None
    problems = [f"{_flag_of(loc)}: {reason}" for loc, reason in device.problems()]
    if device.security_mode != "None" and device.certificate is None and not problems:
        problems.append(
            f"--security-mode {device.security_mode}: give --certificate and --private-key "
            "(created when both files are absent; the server must trust that certificate)"
        )
    if problems:
        raise BrowseUsageError(problems)
    return Target(device=device, context=DriverContext())


def _password(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """From --password-file, else from $EDGE_AGENT_OPCUA_PASSWORD when a user is given."""
    path: Path | None = args.password_file
    if path is None:
        return environ.get(PASSWORD_ENV) or None if args.username else None
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise BrowseUsageError([f"--password-file: cannot read {path}: {exc}"]) from None
    if not secret:
        raise BrowseUsageError([f"--password-file: {path} is empty"])
    return secret


def _flag_of(loc: tuple[str | int, ...]) -> str:
    return _FLAGS.get(str(loc[0]), str(loc[0])) if loc else "browse"


def _flag_problem(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{_flag_of(tuple(error['loc']))}: {message}"


def target_from_config(path: Path, name: str | None) -> Target:
    """A configured OPC UA device: its connection, certificate pair and password file."""
    settings = load_agent_settings(path, secrets_needed=no_secret)
    opcua = [
        (index, device)
        for index, device in enumerate(settings.devices)
        if isinstance(device, OpcUaDeviceConfig)
    ]
    names = ", ".join(device.name for _, device in opcua) or "none"
    if name is None:
        if len(opcua) != 1:
            raise BrowseUsageError([f"--device: name one of the OPC UA devices ({names})"])
        chosen = opcua[0][0]
    else:
        found = [index for index, device in opcua if device.name == name]
        if not found:
            raise BrowseUsageError([f"--device: {path} has no OPC UA device {name!r} ({names})"])
        chosen = found[0]

    def needed(key: KeyPath) -> bool:
        # Only this device's password file must be there.
        return key[:2] == ("devices", chosen)

    settings = load_agent_settings(path, secrets_needed=needed)
    device = settings.devices[chosen]
    assert isinstance(device, OpcUaDeviceConfig)  # the same file, the same device
    return Target(device=device, context=driver_context(settings), configured=True)


def target_of(args: argparse.Namespace, environ: Mapping[str, str]) -> Target:
    """The server from either the flags or the config, never a mix."""
    if args.config is None:
        if args.url is None:
            raise BrowseUsageError(["give the server's URL, or -c FILE [--device NAME]"])
        if args.device is not None:
            raise BrowseUsageError(["--device needs -c FILE"])
        return target_from_flags(args, environ)
    mixed = (["URL"] if args.url is not None else []) + _connection_flags(args)
    if mixed:
        raise BrowseUsageError(
            [f"with -c the connection comes from the config; leave out {', '.join(mixed)}"]
        )
    return target_from_config(args.config, args.device)


# ---------------------------------------------------------------------- browsing


async def browse(target: Target, start: str, limits: BrowseLimits) -> BrowseResult:
    """Connect as the device, browse, close."""
    driver = OpcUaDriver(target.device, target.context)
    try:
        # The driver bounds each step; this is the backstop (as for `probe`).
        async with asyncio.timeout(target.device.timeout * 5 + 10.0):
            await driver.connect()
        return await driver.browse(start, limits)
    finally:
        await driver.close()


def _security(device: OpcUaDeviceConfig) -> str:
    if device.security_mode == "None":
        return "security None"
    return f"{device.security_policy}/{device.security_mode}"


def _stopped(result: BrowseResult) -> str:
    return (
        f"stopped after {result.stopped_after} nodes; use --node/--depth "
        "(or --max-nodes) to see the rest"
    )


def tree_text(target: Target, result: BrowseResult, depth: int) -> str:
    """The tree with a header (server, start node, namespaces) and a count."""
    start = result.start
    spaces = ", ".join(f"ns={i} {uri}" for i, uri in enumerate(result.namespaces) if i)
    lines = [
        f"{target.device.url} ({_security(target.device)}), below "
        f"{'/'.join(start.path)} ({start.node_id}), depth {depth}",
        f"namespaces: {spaces or 'none besides 0'}",
        "",
        *tree_lines(result),
        "",
    ]
    variables = sum(1 for node in result.nodes if node.is_variable)
    summary = f"{len(result.nodes)} nodes below the start node, {variables} of them variables"
    if result.unexpanded:
        summary += (
            f"; {result.unexpanded} objects at depth {depth} not expanded "
            f"(--depth {depth + 1} or --node)"
        )
    lines.append(summary)
    return "\n".join(printable(line) for line in lines)


def toml_text(target: Target, result: BrowseResult, args: argparse.Namespace) -> str:
    """``[[devices.tags]]`` blocks for the variables, with a header saying where they go."""
    taken: list[str] = []
    configured: dict[str, str] = {}
    if target.configured:
        for tag in target.device.tags:
            taken.append(tag.name)
            form = namespace_index_form(tag.node_id, result.namespaces)
            if form is not None:
                configured.setdefault(form, tag.name)
    blocks, active = toml_blocks(result, taken=taken, configured=configured)
    left_out = len(result.variables()) - active
    where = (
        f"device {target.device.name!r} of {args.config}"
        if target.configured
        else f"the [[devices]] block with url = {target.device.url!r}"
    )
    counts = f"{active} tags" + (
        f"; {left_out} left out, as comments saying why" if left_out else ""
    )
    header = [
        f"# edge-agent browse {target.device.url} --node {shlex.quote(args.node)} "
        f"--depth {args.depth}: {counts}",
        f"# Paste below {where}.",
    ]
    lines = [printable(line) for line in header] + blocks
    if result.stopped_after is not None:
        lines += ["", f"# {_stopped(result)}: this list is incomplete"]
    return "\n".join(lines)


def run_browse(args: argparse.Namespace, environ: Mapping[str, str]) -> Outcome:
    """`edge-agent browse`: the exit code, the text and the messages (see the EXIT_ codes)."""
    target = target_of(args, environ)
    where = f"device {target.device.name}" if target.configured else None
    warnings = [
        f"warning: {where or _flag_of(loc)}: {reason}" for loc, reason in target.device.warnings()
    ]
    limits = BrowseLimits(depth=args.depth, max_nodes=args.max_nodes)
    try:
        result = uvloop.run(browse(target, args.node, limits))
    except BadStartNode as exc:
        return Outcome(EXIT_USAGE, messages=[*warnings, str(exc)])
    except DriverError as exc:
        return Outcome(EXIT_FAILURE, messages=[*warnings, str(exc)])
    text = toml_text(target, result, args) if args.toml else tree_text(target, result, args.depth)
    if result.stopped_after is not None:
        return Outcome(EXIT_STOPPED, text, [*warnings, _stopped(result)])
    return Outcome(EXIT_OK, text, warnings)
