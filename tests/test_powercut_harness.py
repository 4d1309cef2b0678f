"""The power-cut harness itself (tests/fixtures/powercut.py): what survives a cut is exactly what
an fsync covered, SQLite works on it in the outbox's own settings, and ENOSPC comes on demand."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.ports import wait_until
from tests.fixtures.powercut import PowerCutDisk, fuse_available

pytestmark = pytest.mark.skipif(not fuse_available(), reason="no usable /dev/fuse and fuse3")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[PowerCutDisk]:
    with PowerCutDisk(tmp_path / "backing", tmp_path / "mnt", tmp_path / "server.log") as mounted:
        yield mounted


def sleeper() -> subprocess.Popen[bytes]:
    """A process to cut (the agent's stand-in when the test writes the files itself)."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )


def write(path: Path, data: bytes, *, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def survivors(disk: PowerCutDisk, tmp_path: Path) -> dict[str, bytes]:
    out = tmp_path / "out"
    disk.export(out)
    return {
        str(path.relative_to(out)): path.read_bytes() for path in out.rglob("*") if path.is_file()
    }


def test_only_what_an_fsync_covered_survives(disk: PowerCutDisk, tmp_path: Path) -> None:
    mnt = disk.mountpoint
    write(mnt / "named-and-synced", b"A" * 5000, fsync=True)
    write(mnt / "named-not-synced", b"B", fsync=False)
    (mnt / "sub").mkdir()
    fsync_dir(mnt)  # both names and "sub" durable; only the first file's data
    write(mnt / "sub" / "inner", b"C", fsync=True)  # sub's entry never fsynced
    write(mnt / "renamed", b"D", fsync=True)
    fsync_dir(mnt)
    os.replace(mnt / "renamed", mnt / "renamed-later")  # not durable
    write(mnt / "named-and-synced", b"E", fsync=False)  # truncate + write, not durable
    cut = disk.cut(sleeper())
    assert cut.sectors_dropped >= 1
    assert cut.dirs_dropped == 2  # the root (the rename) and sub (inner)
    assert survivors(disk, tmp_path) == {
        "named-and-synced": b"A" * 5000,
        "named-not-synced": b"",
        "renamed": b"D",
    }


def test_writeback_keeps_pending_state(disk: PowerCutDisk, tmp_path: Path) -> None:
    mnt = disk.mountpoint
    write(mnt / "f", b"x" * 4096, fsync=True)
    fsync_dir(mnt)
    write(mnt / "f", b"y" * 4096, fsync=False)
    write(mnt / "g", b"g", fsync=False)
    cut = disk.cut(sleeper(), writeback=1.0)
    assert cut.sectors_kept == 9
    assert cut.dirs_kept == 1
    assert survivors(disk, tmp_path) == {"f": b"y" * 4096, "g": b"g"}


def test_a_remount_serves_the_survivors(disk: PowerCutDisk) -> None:
    mnt = disk.mountpoint
    write(mnt / "kept", b"kept", fsync=True)
    fsync_dir(mnt)
    write(mnt / "lost", b"lost", fsync=True)
    disk.cut(sleeper())
    disk.mount()
    assert sorted(os.listdir(mnt)) == ["kept"]
    assert (mnt / "kept").read_bytes() == b"kept"


def test_sqlite_wal_in_the_outbox_settings(disk: PowerCutDisk, tmp_path: Path) -> None:
    """A writer process commits rows until the cut; every commit it saw return survives."""
    script = f"""
import sqlite3
db = sqlite3.connect({str(disk.mountpoint / "x.db")!r}, isolation_level=None)
db.execute("PRAGMA locking_mode = EXCLUSIVE")
db.execute("PRAGMA journal_mode = WAL")
db.execute("PRAGMA synchronous = FULL")
db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)")
for n in range(1, 1_000_000):
    db.execute("INSERT INTO t VALUES (?)", (n,))
    print(n, flush=True)
"""
    log = tmp_path / "writer.out"
    with log.open("w") as out:
        writer = subprocess.Popen(
            [sys.executable, "-c", script], stdout=out, start_new_session=True
        )

    def committed() -> int:
        text = log.read_text().split()
        return int(text[-1]) if text else 0

    wait_until(lambda: committed() >= 300, timeout=30, message="300 commits")
    disk.cut(writer)
    seen = committed()
    out = tmp_path / "out"
    disk.export(out)
    with sqlite3.connect(out / "x.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        (count,) = db.execute("SELECT count(*) FROM t").fetchone()
    assert seen <= count <= seen + 1  # the one in flight may have been durable


def test_disk_full_on_demand(disk: PowerCutDisk) -> None:
    mnt = disk.mountpoint
    write(mnt / "f", b"x" * 100, fsync=True)
    disk.full(True)
    with pytest.raises(OSError, match="No space") as refused:
        write(mnt / "g", b"y", fsync=False)
    assert refused.value.errno == errno.ENOSPC
    fd = os.open(mnt / "f", os.O_WRONLY)
    try:
        with pytest.raises(OSError, match="No space"):
            os.pwrite(fd, b"z", 0)  # copy-on-write: an overwrite allocates too
        with pytest.raises(OSError, match="No space"):
            os.ftruncate(fd, 200)
    finally:
        os.close(fd)
    assert (mnt / "f").read_bytes() == b"x" * 100
    disk.full(False)
    write(mnt / "g", b"y", fsync=True)
    assert (mnt / "g").read_bytes() == b"y"
