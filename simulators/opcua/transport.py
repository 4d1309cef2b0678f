"""asyncua's server with a stallable transport, and the server's lifecycle helpers.

Fault injection without a proxy: the listening server is asyncua's ``BinaryServer`` with a
protocol subclass that drops incoming and outgoing bytes while stalled (connections stay open,
nothing is executed or answered), as from a hung PLC.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from typing import Any, cast

from asyncua import ua
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.server import Server

__all__ = ["SimServer", "StallSwitch", "close_sessions", "free_port", "stop_server"]


class StallSwitch:
    """Whether the server is stalled: neither reading nor answering, for a while or until off."""

    def __init__(self) -> None:
        """Not stalled."""
        self._until: float | None = None

    def stall(self, seconds: float | None) -> None:
        """Stall for ``seconds`` (None = until ``unstall()``; 0 or less = unstall)."""
        if seconds is not None and seconds <= 0:
            self.unstall()
            return
        self._until = time.monotonic() + (math.inf if seconds is None else seconds)

    def unstall(self) -> None:
        """Answer again."""
        self._until = None

    def stalled(self) -> bool:
        """True while the server must neither read nor answer."""
        if self._until is None:
            return False
        if time.monotonic() < self._until:
            return True
        self._until = None
        return False


class _StallableTransport:
    """Wraps a connection's transport: writes are dropped while the simulator is stalled."""

    def __init__(self, transport: asyncio.Transport, stall: StallSwitch) -> None:
        self._transport = transport
        self._stall = stall

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send, unless stalled (then the bytes vanish, as from a hung PLC)."""
        if not self._stall.stalled():
            self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _SimProtocol(OPCUAProtocol):
    """asyncua's per-connection protocol, deaf and mute while stalled."""

    stall: StallSwitch

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Hand asyncua a transport whose writes can be dropped."""
        wrapped = _StallableTransport(cast(asyncio.Transport, transport), self.stall)
        super().connection_made(cast(asyncio.BaseTransport, wrapped))

    def data_received(self, data: bytes) -> None:
        """Drop requests while stalled: not executed, never answered."""
        if self.stall.stalled():
            return
        super().data_received(data)


class _SimBinaryServer(BinaryServer):
    """asyncua's listener with the stallable protocol."""

    stall: StallSwitch

    def _make_protocol(self) -> OPCUAProtocol:
        protocol = _SimProtocol(
            iserver=self.iserver,
            policies=self._policies,
            clients=self.clients,
            closing_tasks=self.closing_tasks,
            limits=self.limits,
        )
        protocol.stall = self.stall
        return protocol


class SimServer(Server):
    """asyncua's Server whose start() uses the stallable listener (otherwise identical)."""

    stall: StallSwitch

    async def start(self) -> None:
        """Set up endpoints, start the internal server and listen."""
        # Mirrors Server.start(), which hard-codes BinaryServer.
        await self._setup_server_nodes()
        await self.iserver.start()
        try:
            host, port = self._get_bind_socket_info()
            bserver = _SimBinaryServer(self.iserver, cast(str, host), cast(int, port), self.limits)
            bserver.stall = self.stall
            bserver.set_policies(self._policies)
            await bserver.start()
        except BaseException:
            await self.iserver.stop()
            raise
        self.bserver = bserver


async def close_sessions(server: Server) -> None:
    """Close every session, those whose connection is gone included."""
    # Sessions with subscriptions outlive their connection (spec Part 4 6.7) so that a client
    # can re-activate them; a restarted PLC has forgotten them.
    registry = cast(dict[ua.NodeId, Any], server.iserver._external_sessions)
    for session in list(registry.values()):
        with contextlib.suppress(Exception):
            await session.close_session(True)


async def stop_server(server: Server) -> None:
    """Close the sessions and stop ``server``, ignoring its errors."""
    await close_sessions(server)
    with contextlib.suppress(Exception):
        await server.stop()


def free_port(host: str) -> int:
    """A port on ``host`` that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
