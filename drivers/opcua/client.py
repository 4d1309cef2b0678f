"""The asyncua ``Client`` of one connection: how it is built, how its connect failures are
classified, and how it is closed without hanging (docs/opcua.md, "Connection, reconnect and
stalls").

* A fresh client per connection, asyncua's auto-reconnect off: a client that lost its
  connection is never reused (its session, publish loop and subscription state are gone or
  stale).
* asyncua's session watchdog reads ServerStatus every ``max(10 s, 5 x timeout)`` with that
  deadline: generous, because under load the agent's event loop and a busy server each add
  seconds. It reports a lost or hung connection to the subscription as BadShutdown.
* asyncua's ``disconnect()`` waits for CloseSession, which a hung server never answers, and
  leaves its background tasks running when interrupted: closing is bounded and finishes by
  cancelling those tasks and dropping the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any, Final

from asyncua.client.client import Client
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from drivers.base import DriverError, DriverFault, DriverUnavailable
from drivers.opcua.config import OpcUaDeviceConfig
from drivers.opcua.values import status_name

log = logging.getLogger("edge_agent.opcua")

_LOGIN_REFUSED: Final = frozenset(
    {
        StatusCodes.BadUserAccessDenied,
        StatusCodes.BadIdentityTokenRejected,
        StatusCodes.BadIdentityTokenInvalid,
    }
)
_SECURITY_REFUSED: Final = frozenset(
    {
        StatusCodes.BadSecurityChecksFailed,
        StatusCodes.BadCertificateUntrusted,
        StatusCodes.BadCertificateInvalid,
        StatusCodes.BadCertificateUriInvalid,
        StatusCodes.BadCertificateTimeInvalid,
        StatusCodes.BadCertificateRevoked,
        StatusCodes.BadSecurityPolicyRejected,
        StatusCodes.BadSecurityModeRejected,
        StatusCodes.BadApplicationSignatureInvalid,
    }
)


def new_client(config: OpcUaDeviceConfig, application_uri: str) -> Client:
    """A client for one connection (not connected, no security set yet)."""
    client = Client(
        config.url,
        timeout=config.timeout,
        # asyncua probes the server this often with this deadline (see the module notes).
        watchdog_intervall=max(10.0, 5 * config.timeout),
        auto_reconnect=False,
    )
    client.name = client.description = "edge-agent"
    client.application_uri = application_uri
    client.product_uri = "urn:edge-agent"
    client.session_timeout = int(config.session_timeout * 1000)
    if config.username:
        client.set_user(config.username)
        if config.password is not None:
            client.set_password(config.password.get_secret_value())
    return client


def connect_error(config: OpcUaDeviceConfig, exc: Exception) -> DriverError:
    """A connect failure as DriverFault (will not heal by itself) or DriverUnavailable."""
    url = config.url
    if isinstance(exc, UaStatusCodeError):
        return _refusal(config, int(exc.code))
    if isinstance(exc, TimeoutError):
        return DriverUnavailable(f"no answer from {url} within the timeout")
    if isinstance(exc, OSError):  # ConnectionError included
        return DriverUnavailable(f"cannot connect to {url}: {exc.strerror or exc}")
    if isinstance(exc, UaError):
        return _library_error(config, exc)
    return DriverUnavailable(f"{url}: {type(exc).__name__}: {exc}")


def _refusal(config: OpcUaDeviceConfig, code: int) -> DriverError:
    """A status code that ended the connect: a refused login or secure channel is a fault."""
    name = status_name(code)
    if code in _LOGIN_REFUSED:
        who = f"user {config.username!r}" if config.username else "anonymous login"
        return DriverFault(f"server refused {who}: {name}")
    if code in _SECURITY_REFUSED:
        return DriverFault(
            f"server rejected the secure channel ({name}): the server must trust the "
            "agent's client certificate"
        )
    return DriverUnavailable(f"{config.url}: {name}")


def _library_error(config: OpcUaDeviceConfig, exc: UaError) -> DriverError:
    """asyncua's own errors, told apart by their wording (they carry no code)."""
    text = str(exc)
    if text.startswith("No matching endpoints"):
        # asyncua's wording when CreateSession lists no endpoint for our policy/mode.
        return DriverFault(
            f"{config.url}: server offers no {config.security_policy}/"
            f"{config.security_mode} endpoint"
        )
    if "certificate" in text.lower() or "endpoint" in text.lower():
        return DriverFault(f"{config.url}: {text}")
    return DriverUnavailable(f"{config.url}: {text or type(exc).__name__}")


async def shutdown(client: Client, deadline: float) -> None:
    """Close a client without ever hanging on a dead or stalled server."""
    try:
        async with asyncio.timeout(deadline):
            await client.disconnect()
    except TimeoutError:
        pass
    except Exception as exc:  # the socket is closed below whatever went wrong here
        log.debug("OPC UA disconnect: %r", exc)
    finally:
        with contextlib.suppress(Exception):
            client.disconnect_socket()
        # An interrupted disconnect() leaves asyncua's background tasks running.
        tasks = [task for task in _background_tasks(client) if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)


def _background_tasks(client: Client) -> Iterable[asyncio.Task[Any] | None]:
    """asyncua's per-client tasks: supervisor, stale watchdog, channel renewal, publish loop."""
    yield getattr(client, "_supervisor_task", None)
    yield getattr(client, "_stale_watchdog_task", None)
    yield getattr(client, "_renew_channel_task", None)
    yield getattr(client.uaclient.session, "_publish_task", None)
