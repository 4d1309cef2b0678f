"""The demo's screen: live OEE per machine, what runs where (broker, ingest, database, data),
the central store's figures; a blank figure always says why."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO
from urllib.parse import urlsplit

from agent.daemon.runtime import Runtime
from agent.oee.calendar import ShiftWindow
from agent.oee.engine import OeeEngine
from agent.settings.machines import MachineConfig

# The four figure columns (availability, performance, quality, OEE) and their widths.
FIGURE_COLUMNS = (("availability", 13), ("performance", 13), ("quality", 9), ("oee", 8))
FIGURES_WIDTH = sum(width for _, width in FIGURE_COLUMNS)
WAITING_FOR_COUNTS = "waiting for the first counts"
Phase = Literal["running", "stopping", "stopped"]


@dataclass(frozen=True, slots=True)
class Central:
    """What the screen says of the central store."""

    where: str  # e.g. "edge-agent ingest (in this process) -> PostgreSQL 17 on 127.0.0.1:P"
    state: str  # "running", or why not
    stored: int | None  # rows in edge_events, counted by the demo
    acked: int | None  # the gateway's watermark in the central store


@dataclass(frozen=True, slots=True)
class Setup:
    """What runs where, for the start lines and every frame."""

    broker_url: str
    broker: str  # "private mosquitto (config and log in DIR)" or "your broker (--broker)"
    data_dir: Path
    live_root: str  # the live topics' root, for the watch line
    no_central: str  # why there is no central store ("" when there is one)
    # The amqtt_sub of the demo's venv, shown when mosquitto_sub is not installed (a machine
    # without mosquitto, where the demo's broker is the embedded amqtt).
    amqtt_sub: Path | None = None

    def watch_command(self) -> str:
        """The command that shows the live topics of this run (mosquitto_sub, else amqtt_sub)."""
        url = urlsplit(self.broker_url)
        tls = url.scheme == "mqtts"
        port = url.port or (8883 if tls else 1883)
        if self.amqtt_sub is not None:
            where = f"{url.scheme}://{url.hostname}:{port}"
            options = " --ca-path /etc/ssl/certs" if tls else ""
            return f"{self.amqtt_sub} --url {where}{options} -t '{self.live_root}/#'"
        options = " --capath /etc/ssl/certs" if tls else ""
        return f"mosquitto_sub -h {url.hostname} -p {port}{options} -t '{self.live_root}/#' -v"


def shift_label(window: ShiftWindow | None, now: float) -> str:
    """The shift column: the running shift's name, and why the figures are blank in a break."""
    if window is None:  # outside every shift, or nothing observed yet
        return ""
    if any(start <= now < end for start, end in window.breaks):
        # A break is no planned time: a machine observed only since the break began has no
        # figures yet, so say so instead of leaving a row of unexplained dashes.
        return f"{window.name}, break"
    return window.name


def _pct(value: object) -> str:
    return "-" if not isinstance(value, int | float) else f"{value * 100:5.1f}%"


def figure_cells(report: Mapping[str, object] | None, waiting: str) -> str:
    """The four figure columns: the figures, or why they are not there yet."""
    if report is None:
        return f"  {waiting:<{FIGURES_WIDTH - 2}}"
    if report.get("produced_quantity") == 0 and report.get("availability") is not None:
        # Performance is 0 % and quality undefined until a part is counted: say so.
        first, width = FIGURE_COLUMNS[0]
        rest = FIGURES_WIDTH - width
        return f"{_pct(report.get(first)):>{width}}  {WAITING_FOR_COUNTS:<{rest - 2}}"
    if report.get("availability") is None:
        return f"  {'no planned time yet':<{FIGURES_WIDTH - 2}}"
    return "".join(f"{_pct(report.get(key)):>{width}}" for key, width in FIGURE_COLUMNS)


def waiting_reason(engine: OeeEngine | None, device_state: str | None) -> str:
    """Why a machine has no figures yet."""
    if engine is None:
        return "starting"
    if device_state is not None and device_state != "up":
        return f"its device is {device_state}"
    if engine.state is None:
        return "waiting for the first state"
    return WAITING_FOR_COUNTS


def machine_row(
    machine: MachineConfig,
    engine: OeeEngine | None,
    report: Mapping[str, object] | None,
    device_state: str | None,
    now: float,
) -> str:
    """One machine's line: state, figures (or why not), parts, shift."""
    state = engine.state.state if engine is not None and engine.state is not None else ""
    produced = report.get("produced_quantity", "") if report else ""
    rejects = report.get("reject_quantity", "") if report else ""
    shift = shift_label(engine.current_window(), now) if engine is not None else ""
    cells = figure_cells(report, waiting_reason(engine, device_state))
    return f"{machine.name:<10}{state:<16}{cells}{produced!s:>10}{rejects!s:>9}  {shift}"


def header_row() -> str:
    """The table's header."""
    figures = "".join(f"{'OEE' if key == 'oee' else key:>{width}}" for key, width in FIGURE_COLUMNS)
    return f"{'machine':<10}{'state':<16}{figures}{'produced':>10}{'rejects':>9}  shift"


def uplink_line(runtime: Runtime, phase: Phase) -> str:
    """The agent's MQTT connection; while and after the demo's own stop, just that (the
    connection closes because the demo ends, not because of the uplink)."""
    if phase == "stopping":
        return "uplink:  stopping (the demo is ending)"
    if phase == "stopped":
        return "uplink:  stopped (the demo ended)"
    gateway = runtime.gateway
    what = "live values and S/sync" if runtime.settings.mqtt.sync_enabled else "live values only"
    if gateway is None:
        return "uplink:  starting"
    if gateway.mqtt.is_connected:
        return f"uplink:  connected, publishing {what}"
    return f"uplink:  not connected ({gateway.mqtt.last_error or 'connecting'}): buffering"


def outbox_line(runtime: Runtime) -> str:
    """The agent's outbox: what waits for the central store (live only: its own records)."""
    assert runtime.gateway is not None
    outbox = runtime.gateway.outbox
    if not runtime.settings.mqtt.sync_enabled:
        return f"outbox:  {outbox.events_count:,} records kept (live only: nothing is forwarded)"
    return (
        f"outbox:  {outbox.events_count:,} events buffered (committed seq "
        f"{outbox.committed_seq:,}, acknowledged by the central store {outbox.acked_seq:,})"
    )


def central_lines(setup: Setup, central: Central | None) -> list[str]:
    """The central store's line(s)."""
    if central is None:
        return [f"central: no central store: running live only ({setup.no_central})"]
    lines = [f"central: {central.where}"]
    if central.state != "running":
        lines.append(f"         {central.state}")
    if central.stored is not None and central.acked is not None:
        lines.append(
            f"         stored centrally: {central.stored:,} rows; acknowledged (watermark) "
            f"up to seq {central.acked:,}"
        )
    elif central.state == "running":
        lines.append("         stored centrally: waiting for the ingest's first commit")
    return lines


def where_lines(setup: Setup) -> list[str]:
    """Broker, watch command, data folder."""
    return [
        f"broker:  {setup.broker_url}, {setup.broker}",
        f"watch:   {setup.watch_command()}",
        f"data:    {setup.data_dir} (deleted at exit)",
    ]


def page_line(runtime: Runtime) -> str:
    """Where the status page is (docs/page.md)."""
    port = runtime.http_port
    if port is None:
        return "page:    not served (the HTTP endpoint is not listening)"
    return f"page:    http://127.0.0.1:{port}/ (status page: devices, machines, workflows)"


def render(
    runtime: Runtime,
    setup: Setup,
    central: Central | None,
    phase: Phase = "running",
) -> str:
    """One screen of the demo."""
    settings = runtime.settings
    gateway = runtime.gateway
    now = time.time()
    lines = [
        f"edge-agent demo: gateway {settings.gateway.id} (simulated line)   "
        f"{time.strftime('%H:%M:%S')}   {phase} "
        f"{now - runtime.started_at:4.0f} s",
        *where_lines(setup),
        page_line(runtime),
        uplink_line(runtime, phase),
        *central_lines(setup, central),
        "",
        header_row(),
    ]
    oee = gateway.oee if gateway is not None else None
    devices = runtime.device_states()
    for machine in settings.machines:
        engine = oee.engine(machine.name) if oee is not None else None
        report = oee.machines.get(machine.name) if oee is not None else None
        device = devices.get(machine.state.tag.partition("/")[0])
        lines.append(machine_row(machine, engine, report, device, now))
    lines.append("")
    if gateway is not None:
        lines.append(outbox_line(runtime))
    shown = ", ".join(f"{n} {s}" for n, s in devices.items()) or "starting"
    shown = phase if phase != "running" else shown  # stopped by the demo, not down
    lines.append(f"devices: {shown}")
    return "\n".join(lines)


def draw(out: TextIO, screen: str) -> None:
    """Show one screen: a terminal is redrawn in place (home, clear), a pipe gets one frame
    after another."""
    out.write("\x1b[H\x1b[2J" + screen + "\n" if out.isatty() else screen + "\n\n")
    out.flush()
