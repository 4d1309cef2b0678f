"""A PostgreSQL FATAL message that reaches an idle pooled connection, as in a server shutdown.

bench/soak.py found it: PostgreSQL killed while the ingest committed left two ERROR lines from
asyncio in the ingest's log. A FATAL ErrorResponse that arrives while asyncpg's protocol is idle
(right after BEGIN's ReadyForQuery) puts it in an error state with no operation waiting; the
COPY that follows fails to switch state, the ROLLBACK fails with "another operation is in
progress", and the pool then resets that broken session ("Resetting connection with an active
transaction"). A proxy in front of a real PostgreSQL injects the message at exactly that point.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import uvloop

from agent.central.service import asyncio_report
from sync.central.commit import (
    commit_pooled,
    connection_survives,
    is_orphaned_asyncpg_waiter,
    is_transient,
    prepare_connection,
)
from tests.fixtures.central import batch, prepare_schema
from tests.fixtures.relay import TcpRelay


def fatal_message(text: str, code: str = "57P01") -> bytes:
    """A PostgreSQL ErrorResponse ('E') with severity FATAL."""
    body = b"SFATAL\0VFATAL\0C" + code.encode() + b"\0M" + text.encode() + b"\0\0"
    return b"E" + struct.pack("!I", len(body) + 4) + body


class FatalInjector(TcpRelay):
    """A relay to PostgreSQL that, once armed, sends a FATAL right after the next
    ReadyForQuery, in the same segment (as a server shutting down would, between commands)."""

    def __init__(self, target_port: int, target_host: str) -> None:
        super().__init__(target_port, target_host)
        self._armed = False
        self._hang_up = False
        self.injected = 0

    def arm(self, *, hang_up: bool = False) -> None:
        """Inject after the next ReadyForQuery of any connection (or close it there)."""
        self._armed = True
        self._hang_up = hang_up

    async def downstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Server -> client messages are all typed (sslmode=disable: no one-byte SSL answer).
        try:
            while True:
                head = await reader.readexactly(5)
                body = await reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)
                out = head + body
                if head[:1] == b"Z" and self._armed:
                    self._armed = False
                    self.injected += 1
                    if self._hang_up:
                        writer.write(out)
                        break
                    out += fatal_message("terminating connection due to administrator command")
                writer.write(out)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # either side went away
        writer.close()


def via(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc, query="sslmode=disable"))


@pytest.fixture
async def schema(postgres_database: str) -> str:
    await prepare_schema(postgres_database)
    return postgres_database


@pytest.fixture
async def proxied(schema: str) -> AsyncIterator[tuple[FatalInjector, asyncpg.Pool]]:
    """A one-connection ingest pool whose connection goes through a FatalInjector."""
    host, port = urlsplit(schema).netloc.rsplit("@", 1)[1].rsplit(":", 1)
    async with (
        FatalInjector(int(port), host) as proxy,
        asyncpg.create_pool(
            via(schema, proxy.port), min_size=1, max_size=1, init=prepare_connection
        ) as pool,
    ):
        yield proxy, pool


@contextlib.contextmanager
def asyncio_reports() -> Any:
    """Every context the running loop's exception handler is given."""
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    try:
        yield reports
    finally:
        loop.set_exception_handler(previous)


async def test_fatal_between_begin_and_copy_is_an_outage_and_the_session_is_not_reused(
    schema: str, proxied: tuple[FatalInjector, asyncpg.Pool]
) -> None:
    proxy, pool = proxied
    stream = str(uuid.uuid4())
    with asyncio_reports() as reports:
        # A first commit prepares the session (temp table, cached COPY statement).
        assert await commit_pooled(pool, batch(1, 100, stream=stream)) == (100, 100)
        proxy.arm()
        # asyncpg: the COPY cannot switch state, then ROLLBACK: another operation in progress
        with pytest.raises((asyncpg.InterfaceError, asyncpg.InternalClientError)) as failed:
            await commit_pooled(pool, batch(101, 200, stream=stream))
        assert proxy.injected == 1
        # An outage to retry, not a bad batch to skip: the ingest retries it.
        assert is_transient(failed.value), repr(failed.value)
        assert not connection_survives(failed.value)
        # The retry gets a fresh session and commits.
        assert await commit_pooled(pool, batch(101, 200, stream=stream)) == (200, 100)
        gc.collect()
        await asyncio.sleep(0)
    # Without the termination the pool reset the broken session: asyncio logged
    # "Resetting connection with an active transaction" and the release raised.
    assert not [r for r in reports if "Resetting connection" in str(r["message"])], reports
    # What stays is asyncpg's orphaned waiter, which the ingest's handler logs at DEBUG.
    assert all(is_orphaned_asyncpg_waiter(r) for r in reports), reports
    async with asyncpg.create_pool(schema, min_size=1, max_size=1) as check:
        assert await check.fetchval("SELECT count(*) FROM edge_events") == 200


async def test_connection_lost_between_begin_and_copy_raises_the_loss_itself(
    proxied: tuple[FatalInjector, asyncpg.Pool],
) -> None:
    # The lost connection is handed back to the pool by asyncpg itself; terminating it then
    # raised "connection has been released back to the pool" over the real error (soak).
    proxy, pool = proxied
    stream = str(uuid.uuid4())
    assert await commit_pooled(pool, batch(1, 100, stream=stream)) == (100, 100)
    proxy.arm(hang_up=True)
    with pytest.raises((asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError)) as lost:
        await commit_pooled(pool, batch(101, 200, stream=stream))
    assert proxy.injected == 1
    assert "released back to the pool" not in str(lost.value)
    assert is_transient(lost.value)
    assert await commit_pooled(pool, batch(101, 200, stream=stream)) == (200, 100)


@pytest.mark.parametrize(
    ("exc", "survives"),
    [
        (asyncpg.UniqueViolationError("duplicate"), True),  # a statement error: session fine
        (asyncpg.SerializationError("conflict"), True),
        (asyncpg.AdminShutdownError("terminating connection"), False),
        (asyncpg.ConnectionDoesNotExistError("closed in the middle"), False),
        (asyncpg.InterfaceError("another operation is in progress"), False),
        (asyncpg.InternalClientError("cannot switch to state 21"), False),
        (ConnectionResetError(104, "reset"), False),
        (TimeoutError(), False),
        (asyncio.CancelledError(), False),  # cancelled mid-command: the session is in doubt
    ],
)
def test_which_errors_leave_the_connection_reusable(exc: BaseException, survives: bool) -> None:
    assert connection_survives(exc) is survives


@pytest.mark.parametrize(
    ("context", "orphan"),
    [
        (
            {
                "message": "Future exception was never retrieved",
                "exception": asyncpg.ConnectionDoesNotExistError("closed in the middle"),
            },
            True,
        ),
        # A task's unretrieved exception is a bug of ours: it stays an ERROR.
        (
            {
                "message": "Task exception was never retrieved",
                "exception": asyncpg.ConnectionDoesNotExistError("closed in the middle"),
            },
            False,
        ),
        (
            {
                "message": "Future exception was never retrieved",
                "exception": asyncpg.InterfaceError("another operation is in progress"),
            },
            False,
        ),
        ({"message": "Resetting connection with an active transaction"}, False),
    ],
)
def test_only_asyncpg_orphaned_waiters_are_quietened(context: dict[str, Any], orphan: bool) -> None:
    assert is_orphaned_asyncpg_waiter(context) is orphan


def test_ingest_process_handler_logs_orphans_at_debug_and_the_rest_as_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = uvloop.new_event_loop()
    try:
        with caplog.at_level(logging.DEBUG):
            asyncio_report(
                loop,
                {
                    "message": "Future exception was never retrieved",
                    "exception": asyncpg.ConnectionDoesNotExistError("closed"),
                },
            )
            asyncio_report(loop, {"message": "Task exception was never retrieved"})
    finally:
        loop.close()
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert levels[0][0] == "DEBUG"
    assert "waiter" in levels[0][1]
    assert levels[1] == ("ERROR", "Task exception was never retrieved")
