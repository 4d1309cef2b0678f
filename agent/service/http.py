"""Fixed GET routes (/healthz, /readyz, /status, /metrics) over a tiny asyncio HTTP/1.1 server.

Loopback by default (`http.listen`). Only GET, no keep-alive, bounded request size: it is a
probe and scrape endpoint, not a web server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("edge_agent.http")

MAX_REQUEST = 8192


@dataclass(frozen=True, slots=True)
class Response:
    """Status, content type and body."""

    status: int
    body: bytes
    content_type: str = "application/json"


Route = Callable[[], Response]

_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    400: "Bad Request",
    503: "Service Unavailable",
}


def json_response(document: Any, status: int = 200) -> Response:
    """A JSON response."""
    return Response(status, json.dumps(document, separators=(",", ":")).encode())


class HttpServer:
    """Serves fixed routes; ``async with HttpServer(host=..., port=..., routes=...)``."""

    def __init__(self, *, host: str, port: int, routes: dict[str, Route]) -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"invalid port {port}")
        self._host = host
        self._port = port
        self._routes = dict(routes)
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> HttpServer:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("http: serving %s on %s:%d", " ".join(self._routes), self._host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                head = await reader.readuntil(b"\r\n\r\n")
            response = self._respond(head)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            response = Response(400, b"bad request\n", "text/plain")
        except Exception:  # a route's bug must not take the server down
            log.exception("http: handler failed")
            response = Response(503, b"internal error\n", "text/plain")
        header = (
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'OK')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(header + response.body)
            async with asyncio.timeout(5.0):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _respond(self, head: bytes) -> Response:
        if len(head) > MAX_REQUEST:
            return Response(400, b"request too large\n", "text/plain")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3:
            return Response(400, b"bad request\n", "text/plain")
        method, target, _ = parts
        if method != "GET":
            return Response(405, b"only GET\n", "text/plain")
        route = self._routes.get(target.split("?", 1)[0])
        if route is None:
            return Response(404, b"not found\n", "text/plain")
        return route()
