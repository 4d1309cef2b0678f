"""Files only the agent's user may read, whatever the umask (docs/install.md, "File modes").

A file is created 0600 and a directory 0700, and the new name is made durable (an fsync of the
directory it was created in): after a power cut a directory or file created here is there,
or the call had not returned (docs/reliability.md). A file found with a wider mode is tightened
to its owner's bits, logged once (when it happens). An existing directory keeps its mode: it
may be a configured path that is not ours alone (the shipped unit makes the data directory 0750
with StateDirectoryMode=), and the files in it are private anyway.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("edge_agent.files")

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
# SQLite creates these beside a database with the database file's own mode (os_unix.c,
# findCreateFileMode): a database created 0600 keeps its journal and WAL 0600 too.
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> None:
    """Create `path` and its missing parents 0700 (an existing directory keeps its mode)."""
    missing: list[Path] = []
    current = path
    while not current.is_dir() and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # created meanwhile by someone else
        os.chmod(directory, PRIVATE_DIR)  # the umask only removes bits; make it exact
        fsync_directory(directory.parent)


def private_file(path: Path) -> None:
    """Create `path` empty and 0600 when absent; tighten it to its owner's bits otherwise."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE)
    except FileExistsError:
        _tighten(path)
        return
    try:
        os.fchmod(fd, PRIVATE_FILE)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make the names in directory `path` durable (a new or renamed entry is not, until then)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (0600): staged, fsynced, renamed, directory fsynced."""
    staged = path.with_name(f".{path.name}.staged")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(staged, path)
    fsync_directory(path.parent)


def private_database(path: Path) -> None:
    """An SQLite database file 0600 before SQLite opens it, and its existing sidecars too."""
    private_file(path)
    for suffix in SQLITE_SIDECARS:
        sidecar = path.with_name(path.name + suffix)
        if sidecar.exists():
            _tighten(sidecar)


def _tighten(path: Path) -> None:
    """Take the group's and others' bits off `path`'s mode when it has any; log when it did."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return
    tight = mode & 0o700
    try:
        os.chmod(path, tight)
    except OSError as exc:
        log.warning("%s has mode %04o and cannot be tightened: %s", path, mode, exc)
        return
    log.warning("%s had mode %04o; tightened to %04o", path, mode, tight)
