"""The `edge-agent` command line (README.md, "Commands"). Exit codes: 0 ok, 1 runtime failure,
2 bad config or usage (`status` adds 1 degraded and 3 unreachable). Every error is one readable
line; no input produces a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from agent import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("edge_agent")


class UsageError(Exception):
    """Bad command-line usage or a bad config: exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (when it has one) and keeps the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or action.option_strings == []
        ):
            return text
        return f"{text} (default: %(default)s)"


# One example per verb, shown by `edge-agent VERB --help` (README.md, "Commands").
EXAMPLES: dict[str, str] = {
    "run": "edge-agent run -c /etc/edge-agent/agent.toml",
    "check": "edge-agent check -c config/agent.example.toml",
    "demo": "edge-agent demo --duration 60",
    "probe": "edge-agent probe -c agent.toml",
    "simulate": "edge-agent simulate modbus --port 5020\n"
    "  edge-agent simulate opcua --port 4840 --secure --pki ./pki\n"
    "  edge-agent simulate modbus --help    # every option of the Modbus simulator",
    "oee": "edge-agent oee -c agent.toml --replay samples.csv",
    "ingest": "edge-agent ingest -c /etc/edge-agent/central.toml",
    "status": "edge-agent status -c /etc/edge-agent/agent.toml\n\n"
    "exit codes: 0 healthy, 1 degraded, 2 bad config or usage, 3 agent unreachable",
    "schema": "edge-agent schema > agent.schema.json",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edge-agent",
        description="Edge gateway for a production line: PLCs (OPC UA, Modbus) -> OEE, "
        "SQLite outbox, MQTT, PostgreSQL.",
        formatter_class=_HelpFormatter,
        epilog="example:\n  edge-agent check -c config/agent.example.toml\n\n"
        "`edge-agent COMMAND --help` shows a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("EDGE_AGENT_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info, or $EDGE_AGENT_LOG_LEVEL)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=_HelpFormatter,
        )

    run = add("run", "run the daemon in the foreground (systemd Type=notify)")
    run.add_argument("-c", "--config", required=True, type=Path, help="agent config file")

    check = add("check", "validate a config file (agent or ingest) and print a summary")
    check.add_argument("-c", "--config", required=True, type=Path, help="config file")

    demo = add(
        "demo",
        "run the bundled simulators and an agent on a private broker, showing live OEE",
    )
    demo.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    demo.add_argument(
        "--broker",
        default=None,
        metavar="URL",
        help="publish to this existing broker (mqtt://HOST:PORT) instead of a private one",
    )

    probe = add("probe", "connect to every device once, read every tag, print a table")
    probe.add_argument("-c", "--config", required=True, type=Path, help="agent config file")

    simulate = add(
        "simulate",
        "run a line simulator alone; its options are the simulator's own "
        "(`edge-agent simulate modbus --help`, simulators/README.md)",
    )
    simulate.add_argument("protocol", choices=["modbus", "opcua"], help="which simulator")
    # One parser per simulator, its own (simulators/*/cli.py): the flags cannot drift apart.
    simulate.add_argument(
        "options", nargs=argparse.REMAINDER, help="the simulator's options, e.g. --port 5020"
    )

    oee = add("oee", "recompute OEE offline from recorded samples")
    oee.add_argument("-c", "--config", required=True, type=Path, help="agent config file")
    oee.add_argument("--replay", required=True, type=Path, help="samples, .csv or .jsonl")

    ingest = add("ingest", "run the central ingest service")
    ingest.add_argument("-c", "--config", required=True, type=Path, help="ingest config file")

    status = add("status", "summary of a running agent from its health endpoint")
    status.add_argument("-c", "--config", required=True, type=Path, help="agent config file")

    add("schema", "print the config JSON Schema")
    _add_browse(commands)
    return parser


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not within {low}..{high}")
        return value

    return parse


_BROWSE_EPILOG = """\
examples:
  edge-agent browse opc.tcp://192.168.10.12:4840
  edge-agent browse opc.tcp://192.168.10.12:4840 --node "ns=3;s=Filler" --depth 2 --toml
  edge-agent browse opc.tcp://192.168.10.12:4840 --security-policy Basic256Sha256 \\
      --security-mode SignAndEncrypt --server-certificate filler.der \\
      --certificate pki/browse-cert.der --private-key pki/browse-key.pem \\
      --username edge --password-file filler.password
  edge-agent browse -c /etc/edge-agent/agent.toml --device filler --toml

The password comes from --password-file or $EDGE_AGENT_OPCUA_PASSWORD (never a flag).
exit codes: 0 done, 1 unreachable or refused (one line says which), 2 bad flags, config or
start node, 3 stopped at --max-nodes (what was found is printed). docs/opcua.md, "Browsing a
server".
"""


# `browse` defaults: from the Objects folder (i=85), three levels, at most 2,000 nodes. They
# live here, not in agent/browse.py, which imports asyncua (half a second for every command).
DEFAULT_NODE = "i=85"
DEFAULT_DEPTH = 3
DEFAULT_MAX_NODES = 2000


def _add_browse(commands: argparse._SubParsersAction[_Parser]) -> None:
    """`edge-agent browse`: its flags (the work is agent/browse.py, imported when it runs)."""
    text = "browse an OPC UA server: the tree below a node, or [[devices.tags]] blocks"
    browse = commands.add_parser(
        "browse",
        help=text,
        description=text,
        epilog=_BROWSE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    browse.add_argument("url", nargs="?", help="endpoint, opc.tcp://HOST:PORT[/PATH]")
    browse.add_argument(
        "-c", "--config", type=Path, help="agent config: connect as its device --device"
    )
    browse.add_argument("--device", help="with -c: the OPC UA device (default: the only one)")
    browse.add_argument(
        "--node", default=DEFAULT_NODE, help=f"start node (default: {DEFAULT_NODE}, Objects)"
    )
    browse.add_argument(
        "--depth",
        type=_bounded_int(0, 50),
        default=DEFAULT_DEPTH,
        help=f"levels below the start node (default: {DEFAULT_DEPTH})",
    )
    browse.add_argument(
        "--max-nodes",
        type=_bounded_int(1, 100_000),
        default=DEFAULT_MAX_NODES,
        help=f"stop after this many nodes (default: {DEFAULT_MAX_NODES})",
    )
    browse.add_argument(
        "--toml", action="store_true", help="print [[devices.tags]] blocks instead of the tree"
    )
    browse.add_argument(
        "--security-policy",
        choices=["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"],
        help="as a device's security_policy (default: None)",
    )
    browse.add_argument(
        "--security-mode",
        choices=["None", "Sign", "SignAndEncrypt"],
        help="as a device's security_mode (default: None)",
    )
    browse.add_argument("--server-certificate", type=Path, help="the server's certificate (pinned)")
    browse.add_argument(
        "--certificate", type=Path, help="client certificate (created with the key if absent)"
    )
    browse.add_argument("--private-key", type=Path, help="client private key")
    browse.add_argument("--username", help="user name token (default: anonymous)")
    browse.add_argument("--password-file", type=Path, help="file holding the user's password")
    browse.add_argument(
        "--timeout", help="deadline of one request, e.g. 2s (default: a device's, 1s)"
    )


def _setup_logging(level: str) -> None:
    # Under systemd the journal adds timestamps; elsewhere we do.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
    if level != "debug":
        # The protocol stacks log every failed request; we log transitions ourselves.
        for noisy in ("pymodbus", "asyncua"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)


def _print_problems(problems: Sequence[str]) -> None:
    for line in problems:
        print(line, file=sys.stderr)


def _print_warnings(warnings: Sequence[str]) -> None:
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)


def _is_central(path: Path) -> bool:
    """An ingest config has [postgres] and no [gateway]; decided from the raw TOML."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # the agent loader reports the real problem
    return "postgres" in data and "gateway" not in data


def cmd_check(args: argparse.Namespace) -> int:
    """`edge-agent check`: validate and summarise; warnings are printed but exit 0."""
    from agent.central.settings import CentralSettings
    from agent.settings.config_file import AgentSettings
    from agent.settings.loader import load_settings_with_warnings, no_secret

    path: Path = args.config
    # `check` validates the file; a missing secret file is a warning (docs/configuration.md).
    if _is_central(path):
        central, warnings = load_settings_with_warnings(
            CentralSettings, path, secrets_needed=no_secret
        )
        _print_warnings(warnings)
        print(f"{path}: OK (ingest)")
        print(
            f"  mqtt {central.mqtt.url}, subscribes {central.mqtt.sync_prefix}/+/sync"
            + (f" as shared group {central.mqtt.shared_group}" if central.mqtt.shared_group else "")
        )
        print(
            f"  partitions: {central.partitions.months_ahead} months ahead, retention "
            f"{central.partitions.retention_months} months"
        )
        return EXIT_OK
    settings, warnings = load_settings_with_warnings(AgentSettings, path, secrets_needed=no_secret)
    _print_warnings(warnings)
    drivers: dict[str, int] = {}
    tags = writable = 0
    for device in settings.devices:
        driver = getattr(device, "driver", "?")
        drivers[driver] = drivers.get(driver, 0) + 1
        tags += len(device.tag_list())
        writable += sum(1 for tag in device.tag_list() if tag.writable)
    by_driver = ", ".join(f"{name} {count}" for name, count in sorted(drivers.items()))
    print(f"{path}: OK")
    sync = (
        f"sync {settings.sync_topic_base}/sync"
        if settings.mqtt.sync_enabled
        else "live only (mqtt.sync_enabled = false)"
    )
    print(f"  gateway {settings.gateway.id}: live topics {settings.mqtt.topic_root}/..., {sync}")
    print(
        f"  devices: {len(settings.devices)}"
        + (f" ({by_driver})" if by_driver else "")
        + f", tags: {tags} ({writable} writable)"
    )
    print(
        f"  machines: {len(settings.machines)}, calendars: {len(settings.calendars)}, "
        f"workflows: {len(settings.workflows)}"
    )
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    """`edge-agent schema`: the agent config's JSON Schema."""
    from agent.settings.schema import agent_schema

    print(json.dumps(agent_schema(), indent=2, sort_keys=False))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """`edge-agent run`: the daemon (config validated before the event loop starts)."""
    import uvloop

    from agent.daemon.runtime import run_until_signalled
    from agent.settings.loader import load_agent_settings

    settings = load_agent_settings(args.config)
    code = uvloop.run(run_until_signalled(settings, args.config))
    _exit_despite_stray_threads(code)
    return code


def _exit_despite_stray_threads(code: int) -> None:
    """A daemon must exit when told to: a non-daemon thread left behind by a library (e.g. an
    unclosed SQLite connection) would keep the interpreter alive after SIGTERM."""
    import threading

    stray = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if stray:
        log.warning(
            "exiting despite %d stray threads: %s", len(stray), ", ".join(t.name for t in stray)
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def cmd_probe(args: argparse.Namespace) -> int:
    """`edge-agent probe`: one read of every tag, as a table; exit 0 only if all are good."""
    import uvloop

    from agent.probe import format_table, probe
    from agent.settings.loader import device_secrets, load_agent_settings

    settings = load_agent_settings(args.config, secrets_needed=device_secrets)
    rows = uvloop.run(probe(settings))
    print(format_table(rows))
    return EXIT_OK if rows and all(row.quality == "good" for row in rows) else EXIT_FAILURE


def cmd_simulate(args: argparse.Namespace) -> int:
    """`edge-agent simulate modbus|opcua [OPTIONS]`: a line simulator alone."""
    if args.protocol == "modbus":
        from simulators.modbus.cli import main as modbus_main

        return modbus_main(args.options)
    from simulators.opcua.cli import main as opcua_main

    return opcua_main(args.options)


def cmd_oee(args: argparse.Namespace) -> int:
    """`edge-agent oee`: OEE recomputed offline from recorded samples."""
    from agent.oee.replay import cmd_oee as run_oee

    return run_oee(args)


def cmd_ingest(args: argparse.Namespace) -> int:
    """`edge-agent ingest`: the central ingest service (config validated before start)."""
    import uvloop

    from agent.central.service import run_until_signalled
    from agent.central.settings import load_central_settings

    settings = load_central_settings(args.config)
    return uvloop.run(run_until_signalled(settings))


def cmd_status(args: argparse.Namespace) -> int:
    """`edge-agent status`: 0 healthy, 1 degraded, 2 bad config, 3 unreachable."""
    from agent.settings.loader import load_agent_settings, no_secret
    from agent.status import EXIT_UNREACHABLE, run_status

    settings = load_agent_settings(args.config, secrets_needed=no_secret)
    code, text = run_status(settings)
    print(text, file=sys.stderr if code == EXIT_UNREACHABLE else sys.stdout)
    return code


def cmd_browse(args: argparse.Namespace) -> int:
    """`edge-agent browse`: the tree or the tag blocks; exit codes in agent/browse.py."""
    from agent.browse import BrowseUsageError, run_browse

    try:
        outcome = run_browse(args, os.environ)
    except BrowseUsageError as exc:
        for line in exc.problems:
            print(f"edge-agent browse: {line}", file=sys.stderr)
        return EXIT_USAGE
    if outcome.text:
        print(outcome.text)
    for line in outcome.messages:
        print(f"edge-agent browse: {line}", file=sys.stderr)
    return outcome.code


def cmd_demo(args: argparse.Namespace) -> int:
    """`edge-agent demo`: simulators, an agent and live OEE in the terminal."""
    import uvloop

    from agent.demo import DemoOptions, quiet_logging, run_demo

    if args.log_level == "info":
        quiet_logging()
    return uvloop.run(run_demo(DemoOptions(duration=args.duration, broker=args.broker)))


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": cmd_check,
    "schema": cmd_schema,
    "run": cmd_run,
    "demo": cmd_demo,
    "probe": cmd_probe,
    "simulate": cmd_simulate,
    "oee": cmd_oee,
    "ingest": cmd_ingest,
    "status": cmd_status,
    "browse": cmd_browse,
}


DAEMONS = ("run", "ingest")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edge-agent` console script."""
    from agent.settings.loader import ConfigError

    parser = _build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return HANDLERS[args.command](args)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"edge-agent {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # last resort: one line per cause
        from agent.service.tasks import leaf_exceptions

        causes = list(leaf_exceptions(exc))
        for cause in causes:
            # A daemon that ends here logs why, with the traceback: an ExceptionGroup's own
            # line says only how many sub-exceptions it holds.
            level = logging.ERROR if args.command in DAEMONS else logging.DEBUG
            log.log(level, "%s: %s", type(cause).__name__, cause, exc_info=cause)
        for cause in causes:
            print(f"edge-agent {args.command}: {type(cause).__name__}: {cause}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
