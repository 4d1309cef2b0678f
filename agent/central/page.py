"""The ingest's status page document (`/api/page` of `edge-agent ingest`, docs/page.md "The
ingest's page"): the ingest's own state and, per gateway, its watermark, lag, malformed batches
and gaps. Read-only: it reads the Ingest and PostgreSQL, never changes them, and holds no
config secret (the broker shows as host and port, the database not at all)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import TypedDict

from agent import __version__
from sync.central.commit import describe
from sync.central.ingest import Ingest
from sync.central.overview import OverviewReader, StoredGateway, StoredOverview
from sync.central.stats import SENDER_CHARS

log = logging.getLogger("edge_agent.ingest")

# Gateways in one document: a person reads a few hundred rows; the filter finds the others.
GATEWAYS_SHOWN = 200
# The page asks again this often (a gateway's lag is read in seconds, not milliseconds).
REFRESH = 2.0


class IngestOverview(TypedDict):
    """The ingest replica itself."""

    version: str
    uptime_s: float
    verdict: str  # healthy | degraded | starting
    reasons: list[str]
    broker: str
    topic: str
    database_up: bool
    mqtt_connected: bool
    subscribed: bool
    queued: int
    queue_size: int
    messages: int
    batches_committed: int
    rows_inserted: int
    rows_duplicate: int
    malformed: int
    uncovered: int
    out_of_window: int
    overflow_dropped: int
    commit_errors: int
    acks_published: int
    acks_unsent: int


class StreamRow(TypedDict):
    """One stream of a gateway: stored watermark and what is committed above it, and the
    watermark this replica last sent."""

    stream: str
    acked_seq: int
    last_commit: float | None
    ranges_above: int
    highest_committed: int | None
    ack_sent: int | None


class GatewayRow(TypedDict):
    """One gateway (or sender of malformed messages)."""

    gateway: str
    last_message: float | None  # this replica's last S/sync from it (epoch s)
    last_ack: float | None  # this replica's last S/ack to it
    last_commit: float | None  # its newest stream's last commit (any replica)
    streams_total: int
    streams: list[StreamRow]  # the newest first
    malformed: int  # since this replica started
    gap_events: int
    gap_seqs: int
    last_gap: float | None  # the newest gap event's time


class IngestPageDocument(TypedDict):
    """/api/page of the ingest."""

    now: float
    refresh_s: float
    overview: IngestOverview
    database_read: str | None  # why the stored figures are missing, when they are
    gateways: list[GatewayRow]
    gateways_stored: int  # stored gateways matching the filter
    more: bool  # gateways beyond the ones listed match the filter


class IngestPage:
    """Builds the document from a running Ingest and its database."""

    def __init__(self, ingest: Ingest, reader: OverviewReader, *, broker: str) -> None:
        """Read ``ingest`` and, through ``reader``, PostgreSQL at every request."""
        self._ingest = ingest
        self._reader = reader
        self._broker = broker
        self._started = time.time()

    async def document(self, gateway_filter: str = "") -> IngestPageDocument:
        """The document now; ``gateway_filter`` keeps the gateways whose id contains it."""
        ingest = self._ingest
        needle = gateway_filter.strip().lower()[:SENDER_CHARS]
        seen = [name for name in ingest.senders.names() if needle in name.lower()]
        seen.sort()
        error = None
        try:
            stored = await self._reader.read(needle, GATEWAYS_SHOWN, seen[:GATEWAYS_SHOWN])
        except Exception as exc:  # the page shows what memory holds, and why the rest is missing
            error = describe(exc)
            log.debug("page: cannot read the database: %s", error)
            stored = StoredOverview(gateways=(), total=0)
        by_name = {gateway.gateway: gateway for gateway in stored.gateways}
        names = sorted({*by_name, *seen})
        malformed = _malformed_by_name(ingest.stats.malformed_by_sender)
        acks = ingest.acks_sent()
        rows = [
            self._gateway(name, by_name.get(name), malformed.get(name, 0), acks)
            for name in names[:GATEWAYS_SHOWN]
        ]
        now = time.time()
        return {
            "now": now,
            "refresh_s": REFRESH,
            "overview": self._overview(now, error),
            "database_read": error,
            "gateways": rows,
            "gateways_stored": stored.total,
            "more": len(names) > GATEWAYS_SHOWN or stored.total > len(stored.gateways),
        }

    def _overview(self, now: float, read_error: str | None) -> IngestOverview:
        ingest = self._ingest
        stats = ingest.stats
        reasons = []
        if not ingest.db_up:
            reasons.append("PostgreSQL does not answer: no batch is committed nor acknowledged")
        elif read_error is not None:
            reasons.append(f"the page cannot read PostgreSQL: {read_error}")
        if not ingest.mqtt_connected:
            reasons.append("the broker is not connected")
        elif not ingest.subscribed:
            reasons.append(f"the broker has not granted the subscription to {ingest.topic}")
        if stats.overflow_dropped:
            reasons.append(
                f"{stats.overflow_dropped} messages dropped unacked from a full queue "
                "(their gateways resend them)"
            )
        if stats.commit_errors:
            reasons.append(f"{stats.commit_errors} batches not committed (see the log)")
        verdict = "healthy" if ingest.ready else "degraded" if reasons else "starting"
        return {
            "version": __version__,
            "uptime_s": round(now - self._started, 1),
            "verdict": verdict,
            "reasons": reasons,
            "broker": self._broker,
            "topic": ingest.topic,
            "database_up": ingest.db_up,
            "mqtt_connected": ingest.mqtt_connected,
            "subscribed": ingest.subscribed,
            "queued": ingest.queued,
            "queue_size": ingest.queue_size,
            "messages": stats.messages,
            "batches_committed": stats.batches_committed,
            "rows_inserted": stats.rows_inserted,
            "rows_duplicate": stats.rows_duplicate,
            "malformed": stats.malformed,
            "uncovered": stats.uncovered,
            "out_of_window": stats.out_of_window,
            "overflow_dropped": stats.overflow_dropped,
            "commit_errors": stats.commit_errors,
            "acks_published": stats.acks_published,
            "acks_unsent": stats.acks_unsent,
        }

    def _gateway(
        self,
        name: str,
        stored: StoredGateway | None,
        malformed: int,
        acks: Mapping[tuple[str, uuid.UUID], int],
    ) -> GatewayRow:
        activity = self._ingest.senders.get(name)
        streams: list[StreamRow] = []
        gaps = None
        streams_total = 0
        if stored is not None:
            gaps = stored.gaps
            streams_total = stored.streams_total
            for stream in stored.streams:
                streams.append(
                    {
                        "stream": str(stream.stream),
                        "acked_seq": stream.acked_seq,
                        "last_commit": stream.last_commit,
                        "ranges_above": stream.ranges_above,
                        "highest_committed": stream.highest_committed,
                        "ack_sent": acks.get((name, stream.stream)),
                    }
                )
        return {
            "gateway": name,
            "last_message": None if activity is None else activity.last_message,
            "last_ack": None if activity is None else activity.last_ack,
            "last_commit": streams[0]["last_commit"] if streams else None,
            "streams_total": streams_total,
            "streams": streams,
            "malformed": malformed,
            "gap_events": 0 if gaps is None else gaps.events,
            "gap_seqs": 0 if gaps is None else gaps.seqs,
            "last_gap": None if gaps is None else gaps.newest,
        }


def _malformed_by_name(counts: Mapping[str, int]) -> dict[str, int]:
    """The malformed counts keyed as Senders keeps names (cut to SENDER_CHARS)."""
    by_name: dict[str, int] = {}
    for sender, count in counts.items():
        key = sender[:SENDER_CHARS]
        by_name[key] = by_name.get(key, 0) + count
    return by_name
