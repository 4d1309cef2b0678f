"""The demo's private MQTT broker: mosquitto on a free loopback port, its config and log in the
demo's temporary directory, else the embedded amqtt broker (agent/demo/embedded.py), so that
nothing the demo publishes reaches another broker."""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.demo.embedded import PROTOCOL as AMQTT_PROTOCOL
from agent.demo.embedded import EmbeddedAmqtt
from agent.demo.servers import (
    LoopbackServer,
    ServerUnavailable,
    find_executable,
    read_from,
    server_account,
)

MOSQUITTO_DIRS = ("/usr/sbin", "/usr/local/sbin")  # Debian installs it in /usr/sbin
# Logged (type information) once the listeners are bound: from then on the port is ours.
_RUNNING = re.compile(r"mosquitto version \S+ running")
NO_MOSQUITTO = "mosquitto is not installed"
NO_BROKER = (
    "no MQTT broker to run privately: install mosquitto, or amqtt (the demo extra: "
    "pip install -e '.[demo]', as scripts/demo does), or pass --broker URL"
)
MqttProtocol = Literal["auto", "3.1.1"]  # what the demo's agent and ingest are told to speak


@dataclass(frozen=True, slots=True)
class DemoBroker:
    """The broker the demo's agent and ingest use."""

    url: str
    description: str  # the screen's broker line after the URL
    protocol: MqttProtocol = "auto"


def find_mosquitto() -> str | None:
    """The mosquitto binary: $EDGE_AGENT_MOSQUITTO when set (empty: none), else PATH, then the
    sbin folders; None when there is none."""
    configured = os.environ.get("EDGE_AGENT_MOSQUITTO")
    if configured is not None:
        return configured if configured and os.access(configured, os.X_OK) else None
    return find_executable("mosquitto", MOSQUITTO_DIRS)


class PrivateMosquitto(LoopbackServer):
    """mosquitto on 127.0.0.1:PORT only, anonymous, without persistence."""

    what = "mosquitto"

    def __init__(self, binary: str, workdir: Path, account: pwd.struct_passwd | None) -> None:
        super().__init__(workdir, account)
        self.binary = binary
        self.log_path = workdir / "mosquitto.log"
        self.config_path = workdir / "mosquitto.conf"

    @property
    def url(self) -> str:
        """mqtt://127.0.0.1:PORT (once started)."""
        return f"mqtt://127.0.0.1:{self.port}"

    def config_text(self, port: int) -> str:
        """The broker's whole config."""
        lines = [
            "# written by edge-agent demo: a private broker for this run only",
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",  # where mosquitto 2.0 says "running"
            "connection_messages false",  # a line per connection would only grow the log
        ]
        if self.account is not None:
            # As root mosquitto would switch to its own account, which cannot enter our
            # temporary directory: run it as the account that owns its folder instead.
            lines.append(f"user {self.account.pw_name}")
        return "\n".join(lines) + "\n"

    def _argv(self, port: int) -> list[str]:
        self.config_path.write_text(self.config_text(port))
        self.give_to_account(self.config_path)
        return [self.binary, "-c", str(self.config_path)]

    async def _answers(self, port: int) -> bool:
        return _RUNNING.search(read_from(self.log_path, self._log_offset)) is not None


def private_mosquitto(workdir: Path, account: pwd.struct_passwd | None) -> PrivateMosquitto:
    """A private mosquitto (not started); ServerUnavailable when it is not installed."""
    binary = find_mosquitto()
    if binary is None:
        raise ServerUnavailable(NO_MOSQUITTO)
    return PrivateMosquitto(binary, workdir, account)


PrivateBroker = PrivateMosquitto | EmbeddedAmqtt


async def start_private_broker(workdir: Path) -> tuple[PrivateBroker, DemoBroker]:
    """mosquitto when it is installed and starts, else the embedded amqtt broker; started.
    ServerUnavailable (NO_BROKER and both reasons) when neither can run."""
    try:
        mosquitto = private_mosquitto(workdir, server_account())
        await mosquitto.start()
    except ServerUnavailable as exc:
        without = str(exc)
    else:
        return mosquitto, DemoBroker(
            mosquitto.url, f"private mosquitto (config and log in {workdir})"
        )
    amqtt = EmbeddedAmqtt(workdir)
    try:
        await amqtt.start()
    except ServerUnavailable as exc:
        raise ServerUnavailable(f"{NO_BROKER} ({without}; {exc})") from None
    description = (
        f"private amqtt {amqtt.version}, embedded, MQTT {AMQTT_PROTOCOL} "
        f"({without}; log in {workdir})"
    )
    return amqtt, DemoBroker(amqtt.url, description, AMQTT_PROTOCOL)
