"""The fault-injection control channel: a TCP line protocol on 127.0.0.1.

One command per line, one reply line each: ``ok``, ``ok <data>`` or ``error <reason>`` (the
same protocol as the Modbus simulator's; the commands are listed in simulators/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, cast

from simulators.opcua.values import json_value

if TYPE_CHECKING:
    from simulators.opcua.server import OpcUaSimulator

__all__ = ["ControlChannel", "send_control"]

Handler = Callable[["OpcUaSimulator", list[str]], Awaitable[str]]


class ControlChannel:
    """Listens on the control port and runs each command against one simulator."""

    def __init__(self, *, simulator: OpcUaSimulator) -> None:
        """Commands act on ``simulator``; nothing listens before ``start()``."""
        self._simulator = simulator
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int) -> int:
        """Listen on 127.0.0.1:``port`` (0 = any free); return the port."""
        self._server = await asyncio.start_server(self._client, "127.0.0.1", port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and end every open control connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one control connection: one command per line, one reply line each."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(cast("asyncio.Task[None]", task))
        try:
            while line := await reader.readline():
                try:
                    reply = await self.execute(line.decode("utf-8", "replace"))
                except (ValueError, KeyError, IndexError, OSError, RuntimeError) as exc:
                    reply = f"error {type(exc).__name__}: {exc}"
                writer.write(reply.encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(cast("asyncio.Task[None]", task))

    async def execute(self, line: str) -> str:
        """Execute one control command and return the reply line."""
        words = line.split()
        if not words:
            raise ValueError("empty command")
        cmd, args = words[0].lower(), words[1:]
        handler = _COMMANDS.get(cmd)
        if handler is None:
            raise ValueError(f"unknown command {cmd!r}")
        return await handler(self._simulator, args)


async def _ping(sim: OpcUaSimulator, args: list[str]) -> str:
    return "ok"


async def _status(sim: OpcUaSimulator, args: list[str]) -> str:
    return "ok " + json.dumps(sim.status_report(), separators=(",", ":"))


async def _close(sim: OpcUaSimulator, args: list[str]) -> str:
    return f"ok {sim.close_connections()}"


async def _stall(sim: OpcUaSimulator, args: list[str]) -> str:
    sim.stall(float(args[0]) if args else None)
    return "ok"


async def _unstall(sim: OpcUaSimulator, args: list[str]) -> str:
    sim.unstall()
    return "ok"


async def _restart(sim: OpcUaSimulator, args: list[str]) -> str:
    await sim.restart()
    return "ok"


async def _status_code(sim: OpcUaSimulator, args: list[str]) -> str:
    await sim.set_status(args[0], args[1])
    return "ok"


async def _set_value(sim: OpcUaSimulator, args: list[str]) -> str:
    await sim.set_value(args[0], json.loads(" ".join(args[1:])))
    return "ok"


async def _change_type(sim: OpcUaSimulator, args: list[str]) -> str:
    await sim.change_type(args[0], args[1])
    return "ok"


async def _release(sim: OpcUaSimulator, args: list[str]) -> str:
    await sim.release(args[0])
    return "ok"


async def _clear(sim: OpcUaSimulator, args: list[str]) -> str:
    await sim.clear_faults()
    return "ok"


async def _speed(sim: OpcUaSimulator, args: list[str]) -> str:
    speed = float(args[0])
    if speed < 0 or not math.isfinite(speed):
        raise ValueError("speed must be finite and >= 0")
    sim.speed = speed
    return "ok"


async def _force_state(sim: OpcUaSimulator, args: list[str]) -> str:
    sim.model.force_state(int(args[0]), int(args[1]) if len(args) > 1 else 0)
    return "ok"


async def _write(sim: OpcUaSimulator, args: list[str]) -> str:
    sim.model.write(args[0], json.loads(" ".join(args[1:])))
    return "ok"


async def _read(sim: OpcUaSimulator, args: list[str]) -> str:
    datavalue = sim.value(args[0])
    raw = datavalue.Value.Value if datavalue.Value is not None else None
    status = datavalue.StatusCode.name if datavalue.StatusCode is not None else "Good"
    return "ok " + json.dumps({"value": json_value(raw), "status": status})


_COMMANDS: Final[Mapping[str, Handler]] = MappingProxyType(
    {
        "ping": _ping,
        "status": _status,
        "close": _close,
        "stall": _stall,
        "unstall": _unstall,
        "restart": _restart,
        "status_code": _status_code,
        "set_value": _set_value,
        "change_type": _change_type,
        "release": _release,
        "clear": _clear,
        "speed": _speed,
        "force_state": _force_state,
        "write": _write,
        "read": _read,
    }
)


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
