"""Prometheus metrics of a running agent (its own registry; nothing global).

Most figures are read from the runtime's objects at scrape time (a custom collector), so the
hot paths carry no instrumentation; only poll durations are observed as they happen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sync.mqtt import wire

if TYPE_CHECKING:
    from agent.daemon.gateway import Gateway
    from agent.daemon.runtime import Runtime

PREFIX = "edge_agent"
# The OEE engines' diagnostics (docs/oee.md), one counter per machine each.
OEE_DIAGNOSTICS = {
    "clock_steps_back": "Readings stamped earlier than the latest one seen (clamped).",
    "ignored_bad": "Bad-quality readings of a machine's state or counters (ignored).",
    "invalid_values": "Counter readings that are not integers (ignored).",
    "rollovers": "Counter drops taken as a rollover.",
    "resets": "Counter drops taken as a PLC reset.",
    "late_parts": "Parts read after their shift's final record: counted where they were read.",
}
POLL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AgentMetrics:
    """The registry of one runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.poll_duration = Histogram(
            f"{PREFIX}_poll_duration_seconds",
            "Duration of one poll cycle of a device.",
            ["device"],
            buckets=POLL_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_RuntimeCollector(runtime))

    def observe_poll(self, device: str, seconds: float) -> None:
        """Record one poll cycle."""
        self.poll_duration.labels(device).observe(seconds)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


def _gauge(name: str, documentation: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=labels)


def _counter(name: str, documentation: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=labels)


class _RuntimeCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        gateway = self._runtime.gateway
        if gateway is not None:
            yield from self._devices(gateway)
            yield from self._outbox(gateway)
            yield from self._uplink(gateway)
            yield from self._oee(gateway)
            yield from self._workflows(gateway)
        yield from self._reloads()
        yield _simple(
            _counter("clock_steps", "Steps of the wall clock detected (more than 1 s)."),
            self._runtime.clock.steps,
        )
        yield from self._process()

    def _devices(self, gateway: Gateway) -> Iterator[Metric]:
        up = _gauge("device_up", "1 when the device is connected and answering.", ["device"])
        state = _gauge("device_state", "Device state (one of up, down, open).", ["device", "state"])
        breaker = _gauge("device_breaker_open", "1 while the circuit breaker is open.", ["device"])
        polls = _counter("device_polls", "Poll cycles completed.", ["device"])
        errors = _counter("device_errors", "Failed connects and polls.", ["device"])
        reconnects = _counter("device_reconnects", "Reconnections after a loss.", ["device"])
        skipped = _counter(
            "device_skipped_ticks", "Poll ticks skipped after an overrun.", ["device"]
        )
        down = _gauge(
            "device_down_info",
            "1 for a device that is not up, with why (the last error) in the reason label.",
            ["device", "reason"],
        )
        for name, poller in gateway.devices.pollers.items():
            current = poller.state
            up.add_metric([name], 1.0 if current == "up" else 0.0)
            for option in ("up", "down", "open"):
                state.add_metric([name, option], 1.0 if current == option else 0.0)
            breaker.add_metric([name], 1.0 if poller.breaker_state == "open" else 0.0)
            polls.add_metric([name], poller.polls)
            errors.add_metric([name], poller.poll_errors)
            reconnects.add_metric([name], poller.reconnects)
            skipped.add_metric([name], poller.skipped_ticks)
            if current != "up":
                down.add_metric([name, (poller.reason or current)[:200]], 1.0)
        yield from (up, state, breaker, polls, errors, reconnects, skipped, down)

    def _outbox(self, gateway: Gateway) -> Iterator[Metric]:
        outbox = gateway.outbox
        oldest_ts = outbox.oldest_unacked_ts
        yield _simple(
            _gauge(
                "outbox_events", "Events in the outbox (acknowledged ones until deleted, <= 2 s)."
            ),
            outbox.events_count,
        )
        yield _simple(_gauge("outbox_bytes", "Bytes the outbox database uses."), outbox.bytes_used)
        yield _simple(
            _gauge("outbox_oldest_unacked_age_seconds", "Age of the oldest unacknowledged event."),
            0.0 if oldest_ts is None else round(max(0.0, time.time() - oldest_ts), 3),
        )
        yield _simple(
            _gauge("outbox_committed_seq", "Last committed seq of the stream."),
            outbox.committed_seq,
        )
        yield _simple(
            _gauge("outbox_acked_seq", "Last seq acknowledged by the central store."),
            outbox.acked_seq,
        )
        yield _simple(
            _counter("outbox_dropped", "Samples dropped past buffer.max_size."),
            outbox.dropped_total,
        )
        yield _simple(
            _counter("outbox_append_failures", "Appends refused (disk full, I/O)."),
            outbox.append_failures,
        )
        yield _simple(_counter("outbox_commits", "SQLite transactions committed."), outbox.commits)
        yield _simple(
            _gauge("outbox_refusing", "1 while the outbox refuses events (disk full, I/O)."),
            1.0 if gateway.pipeline.durable_down else 0.0,
        )

    def _uplink(self, gateway: Gateway) -> Iterator[Metric]:
        mqtt = gateway.mqtt
        yield _simple(
            _gauge("mqtt_connected", "1 while connected to the broker."),
            1.0 if mqtt.is_connected else 0.0,
        )
        yield _simple(_counter("mqtt_published", "Messages published."), mqtt.stats.published)
        yield _simple(
            _counter("mqtt_acked", "QoS 1 messages acknowledged by the broker."), mqtt.stats.acked
        )
        yield _simple(_counter("mqtt_connects", "Successful connections."), mqtt.stats.connects)
        yield _simple(_counter("mqtt_connection_lost", "Connections lost."), mqtt.stats.lost)
        yield _simple(
            _counter(
                "mqtt_refused_packets",
                "Incoming packets refused: malformed, forbidden or too large (connection closed).",
            ),
            mqtt.stats.refused_packets,
        )
        refused = _counter(
            "mqtt_publish_refused",
            "Messages the broker refused in its PUBACK (MQTT 5), per reason.",
            ["reason"],
        )
        for code, count in sorted(mqtt.stats.publish_refused.items()):
            refused.add_metric([wire.reason_name(code)], count)
        yield refused
        yield _simple(
            _counter(
                "mqtt_takeovers",
                "Connections the broker closed because another client took our client id.",
            ),
            mqtt.stats.takeovers,
        )
        for sink in gateway.sinks:
            for figure in sink.figures():
                make = _counter if figure.kind == "counter" else _gauge
                yield _simple(make(figure.name, figure.help), figure.value)
        yield _simple(
            _counter("events", "Events accepted by the pipeline."), gateway.pipeline.events_total
        )

    def _oee(self, gateway: Gateway) -> Iterator[Metric]:
        oee = gateway.oee
        families = {
            key: _gauge(
                f"oee_{key}" if key != "oee" else "oee",
                f"OEE {key} of the running shift (0..1).",
                ["machine"],
            )
            for key in ("availability", "performance", "quality", "oee")
        }
        for machine, report in oee.machines.items():
            if report is None:
                continue
            for key, family in families.items():
                value = report.get(key)
                if isinstance(value, int | float):
                    family.add_metric([machine], float(value))
        yield from families.values()
        yield from self._oee_diagnostics(gateway)

    def _oee_diagnostics(self, gateway: Gateway) -> Iterator[Metric]:
        oee = gateway.oee
        families = {
            name: _counter(f"oee_{name}", help_, ["machine"])
            for name, help_ in OEE_DIAGNOSTICS.items()
        }
        for machine, diagnostics in oee.diagnostics().items():
            for name, family in families.items():
                family.add_metric([machine], getattr(diagnostics, name))
        yield from families.values()
        yield _simple(
            _counter(
                "oee_clock_reanchors",
                "Times the OEE clock re-anchored to a wall clock that stepped by more than 60 s.",
            ),
            oee.clock_reanchors,
        )

    def _workflows(self, gateway: Gateway) -> Iterator[Metric]:
        stats = gateway.workflows.stats
        counts = {
            "accepted": stats.accepted,
            "rejected": stats.rejected,
            "duplicate": stats.duplicates,
            "completed": stats.completed,
            "compensated": stats.compensated,
            "failed": stats.failed,
        }
        family = _counter("workflows", "Workflow commands by outcome.", ["outcome"])
        for outcome, count in sorted(counts.items()):
            family.add_metric([outcome], count)
        yield family
        yield _simple(
            _counter(
                "workflow_replies_dropped",
                "Command replies dropped while the broker was away (the oldest go first).",
            ),
            stats.replies_dropped,
        )
        yield _simple(
            _counter(
                "workflow_audit_failures",
                "Workflow audit events the outbox refused (the saga log still has them).",
            ),
            stats.audit_failures,
        )

    def _reloads(self) -> Iterator[Metric]:
        reloads = self._runtime.reloads
        family = _counter("reloads", "SIGHUP reloads by result.", ["result"])
        family.add_metric(["applied"], reloads.applied)
        family.add_metric(["failed"], reloads.failed)
        yield family

    def _process(self) -> Iterator[Metric]:
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # rendered outside the event loop: there is no figure to give
            return
        yield _simple(
            _gauge("asyncio_tasks", "asyncio tasks alive in the agent's event loop (stays flat)."),
            tasks,
        )


def _simple(family: Any, value: float) -> Metric:
    family.add_metric([], value)
    return family  # type: ignore[no-any-return]
