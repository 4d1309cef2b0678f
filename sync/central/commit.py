"""One batch into PostgreSQL in one transaction, what its database errors mean, and the
database's availability (retried with back-off, logged once per outage).

The transaction (docs/central.md, "What one batch does"): COPY the rows into the connection's
temporary staging table, ``INSERT INTO edge_events ... ON CONFLICT DO NOTHING``, then
``edge_commit_ranges`` records the batch's seq range and the ranges its gap events declare
dropped, and advances the stream's watermark under the stream's row lock. Nothing is acked
before COMMIT returned (docs/delivery.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from sync.central.batch import COLUMNS, Batch
from sync.central.stats import IngestStats

log = logging.getLogger("edge_agent.ingest")

T = TypeVar("T")

STAGING_TABLE = "edge_ingest_batch"

_COLUMN_LIST = ", ".join(COLUMNS)
_CREATE_STAGING = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING_TABLE} (
  gateway_id text, stream_id uuid, seq bigint, ts timestamptz, kind text,
  device text, tag text, value jsonb, quality text
) ON COMMIT DELETE ROWS
"""
_INSERT = (
    f"INSERT INTO edge_events ({_COLUMN_LIST}) "
    f"SELECT {_COLUMN_LIST} FROM {STAGING_TABLE} ON CONFLICT DO NOTHING"
)
_COMMIT_RANGES = "SELECT edge_commit_ranges($1, $2, $3::bigint[], $4::bigint[])"

# The server or the connection is away or overloaded: retry the same batch later.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,  # class 08, includes ConnectionDoesNotExistError
    asyncpg.OperatorInterventionError,  # class 57: shutdown, crash, starting up, cancelled
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.PostgresSystemError,  # class 58: I/O error
    asyncpg.TransactionRollbackError,  # class 40: deadlock or serialization failure
    asyncpg.ReadOnlySQLTransactionError,  # a fail-over left us on a read-only standby
    # PostgreSQL killed mid-COPY can leave asyncpg's protocol confused ("cannot switch to state
    # 15; another operation (2) is in progress", seen in bench/soak.py); the connection is
    # terminated (see commit_pooled) and the batch retried on a fresh one.
    asyncpg.InternalClientError,
)
# The batch's content was refused: it is malformed.
_REFUSED_DATA: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    UnicodeError,
)
# Server-reported errors after which the session is gone or ending anyway.
_SESSION_ENDING: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.PostgresSystemError,
)


async def prepare_connection(conn: Any) -> None:
    """Create the session's staging table (the pool's ``init``; once per connection)."""
    await conn.execute(_CREATE_STAGING)


async def commit_batch(conn: Any, batch: Batch) -> tuple[int, int]:
    """Commit a batch in one transaction; return (stream watermark, rows newly inserted).

    ``conn`` must have been through ``prepare_connection``. Rows already stored (a resend,
    another replica) are absorbed by ``ON CONFLICT DO NOTHING``; the batch's covered ranges are
    recorded and the watermark advanced under the stream's row lock in the same transaction.
    """
    inserted = 0
    async with conn.transaction():
        if batch.rows:
            await conn.copy_records_to_table(STAGING_TABLE, records=batch.rows, columns=COLUMNS)
            status = await conn.execute(_INSERT)
            inserted = int(status.rsplit(" ", 1)[-1])
        acked = await conn.fetchval(
            _COMMIT_RANGES,
            batch.gateway,
            batch.stream_id,
            [first for first, _ in batch.covered],
            [last for _, last in batch.covered],
        )
    return int(acked), inserted


async def commit_pooled(pool: Any, batch: Batch) -> tuple[int, int]:
    """``commit_batch`` on a connection of ``pool``; a connection in doubt is terminated."""
    async with pool.acquire() as conn:
        try:
            return await commit_batch(conn, batch)
        except BaseException as exc:  # a cancellation mid-command leaves the session in doubt too
            if not connection_survives(exc):
                # Never reused: the pool opens a fresh one. A connection that closed by itself
                # has already been handed back to the pool, whose proxy then refuses every call
                # ("connection has been released back to the pool"): nothing left to do.
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
            raise


def is_transient(exc: BaseException) -> bool:
    """Whether a database error means 'try again later' rather than 'this batch is bad'."""
    return isinstance(exc, _TRANSIENT)


def is_refused_data(exc: BaseException) -> bool:
    """Whether PostgreSQL refused the batch's content: the batch is malformed."""
    return isinstance(exc, _REFUSED_DATA)


def reported_by_server(exc: BaseException) -> bool:
    """Whether PostgreSQL itself reported the error (e.g. an unknown database, a refused login)."""
    return isinstance(exc, asyncpg.PostgresError)


def connection_survives(exc: BaseException) -> bool:
    """Whether a connection may go back to the pool after ``exc`` ended a commit on it.

    Only an error the server reported for a statement leaves the session in a known state
    (the transaction rolled back, the protocol idle). After anything else - a lost socket,
    or asyncpg's protocol confused by a FATAL message that arrived while it was idle (a
    PostgreSQL shutdown or crash: the next command then fails with "cannot switch to state
    21; another operation (2) is in progress" and the ROLLBACK with "another operation is in
    progress") - the pool's reset would run on a broken session: asyncio reports "Resetting
    connection with an active transaction" and the reset fails too.
    """
    return reported_by_server(exc) and not isinstance(exc, _SESSION_ENDING)


def is_orphaned_asyncpg_waiter(context: dict[str, Any]) -> bool:
    """Whether an asyncio exception report is asyncpg's orphaned waiter of a lost connection.

    asyncpg (0.32) creates a command's waiter before it switches the protocol state; when the
    switch fails (the FATAL case of ``connection_survives``) the command raises but its waiter
    stays behind, and the connection's end sets ``ConnectionDoesNotExistError`` on it that
    nobody reads: asyncio then reports "Future exception was never retrieved". The failure
    itself reached the commit, which retries it, so the report says nothing new.
    """
    return context.get("message") == "Future exception was never retrieved" and isinstance(
        context.get("exception"), asyncpg.ConnectionDoesNotExistError
    )


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``, for one-line log messages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__


class DatabaseAvailability:
    """Whether PostgreSQL answers (logged once per outage) and the back-off between retries."""

    def __init__(self, *, stats: IngestStats, retry_min: float, retry_max: float) -> None:
        """Retry delays back off from ``retry_min`` to ``retry_max`` seconds."""
        if not 0 < retry_min <= retry_max:
            raise ValueError("need 0 < retry_min <= retry_max")
        self._stats = stats
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._down_since: float | None = None

    @property
    def up(self) -> bool:
        """False from a failed database call until the next successful one."""
        return self._down_since is None

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...)."""
        ceiling = min(self._retry_max, self._retry_min * 2 ** min(attempt - 1, 20))
        # Jitter: replicas (and workers) hitting a database that just came back spread out.
        return random.uniform(ceiling / 2, ceiling)

    def failed(self, exc: BaseException) -> None:
        """Count a transient failure; the first of an outage is logged."""
        self._stats.db_failures += 1
        if isinstance(exc, asyncpg.TransactionRollbackError):
            return  # a conflict with a concurrent commit, not an outage: just retry
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "ingest: PostgreSQL unavailable (%s): no acks until it is back; retrying",
                describe(exc),
            )

    def succeeded(self) -> None:
        """A database call succeeded: log the end of an outage."""
        if self._down_since is not None:
            log.info(
                "ingest: PostgreSQL available again after %.1f s",
                time.monotonic() - self._down_since,
            )
            self._down_since = None

    async def retry(self, call: Callable[[], Awaitable[T]]) -> T:
        """Await ``call()`` until it succeeds; only transient database errors are retried."""
        attempt = 0
        while True:
            try:
                result = await call()
            except Exception as exc:
                if not is_transient(exc):
                    raise  # wrong password, unknown database...: a configuration error
                self.failed(exc)
                attempt += 1
                await asyncio.sleep(self.backoff(attempt))
                continue
            self.succeeded()
            return result
