"""The outbox's errors: every failure a caller must handle is an `OutboxUnavailable`."""

from __future__ import annotations


class OutboxUnavailable(Exception):
    """The outbox cannot accept or change events right now (disk full, I/O error, closed)."""


class OutboxFull(OutboxUnavailable):
    """Over the cap and nothing droppable is left (only non-sample events are stored)."""
