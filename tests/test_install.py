"""scripts/install into a temporary root: everything lands where the units expect it, a second
run changes nothing at all (paths, modes, owners, contents, mtimes), an operator's config is
never overwritten, and --uninstall keeps config, data and the user.

The package goes into the venv with a real `pip install` (dependencies from the configured
index, as for an operator); one install takes about half a minute."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "install"
PREFIX = "/opt/edge-gw"  # not the default: the units must follow --prefix

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="scripts/install runs as root (it chowns files)"),
    pytest.mark.skipif(shutil.which("python3") is None, reason="python3 is not on PATH"),
]

Manifest = dict[str, tuple[object, ...]]


def install(root: Path, *args: str) -> str:
    result = subprocess.run(
        [str(SCRIPT), "--root", str(root), "--prefix", PREFIX, *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def manifest(root: Path) -> Manifest:
    """Every path under root: type, mode, owner, mtime, and the content hash or link target."""
    out: Manifest = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        if path.is_symlink():
            what: object = ("link", os.readlink(path))
        elif path.is_file():
            what = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            what = ("dir",)
        out[str(path.relative_to(root))] = (what, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    return out


def ids(root: Path) -> tuple[int, int, list[str]]:
    """uid and gid of edge-agent, and the members of dialout, in the root."""
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    group = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/group").read_text().splitlines()
    }
    return int(passwd["edge-agent"][2]), int(group["edge-agent"][2]), group["dialout"][3].split(",")


def test_install_twice_is_identical_then_uninstall_keeps_config_and_data(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    first = install(root)
    assert "created the system user edge-agent" in first
    first_manifest = manifest(root)

    second = install(root)
    assert manifest(root) == first_manifest
    assert second.strip().splitlines() == [
        f"==> nothing changed: edge-agent is installed in {PREFIX} and up to date"
    ]

    # Where the units expect things.
    uid, gid, dialout = ids(root)
    assert "edge-agent" in dialout
    unit = (root / "etc/systemd/system/edge-agent.service").read_text()
    assert f"ExecStart={PREFIX}/venv/bin/edge-agent run -c /etc/edge-agent/agent.toml" in unit
    assert "/opt/edge-agent/" not in unit
    assert not (root / "etc/systemd/system/edge-agent-ingest.service").exists()
    config = root / "etc/edge-agent/agent.toml"
    assert config.read_bytes() == (REPO / "config/agent.example.toml").read_bytes()
    st = config.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 0, gid)
    data = (root / "var/lib/edge-agent").stat()
    assert (data.st_mode & 0o777, data.st_uid, data.st_gid) == (0o750, uid, gid)
    for snippet in ("usr/lib/sysusers.d/edge-agent.conf", "usr/lib/tmpfiles.d/edge-agent.conf"):
        assert (root / snippet).is_file()
    venv = root / PREFIX.lstrip("/") / "venv"
    # Scripts name the interpreter where it will live once the root is the real one.
    assert (venv / "bin/edge-agent").read_text().startswith(f"#!{PREFIX}/venv/bin/python")
    version = subprocess.run(
        [str(venv / "bin/python"), str(venv / "bin/edge-agent"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert version.stdout.startswith("edge-agent ")
    # README, "Operating it": `edge-agent check -c /etc/edge-agent/agent.toml` on the installed
    # example passes (its secret files are not installed yet: warnings, exit 0), and
    # `edge-agent status` says "unreachable" (3) while no service runs.
    for verb, code, line in (("check", 0, f"{config}: OK"), ("status", 3, "unreachable")):
        result = subprocess.run(
            [str(venv / "bin/python"), str(venv / "bin/edge-agent"), verb, "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "EDGE_AGENT__HTTP__LISTEN": "127.0.0.1:1"},
        )
        assert result.returncode == code, result.stdout + result.stderr
        assert line in result.stdout + result.stderr

    # An operator's config is kept; --central adds the ingest unit and its config.
    config.write_text("# mine\n")
    central = install(root, "--central")
    assert "installed /etc/systemd/system/edge-agent-ingest.service" in central
    assert config.read_text() == "# mine\n"
    assert (root / "etc/edge-agent/central.toml").is_file()
    assert "pip" not in central  # the package was up to date

    # --uninstall: the installation goes, config, data and the user stay.
    (root / "var/lib/edge-agent/outbox.db").write_bytes(b"events")
    removed = install(root, "--uninstall")
    assert "kept /etc/edge-agent" in removed
    assert not venv.exists()
    assert not (root / PREFIX.lstrip("/")).exists()
    for gone in (
        "etc/systemd/system/edge-agent.service",
        "etc/systemd/system/edge-agent-ingest.service",
        "usr/lib/sysusers.d/edge-agent.conf",
        "usr/lib/tmpfiles.d/edge-agent.conf",
    ):
        assert not (root / gone).exists(), gone
    assert config.read_text() == "# mine\n"
    assert (root / "etc/edge-agent/central.toml").is_file()
    assert (root / "var/lib/edge-agent/outbox.db").read_bytes() == b"events"
    assert ids(root)[0] == uid
    assert "nothing to remove" in install(root, "--uninstall")


def test_bad_arguments_exit_2() -> None:
    result = subprocess.run(
        [str(SCRIPT), "--frobnicate"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "unknown argument: --frobnicate" in result.stderr
    relative = subprocess.run(
        [str(SCRIPT), "--root", "relative/dir"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert relative.returncode != 0
    assert "--root must be an absolute path" in relative.stderr
