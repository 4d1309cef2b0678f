"""Counters of the workflow engine, for /metrics and tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineStats:
    """Commands by what became of them, and what could not be replied or audited."""

    commands: int = 0
    accepted: int = 0
    rejected: int = 0
    busy_overflow: int = 0
    duplicates: int = 0
    replies_dropped: int = 0
    audit_failures: int = 0
    audits_suppressed: int = 0
    completed: int = 0
    compensated: int = 0
    failed: int = 0
