"""Warnings about a peer's messages, at most one line a minute per kind (a flood stays quiet)."""

from __future__ import annotations

import logging
import time

LOG_EVERY = 60.0  # seconds between two log lines of one kind


class LimitedLog:
    """`warning(key, ...)` logs at most once per LOG_EVERY seconds for each key."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._last: dict[str, float] = {}

    def warning(self, key: str, text: str, *args: object) -> None:
        """Log `text % args` unless a line of this `key` went out less than a minute ago."""
        now = time.monotonic()
        if now - self._last.get(key, -LOG_EVERY) >= LOG_EVERY:
            self._last[key] = now
            self._log.warning(text, *args)
