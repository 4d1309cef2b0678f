"""A virtual null-modem cable: two pseudo-terminals relayed to each other (like ``socat pty pty``).

One ``os.openpty()`` pair is not enough for a serial test: only its slave side has a path, and
opening ``/dev/ptmx`` again creates a *new* pair. Both the simulator and the driver open their
port by name, so we create two pairs and copy bytes between the two master sides; each party
opens one slave path (``bridge.a`` / ``bridge.b``). Baud rate, parity and stop bits set by
either side are accepted and ignored by ptys.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from types import TracebackType

__all__ = ["PtyBridge"]

_MAX_PENDING = 1 << 16  # bytes buffered per direction before input is dropped, like a UART


class PtyBridge:
    """Two pty slaves (``a`` and ``b``) connected back to back through the running event loop."""

    def __init__(self) -> None:
        """Create the pty pairs; relaying starts with ``open()`` / ``async with``."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._masters: list[int] = []
        # The slave fds stay open for the bridge's lifetime: without a process holding a slave,
        # reading its master fails with EIO whenever the simulator or the driver closes its port.
        self._slaves: list[int] = []
        self._pending: dict[int, bytearray] = {}
        self.a = ""
        self.b = ""

    def open(self) -> None:
        """Allocate both pairs and start relaying (needs a running loop)."""
        if self._loop is not None:
            raise RuntimeError("PtyBridge already open")
        self._loop = asyncio.get_running_loop()
        try:
            for _ in range(2):
                master, slave = os.openpty()
                self._masters.append(master)
                self._slaves.append(slave)
                # Raw mode before anyone opens the slave: no echo, no CR/LF translation, so
                # binary RTU frames pass unchanged even before pyserial configures the port.
                tty.setraw(slave)
                os.set_blocking(master, False)
            self.a, self.b = (os.ttyname(fd) for fd in self._slaves)
            first, second = self._masters
            self._pending = {first: bytearray(), second: bytearray()}
            self._loop.add_reader(first, self._relay, first, second)
            self._loop.add_reader(second, self._relay, second, first)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop relaying and close every fd."""
        loop, self._loop = self._loop, None
        for fd in self._masters:
            if loop is not None:
                loop.remove_reader(fd)
                loop.remove_writer(fd)
        for fd in (*self._masters, *self._slaves):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._masters, self._slaves, self._pending = [], [], {}

    async def __aenter__(self) -> PtyBridge:
        """Open the bridge."""
        self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the bridge."""
        self.close()

    def _relay(self, source: int, target: int) -> None:
        """Copy what is readable on ``source`` to ``target`` (buffering what does not fit)."""
        try:
            data = os.read(source, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO while no slave is open on that side; the bytes are lost, as on a wire
        pending = self._pending[target]
        if len(pending) + len(data) > _MAX_PENDING:
            return
        pending += data
        self._flush(target)

    def _flush(self, target: int) -> None:
        """Write as much pending data to ``target`` as the pty accepts now."""
        pending = self._pending.get(target)
        loop = self._loop
        if pending is None or loop is None:
            return
        try:
            written = os.write(target, pending) if pending else 0
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError:
            pending.clear()
            written = 0
        del pending[:written]
        if pending:
            loop.add_writer(target, self._flush, target)
        else:
            loop.remove_writer(target)
