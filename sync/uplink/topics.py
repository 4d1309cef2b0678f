"""Topic names and payloads of the MQTT contract (docs/topics.md), as pure functions."""

from __future__ import annotations

import math
from typing import Any

from sync.events import dumps, json_safe, rfc3339


def live_topic(root: str, device: str, tag: str) -> str:
    """R/{device}/{tag}."""
    return f"{root}/{device}/{tag}"


def sample_payload(ts: float, value: Any, quality: str) -> bytes:
    """{"ts","value","quality"}: numbers as JSON numbers, bool as true/false."""
    # The hot path of live publishing: scalars are formatted directly (same bytes as
    # json.dumps with compact separators); anything else goes through json.
    if value is None or value is True or value is False:
        text = "null" if value is None else "true" if value else "false"
    elif type(value) is int:
        text = str(value)
    elif type(value) is float and math.isfinite(value):
        text = repr(value)
    else:
        return dumps({"ts": rfc3339(ts), "value": json_safe(value), "quality": quality})
    return f'{{"ts":"{rfc3339(ts)}","value":{text},"quality":"{quality}"}}'.encode()


def value_text(value: Any) -> str:
    """The JSON text of a value as `sample_payload` writes it (the status page shows it)."""
    if value is None or value is True or value is False:
        return "null" if value is None else "true" if value else "false"
    if type(value) is int:
        return str(value)
    if type(value) is float and math.isfinite(value):
        return repr(value)
    return dumps(json_safe(value)).decode()


def status_topic(root: str) -> str:
    """R/_agent/status (retained; also the Last Will)."""
    return f"{root}/_agent/status"


def status_payload(ts: float, status: str, version: str) -> bytes:
    """{"ts","status":"online|offline","version"}."""
    return dumps({"ts": rfc3339(ts), "status": status, "version": version})


def health_topic(root: str) -> str:
    """R/_agent/health."""
    return f"{root}/_agent/health"


def machine_state_topic(root: str, machine: str) -> str:
    """R/{machine}/state."""
    return f"{root}/{machine}/state"


def machine_state_payload(ts: float, state: str, code: Any) -> bytes:
    """{"ts","state","code"}."""
    return dumps({"ts": rfc3339(ts), "state": state, "code": json_safe(code)})


def oee_topic(root: str, machine: str) -> str:
    """R/{machine}/oee."""
    return f"{root}/{machine}/oee"


def command_topic(root: str, workflow: str) -> str:
    """R/_cmd/{workflow}."""
    return f"{root}/_cmd/{workflow}"


def reply_topic(root: str, workflow: str) -> str:
    """R/_cmd/{workflow}/reply."""
    return f"{root}/_cmd/{workflow}/reply"


def sync_topic(prefix: str, gateway: str) -> str:
    """S/sync with S = {sync_prefix}/{gateway.id}."""
    return f"{prefix}/{gateway}/sync"


def ack_topic(prefix: str, gateway: str) -> str:
    """S/ack."""
    return f"{prefix}/{gateway}/ack"
