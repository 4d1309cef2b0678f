"""Both programs' HTTP endpoint: fixed GET routes (/healthz, /readyz, /status, /metrics, the
status page and its document) served by aiohttp.

Loopback by default (`http.listen`). Every response carries a strict Content-Security-Policy
and `nosniff`; with a token configured (required off loopback, docs/page.md "Access") every
route but the open ones (probes, and /metrics unless `http.metrics_open = false`) needs it as
`Authorization: Bearer TOKEN` or as the password of HTTP basic auth.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

log = logging.getLogger("edge_agent.http")

# Handlers get this long to finish when the server stops (a page fetch is milliseconds).
SHUTDOWN_TIMEOUT = 1.0

# No inline script or style, nothing from elsewhere, never framed, no form posts anywhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'none'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}
REALM = 'Basic realm="edge-agent", charset="UTF-8"'


@dataclass(frozen=True, slots=True)
class Response:
    """Status, content type and body."""

    status: int
    body: bytes
    content_type: str = "application/json"


Route = Callable[[], Response | Awaitable[Response]]
# A route that reads the request's query string (`?filter=...`).
QueryRoute = Callable[[Mapping[str, str]], Awaitable[Response]]


def json_response(document: Any, status: int = 200) -> Response:
    """A JSON response."""
    return Response(status, json.dumps(document, separators=(",", ":")).encode())


@dataclass(frozen=True, slots=True)
class Guard:
    """Who may read what: every route but `open_paths` needs `token`."""

    token: str
    open_paths: frozenset[str]

    def allows(self, path: str, authorization: str | None) -> bool:
        """Whether a request for `path` with this Authorization header may be answered."""
        if path in self.open_paths:
            return True
        offered = _offered_token(authorization)
        return offered is not None and hmac.compare_digest(
            offered.encode("utf-8", "surrogateescape"), self.token.encode()
        )


PROBES = frozenset({"/healthz", "/readyz"})


_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".png": "image/png",
}


def page_routes(index: str, *assets: str) -> dict[str, Route]:
    """GET routes of a page shipped in `agent/data/page/`: `/` is the file `index`, each of
    `assets` is `/{name}` (read once, here)."""
    folder = resources.files("agent") / "data" / "page"
    routes: dict[str, Route] = {}
    for path, name in (("/", index), *((f"/{asset}", asset) for asset in assets)):
        suffix = "." + name.rpartition(".")[2]
        response = Response(200, (folder / name).read_bytes(), _CONTENT_TYPES[suffix])
        routes[path] = functools.partial(_fixed, response)
    return routes


def _fixed(response: Response) -> Response:
    return response


def guard_for(token: str | None, *, metrics_open: bool) -> Guard | None:
    """The guard of an endpoint with this token (None: no token, everything open)."""
    if token is None:
        return None
    open_paths = PROBES | {"/metrics"} if metrics_open else PROBES
    return Guard(token, open_paths)


def _offered_token(authorization: str | None) -> str | None:
    """The token of `Bearer TOKEN`, or the password of `Basic base64(user:password)`."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return credentials.strip()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


class HttpServer:
    """Serves fixed routes; ``async with HttpServer(host=..., port=..., routes=...)``."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        routes: Mapping[str, Route],
        query_routes: Mapping[str, QueryRoute] | None = None,
        guard: Guard | None = None,
    ) -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"invalid port {port}")
        self._host = host
        self._port = port
        self._routes = dict(routes)
        self._query_routes = dict(query_routes or {})
        self._guard = guard
        self._runner: web.AppRunner | None = None
        self._bound = port

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self._bound

    def _application(self) -> web.Application:
        app = web.Application(middlewares=[self._guarded])
        for path, route in self._routes.items():
            app.router.add_get(path, _handler(route))
        for path, query_route in self._query_routes.items():
            app.router.add_get(path, _query_handler(query_route))
        app.on_response_prepare.append(_secure_headers)
        return app

    async def __aenter__(self) -> HttpServer:
        runner = web.AppRunner(
            self._application(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = runner.addresses
        if addresses:
            self._bound = int(addresses[0][1])
        paths = " ".join([*self._routes, *self._query_routes])
        log.info("http: serving %s on %s:%d", paths, self._host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _guarded(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        guard = self._guard
        if guard is not None and not guard.allows(
            request.path, request.headers.get("Authorization")
        ):
            return web.Response(
                status=401,
                text="credentials required (docs/page.md, Access)\n",
                headers={"WWW-Authenticate": REALM},
            )
        try:
            return await handler(request)
        except web.HTTPException as exc:
            # aiohttp's own 404 / 405 as plain text, with the headers below.
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return web.Response(status=exc.status, text=f"{exc.reason.lower()}\n", headers=allow)
        except Exception:  # a route's bug must not take the server down
            log.exception("http: handler failed")
            return web.Response(status=503, text="internal error\n")


def _handler(route: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(_request: web.Request) -> web.Response:
        answer = route()
        response = await answer if inspect.isawaitable(answer) else answer
        # The content type goes in as a header: aiohttp's content_type= refuses parameters.
        return web.Response(
            status=response.status,
            body=response.body,
            headers={"Content-Type": response.content_type, "Cache-Control": "no-store"},
        )

    return handle


def _query_handler(route: QueryRoute) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        response = await route(request.query)
        return web.Response(
            status=response.status,
            body=response.body,
            headers={"Content-Type": response.content_type, "Cache-Control": "no-store"},
        )

    return handle


async def _secure_headers(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    response.headers.pop("Server", None)
