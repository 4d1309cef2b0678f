"""The demo's run: a private broker (mosquitto, else amqtt embedded; or --broker), the
simulators, an agent, and when PostgreSQL is installed the central ingest on a private database;
the screen every second; everything stopped in order at Ctrl-C or after --duration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import stat
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from agent.daemon.runtime import Runtime
from agent.demo.broker import DemoBroker, start_private_broker
from agent.demo.central import CentralStore
from agent.demo.config import (
    PRIVATE_SYNC_PREFIX,
    ignored_overrides,
    load_demo_config,
    point_at_simulators,
)
from agent.demo.postgres import find_pg_bin_dir
from agent.demo.screen import Central, Phase, Setup, draw, render, where_lines
from agent.demo.servers import ServerUnavailable, server_account
from agent.settings.config_file import AgentSettings
from simulators.modbus.server import ModbusSimulator
from simulators.opcua.server import OpcUaSimulator

EXIT_OK = 0
EXIT_NO_BROKER = 2
REFRESH = 1.0  # seconds between two screens


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """The command line of `edge-agent demo`."""

    duration: float | None = None
    broker: str | None = None  # an existing broker's URL; None: a private one


@dataclass(slots=True)
class Plan:
    """Where the demo's parts run."""

    setup: Setup
    central: CentralStore | None


def say(out: TextIO, line: str) -> None:
    """One line of the demo's own, flushed."""
    out.write(f"edge-agent demo: {line}\n")
    out.flush()


@contextlib.asynccontextmanager
async def broker_for(
    options: DemoOptions, workdir: Path, out: TextIO
) -> AsyncIterator[DemoBroker | None]:
    """The demo's broker: --broker, else a private one, stopped at exit; None when there is
    none."""
    if options.broker is not None:
        yield DemoBroker(options.broker, "your broker (--broker): the demo publishes there")
        return
    try:
        broker, chosen = await start_private_broker(workdir / "broker")
    except ServerUnavailable as exc:
        say(out, str(exc))
        yield None
        return
    try:
        yield chosen
    finally:
        await broker.stop()


def postgres_here() -> tuple[Path, pwd.struct_passwd | None] | str:
    """PostgreSQL's binaries and the account to run them as, or why the demo runs without."""
    bin_dir = find_pg_bin_dir()
    if bin_dir is None:
        return "PostgreSQL is not installed"
    try:
        return bin_dir, server_account()
    except ServerUnavailable as exc:
        return str(exc)


def sync_prefix_for(options: DemoOptions) -> str:
    """On a broker that is not ours, a sync prefix of this run's own: no other ingest stores
    the demo's batches, and the demo's ingest acknowledges no other gateway's."""
    return PRIVATE_SYNC_PREFIX if options.broker is None else f"demo-{uuid.uuid4().hex[:8]}"


def make_plan(
    workdir: Path,
    broker: DemoBroker,
    settings: AgentSettings,
    postgres: tuple[Path, pwd.struct_passwd | None] | str,
) -> Plan:
    """The central store when PostgreSQL can run here (else: live only), and the screen's
    fixed lines."""
    central = None
    if not isinstance(postgres, str):
        central = CentralStore(
            bin_dir=postgres[0],
            workdir=workdir,
            account=postgres[1],
            broker_url=broker.url,
            protocol=broker.protocol,
            sync_prefix=settings.mqtt.sync_prefix,
            gateway=settings.gateway.id,
        )
    setup = Setup(
        broker_url=broker.url,
        broker=broker.description,
        data_dir=workdir,
        live_root=settings.mqtt.topic_root,
        no_central=postgres if isinstance(postgres, str) else "",
        amqtt_sub=_amqtt_sub_instead(),
    )
    return Plan(setup=setup, central=central)


def _amqtt_sub_instead() -> Path | None:
    """The venv's amqtt_sub when mosquitto_sub is not on PATH (and amqtt is installed)."""
    if shutil.which("mosquitto_sub") is not None:
        return None
    candidate = Path(sys.executable).parent / "amqtt_sub"
    return candidate if candidate.exists() else None


def central_view(plan: Plan) -> Central | None:
    """The central store's figures for the screen (None: there is none)."""
    store = plan.central
    if store is None:
        return None
    postgres = store.postgres
    where = f"edge-agent ingest (in this process, {store.config_path.name}) -> PostgreSQL"
    where += f" {postgres.version}" if postgres.version else ""
    where += f" on 127.0.0.1:{postgres.port}" if postgres.port else ""
    figures = store.figures
    return Central(where=where, state=figures.state, stored=figures.stored, acked=figures.acked)


async def _display(out: TextIO, frame: Callable[[], str], done: asyncio.Event) -> None:
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), REFRESH)
        if not done.is_set():
            draw(out, frame())


def start_lines(plan: Plan) -> list[str]:
    """What runs where, before the first screen."""
    setup = plan.setup
    lines = where_lines(setup)
    store = plan.central
    if store is None:
        lines.append(f"no central store: running live only ({setup.no_central})")
    else:
        lines.append(
            f"central: edge-agent ingest in this process on {store.sync_topic}, PostgreSQL "
            f"{store.postgres.version} starting in {store.postgres.workdir}"
        )
    return lines


def stop_lines(plan: Plan, runtime: Runtime) -> list[str]:
    """What was stored centrally."""
    view = central_view(plan)
    if view is None:
        stored = "nothing stored centrally (no central store: live only)"
    elif view.stored is None:
        stored = f"nothing stored centrally ({view.state})"
    else:
        committed = runtime.gateway.outbox.committed_seq if runtime.gateway else 0
        stored = (
            f"stored centrally: {view.stored:,} rows; the central store acknowledged seq "
            f"{view.acked or 0:,} of the {committed:,} the gateway committed"
        )
    return [stored]


def temp_parent() -> str | None:
    """Where the demo's temporary directory goes: the usual place (None), unless the account
    that root runs the servers as could not enter it (a TMPDIR under /root); then /tmp."""
    if os.geteuid() != 0:
        return None
    usual = Path(tempfile.gettempdir()).resolve()
    if all(folder.stat().st_mode & stat.S_IXOTH for folder in (usual, *usual.parents)):
        return None
    return "/tmp"


async def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> int:
    """The demo until Ctrl-C or ``options.duration``: 0; 2 when no broker can be had."""
    for name in ignored_overrides():
        say(out, f"ignoring {name}: the demo runs on its own settings (see --broker)")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        parent = await asyncio.to_thread(temp_parent)
        with tempfile.TemporaryDirectory(prefix="edge-agent-demo-", dir=parent) as temp:
            workdir = Path(temp)
            if os.geteuid() == 0:
                # The servers run as an unprivileged account: it must reach its folders.
                await asyncio.to_thread(workdir.chmod, 0o711)
            code = await _run_in(workdir, options, out, stop)
        if code == EXIT_OK:
            say(out, f"stopped; {workdir} deleted")
        return code
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _run_in(workdir: Path, options: DemoOptions, out: TextIO, stop: asyncio.Event) -> int:
    async with broker_for(options, workdir, out) as broker:
        if broker is None:
            return EXIT_NO_BROKER
        postgres = postgres_here()
        settings = load_demo_config(
            broker_url=broker.url,
            protocol=broker.protocol,
            sync_enabled=not isinstance(postgres, str),
            sync_prefix=sync_prefix_for(options),
        )
        plan = make_plan(workdir, broker, settings, postgres)
        for line in start_lines(plan):
            say(out, line)
        runtime = await _run_line(settings, plan, options, out, stop)
    draw(out, render(runtime, plan.setup, central_view(plan), "stopped"))
    for line in stop_lines(plan, runtime):
        say(out, line)
    return EXIT_OK


async def _run_line(
    settings: AgentSettings,
    plan: Plan,
    options: DemoOptions,
    out: TextIO,
    stop: asyncio.Event,
) -> Runtime:
    """The simulators, the agent, the central store and the screen until ``stop`` or the
    duration; all have stopped when this returns."""
    async with (
        ModbusSimulator(port=0, seed=7, speed=1.0) as press,
        OpcUaSimulator(port=0, seed=8, speed=1.0, bulk_count=0) as filler,
    ):
        assert press.port is not None
        say(out, f"simulators: Modbus TCP on 127.0.0.1:{press.port}, OPC UA on {filler.url}")
        runtime = Runtime(
            point_at_simulators(
                settings,
                modbus_port=press.port,
                opcua_url=filler.url,
                data_dir=plan.setup.data_dir / "agent",
            )
        )
        central_stop, display_stop = asyncio.Event(), asyncio.Event()

        def frame() -> str:
            phase: Phase = "stopping" if stop.is_set() else "running"
            return render(runtime, plan.setup, central_view(plan), phase)

        async with asyncio.TaskGroup() as group:
            agent = group.create_task(runtime.run(stop), name="demo-agent")
            # The database starts once the simulators run (its initdb would slow their start
            # down): the agent's first batches wait in its outbox and go when the ingest says
            # it is online.
            central = (
                group.create_task(plan.central.run(central_stop), name="demo-central")
                if plan.central is not None
                else None
            )
            group.create_task(_display(out, frame, display_stop), name="demo-display")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), options.duration)
            stop.set()
            # The agent first (its last batches are acknowledged while the ingest still
            # runs), then the central store (a last count), then the screen.
            await agent
            central_stop.set()
            if central is not None:
                await central
            display_stop.set()
    return runtime


def quiet_logging() -> None:
    """Keep the screen for the figures: only warnings and errors are logged."""
    root = logging.getLogger()
    if root.level < logging.WARNING:
        root.setLevel(logging.WARNING)
