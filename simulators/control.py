"""The simulators' control channel: fault injection from another process (simulators/README.md).

A line protocol over TCP on 127.0.0.1, UTF-8, one command per line and one reply line per
command: ``ok``, ``ok <data>`` or ``error <reason>``. Each simulator gives its commands (a
handler per name, taking the words after it); ``send_control`` is the client side.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Mapping

__all__ = ["CommandHandler", "ControlServer", "parse_speed", "send_control"]

CommandHandler = Callable[[list[str]], Awaitable[str]]
# What a command's handler may raise for a bad command: it becomes the "error ..." reply.
_COMMAND_ERRORS = (ValueError, KeyError, IndexError, OSError, RuntimeError)


class ControlServer:
    """Serves control connections on 127.0.0.1, each line one of `commands`."""

    def __init__(self, *, commands: Mapping[str, CommandHandler]) -> None:
        """Serve `commands` (by lower-case name); nothing listens before ``listen()``."""
        self._commands = dict(commands)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[object]] = set()

    async def listen(self, port: int) -> int:
        """Listen on 127.0.0.1:``port`` (0 = any free port); returns the port."""
        self._server = await asyncio.start_server(self._serve_client, "127.0.0.1", port)
        return int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> list[asyncio.Task[object]]:
        """Stop listening and cancel every client; returns their tasks for the caller to await."""
        if self._server is not None:
            self._server.close()
            self._server = None
        clients = list(self._clients)
        for task in clients:
            task.cancel()
        return clients

    async def close(self) -> None:
        """``stop()``, and wait until every client's task has ended."""
        clients = self.stop()
        if clients:
            await asyncio.wait(clients)

    async def execute(self, line: str) -> str:
        """Execute one command line and return the reply line (raises on a bad command)."""
        words = line.split()
        if not words:
            raise ValueError("empty command")
        command, args = words[0].lower(), words[1:]
        handler = self._commands.get(command)
        if handler is None:
            raise ValueError(f"unknown command {command!r}")
        return await handler(args)

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
                    reply = await self.execute(line.decode("utf-8", "replace"))
                except _COMMAND_ERRORS as exc:
                    reply = f"error {type(exc).__name__}: {exc}"
                writer.write(reply.encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            if task is not None:
                self._clients.discard(task)


def parse_speed(args: list[str]) -> float:
    """The ``speed`` command's argument: simulated seconds per second, finite and >= 0."""
    speed = float(args[0])
    if speed < 0 or not math.isfinite(speed):
        raise ValueError("speed must be finite and >= 0")
    return speed


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
