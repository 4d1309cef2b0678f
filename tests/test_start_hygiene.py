"""What the daemon and the ingest do at start (issue #18, item 7): a cleartext password is
logged once at WARNING, and every file and directory the daemon creates is private (0600/0700)
whatever the umask, while a file found wider is tightened and that is logged once."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from agent.central import service
from agent.central.settings import load_central_settings
from sync.central.stats import IngestStats
from tests.fixtures.daemon import running, settings_for
from tests.fixtures.modes import modes_under, umask, wider_than_private
from tests.fixtures.ports import async_wait_until, free_port

CLEARTEXT = (
    "config: mqtt.url: the password goes to the broker in cleartext over mqtt://; use mqtts://"
)


def agent_config(data_dir: Path) -> str:
    """No broker and no PLC answer: the daemon runs anyway, buffering, with its saga log open."""
    return f"""
[gateway]
id = "gw"
site = "s"
area = "a"
line = "l"
data_dir = "{data_dir}"

[mqtt]
url = "mqtt://127.0.0.1:{free_port()}"
username = "line3"
password = "pw"

[http]
enabled = false

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:{free_port()}"
  [[devices.tags]]
  name = "order_id"
  address = "hr:210"
  type = "string"
  length = 16
  writable = true

[[workflows]]
name = "w"
params = {{ order = "str:1..16" }}
steps = [{{ write = "press1/order_id", value = "{{order}}" }}]
"""


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


async def run_once(tmp_path: Path, data_dir: Path) -> dict[str, int]:
    """Run the daemon until its outbox and saga log are open; the modes seen meanwhile."""
    async with running(settings_for(tmp_path, agent_config(data_dir))) as runtime:
        gateway = runtime.gateway
        assert gateway is not None
        await asyncio.wait_for(gateway.workflows.ready.wait(), 10)
        await async_wait_until(lambda: (data_dir / "sagas.db-shm").exists())
        return modes_under(tmp_path / "state")


async def test_the_daemon_files_are_private_whatever_the_umask(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "state" / "data"
    with umask(0o022), caplog.at_level(logging.WARNING):
        during = await run_once(tmp_path, data_dir)
        after = modes_under(tmp_path / "state")
    assert {
        "data/",
        "data/outbox.db",
        "data/outbox.db-wal",
        "data/sagas.db",
        "data/sagas.db-wal",
        "data/sagas.db-shm",
    } <= set(during)
    assert wider_than_private(during) == {}
    assert wider_than_private(after) == {}
    assert warnings_of(caplog, "cleartext") == [CLEARTEXT]  # once, at start


async def test_files_found_wider_are_tightened_and_that_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "state" / "data"
    with umask(0o022):
        await run_once(tmp_path, data_dir)
        for name in ("outbox.db", "sagas.db"):
            (data_dir / name).chmod(0o644)
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                await run_once(tmp_path, data_dir)
        assert wider_than_private(modes_under(tmp_path / "state")) == {}
    assert sorted(warnings_of(caplog, "tightened")) == [
        f"{data_dir / name} had mode 0644; tightened to 0600" for name in ("outbox.db", "sagas.db")
    ]


class ReturningIngest:
    """Stands in for an Ingest that ends at once (the service then exits 1)."""

    stats = IngestStats()

    async def run(self) -> None:
        return None


async def test_the_ingest_logs_a_cleartext_password_once_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ingest.password").write_text("pw")
    path = tmp_path / "central.toml"
    path.write_text(
        '[mqtt]\nurl = "mqtt://127.0.0.1:1"\nusername = "ingest"\n'
        'password_file = "ingest.password"\n\n'
        '[postgres]\ndsn = "postgresql://ingest@127.0.0.1:1/plant"\n\n'
        "[http]\nenabled = false\n"
    )
    settings = load_central_settings(path, environ={})
    monkeypatch.setattr(service, "ingest_for", lambda _settings: ReturningIngest())
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with caplog.at_level(logging.WARNING):
        async with asyncio.timeout(10):
            assert await service.run_until_signalled(settings) == 1
    assert warnings_of(caplog, "cleartext") == [CLEARTEXT]
