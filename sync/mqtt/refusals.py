"""Publishes the broker refused (a PUBACK with a failure reason code, MQTT 5): counted per
reason code, and logged once per topic prefix per minute.

Why here and not at the publisher: most QoS 1 messages (live values) are sent without a future,
so nobody else sees their PUBACK; an ACL that denies a device's topics would otherwise make its
values vanish without a trace (docs/mqtt.md, "Failures and backoff").
"""

from __future__ import annotations

import logging
import time

from sync.mqtt import wire
from sync.mqtt.types import MqttStats

log = logging.getLogger("edge_agent.mqtt")

REPORT_EVERY = 60.0  # seconds between two log lines for one topic prefix
MAX_PREFIXES = 1024  # prefixes remembered; topics come from config, but a bound is a bound


def topic_prefix(topic: str) -> str:
    """The topic without its last level: the device or machine a live value belongs to."""
    head, _, _ = topic.rpartition("/")
    return head or topic


class RefusalLog:
    """Counts refused publishes per reason and logs them, once per prefix per minute."""

    def __init__(self, *, stats: MqttStats, name: str) -> None:
        self._stats = stats
        self._name = name
        # prefix -> (when it was last logged, refusals since then that were not)
        self._prefixes: dict[str, tuple[float, int]] = {}

    def refused(self, topic: bytes, reason: int, *, owned: bool) -> None:
        """A PUBACK refused the message to `topic`; `owned`: its publisher has a future and
        reports it itself (only counted here)."""
        counts = self._stats.publish_refused
        counts[reason] = counts.get(reason, 0) + 1
        if owned:
            return
        text = topic.decode(errors="replace")
        prefix = topic_prefix(text)
        now = time.monotonic()
        last, suppressed = self._prefixes.get(prefix, (-REPORT_EVERY, 0))
        if now - last < REPORT_EVERY:
            self._prefixes[prefix] = (last, suppressed + 1)
            return
        if len(self._prefixes) >= MAX_PREFIXES:
            self._prefixes = {
                key: value for key, value in self._prefixes.items() if now - value[0] < REPORT_EVERY
            }
        self._prefixes[prefix] = (now, 0)
        more = f" ({suppressed} more under {prefix}/ since the last report)" if suppressed else ""
        log.warning(
            "%s: the broker refused the message to %s: %s (0x%02X)%s",
            self._name,
            text,
            wire.reason_name(reason),
            reason,
            more,
        )
