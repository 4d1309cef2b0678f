"""Whether a central store listens: the ingest replicas' retained presence on
``{sync_prefix}/_central/status/{replica}`` (docs/topics.md), ``{"ts","status"}`` with status
``online`` or ``offline`` (the Last Will).

The forwarder reads it to tell "nobody acknowledges because no ingest runs" from "a batch does
not pass the broker" (docs/delivery.md, "When nothing acknowledges"), and to resend at once when
a replica comes (back) online.
"""

from __future__ import annotations

import json

from sync.mqtt.client import Message

# Anyone allowed to publish there could invent replica names: remember at most this many.
MAX_REPLICAS = 256


class CentralPresence:
    """The replicas last heard of, online or offline."""

    def __init__(self) -> None:
        self._online: dict[str, bool] = {}

    @property
    def heard(self) -> bool:
        """Whether any replica has announced itself (online or offline)."""
        return bool(self._online)

    @property
    def online(self) -> list[str]:
        """The replicas whose latest word is online, by name."""
        return sorted(name for name, up in self._online.items() if up)

    def observe(self, message: Message) -> bool:
        """Apply one presence message; True when a replica announced itself online just now
        (not a retained announcement delivered because we subscribed)."""
        replica = message.topic.rsplit("/", 1)[-1]
        if not message.payload:  # the retained announcement was cleared: the replica is gone
            self._online.pop(replica, None)
            return False
        try:
            document = json.loads(message.payload)
        except ValueError:
            return False
        status = document.get("status") if isinstance(document, dict) else None
        if status not in ("online", "offline"):
            return False
        if replica not in self._online and len(self._online) >= MAX_REPLICAS:
            return False
        self._online[replica] = status == "online"
        return status == "online" and not message.retain
