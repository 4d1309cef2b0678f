"""Outbox accept rate: events/s through `Outbox.append` (WAL, synchronous=FULL, group commit)
from concurrent producers, beside raw `sqlite3` executemany of the same rows in 1,000-row
transactions measured in the same run.

    python bench/outbox_accept.py [--quick] [--producers 10] [--batch 100] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.line_scale import RAW_INSERT, raw_events_db
from sync.events import Event
from sync.outbox.codec import encode_event
from sync.outbox.store import Outbox


def make_events(producer: int, batch: int) -> list[Event]:
    """One producer's list of sample events (a poll cycle of `batch` tags)."""
    now = time.time()
    return [
        Event(now + i * 1e-3, "sample", f"device{producer}", f"tag{i}", 20.0 + i * 0.25, "good")
        for i in range(batch)
    ]


async def outbox_rate(
    path: Path, producers: int, batch: int, seconds: float
) -> tuple[int, float, int]:
    """Accepted events, elapsed seconds and commits of `producers` appending for `seconds`."""
    lists = [make_events(k, batch) for k in range(producers)]
    accepted = 0
    async with Outbox(path, max_size=8 << 30) as outbox:
        # Warm-up: the first commits create the tables' pages.
        await asyncio.gather(*(outbox.append(items) for items in lists))
        commits = outbox.commits
        deadline = time.perf_counter() + seconds

        async def produce(items: list[Event]) -> None:
            nonlocal accepted
            while time.perf_counter() < deadline:
                await outbox.append(items)
                accepted += len(items)

        started = time.perf_counter()
        await asyncio.gather(*(produce(items) for items in lists))
        elapsed = time.perf_counter() - started
        return accepted, elapsed, outbox.commits - commits


def raw_rate(path: Path, producers: int, batch: int, events: int) -> tuple[int, float]:
    """Rows and seconds of plain sqlite3 executemany, 1,000 rows per transaction."""
    rows = [encode_event(event) for k in range(producers) for event in make_events(k, batch)]
    db = raw_events_db(path)
    try:
        seq = 0
        started = time.perf_counter()
        while seq < events:
            chunk = []
            for _ in range(1000):
                row = rows[seq % len(rows)]
                seq += 1
                chunk.append((seq, *row))
            db.execute("BEGIN")
            db.executemany(RAW_INSERT, chunk)
            db.execute("COMMIT")
        return seq, time.perf_counter() - started
    finally:
        db.close()


def main() -> None:
    """Run both measurements and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    parser.add_argument("--producers", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100, help="events per append")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
    with tempfile.TemporaryDirectory(prefix="outbox-bench-") as tmp:
        accepted, elapsed, commits = uvloop.run(
            outbox_rate(Path(tmp) / "outbox.db", args.producers, args.batch, seconds)
        )
        rate = accepted / elapsed
        raw_events = max(1000, min(int(rate * seconds), 2_000_000))
        raw_rows, raw_elapsed = raw_rate(
            Path(tmp) / "raw.db", args.producers, args.batch, raw_events
        )
    raw = raw_rows / raw_elapsed
    print(f"outbox accept, synchronous=FULL: {rate:12,.0f} events/s")
    print(f"  {args.producers} producers x {args.batch}-event appends, {elapsed:.1f} s")
    print(f"  {commits:,} commits, {accepted / max(commits, 1):,.0f} events per commit")
    print(f"raw sqlite3 executemany, 1,000-row transactions: {raw:12,.0f} rows/s")
    print(f"ratio outbox / raw: {rate / raw:.2f}")


if __name__ == "__main__":
    main()
