"""Accelerated soak: the line of bench/line_scale.py for a long time, under random faults.

A fault every 30-120 s, chosen at random with a printed seed: broker kill -9, PLC simulator
kill -9 and restart, ingest kill -9, PostgreSQL kill -9 (crash recovery), agent SIGKILL with a
systemd-like restart after RestartSec (systemd/edge-agent.service: 5 s). After each fault the
soak waits until everything committed before it is acknowledged by the central store.

At the end the simulators stop, the outbox drains and the agent stops (SIGTERM); then: the
zero-loss check (every committed seq of the stream once in PostgreSQL or inside a declared
gap), the agent's RSS slope after warm-up (per process lifetime, pooled), open fds and threads
over time, and every traceback in the agent's and the ingest's logs. Figures only, no asserts.

    .venv/bin/python bench/soak.py                      # 30 minutes
    .venv/bin/python bench/soak.py --minutes 10 --seed 42
    .venv/bin/python bench/soak.py --hours 8 --faults broker,plc,ingest,postgres
    .venv/bin/python bench/soak.py --quick              # ~20 s with 2-3 faults (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from line_scale import (
    FULL,
    GATEWAY,
    QUICK,
    Line,
    cpu_seconds,
    fd_count,
    proc_status,
    wait_for,
)

FAULTS = ("broker", "plc", "ingest", "postgres", "agent")
TRACEBACK = "Traceback (most recent call last)"
# asyncio's reports of exceptions nobody handled (they come without "Traceback" when the
# exception was never raised in a frame).
UNHANDLED = (
    "Task exception was never retrieved",
    "Future exception was never retrieved",
    "Exception in callback",
    "Unhandled exception",
)


@dataclass(slots=True)
class Sample:
    """One look at the agent."""

    t: float  # seconds since the soak began
    pid: int
    rss_mib: float
    fds: int
    threads: int
    tasks: int  # asyncio tasks (edge_agent_asyncio_tasks on /metrics; -1 if it did not answer)
    cpu_s: float
    quiet: bool  # every device up and the uplink up: no fault in progress


@dataclass(slots=True)
class Fault:
    """One injected fault and how the line recovered."""

    t: float
    kind: str
    target: str
    down_s: float
    recovered_s: float | None  # restart -> everything committed up to the restart acked
    committed_before: int
    committed_at_restart: int


class Soak:
    """Runs the faults and the sampler on a started line."""

    def __init__(self, line: Line, args: argparse.Namespace, rng: random.Random) -> None:
        """Bind to a started line."""
        self.line = line
        self.args = args
        self.rng = rng
        self.began = time.monotonic()
        self.samples: list[Sample] = []
        self.faults: list[Fault] = []

    def now(self) -> float:
        """Seconds since the soak began."""
        return time.monotonic() - self.began

    async def sample_loop(self, stop: asyncio.Event) -> None:
        """Sample the agent every `--sample-interval` seconds until `stop`."""
        while not stop.is_set():
            pid = self.line.agent.pid
            status = await self.line.status()
            metrics = await self.line.metrics()
            values, fds = proc_status(pid), fd_count(pid)
            if pid is not None and values and fds is not None:
                quiet = (
                    status is not None
                    and status["uplink"] == "up"
                    and all(state == "up" for state in status["devices"].values())
                )
                self.samples.append(
                    Sample(
                        round(self.now(), 1),
                        pid,
                        values["VmRSS"] / 1024,
                        fds,
                        values["Threads"],
                        int(metrics.get("edge_agent_asyncio_tasks", -1)),
                        cpu_seconds(pid),
                        quiet,
                    )
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.args.sample_interval):
                    await stop.wait()

    async def committed(self) -> int:
        """The agent's committed seq now (waits while it restarts)."""
        status = None
        while status is None:
            status = await self.line.status()
            if status is None:
                await asyncio.sleep(0.2)
        return int(status["committed_seq"])

    async def recovered(self, seq: int) -> bool:
        """Every device up, and the central store acknowledged `seq`."""
        status = await self.line.status()
        return (
            status is not None
            and status["acked_seq"] >= seq
            and all(state == "up" for state in status["devices"].values())
        )

    async def inject(self, kind: str) -> None:
        """One fault: kill, stay down a while, restart; then wait for recovery."""
        line, rng, quick = self.line, self.rng, self.args.quick
        began = self.now()
        before = await self.committed()
        target = kind
        restart: Callable[[], Awaitable[None]]
        if kind == "broker":
            await asyncio.to_thread(line.broker.kill)
            down = rng.uniform(1, 2) if quick else rng.uniform(2, 20)
            target = "mosquitto kill -9"

            async def restart() -> None:
                await asyncio.to_thread(line.broker.start)

        elif kind == "plc":
            sim = rng.choice(line.simulators)
            sim.kill()
            down = rng.uniform(0.5, 1) if quick else rng.uniform(1, 5)
            target = f"{sim.name} simulator kill -9"

            async def restart() -> None:
                await line.start_simulator(sim)

        elif kind == "ingest":
            line.ingest.kill()
            down = self.args.restart_sec
            target = "ingest kill -9"

            async def restart() -> None:
                line.ingest.start()

        elif kind == "postgres":
            await asyncio.to_thread(line.postgres.kill)
            down = rng.uniform(0.5, 1) if quick else rng.uniform(1, 5)
            target = "PostgreSQL kill -9 (crash recovery)"

            async def restart() -> None:
                await asyncio.to_thread(line.postgres.start)

        else:
            line.agent.kill()
            down = self.args.restart_sec
            target = "agent SIGKILL, restart after RestartSec"

            async def restart() -> None:
                line.agent.start()

        await asyncio.sleep(down)  # the outage itself
        await restart()
        restarted = time.monotonic()
        # Everything committed until the restart (the backlog of the outage) must reach
        # PostgreSQL; an agent that was killed answers again first.
        at_restart = max(before, await self.committed())
        recovered: float | None = None
        with contextlib.suppress(TimeoutError):
            await wait_for(
                lambda: self.recovered(at_restart),
                self.args.recovery_timeout,
                "recovery",
                interval=0.2,
            )
            recovered = round(time.monotonic() - restarted, 1)
        self.faults.append(
            Fault(round(began, 1), kind, target, round(down, 1), recovered, before, at_restart)
        )
        state = "not recovered" if recovered is None else f"recovered after {recovered} s"
        print(f"  {began:7.1f} s  {target:<42} down {down:4.1f} s, {state}", flush=True)

    async def run(self, duration: float) -> None:
        """Faults every --min-gap..--max-gap seconds until `duration` has passed."""
        kinds = [k for k in self.args.faults.split(",") if k]
        next_at = self.rng.uniform(self.args.min_gap, self.args.max_gap)
        while next_at < duration:
            await asyncio.sleep(max(0.0, next_at - self.now()))
            await self.inject(self.rng.choice(kinds))
            next_at += self.rng.uniform(self.args.min_gap, self.args.max_gap)
            next_at = max(next_at, self.now())
        await asyncio.sleep(max(0.0, duration - self.now()))


def rss_slope(samples: list[Sample], warmup: float) -> tuple[float | None, float | None, int]:
    """Pooled within-process least-squares slope of RSS (MiB per hour), its standard error,
    and the number of samples used: quiet samples after each process's first `warmup` s."""
    by_pid: dict[int, list[Sample]] = {}
    for sample in samples:
        by_pid.setdefault(sample.pid, []).append(sample)
    sxx = sxy = 0.0
    residual: list[tuple[float, float, float, float]] = []
    used = 0
    for series in by_pid.values():
        start = series[0].t
        points = [(s.t, s.rss_mib) for s in series if s.quiet and s.t - start >= warmup]
        if len(points) < 3:
            continue
        mean_t = sum(t for t, _ in points) / len(points)
        mean_r = sum(r for _, r in points) / len(points)
        for t, r in points:
            sxx += (t - mean_t) ** 2
            sxy += (t - mean_t) * (r - mean_r)
            residual.append((t, r, mean_t, mean_r))
        used += len(points)
    if sxx <= 0:
        return None, None, used
    slope = sxy / sxx  # MiB per second
    groups = len({s.pid for s in samples})
    sse = sum((r - mr - slope * (t - mt)) ** 2 for t, r, mt, mr in residual)
    dof = max(1, used - groups - 1)
    stderr = (sse / dof / sxx) ** 0.5
    return slope * 3600, stderr * 3600, used


def scan_log(path: Path) -> dict[str, Any]:
    """Tracebacks and unhandled-exception reports in a log, with their final lines."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"tracebacks": 0, "unhandled": 0, "errors": 0, "examples": []}
    tracebacks = unhandled = errors = 0
    examples: dict[str, int] = {}
    for index, line in enumerate(lines):
        if " ERROR " in line or " CRITICAL " in line:
            errors += 1
            # Kept as an example too: the work dir (and its logs) is deleted at the end.
            key = line.split(" ", 2)[-1][:160]  # without the date and time
            examples[key] = examples.get(key, 0) + 1
        if any(marker in line for marker in UNHANDLED):
            unhandled += 1
            key = line.split(" ", 3)[-1][:160]  # without the timestamp
            examples[key] = examples.get(key, 0) + 1
        if TRACEBACK in line:
            tracebacks += 1
            # The exception line ends the block: the first unindented line after it.
            for follow in lines[index + 1 : index + 200]:
                if follow and not follow.startswith((" ", "\t", TRACEBACK)):
                    if (
                        re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", follow)
                        or ":" in follow
                    ):
                        key = follow[:160]
                        examples[key] = examples.get(key, 0) + 1
                    break
    return {
        "tracebacks": tracebacks,
        "unhandled": unhandled,
        "errors": errors,
        "examples": sorted(examples.items(), key=lambda kv: -kv[1])[:10],
    }


def read_outbox(path: Path) -> tuple[str, int, int]:
    """(stream, committed seq, acked seq) from a stopped agent's outbox."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        stream, last, acked = db.execute("SELECT stream, last_seq, acked_seq FROM meta").fetchone()
    return str(stream), int(last), int(acked)


async def zero_loss(dsn: str, stream: str, committed: int, outbox_acked: int) -> dict[str, Any]:
    """Every seq 1..committed of `stream` once in edge_events or inside a declared gap."""
    connection = await asyncpg.connect(dsn, timeout=30)
    try:
        streams = await connection.fetch(
            "SELECT stream_id::text AS stream, count(*) AS n FROM edge_events "
            "WHERE gateway_id = $1 GROUP BY 1",
            GATEWAY,
        )
        rows = await connection.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT seq) AS distinct_seqs, max(seq) AS top "
            "FROM edge_events WHERE gateway_id = $1 AND stream_id = $2::uuid",
            GATEWAY,
            stream,
        )
        absent = await connection.fetch(
            "SELECT seq FROM generate_series(1::bigint, $3::bigint) AS seq EXCEPT "
            "SELECT seq FROM edge_events WHERE gateway_id = $1 AND stream_id = $2::uuid "
            "ORDER BY 1 LIMIT 100000",
            GATEWAY,
            stream,
            committed,
        )
        gaps = await connection.fetch(
            "SELECT first_seq, last_seq, reason FROM edge_gaps "
            "WHERE gateway_id = $1 AND stream_id = $2::uuid",
            GATEWAY,
            stream,
        )
        central_acked = await connection.fetchval(
            "SELECT acked_seq FROM edge_streams WHERE gateway_id = $1 AND stream_id = $2::uuid",
            GATEWAY,
            stream,
        )
    finally:
        await connection.close()
    declared = [(g["first_seq"], g["last_seq"]) for g in gaps if g["first_seq"] is not None]
    missing = [
        r["seq"] for r in absent if not any(first <= r["seq"] <= last for first, last in declared)
    ]
    pending = [seq for seq in missing if seq > outbox_acked]  # still in the outbox, not lost
    lost = [seq for seq in missing if seq <= outbox_acked]
    duplicates = int(rows["n"]) - int(rows["distinct_seqs"])
    return {
        "stream": stream,
        "committed_seq": committed,
        "outbox_acked_seq": outbox_acked,
        "central_acked_seq": central_acked,
        "rows": int(rows["n"]),
        "max_seq_in_postgres": rows["top"],
        "duplicates": duplicates,
        "declared_gap_seqs": sum(last - first + 1 for first, last in declared),
        "gap_reasons": sorted({str(g["reason"]) for g in gaps}),
        "missing": len(missing),
        "pending_in_outbox": len(pending),
        "lost": len(lost),
        "lost_examples": lost[:10],
        "other_streams": [s["stream"] for s in streams if s["stream"] != stream],
        "passed": not lost and duplicates == 0 and not pending and central_acked == committed,
    }


async def finish(line: Line, args: argparse.Namespace) -> dict[str, Any]:
    """Stop producing, drain, stop the agent; the outbox's and PostgreSQL's final word."""
    for sim in line.simulators:
        sim.kill()  # the devices go away: no new samples, the backlog can drain

    async def drained() -> bool:
        status = await line.status()
        return (
            status is not None
            and status["committed_seq"] == status["acked_seq"]
            and status["outbox_events"] == 0
        )

    drained_ok = True
    try:
        await wait_for(drained, args.recovery_timeout, "the final drain", interval=0.5)
    except TimeoutError:
        drained_ok = False
    agent_exit = await asyncio.to_thread(line.agent.stop, 60.0)
    stream, committed, acked = await asyncio.to_thread(
        read_outbox, line.workdir / "data" / "outbox.db"
    )
    # The agent's last `stop` event may still be on its way to PostgreSQL.
    with contextlib.suppress(TimeoutError):
        await wait_for(
            lambda: central_acked(line.dsn, stream, committed), 30, "the last ack", interval=0.5
        )
    ingest_exit = await asyncio.to_thread(line.ingest.stop, 60.0)
    check = await zero_loss(line.dsn, stream, committed, acked)
    return {
        "drained_before_stop": drained_ok,
        "agent_exit_code": agent_exit,
        "ingest_exit_code": ingest_exit,
        "zero_loss": check,
    }


async def central_acked(dsn: str, stream: str, seq: int) -> bool:
    """Whether edge_streams.acked_seq of `stream` reached `seq`."""
    try:
        connection = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        acked = await connection.fetchval(
            "SELECT acked_seq FROM edge_streams WHERE gateway_id = $1 AND stream_id = $2::uuid",
            GATEWAY,
            stream,
        )
    finally:
        await connection.close()
    return acked is not None and acked >= seq


def flat(values: list[int]) -> str:
    """min..max of a series."""
    return f"{min(values)}..{max(values)}" if values else "no samples"


def report(
    args: argparse.Namespace, soak: Soak, final: dict[str, Any], extra: dict[str, Any]
) -> str:
    """The printed summary."""
    samples = soak.samples
    quiet = [s for s in samples if s.quiet]
    warm = [s for s in quiet if s.t - min(x.t for x in samples if x.pid == s.pid) >= args.warmup]
    slope, stderr, used = rss_slope(samples, args.warmup)
    check = final["zero_loss"]
    faults = soak.faults
    recovered = [f.recovered_s for f in faults if f.recovered_s is not None]
    counts = {k: sum(1 for f in faults if f.kind == k) for k in FAULTS}
    processes = len({s.pid for s in samples})
    logs = extra["logs"]
    lines = [
        f"edge-agent accelerated soak: seed {args.seed}, {extra['minutes']:.1f} minutes, "
        f"{len(faults)} faults (" + ", ".join(f"{k} {n}" for k, n in counts.items() if n) + ")",
        f"  line: {extra['line']}",
        f"  events committed            {extra['events']:,} ({extra['events_per_s']:,.0f} /s "
        f"on average, faults included)",
        f"  faults recovered            {len(recovered)} of {len(faults)}; recovery (restart -> "
        f"everything committed until the restart acked, devices up): "
        + (
            f"median {sorted(recovered)[len(recovered) // 2]:.1f} s, max {max(recovered):.1f} s"
            if recovered
            else "-"
        ),
        f"  zero-loss check             {'PASSED' if check['passed'] else 'FAILED'}: seqs "
        f"1..{check['committed_seq']:,} of stream {check['stream'][:8]}: "
        f"{check['rows']:,} rows, {check['duplicates']} duplicate seqs, "
        f"{check['declared_gap_seqs']} in declared gaps, {check['lost']} lost, "
        f"{check['pending_in_outbox']} still in the outbox; central acked_seq "
        f"{check['central_acked_seq']}",
        f"  agent processes             {processes} (restarts after SIGKILL: "
        f"{counts['agent']}); exit code at the end {final['agent_exit_code']}, "
        f"ingest {final['ingest_exit_code']}",
        f"  agent CPU (mean)            {extra['agent_cpu_pct']:.1f} % of one core",
        f"  agent RSS                   {flat([round(s.rss_mib) for s in warm])} MiB after "
        f"warm-up; slope "
        + (
            f"{slope:+.2f} MiB/h (± {stderr:.2f} standard error, {used} samples)"
            if slope is not None and stderr is not None
            else "n/a (too few samples after warm-up)"
        )
        + "   target < 1 MB/h",
        f"  agent open fds              {flat([s.fds for s in warm])} (quiet samples after "
        f"warm-up; all samples {flat([s.fds for s in samples])})",
        f"  agent threads               {flat([s.threads for s in warm])}",
        f"  agent asyncio tasks         {flat([s.tasks for s in warm])} (quiet samples after "
        f"warm-up; all samples {flat([s.tasks for s in samples])})",
    ]
    for name, scan in logs.items():
        lines.append(
            f"  {name + ' log':<28}{scan['tracebacks']} tracebacks, {scan['unhandled']} "
            f"unhandled-exception reports, {scan['errors']} ERROR lines"
        )
        lines += [f"      {count} x {text}" for text, count in scan["examples"]]
    return "\n".join(lines)


async def main() -> None:
    """Parse arguments, run the soak, print and save the results."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="soak duration")
    parser.add_argument("--hours", type=float, help="soak duration in hours (overrides --minutes)")
    parser.add_argument("--seed", type=int, help="fault schedule seed (default: random, printed)")
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help="comma list of " + "|".join(FAULTS)
    )
    parser.add_argument("--min-gap", type=float, default=30.0, help="seconds between faults, min")
    parser.add_argument("--max-gap", type=float, default=120.0, help="seconds between faults, max")
    parser.add_argument("--restart-sec", type=float, default=5.0, help="systemd RestartSec=")
    parser.add_argument("--warmup", type=float, default=120.0, help="per agent process, for RSS")
    parser.add_argument("--sample-interval", type=float, default=5.0, help="seconds")
    parser.add_argument("--recovery-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument(
        "--json",
        default=str(Path(tempfile.gettempdir()) / "edge-agent-soak.json"),
        help="where the results are written as JSON",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument("--quick", action="store_true", help="~20 s with 2-3 faults (smoke test)")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1, 2**31)
    minutes = args.hours * 60 if args.hours is not None else args.minutes
    spec = FULL
    if args.quick:
        spec = QUICK
        minutes = 1 / 3
        args.min_gap, args.max_gap, args.restart_sec = 5.0, 7.0, 1.0
        args.warmup, args.sample_interval, args.recovery_timeout = 3.0, 1.0, 90.0
    unknown = set(args.faults.split(",")) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    print(f"soak seed {args.seed} ({minutes:g} minutes; faults: {args.faults})", flush=True)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-soak-"))
    line = Line(spec, workdir, log_level="info")
    rng = random.Random(args.seed)
    failed = True
    try:
        await line.start()
        await line.wait_flowing(180)
        soak = Soak(line, args, rng)
        start_seq = await soak.committed()
        stop = asyncio.Event()
        sampler = asyncio.create_task(soak.sample_loop(stop))
        await soak.run(minutes * 60)
        end_seq = await soak.committed()
        elapsed = soak.now()
        stop.set()
        await sampler
        segments: dict[int, list[Sample]] = {}
        for sample in soak.samples:
            segments.setdefault(sample.pid, []).append(sample)
        agent_cpu = sum(s[-1].cpu_s - s[0].cpu_s for s in segments.values())
        sampled = sum(s[-1].t - s[0].t for s in segments.values())
        final = await finish(line, args)
        failed = False
    finally:
        line.close()
        if failed or args.keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
    extra = {
        "minutes": elapsed / 60,
        "line": f"{spec.modbus_tags:,} Modbus tags + {spec.opcua_items:,} OPC UA items, "
        f"{spec.machines} machines, {spec.change_fraction:.0%} changing per {spec.interval}",
        "events": end_seq - start_seq,
        "events_per_s": (end_seq - start_seq) / elapsed,
        "agent_cpu_pct": agent_cpu / max(sampled, 1e-9) * 100,
        "logs": {name: scan_log(workdir / f"{name}.log") for name in ("agent", "ingest")},
    }
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(args, soak, final, extra))
    document = {
        "seed": args.seed,
        "args": vars(args),
        "faults": [asdict(f) for f in soak.faults],
        "samples": [asdict(s) for s in soak.samples],
        "final": final,
        "summary": extra,
        "rss_slope_mib_per_h": rss_slope(soak.samples, args.warmup)[:2],
    }
    await asyncio.to_thread(Path(args.json).write_text, json.dumps(document, indent=1) + "\n")
    print(f"  results written to {args.json}")


if __name__ == "__main__":
    uvloop.run(main())
