"""Power cuts while the Sparkplug node takes bdSeq numbers (issue #25: "the Sparkplug bdSeq,
which must never be reused after a cut"): a number handed out for a CONNECT (a broker may hold
an NDEATH with it as the Will) is never handed out again by the next start on the surviving
files (sync/sparkplug/bdseq.py writes it durably before handing it out)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from sync.files import private_dir
from sync.sparkplug.bdseq import BdSeq
from tests.fixtures.powercut import Forked, PowerCutDisk, fuse_available

pytestmark = pytest.mark.skipif(not fuse_available(), reason="no usable /dev/fuse and fuse3")

CUTS = 10


def take_forever(data: Path, handed_out: int) -> None:
    """A node reconnecting over and over: each number taken is reported on the pipe."""
    numbers = BdSeq(data)
    while True:
        os.write(handed_out, bytes((numbers.take(),)))


def test_a_bdseq_handed_out_is_never_handed_out_again_after_a_cut(tmp_path: Path) -> None:
    rng = random.Random(23)
    with PowerCutDisk(tmp_path / "backing", tmp_path / "mnt", tmp_path / "fs.log") as disk:
        data = disk.mountpoint / "data"
        private_dir(data)  # as the agent makes its data directory: durably
        for number in range(CUTS):
            read_end, write_end = os.pipe()
            child = Forked(lambda end=write_end: take_forever(data, end))  # type: ignore[misc]
            os.close(write_end)
            disk.wait_a_moment(rng.uniform(0.05, 0.3))
            disk.cut(child, writeback=rng.choice((0.0, 0.5)), seed=number)
            handed = b""
            while chunk := os.read(read_end, 65536):
                handed += chunk
            os.close(read_end)
            assert handed, f"cut {number}: the child took no number before the cut"
            disk.mount()
            after = BdSeq(data).take()  # the restart on the surviving files
            last = handed[-1]
            # The file holds the last number handed out, or the one being written at the cut.
            assert after in ((last + 1) % 256, (last + 2) % 256), (number, last, after)
