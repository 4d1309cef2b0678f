"""The agent's `[sparkplug]` section: a Sparkplug B 3.0 edge node beside the JSON topics
(docs/sparkplug.md)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from agent.settings.common import TlsClientConfig
from drivers.config import ConfigModel, Problem

# Sparkplug 3.0, "Sparkplug Identifiers": group, edge node and device ids are UTF-8 strings of
# the characters an MQTT topic level may hold: no '/', '+' or '#' (tck-id-intro-group-id-chars,
# -edge-node-id-chars, -device-id-chars). U+0000 is refused by MQTT itself; a space is legal
# but breaks every shell and host that handles the id, so it is refused too.
_FORBIDDEN = frozenset("/+#\x00 ")


def id_problem(value: str, what: str) -> str | None:
    """Why `value` cannot be a Sparkplug {what} (group id, edge node id, device id), or None."""
    if not value:
        return f"the {what} must not be empty"
    bad = sorted({char for char in value if char in _FORBIDDEN or not char.isprintable()})
    if bad:
        shown = ", ".join(repr(char) for char in bad)
        return f"{value!r} is not a valid Sparkplug {what}: no {shown} (topic level rules)"
    if len(value.encode()) > 256:
        return f"the {what} is longer than 256 bytes"
    return None


class SparkplugBrokerConfig(TlsClientConfig):
    """The broker of the Sparkplug edge node when it is not the `[mqtt]` one."""

    client_id: str | None = Field(
        default=None,
        description="MQTT client id; default '{the [mqtt] client id}-sparkplug'.",
    )


class SparkplugConfig(ConfigModel):
    """A Sparkplug B 3.0 edge node: NBIRTH/NDEATH, DBIRTH/DDATA/DDEATH per device and machine,
    rebirth on request, primary host awareness (docs/sparkplug.md)."""

    enabled: bool = Field(default=False, description="Run the Sparkplug B edge node.")
    group_id: str = Field(
        default="",
        description="Sparkplug group id: the second level of every topic "
        "spBv1.0/{group_id}/{type}/{edge_node_id}[/{device}]; required when enabled.",
        examples=["plant1"],
    )
    edge_node_id: str = Field(
        default="",
        description="Sparkplug edge node id; unset: gateway.id.",
        examples=["plant1-line3"],
    )
    primary_host_id: str | None = Field(
        default=None,
        description="The primary host application's id: births only while "
        "spBv1.0/STATE/{primary_host_id} says it is online; when it goes offline the node "
        "disconnects (NDEATH) and waits for it. Unset: births at every connect.",
        examples=["scada-main"],
    )
    commands: Literal["off", "writable"] = Field(
        default="off",
        description="DCMD writes: 'off' refuses every one (counted, logged); 'writable': a "
        "DCMD metric for a writable tag is one guarded write (a write step's validation, no "
        "saga on the device, audit event, read-back), anything else is refused "
        "(docs/sparkplug.md, 'Commands').",
    )
    broker: SparkplugBrokerConfig | None = Field(
        default=None,
        description="Its own broker connection (url, credentials, TLS); unset: the [mqtt] "
        "connection's keys, with its own client id '{client id}-sparkplug'.",
    )

    def problems(self) -> Iterator[Problem]:
        """The ids against the spec's topic rules; a broker's own cross-field problems."""
        if not self.enabled:
            return
        if not self.group_id:
            yield (("group_id",), "required when [sparkplug] is enabled")
        else:
            reason = id_problem(self.group_id, "group id")
            if reason:
                yield (("group_id",), reason)
        for key, what in (("edge_node_id", "edge node id"), ("primary_host_id", "host id")):
            value = getattr(self, key)
            if value:
                reason = id_problem(value, what)
                if reason:
                    yield ((key,), reason)
        if self.broker is not None:
            for loc, reason in self.broker.problems():
                yield (("broker", *loc), reason)

    def warnings(self) -> Iterator[Problem]:
        """A password sent in cleartext."""
        if self.broker is not None:
            for loc, reason in self.broker.warnings():
                yield (("broker", *loc), reason)
