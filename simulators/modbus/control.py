"""The simulator's control channel: fault injection from another process (simulators/README.md).

A line protocol over TCP on 127.0.0.1, UTF-8, one command per line and one reply line per
command: ``ok``, ``ok <data>`` or ``error <reason>``. ``send_control`` is the client side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simulators.modbus.server import ModbusSimulator

__all__ = ["ControlChannel", "send_control"]

_Handler = Callable[[list[str]], Awaitable[str]]


class ControlChannel:
    """Serves control connections on 127.0.0.1, each command acting on one simulator."""

    def __init__(self, *, simulator: ModbusSimulator) -> None:
        """Act on ``simulator``; nothing listens before ``listen()``."""
        self._sim = simulator
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._handlers: dict[str, _Handler] = {
            "ping": self._ping,
            "status": self._status,
            "close": self._close_connections,
            "stall": self._stall,
            "unstall": self._unstall,
            "exception": self._exception,
            "wrong_tid": self._wrong_tid,
            "garbage": self._garbage,
            "clear": self._clear,
            "restart": self._restart,
            "speed": self._speed,
            "force_state": self._force_state,
            "write": self._write,
        }

    async def listen(self, port: int) -> int:
        """Listen on 127.0.0.1:``port`` (0 = any free port); returns the port."""
        self._server = await asyncio.start_server(self._serve_client, "127.0.0.1", port)
        return int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> list[asyncio.Task[None]]:
        """Stop listening and cancel every client; returns their tasks for the caller to await."""
        if self._server is not None:
            self._server.close()
            self._server = None
        clients = list(self._clients)
        for task in clients:
            task.cancel()
        return clients

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one control connection: one command per line, one reply line each."""
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            while line := await reader.readline():
                try:
                    reply = await self._execute(line.decode("utf-8", "replace"))
                except (ValueError, KeyError, IndexError, OSError) as exc:
                    reply = f"error {type(exc).__name__}: {exc}"
                writer.write(reply.encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            if task is not None:
                self._clients.discard(task)

    async def _execute(self, line: str) -> str:
        """Execute one command line and return the reply line (raises on a bad command)."""
        words = line.split()
        if not words:
            raise ValueError("empty command")
        command, args = words[0].lower(), words[1:]
        handler = self._handlers.get(command)
        if handler is None:
            raise ValueError(f"unknown command {command!r}")
        return await handler(args)

    # One handler per command: args are the words after the command name.

    async def _ping(self, args: list[str]) -> str:
        return "ok"

    async def _status(self, args: list[str]) -> str:
        sim = self._sim
        status = {
            "port": sim.port,
            "serial": sim.serial_device,
            "speed": sim.speed,
            "faults": sim.faults(),
            "connections": sim.connections,
            "writes": len(sim.writes),
            "units": {str(unit): sim.model(unit).snapshot() for unit in sim.units},
        }
        return "ok " + json.dumps(status, separators=(",", ":"))

    async def _close_connections(self, args: list[str]) -> str:
        return f"ok {self._sim.close_connections()}"

    async def _stall(self, args: list[str]) -> str:
        self._sim.stall(float(args[0]) if args else None)
        return "ok"

    async def _unstall(self, args: list[str]) -> str:
        self._sim.unstall()
        return "ok"

    async def _exception(self, args: list[str]) -> str:
        if not args:
            raise ValueError("usage: exception CODE [ADDR ...] | exception off")
        self._sim.exception(0 if args[0] == "off" else int(args[0], 0), args[1:] or None)
        return "ok"

    async def _wrong_tid(self, args: list[str]) -> str:
        self._sim.wrong_transaction_id(_parse_on(args))
        return "ok"

    async def _garbage(self, args: list[str]) -> str:
        self._sim.garbage(_parse_on(args))
        return "ok"

    async def _clear(self, args: list[str]) -> str:
        self._sim.clear_faults()
        return "ok"

    async def _restart(self, args: list[str]) -> str:
        await self._sim.restart()
        return "ok"

    async def _speed(self, args: list[str]) -> str:
        speed = float(args[0])
        if speed < 0 or not math.isfinite(speed):
            raise ValueError("speed must be finite and >= 0")
        self._sim.speed = speed
        return "ok"

    async def _force_state(self, args: list[str]) -> str:
        unit, code = int(args[0]), int(args[1])
        self._sim.model(unit).force_state(code, int(args[2]) if len(args) > 2 else 0)
        return "ok"

    async def _write(self, args: list[str]) -> str:
        unit, point = int(args[0]), args[1]
        self._sim.model(unit).write(point, json.loads(" ".join(args[2:])))
        return "ok"


def _parse_on(args: list[str]) -> bool:
    """Parse ``on``/``off`` (default on)."""
    if not args or args[0].lower() in ("on", "1", "true"):
        return True
    if args[0].lower() in ("off", "0", "false"):
        return False
    raise ValueError(f"expected on or off, got {args[0]!r}")


async def send_control(port: int, command: str, *, host: str = "127.0.0.1") -> str:
    """Send one command to a simulator's control port; return the text after ``ok``.

    Wrap it in ``asyncio.timeout()`` to bound it (``restart`` can take a moment).
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(command.strip().encode() + b"\n")
        await writer.drain()
        reply = (await reader.readline()).decode().rstrip("\n")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    if reply == "ok" or reply.startswith("ok "):
        return reply[3:]
    raise RuntimeError(f"simulator control: {reply or 'connection closed'}")
