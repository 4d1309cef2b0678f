"""How `edge-agent ingest` ends: on a signal (0), on a failure of one of its tasks (1, every
cause logged), or by a cancellation from outside (propagated)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.central import service
from agent.central.settings import CentralSettings, load_central_settings
from sync.central.stats import IngestStats


class StubIngest:
    """Stands in for an Ingest: ``run`` is whatever the test makes it."""

    def __init__(self, run: Callable[[], Awaitable[None]]) -> None:
        self._run = run
        self.started = asyncio.Event()
        self.cancelled = False
        self.stats = IngestStats()

    async def run(self) -> None:
        self.started.set()
        try:
            await self._run()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


@pytest.fixture
def settings(tmp_path: Path) -> CentralSettings:
    path = tmp_path / "central.toml"
    path.write_text(
        '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n\n'
        '[postgres]\ndsn = "postgresql://ingest@127.0.0.1:1/plant"\n\n'
        "[http]\nenabled = false\n"
    )
    return load_central_settings(path, environ={})


def use(monkeypatch: pytest.MonkeyPatch, ingest: StubIngest) -> None:
    monkeypatch.setattr(service, "ingest_for", lambda _settings: ingest)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


async def forever() -> None:
    await asyncio.Event().wait()


async def test_sigterm_stops_the_service_with_exit_code_0(
    settings: CentralSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest = StubIngest(forever)
    use(monkeypatch, ingest)
    running = asyncio.create_task(service.run_until_signalled(settings))
    async with asyncio.timeout(10):
        await ingest.started.wait()
        os.kill(os.getpid(), signal.SIGTERM)
        assert await running == 0
    assert ingest.cancelled


async def test_each_cause_of_a_failure_is_logged_and_the_exit_code_is_1(
    settings: CentralSettings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def workers_fail() -> None:
        # Like Ingest.run, whose workers run in a TaskGroup of their own.
        raise ExceptionGroup("workers", [ValueError("first bug"), KeyError("second bug")])

    use(monkeypatch, StubIngest(workers_fail))
    async with asyncio.timeout(10):
        assert await service.run_until_signalled(settings) == 1
    failures = [r for r in caplog.records if r.getMessage().startswith("ingest: stopped by")]
    assert [r.getMessage() for r in failures] == [
        "ingest: stopped by ValueError: first bug",
        "ingest: stopped by KeyError: 'second bug'",
    ]
    assert all(r.levelno == logging.ERROR and r.exc_info for r in failures)  # with tracebacks
    assert "ingest stopped" not in caplog.text


async def test_an_ingest_that_returns_is_a_failure(
    settings: CentralSettings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def returns() -> None:
        return None

    use(monkeypatch, StubIngest(returns))
    async with asyncio.timeout(10):
        assert await service.run_until_signalled(settings) == 1
    assert "ingest: stopped by RuntimeError: the ingest stopped consuming" in caplog.text


async def test_a_cancellation_from_outside_propagates(
    settings: CentralSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest = StubIngest(forever)
    use(monkeypatch, ingest)
    running = asyncio.create_task(service.run_until_signalled(settings))
    async with asyncio.timeout(10):
        await ingest.started.wait()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    assert ingest.cancelled
    # The signal handlers are gone with the service.
    assert not asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
