"""`edge-agent demo`: the bundled Modbus and OPC UA line simulators and an agent on the demo
config, with live OEE, outbox depth and uplink state in the terminal, refreshed every second.

Data goes to a temporary directory. It forwards to mqtt://127.0.0.1:1883 when a broker answers
there and keeps buffering in the outbox when none does.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from agent.daemon.runtime import Runtime
from agent.oee.calendar import ShiftWindow
from agent.settings.config_file import AgentSettings
from agent.settings.loader import load_agent_settings
from simulators.modbus.server import ModbusSimulator
from simulators.opcua.server import OpcUaSimulator

DEMO_CONFIG = "demo.toml"


def demo_settings(modbus_port: int, opcua_url: str, data_dir: Path) -> AgentSettings:
    """The packaged demo config, pointed at the simulators and a private data dir."""
    resource = importlib.resources.files("agent") / "data" / DEMO_CONFIG
    with importlib.resources.as_file(resource) as path:
        # EDGE_AGENT__MQTT__URL may point the demo at another broker.
        settings = load_agent_settings(path)
    devices = []
    for device in settings.devices:
        url = f"tcp://127.0.0.1:{modbus_port}" if device.driver == "modbus" else opcua_url  # type: ignore[attr-defined]
        devices.append(device.model_copy(update={"url": url}))
    return settings.model_copy(
        update={
            "gateway": settings.gateway.model_copy(update={"data_dir": data_dir}),
            "devices": tuple(devices),
            # The demo must not collide with a real agent's endpoint on this machine.
            "http": settings.http.model_copy(update={"listen": "127.0.0.1:0"}),
        }
    )


def _pct(value: Any) -> str:
    return "     -" if not isinstance(value, int | float) else f"{value * 100:5.1f}%"


def shift_label(window: ShiftWindow | None, now: float) -> str:
    """The shift column: the running shift's name, and why the figures are blank in a break."""
    if window is None:  # outside every shift, or nothing observed yet
        return ""
    if any(start <= now < end for start, end in window.breaks):
        # A break is no planned time: a machine observed only since the break began has no
        # figures yet, so say so instead of leaving a row of unexplained dashes.
        return f"{window.name}, break"
    return window.name


def render(runtime: Runtime, *, started: float) -> str:
    """One screen of the demo."""
    settings = runtime.settings
    gateway = runtime.gateway
    uplink = (
        f"connected to {settings.mqtt.url}, forwarding"
        if gateway is not None and gateway.mqtt.is_connected
        else f"no broker at {settings.mqtt.url}: buffering in the outbox"
    )
    lines = [
        f"edge-agent demo: gateway {settings.gateway.id} (simulated line)   "
        f"{time.strftime('%H:%M:%S')}   running {time.monotonic() - started:4.0f} s",
        f"uplink: {uplink}",
        "",
        f"{'machine':<10}{'state':<16}{'availability':>13}{'performance':>13}"
        f"{'quality':>9}{'OEE':>8}{'produced':>10}{'rejects':>9}",
    ]
    oee = gateway.oee if gateway is not None else None
    for machine in settings.machines:
        engine = oee.engine(machine.name) if oee is not None else None
        state = engine.state.state if engine is not None and engine.state is not None else "-"
        report: Mapping[str, object] = (
            oee.machines.get(machine.name) if oee is not None else None
        ) or {}
        shift = shift_label(engine.current_window(), time.time()) if engine is not None else ""
        lines.append(
            f"{machine.name:<10}{state:<16}{_pct(report.get('availability')):>13}"
            f"{_pct(report.get('performance')):>13}{_pct(report.get('quality')):>9}"
            f"{_pct(report.get('oee')):>8}{report.get('produced_quantity', '-'):>10}"
            f"{report.get('reject_quantity', '-'):>9}  {shift}"
        )
    if gateway is not None:
        outbox = gateway.outbox
        lines += [
            "",
            f"outbox: {outbox.events_count:,} events buffered (committed seq "
            f"{outbox.committed_seq:,}, acknowledged by the central store {outbox.acked_seq:,})",
        ]
    devices = ", ".join(f"{name} {state}" for name, state in runtime.device_states().items())
    lines.append(f"devices: {devices}")
    return "\n".join(lines)


async def _display(runtime: Runtime, out: TextIO, started: float) -> None:
    tty = out.isatty()
    while True:
        await asyncio.sleep(1.0)
        screen = render(runtime, started=started)
        if tty:
            out.write("\x1b[H\x1b[2J" + screen + "\n")  # home + clear: redraw in place
        else:
            out.write(screen + "\n\n")
        out.flush()


async def run_demo(duration: float | None = None, out: TextIO = sys.stdout) -> int:
    """Simulators + agent until Ctrl-C or `duration` seconds; exit code 0."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="edge-agent-demo-") as data:
            async with (
                ModbusSimulator(port=0, seed=7, speed=1.0) as press,
                OpcUaSimulator(port=0, seed=8, speed=1.0, bulk_count=0) as filler,
            ):
                assert press.port is not None
                settings = demo_settings(press.port, filler.url, Path(data))
                runtime = Runtime(settings)
                out.write(
                    f"edge-agent demo: Modbus simulator on 127.0.0.1:{press.port}, OPC UA "
                    f"simulator on {filler.url}, data in {data}\n"
                )
                out.flush()
                async with asyncio.TaskGroup() as group:
                    agent = group.create_task(runtime.run(stop), name="demo-agent")
                    display = group.create_task(
                        _display(runtime, out, started), name="demo-display"
                    )
                    if duration is not None:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), duration)
                    else:
                        await stop.wait()
                    stop.set()
                    await agent
                    display.cancel()
                out.write(render(runtime, started=started) + "\n")
                out.write("edge-agent demo: stopped\n")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return 0


def quiet_logging() -> None:
    """Keep the screen for the figures: only warnings and errors are logged."""
    root = logging.getLogger()
    if root.level < logging.WARNING:
        root.setLevel(logging.WARNING)
