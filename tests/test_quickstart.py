"""docs/quickstart.md as written (issue #21): every command of its `sh` blocks runs in order
in a scratch "clone" (on free ports instead of 5020, 1883 and 9108), foreground commands exit 0,
and the key lines of each output the doc shows are in the doc and in the real output."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.mosquitto import find_mosquitto
from tests.fixtures.ports import free_port, port_accepts, wait_until

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "quickstart.md"

# What each command's output must show, here and in the doc's block after it.
KEY_LINES: dict[str, list[str]] = {
    "edge-agent check": [
        "line.toml: OK",
        "live only (mqtt.sync_enabled = false)",
        "devices: 1 (modbus 1), tags: 4 (0 writable)",
        "machines: 1, calendars: 1, workflows: 0",
    ],
    "edge-agent probe": ["press1  state_code", "press1  temperature", "4 of 4 tags good"],
    "mosquitto_sub": [
        "acme/assembly/line1/press1/state_code {",
        "acme/assembly/line1/press1/state {",
        "acme/assembly/line1/press1/oee {",
    ],
    "edge-agent status": [
        "devices    1/1 up",
        "sync       live only: no central store (mqtt.sync_enabled = false)",
        "oee        press1: ",
        "status     healthy",
    ],
    # agent.log, after the start of `edge-agent run`
    "edge-agent run": ["running: 1 devices, live topics under acme/assembly/line1/"],
}


@dataclass(frozen=True)
class Block:
    lang: str
    text: str


def blocks() -> list[Block]:
    found = re.findall(r"^```(\w+)\n(.*?)^```", DOC.read_text(), re.M | re.S)
    return [Block(lang, text) for lang, text in found]


def key_of(command: str) -> str | None:
    return next((key for key in KEY_LINES if command.startswith(key)), None)


class Session:
    """A shell session of the reader: exports and cd carry over; `&` runs in the background."""

    def __init__(self, clone: Path, ports: dict[str, str]) -> None:
        self.prefix: list[str] = []
        self.clone = clone
        self.ports = ports
        self.background: list[subprocess.Popen[bytes]] = []

    def substitute(self, text: str) -> str:
        for documented, actual in self.ports.items():
            text = re.sub(rf"\b{documented}\b", actual, text)
        return text

    def script(self, command: str) -> str:
        return "; ".join([*self.prefix, command])

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        command = self.substitute(command)
        if command.startswith(("export ", "cd ", "mkdir ")):
            if not command.startswith("mkdir "):
                self.prefix.append(command)
            else:
                self.prefix.append(command.split("&&")[0].strip())
                rest = command.split("&&", 1)[1].strip() if "&&" in command else ""
                if rest:
                    self.prefix.append(rest)
            return subprocess.CompletedProcess(command, 0, "", "")
        if command.endswith("&"):
            process = subprocess.Popen(
                ["bash", "-c", self.script("exec " + command.removesuffix("&").strip())],
                cwd=self.clone,
                start_new_session=True,
            )
            self.background.append(process)
            return subprocess.CompletedProcess(command, 0, "", "")
        return subprocess.run(
            ["bash", "-c", self.script(command)],
            cwd=self.clone,
            capture_output=True,
            text=True,
            timeout=90,
        )

    def stop(self) -> list[int | None]:
        codes = []
        for process in reversed(self.background):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            try:
                codes.append(process.wait(timeout=30))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                codes.append(process.wait())
        return codes


def oee_published(http_port: int) -> bool:
    """Whether the agent has computed the first OEE record (published retained)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status", timeout=2) as reply:
            status = json.loads(reply.read())
    except OSError:
        return False
    record = (status.get("oee") or {}).get("press1")
    return bool(record) and record.get("oee") is not None


@pytest.mark.slow
def test_the_quickstart_as_written(tmp_path: Path) -> None:
    find_mosquitto()  # installed by the README's test command
    clone = tmp_path / "clone"
    (clone / ".venv").mkdir(parents=True)
    (clone / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    sim_port, broker_port, http_port = free_port(), free_port(), free_port()
    session = Session(
        clone, {"5020": str(sim_port), "1883": str(broker_port), "9108": str(http_port)}
    )
    doc = blocks()
    assert [b.lang for b in doc].count("toml") == 1
    ran: list[str] = []
    last: tuple[str, str] | None = None  # (command, output) awaiting the doc's text block
    try:
        for block in doc:
            if block.lang == "toml":
                workdir = clone / "first-line"
                workdir.mkdir(exist_ok=True)
                (workdir / "line.toml").write_text(session.substitute(block.text))
                continue
            if block.lang == "text":
                assert last is not None, f"an output block follows no command: {block.text[:60]}"
                command, output = last
                key = key_of(command)
                assert key is not None, f"no key lines for {command!r}"
                for line in KEY_LINES[key]:
                    assert line in block.text, f"docs/quickstart.md, {command}: no {line!r}"
                    assert line in output, f"{command}: no {line!r} in\n{output}"
                last = None
                continue
            for command in block.text.splitlines():
                if not command.strip():
                    continue
                if command.startswith("mosquitto ") and "&" in command:
                    command = command.replace("mosquitto ", f"{find_mosquitto()} ", 1)
                result = session.run(command)
                assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
                ran.append(command)
                output = result.stdout
                if "simulate" in command:
                    wait_until(lambda: port_accepts("127.0.0.1", sim_port), timeout=30)
                elif command.startswith("mosquitto"):
                    wait_until(lambda: port_accepts("127.0.0.1", broker_port), timeout=30)
                elif command.startswith("edge-agent run"):
                    # The doc's next step shows an OEE record: it comes after publish_interval.
                    wait_until(lambda: oee_published(http_port), timeout=60, message="OEE")
                    output = (clone / "first-line" / "agent.log").read_text()
                last = (command, output)
    finally:
        codes = session.stop()
    assert {key for key in KEY_LINES} <= {key_of(command) for command in ran}
    assert codes[0] == 0, "edge-agent run stops cleanly on SIGTERM"
