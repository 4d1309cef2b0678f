"""The demo's central side: a private PostgreSQL and the real ingest service (`edge-agent
ingest`, run in this process on a config file written beside the database), and the figures
the screen shows: rows stored centrally and the gateway's acknowledged seq, counted by the
demo itself about once a second."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pwd
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from agent.central.service import ingest_for, serve
from agent.central.settings import CentralSettings, load_central_settings
from agent.demo.postgres import PrivatePostgres
from agent.demo.servers import ServerUnavailable
from agent.service.sdnotify import SdNotifier
from agent.service.tasks import leaf_exceptions

log = logging.getLogger("edge_agent.demo")

COUNT_INTERVAL = 1.0  # seconds between two counts of the stored rows
COUNT_QUERY = (
    "SELECT (SELECT count(*) FROM edge_events) AS stored, "
    "(SELECT coalesce(max(acked_seq), 0) FROM edge_streams WHERE gateway_id = $1) AS acked"
)


@dataclass(slots=True)
class CentralFigures:
    """What the screen says of the central store."""

    state: str = "starting PostgreSQL"
    stored: int | None = None  # rows in edge_events
    acked: int | None = None  # the gateway's watermark, as the central store records it


def ingest_config(broker_url: str, protocol: str, sync_prefix: str, dsn: str) -> str:
    """The ingest's config file (what `edge-agent ingest -c FILE` reads)."""
    return (
        "# written by edge-agent demo: the central ingest of this run\n"
        f'[mqtt]\nurl = "{broker_url}"\nprotocol = "{protocol}"\nsync_prefix = "{sync_prefix}"\n\n'
        f'[postgres]\ndsn = "{dsn}"\npool_size = 2\n\n'
        "[http]\nenabled = false\n"
    )


class CentralStore:
    """PostgreSQL, then the ingest, until told to stop; never ends the demo by failing."""

    def __init__(
        self,
        *,
        bin_dir: Path,
        workdir: Path,
        account: pwd.struct_passwd | None,
        broker_url: str,
        protocol: str,
        sync_prefix: str,
        gateway: str,
    ) -> None:
        self.postgres = PrivatePostgres(bin_dir, workdir / "postgres", account)
        self.config_path = workdir / "ingest.toml"
        self.figures = CentralFigures()
        self._broker_url = broker_url
        self._protocol = protocol
        self._sync_prefix = sync_prefix
        self._gateway = gateway

    @property
    def sync_topic(self) -> str:
        """The S/sync topic of the demo's gateway, which the ingest consumes."""
        return f"{self._sync_prefix}/{self._gateway}/sync"

    async def run(self, stop: asyncio.Event) -> None:
        """Start the database and the ingest, count every second; at ``stop``, count once
        more (the agent has stopped by then) and stop both."""
        try:
            await self.postgres.start()
        except (ServerUnavailable, OSError) as exc:
            self.figures.state = f"PostgreSQL did not start: {exc}"
            await self.postgres.stop()
            return
        try:
            settings = await asyncio.to_thread(self._write_config)
            self.figures.state = "running"
            ingest_stop = asyncio.Event()
            service = asyncio.create_task(self._serve(settings, ingest_stop), name="demo-ingest")
            try:
                await self._count_until(stop)
            finally:
                ingest_stop.set()
                await service
        finally:
            await self.postgres.stop()

    def _write_config(self) -> CentralSettings:
        self.config_path.write_text(
            ingest_config(self._broker_url, self._protocol, self._sync_prefix, self.postgres.dsn)
        )
        return load_central_settings(self.config_path, environ={})

    async def _serve(self, settings: CentralSettings, stop: asyncio.Event) -> None:
        try:
            await serve(settings, ingest_for(settings), SdNotifier(environ={}), stop)
        except* Exception as failure:
            causes = "; ".join(str(cause) for cause in leaf_exceptions(failure))
            self.figures.state = f"the ingest stopped: {causes}"
            log.error("demo: the ingest stopped: %s", causes)

    async def _count_until(self, stop: asyncio.Event) -> None:
        connection: asyncpg.Connection | None = None
        try:
            while True:
                connection = await self._count(connection)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), COUNT_INTERVAL)
                if stop.is_set():
                    connection = await self._count(connection)  # after the agent's last acks
                    return
        finally:
            if connection is not None:
                await connection.close()

    async def _count(self, connection: asyncpg.Connection | None) -> asyncpg.Connection | None:
        """One count; a failed one is retried on a new connection next time."""
        try:
            if connection is None:
                connection = await asyncpg.connect(self.postgres.dsn, timeout=5.0)
            row = await connection.fetchrow(COUNT_QUERY, self._gateway)
        except asyncpg.UndefinedTableError:
            return connection  # the ingest has not created its schema yet
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.debug("demo: counting the stored rows failed: %s", exc)
            if connection is not None:
                connection.terminate()
            return None
        if row is not None:
            self.figures.stored, self.figures.acked = int(row["stored"]), int(row["acked"])
        return connection
