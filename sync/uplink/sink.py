"""The Sink protocol: what the daemon needs of an uplink.

The pipeline offers every batch of committed events to each sink in the daemon's list; the
daemon starts the sinks before any source and stops them after every source, in one loop;
a reload tells them through `retire` which devices left the config. An uplink is one module
implementing this protocol plus one line in the daemon's list of sinks (docs/layout.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from sync.events import Event


@dataclass(frozen=True, slots=True)
class SinkFigure:
    """One figure a sink exports on /metrics (``edge_agent_{name}``, ``_total`` for counters)."""

    name: str
    help: str
    value: float
    kind: Literal["counter", "gauge"] = "counter"


class Sink(Protocol):
    """An uplink fed with committed events."""

    @property
    def name(self) -> str:
        """Short name: the task's name and the log's."""
        ...

    def offer_events(self, events: Sequence[Event]) -> None:
        """Events whose COMMIT returned, in seq order (never called before it); must not block."""
        ...

    def retire(self, device: str, tags: Sequence[str]) -> None:
        """A device left the config (reload): forget its tags (and clear what they left behind)."""
        ...

    async def run(self) -> None:
        """Serve until cancelled."""
        ...

    async def drain(self) -> None:
        """At shutdown, after the sources stopped: deliver what is pending (time bounded by the
        caller)."""
        ...

    def figures(self) -> Sequence[SinkFigure]:
        """Counters and gauges for /metrics, read at scrape time."""
        ...

    def problems(self) -> Sequence[str]:
        """Why this uplink does not keep its promise now, one line each (empty: it does);
        `edge-agent status`, /status and /readyz show them."""
        ...
