"""Report by exception: deadband, heartbeat, quality transitions (pure, time passed in); the
commit before publishing, which a poller does not wait for."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from agent.daemon.pipeline import Pipeline, TagFilter
from drivers.base import Reading
from sync.events import Event
from sync.outbox.store import OnCommit, OutboxUnavailable
from tests.fixtures.ports import async_wait_until
from tests.fixtures.sinks import RecordingSink


def good(value: object, ts: float = 0.0) -> Reading:
    return Reading("t", value, "good", ts)  # type: ignore[arg-type]


def bad(reason: str = "timeout") -> Reading:
    return Reading("t", None, "bad", 0.0, reason)


# (deadband, [(monotonic time, reading)], expected publish decisions)
CASES = [
    ("first value", None, [(0, good(1))], [True]),
    ("unchanged", None, [(0, good(1)), (1, good(1)), (2, good(1))], [True, False, False]),
    ("changed", None, [(0, good(1)), (1, good(2))], [True, True]),
    (
        "inside deadband",
        0.5,
        [(0, good(20.0)), (1, good(20.4)), (2, good(19.6))],
        [True, False, False],
    ),
    ("outside deadband", 0.5, [(0, good(20.0)), (1, good(20.6))], [True, True]),
    (
        "deadband from last published",
        0.5,
        [(0, good(20.0)), (1, good(20.3)), (2, good(20.6))],
        [True, False, True],
    ),
    (
        "heartbeat",
        None,
        [(0, good(1)), (59, good(1)), (60, good(1)), (61, good(1))],
        [True, False, True, False],
    ),
    (
        "bad once per transition",
        None,
        [(0, good(1)), (1, bad()), (2, bad()), (3, bad())],
        [True, True, False, False],
    ),
    ("recovery publishes", None, [(0, bad()), (1, bad()), (2, good(1))], [True, False, True]),
    ("no heartbeat while bad", None, [(0, bad()), (100, bad())], [True, False]),
    ("type change", None, [(0, good(1)), (1, good("1"))], [True, True]),
    ("bool flip", None, [(0, good(False)), (1, good(True))], [True, True]),
    ("deadband ignores strings", 5.0, [(0, good("a")), (1, good("b"))], [True, True]),
    (
        "uncertain is a change",
        None,
        [(0, good(1)), (1, Reading("t", 1, "uncertain", 0.0))],
        [True, True],
    ),
]


@pytest.mark.parametrize(
    ("deadband", "steps", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_tag_filter(
    deadband: float | None, steps: list[tuple[float, Reading]], expected: list[bool]
) -> None:
    tag_filter = TagFilter(deadband, max_interval=60.0)
    assert [tag_filter.offer(reading, now) for now, reading in steps] == expected


def test_heartbeat_due() -> None:
    tag_filter = TagFilter(None, max_interval=10.0)
    tag_filter.offer(good(1), 0.0)
    assert not tag_filter.heartbeat_due(9.9)
    assert tag_filter.heartbeat_due(10.0)
    tag_filter.offer(bad(), 11.0)
    assert not tag_filter.heartbeat_due(100.0)


class HeldCommits:
    """A Durable whose commits return only when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[list[Event], OnCommit]] = []
        self.full = False
        self.room_waits = 0
        self._room = asyncio.Event()

    def submit(self, events: Sequence[Event], on_commit: OnCommit) -> None:
        self.pending.append((list(events), on_commit))

    async def room(self) -> None:
        while self.full:
            self.room_waits += 1
            self._room.clear()
            await self._room.wait()

    def free(self) -> None:
        self.full = False
        self._room.set()


async def test_pipeline_does_not_wait_for_the_commit_but_publishes_only_after_it() -> None:
    published: list[Event] = []
    observed: list[int] = []
    durable = HeldCommits()
    pipeline = Pipeline(sinks=[RecordingSink(published.extend)], durable=durable)
    pipeline.configure_tag("press", "t", deadband=None, max_interval=60.0)
    pipeline.add_observer(lambda device, readings: observed.append(len(readings)))
    # Three polls return at once although nothing is committed yet (issue #22).
    await pipeline.submit("press", [good(1, ts=100.0), Reading("unknown", 1, "good", 100.0)])
    await pipeline.submit("press", [good(2, ts=101.0)])
    await pipeline.submit("press", [good(3, ts=102.0)])
    assert observed == [2, 1, 1]  # observers see every reading at once
    assert published == []
    assert len(durable.pending) == 3
    # The second commit returns first: nothing is published ahead of the first.
    durable.pending[1][1](None)
    assert published == []
    durable.pending[0][1](None)
    assert [event.value for event in published] == [1, 2]
    # A refused commit is not published, and its tag is offered again on the next reading.
    durable.pending[2][1](OutboxUnavailable("disk full"))
    assert [event.value for event in published] == [1, 2]
    assert pipeline.durable_down
    await pipeline.submit("press", [good(3, ts=103.0)])
    durable.pending[3][1](None)
    assert [event.value for event in published] == [1, 2, 3]
    assert not pipeline.durable_down
    await pipeline.settle()  # everything emitted is settled
    # A full commit queue makes the poller wait (bounded memory), and only then.
    durable.full = True
    waiting = asyncio.create_task(pipeline.submit("press", [good(4, ts=104.0)]))
    await async_wait_until(lambda: durable.room_waits == 1, message="the poller waits")
    assert len(durable.pending) == 4
    durable.free()
    await waiting
    assert len(durable.pending) == 5


async def test_reconfigure_keeps_last_state() -> None:
    published: list[Event] = []
    pipeline = Pipeline(sinks=[RecordingSink(published.extend)], clock=lambda: 0.0)
    pipeline.configure_tag("d", "t", deadband=None, max_interval=60.0)
    await pipeline.submit("d", [good(5)])
    pipeline.configure_tag("d", "t", deadband=1.0, max_interval=60.0)
    await pipeline.submit("d", [good(5)])
    assert len(published) == 1


@pytest.mark.parametrize(
    "value",
    [0, -5, 2**63, 1.5, -0.1, 1e300, True, False, None, "text", 'q"uote', [1, 2], float("nan")],
)
def test_sample_payload_fast_path_is_plain_json(value: object) -> None:
    import json

    from sync.events import dumps, json_safe
    from sync.uplink.topics import sample_payload

    payload = sample_payload(1764367835.123, value, "good")
    assert payload == dumps(
        {"ts": "2025-11-28T22:10:35.123Z", "value": json_safe(value), "quality": "good"}
    )
    assert json.loads(payload)["quality"] == "good"
