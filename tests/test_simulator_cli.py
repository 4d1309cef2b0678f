"""`edge-agent simulate P` as a process (simulators/running.py): it prints where it listens and
answers its control port, SIGTERM ends it with 0, and a port already taken is one line on
stderr and exit code 1."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from simulators.control import send_control
from tests.fixtures.ports import free_port

REPO = Path(__file__).resolve().parent.parent


def simulate(protocol: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", f"simulators.{protocol}", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_modbus_serves_until_sigterm() -> None:
    port, control = free_port(), free_port()
    process = simulate("modbus", "--port", str(port), "--control-port", str(control))
    try:
        assert process.stdout is not None
        line = ""
        while "control on" not in line:
            line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
            assert line, "the simulator ended before listening"
        assert f"127.0.0.1:{control}" in line
        async with asyncio.timeout(10):
            assert await send_control(control, "ping") == ""
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("protocol", ["modbus", "opcua"])
def test_a_port_taken_is_one_line_and_exit_1(protocol: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = simulate(protocol, "--host", "127.0.0.1", "--port", str(port))
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"edge-agent simulate {protocol}: ")
