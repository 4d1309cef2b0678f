"""The command line's help and its simulate verb (issue #21, item 7): every verb's --help shows
its defaults and an example; `edge-agent simulate` takes exactly the flags the simulators take
(one parser each, simulators/*/cli.py), as simulators/README.md documents them; `status` has
distinct exit codes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import EXAMPLES, HANDLERS, main
from agent.status import EXIT_DEGRADED, EXIT_HEALTHY, EXIT_UNREACHABLE
from tests.fixtures.ports import free_port

REPO = Path(__file__).resolve().parent.parent


def help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    # argparse exits after --help; a simulator's own parser returns its exit code instead.
    try:
        code = main([*argv, "--help"])
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    assert code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("verb", sorted(HANDLERS))
def test_every_verb_has_help_with_an_example(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of([verb], capsys)
    assert re.search(rf"^examples?:\n  edge-agent {verb} ", text, re.M), text
    if verb in EXAMPLES:
        assert EXAMPLES[verb].splitlines()[0] in text


def test_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert "(default: info" in help_of([], capsys)
    for protocol in ("modbus", "opcua"):
        text = help_of(["simulate", protocol], capsys)
        for flag in ("--seed", "--speed", "--bulk-change-fraction", "--host"):
            option = re.search(rf"^  {flag} .*?(?=^  -)", text, re.M | re.S)
            assert option is not None, flag
            assert "default" in option.group(0), f"{protocol} {flag} shows no default"


def readme_flags(protocol: str) -> set[str]:
    """The flags simulators/README.md lists in the usage block of `edge-agent simulate P`."""
    text = (REPO / "simulators" / "README.md").read_text()
    block = re.search(rf"^edge-agent simulate {protocol} (.*?)^python -m", text, re.M | re.S)
    assert block is not None, protocol
    return set(re.findall(r"--[a-z][a-z-]+", block.group(1)))


@pytest.mark.parametrize("protocol", ["modbus", "opcua"])
def test_simulate_takes_every_flag_its_readme_lists(
    protocol: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = readme_flags(protocol)
    assert {"--port", "--seed", "--bulk-change-fraction", "--control-port"} <= flags
    via_agent = set(re.findall(r"--[a-z][a-z-]+", help_of(["simulate", protocol], capsys)))
    module = subprocess.run(
        [sys.executable, "-m", f"simulators.{protocol}", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert module.returncode == 0
    via_module = set(re.findall(r"--[a-z][a-z-]+", module.stdout))
    assert flags <= via_agent
    assert via_agent == via_module  # one parser: the same flags either way
    assert flags == via_module - {"--help"}  # and the README lists them all


@pytest.mark.parametrize(
    ("protocol", "flags", "listening"),
    [
        ("modbus", ["--bulk-change-fraction", "0.2", "--baudrate", "9600"], "modbus simulator"),
        ("opcua", ["--bulk", "10", "--bulk-change-fraction", "0.5"], "opcua simulator"),
    ],
)
def test_simulate_runs_with_the_flags_it_used_to_reject(
    protocol: str, flags: list[str], listening: str
) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "simulate", protocol, "--port", str(port), *flags],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # ends at EOF if the process dies
            if line.startswith(f"{listening} listening on"):
                break
        else:
            raise AssertionError(f"no listening line: {process.stderr and process.stderr.read()}")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0


def test_simulate_refuses_an_unknown_flag_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "modbus", "--frobnicate"]) == 2
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_status_exit_codes_are_distinct_and_documented(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (EXIT_HEALTHY, EXIT_DEGRADED, EXIT_UNREACHABLE) == (0, 1, 3)
    bad = tmp_path / "agent.toml"
    bad.write_text("[gateway]\n")
    assert main(["status", "-c", str(bad)]) == 2  # a bad config, as for every command
    assert "exit codes: 0 healthy, 1 degraded, 2 bad config or usage, 3" in help_of(
        ["status"], capsys
    )
    readme = (REPO / "README.md").read_text()
    assert "# 0 healthy, 1 degraded, 2 bad config, 3 unreachable" in readme
