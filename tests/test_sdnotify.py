"""sd_notify and the systemd watchdog, against a test-owned AF_UNIX datagram socket standing in
for systemd's NOTIFY_SOCKET: the notifier alone, the watchdog loop (healthy, wedged check,
stuck event loop), the liveness checks, and the daemon (in-process and `edge-agent run`):
READY arrives, WATCHDOG pings arrive, and stop when a poller task is dead."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop

from agent.daemon.health import MIN_STALE_AFTER, liveness_problems, stale_after, status_line
from agent.service.sdnotify import SdNotifier, watchdog_interval
from agent.service.watchdog import watchdog_loop
from agent.settings.loader import load_agent_settings
from drivers.config import DeviceConfigBase
from tests.fixtures.ports import async_wait_until, free_port

REPO = Path(__file__).resolve().parent.parent

Message = dict[str, str]


class NotifyReceiver:
    """A stand-in for systemd's notification socket: records every datagram with its arrival
    time (a thread receives, so arrivals are timed even while the event loop is stuck)."""

    def __init__(self, address: str) -> None:
        self.env_value = address
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(bind_to)
        self._sock.settimeout(0.05)
        self._lock = threading.Lock()
        self._messages: list[tuple[float, Message]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-receiver", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self._lock:
                self._messages.append((time.monotonic(), fields))

    def close(self) -> None:
        """Stop receiving."""
        self._closed.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def messages(
        self, key: str | None = None, *, after: float = 0.0
    ) -> list[tuple[float, Message]]:
        """(arrival, fields) of every datagram after `after`, only those with `key` if given."""
        with self._lock:
            return [(ts, m) for ts, m in self._messages if ts > after and (key is None or key in m)]

    def count(self, key: str, *, after: float = 0.0) -> int:
        """How many datagrams carried `key`."""
        return len(self.messages(key, after=after))

    async def wait_for(
        self,
        predicate: Callable[[Message], bool],
        timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline, like async_wait_until
        *,
        after: float = 0.0,
        what: str = "notification",
    ) -> tuple[float, Message]:
        """The first datagram after `after` matching `predicate`, waiting up to `timeout`."""
        found: list[tuple[float, Message]] = []

        def seen() -> bool:
            found[:] = [(ts, m) for ts, m in self.messages(after=after) if predicate(m)]
            return bool(found)

        await async_wait_until(seen, timeout=timeout, message=what)
        return found[0]

    async def wait_count(
        self,
        key: str,
        count: int,
        timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline
        *,
        after: float = 0.0,
    ) -> None:
        """Wait until `count` datagrams with `key` arrived after `after`."""
        await async_wait_until(
            lambda: self.count(key, after=after) >= count,
            timeout=timeout,
            message=f"{count} x {key}",
        )

    async def assert_quiet(self, key: str, *, after: float, window: float) -> None:
        """Fail as soon as a datagram with `key` arrives after `after`, watching for `window` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + window
        while loop.time() < deadline:
            assert self.count(key, after=after) == 0, self.messages(key, after=after)
            await asyncio.sleep(0.02)
        assert self.count(key, after=after) == 0, self.messages(key, after=after)


@pytest.fixture
def receiver() -> Iterator[NotifyReceiver]:
    """A receiver on an abstract-namespace socket (no path length limit, nothing to clean)."""
    rx = NotifyReceiver(f"@edge-agent-test-{uuid.uuid4().hex}")
    try:
        yield rx
    finally:
        rx.close()


@pytest.fixture
def path_receiver() -> Iterator[NotifyReceiver]:
    """A receiver on a socket file (a short directory: AF_UNIX paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        rx = NotifyReceiver(os.path.join(directory, "notify"))
        try:
            yield rx
        finally:
            rx.close()


def _block_event_loop(seconds: float) -> None:
    # The fault under test: a callback that hogs the event loop (a blocking call).
    time.sleep(seconds)


# -- SdNotifier ------------------------------------------------------------------------------


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = SdNotifier(environ={})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready(status="x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.sent == 0


async def test_ready_and_status_reach_a_socket_file(path_receiver: NotifyReceiver) -> None:
    notifier = SdNotifier(environ={"NOTIFY_SOCKET": path_receiver.env_value})
    assert notifier.enabled
    assert notifier.ready(status="devices 0/0 up")
    _, message = await path_receiver.wait_for(lambda m: "READY" in m, what="READY=1")
    assert message == {"READY": "1", "STATUS": "devices 0/0 up"}


async def test_abstract_namespace_socket(receiver: NotifyReceiver) -> None:
    assert receiver.env_value.startswith("@")
    notifier = SdNotifier(environ={"NOTIFY_SOCKET": receiver.env_value})
    notifier.watchdog()
    notifier.stopping(status="bye")
    await receiver.wait_for(lambda m: m.get("STOPPING") == "1", what="STOPPING=1")
    assert [m for _, m in receiver.messages()] == [
        {"WATCHDOG": "1"},
        {"STOPPING": "1", "STATUS": "bye"},
    ]


async def test_a_status_is_always_one_line(receiver: NotifyReceiver) -> None:
    notifier = SdNotifier(socket_path=receiver.env_value, environ={})
    notifier.status("line one\nREADY=1\r\nend")
    _, message = await receiver.wait_for(lambda m: "STATUS" in m)
    assert message == {"STATUS": "line one READY=1  end"}


async def test_reloading_carries_monotonic_usec(receiver: NotifyReceiver) -> None:
    notifier = SdNotifier(environ={"NOTIFY_SOCKET": receiver.env_value})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    _, message = await receiver.wait_for(lambda m: "RELOADING" in m)
    assert message["RELOADING"] == "1"
    assert int(message["MONOTONIC_USEC"]) >= before


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert (
        watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    )
    # Inherited from a parent that is the one being watched: not ours to feed.
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None
    # Only meaningful with a socket to ping.
    assert SdNotifier(environ={"WATCHDOG_USEC": "1000000"}).watchdog_interval is None
    notifier = SdNotifier(environ={"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000"})
    assert notifier.watchdog_interval == 0.5


def test_unset_environment_hides_the_socket_from_children() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "7", "HOME": "/"}
    notifier = SdNotifier(environ=env, unset_environment=True)
    assert notifier.enabled
    assert env == {"HOME": "/"}


def test_a_full_receive_queue_drops_instead_of_blocking() -> None:
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as deaf:
            deaf.bind(path)  # never reads: its queue fills after a few datagrams
            notifier = SdNotifier(environ={"NOTIFY_SOCKET": path})
            results = [notifier.watchdog() for _ in range(2000)]
    assert results[0] is True
    assert False in results
    assert notifier.dropped > 0


def test_a_missing_socket_is_logged_once_and_never_raises(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    notifier = SdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING, logger="edge_agent.sdnotify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    assert len([r for r in caplog.records if "cannot notify" in r.getMessage()]) == 1


def test_unsupported_socket_kinds_disable_notifications() -> None:
    assert not SdNotifier(environ={"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    assert not SdNotifier(environ={"NOTIFY_SOCKET": "relative/path"}).enabled


# -- watchdog_loop ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_loop(
    notifier: SdNotifier,
    checks: Callable[[], list[str]],
    interval: float | None,
    status: Callable[[], str] | None = None,
    status_interval: float = 10.0,
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(
        watchdog_loop(notifier, checks, interval, status=status, status_interval=status_interval)
    )
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_pings_while_healthy_and_status_only_when_it_changes(
    receiver: NotifyReceiver,
) -> None:
    notifier = SdNotifier(environ={"NOTIFY_SOCKET": receiver.env_value})
    text = ["devices 1/1 up"]
    async with running_loop(notifier, list, 0.02, status=lambda: text[0]):
        await receiver.wait_count("WATCHDOG", 5)
        assert receiver.count("STATUS") == 1
        text[0] = "devices 0/1 up"
        await receiver.wait_for(lambda m: m.get("STATUS") == "devices 0/1 up")
    assert receiver.count("STATUS") == 2


async def test_a_failing_check_withholds_pings_until_it_clears(
    receiver: NotifyReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SdNotifier(environ={"NOTIFY_SOCKET": receiver.env_value})
    problems: list[str] = []
    with caplog.at_level(logging.WARNING, logger="edge_agent.watchdog"):
        async with running_loop(notifier, lambda: list(problems), 0.02, status=lambda: "ok"):
            await receiver.wait_count("WATCHDOG", 3)
            problems.append("device press1: no activity for 99 s (limit 40 s)")
            since, message = await receiver.wait_for(
                lambda m: m.get("STATUS", "").startswith("unhealthy"), what="unhealthy STATUS"
            )
            assert message["STATUS"] == (
                "unhealthy: device press1: no activity for 99 s (limit 40 s) | ok"
            )
            assert "WATCHDOG" not in message
            await receiver.assert_quiet("WATCHDOG", after=since, window=0.5)
            problems.clear()
            await receiver.wait_count("WATCHDOG", 3, after=since)
    withheld = [r for r in caplog.records if "withholding" in r.getMessage()]
    resumed = [r for r in caplog.records if "resumed" in r.getMessage()]
    assert len(withheld) == 1  # once per outage, not once per tick
    assert len(resumed) == 1


async def test_a_check_that_raises_counts_as_a_problem(receiver: NotifyReceiver) -> None:
    notifier = SdNotifier(environ={"NOTIFY_SOCKET": receiver.env_value})

    def broken() -> list[str]:
        raise RuntimeError("bug")

    async with running_loop(notifier, broken, 0.02):
        _, message = await receiver.wait_for(lambda m: "STATUS" in m)
        assert message["STATUS"] == "unhealthy: watchdog check failed: RuntimeError: bug"
        await receiver.assert_quiet("WATCHDOG", after=0.0, window=0.3)


async def test_without_a_watchdog_only_the_status_is_kept(receiver: NotifyReceiver) -> None:
    notifier = SdNotifier(environ={"NOTIFY_SOCKET": receiver.env_value})
    counter = iter(range(1_000_000))
    async with running_loop(notifier, list, None, lambda: f"n={next(counter)}", 0.02):
        await receiver.wait_count("STATUS", 3)
    assert receiver.count("WATCHDOG") == 0


async def test_a_stuck_event_loop_sends_no_pings(receiver: NotifyReceiver) -> None:
    notifier = SdNotifier(environ={"NOTIFY_SOCKET": receiver.env_value})
    async with running_loop(notifier, list, 0.02):
        await receiver.wait_count("WATCHDOG", 3)
        stuck_at = time.monotonic()
        _block_event_loop(0.5)
        await receiver.wait_count("WATCHDOG", 3, after=stuck_at)
    arrivals = [ts for ts, _ in receiver.messages("WATCHDOG")]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # The pings come from the loop itself: none while it was stuck.
    assert max(gaps) >= 0.45


# -- liveness checks -------------------------------------------------------------------------


@dataclass
class FakeDriver:
    polled_tags: tuple[Any, ...] = ()


@dataclass
class FakePoller:
    name: str
    last_activity: float
    driver: FakeDriver | None = None
    config: DeviceConfigBase = field(
        default_factory=lambda: DeviceConfigBase.model_validate({"name": "d"})
    )


def test_stale_after_follows_the_device_deadlines() -> None:
    default = DeviceConfigBase.model_validate({"name": "d"})  # poll 1 s, timeout 1 s
    assert stale_after(default) == 2 * (1 + 10 + 8 + 1)
    slow = DeviceConfigBase.model_validate({"name": "d", "poll_interval": "60s"})
    assert stale_after(slow) == 2 * (1 + 10 + 185 + 60)
    fast = DeviceConfigBase.model_validate(
        {"name": "d", "poll_interval": "10ms", "timeout": "10ms"}
    )
    assert stale_after(fast) == pytest.approx(2 * (0.01 + 10 + 5.03 + 0.01))
    assert stale_after(fast) >= MIN_STALE_AFTER


async def test_liveness_problems_name_dead_tasks_and_silent_pollers() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    async def crash() -> None:
        raise ValueError("boom")

    alive = asyncio.create_task(forever(), name="forwarder")
    cancelled = asyncio.create_task(forever(), name="device:press1")
    crashed = asyncio.create_task(crash(), name="health")
    cancelled.cancel()
    await asyncio.wait([cancelled, crashed])
    now = 1000.0
    pollers = {
        "fresh": FakePoller("fresh", now - 5, FakeDriver(("tag",))),
        "silent": FakePoller("silent", now - 100, FakeDriver(("tag",))),
        "connecting": FakePoller("connecting", now - 100, None),
        # Push-only and connected: its subscription stream has its own stall detection.
        "subscribed": FakePoller("subscribed", now - 1000, FakeDriver(())),
    }
    try:
        problems = liveness_problems(pollers, [alive, cancelled, crashed], now=now)
    finally:
        alive.cancel()
    assert problems == [
        "task device:press1 ended (cancelled)",
        "task health ended (ValueError: boom)",
        "device silent: no activity for 100 s (limit 40 s)",
        "device connecting: no activity for 100 s (limit 40 s)",
    ]
    assert liveness_problems({"fresh": pollers["fresh"]}, [], now=now) == []


def test_status_line_summarises_health() -> None:
    health = {
        "devices": {"press1": "up", "oven1": "down", "filler": "open"},
        "outbox_events": 1234,
        "oldest_unacked_s": 61.6,
        "uplink": "up",
    }
    assert status_line(health) == (
        "devices 1/3 up, outbox 1234 events, oldest unacked 62 s, uplink up"
    )
    assert status_line({"devices": {}, "outbox_events": 0, "oldest_unacked_s": None}) == (
        "devices 0/0 up, outbox 0 events, uplink down"
    )


# -- the daemon ------------------------------------------------------------------------------

WATCHDOG_USEC = "200000"  # pings every 0.1 s


def agent_config(data_dir: Path, modbus_port: int | None) -> str:
    # The broker port is closed on purpose: READY must not wait for the uplink.
    text = f"""
[gateway]
id = "plant1-line3"
site = "plant1"
area = "assembly"
line = "line3"
data_dir = "{data_dir}"

[mqtt]
url = "mqtt://127.0.0.1:{free_port()}"

[http]
enabled = false
"""
    if modbus_port is not None:
        text += f"""
[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:{modbus_port}"
poll_interval = "100ms"
timeout = "300ms"

  [[devices.tags]]
  name = "state_code"
  address = "hr:100"
"""
    return text


async def test_daemon_ready_pings_and_no_pings_once_a_poller_task_died(
    receiver: NotifyReceiver, tmp_path: Path
) -> None:
    from agent.daemon.runtime import Runtime
    from simulators.modbus.server import ModbusSimulator

    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        path = tmp_path / "agent.toml"
        path.write_text(agent_config(tmp_path / "data", sim.port))
        settings = load_agent_settings(path, environ={})
        notifier = SdNotifier(
            environ={"NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": WATCHDOG_USEC}
        )
        runtime = Runtime(settings, notifier=notifier)
        stop = asyncio.Event()
        task = asyncio.create_task(runtime.run(stop), name="runtime")
        try:
            ready_at, ready = await receiver.wait_for(lambda m: "READY" in m, what="READY=1")
            assert ready["STATUS"].startswith("devices 0/1 up, outbox ")
            assert ready["STATUS"].endswith("uplink down")
            await receiver.wait_count("WATCHDOG", 5, after=ready_at)
            await receiver.wait_for(
                lambda m: m.get("STATUS", "").startswith("devices 1/1 up"), what="device up"
            )
            # Wedge: the poller's task dies without the runtime noticing (no exception reaches
            # the TaskGroup), exactly what only the watchdog can catch.
            (poller_task,) = [t for t in asyncio.all_tasks() if t.get_name() == "device:press1"]
            poller_task.cancel()
            since, unhealthy = await receiver.wait_for(
                lambda m: m.get("STATUS", "").startswith("unhealthy"), what="unhealthy STATUS"
            )
            assert unhealthy["STATUS"].startswith(
                "unhealthy: task device:press1 ended (cancelled) | devices "
            )
            # systemd would kill us after WatchdogSec without pings: 10 periods of silence.
            await receiver.assert_quiet("WATCHDOG", after=since, window=1.0)
        finally:
            stop.set()
            async with asyncio.timeout(20):
                await task
    await receiver.wait_for(lambda m: m.get("STOPPING") == "1", what="STOPPING=1")


def test_run_command_notifies_ready_watchdog_reloads_and_stopping(
    receiver: NotifyReceiver, tmp_path: Path
) -> None:
    async def scenario() -> tuple[int | None, bytes]:
        path = tmp_path / "agent.toml"
        path.write_text(agent_config(tmp_path / "data", None))
        env = {
            **os.environ,
            "NOTIFY_SOCKET": receiver.env_value,
            "WATCHDOG_USEC": WATCHDOG_USEC,
        }
        env.pop("WATCHDOG_PID", None)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "-c",
            str(path),
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            ready_at, _ = await receiver.wait_for(
                lambda m: "READY" in m, timeout=30, what="READY=1"
            )
            await receiver.wait_count("WATCHDOG", 3, after=ready_at)
            # systemctl reload: RELOADING=1, then READY=1 once the (unchanged) config applied.
            process.send_signal(signal.SIGHUP)
            reload_at, _ = await receiver.wait_for(
                lambda m: "RELOADING" in m, after=ready_at, what="RELOADING=1"
            )
            await receiver.wait_for(lambda m: "READY" in m, after=reload_at, what="READY again")
            # A changed [mqtt] restarts the runtime inside the process: READY=1 comes from the
            # new one, and its watchdog pings (no STOPPING=1 meanwhile: systemd would stop us).
            path.write_text(path.read_text().replace("[http]", 'keepalive = "20s"\n\n[http]'))
            process.send_signal(signal.SIGHUP)
            restart_at, _ = await receiver.wait_for(
                lambda m: "RELOADING" in m, after=reload_at, what="second RELOADING=1"
            )
            ready_again, _ = await receiver.wait_for(
                lambda m: "READY" in m, after=restart_at, timeout=30, what="READY after restart"
            )
            assert receiver.count("STOPPING") == 0
            await receiver.wait_count("WATCHDOG", 3, after=ready_again)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                _, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await receiver.wait_for(lambda m: m.get("STOPPING") == "1", what="STOPPING=1")
        return process.returncode, stderr

    returncode, stderr = uvloop.run(scenario())
    assert returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr
    assert b"restarting inside the process" in stderr


def test_ingest_command_is_ready_without_its_database_and_pings(
    receiver: NotifyReceiver, tmp_path: Path
) -> None:
    async def scenario() -> tuple[int | None, bytes]:
        path = tmp_path / "central.toml"
        # Neither the broker nor PostgreSQL answers: the ingest keeps retrying, and is alive.
        path.write_text(
            f"""
[mqtt]
url = "mqtt://127.0.0.1:{free_port()}"
sync_prefix = "edge"

[postgres]
dsn = "postgresql://ingest@127.0.0.1:{free_port()}/plant"
"""
        )
        env = {**os.environ, "NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": WATCHDOG_USEC}
        env.pop("WATCHDOG_PID", None)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.cli",
            "ingest",
            "-c",
            str(path),
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            ready_at, _ = await receiver.wait_for(
                lambda m: "READY" in m, timeout=30, what="READY=1"
            )
            await receiver.wait_count("WATCHDOG", 3, after=ready_at)
            await receiver.wait_for(
                lambda m: m.get("STATUS", "").startswith("database "), what="ingest STATUS"
            )
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                _, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await receiver.wait_for(lambda m: m.get("STOPPING") == "1", what="STOPPING=1")
        return process.returncode, stderr

    returncode, stderr = uvloop.run(scenario())
    assert returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr
