"""`edge-agent probe`: connect to every device once, read every tag once, print a table.

A value is shown as its live payload writes it: at its tag's precision, `true`/`false`, a
number as JSON writes it, a string without quotes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from agent.daemon.devices import driver_context, make_driver_factory
from agent.settings.config_file import AgentSettings
from drivers.base import DriverError, JsonValue
from drivers.config import DeviceConfigBase
from sync.events import dumps, json_safe


@dataclass(frozen=True, slots=True)
class ProbeRow:
    """One line of the table."""

    device: str
    tag: str
    value: JsonValue
    quality: str
    latency_ms: float | None
    detail: str = ""


async def probe_device(device: DeviceConfigBase, settings: AgentSettings) -> list[ProbeRow]:
    """Read every tag of one device once; a device that cannot be reached gives bad rows."""
    driver = make_driver_factory(device, driver_context(settings))()
    configs = {tag.name: tag for tag in device.tag_list()}
    tags = list(configs)
    try:
        async with asyncio.timeout(device.timeout + 10.0):
            await driver.connect()
    except (DriverError, OSError, TimeoutError) as exc:
        await driver.close()
        reason = str(exc) or type(exc).__name__
        return [ProbeRow(device.name, tag, None, "bad", None, f"connect: {reason}") for tag in tags]
    rows = []
    try:
        for tag in tags:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(device.timeout * 3 + 2.0):
                    reading = await driver.read_tag(tag)
            except (DriverError, OSError, TimeoutError) as exc:
                rows.append(ProbeRow(device.name, tag, None, "bad", None, str(exc) or "timeout"))
                continue
            latency = (time.perf_counter() - started) * 1000
            value = configs[tag].published_value(reading.value)
            rows.append(
                ProbeRow(device.name, tag, value, reading.quality, latency, reading.error or "")
            )
    finally:
        await driver.close()
    return rows


async def probe(settings: AgentSettings) -> list[ProbeRow]:
    """All devices, concurrently (each device's own link stays sequential)."""
    results = await asyncio.gather(*(probe_device(device, settings) for device in settings.devices))
    return [row for rows in results for row in rows]


def value_text(value: JsonValue) -> str:
    """A value as its live payload writes it (sync/uplink/topics.py), a string unquoted."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return dumps(json_safe(value)).decode()


def format_table(rows: list[ProbeRow]) -> str:
    """A plain-text table."""
    header = ("device", "tag", "value", "quality", "latency", "detail")
    lines = [
        (
            row.device,
            row.tag,
            value_text(row.value),
            row.quality,
            "" if row.latency_ms is None else f"{row.latency_ms:.1f} ms",
            row.detail,
        )
        for row in rows
    ]
    widths = [
        max(len(header[i]), *(len(line[i]) for line in lines)) if lines else len(header[i])
        for i in range(6)
    ]
    out = ["  ".join(header[i].ljust(widths[i]) for i in range(6)).rstrip()]
    out.append("  ".join("-" * widths[i] for i in range(6)))
    out += ["  ".join(line[i].ljust(widths[i]) for i in range(6)).rstrip() for line in lines]
    good = sum(1 for row in rows if row.quality == "good")
    out.append(f"{good} of {len(rows)} tags good")
    return "\n".join(out)
