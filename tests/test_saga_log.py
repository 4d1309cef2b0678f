"""The saga log (SQLite, durable, the index of command ids) and the failpoints."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.workflows.failpoints import (
    ENV_VAR,
    Failpoint,
    FailpointError,
    Failpoints,
    parse_failpoints,
)
from agent.workflows.saga_log import DuplicateCommand, SagaLog, SagaRecord, StepRecord
from tests.fixtures.modes import modes_under, umask, wider_than_private
from tests.fixtures.workflows import REPO


def saga(command_id: str = "c1", workflow: str = "w") -> SagaRecord:
    return SagaRecord(
        id=f"saga-{workflow}-{command_id}",
        workflow=workflow,
        command_id=command_id,
        params={"v": 1, "s": "ä"},
        state="running",
    )


async def test_sagas_and_steps_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sagas.db"
    async with SagaLog(path) as saga_log:
        first = saga()
        await saga_log.create(first)
        intent = StepRecord(1, "write", "press1/r0", "intent", previous=7, value=42, target=7)
        first.step = 1
        await saga_log.save(first, intent)
        await saga_log.create(saga("c1", "other"))  # ids are unique per workflow only
        with pytest.raises(DuplicateCommand):
            await saga_log.create(saga("c1"))
    async with SagaLog(path) as saga_log:
        found = await saga_log.find("w", "c1")
        assert found is not None
        assert found.params == {"v": 1, "s": "ä"}
        assert found.step == 1
        step = found.steps[1]
        assert (step.kind, step.ref, step.phase, step.previous, step.value, step.target) == (
            "write",
            "press1/r0",
            "intent",
            7,
            42,
            7,
        )
        assert [s.workflow for s in await saga_log.unfinished()] == ["w", "other"]
        found.state, found.outcome, found.confirm_pending = "completed", "completed", True
        step.phase, step.result = "done", 42
        await saga_log.save(found, step)
        assert [s.workflow for s in await saga_log.unfinished()] == ["other"]
        assert [s.id for s in await saga_log.confirm_pending()] == [found.id]
        assert await saga_log.find("w", "nope") is None
    # WAL with synchronous=FULL, as the design asks.
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_prune_keeps_recent_and_unconfirmed_sagas(tmp_path: Path) -> None:
    clock = [1000.0]
    async with SagaLog(tmp_path / "sagas.db", clock=lambda: clock[0]) as saga_log:
        old, pending, running = saga("old"), saga("pending"), saga("running")
        for record in (old, pending, running):
            await saga_log.create(record)
        old.state = "compensated"
        pending.state, pending.confirm_pending = "completed", True
        await saga_log.save(old, StepRecord(1, "wait", "press1/r0", "timeout"))
        await saga_log.save(pending)
        clock[0] = 5000.0
        assert await saga_log.prune(older_than=2000.0) == 1
        assert {s.command_id for s in await saga_log.all()} == {"pending", "running"}


async def test_a_corrupt_log_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "sagas.db"
    path.write_bytes(b"this is not a database" * 100)
    async with SagaLog(path) as saga_log:
        assert saga_log.recovered_from is not None
        moved = await asyncio.to_thread(Path(saga_log.recovered_from).read_bytes)
        assert moved.startswith(b"this is not")
        await saga_log.create(saga())
        assert len(await saga_log.all()) == 1


async def test_concurrent_saves_are_serialised(tmp_path: Path) -> None:
    async with SagaLog(tmp_path / "sagas.db") as saga_log:
        records = [saga(f"c{n}") for n in range(20)]
        await asyncio.gather(*(saga_log.create(r) for r in records))
        await asyncio.gather(
            *(saga_log.save(r, StepRecord(1, "confirm", None, "waiting")) for r in records)
        )
        assert all(1 in s.steps for s in await saga_log.all())


def test_parse_failpoints() -> None:
    points = parse_failpoints(" saga.before_write=kill@3, saga.before_finish=raise ,")
    assert dict(points) == {
        "saga.before_write": Failpoint("kill", 3),
        "saga.before_finish": Failpoint("raise", None),
    }
    with pytest.raises(TypeError):
        points["x"] = Failpoint("kill")  # type: ignore[index]
    assert dict(parse_failpoints("")) == {}
    with pytest.raises(ValueError, match=r"unknown failpoint 'saga\.typo'"):
        parse_failpoints("saga.typo=kill")
    with pytest.raises(ValueError, match="invalid entry"):
        parse_failpoints("saga.before_write=explode")
    with pytest.raises(ValueError, match="invalid entry"):
        parse_failpoints("saga.before_write=kill@0")


def test_failpoints_count_hits_and_raise_on_the_chosen_one() -> None:
    unarmed = Failpoints.from_env({})
    assert not unarmed.armed
    for _ in range(3):
        unarmed.hit("saga.before_write")
    assert unarmed.hits("saga.before_write") == 0  # nothing counted: zero cost
    armed = Failpoints.from_env({ENV_VAR: "saga.before_write=raise@2"})
    armed.hit("saga.before_write")
    armed.hit("saga.after_accept")
    with pytest.raises(FailpointError, match=r"saga.before_write \(hit 2\)"):
        armed.hit("saga.before_write")
    armed.hit("saga.before_write")  # only the 2nd
    assert armed.hits("saga.before_write") == 3


def test_kill_is_sigkill_of_the_own_process() -> None:
    code = (
        "from agent.workflows.failpoints import Failpoints\n"
        "fp = Failpoints.from_env()\n"
        "fp.hit('saga.before_write')\n"
        "print('first hit survived', flush=True)\n"
        "fp.hit('saga.before_write')\n"
        "print('never printed', flush=True)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={ENV_VAR: "saga.before_write=kill@2", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == -9
    assert result.stdout == "first hit survived\n"
    assert time.monotonic() - started < 30


async def test_saga_log_files_are_private_whatever_the_umask(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its directory 0700, the database, WAL and -shm 0600 under umask 022; a wider database
    is tightened and that is logged once."""
    path = tmp_path / "state" / "sagas.db"
    with umask(0o022):
        async with SagaLog(path) as saga_log:
            await saga_log.create(saga())
            during = modes_under(tmp_path)
        assert {"state/", "state/sagas.db", "state/sagas.db-wal", "state/sagas.db-shm"} <= set(
            during
        )
        assert wider_than_private(during) == {}
        assert wider_than_private(modes_under(tmp_path)) == {}

        path.chmod(0o664)
        for _ in range(2):
            with caplog.at_level(logging.WARNING, logger="edge_agent.files"):
                async with SagaLog(path) as saga_log:
                    assert await saga_log.find("w", "c1") is not None
        assert wider_than_private(modes_under(tmp_path)) == {}
    tightened = [r.getMessage() for r in caplog.records if "tightened" in r.getMessage()]
    assert tightened == [f"{path} had mode 0664; tightened to 0600"]
