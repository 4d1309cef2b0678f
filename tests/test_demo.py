"""`edge-agent demo`: private by default (its own broker on a free port, mosquitto or else amqtt
embedded, never the broker an EDGE_AGENT__MQTT__URL names), the whole path to a private PostgreSQL when it is installed,
`--broker URL`, live only without PostgreSQL, and the screen."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import pytest

from agent.daemon.runtime import Runtime
from agent.demo import broker as demo_broker
from agent.demo import embedded as demo_embedded
from agent.demo import servers
from agent.demo.broker import NO_BROKER, private_mosquitto, start_private_broker
from agent.demo.central import ingest_config
from agent.demo.config import load_demo_config
from agent.demo.embedded import EmbeddedAmqtt
from agent.demo.postgres import find_pg_bin_dir
from agent.demo.run import temp_parent
from agent.demo.screen import (
    WAITING_FOR_COUNTS,
    Central,
    Setup,
    central_lines,
    figure_cells,
    header_row,
    machine_row,
    shift_label,
    uplink_line,
    waiting_reason,
)
from agent.oee.calendar import ShiftWindow, window_at
from agent.settings.loader import ConfigError, load_agent_settings
from tests.fixtures.collector import TopicCollector
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.mqtt_client import MqttTestClient
from tests.fixtures.ports import LOOPBACK, async_wait_until, wait_until

REPO = Path(__file__).resolve().parent.parent
DEMO_TIMEOUT = 120  # seconds: a deadline for a whole demo run, never a wait


def run_demo(
    *args: str, env: dict[str, str], without_amqtt: bool = False
) -> subprocess.CompletedProcess[str]:
    """`edge-agent demo ARGS` as a process, its screens on a pipe (one frame after another);
    ``without_amqtt``: as where the demo extra is not installed (amqtt cannot be imported)."""
    hide = "sys.modules['amqtt'] = None; " if without_amqtt else ""
    main = f"import runpy, sys; {hide}runpy.run_module('agent.cli', run_name='__main__')"
    return subprocess.run(
        [sys.executable, "-c", main, "demo", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
    )


class DemoProcess:
    """`edge-agent demo ARGS` running, its output read line by line as it comes."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "demo", *args],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.errors), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: IO[str] | None, into: list[str]) -> None:
        assert stream is not None
        for line in stream:
            into.append(line)

    def line_with(self, text: str, timeout: float = 60.0) -> str:
        """The first line holding ``text``, once the demo printed it."""
        wait_until(lambda: any(text in line for line in self.lines), timeout=timeout)
        return next(line for line in self.lines if text in line)

    def finish(self) -> tuple[int, str, str]:
        """Exit code, stdout, stderr, once the demo ended by itself (deadline DEMO_TIMEOUT)."""
        try:
            self.proc.wait(timeout=DEMO_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        for reader in self._readers:
            reader.join(timeout=10)
        return self.proc.returncode, "".join(self.lines), "".join(self.errors)

    def __enter__(self) -> DemoProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        """A test that failed half-way stops the demo as Ctrl-C would: it stops its broker and
        database (a SIGKILL would leave them running)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def last_frame(out: str) -> str:
    """The final screen (from its title to the stop lines)."""
    return out.rsplit("edge-agent demo: gateway", 1)[1]


def figures_of(frame: str, machine: str) -> list[str]:
    """The percentages on a machine's row."""
    row = next(line for line in frame.splitlines() if line.startswith(f"{machine} "))
    return re.findall(r"\d+\.\d%", row)


# -- the whole demo, as a process ---------------------------------------------------------------


@pytest.mark.slow
def test_demo_is_private_and_stores_centrally(mosquitto: MosquittoBroker) -> None:
    # The "done when": another broker listens where EDGE_AGENT__MQTT__URL points (the
    # variable once redirected the demo, whose own default was 127.0.0.1:1883), with a
    # subscriber on '#' there: it must receive nothing. PostgreSQL is installed here (as for
    # the README's test command), so the same run shows the whole path to the central store.
    with (
        TopicCollector(mosquitto, "#") as other,
        DemoProcess("--duration", "15", env={"EDGE_AGENT__MQTT__URL": mosquitto.url}) as demo,
    ):
        # The screen's watch command reaches the demo's private broker, exactly as printed.
        watch = re.search(
            r"watch:   mosquitto_sub -h (\S+) -p (\d+) -t '(\S+)' -v", demo.line_with("watch:")
        )
        assert watch is not None
        host, port, topics = watch.group(1), int(watch.group(2)), watch.group(3)
        assert (host, topics) == ("127.0.0.1", "demo/assembly/line1/#")
        assert port not in (1883, mosquitto.port)
        with MqttTestClient(host, port) as watcher:
            watcher.subscribe(topics)
            assert watcher.wait_for_message(timeout=30).topic.startswith("demo/assembly/line1/")
        code, out, stderr = demo.finish()
        received = list(other.messages)
    assert code == 0, out + stderr
    assert "Traceback" not in stderr
    assert received == [], f"the other broker received {[m.topic for m in received][:5]}"
    assert "ignoring EDGE_AGENT__MQTT__URL" in out
    assert re.search(rf"broker:  mqtt://127\.0\.0\.1:{port}, private mosquitto", out), out
    assert re.search(r"page:    http://127\.0\.0\.1:\d+/ \(status page", out), out
    rows = [line for line in out.splitlines() if line.startswith(("press ", "filler "))]
    assert rows
    bare = [row for row in rows if re.search(r"\s-(\s|$)", row)]
    assert bare == [], "a blank figure must say why"
    final = last_frame(out)
    assert "shift" in final.splitlines()[final.splitlines().index("") + 1]  # the header
    assert len(figures_of(final, "press")) == 4, final
    assert len(figures_of(final, "filler")) == 4, final
    # The last frame does not blame the uplink for the demo's own stop.
    assert "uplink:  stopped (the demo ended)" in final
    assert "not connected" not in final
    assert "buffering" not in final
    stored = re.search(
        r"stored centrally: ([\d,]+) rows; acknowledged \(watermark\) up to seq ([\d,]+)", final
    )
    assert stored is not None, final
    assert int(stored.group(1).replace(",", "")) > 0
    assert int(stored.group(2).replace(",", "")) > 0
    assert re.search(r"edge-agent demo: stored centrally: [1-9][\d,]* rows", out)
    assert out.rstrip().splitlines()[-1].startswith("edge-agent demo: stopped;")


@pytest.mark.slow
def test_broker_option_publishes_there_live_only_without_postgres(
    mosquitto: MosquittoBroker,
) -> None:
    # --broker opts into an existing broker; without PostgreSQL the demo says it runs live only
    # and sends no S/sync (nothing would acknowledge it).
    with TopicCollector(mosquitto, "#") as seen:
        result = run_demo(
            "--duration", "8", "--broker", mosquitto.url, env={"EDGE_AGENT_PG_BIN": "/nonexistent"}
        )
        topics = set(seen.snapshot())
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"broker:  {mosquitto.url}, your broker (--broker)" in out
    assert "no central store: running live only (PostgreSQL is not installed)" in out
    assert "uplink:  connected, publishing live values only" in out
    assert "demo/assembly/line1/press/state_code" in topics
    assert "demo/assembly/line1/filler/total_count" in topics
    assert not [topic for topic in topics if topic.endswith("/sync")], topics
    assert "nothing stored centrally (no central store: live only)" in out


def listening_on(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) of the sockets listening on
    ``port`` (IPv4 and IPv6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found.append(local)
    return found


@pytest.mark.slow
def test_without_mosquitto_the_demo_runs_amqtt_embedded() -> None:
    # A fresh machine without root: no mosquitto, so the demo runs amqtt (the demo extra) in
    # the demo's process, on a free loopback port, the agent and the ingest speaking MQTT 3.1.1;
    # the same path as with mosquitto, and nothing listening or left on disk afterwards. Stopped
    # as Ctrl-C would once the central store holds rows (live values without PostgreSQL).
    central = find_pg_bin_dir() is not None
    with DemoProcess("--duration", "60", env={"EDGE_AGENT_MOSQUITTO": ""}) as demo:
        broker = re.search(
            r"broker:  mqtt://127\.0\.0\.1:(\d+), private amqtt \S+, embedded, MQTT 3\.1\.1 "
            r"\(mosquitto is not installed; log in ",
            demo.line_with("broker:"),
        )
        assert broker is not None, demo.lines
        port = int(broker.group(1))
        assert port != 1883
        assert listening_on(port) == [f"0100007F:{port:04X}"]  # 127.0.0.1 only
        with MqttTestClient(LOOPBACK, port) as watcher:
            watcher.subscribe("demo/assembly/line1/#")
            assert watcher.wait_for_message(timeout=30).topic.startswith("demo/assembly/line1/")
        ready = re.compile(r"stored centrally: [1-9]" if central else "uplink:  connected")
        wait_until(lambda: any(ready.search(line) for line in demo.lines), timeout=60)
        demo.proc.terminate()
        code, out, stderr = demo.finish()
    assert code == 0, out + stderr
    assert "Traceback" not in stderr
    assert "uplink:  connected, publishing live values" in out
    if central:
        assert re.search(r"edge-agent demo: stored centrally: [1-9][\d,]* rows", out), out
    else:
        assert "nothing stored centrally (no central store: live only)" in out
    stopped = re.search(r"edge-agent demo: stopped; (\S+) deleted", out)
    assert stopped is not None, out
    assert not Path(stopped.group(1)).exists()
    assert listening_on(port) == []


def test_without_mosquitto_or_amqtt_the_demo_says_so_and_exits_2() -> None:
    result = run_demo("--duration", "5", env={"EDGE_AGENT_MOSQUITTO": ""}, without_amqtt=True)
    assert result.returncode == 2, result.stdout + result.stderr
    said = result.stdout.strip()
    assert said.startswith(f"edge-agent demo: {NO_BROKER} (mosquitto is not installed; "), said
    assert "amqtt is not installed" in said
    assert len(said.splitlines()) == 1


def test_a_bad_broker_url_is_a_usage_error() -> None:
    result = run_demo("--broker", "http://127.0.0.1:1", env={})
    assert result.returncode == 2
    assert "--broker 'http://127.0.0.1:1': scheme must be mqtt:// or mqtts://" in result.stderr


# -- the demo's config ----------------------------------------------------------------------------


def test_the_demo_config_takes_its_broker_from_the_demo_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Whatever the environment says, the agent's broker is the one the demo chose (its private
    # broker's URL, or --broker): never 127.0.0.1:1883 by default, never EDGE_AGENT__MQTT__URL.
    monkeypatch.setenv("EDGE_AGENT__MQTT__URL", "mqtt://127.0.0.1:1883")
    monkeypatch.setenv("EDGE_AGENT__MQTT__SYNC_PREFIX", "production")
    settings = load_demo_config(
        broker_url="mqtt://127.0.0.1:41234", sync_enabled=False, sync_prefix="edge"
    )
    assert settings.mqtt.url == "mqtt://127.0.0.1:41234"
    assert settings.mqtt.sync_prefix == "edge"
    assert settings.mqtt.sync_enabled is False


def test_the_demo_config_speaks_the_protocol_the_demo_chose() -> None:
    # amqtt misreads an MQTT 5 CONNECT with a Will: with "auto" the agent would wait one 10 s
    # connect timeout before it falls back, so the demo tells it 3.1.1 for the embedded broker.
    settings = load_demo_config(
        broker_url="mqtt://127.0.0.1:41234", sync_enabled=False, sync_prefix="e", protocol="3.1.1"
    )
    assert settings.mqtt.protocol == "3.1.1"
    assert (
        ingest_config("mqtt://127.0.0.1:41234", "3.1.1", "e", "postgresql://x").count(
            'protocol = "3.1.1"'
        )
        == 1
    )


def test_a_broker_url_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as refused:
        load_demo_config(
            broker_url="mqtt://user:secret@host:1883", sync_enabled=True, sync_prefix="e"
        )
    assert "secret" not in " ".join(refused.value.problems)
    assert refused.value.problems[0].startswith("--broker ")


def test_packaged_demo_config_is_config_demo_toml() -> None:
    assert (REPO / "agent" / "data" / "demo.toml").read_text() == (
        REPO / "config" / "demo.toml"
    ).read_text()


def _minutes_of_a_day(day: datetime) -> list[float]:
    return [(day + timedelta(minutes=m)).timestamp() for m in range(24 * 60)]


def test_demo_calendar_is_planned_time_at_every_minute_of_the_day() -> None:
    # A demo started in a break would show only dashes (a break has no planned time): the
    # demo's test failed in CI at 10:07 UTC, inside the old 10:00-10:15 break.
    settings = load_agent_settings(REPO / "config" / "demo.toml")
    for machine in settings.machines:
        calendar = next(c for c in settings.calendars if c.name == machine.calendar)
        for day in (datetime(2026, 11, 29, tzinfo=UTC), datetime(2026, 3, 29, tzinfo=UTC)):
            unplanned = [
                ts
                for ts in _minutes_of_a_day(day)
                if not any(
                    start <= ts < end
                    for start, end in window_at(calendar, ts).planned  # type: ignore[union-attr]
                )
            ]
            assert unplanned == [], f"{machine.name}: no planned time at {unplanned[:3]}"


# -- the private broker ---------------------------------------------------------------------------


async def test_the_private_broker_takes_another_port_when_it_loses_the_race(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Another process binds the port between the demo's choice and mosquitto's bind.
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind((LOOPBACK, 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    choices = iter([taken])
    real_free_port = servers.free_port
    monkeypatch.setattr(servers, "free_port", lambda: next(choices, None) or real_free_port())
    # Not under tmp_path: as root mosquitto runs as an unprivileged account, which cannot
    # enter /tmp/pytest-of-root (0700); the demo's own folder is 0711 for the same reason.
    folder = Path(tempfile.mkdtemp(prefix="edge-agent-demo-test-"))
    await asyncio.to_thread(folder.chmod, 0o711)
    broker = private_mosquitto(folder / "broker", servers.server_account())
    try:
        await broker.start()
        assert broker.port not in (0, taken)
        assert broker.running
        _, writer = await asyncio.open_connection(LOOPBACK, broker.port)
        writer.close()
        config = broker.config_path.read_text()
        assert f"listener {broker.port} 127.0.0.1" in config
        assert "allow_anonymous true" in config
        assert "persistence false" in config
        assert "Address already in use" in broker.log_path.read_text()
    finally:
        await broker.stop()
        squatter.close()
        shutil.rmtree(folder)
    assert not broker.running


async def test_without_mosquitto_the_private_broker_is_amqtt_on_the_loopback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Another process binds the first port chosen: amqtt takes another one. Its log goes to
    # the demo's folder, not to the screen, and the logging is as before once it stopped.
    monkeypatch.setenv("EDGE_AGENT_MOSQUITTO", "")
    amqtt_logger = logging.getLogger("amqtt")
    handlers_before = list(amqtt_logger.handlers)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind((LOOPBACK, 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    choices = iter([taken])
    real_free_port = servers.free_port
    monkeypatch.setattr(demo_embedded, "free_port", lambda: next(choices, None) or real_free_port())
    try:
        broker, chosen = await start_private_broker(tmp_path / "broker")
        try:
            assert isinstance(broker, EmbeddedAmqtt)
            assert broker.port not in (0, taken)
            assert chosen.url == f"mqtt://127.0.0.1:{broker.port}"
            assert chosen.protocol == "3.1.1"
            assert listening_on(broker.port) == [f"0100007F:{broker.port:04X}"]
            # A connection closed before its CONNECT: amqtt logs an error with a traceback.
            _, writer = await asyncio.open_connection(LOOPBACK, broker.port)
            writer.close()
            await async_wait_until(lambda: "No data" in broker.log_path.read_text())
            assert amqtt_logger.propagate is False
        finally:
            await broker.stop()
    finally:
        squatter.close()
    assert not broker.running
    assert listening_on(broker.port) == []
    assert amqtt_logger.propagate is True
    assert amqtt_logger.handlers == handlers_before


class _Stubborn(servers.LoopbackServer):
    """A 'server' that ignores SIGTERM, as a hung broker would."""

    what = "stubborn"

    def _argv(self, port: int) -> list[str]:
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
        return [sys.executable, "-c", code]

    async def _answers(self, port: int) -> bool:
        return "up" in self.log_path.read_text()


async def test_a_server_that_does_not_stop_is_killed(tmp_path: Path) -> None:
    server = _Stubborn(tmp_path / "stubborn", None)
    await server.start()
    assert server.running
    await server.stop(grace=0.2)
    assert not server.running


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the servers as another account")
def test_as_root_the_demo_folder_is_where_the_servers_account_can_enter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(closed))
    assert temp_parent() == "/tmp"
    monkeypatch.setattr(tempfile, "gettempdir", lambda: "/tmp")
    assert temp_parent() is None


def test_mosquitto_is_found_in_sbin_or_where_edge_agent_mosquitto_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGE_AGENT_MOSQUITTO", "")
    assert demo_broker.find_mosquitto() is None
    monkeypatch.setenv("EDGE_AGENT_MOSQUITTO", sys.executable)
    assert demo_broker.find_mosquitto() == sys.executable


# -- the screen -----------------------------------------------------------------------------------

_EARLY = ShiftWindow(
    name="early",
    day=datetime(2026, 11, 29).date(),
    start=1000.0,
    end=2000.0,
    breaks=((1400.0, 1500.0),),
    planned=((1000.0, 1400.0), (1500.0, 2000.0)),
)


@pytest.mark.parametrize(
    ("window", "now", "label"),
    [
        (None, 1200.0, ""),
        (_EARLY, 1000.0, "early"),
        (_EARLY, 1399.9, "early"),
        (_EARLY, 1400.0, "early, break"),
        (_EARLY, 1499.9, "early, break"),
        (_EARLY, 1500.0, "early"),
    ],
)
def test_shift_label_says_when_the_figures_are_blank_for_a_break(
    window: ShiftWindow | None, now: float, label: str
) -> None:
    assert shift_label(window, now) == label


def test_the_table_has_a_shift_column_aligned_with_its_rows() -> None:
    header = header_row()
    assert header.split() == [
        "machine", "state", "availability", "performance", "quality", "OEE", "produced",
        "rejects", "shift",
    ]  # fmt: skip
    settings = load_agent_settings(REPO / "config" / "demo.toml")
    row = machine_row(settings.machines[0], None, None, None, 0.0)
    assert len(row.rstrip()) <= len(header)
    assert row.startswith("press ")


_REPORT = {"availability": 0.9, "performance": 0.8, "quality": 1.0, "oee": 0.72}


@pytest.mark.parametrize(
    ("report", "waiting", "cells"),
    [
        # Nothing computed yet: the cells say why, no bare dashes.
        (None, "waiting for the first state", ["waiting for the first state"]),
        (None, "its device is down", ["its device is down"]),
        # Running but no part counted yet: performance 0 % and quality undefined mean nothing.
        (
            {**_REPORT, "performance": 0.0, "quality": None, "produced_quantity": 0},
            "",
            ["90.0%", WAITING_FOR_COUNTS],
        ),
        ({**_REPORT, "availability": None, "produced_quantity": 3}, "", ["no planned time yet"]),
        ({**_REPORT, "produced_quantity": 3}, "", ["90.0%", "80.0%", "100.0%", "72.0%"]),
    ],
)
def test_figure_cells_say_why_a_figure_is_missing(
    report: dict[str, object] | None, waiting: str, cells: list[str]
) -> None:
    text = figure_cells(report, waiting)
    assert [cell for cell in re.split(r"\s{2,}", text.strip())] == cells
    assert " - " not in f" {text} "
    assert len(text) == len(figure_cells({**_REPORT, "produced_quantity": 1}, ""))


def test_waiting_reason_names_what_is_missing() -> None:
    assert waiting_reason(None, None) == "starting"


def test_the_uplink_is_not_blamed_for_the_demos_own_stop() -> None:
    runtime = Runtime(load_agent_settings(REPO / "config" / "demo.toml"))
    assert uplink_line(runtime, "stopping") == "uplink:  stopping (the demo is ending)"
    assert uplink_line(runtime, "stopped") == "uplink:  stopped (the demo ended)"


def test_central_lines_say_live_only_or_what_is_stored() -> None:
    setup = Setup(
        broker_url="mqtt://127.0.0.1:41234",
        broker="private mosquitto",
        data_dir=Path("/tmp/demo"),
        live_root="demo",
        no_central="PostgreSQL is not installed",
    )
    assert central_lines(setup, None) == [
        "central: no central store: running live only (PostgreSQL is not installed)"
    ]
    where = "edge-agent ingest (in this process, ingest.toml) -> PostgreSQL 17 on 127.0.0.1:5"
    assert central_lines(setup, Central(where, "running", 1234, 1240)) == [
        f"central: {where}",
        "         stored centrally: 1,234 rows; acknowledged (watermark) up to seq 1,240",
    ]
    assert central_lines(setup, Central(where, "PostgreSQL did not start: x", None, None)) == [
        f"central: {where}",
        "         PostgreSQL did not start: x",
    ]
    assert setup.watch_command() == "mosquitto_sub -h 127.0.0.1 -p 41234 -t 'demo/#' -v"


@pytest.mark.parametrize(
    ("url", "command"),
    [
        ("mqtt://broker.plant", "mosquitto_sub -h broker.plant -p 1883 -t 'demo/#' -v"),
        (
            "mqtts://broker.plant",
            "mosquitto_sub -h broker.plant -p 8883 --capath /etc/ssl/certs -t 'demo/#' -v",
        ),
        ("mqtt://10.0.0.5:1884", "mosquitto_sub -h 10.0.0.5 -p 1884 -t 'demo/#' -v"),
    ],
)
def test_the_watch_command_for_a_broker_given_with_broker(url: str, command: str) -> None:
    setup = Setup(
        broker_url=url,
        broker="your broker",
        data_dir=Path("/tmp/demo"),
        live_root="demo",
        no_central="",
    )
    assert setup.watch_command() == command


def test_without_mosquitto_sub_the_watch_command_is_the_venvs_amqtt_sub() -> None:
    setup = Setup(
        broker_url="mqtt://127.0.0.1:41234",
        broker="private amqtt",
        data_dir=Path("/tmp/demo"),
        live_root="demo",
        no_central="",
        amqtt_sub=Path("/opt/edge-agent/.venv/bin/amqtt_sub"),
    )
    assert setup.watch_command() == (
        "/opt/edge-agent/.venv/bin/amqtt_sub --url mqtt://127.0.0.1:41234 -t 'demo/#'"
    )
