"""Every program runs on uvloop's event loop, and so does every test (docs/performance.md,
"The event loop"): the daemon, the ingest, probe, browse, demo and the simulators start their
coroutine with `uvloop.run` (ruff bans asyncio.run, pyproject.toml), and tests/conftest.py
gives each async test a uvloop loop."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest
import uvloop

import agent.central.service
import agent.central.settings
import agent.daemon.runtime
import agent.settings.loader
from agent import cli


async def test_the_tests_run_on_the_programs_loop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


def test_the_daemon_and_the_ingest_run_on_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    loops: list[type[asyncio.AbstractEventLoop]] = []

    async def record(*_: object) -> int:
        loops.append(type(asyncio.get_running_loop()))
        return 0

    monkeypatch.setattr(agent.settings.loader, "load_agent_settings", lambda *_: None)
    monkeypatch.setattr(agent.daemon.runtime, "run_until_signalled", record)
    monkeypatch.setattr(cli, "_exit_despite_stray_threads", lambda _: None)
    monkeypatch.setattr(agent.central.settings, "load_central_settings", lambda *_: None)
    monkeypatch.setattr(agent.central.service, "run_until_signalled", record)

    assert cli.cmd_run(argparse.Namespace(config=Path("agent.toml"))) == 0
    assert cli.cmd_ingest(argparse.Namespace(config=Path("ingest.toml"))) == 0
    assert loops == [uvloop.Loop, uvloop.Loop]
