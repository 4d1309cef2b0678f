"""`edge-agent ingest`: the central ingest service, wired from its config file.

One TaskGroup owns the service's tasks: the ingest, its HTTP endpoint (/healthz /readyz
/status /metrics and the status page, docs/page.md) and the systemd watchdog. SIGTERM/SIGINT
stop them through an Event (exit code 0); anything else that ends one of them ends the service,
each cause logged (exit code 1).
A cancellation from outside propagates.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from agent.central.metrics import IngestMetrics
from agent.central.page import IngestPage
from agent.central.settings import CentralSettings
from agent.service.http import (
    HttpServer,
    QueryRoute,
    Response,
    Route,
    guard_for,
    json_response,
    page_routes,
)
from agent.service.mqtt import mqtt_client
from agent.service.sdnotify import SdNotifier
from agent.service.tasks import leaf_exceptions
from agent.service.watchdog import dead_tasks, watchdog_loop
from agent.settings.loader import dotted
from sync.central.commit import describe, is_orphaned_asyncpg_waiter, reported_by_server
from sync.central.ingest import Ingest, presence_payload, presence_topic
from sync.central.overview import OverviewReader
from sync.events import dumps
from sync.mqtt.client import Will

log = logging.getLogger("edge_agent.ingest")

EXIT_FAILURE = 1


def ingest_status_line(ingest: Ingest, *, committed_rows: int) -> str:
    """One-line STATUS= summary of the central ingest."""
    return (
        f"database {'up' if ingest.db_up else 'down'}, {ingest.queued} messages queued, "
        f"{committed_rows} rows committed"
    )


def ingest_for(settings: CentralSettings) -> Ingest:
    """An Ingest replica for a loaded central config."""
    mqtt = settings.mqtt
    # Replicas must not share a client id (the broker would disconnect one for the other).
    client_id = mqtt.client_id or f"edge-agent-ingest-{uuid.uuid4().hex[:12]}"
    client = mqtt_client(
        mqtt,
        client_id=client_id,
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
        event_window=settings.events.window,
    )


def asyncio_report(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The ingest's asyncio exception handler: asyncpg's orphaned waiters at DEBUG, the rest
    to asyncio's default handler (ERROR)."""
    if is_orphaned_asyncpg_waiter(context):
        log.debug("ingest: asyncpg left a waiter behind on a lost connection (commit retried)")
        return
    loop.default_exception_handler(context)


def http_routes(ingest: Ingest) -> dict[str, Route]:
    """/healthz (alive), /readyz (200 only while consuming), /status (JSON), /metrics, and the
    status page's files (its document is `page_route`)."""
    metrics = IngestMetrics(ingest)

    def health() -> dict[str, bool]:
        return {
            "ready": ingest.ready,
            "database_up": ingest.db_up,
            "mqtt_connected": ingest.mqtt_connected,
        }

    def healthz() -> Response:
        return json_response({"status": "alive"})

    def readyz() -> Response:
        state = health()
        return json_response(state, 200 if state["ready"] else 503)

    def status() -> Response:
        return json_response({**health(), "queued": ingest.queued, "stats": asdict(ingest.stats)})

    def metrics_page() -> Response:
        return Response(200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    return {
        "/healthz": healthz,
        "/readyz": readyz,
        "/status": status,
        "/metrics": metrics_page,
        **page_routes("ingest.html", "page.css", "common.js", "ingest.js"),
    }


def page_route(page: IngestPage) -> QueryRoute:
    """/api/page: the status page's document; ?filter=TEXT keeps the matching gateways."""

    async def document(query: Mapping[str, str]) -> Response:
        return Response(200, dumps(await page.document(query.get("filter", ""))))

    return document


async def serve_http(settings: CentralSettings, ingest: Ingest) -> None:
    """Serve the ingest's routes on ``http.listen`` until cancelled; a port that cannot be bound
    is logged and the endpoint given up (the ingest runs on without it)."""
    config = settings.http
    dsn = settings.postgres.dsn
    assert dsn is not None  # checked at load
    reader = OverviewReader(dsn.get_secret_value())
    page = IngestPage(ingest, reader, broker=f"{settings.mqtt.host}:{settings.mqtt.port}")
    try:
        token = None if config.token is None else config.token.get_secret_value()
        guard = guard_for(token, metrics_open=config.metrics_open)
        async with HttpServer(
            host=config.host,
            port=config.port,
            routes=http_routes(ingest),
            query_routes={"/api/page": page_route(page)},
            guard=guard,
        ):
            await asyncio.Event().wait()  # serves from the event loop until cancelled
    except OSError as exc:
        # The endpoint is for operators; the data path must run without it.
        log.error("http: cannot listen on %s: %s", config.listen, exc)
    finally:
        await reader.close()


async def consume(ingest: Ingest) -> None:
    """``ingest.run()``, which runs until cancelled: returning at all is a failure."""
    await ingest.run()
    raise RuntimeError("the ingest stopped consuming without being told to")


async def serve(
    settings: CentralSettings, ingest: Ingest, notifier: SdNotifier, stop: asyncio.Event
) -> None:
    """Run the ingest, its HTTP endpoint and the watchdog in one TaskGroup until ``stop``."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(consume(ingest), name="ingest")]
        ingest_task = tasks[0]
        if settings.http.enabled:
            tasks.append(group.create_task(serve_http(settings, ingest), name="http"))
        # Ready as soon as it runs: waiting for PostgreSQL here would let a database outage at
        # boot fail the start (TimeoutStartSec) instead of being retried by the ingest.
        notifier.ready(status="starting")
        if notifier.enabled:
            watchdog = watchdog_loop(
                notifier,
                lambda: dead_tasks([ingest_task]),
                notifier.watchdog_interval,
                status=lambda: ingest_status_line(
                    ingest, committed_rows=ingest.stats.rows_inserted
                ),
            )
            tasks.append(group.create_task(watchdog, name="watchdog"))
        await stop.wait()
        notifier.stopping()
        for task in tasks:
            task.cancel()


async def run_until_signalled(settings: CentralSettings) -> int:
    """Run one replica until SIGTERM/SIGINT (exit code 0); 1 if it ended any other way."""
    loop = asyncio.get_running_loop()
    for loc, reason in settings.warnings():
        log.warning("config: %s: %s", dotted(loc), reason)
    ingest = ingest_for(settings)
    notifier = SdNotifier(unset_environment=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(asyncio_report)
    try:
        await serve(settings, ingest, notifier, stop)
    except BaseExceptionGroup as failure:
        for cause in leaf_exceptions(failure):
            # PostgreSQL's own words suffice for a configuration error (an unknown database, a
            # refused login); anything else is a bug, and its traceback is needed.
            trace = None if reported_by_server(cause) else cause
            log.error("ingest: stopped by %s", describe(cause), exc_info=trace)
        return EXIT_FAILURE
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        loop.set_exception_handler(previous_handler)
    log.info("ingest stopped")
    return 0
