"""SIGHUP: what a reloaded config changes, and applying it to a running gateway.

Devices, tags, machines, calendars and workflows change in place (changed devices reconnect);
a change of [gateway], [mqtt], [buffer] or [http] needs a restart inside the process, because
the outbox, the MQTT session and the HTTP listener depend on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from agent.daemon.gateway import Gateway, configure_tags
from agent.settings.config_file import AgentSettings

log = logging.getLogger("edge_agent.runtime")


def needs_restart(old: AgentSettings, new: AgentSettings) -> bool:
    """Whether a reloaded config changes a section only a restart can apply. With Sparkplug on,
    a change of the devices or machines does too: the edge node announces them in its births,
    and a restart is its way to announce new ones (NDEATH, then a new session's births)."""
    sparkplug = (old.sparkplug.enabled or new.sparkplug.enabled) and (
        old.devices != new.devices or old.machines != new.machines
    )
    return sparkplug or (old.gateway, old.mqtt, old.buffer, old.http, old.sparkplug) != (
        new.gateway,
        new.mqtt,
        new.buffer,
        new.http,
        new.sparkplug,
    )


@dataclass(frozen=True, slots=True)
class DeviceChanges:
    """Device names added, removed, and changed (in both configs, with another config)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]

    @classmethod
    def between(cls, old: AgentSettings, new: AgentSettings) -> DeviceChanges:
        """Compare the devices of two configs."""
        before = {device.name: device for device in old.devices}
        after = {device.name: device for device in new.devices}
        return cls(
            added=tuple(name for name in after if name not in before),
            removed=tuple(name for name in before if name not in after),
            changed=tuple(name for name in before if name in after and after[name] != before[name]),
        )


async def apply_reload(gateway: Gateway, old: AgentSettings, new: AgentSettings) -> None:
    """Apply device, tag, machine, calendar and workflow changes without a restart."""
    changes = DeviceChanges.between(old, new)
    for name in (*changes.removed, *changes.changed):
        await gateway.devices.stop(name)
        gateway.pipeline.forget_device(name)
    # Their last events go live before their retained values are cleared, not after.
    await gateway.pipeline.settle()
    for device in old.devices:
        if device.name in changes.removed:
            tags = [tag.name for tag in device.tag_list()]
            for sink in gateway.sinks:
                sink.retire(device.name, tags)
    configure_tags(gateway.pipeline, new, only={*changes.added, *changes.changed})
    for device in new.devices:
        if not gateway.devices.running(device.name):
            gateway.devices.start(device)
    gateway.oee.reconfigure(new)
    await gateway.workflows.reconfigure(new)
    log.info(
        "reload: applied (%d devices: %d added, %d removed, %d changed)",
        len(new.devices),
        len(changes.added),
        len(changes.removed),
        len(changes.changed),
    )
