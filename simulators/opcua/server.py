"""OPC UA simulator of a production line (asyncua server) over the shared ``LineModel``.

One asyncua ``Server`` exposes the line model as typed variables (simulators/opcua/nodes.py,
variables.py). A background task advances the model by ``speed`` x elapsed time at ~10 Hz and
writes only the variables whose value changed, with the write time as SourceTimestamp, so
monitored items see real data changes; the bulk load-test variables change spread over each
simulated second (bulk.py). Security options are in security.py, client writes are logged by
writes.py. Faults: a stalled transport (transport.py), a restart that drops the listener,
every connection and every session (a restarted PLC forgets its sessions), and per-variable
status codes, values (NaN/Inf too) and data types (faults.py), also from another process
through the control channel (control.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from asyncua import ua
from asyncua.common.callback import CallbackType
from asyncua.server.server import Server

from simulators.line import BulkBlock, LineModel
from simulators.opcua.bulk import BulkChanges
from simulators.opcua.control import ControlChannel
from simulators.opcua.faults import VariableFaults
from simulators.opcua.nodes import (
    APPLICATION_URI,
    BULK_COUNT,
    NAMESPACE_INDEX,
    NAMESPACE_URI,
    bulk_name,
    model_values,
    node_name,
)
from simulators.opcua.security import (
    DEFAULT_PASSWORD,
    DEFAULT_USER,
    Endpoint,
    ServerCertificate,
    Users,
    choose_endpoints,
    configure_security,
)
from simulators.opcua.transport import (
    SimServer,
    StallSwitch,
    close_sessions,
    free_port,
    stop_server,
)
from simulators.opcua.values import json_value, same_value
from simulators.opcua.variables import Variables
from simulators.opcua.writes import WriteLog, WriteRecord

__all__ = ["DEFAULT_PORT", "OpcUaSimulator"]

log = logging.getLogger("edge_agent.simulator.opcua")

DEFAULT_PORT: Final = 4840


class OpcUaSimulator:
    """An OPC UA server in front of one LineModel, with security options and fault injection."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        seed: int = 1,
        speed: float = 1.0,
        secure: bool = False,
        endpoints: Sequence[Endpoint] | None = None,
        users: Mapping[str, str] | None = None,
        allow_anonymous: bool | None = None,
        password: str = DEFAULT_PASSWORD,
        pki_dir: str | os.PathLike[str] | None = None,
        bulk_count: int = BULK_COUNT,
        bulk_change_fraction: float = 0.1,
        control_port: int | None = None,
        write_log: str | os.PathLike[str] | None = None,
        tick_interval: float = 0.1,
        model: LineModel | None = None,
    ) -> None:
        """Configure; nothing is opened before ``start()`` / ``async with``.

        ``port=0`` picks a free port (kept across ``restart()``). ``secure=True`` offers only
        Basic256Sha256/SignAndEncrypt with user ``edge`` and ``password``; ``endpoints`` lists
        the (policy, mode) pairs to offer instead, e.g. ``ALL_ENDPOINTS``. ``users`` maps user
        names to passwords; anonymous logins are allowed unless ``secure`` or
        ``allow_anonymous=False``.
        """
        if speed < 0 or not math.isfinite(speed):
            raise ValueError("speed must be finite and >= 0")
        if tick_interval <= 0:
            raise ValueError("tick_interval must be > 0")
        if not 0 <= bulk_count <= 10_000:
            raise ValueError("bulk_count must be within 0..10000")
        self.endpoints: tuple[Endpoint, ...] = choose_endpoints(endpoints, secure)
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.seed = seed
        self.speed = speed
        self.users: dict[str, str] = dict(users) if users is not None else {}
        if secure and not self.users:
            self.users = {DEFAULT_USER: password}
        self.allow_anonymous = (not secure) if allow_anonymous is None else allow_anonymous
        self._certificate = ServerCertificate(
            directory=Path(pki_dir) if pki_dir is not None else None
        )
        self.bulk_count = bulk_count
        self.bulk = BulkBlock(
            seed=seed, size=max(bulk_count, 1), change_fraction=bulk_change_fraction
        )
        self.model = model if model is not None else LineModel(seed=seed)
        self.tick_interval = tick_interval
        self._requested_control_port = control_port
        self.control_port: int | None = None
        self._write_log = WriteLog(path=Path(write_log) if write_log is not None else None)
        self._stall = StallSwitch()
        self._variables = Variables(model=self.model, write_log=self._write_log)
        self._faults = VariableFaults(variables=self._variables, model=self.model, bulk=self.bulk)
        self._bulk_changes: BulkChanges | None = None
        self._model_revision = -1
        self._server: SimServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._control: ControlChannel | None = None
        self._started = False

    # ------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        """The endpoint URL, e.g. ``opc.tcp://127.0.0.1:4840``."""
        return f"opc.tcp://{self.host}:{self.port}"

    @property
    def certificate_path(self) -> Path | None:
        """The server certificate (DER) once loaded; None without security."""
        return self._certificate.path

    @property
    def certificate_der(self) -> bytes | None:
        """The server certificate's bytes (DER) once loaded; None without security."""
        return self._certificate.der

    @property
    def certificate_fingerprint(self) -> str | None:
        """SHA-256 of the server certificate (DER), ``AA:BB:..``; None without security."""
        return self._certificate.fingerprint

    @property
    def write_log_path(self) -> Path | None:
        """The file client writes are appended to, if any."""
        return self._write_log.path

    @property
    def server(self) -> Server:
        """The running asyncua server (for tests that need more than the methods here)."""
        if self._server is None:
            raise RuntimeError("simulator not started")
        return self._server

    @property
    def connections(self) -> int:
        """Open client connections."""
        if self._server is None:
            return 0
        return len(self._server.iserver.asyncio_transports)

    @property
    def writes(self) -> list[WriteRecord]:
        """Client write requests so far, oldest first."""
        return self._write_log.records

    @staticmethod
    def node_name(node: str) -> str:
        """``Filler.State`` from ``Filler.State`` or ``ns=2;s=Filler.State``."""
        return node_name(node)

    def node_id(self, node: str) -> ua.NodeId:
        """The NodeId of a variable; KeyError if there is none."""
        return self._variables.node_id(node)

    def value(self, node: str) -> ua.DataValue:
        """The variable's current DataValue as the server holds it."""
        return self.server.read_attribute_value(self.node_id(node))

    async def start(self) -> None:
        """Create the server and its variables, listen, start the model and control channel."""
        if self._started:
            raise RuntimeError("simulator already started")
        self._started = True
        try:
            self._write_log.open()
            await self._create_server()
            self._ticker = asyncio.create_task(self._tick_loop(), name="opcua-sim-ticker")
            if self._requested_control_port is not None:
                self._control = ControlChannel(simulator=self)
                self.control_port = await self._control.listen(self._requested_control_port)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop everything started by ``start()``; idempotent."""
        control, self._control = self._control, None
        ticker, self._ticker = self._ticker, None
        try:
            if control is not None:
                await control.close()
            if ticker is not None:
                ticker.cancel()
                await asyncio.wait([ticker])
        finally:
            server, self._server = self._server, None
            if server is not None:
                self._variables.detach()
                await stop_server(server)
            self._write_log.close()
            self._certificate.discard()
            self._started = False

    async def __aenter__(self) -> OpcUaSimulator:
        """Start the simulator."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the simulator."""
        await self.close()

    # ------------------------------------------------------------ faults

    def stall(self, seconds: float | None = None) -> None:
        """Neither read nor answer (connections stay open); None = until ``unstall()``."""
        self._stall.stall(seconds)

    def unstall(self) -> None:
        """Answer requests again."""
        self._stall.unstall()

    @property
    def stalled(self) -> bool:
        """True while stalled."""
        return self._stall.stalled()

    def close_connections(self) -> int:
        """Drop every client connection now (sessions survive, as on a network cut)."""
        if self._server is None:
            return 0
        transports = list(self._server.iserver.asyncio_transports)
        for transport in transports:
            transport.close()
        return len(transports)

    async def restart(self) -> None:
        """Like a PLC restart: listener, connections and sessions go; listen again."""
        server = self.server
        bserver = server.bserver
        if bserver is None:
            raise RuntimeError("simulator not listening")
        await bserver.stop()
        await close_sessions(server)
        self.unstall()
        await bserver.start()

    async def set_status(self, node: str, code: str | int) -> None:
        """Give a variable a status code (Bad*: the server then holds no value); Good clears."""
        await self._faults.set_status(node, code)

    async def set_value(self, node: str, value: Any) -> None:
        """Fix a variable's value (converted to its current type; NaN/Inf allowed for floats)
        until ``release()`` or ``clear_faults()``: the model no longer updates it."""
        await self._faults.set_value(node, value)

    async def change_type(self, node: str, type_name: str) -> None:
        """Change a variable's DataType at runtime (a PLC program change); the current value
        is converted (0 / '' where it cannot be)."""
        await self._faults.change_type(node, type_name)

    async def release(self, node: str) -> None:
        """Undo set_value/set_status/change_type for one variable."""
        await self._faults.release(node)

    async def clear_faults(self) -> None:
        """Stall off, every variable back to its own type, value and Good status."""
        self.unstall()
        await self._faults.release_all()

    def status_report(self) -> dict[str, object]:
        """Simulator status, as the control channel's ``status`` command replies it."""
        return {
            "url": self.url,
            "endpoints": [f"{policy}/{mode}" for policy, mode in self.endpoints],
            "certificate": str(self.certificate_path) if self.certificate_path else None,
            "speed": self.speed,
            "stalled": self.stalled,
            "connections": self.connections,
            "writes": len(self._write_log),
            **self._faults.report(),
            "snapshot": {k: json_value(v) for k, v in self.model.snapshot().items()},
        }

    # ------------------------------------------------------------ server and ticks

    async def _create_server(self) -> None:
        """Build the address space, security and users; start listening."""
        port = self._requested_port or free_port(self.host)
        self.port = port
        server = SimServer(user_manager=Users(self.users, self.allow_anonymous))
        server.stall = self._stall
        await server.init()
        server.disable_clock()  # its 1 s loop would delay every stop() by up to a second
        await server.set_application_uri(APPLICATION_URI)
        server.set_server_name("edge-agent line simulator")
        server.set_endpoint(f"opc.tcp://{self.host}:{port}/")
        index = await server.register_namespace(NAMESPACE_URI)
        if index != NAMESPACE_INDEX:
            raise RuntimeError(f"namespace {NAMESPACE_URI} got index {index}, expected 2")
        await configure_security(
            server,
            endpoints=self.endpoints,
            users=self.users,
            allow_anonymous=self.allow_anonymous,
            certificate=self._certificate,
        )
        await self._build_variables(server)
        server.subscribe_server_callback(CallbackType.PostWrite, self._write_log.on_post_write)
        self._server = server
        try:
            await server.start()
        except OSError as exc:
            self._variables.detach()
            await stop_server(server)
            self._server = None
            raise OSError(f"cannot listen on {self.host}:{port}: {exc.strerror or exc}") from exc

    async def _build_variables(self, server: Server) -> None:
        """The node table's and the bulk variables, from the model's current state."""
        self._bulk_changes = None
        if self.bulk_count:
            self._bulk_changes = BulkChanges(
                bulk=self.bulk, count=self.bulk_count, sim_time_s=self.model.sim_time_s
            )
        bulk_values = self._bulk_changes.values if self._bulk_changes is not None else []
        await self._variables.build(server, bulk_values)
        self._model_revision = self.model.revision

    async def _tick(self, dt: float) -> None:
        """Advance the model and write what changed."""
        model = self.model
        if dt > 0:
            model.advance(dt)
        now = datetime.now(UTC)
        if model.revision != self._model_revision:
            self._model_revision = model.revision
            for name, value in model_values(model.snapshot()).items():
                if self._faults.pinned(name) or same_value(self._variables.cached(name), value):
                    continue
                await self._variables.write(name, value, now=now)
        if self._bulk_changes is None:
            return
        per_tick = self.speed * self.tick_interval  # simulated seconds per tick
        for index, value in self._bulk_changes.due(model.sim_time_s, per_tick):
            name = bulk_name(index)
            if not self._faults.pinned(name):
                await self._variables.write(name, value, now=now)

    async def _tick_loop(self) -> None:
        """Advance the model by speed x elapsed monotonic time, ~10 times a second."""
        last = next_tick = time.monotonic()
        jitter = random.Random(f"ticks-{self.seed}")
        while True:
            # A fixed average cadence (the time a tick takes is not added to it), jittered so
            # that value changes do not phase-lock with the server's publishing timer.
            step = self.tick_interval * jitter.uniform(0.5, 1.5)
            next_tick = max(next_tick + step, time.monotonic())
            await asyncio.sleep(next_tick - time.monotonic())
            now = time.monotonic()
            dt = (now - last) * self.speed
            last = now
            try:
                await self._tick(dt)
            except Exception:
                # A bad injected value must not stop the line: log it and keep ticking.
                log.exception("opcua simulator: tick failed")
