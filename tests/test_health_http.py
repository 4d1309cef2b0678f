"""/healthz /readyz /status /metrics of the running daemon, and `edge-agent status`."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from simulators.modbus.server import ModbusSimulator
from tests.fixtures.daemon import REPO, config_text, running, settings_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import async_wait_until, free_port


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def status_command(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "-c", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_endpoints_metrics_and_status(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        text = config_text(
            mosquitto, tmp_path / "data", [("press1", sim.port), ("gone", free_port())]
        )
        settings = settings_for(tmp_path, text)
        port = int(settings.http.listen.rsplit(":", 1)[1])
        async with running(settings) as runtime:
            await async_wait_until(lambda: runtime.pollers["press1"].polls >= 2, timeout=10)
            await async_wait_until(
                lambda: runtime.gateway is not None and runtime.gateway.mqtt.is_connected,
                timeout=10,
            )
            assert await asyncio.to_thread(get, port, "/healthz") == (200, b'{"status":"alive"}')
            code, body = await asyncio.to_thread(get, port, "/readyz")
            assert (code, json.loads(body)) == (200, {"ready": True, "problems": []})
            code, body = await asyncio.to_thread(get, port, "/status")
            status = json.loads(body)
            assert status["devices"]["press1"] == "up"
            assert status["devices"]["gone"] in ("down", "open")
            assert status["uplink"] == "up"
            assert status["committed_seq"] >= 1
            code, body = await asyncio.to_thread(get, port, "/metrics")
            families = {f.name: f for f in text_string_to_metric_families(body.decode())}
            assert code == 200
            up = {s.labels["device"]: s.value for s in families["edge_agent_device_up"].samples}
            assert up == {"press1": 1.0, "gone": 0.0}
            durations = [
                s
                for s in families["edge_agent_poll_duration_seconds"].samples
                if s.name.endswith("_count") and s.labels["device"] == "press1"
            ]
            assert durations[0].value >= 2
            assert families["edge_agent_mqtt_connected"].samples[0].value == 1.0
            assert families["edge_agent_outbox_committed_seq"].samples[0].value >= 1
            assert "edge_agent_sync_batches_sent" in families
            # at least one task per device poller, plus the uplink's and the HTTP server's
            assert families["edge_agent_asyncio_tasks"].samples[0].value >= 4
            assert (await asyncio.to_thread(get, port, "/nope"))[0] == 404
            result = await asyncio.to_thread(status_command, tmp_path / "agent.toml")
            assert result.returncode == 1, result.stdout + result.stderr  # "gone" is down
            assert "devices    1/2 up" in result.stdout
            assert "degraded: device gone " in result.stdout
            assert "cannot connect" in result.stdout
    result = await asyncio.to_thread(status_command, tmp_path / "agent.toml")
    assert result.returncode == 3  # unreachable (2: bad config or usage)
    assert "unreachable" in result.stderr


async def test_status_healthy(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        settings = settings_for(
            tmp_path, config_text(mosquitto, tmp_path / "data", [("press1", sim.port)])
        )
        async with running(settings) as runtime:
            await async_wait_until(lambda: runtime.pollers["press1"].state == "up", timeout=10)
            await async_wait_until(
                lambda: runtime.gateway is not None and runtime.gateway.mqtt.is_connected,
                timeout=10,
            )
            result = await asyncio.to_thread(status_command, tmp_path / "agent.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status     healthy" in result.stdout


def documented_metrics() -> set[str]:
    """Every metric named in docs/install.md's table (family names: without `_total`)."""
    names: set[str] = set()
    for line in (REPO / "docs" / "install.md").read_text().splitlines():
        if line.startswith("| `edge_agent_"):
            first_column = line.split(" | ")[0]
            names.update(
                name.removesuffix("_total")
                for name in re.findall(r"`(edge_agent_[a-z_]+)", first_column)
            )
    return names


async def test_every_documented_metric_is_served(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    documented = documented_metrics()
    assert len(documented) > 40
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        text = config_text(mosquitto, tmp_path / "data", [("press1", sim.port)])
        # With [sparkplug] enabled: its node's figures are documented too.
        text = text.replace(
            "\n[http]", '\n[sparkplug]\nenabled = true\ngroup_id = "plant1"\n\n[http]', 1
        )
        settings = settings_for(tmp_path, text)
        port = int(settings.http.listen.rsplit(":", 1)[1])
        async with running(settings) as runtime:
            await async_wait_until(lambda: runtime.pollers["press1"].polls >= 2, timeout=10)
            code, body = await asyncio.to_thread(get, port, "/metrics")
    served = {family.name for family in text_string_to_metric_families(body.decode())}
    assert code == 200
    assert documented - served == set()


def get_with(port: int, path: str, authorization: str | None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of GET path with this Authorization header."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def test_off_loopback_the_status_needs_the_token(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    token = "s3cret-page-token"
    (tmp_path / "http.token").write_text(token + "\n")
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        text = config_text(mosquitto, tmp_path / "data", [("press1", sim.port)])
        port = free_port()
        text = text.replace(
            '[http]\nlisten = "127.0.0.1:',
            f'[http]\ntoken_file = "http.token"\nlisten = "0.0.0.0:{port}"\n# was "127.0.0.1:',
        )
        settings = settings_for(tmp_path, text)
        assert settings.http.listen == f"0.0.0.0:{port}"
        async with running(settings) as runtime:
            await async_wait_until(lambda: runtime.pollers["press1"].state == "up", timeout=10)
            basic = base64.b64encode(f"anyone:{token}".encode()).decode()
            answers = {
                (path, auth): await asyncio.to_thread(get_with, port, path, auth)
                for path in ("/healthz", "/readyz", "/metrics", "/status")
                for auth in (None, f"Bearer {token}", f"Basic {basic}", "Bearer wrong")
            }
            result = await asyncio.to_thread(status_command, tmp_path / "agent.toml")
    for (path, auth), (code, headers, body) in answers.items():
        assert headers["X-Content-Type-Options"] == "nosniff"
        policy = headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert token not in body.decode()
        if path == "/status" and auth in (None, "Bearer wrong"):
            assert code == 401, (path, auth)
            assert headers["WWW-Authenticate"].startswith('Basic realm="edge-agent"')
        else:
            assert code in (200, 503), (path, auth)  # /readyz may be 503 before the uplink
    # `edge-agent status` sends the token from the same file.
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert "devices    1/1 up" in result.stdout


async def test_metrics_may_need_the_token_too(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    text = config_text(mosquitto, tmp_path / "data", [])
    text = text.replace("[http]\n", '[http]\ntoken = "t0ken"\nmetrics_open = false\n')
    settings = settings_for(tmp_path, text)
    port = settings.http.port
    async with running(settings):
        closed = await asyncio.to_thread(get_with, port, "/metrics", None)
        opened = await asyncio.to_thread(get_with, port, "/metrics", "Bearer t0ken")
        probe = await asyncio.to_thread(get_with, port, "/healthz", None)
        posted = await asyncio.to_thread(post, port, "/status", "Bearer t0ken")
    assert closed[0] == 401
    assert opened[0] == 200
    assert (probe[0], probe[2]) == (200, b'{"status":"alive"}')
    assert posted == 405  # read-only: no route takes anything but GET


def post(port: int, path: str, authorization: str) -> int:
    """The status of POST path."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}", method="POST")
    request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
