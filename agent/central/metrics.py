"""Prometheus metrics of a running ingest (its own registry; nothing global).

Every figure is read from the Ingest at scrape time (a custom collector), so the commit path
carries no instrumentation. Names are listed in docs/central.md ("Metrics").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sync.central.ingest import Ingest
from sync.central.stats import MAX_SENDERS, OTHER_SENDERS, IngestStats

PREFIX = "edge_agent_ingest"

# (name, help, reading): the counters of IngestStats without a label.
_COUNTERS: tuple[tuple[str, str, Callable[[IngestStats], int]], ...] = (
    ("messages", "S/sync messages received.", lambda s: s.messages),
    ("batches_committed", "Batches committed to PostgreSQL.", lambda s: s.batches_committed),
    ("rows_inserted", "Event rows newly inserted.", lambda s: s.rows_inserted),
    (
        "rows_duplicate",
        "Event rows already stored (resends, other replicas), absorbed.",
        lambda s: s.rows_duplicate,
    ),
    ("malformed", "Malformed S/sync messages skipped unacked.", lambda s: s.malformed),
    (
        "uncovered",
        "Malformed batches claiming a seq neither sent nor declared dropped.",
        lambda s: s.uncovered,
    ),
    (
        "out_of_window",
        "Malformed batches with an event dated outside the accepted event times.",
        lambda s: s.out_of_window,
    ),
    (
        "commit_errors",
        "Commits that failed for neither the data nor an outage; skipped unacked.",
        lambda s: s.commit_errors,
    ),
    ("db_failures", "Failed database calls that were retried.", lambda s: s.db_failures),
    ("acks_published", "S/ack messages published.", lambda s: s.acks_published),
    (
        "acks_unsent",
        "Committed batches whose S/ack could not be sent (broker away).",
        lambda s: s.acks_unsent,
    ),
    (
        "overflow_dropped",
        "Messages dropped unacked from a full queue.",
        lambda s: s.overflow_dropped,
    ),
    ("maintenance_runs", "Partition maintenance runs completed.", lambda s: s.maintenance_runs),
    (
        "maintenance_failures",
        "Partition maintenance runs that failed.",
        lambda s: s.maintenance_failures,
    ),
)


class IngestMetrics:
    """The registry of one ingest replica."""

    def __init__(self, ingest: Ingest) -> None:
        """Read ``ingest`` at every scrape."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_IngestCollector(ingest))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class _IngestCollector(Collector):
    def __init__(self, ingest: Ingest) -> None:
        self._ingest = ingest

    def collect(self) -> Iterator[Metric]:
        ingest = self._ingest
        stats = ingest.stats
        for name, documentation, reading in _COUNTERS:
            counter = CounterMetricFamily(f"{PREFIX}_{name}", documentation)
            counter.add_metric([], reading(stats))
            yield counter
        # Which gateway sends what the ingest refuses (docs/central.md, "Validation").
        by_sender = CounterMetricFamily(
            f"{PREFIX}_malformed_by_sender",
            f"Malformed S/sync messages per sender (its topic level; {OTHER_SENDERS!r} past "
            f"{MAX_SENDERS:,} senders).",
            labels=["sender"],
        )
        for sender, count in sorted(stats.malformed_by_sender.items()):
            by_sender.add_metric([sender], count)
        yield by_sender
        yield _gauge("database_up", "1 while PostgreSQL answers.", ingest.db_up)
        yield _gauge(
            "mqtt_connected",
            "1 while connected (and subscribed) to the broker.",
            ingest.mqtt_connected,
        )
        yield _gauge(
            "queue_depth", "Messages received and not yet taken by a worker.", ingest.queued
        )
        yield _gauge(
            "absurd_rows",
            "Rows of edge_events_default dated outside the accepted event times (infinite "
            "included), as of the last partition maintenance.",
            stats.absurd_rows,
        )


def _gauge(name: str, documentation: str, value: float) -> Metric:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation)
    family.add_metric([], float(value))
    return family
