"""The simulator's write log: every write request, in memory and as JSON lines in a file.

Each line is written with one ``os.write`` on an ``O_APPEND`` descriptor before the response is
sent, so a write the client saw answered is in the file even after a SIGKILL (no fsync: it
survives a process kill, not a power cut). Format in simulators/README.md ("Write log").
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["WriteLog", "WriteRecord"]


@dataclass(frozen=True)
class WriteRecord:
    """One write request received by the simulator."""

    ts: str
    unit: int
    function_code: int
    address: int
    values: list[int]  # registers, or bools (a subtype of int) for coils
    result: str  # "ok", "exception N" or "dropped" (stalled: neither executed nor answered)

    def to_json(self) -> str:
        """Serialise as one JSON line (without the newline)."""
        return json.dumps(asdict(self), separators=(",", ":"))


class WriteLog:
    """Write requests received so far, kept in memory and appended to an optional file."""

    def __init__(self, *, path: Path | None, keep: int = 100_000) -> None:
        """Keep the last ``keep`` records in memory; ``path`` is opened by ``open()``."""
        if keep <= 0:
            raise ValueError("keep must be > 0")
        self.path = path
        self._records: deque[WriteRecord] = deque(maxlen=keep)
        self._fd: int | None = None

    def open(self) -> None:
        """Open the file for appending (created if missing), if there is one."""
        if self.path is not None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def close(self) -> None:
        """Close the file; idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def records(self) -> list[WriteRecord]:
        """The records kept in memory, oldest first."""
        return list(self._records)

    def __len__(self) -> int:
        """Number of records kept in memory."""
        return len(self._records)

    def append(
        self,
        unit: int,
        function_code: int,
        address: int,
        values: Sequence[int] | Sequence[bool],
        result: str,
    ) -> None:
        """Record a write request in memory and in the file."""
        record = WriteRecord(_utc_now(), unit, function_code, address, list(values), result)
        self._records.append(record)
        if self._fd is not None:
            # One small O_APPEND write, synchronously and before the response goes out, so a
            # write the client saw answered is on disk (page cache) even after a SIGKILL.
            os.write(self._fd, (record.to_json() + "\n").encode())


def _utc_now() -> str:
    """Wall-clock time as RFC 3339 UTC with milliseconds and Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
