"""The birth/death sequence number (bdSeq), kept in the data directory across restarts.

Sparkplug 3.0 (tck-id-topics-nbirth-bdseq-increment): bdSeq starts at zero and goes up by one
on every new MQTT CONNECT, 0-255 wrapping; the NDEATH registered as the Will of a CONNECT and
the NBIRTH that follows it carry the same number. The number is taken when the CONNECT packet
is built, and is on disk before the packet leaves: written under a staging name, fsynced,
renamed over the old file, and the directory fsynced, so that after a power loss the file holds
either the old or the new number, never a torn one, and a number a broker may already hold as
a Will is never handed out again on the next start.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sync.files import write_durably

log = logging.getLogger("edge_agent.sparkplug")

FILE_NAME = "sparkplug-bdseq"


class BdSeq:
    """The persisted bdSeq: `take()` per CONNECT, `current` for the births of that session."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / FILE_NAME
        self._last = self._read()
        self.current: int | None = None  # taken for the latest CONNECT

    def _read(self) -> int | None:
        try:
            text = self._path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("sparkplug: cannot read %s (%s); bdSeq starts at 0", self._path, exc)
            return None
        if not text.isdigit() or int(text) > 255:
            log.warning("sparkplug: %s holds %r, not 0-255; bdSeq starts at 0", self._path, text)
            return None
        return int(text)

    def take(self) -> int:
        """The bdSeq of a new CONNECT: one more than the last (0 after 255, 0 the first time),
        on disk before it is returned."""
        value = 0 if self._last is None else (self._last + 1) % 256
        write_durably(self._path, f"{value}\n".encode())
        self._last = value
        self.current = value
        return value
