"""DCMD: writes to a device's tags from a Sparkplug host (docs/sparkplug.md, "Commands").

With `sparkplug.commands = "writable"` each metric of a DCMD for a device's tag goes to the
workflow engine's single write (validation, exclusivity with sagas, audit, read-back); with
"off", for a machine, an unknown metric or while MAX_WRITES run, it is refused and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal

from sync.mqtt.client import Message
from sync.sparkplug.codec import DataType, MetricValue, PayloadError, decode_received
from sync.sparkplug.model import DeviceState
from sync.uplink.sparkplug.limited_log import LimitedLog

log = logging.getLogger("edge_agent.sparkplug")

MAX_WRITES = 32  # DCMD writes running at once; more are refused (a peer may flood us)
# A DCMD write: ('device/tag', value) -> (completed | refused | failed, what happened); the
# workflow engine's single_write (validation, exclusivity, audit, read-back).
Write = Callable[
    [str, MetricValue], Awaitable[tuple[Literal["completed", "refused", "failed"], str]]
]
_SIGNED_32 = (DataType.INT8, DataType.INT16, DataType.INT32)


class DeviceCommands:
    """Turns DCMD messages into writes, at most MAX_WRITES at once, and counts the outcomes."""

    def __init__(
        self,
        *,
        devices: Mapping[str, DeviceState],
        limited: LimitedLog,
        bad_message: Callable[[str, str], None],
    ) -> None:
        self._devices = devices
        self._limited = limited
        self._bad_message = bad_message
        self._write: Write | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self.refused = 0
        self.completed = 0
        self.failed = 0

    def writes_to(self, write: Write) -> None:
        """Take DCMD writes from now on (without this every DCMD is refused)."""
        self._write = write

    def on_dcmd(self, message: Message) -> None:
        """A DCMD message: start a write per metric, or refuse it."""
        device_name = message.topic.rsplit("/", 1)[-1]
        write = self._write
        if write is None:
            self._refuse(device_name, "sparkplug.commands is 'off' (docs/sparkplug.md, 'Commands')")
            return
        device = self._devices.get(device_name)
        if device is None or device.machine:
            self._refuse(device_name, "not a device with writable tags")
            return
        try:
            _, _, metrics = decode_received(message.payload)
        except PayloadError as exc:
            self._bad_message(message.topic, str(exc))
            return
        by_alias = {metric.alias: metric for metric in device.metrics.values()}
        for received in metrics:
            target = (
                device.metrics.get(received.name)
                if received.name is not None
                else by_alias.get(received.alias or 0)
            )
            if target is None:
                self._refuse(device_name, f"no metric {received.name or received.alias}")
                continue
            value = received.value
            if received.datatype is None and isinstance(value, int):
                # Sent by alias without a datatype: read the raw field as the birth's type.
                if target.datatype in _SIGNED_32 and value >= 2**31:
                    value -= 2**32
                elif target.datatype is DataType.INT64 and value >= 2**63:
                    value -= 2**64
            if len(self._writes) >= MAX_WRITES:
                self._refuse(device_name, f"{MAX_WRITES} writes already running")
                continue
            task = asyncio.get_running_loop().create_task(
                self._write_one(write, f"{device_name}/{target.name}", value),
                name=f"sparkplug:dcmd:{device_name}",
            )
            self._writes.add(task)  # referenced until done
            task.add_done_callback(self._writes.discard)

    def cancel(self) -> None:
        """At shutdown: cancel the writes still running."""
        for task in self._writes:
            task.cancel()

    async def _write_one(self, write: Write, ref: str, value: MetricValue) -> None:
        try:
            outcome, detail = await write(ref, value)
        except Exception:  # a bug in the engine must not end the node
            log.exception("sparkplug: DCMD write to %s failed", ref)
            self.failed += 1
            return
        if outcome == "completed":
            self.completed += 1
            log.info("sparkplug: DCMD: %s", detail)
        elif outcome == "refused":
            self._refuse(ref.partition("/")[0], detail)
        else:
            self.failed += 1
            log.warning("sparkplug: DCMD: %s", detail)

    def _refuse(self, device: str, reason: str) -> None:
        self.refused += 1
        # One log line a minute per configured device (a peer's made-up names share one).
        key = f"dcmd:{device}" if device in self._devices else "dcmd:?"
        self._limited.warning(key, "sparkplug: DCMD to %s refused: %s", device, reason)
