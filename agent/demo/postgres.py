"""The demo's private PostgreSQL: a cluster made by initdb in the demo's temporary directory,
on a free loopback port, with trust authentication for its one superuser; deleted at exit."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
from pathlib import Path

import asyncpg

from agent.demo.servers import LoopbackServer, ServerUnavailable, last_lines, read_from

_BINARIES = ("initdb", "postgres")
SUPERUSER = "postgres"


def _version(bin_dir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name)) or (0,)


def find_pg_bin_dir() -> Path | None:
    """The folder of initdb and postgres: $EDGE_AGENT_PG_BIN, PATH, then the newest
    /usr/lib/postgresql/*/bin (Debian keeps them off PATH); None when not installed."""
    configured = os.environ.get("EDGE_AGENT_PG_BIN")
    if configured:
        folder = Path(configured)
        return folder if all((folder / name).is_file() for name in _BINARIES) else None
    on_path = [shutil.which(name) for name in _BINARIES]
    folders = {Path(found).resolve().parent for found in on_path if found}
    if all(on_path) and len(folders) == 1:
        return folders.pop()
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True)
    for folder in candidates:
        if all((folder / name).is_file() for name in _BINARIES):
            return folder
    return None


class PrivatePostgres(LoopbackServer):
    """One cluster, initialised on first start, listening on 127.0.0.1 and its own socket."""

    what = "PostgreSQL"

    def __init__(self, bin_dir: Path, workdir: Path, account: pwd.struct_passwd | None) -> None:
        super().__init__(workdir, account)
        self.bin_dir = bin_dir
        self.data_dir = workdir / "data"
        self.socket_dir = workdir / "socket"
        self.log_path = workdir / "postgres.log"

    @property
    def version(self) -> str:
        """The major version, from the binaries' folder (e.g. '17'), or ''."""
        return ".".join(str(part) for part in _version(self.bin_dir) if part) or ""

    @property
    def dsn(self) -> str:
        """postgresql://postgres@127.0.0.1:PORT/postgres (trust authentication)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def _prepare(self) -> None:
        super()._prepare()
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self.give_to_account(self.socket_dir)
        # --no-sync: a throwaway cluster needs no fsync of its initial files (seconds saved).
        initdb = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-A", "trust"]
        initdb += ["-U", SUPERUSER, "-E", "UTF8", "--locale=C", "--no-sync"]
        result = self.run_once(initdb)
        if result.returncode != 0:
            raise ServerUnavailable(
                f"initdb failed ({result.returncode}): {last_lines(read_from(self.log_path, 0))}"
            )

    def _argv(self, port: int) -> list[str]:
        return [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(port),
            "-k",
            str(self.socket_dir),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=20",
        ]

    async def _answers(self, port: int) -> bool:
        dsn = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"
        try:
            connection = await asyncpg.connect(dsn, timeout=2.0)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return False  # not listening yet, or "the database system is starting up"
        try:
            # Another server may hold the port we chose: ours is the one on our data dir.
            answer = await connection.fetchval("SHOW data_directory")
        finally:
            await connection.close()
        return bool(answer == str(self.data_dir))

    async def stop(self, first: signal.Signals = signal.SIGINT, grace: float = 10.0) -> None:
        """Fast shutdown (SIGINT: backends are ended, nothing is waited for)."""
        await super().stop(first, grace)
