"""What publishing can fail with, and how a failed or lost connection is described in the log."""

from __future__ import annotations

import errno
import socket
import ssl

from sync.mqtt.wire import NOT_AUTHORIZED, PACKET_TOO_LARGE, reason_name


class NotConnected(Exception):
    """Raised by `publish` while there is no connection; the caller keeps its data."""


class ConnectionLost(Exception):
    """Set on the PUBACK future of a message when its connection went away first."""


class PublishRejected(ConnectionLost):
    """Set on the PUBACK future when the broker refused the message (a failure reason code)."""

    def __init__(self, *, reason: int) -> None:
        """`reason`: the PUBACK's MQTT 5 reason code, a failure (0x80 and above)."""
        if not 0x80 <= reason <= 0xFF:
            raise ValueError(f"PUBACK reason code 0x{reason:02X} is not a failure")
        super().__init__(f"broker rejected the message: {reason_name(reason)}")
        self.reason = reason

    @property
    def not_authorized(self) -> bool:
        """The broker's ACL refused the message (MQTT 5 reason code 0x87)."""
        return self.reason == NOT_AUTHORIZED


class MessageTooLarge(PublishRejected):
    """The message's PUBLISH packet is larger than the broker's Maximum Packet Size (CONNACK):
    refused before sending, since the broker would disconnect the client for it."""

    def __init__(self, detail: str) -> None:
        """`detail`: the sizes, for the log."""
        super().__init__(reason=PACKET_TOO_LARGE)
        self.args = (detail,)


def describe_error(exc: BaseException) -> str:
    """A short reason for the log and `last_error`: what failed, not the exception class."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        if exc.reason and "ALERT" in exc.reason:
            # The broker refused the handshake or our certificate, e.g. TLSV13_ALERT_...
            return f"TLS alert from the broker: {exc.reason}"
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError) and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return "connection refused (no broker listening on that port?)"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the broker (TCP RST)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
