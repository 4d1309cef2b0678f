"""The demo's private servers (a broker, a database): child processes on a free loopback port,
each with its files in the demo's temporary directory, stopped when the demo ends."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
ADDRESS_IN_USE = "Address already in use"
START_TIMEOUT = 30.0  # seconds for a server to answer, port races included
POLL_INTERVAL = 0.02  # seconds between readiness probes (a refused connection is immediate)
# Accounts a server may run as when the demo runs as root (PostgreSQL refuses root).
UNPRIVILEGED_ACCOUNTS = ("nobody", "daemon")


class ServerUnavailable(Exception):
    """A private server cannot run here (not installed, no account to run it as, it failed)."""


def free_port() -> int:
    """A TCP port that was free on the loopback a moment ago (another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


def find_executable(name: str, extra_dirs: Sequence[str] = ()) -> str | None:
    """``name`` on PATH, else in one of ``extra_dirs`` (sbin folders are not on every PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        candidate = Path(directory, name)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def server_account() -> pwd.struct_passwd | None:
    """The unprivileged account the servers run as when the demo runs as root; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_ACCOUNTS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return entry
    raise ServerUnavailable(
        f"running as root and none of the accounts {', '.join(UNPRIVILEGED_ACCOUNTS)} exists "
        "to run the servers as"
    )


def read_from(path: Path, offset: int) -> str:
    """A log file's text from byte ``offset`` ('' while it does not exist)."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def last_lines(text: str, count: int = 5) -> str:
    """The last ``count`` non-empty lines of a log, on one line (for an error message)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-count:])


class LoopbackServer(ABC):
    """A server process in its own session on a free loopback port, owned by ``account`` when
    the demo runs as root; a port taken by someone else between choice and bind is retried."""

    what = "server"

    def __init__(self, workdir: Path, account: pwd.struct_passwd | None) -> None:
        self.workdir = workdir
        self.account = account
        self.port = 0
        self.log_path = workdir / "server.log"
        self._log_offset = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def _argv(self, port: int) -> list[str]:
        """The command line of a server on ``port``."""

    @abstractmethod
    async def _answers(self, port: int) -> bool:
        """Whether our server (not another process) answers on ``port`` now."""

    def _prepare(self) -> None:
        """Create the work dir, owned by the account the server runs as."""
        self.workdir.mkdir(mode=0o700, exist_ok=True)
        self.log_path.touch()
        self.give_to_account(self.workdir, self.log_path)

    def give_to_account(self, *paths: Path) -> None:
        """chown ``paths`` to the server's account (when the demo runs as root)."""
        if self.account is not None:
            for path in paths:
                os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def child_environment(self) -> dict[str, str]:
        """The environment of the server's processes: no PG* variables, C locale, and the
        account's name and a home it can write when it is not ours."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if self.account is not None:
            env.update(HOME=str(self.workdir), USER=self.account.pw_name)
            env["LOGNAME"] = self.account.pw_name
        return env

    def run_once(self, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
        """Run a setup command as the server's account, its output appended to the log."""
        with self.log_path.open("ab") as log:
            return subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.child_environment(),
                check=False,
                user=self._uid,
                group=self._gid,
                extra_groups=self._extra_groups,
            )

    @property
    def _uid(self) -> int | None:
        return None if self.account is None else self.account.pw_uid

    @property
    def _gid(self) -> int | None:
        return None if self.account is None else self.account.pw_gid

    @property
    def _extra_groups(self) -> list[int] | None:
        return None if self.account is None else []  # root's groups are not the account's

    async def start(self) -> None:
        """Start on a free port and wait until it answers (ServerUnavailable if it never does)."""
        await asyncio.to_thread(self._prepare)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while True:
            port = free_port()
            self._spawn(port)
            outcome = await self._wait_ready(port, deadline)
            if outcome == "ready":
                self.port = port
                return
            if outcome == "in use" and loop.time() < deadline:
                continue  # lost the race for the port: another one
            await self.stop()
            raise ServerUnavailable(
                f"{self.what} did not start ({outcome}): "
                f"{last_lines(read_from(self.log_path, self._log_offset))}"
            )

    def _spawn(self, port: int) -> None:
        self._log_offset = self.log_path.stat().st_size
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self._argv(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.child_environment(),
                start_new_session=True,  # Ctrl-C goes to the demo, which stops it in order
                user=self._uid,
                group=self._gid,
                extra_groups=self._extra_groups,
            )

    async def _wait_ready(self, port: int, deadline: float) -> str:
        """'ready', 'in use' (the bind failed), 'exited' or 'timed out'."""
        proc = self._proc
        assert proc is not None
        loop = asyncio.get_running_loop()
        while True:
            if proc.poll() is not None:
                output = read_from(self.log_path, self._log_offset)
                return "in use" if ADDRESS_IN_USE in output else "exited"
            if await self._answers(port):
                return "ready"
            if loop.time() > deadline:
                return "timed out"
            await asyncio.sleep(POLL_INTERVAL)

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    async def stop(self, first: signal.Signals = signal.SIGTERM, grace: float = 10.0) -> None:
        """Send ``first`` and wait ``grace`` seconds; then SIGKILL (a demo must end)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(first)
        try:
            await asyncio.to_thread(proc.wait, grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
