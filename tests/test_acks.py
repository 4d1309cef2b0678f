"""Which S/ack messages the forwarder believes (sync/uplink/acks.py): table tests."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from sync.mqtt.client import Message
from sync.uplink.acks import FOREIGN_STREAMS, AckCheck

STREAM = str(uuid.uuid4())
TOPIC = "edge/gw1/ack"


def ack(stream: object, acked: object) -> Message:
    return Message(TOPIC, json.dumps({"stream": stream, "acked_seq": acked}).encode(), 1, False)


def check(
    message: Message, *, sent: int = 100, committed: int = 100
) -> tuple[int | None, AckCheck]:
    acks = AckCheck()
    return acks.accepted_seq(
        message, stream=STREAM, sent_up_to=sent, committed_at_start=committed
    ), acks


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (ack(STREAM, 40), 40),
        (ack(STREAM, 100), 100),  # exactly the last seq sent
        (ack(STREAM.upper(), 40), 40),  # the same UUID, other spellings
        (ack("{" + STREAM + "}", 40), 40),
        (ack("urn:uuid:" + STREAM, 40), 40),
        (ack(STREAM, 101), None),  # beyond anything sent
        (ack(STREAM, 2**63 - 1), None),
        (ack(str(uuid.uuid4()), 40), None),  # another stream
        (ack(STREAM, -1), None),
        (ack(STREAM, True), None),
        (ack(STREAM, "40"), None),
        (ack("not a uuid", 40), None),
        (ack(None, 40), None),
        (Message(TOPIC, b"{", 1, False), None),
        (Message(TOPIC, b"[]", 1, False), None),
        (Message(TOPIC, b'{"acked_seq": 1}', 1, False), None),
    ],
)
def test_only_our_stream_up_to_the_last_seq_sent_is_applied(
    message: Message, expected: int | None
) -> None:
    assert check(message)[0] == expected


def test_an_ack_beyond_everything_raises_one_alarm_per_burst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.forwarder")
    acks = AckCheck()
    for _ in range(5):
        assert (
            acks.accepted_seq(
                ack(STREAM, 10**9), stream=STREAM, sent_up_to=100, committed_at_start=100
            )
            is None
        )
    assert acks.counts.refused == 5
    alarm = acks.take_alarm()
    assert alarm is not None
    assert alarm.kind == "alarm"
    assert "nothing was deleted" in alarm.value["message"]
    assert acks.take_alarm() is None  # once
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1


def test_a_late_ack_from_before_a_restart_deletes_nothing_and_alarms_nobody(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.forwarder")
    acks = AckCheck()
    # The process before the restart committed (and may have sent) up to 500; this one has
    # sent up to 100 so far.
    for acked in (300, 500):
        assert (
            acks.accepted_seq(
                ack(STREAM, acked), stream=STREAM, sent_up_to=100, committed_at_start=500
            )
            is None
        )
    assert acks.counts.stale == 2
    assert acks.counts.refused == 0
    assert acks.take_alarm() is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (
        acks.accepted_seq(ack(STREAM, 501), stream=STREAM, sent_up_to=100, committed_at_start=500)
        is None
    )
    assert acks.counts.refused == 1


def test_foreign_streams_are_remembered_up_to_a_bound(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.forwarder")
    acks = AckCheck()
    for _ in range(FOREIGN_STREAMS * 3):
        acks.accepted_seq(
            ack(str(uuid.uuid4()), 1), stream=STREAM, sent_up_to=100, committed_at_start=100
        )
    assert acks.counts.foreign == FOREIGN_STREAMS * 3
    assert len(caplog.records) == FOREIGN_STREAMS  # each remembered one logged once, then quiet


@pytest.mark.parametrize(
    ("acked", "sent", "committed_at_start", "expected", "stale", "refused"),
    [
        (100, 100, 0, 100, 0, 0),
        (150, 150, 0, 150, 0, 0),  # the caller's `sent`: the last seq sent or dropped after it
        (151, 150, 0, None, 0, 1),
        (151, 150, 200, None, 1, 0),  # sent by the process before a restart
    ],
)
def test_judge(
    acked: int, sent: int, committed_at_start: int, expected: int | None, stale: int, refused: int
) -> None:
    acks = AckCheck()
    verdict = acks.judge(acked, TOPIC, sent_up_to=sent, committed_at_start=committed_at_start)
    assert verdict == expected
    assert (acks.counts.stale, acks.counts.refused) == (stale, refused)
