"""Modbus TCP / RTU simulator of a production line: one ``LineModel`` per unit id (pymodbus 3.16).

Design (details in simulators/README.md):

* pymodbus' own ``ModbusTcpServer`` / ``ModbusSerialServer`` do the framing (``ModbusServers``
  below). Their datastore is replaced by ``LineStore`` (``store.py``), which answers from the
  line model on each request, following the fixed register map (``registers.py``).
* Fault injection (``faults.py``) happens in the store (stall, exception mode) and in pymodbus'
  ``trace_packet`` hook on the way out (wrong transaction id, garbage). ``close_connections``
  closes pymodbus' per-client protocols. No proxy is needed. Another process drives the faults
  through the control channel (``control.py``).
* A background task advances every model by ``speed`` x elapsed monotonic time at ~10 Hz.
* Every write request that reaches the datastore goes to the write log (``writelog.py``) before
  the response is sent. The command line is in ``cli.py``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Final

from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.base import ModbusBaseServer

from simulators.line import BulkBlock, LineModel
from simulators.modbus.control import ControlChannel
from simulators.modbus.faults import Faults
from simulators.modbus.registers import BULK_COUNT
from simulators.modbus.store import LineStore, Unit
from simulators.modbus.writelog import WriteLog, WriteRecord
from simulators.ptybridge import PtyBridge

__all__ = ["DEFAULT_PORT", "ModbusServers", "ModbusSimulator"]

DEFAULT_PORT: Final = 5020


class ModbusServers:
    """The pymodbus TCP and/or RTU server of one simulator: listen, restart, drop connections."""

    def __init__(
        self,
        *,
        host: str,
        port: int | None,
        serial: str | None,
        baudrate: int,
        units: Mapping[int, Unit],
        faults: Faults,
        write_log: WriteLog,
    ) -> None:
        """Configure; ``port=None`` = no TCP, ``serial="pty"`` = a virtual null-modem cable."""
        if port is None and serial is None:
            raise ValueError("enable TCP (port) or RTU (serial)")
        self._host = host
        self._requested_port = port
        self.port: int | None = None
        self._serial = serial
        self.serial_device: str | None = None
        self._baudrate = baudrate
        self._units = units
        self._faults = faults
        self._write_log = write_log
        self._tcp: ModbusTcpServer | None = None
        self._rtu: ModbusSerialServer | None = None
        self._bridge: PtyBridge | None = None

    @property
    def connections(self) -> int:
        """Number of open TCP client connections."""
        return len(self._tcp.active_connections) if self._tcp is not None else 0

    async def start(self) -> None:
        """Create the pty pair if asked for, then listen."""
        if self._serial == "pty":
            self._bridge = PtyBridge()
            self._bridge.open()
        await self._listen_all()

    async def restart(self) -> None:
        """Stop the servers and listen again on the same port (clients are disconnected)."""
        self._stop_listening()
        await self._listen_all()

    def close(self) -> None:
        """Stop the servers and remove the pty pair; idempotent."""
        self._stop_listening()
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None

    def close_connections(self) -> int:
        """Drop every TCP client connection now; returns how many were closed."""
        if self._tcp is None:
            return 0
        connections = list(self._tcp.active_connections.values())
        for connection in connections:
            connection.close()
        return len(connections)

    async def _listen_all(self) -> None:
        """Start the TCP and/or RTU server."""
        if self._requested_port is not None:
            port = self.port if self.port is not None else self._requested_port
            tcp = ModbusTcpServer(
                [],
                framer=FramerType.SOCKET,
                address=(self._host, port),
                ignore_missing_devices=True,
                trace_packet=self._faults.trace_hook(rtu=False),
            )
            tcp.context = self._store(rtu=False)
            await _listen(tcp, f"{self._host}:{port}")
            # asyncio's Server or uvloop's (which is no subclass of it): both list `sockets`.
            sockets = getattr(tcp.transport, "sockets", None)
            if not sockets:
                raise RuntimeError("pymodbus TCP server has no listening socket")
            self.port = int(sockets[0].getsockname()[1])
            self._tcp = tcp
        if self._serial is not None:
            device = self._bridge.a if self._bridge is not None else self._serial
            rtu = ModbusSerialServer(
                [],
                framer=FramerType.RTU,
                port=device,
                baudrate=self._baudrate,
                ignore_missing_devices=True,
                trace_packet=self._faults.trace_hook(rtu=True),
            )
            rtu.context = self._store(rtu=True)
            await _listen(rtu, device)
            self._rtu = rtu
            self.serial_device = self._bridge.b if self._bridge is not None else device

    def _store(self, *, rtu: bool) -> LineStore:
        """The datastore of one server, assigned to ``server.context`` after construction.

        pymodbus' server constructor wraps whatever context it gets in a new ``SimCore``.
        """
        return LineStore(
            units=self._units,
            faults=self._faults,
            write_log=self._write_log,
            silent_unknown_units=rtu,
        )

    def _stop_listening(self) -> None:
        """Close the servers and every client connection (listening sockets close at once)."""
        for server in (self._tcp, self._rtu):
            if server is not None:
                # close() rather than shutdown(): same effect for a background server, typed.
                server.close()
        self._tcp = None
        self._rtu = None


async def _listen(server: ModbusBaseServer, where: str) -> None:
    """Start listening or raise OSError with a readable one-line message."""
    # pymodbus logs the OSError as a warning and only raises "Could not start listen": catch
    # that log record (and keep it off stderr) to put the real reason in our error.
    reasons: list[str] = []

    def capture(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Failed to start server"):
            reasons.append(message.removeprefix("Failed to start server").strip())
            return False
        return True

    pymodbus_logger = logging.getLogger("pymodbus.logging")
    pymodbus_logger.addFilter(capture)
    try:
        await server.serve_forever(background=True)
    except RuntimeError as exc:
        reason = reasons[-1] if reasons else "in use or not accessible"
        raise OSError(f"cannot listen on {where}: {reason}") from exc
    finally:
        pymodbus_logger.removeFilter(capture)


class ModbusSimulator:
    """A Modbus TCP and/or RTU server in front of one LineModel per unit, with fault injection."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = DEFAULT_PORT,
        seed: int = 1,
        speed: float = 1.0,
        units: int = 1,
        serial: str | None = None,
        baudrate: int = 19200,
        write_log: str | os.PathLike[str] | None = None,
        bulk_change_fraction: float = 0.1,
        control_port: int | None = None,
        tick_interval: float = 0.1,
        model_factory: Callable[[int, int], LineModel] | None = None,
    ) -> None:
        """Configure; nothing is opened before ``start()`` / ``async with``.

        ``port=None`` disables TCP, ``port=0`` picks a free port (see ``.port``). Unit ``u``
        gets seed ``seed + u - 1``. ``model_factory(unit, seed)`` overrides the LineModel.
        """
        if port is None and serial is None:
            raise ValueError("enable TCP (port) or RTU (serial)")
        if not 1 <= units <= 247:
            raise ValueError("units must be within 1..247")
        if speed < 0 or not math.isfinite(speed):
            raise ValueError("speed must be finite and >= 0")
        if tick_interval <= 0:
            raise ValueError("tick_interval must be > 0")
        self.host = host
        self.seed = seed
        self.speed = speed
        self.tick_interval = tick_interval
        self.write_log_path = Path(write_log) if write_log is not None else None
        self._requested_control_port = control_port
        self.control_port: int | None = None
        factory = model_factory or (lambda _unit, unit_seed: LineModel(seed=unit_seed))
        self._units: dict[int, Unit] = {}
        for unit_id in range(1, units + 1):
            unit_seed = seed + unit_id - 1
            self._units[unit_id] = Unit(
                model=factory(unit_id, unit_seed),
                bulk=BulkBlock(
                    seed=unit_seed, size=BULK_COUNT, change_fraction=bulk_change_fraction
                ),
            )
        self._faults = Faults(seed=seed)
        self._write_log = WriteLog(path=self.write_log_path)
        self._servers = ModbusServers(
            host=host,
            port=port,
            serial=serial,
            baudrate=baudrate,
            units=self._units,
            faults=self._faults,
            write_log=self._write_log,
        )
        self._ticker: asyncio.Task[None] | None = None
        self._control: ControlChannel | None = None
        self._started = False

    # ------------------------------------------------------------ public API

    @property
    def port(self) -> int | None:
        """The TCP port listened on (None before start and without TCP)."""
        return self._servers.port

    @property
    def serial_device(self) -> str | None:
        """The serial device clients open (for ``serial="pty"`` the cable's other end)."""
        return self._servers.serial_device

    @property
    def units(self) -> tuple[int, ...]:
        """Served unit ids."""
        return tuple(self._units)

    def model(self, unit: int = 1) -> LineModel:
        """The LineModel behind ``unit``."""
        return self._units[unit].model

    @property
    def connections(self) -> int:
        """Number of open TCP client connections."""
        return self._servers.connections

    @property
    def writes(self) -> list[WriteRecord]:
        """Write requests received so far (the in-memory write log, oldest first)."""
        return self._write_log.records()

    async def start(self) -> None:
        """Open the write log, start the servers, the model ticker and the control channel."""
        if self._started:
            raise RuntimeError("simulator already started")
        self._started = True
        try:
            self._write_log.open()
            await self._servers.start()
            self._ticker = asyncio.create_task(self._tick_loop(), name="modbus-sim-ticker")
            if self._requested_control_port is not None:
                self._control = ControlChannel(simulator=self)
                self.control_port = await self._control.listen(self._requested_control_port)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop everything started by ``start()``; idempotent."""
        control_clients = self._control.stop() if self._control is not None else []
        self._control = None
        tasks = [t for t in (self._ticker, *control_clients) if t is not None]
        self._ticker = None
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                # asyncio.wait does not raise the tasks' CancelledError but does propagate a
                # cancellation of close() itself (after which the finally still cleans up).
                await asyncio.wait(tasks)
        finally:
            self._servers.close()
            self._write_log.close()
            self._started = False

    async def __aenter__(self) -> ModbusSimulator:
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

    def close_connections(self) -> int:
        """Drop every TCP client connection now; returns how many were closed."""
        return self._servers.close_connections()

    def stall(self, seconds: float | None = None) -> None:
        """Swallow requests (no execution, no answer, connections stay open); None = forever."""
        self._faults.stall(seconds)

    def unstall(self) -> None:
        """Answer requests again."""
        self._faults.unstall()

    def exception(self, code: int | None, addresses: Iterable[int | str] | None = None) -> None:
        """Answer matching requests with exception ``code`` (None or 0 turns it off).

        ``addresses``: None = every request; ints match any area, ``"hr:100"`` one area. A
        request matches if its range covers one of them. Matching writes are not executed.
        """
        self._faults.set_exception(code, addresses)

    def wrong_transaction_id(self, on: bool = True) -> None:
        """Answer with a mismatching MBAP transaction id (RTU: a wrong unit id, valid CRC)."""
        self._faults.wrong_tid = on

    def garbage(self, on: bool = True) -> None:
        """Replace every answer with random bytes (the request is still executed)."""
        self._faults.garbage = on

    def clear_faults(self) -> None:
        """Turn every injected fault off."""
        self._faults.clear()

    def faults(self) -> dict[str, object]:
        """Current fault switches."""
        return self._faults.as_dict()

    async def restart(self) -> None:
        """Stop and start the servers again on the same port (clients are disconnected)."""
        await self._servers.restart()

    # ------------------------------------------------------------ internals

    async def _tick_loop(self) -> None:
        """Advance every model by speed x elapsed monotonic time, ~10 times a second."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_interval)
            now = time.monotonic()
            dt = (now - last) * self.speed
            last = now
            if dt > 0:
                for unit in self._units.values():
                    unit.model.advance(dt)
