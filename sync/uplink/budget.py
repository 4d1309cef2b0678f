"""The byte budget of one S/sync message, adapted to a broker's message size limit, which the
forwarder cannot ask for: it only sees stalls (see sync/uplink/forwarder.py's docstring)."""

from __future__ import annotations

import logging

log = logging.getLogger("edge_agent.forwarder")

# Never cut batches below this many bytes because of stalls (a single larger event still goes
# alone in its own batch).
MIN_BATCH_BYTES = 1024
# After this many batches acknowledged without a stall the byte budget doubles again.
GROW_AFTER = 32
# How long a size known to pass stays the ceiling for growing back after a cut.
CEILING_TTL = 600.0


class BatchBudget:
    """Largest S/sync message to send now: halved on evidence of a size limit, doubled back
    after a run of acknowledged batches, never above `max_bytes`."""

    def __init__(self, *, max_bytes: int) -> None:
        if max_bytes < MIN_BATCH_BYTES:
            raise ValueError(f"max_bytes must be >= {MIN_BATCH_BYTES}")
        self._max_bytes = max_bytes
        self._budget = max_bytes
        self._ceiling = max_bytes
        self._ceiling_until = 0.0
        self._proven = 0  # largest S/sync message acknowledged (0: none yet, or stale)
        self._acked_since_change = 0

    @property
    def bytes(self) -> int:
        """The current budget."""
        return self._budget

    def acked(self, size: int) -> None:
        """A batch of `size` bytes was acknowledged: that size passes the broker."""
        self._proven = max(self._proven, size)
        self._acked_since_change += 1

    def forget_proven(self) -> None:
        """Sizes acknowledged earlier prove nothing any more (the limit may have been lowered)."""
        self._proven = 0

    def is_evidence(self, stuck: int) -> bool:
        """Whether a stuck batch of `stuck` bytes hints at a size limit: clearly larger than
        every batch acknowledged so far."""
        # Batches cut by event count vary in size by some percent: one a little larger than the
        # largest that passed is no evidence of a size limit.
        return stuck > self._proven + self._proven // 4

    def cut(self, now: float, stuck: int, reason: str) -> None:
        """A batch of `stuck` bytes would not pass: send at most half of it from now on."""
        budget = max(MIN_BATCH_BYTES, stuck // 2)
        if budget >= self._budget:
            return
        self._budget = budget
        self._acked_since_change = 0
        if self._proven:
            # Batches got through before this one stuck: do not grow past what passed.
            self._ceiling = max(self._budget, self._proven)
            self._ceiling_until = now + CEILING_TTL
        log.warning(
            "forwarder: S/sync batches cut to %d bytes (%s; broker message size limit?)",
            self._budget,
            reason,
        )

    def maybe_grow(self, now: float) -> None:
        """Double the budget after GROW_AFTER batches acknowledged since the last change."""
        if self._budget >= self._max_bytes or self._acked_since_change < GROW_AFTER:
            return
        ceiling = self._ceiling if now < self._ceiling_until else self._max_bytes
        budget = min(self._budget * 2, ceiling, self._max_bytes)
        if budget > self._budget:
            self._budget = budget
            log.info("forwarder: S/sync batches may be %d bytes again", budget)
        self._acked_since_change = 0
