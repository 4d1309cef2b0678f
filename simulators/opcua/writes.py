"""The log of client writes: in memory and, optionally, appended to a file as JSON lines."""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from asyncua import ua
from asyncua.common.callback import ServerItemCallback

from simulators.opcua.values import json_value

__all__ = ["WriteLog", "WriteRecord"]


@dataclass(frozen=True)
class WriteRecord:
    """One client write request for one variable, as the server answered it."""

    ts: str
    node: str
    value: Any
    result: str  # status name, e.g. "Good", "BadTypeMismatch", "BadOutOfRange"

    def to_json(self) -> str:
        """One JSON line (without the newline)."""
        return json.dumps(
            {"ts": self.ts, "node": self.node, "value": self.value, "result": self.result},
            separators=(",", ":"),
        )


def _utc_now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class WriteLog:
    """Every client write request with the server's answer, oldest first."""

    def __init__(self, *, path: Path | None, keep: int = 100_000) -> None:
        """Keep the newest ``keep`` records in memory; append all to ``path`` while open."""
        if keep <= 0:
            raise ValueError("keep must be > 0")
        self.path = path
        self._records: deque[WriteRecord] = deque(maxlen=keep)
        self._fd: int | None = None

    @property
    def records(self) -> list[WriteRecord]:
        """The records kept in memory, oldest first."""
        return list(self._records)

    def __len__(self) -> int:
        """Records kept in memory."""
        return len(self._records)

    def open(self) -> None:
        """Open the file (appending), if there is one."""
        if self.path is not None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def close(self) -> None:
        """Close the file; idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def record(self, node: str, raw: Any, result: str) -> None:
        """Append one client write to memory and to the file."""
        record = WriteRecord(_utc_now_text(), node, json_value(raw), result)
        self._records.append(record)
        if self._fd is not None:
            # One O_APPEND write per record: a SIGKILL loses nothing that was answered.
            os.write(self._fd, (record.to_json() + "\n").encode())

    async def on_post_write(self, event: ServerItemCallback, _dispatcher: Any) -> None:
        """asyncua's PostWrite callback: record every client write with the server's answer."""
        if not event.is_external:
            return
        params = cast(ua.WriteParameters, event.request_params)
        results = cast(list[ua.StatusCode], event.response_params or [])
        for index, item in enumerate(params.NodesToWrite):
            node = item.NodeId.to_string() if item.NodeId is not None else "?"
            raw = item.Value.Value.Value if item.Value and item.Value.Value else None
            result = results[index].name if index < len(results) else "?"
            self.record(node, raw, result)
