"""What publishing can fail with, and how a failed or lost connection is described in the log."""

from __future__ import annotations

import socket
import ssl


class NotConnected(Exception):
    """Raised by `publish` while there is no connection; the caller keeps its data."""


class ConnectionLost(Exception):
    """Set on the PUBACK future of a message when its connection went away first."""


class PublishRejected(ConnectionLost):
    """Set on the PUBACK future when the broker refused the message (a failure reason code)."""


class MessageTooLarge(PublishRejected):
    """The message's PUBLISH packet is larger than the broker's Maximum Packet Size (CONNACK):
    refused before sending, since the broker would disconnect the client for it."""


def describe_error(exc: BaseException) -> str:
    """A short reason for the log and `last_error`: what failed, not the exception class."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError) and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
