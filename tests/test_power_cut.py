"""Pull the plug (issue #25): the agent's data directory on the power-cut harness
(tests/fixtures/powercut.py), 30 cuts at random moments while a Modbus line is polled, events
are group-committed, forwarded, acknowledged and deleted, and while the agent starts and
reloads, and while command sagas write to the PLC; the invariants of tests/fixtures/powercut_line.py after every cut, and at the end every
committed seq once in PostgreSQL (or declared by a gap event)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from simulators.modbus.server import ModbusSimulator
from tests.fixtures import MosquittoBroker, PostgresServer
from tests.fixtures.powercut import fuse_available
from tests.fixtures.powercut_line import PowerCutLine, summary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not fuse_available(), reason="no usable /dev/fuse and fuse3"),
]

CUTS = 30
SEED = 25


def plan(rng: random.Random) -> list[tuple[str, float, float]]:
    """(moment, delay, writeback) for every cut: a third while starting or reloading."""
    moments = ["running"] * 9 + ["start"] * 7 + ["reload"] * 7 + ["saga"] * 7
    rng.shuffle(moments)
    delays = {"running": (0.05, 1.0), "start": (0.0, 2.5), "reload": (0.0, 0.4), "saga": (0, 0.3)}
    return [(m, rng.uniform(*delays[m]), rng.choice((0.0, 0.5))) for m in moments]


async def test_power_cuts_lose_nothing_accepted(
    mosquitto: MosquittoBroker, postgres: PostgresServer, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    dsn = postgres.create_database("plant")
    async with ModbusSimulator(port=0, seed=11, speed=4.0, bulk_change_fraction=0.34) as sim:
        line = PowerCutLine(tmp_path, mosquitto, dsn, sim.port)
        try:
            await line.start()
            cuts = plan(rng)
            for number, (moment, delay, writeback) in enumerate(cuts):
                following = cuts[number + 1][0] if number + 1 < len(cuts) else None
                outcome = await line.cut_once(
                    moment, delay, writeback, seed=number, recover=following != "start"
                )
                assert not outcome.problems, (number, outcome)
            registers = []

            async def stop_producing() -> None:
                registers.extend(sim._units[1].spare[:2])  # what the PLC holds at the end
                await sim.close()

            totals = await line.finish(stop_producing)
        finally:
            line.close()
    report = summary(line.outcomes)
    assert report["cuts"] == CUTS
    assert not report["problems"]
    assert totals.lost == 0, totals
    assert totals.duplicated == 0, totals
    assert totals.outside == 0, totals
    assert totals.stored > 1000, totals
    # The saga log resolved every saga a cut interrupted (its in-doubt write settled by
    # reading the PLC back), and the PLC holds what the last completed saga chose.
    assert totals.sagas, "the commands started sagas"
    assert {saga["state"] for saga in totals.sagas} <= {"completed", "compensated"}, totals.sagas
    completed = [json.loads(s["params"]) for s in totals.sagas if s["state"] == "completed"]
    assert completed, totals.sagas
    assert registers == [completed[-1]["a"], completed[-1]["b"]], (registers, totals.sagas)
