"""`edge-agent status`: a readable summary of a running agent, from its /status endpoint."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from agent.settings.config_file import AgentSettings

EXIT_HEALTHY = 0
EXIT_DEGRADED = 1
EXIT_UNREACHABLE = 3  # 2 is a bad config or usage, as for every command (agent/cli.py)


def fetch_status(settings: AgentSettings, *, timeout: float = 3.0) -> dict[str, Any]:
    """GET /status of the agent that runs with this config; raises OSError when unreachable."""
    http = settings.http
    # A wildcard bind answers on loopback; an IPv6 address needs its brackets in a URL.
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{http.port}/status"
    request = urllib.request.Request(url)
    if http.token is not None:
        # Off loopback /status needs the token (docs/page.md, "Access").
        request.add_header("Authorization", f"Bearer {http.token.get_secret_value()}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        document: dict[str, Any] = json.loads(response.read())
    return document


def problems(status: dict[str, Any]) -> list[str]:
    """What makes the agent degraded (empty: healthy)."""
    found = []
    if status.get("uplink") != "up":
        error = status.get("uplink_error")
        found.append("uplink down" + (f": {error}" if error else ""))
    for name, detail in (status.get("device_detail") or {}).items():
        if detail.get("state") != "up":
            reason = detail.get("reason")
            found.append(f"device {name} {detail.get('state')}" + (f": {reason}" if reason else ""))
    found.extend(str(problem) for problem in status.get("sync_problems") or ())
    if status.get("outbox_refusing"):
        found.append(f"the outbox refuses events: {status['outbox_refusing']}")
    if status.get("outbox_append_failures"):
        found.append(f"outbox refused {status['outbox_append_failures']} appends")
    if status.get("dropped_total"):
        found.append(f"{status['dropped_total']} samples dropped (buffer full)")
    return found


def summary(status: dict[str, Any]) -> str:
    """Human-readable lines."""
    devices = status.get("devices") or {}
    up = sum(1 for state in devices.values() if state == "up")
    oldest = status.get("oldest_unacked_s")
    outbox = (
        f"  outbox     {status.get('outbox_events', 0)} events, committed "
        f"{status.get('committed_seq')}, acked {status.get('acked_seq')}, oldest unacked "
        + ("-" if oldest is None else f"{oldest:.1f} s")
    )
    if status.get("sync") == "live-only":
        # Nothing is sent: acked and oldest-unacked would only alarm (docs/delivery.md).
        outbox = (
            f"  outbox     {status.get('outbox_events', 0)} records kept (agent, OEE, workflow "
            "events); samples are not stored"
        )
    lines = [
        f"edge-agent {status.get('version', '?')} gateway {status.get('gateway', '?')}, "
        f"up {status.get('uptime_s', 0):.0f} s",
        f"  uplink     {status.get('uplink')}",
        f"  devices    {up}/{len(devices)} up"
        + "".join(f"\n    {name:<20} {state}" for name, state in sorted(devices.items())),
        outbox,
        f"  stream     {status.get('stream')}",
    ]
    if status.get("sync") == "live-only":
        lines.append("  sync       live only: no central store (mqtt.sync_enabled = false)")
    for machine, report in sorted((status.get("oee") or {}).items()):
        if report:
            lines.append(
                f"  oee        {machine}: {_pct(report.get('oee'))} "
                f"(A {_pct(report.get('availability'))}, P {_pct(report.get('performance'))}, "
                f"Q {_pct(report.get('quality'))})"
            )
    found = problems(status)
    lines.append("  status     " + ("healthy" if not found else "degraded: " + "; ".join(found)))
    return "\n".join(lines)


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value * 100:.1f}%"


def run_status(settings: AgentSettings) -> tuple[int, str]:
    """(exit code, text): 0 healthy, 1 degraded, 3 unreachable."""
    try:
        status = fetch_status(settings)
    except (OSError, urllib.error.URLError, json.JSONDecodeError) as exc:
        reason = getattr(exc, "reason", exc)
        return (
            EXIT_UNREACHABLE,
            f"edge-agent status: agent unreachable at {settings.http.listen}: {reason}",
        )
    return (EXIT_DEGRADED if problems(status) else EXIT_HEALTHY), summary(status)
