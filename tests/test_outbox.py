"""sync.outbox.store.Outbox on real SQLite files: seqs, group commit, cap and gap events, corruption
recovery, disk full, acks, and the coverage rule of read_batch."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync.events import Event, rfc3339
from sync.outbox import database as database_module
from sync.outbox import writer as writer_module
from sync.outbox.codec import StoredEvent
from sync.outbox.store import Outbox, OutboxFull, OutboxUnavailable
from tests.fixtures.modes import modes_under, umask, wider_than_private
from tests.fixtures.ports import async_wait_until

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def sample(i: int, size: int = 0) -> Event:
    value: object = float(i) if not size else "x" * size
    return Event(1_700_000_000.0 + i / 1000, "sample", "press1", "temperature", value, "good")


def state(i: int) -> Event:
    return Event(1_700_000_000.0 + i / 1000, "state", "press1", None, {"state": i % 3}, None)


async def read_all(
    outbox: Outbox, *, max_events: int = 500
) -> list[tuple[int, int, list[StoredEvent]]]:
    """Every batch from the acked seq on: (first_seq, last_seq, events)."""
    batches: list[tuple[int, int, list[StoredEvent]]] = []
    after = outbox.acked_seq
    while True:
        batch = await outbox.read_batch(after, max_events, 1 << 20)
        if not batch.events:
            assert batch.last_seq == batch.first_seq - 1
            return batches
        batches.append((batch.first_seq, batch.last_seq, list(batch.events)))
        after = batch.last_seq


async def stored(outbox: Outbox) -> list[StoredEvent]:
    return [event for _, _, events in await read_all(outbox) for event in events]


async def fill_until_failure(
    outbox: Outbox, events: Callable[[int], list[Event]], attempts: int = 1000
) -> OutboxUnavailable:
    """Append until an append fails; return its error."""
    for i in range(attempts):
        try:
            await outbox.append(events(i))
        except OutboxUnavailable as exc:
            return exc
    raise AssertionError(f"{attempts} appends all succeeded")


# -- seqs ----------------------------------------------------------------------------------------


async def test_seqs_are_gapless_and_survive_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path, max_size=1 << 30) as outbox:
        stream = outbox.stream
        assert (outbox.committed_seq, outbox.acked_seq, outbox.events_count) == (0, 0, 0)
        assert outbox.oldest_unacked_ts is None
        assert await outbox.append([sample(1), sample(2)]) == (1, 2)
        assert await outbox.append([state(3)]) == (3, 3)
        assert outbox.oldest_unacked_ts == sample(1).ts
    async with Outbox(path, max_size=1 << 30) as outbox:
        assert outbox.stream == stream
        assert outbox.committed_seq == 3
        assert await outbox.append([sample(4)]) == (4, 4)
        events = await stored(outbox)
        assert [e.seq for e in events] == [1, 2, 3, 4]
        assert events[2].kind == "state"
        assert events[2].value == {"state": 0}
        assert events[0].to_event() == sample(1)
        assert outbox.events_count == 4


async def test_seqs_never_reused_after_everything_was_acked(tmp_path: Path) -> None:
    # The table empties completely: a rowid-based seq would start again at 1 here.
    path = tmp_path / "outbox.db"
    async with Outbox(path, max_size=1 << 30) as outbox:
        await outbox.append([sample(i) for i in range(10)])
        assert await outbox.ack(outbox.stream, 10)
        assert outbox.events_count == 0
    async with Outbox(path, max_size=1 << 30) as outbox:
        assert await outbox.append([sample(11)]) == (11, 11)


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import uvloop
    from sync.events import Event
    from sync.outbox.store import Outbox

    async def main() -> None:
        path = Path(sys.argv[1])
        async with Outbox(path, max_size=1 << 30, commit_interval=0.005, ack_delay=0.01) as outbox:
            async def producer(k: int) -> None:
                i = 0
                while True:
                    i += 1
                    events = [Event(1.7e9 + i, "sample", "d", f"t{k}", i, "good")] * (1 + i % 7)
                    first, last = await outbox.append(events)
                    print(first, last, flush=True)

            async def submitter() -> None:  # the pipeline's way: not awaiting the commit
                while True:
                    await outbox.room()
                    outbox.submit([Event(1.7e9, "sample", "d", "s", 1, "good")] * 5, print)
                    await asyncio.sleep(0.001)

            async def acker() -> None:  # acks taken lazily, as the forwarder does
                while True:
                    await asyncio.sleep(0.01)
                    if outbox.committed_seq > 50:
                        outbox.take_ack(outbox.stream, outbox.committed_seq - 50)
                        print("ack", outbox.acked_seq, flush=True)

            await asyncio.gather(*(producer(k) for k in range(3)), submitter(), acker())

    uvloop.run(main())
    """
)


async def test_kill_9_loses_no_committed_seq_nor_unacked_one_and_reuses_none(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(path),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
    )
    reported: list[tuple[int, int]] = []
    try:
        assert proc.stdout is not None
        taken: list[int] = []

        def parse(line: bytes) -> None:
            words = line.split()
            if words[0] == b"ack":
                taken.append(int(words[1]))
            elif words[0] != b"None":  # a submitted append committed
                first, last = map(int, words)
                reported.append((first, last))

        while len(reported) < 400 or len(taken) < 10:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, "writer exited early"
            parse(line)
        proc.send_signal(signal.SIGKILL)  # mid-stream: appends are queued and committing
        await asyncio.wait_for(proc.wait(), 10)
        # Lines written before the kill are also committed: read them too (not the last one
        # if the kill cut it).
        for line in (await proc.stdout.read()).split(b"\n")[:-1]:
            parse(line)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    highest_reported = max(last for _, last in reported)
    async with Outbox(path, max_size=1 << 30) as outbox:
        seqs = [event.seq for event in await stored(outbox)]
        # Gapless above the persisted watermark, which no ack taken exceeded (an ack taken but
        # not yet deleted is lost: its events are resent); every seq the writer was told was
        # committed is there.
        assert 0 < outbox.acked_seq <= max(taken)
        assert seqs == list(range(outbox.acked_seq + 1, outbox.committed_seq + 1))
        assert outbox.committed_seq >= highest_reported
        assert min(first for first, _ in reported) >= 1
        before = outbox.committed_seq
        assert await outbox.append([sample(0)]) == (before + 1, before + 1)


# -- group commit ---------------------------------------------------------------------------------


async def test_concurrent_appends_share_few_transactions(tmp_path: Path) -> None:
    async with Outbox(
        tmp_path / "outbox.db", max_size=1 << 30, commit_interval=0.2, commit_max_events=10_000
    ) as outbox:
        commits = outbox.commits
        results = await asyncio.gather(
            *(outbox.append([sample(i * 5 + k) for k in range(5)]) for i in range(300))
        )
        # 1,500 events from 300 appends: grouped into one transaction (two if the interval
        # expired in between), instead of 300 fsyncs.
        assert outbox.commits - commits <= 2
        ranges = sorted(results)
        assert ranges[0][0] == 1
        assert ranges[-1][1] == 1500
        assert all(last - first == 4 for first, last in ranges)
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges))


@pytest.mark.parametrize("disk", ["quick", "slow", "large", "sqlite not serialized"])
async def test_a_group_commit_is_one_transaction_on_the_loop_or_one_call_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disk: str
) -> None:
    # BEGIN, the inserts, the seq counter, the cap's measure and COMMIT: one transaction, with
    # the acks taken riding along. While commits are quick a small one runs on the event loop
    # itself: no round trip to aiosqlite's thread at all (each costs two wake-ups, ~100 µs of
    # CPU on a small VM, issue #22). After an on-loop commit slower than the budget, for a
    # group larger than LOOP_MAX_ROWS, or where SQLite is not built serialized (the connection
    # then must not be shared between threads), it is ONE call to the thread, never four.
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 30, ack_delay=60.0) as outbox:
        await outbox.append([sample(i) for i in range(10)])
        if disk == "quick":  # whatever this host's disk: no commit counts as slow
            monkeypatch.setattr(database_module, "LOOP_BUDGET", 3600.0)
            outbox._database._on_loop_from = 0.0
        if disk == "slow":
            monkeypatch.setattr(database_module, "LOOP_BUDGET", 0.0)
            await outbox.append([sample(10)])  # on the loop, and "slower" than the budget
        if disk == "large":
            monkeypatch.setattr(writer_module, "LOOP_MAX_ROWS", 20)
        if disk == "sqlite not serialized":
            monkeypatch.setattr(database_module, "SERIALIZED", False)
        db = outbox._db
        assert db is not None
        calls: list[object] = []
        execute = db._execute

        async def counting(fn: Callable[..., object], *args: object) -> object:
            calls.append(fn)
            return await execute(fn, *args)

        db._execute = counting  # type: ignore[method-assign]
        assert outbox.take_ack(outbox.stream, 5)
        assert calls == []  # taken in memory
        commits, count = outbox.commits, outbox.events_count
        await asyncio.gather(*(outbox.append([sample(100 + i)]) for i in range(50)))
        assert len(calls) == (0 if disk == "quick" else 1)
        assert outbox.commits == commits + 1
        assert outbox.events_count == count + 50 - 5  # the 5 acked rows went in that transaction
        assert (await stored(outbox))[0].seq == 6


async def test_the_loop_takes_small_commits_again_after_the_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow disk sends commits to the thread for LOOP_PAUSE only: a disk that was slow once
    # (a WAL checkpoint) does not lose the cheap path for good.
    monkeypatch.setattr(database_module, "LOOP_BUDGET", 0.0)
    monkeypatch.setattr(database_module, "LOOP_PAUSE", 3600.0)
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 30) as outbox:
        database = outbox._database
        await outbox.append([sample(0)])  # on the loop, "slow": the pause starts
        assert database._on_loop_from > time.monotonic() + 3000
        threads: set[int] = set()
        transact = database.transact

        async def recording(work: Callable[..., T], failure: str, *, small: bool = False) -> T:
            def traced(connection: object) -> T:
                threads.add(threading.get_ident())
                return work(connection)

            return await transact(traced, failure, small=small)

        monkeypatch.setattr(database, "transact", recording)
        await outbox.append([sample(1)])
        assert threads  # on the thread:
        assert threading.get_ident() not in threads
        threads.clear()
        database._on_loop_from = time.monotonic()  # the pause is over
        monkeypatch.setattr(database_module, "LOOP_BUDGET", 10.0)
        await outbox.append([sample(2)])
        assert threads == {threading.get_ident()}  # back on the event loop
        assert [event.value for event in await stored(outbox)] == [0.0, 1.0, 2.0]


async def test_group_is_cut_at_commit_max_events(tmp_path: Path) -> None:
    async with Outbox(
        tmp_path / "outbox.db", max_size=1 << 30, commit_interval=5.0, commit_max_events=100
    ) as outbox:
        started = time.monotonic()
        commits = outbox.commits
        # 10 x 10 events reach commit_max_events: no waiting for the 5 s interval.
        await asyncio.gather(*(outbox.append([sample(i)] * 10) for i in range(10)))
        assert time.monotonic() - started < 4.0
        assert outbox.commits - commits == 1


async def test_close_commits_pending_appends(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path, max_size=1 << 30, commit_interval=5.0) as outbox:
        tasks = [asyncio.create_task(outbox.append([sample(i)])) for i in range(20)]
        await asyncio.sleep(0)  # let the appends queue
    assert sorted(task.result() for task in tasks) == [(i, i) for i in range(1, 21)]
    with pytest.raises(OutboxUnavailable):
        await outbox.append([sample(0)])
    async with Outbox(path, max_size=1 << 30) as outbox:
        assert outbox.committed_seq == 20


async def test_cancellation_propagates_and_releases_the_file(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    appended = asyncio.Event()

    async def owner() -> None:
        async with Outbox(path, max_size=1 << 30) as outbox:
            while True:
                await outbox.append([sample(0)])
                appended.set()

    task = asyncio.create_task(owner())
    await asyncio.wait_for(appended.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The connection was closed: the exclusive lock is gone, the data consistent.
    async with Outbox(path, max_size=1 << 30) as outbox:
        assert [e.seq for e in await stored(outbox)] == list(range(1, outbox.committed_seq + 1))


async def test_a_second_outbox_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path, max_size=1 << 30) as outbox:
        await outbox.append([sample(0)])
        with pytest.raises(OutboxUnavailable, match="locked"):
            async with Outbox(path, max_size=1 << 30):
                pass
        assert await outbox.append([sample(1)]) == (2, 2)


async def test_rejects_bad_events_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_size"):
        Outbox(tmp_path / "x.db", max_size=10)
    with pytest.raises(ValueError, match="commit_interval"):
        Outbox(tmp_path / "x.db", max_size=1 << 20, commit_interval=0)
    with pytest.raises(ValueError, match="commit_max_events"):
        Outbox(tmp_path / "x.db", max_size=1 << 20, commit_max_events=0)
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 20) as outbox:
        with pytest.raises(ValueError, match="kind"):
            await outbox.append([Event(1.0, "bogus")])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="ts"):
            await outbox.append([Event(math.nan, "sample")])
        with pytest.raises(ValueError, match="JSON"):
            await outbox.append([Event(1.0, "sample", value=object())])
        with pytest.raises(ValueError, match="at least one"):
            await outbox.append([])
        assert outbox.committed_seq == 0
        await outbox.append(
            [Event(1.0, "sample", value=math.inf), Event(2.0, "alarm", value=[1.5, math.nan])]
        )
        values = [event.value for event in await stored(outbox)]
        assert values == [None, [1.5, None]]


# -- cap and gap events ---------------------------------------------------------------------------


CAP = 256 * 1024


async def test_cap_drops_oldest_samples_only_and_records_exact_gaps(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    wal = tmp_path / "outbox.db-wal"
    largest = 0
    kinds: dict[int, str] = {}
    async with Outbox(path, max_size=CAP, commit_interval=0.001) as outbox:
        i = 0
        while outbox.dropped_total < 3000:
            batch = [state(i) if (i + k) % 50 == 0 else sample(i + k, size=100) for k in range(100)]
            first, last = await outbox.append(batch)
            for seq, event in zip(range(first, last + 1), batch, strict=True):
                kinds[seq] = event.kind
            i += 100
            assert outbox.bytes_used <= CAP
            # On disk: the cap, plus the drop headroom and one commit group in the main file,
            # plus the WAL (checkpointed at 1/16 of the cap, at least 64 KiB, plus one group).
            on_disk = path.stat().st_size + wal.stat().st_size
            assert path.stat().st_size <= CAP + 48 * 1024
            assert on_disk <= CAP + 160 * 1024
            largest = max(largest, on_disk)
        events = await stored(outbox)
        present = {event.seq for event in events}
        gaps = [event for event in events if event.kind == "gap"]
        for gap in gaps:
            kinds[gap.seq] = "gap"
        missing = set(range(1, outbox.committed_seq + 1)) - present
        declared: set[int] = set()
        for gap in gaps:
            value = gap.value
            assert value["reason"] == "buffer_full"
            assert (gap.device, gap.tag) == (None, None)
            seqs = {seq for first, last in value["ranges"] for seq in range(first, last + 1)}
            assert len(seqs) == value["count"]
            assert not seqs & declared
            declared |= seqs
            # Every range is below the gap event's own seq.
            assert max(seqs) < gap.seq
        assert declared == missing
        assert len(missing) == outbox.dropped_total
        assert {kinds[seq] for seq in missing} == {"sample"}
        # Every non-sample event is still there.
        assert {seq for seq, kind in kinds.items() if kind != "sample"} <= present
        # The oldest samples went first: every dropped sample is older than every kept one.
        kept_samples = [seq for seq in present if kinds.get(seq) == "sample"]
        assert max(missing) < min(kept_samples)
        dropped = outbox.dropped_total
        assert outbox.events_count == len(events)
        assert largest > CAP  # the cap was really reached on disk
    async with Outbox(path, max_size=CAP) as outbox:
        assert outbox.dropped_total == dropped


async def test_read_batch_never_claims_a_dropped_seq(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "outbox.db", max_size=CAP, commit_interval=0.001) as outbox:
        i = 0
        while outbox.dropped_total == 0:
            await outbox.append([sample(i + k, size=200) for k in range(50)] + [state(i)])
            i += 51
        # A lease that has already sent seq 1..5 continues at the first seq still there: 6..
        # were dropped, and a batch claims only seqs it carries (docs/topics.md).
        batch = await outbox.read_batch(5, 10, 1 << 20)
        assert batch.first_seq == batch.events[0].seq > 6
        batches = await read_all(outbox, max_events=37)
        claimed: set[int] = set()
        declared: set[int] = set()
        for first, last, events in batches:
            assert [e.seq for e in events] == list(range(first, last + 1))  # a run, all there
            claimed.update(range(first, last + 1))
            for event in events:
                if event.kind == "gap":
                    for low, high in event.value["ranges"]:
                        declared.update(range(low, high + 1))
        # Every seq is carried by a batch or declared dropped by a gap event, never both.
        assert claimed | declared == set(range(1, outbox.committed_seq + 1))
        assert not claimed & declared


async def test_read_batch_cuts_by_bytes_and_sends_a_large_event_alone(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 24) as outbox:
        await outbox.append(
            [sample(i, size=300) for i in range(10)] + [sample(10, size=5000), sample(11)]
        )
        batch = await outbox.read_batch(0, 1000, 1000)
        assert batch.wire_size <= 1000
        assert len(batch.events) == 2
        assert batch.wire_size == len(b",".join(batch.wire_events))
        big = await outbox.read_batch(10, 1000, 1000)
        assert [e.seq for e in big.events] == [11]
        assert big.wire_size > 5000
        decoded = json.loads(big.wire_events[0])
        assert decoded == {
            "seq": 11,
            "ts": rfc3339(sample(10).ts),
            "kind": "sample",
            "device": "press1",
            "tag": "temperature",
            "value": "x" * 5000,
            "quality": "good",
        }


async def test_full_of_non_samples_refuses_appends(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "outbox.db", max_size=64 * 1024, commit_interval=0.001) as outbox:
        error = await fill_until_failure(
            outbox, lambda i: [Event(float(i), "state", "m", None, "y" * 500)]
        )
        assert isinstance(error, OutboxFull)
        assert "no sample events" in str(error)
        assert outbox.append_failures == 1
        count = outbox.events_count
        assert len(await stored(outbox)) == count
        assert outbox.dropped_total == 0


# -- corruption ------------------------------------------------------------------------------------


async def make_outbox(path: Path, events: int) -> str:
    async with Outbox(path, max_size=1 << 24) as outbox:
        await outbox.append([sample(i, size=50) for i in range(events)])
        await outbox.ack(outbox.stream, 10)
        return outbox.stream


async def test_corrupt_header_is_moved_aside_and_a_new_stream_starts(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    old_stream = await make_outbox(path, 100)
    with path.open("r+b") as file:
        file.write(b"garbage!" * 16)  # overwrite the SQLite header
    async with Outbox(path, max_size=1 << 24) as outbox:
        assert outbox.stream != old_stream
        assert outbox.committed_seq == 1
        moved = outbox.recovered_from
        assert moved is not None
        assert moved.startswith("outbox.db.corrupt-")
        assert (tmp_path / moved).read_bytes()[:8] == b"garbage!"  # kept for forensics
        (gap,) = await stored(outbox)
        assert (gap.seq, gap.kind, gap.device, gap.tag) == (1, "gap", None, None)
        assert gap.value["reason"] == "corruption_recovery"
        assert gap.value["moved_to"] == moved
        assert gap.value["previous_stream"] is None  # unreadable
        assert gap.value["ranges"] == []
        assert gap.value["count"] == 0
        assert await outbox.append([sample(1)]) == (2, 2)
    # Corrupt again within the same second: the first forensic copy is not overwritten.
    with path.open("r+b") as file:
        file.write(b"garbage!" * 16)
    async with Outbox(path, max_size=1 << 24) as outbox:
        again = outbox.recovered_from
        assert again is not None
        assert again != moved
    assert (tmp_path / moved).exists()
    assert (tmp_path / again).exists()


async def test_corrupt_page_is_detected_by_quick_check(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    old_stream = await make_outbox(path, 2000)
    page = 4096
    assert path.stat().st_size > 20 * page
    with path.open("r+b") as file:
        file.seek(12 * page)  # a page of the events table; meta (page 2) stays readable
        file.write(bytes(range(256)) * 16)
    async with Outbox(path, max_size=1 << 24) as outbox:
        assert outbox.stream != old_stream
        (gap,) = await stored(outbox)
        assert gap.value["reason"] == "corruption_recovery"
        assert gap.value["previous_stream"] == old_stream
        # Unacknowledged seqs of the previous stream (acked up to 10, committed 2000).
        assert gap.value["ranges"] == [[11, 2000]]
        assert gap.value["count"] == 1990
        assert gap.value["moved_to"] == outbox.recovered_from
    # Reopening the recovered file is a normal open: no second recovery.
    async with Outbox(path, max_size=1 << 24) as outbox:
        assert outbox.recovered_from is None
        assert outbox.committed_seq == 1


async def test_a_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customers (id INTEGER)")
    db.close()
    with pytest.raises(OutboxUnavailable, match="not an outbox"):
        async with Outbox(path, max_size=1 << 20):
            pass


# -- disk full -------------------------------------------------------------------------------------


async def test_disk_full_fails_appends_then_recovers(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 30) as outbox:
        await outbox.append([sample(i, size=100) for i in range(200)])
        committed = outbox.committed_seq
        # Simulate a full disk: the database may not grow by another page. The outbox keeps its
        # one connection private, so the test reaches for it.
        db = outbox._db
        assert db is not None
        (pages,) = next(iter(await db.execute_fetchall("PRAGMA page_count")))
        await db.execute(f"PRAGMA max_page_count = {pages}")
        error = await fill_until_failure(
            outbox, lambda i: [sample(1000 + i, size=1000) for _ in range(20)]
        )
        assert type(error) is OutboxUnavailable
        assert "cannot commit 20 events" in str(error)
        assert "database or disk is full" in str(error)
        failures = outbox.append_failures
        assert failures >= 1
        # A second attempt fails the same way and is counted.
        with pytest.raises(OutboxUnavailable):
            await outbox.append([sample(5000, size=1000) for _ in range(20)])
        assert outbox.append_failures == failures + 1
        # Committed data is intact and readable; seqs did not move on for failed appends.
        events = await stored(outbox)
        assert len(events) == outbox.events_count
        assert [e.seq for e in events] == list(range(1, outbox.committed_seq + 1))
        assert outbox.committed_seq >= committed
        last = outbox.committed_seq
        # Room returns: appends resume by themselves, gapless; the refused events are not lost
        # silently: a gap event that counts them comes first.
        await db.execute("PRAGMA max_page_count = 1073741823")
        assert await outbox.append([sample(6000, size=1000) for _ in range(20)]) == (
            last + 2,
            last + 21,
        )
        gap = next(e for e in await stored(outbox) if e.seq == last + 1)
        assert gap.kind == "gap"
        assert gap.value["reason"] == "append_failed"
        assert gap.value["count"] >= 40  # the append that hit the limit and the retry
        assert gap.value["ranges"] == []
        assert "database or disk is full" in gap.value["detail"]


# -- acks ------------------------------------------------------------------------------------------


async def test_ack_deletes_only_covered_events_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path, max_size=1 << 30) as outbox:
        await outbox.append([sample(i) for i in range(1, 101)])
        assert not await outbox.ack("00000000-0000-0000-0000-000000000000", 100)  # other stream
        assert outbox.acked_seq == 0
        assert await outbox.ack(outbox.stream, 40)
        assert not await outbox.ack(outbox.stream, 30)  # lower: ignored
        assert not await outbox.ack(outbox.stream, 40)  # repeated: ignored
        assert outbox.events_count == 60
        assert outbox.oldest_unacked_ts == sample(41).ts
        assert [e.seq for e in await stored(outbox)] == list(range(41, 101))
        # A lease from before the ack restarts at the watermark.
        batch = await outbox.read_batch(10, 5, 1 << 20)
        assert (batch.first_seq, batch.events[0].seq) == (41, 41)
    async with Outbox(path, max_size=1 << 30) as outbox:
        assert outbox.acked_seq == 40
        assert outbox.events_count == 60
        # An ack beyond what was committed is clamped: nothing uncommitted can be "acked".
        assert await outbox.ack(outbox.stream, 10_000)
        assert outbox.acked_seq == 100
        assert outbox.events_count == 0
        assert outbox.oldest_unacked_ts is None


async def test_acks_taken_are_deleted_lazily_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path, max_size=1 << 30, ack_delay=0.2) as outbox:
        await outbox.append([sample(i) for i in range(1, 101)])
        commits = outbox.commits
        waiter = asyncio.create_task(outbox.wait_acked(30))
        assert outbox.take_ack(outbox.stream, 30)
        assert not outbox.take_ack(outbox.stream, 20)  # lower: ignored
        assert not outbox.take_ack("00000000-0000-0000-0000-000000000000", 90)  # other stream
        # Taken at once: waiters wake and reads start after it; nothing is written yet.
        await asyncio.wait_for(waiter, 5)
        assert outbox.acked_seq == 30
        assert (outbox.events_count, outbox.commits) == (100, commits)
        assert (await outbox.read_batch(0, 5, 1 << 20)).first_seq == 31
        # Nothing appended: deleted in one transaction of their own, ack_delay later.
        await async_wait_until(lambda: outbox.events_count == 70, message="deleted alone")
        assert outbox.commits == commits + 1
        assert outbox.take_ack(outbox.stream, 60)  # left pending: close persists it
    async with Outbox(path, max_size=1 << 30) as outbox:
        assert (outbox.acked_seq, outbox.events_count) == (60, 40)


async def test_wait_acked(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 30) as outbox:
        first, last = await outbox.append([sample(i) for i in range(10)])
        waiter = asyncio.create_task(outbox.wait_acked(last))
        early = asyncio.create_task(outbox.wait_acked(first))
        await outbox.ack(outbox.stream, first)
        await asyncio.wait_for(early, 5)
        assert not waiter.done()
        await outbox.ack(outbox.stream, last)
        await asyncio.wait_for(waiter, 5)
        await outbox.wait_acked(1)  # already acked: returns at once
        never = asyncio.create_task(outbox.wait_acked(last + 1))
        await asyncio.sleep(0)
    with pytest.raises(OutboxUnavailable):
        await never


async def test_commit_listener_is_called(tmp_path: Path) -> None:
    calls: list[int] = []
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 30) as outbox:
        listener = lambda: calls.append(outbox.committed_seq)  # noqa: E731
        outbox.add_commit_listener(listener)
        await outbox.append([sample(1)])
        outbox.remove_commit_listener(listener)
        await outbox.append([sample(2)])
    assert calls == [1]


@given(st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False))
def test_wire_timestamp_is_rfc3339(ts: float) -> None:
    event = StoredEvent(1, ts, "sample", "plc", "t", "1", "good")
    assert json.loads(event.wire())["ts"] == rfc3339(ts)


async def test_batches_from_memory_equal_batches_from_sqlite(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "outbox.db", max_size=1 << 30) as outbox:
        await outbox.append([sample(i) for i in range(300)])
        await outbox.append(
            [Event(time.time(), "state", "m", "state", {"state": "running"}, "good")]
        )
        from_memory = [await outbox.read_batch(after, 50, 1 << 20) for after in (0, 120, 250, 299)]
        outbox._tail.clear()  # force the SQLite path
        from_sqlite = [await outbox.read_batch(after, 50, 1 << 20) for after in (0, 120, 250, 299)]
    assert from_memory == from_sqlite
    assert [b.last_seq for b in from_memory] == [50, 170, 300, 301]


async def test_outbox_files_are_private_whatever_the_umask(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Created 0600 (database, WAL) under umask 022; a wider one is tightened, logged once."""
    path = tmp_path / "outbox.db"
    with umask(0o022):
        async with Outbox(path, max_size=1 << 24) as outbox:
            await outbox.append([sample(1)])
            during = modes_under(tmp_path)
        after = modes_under(tmp_path)
        assert "outbox.db-wal" in during
        assert wider_than_private(during) == {}
        assert wider_than_private(after) == {}

        path.chmod(0o644)
        for _ in range(2):
            with caplog.at_level(logging.WARNING, logger="edge_agent.files"):
                async with Outbox(path, max_size=1 << 24) as outbox:
                    await outbox.append([sample(2)])
        assert wider_than_private(modes_under(tmp_path)) == {}
    tightened = [r.getMessage() for r in caplog.records if "tightened" in r.getMessage()]
    assert tightened == [f"{path} had mode 0644; tightened to 0600"]
