"""sd_notify(3) spoken natively: READY=1, STATUS=, WATCHDOG=1, RELOADING=1 and STOPPING=1 as
datagrams to $NOTIFY_SOCKET. Without NOTIFY_SOCKET (not under systemd) every call is a no-op.

No libsystemd: the protocol is one AF_UNIX datagram of newline-separated KEY=VALUE lines.
The socket is non-blocking, so a notification never stalls the event loop; when systemd's
receive queue is full the message is dropped (the next one carries the same news).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("edge_agent.sdnotify")

Field = str | int


def _address(value: str | None) -> str | None:
    """The socket address of a NOTIFY_SOCKET value, or None if we cannot use it."""
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of the '@'.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # vsock:... (systemd >= 254 in VMs) and relative paths are not for us.
    log.warning("NOTIFY_SOCKET=%r is not supported; systemd notifications are off", value)
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None without a watchdog."""
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    # systemd sets WATCHDOG_PID for the main process; a child that inherited the variables
    # must not ping on its parent's behalf.
    if pid and pid != str(os.getpid()):
        return None
    return usec / 2_000_000


class SdNotifier:
    """Sends service-manager notifications; every method is a no-op without NOTIFY_SOCKET."""

    def __init__(
        self,
        *,
        socket_path: str | None = None,
        environ: Mapping[str, str] | None = None,
        unset_environment: bool = False,
    ) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(
            socket_path if socket_path is not None else env.get("NOTIFY_SOCKET")
        )
        self._watchdog = watchdog_interval(env)
        if unset_environment and isinstance(env, MutableMapping):
            # Like sd_notify(unset_environment=1): child processes must not talk to systemd
            # on our behalf, nor believe they are watched.
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(key, None)
        self._socket: socket.socket | None = None
        self._error_logged = False
        self.sent = 0  # datagrams handed to the kernel (for tests and debugging)
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings systemd expects (half of WATCHDOG_USEC), or None."""
        return self._watchdog if self.enabled else None

    def notify(self, **fields: Field) -> bool:
        """Send KEY=VALUE fields in one datagram; True if the kernel accepted it."""
        if self._address is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            # One field per line: a newline inside a value would start a bogus field.
            text = str(value).replace("\r", " ").replace("\n", " ")
            lines.append(f"{key}={text}")
        return self._send("\n".join(lines).encode("utf-8", "replace"))

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up finished (optionally with a STATUS= line)."""
        return self.notify(READY=1, **_status(status))

    def status(self, text: str) -> bool:
        """STATUS=: the one-line summary shown by `systemctl status`."""
        return self.notify(STATUS=text)

    def watchdog(self, status: str | None = None) -> bool:
        """WATCHDOG=1: the keep-alive ping."""
        return self.notify(WATCHDOG=1, **_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1: a configuration reload began (send ready() when it is done)."""
        # MONOTONIC_USEC is what Type=notify-reload (systemd >= 253) requires; older ones
        # ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec, **_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown began."""
        return self.notify(STOPPING=1, **_status(status))

    def close(self) -> None:
        """Close the socket (a later notification opens a new one)."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    def _send(self, data: bytes) -> bool:
        assert self._address is not None
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._socket.sendto(data, self._address)
        except OSError as exc:
            self.dropped += 1
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                # systemd is busy; the next notification repeats what matters.
                log.debug("notification dropped: %s", exc)
            elif not self._error_logged:
                self._error_logged = True
                log.warning("cannot notify the service manager at %r: %s", self._address, exc)
            return False
        self.sent += 1
        self._error_logged = False
        return True


def _status(text: str | None) -> dict[str, Field]:
    return {} if text is None else {"STATUS": text}
