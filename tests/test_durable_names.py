"""Directories and files the agent creates keep their names after a power cut (issue #25): the
data directory, the outbox's and saga log's files before SQLite opens them, the OPC UA pki/."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.powercut import PowerCutDisk, fuse_available

pytestmark = pytest.mark.skipif(not fuse_available(), reason="no usable /dev/fuse and fuse3")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[PowerCutDisk]:
    with PowerCutDisk(tmp_path / "backing", tmp_path / "mnt", tmp_path / "server.log") as mounted:
        yield mounted


def run_then_cut(disk: PowerCutDisk, code: str) -> None:
    """Run `code` in a child that then waits; cut once it printed 'done'."""
    child = subprocess.Popen(
        [sys.executable, "-c", f"{code}\nprint('done', flush=True)\nimport time; time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "done"
    disk.cut(child)


def test_private_dir_and_file_survive_a_cut(disk: PowerCutDisk, tmp_path: Path) -> None:
    data = disk.mountpoint / "var" / "data"
    run_then_cut(
        disk,
        "from pathlib import Path\n"
        "from sync.files import private_dir, private_database\n"
        f"private_dir(Path({str(data)!r}))\n"
        f"private_database(Path({str(data / 'outbox.db')!r}))",
    )
    out = tmp_path / "out"
    disk.export(out)
    assert (out / "var" / "data").is_dir()
    assert (out / "var" / "data" / "outbox.db").is_file()
    assert (out / "var" / "data").stat().st_mode & 0o777 == 0o700


def test_opcua_pki_directory_survives_a_cut(disk: PowerCutDisk, tmp_path: Path) -> None:
    pki = disk.mountpoint / "data" / "pki"
    run_then_cut(
        disk,
        "from pathlib import Path\n"
        "from drivers.opcua.security import create_client_certificate\n"
        f"pki = Path({str(pki)!r})\n"
        "create_client_certificate(pki / 'agent-cert.der', pki / 'agent-key.pem', 'urn:test')",
    )
    out = tmp_path / "out"
    disk.export(out)
    assert sorted(p.name for p in (out / "data" / "pki").iterdir()) == [
        "agent-cert.der",
        "agent-key.pem",
    ]
