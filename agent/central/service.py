"""`edge-agent ingest`: the central ingest service, wired from its config file."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid
from typing import Any

from agent.central.settings import CentralSettings
from agent.service.sdnotify import SdNotifier
from agent.service.watchdog import dead_tasks, ingest_status_line, watchdog_loop
from sync.central.commit import is_orphaned_asyncpg_waiter
from sync.central.ingest import Ingest, presence_payload, presence_topic
from sync.mqtt.client import MqttClient, TlsOptions, Will

log = logging.getLogger("edge_agent.ingest")


def ingest_for(settings: CentralSettings) -> Ingest:
    """An Ingest replica for a loaded central config."""
    mqtt = settings.mqtt
    tls = (
        TlsOptions(
            ca_file=str(mqtt.ca_file) if mqtt.ca_file else None,
            cert_file=str(mqtt.cert_file) if mqtt.cert_file else None,
            key_file=str(mqtt.key_file) if mqtt.key_file else None,
        )
        if mqtt.tls
        else None
    )
    # Replicas must not share a client id (the broker would disconnect one for the other).
    client_id = mqtt.client_id or f"edge-agent-ingest-{uuid.uuid4().hex[:12]}"
    client = MqttClient(
        host=mqtt.host,
        port=mqtt.port,
        client_id=client_id,
        username=mqtt.username,
        password=mqtt.password.get_secret_value() if mqtt.password else None,
        tls=tls,
        keepalive=mqtt.keepalive,
        name="ingest-mqtt",
        will=Will(presence_topic(mqtt.sync_prefix, client_id), lambda: presence_payload("offline")),
    )
    dsn = settings.postgres.dsn
    assert dsn is not None  # checked at load
    return Ingest(
        dsn=dsn.get_secret_value(),
        mqtt=client,
        sync_prefix=mqtt.sync_prefix,
        shared_group=mqtt.shared_group,
        months_ahead=settings.partitions.months_ahead,
        retention_months=settings.partitions.retention_months,
        maintenance_interval=settings.partitions.maintenance_interval,
        pool_size=settings.postgres.pool_size,
    )


def asyncio_report(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The ingest's asyncio exception handler: asyncpg's orphaned waiters at DEBUG, the rest
    to asyncio's default handler (ERROR)."""
    if is_orphaned_asyncpg_waiter(context):
        log.debug("ingest: asyncpg left a waiter behind on a lost connection (commit retried)")
        return
    loop.default_exception_handler(context)


async def run_until_signalled(settings: CentralSettings) -> int:
    """Run one replica until SIGTERM/SIGINT; exit code 0."""
    loop = asyncio.get_running_loop()
    ingest = ingest_for(settings)
    notifier = SdNotifier(unset_environment=True)
    task = asyncio.create_task(ingest.run(), name="ingest")
    # Ready as soon as it runs: waiting for PostgreSQL here would let a database outage at
    # boot fail the start (TimeoutStartSec) instead of being retried by the ingest.
    notifier.ready(status="starting")
    watchdog = (
        asyncio.create_task(
            watchdog_loop(
                notifier,
                lambda: dead_tasks([task]),
                notifier.watchdog_interval,
                status=lambda: ingest_status_line(
                    ingest, committed_rows=ingest.stats.rows_inserted
                ),
            ),
            name="watchdog",
        )
        if notifier.enabled
        else None
    )

    def stop() -> None:
        if watchdog is not None:
            watchdog.cancel()
        notifier.stopping()
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(asyncio_report)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        loop.set_exception_handler(previous_handler)
    log.info("ingest stopped")
    return 0
