"""Pull the plug N times (default 1,000): the line of tests/test_power_cut.py with the agent's
data directory on the power-cut harness (tests/fixtures/powercut.py), a cut at a random moment
(running, during start, after a SIGHUP reload, after a command that starts a saga), with or
without random writeback of what was pending, the invariants checked on what survived after
every cut, then a restart.

At the end the PLC simulator stops, the outbox drains, and the central store is compared with
everything the agent ever committed. Prints: cuts, accepted events (committed seqs), stored
centrally, lost, duplicated, invariant violations (integrity failures among them) and the
distribution of recovery times (restart until the first new commit is reported; the Python
interpreter's start is part of it). Figures only: violations are listed, not asserted.

    .venv/bin/python bench/power_cut.py                 # 1,000 cuts (~30 min here)
    .venv/bin/python bench/power_cut.py --cuts 200 --seed 7
    .venv/bin/python bench/power_cut.py --quick         # 3 cuts (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from simulators.modbus.server import ModbusSimulator  # noqa: E402
from tests.fixtures import MosquittoBroker, PostgresServer  # noqa: E402
from tests.fixtures.powercut import fuse_available  # noqa: E402
from tests.fixtures.powercut_line import MOMENTS, PowerCutLine  # noqa: E402

DELAYS = {"running": (0.05, 1.0), "start": (0.0, 2.5), "reload": (0.0, 0.4), "saga": (0, 0.3)}


def percentile(values: list[float], share: float) -> float:
    """The value below which `share` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


async def run(cuts: int, seed: int) -> int:
    if not fuse_available():
        print("power_cut: no usable /dev/fuse, fusermount3 and libfuse3 (Debian: fuse3)")
        return 2
    rng = random.Random(seed)
    moments = [rng.choices(MOMENTS, weights=(2, 1, 1, 1))[0] for _ in range(cuts)]
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-power-cut-"))
    broker, postgres = MosquittoBroker(), PostgresServer()
    await asyncio.to_thread(broker.start)
    await asyncio.to_thread(postgres.start)
    began = time.monotonic()
    try:
        dsn = await asyncio.to_thread(postgres.create_database, "plant")
        async with ModbusSimulator(port=0, seed=11, speed=4.0, bulk_change_fraction=0.34) as sim:
            line = PowerCutLine(workdir, broker, dsn, sim.port)
            try:
                await line.start()
                for number, moment in enumerate(moments):
                    following = moments[number + 1] if number + 1 < cuts else None
                    await line.cut_once(
                        moment,
                        rng.uniform(*DELAYS[moment]),
                        rng.choice((0.0, 0.5)),
                        seed=seed * 100_000 + number,
                        recover=following != "start",
                    )
                    if (number + 1) % 50 == 0:
                        print(f"  {number + 1} cuts, {time.monotonic() - began:.0f} s", flush=True)
                totals = await line.finish(sim.close)
            finally:
                line.close()
    except BaseException:
        print(f"power_cut: failed; the agent's log and the disk are kept in {workdir}")
        raise
    else:
        if any(outcome.problems for outcome in line.outcomes):
            print(f"power_cut: invariant violations; their logs are kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        await asyncio.to_thread(broker.close)
        await asyncio.to_thread(postgres.close)
    outcomes = line.outcomes
    problems = [(n, p) for n, o in enumerate(outcomes) for p in o.problems]
    integrity = [p for _, p in problems if "integrity_check" in p or "corrupt" in p]
    recoveries = [o.recovery_s for o in outcomes if o.recovery_s is not None]
    print(f"edge-agent power-cut benchmark (seed {seed}, {time.monotonic() - began:.0f} s)")
    print(f"  cuts                      {len(outcomes)}")
    for moment in MOMENTS:
        print(f"    {moment:<22}  {sum(o.moment == moment for o in outcomes)}")
    print(f"    with writeback 0.5      {sum(o.writeback > 0 for o in outcomes)}")
    print(f"  accepted events           {totals.last_seq}")
    print(f"  stored centrally          {totals.stored}")
    print(f"  gaps declared             {len(totals.gaps)}")
    print(f"  lost                      {totals.lost}")
    print(f"  duplicated                {totals.duplicated + totals.outside}")
    print(f"  integrity failures        {len(integrity)}")
    print(f"  invariant violations      {len(problems)}")
    for number, problem in problems[:20]:
        print(f"    cut {number}: {problem}")
    if recoveries:
        print(
            f"  recovery s (restart to first new commit, {len(recoveries)} measured): "
            f"min {min(recoveries):.2f}  p50 {statistics.median(recoveries):.2f}  "
            f"p90 {percentile(recoveries, 0.9):.2f}  p99 {percentile(recoveries, 0.99):.2f}  "
            f"max {max(recoveries):.2f}"
        )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="3 cuts (smoke test)")
    args = parser.parse_args()
    sys.exit(uvloop.run(run(3 if args.quick else args.cuts, args.seed)))


if __name__ == "__main__":
    main()
