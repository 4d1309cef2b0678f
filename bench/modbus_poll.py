"""Benchmark: 5,000 Modbus tags on 5 simulated devices polled at 1 s by `edge-agent run`.

Prints: Modbus requests per cycle, agent CPU % of one core, RSS, p50/p99 delay from a register
change in the simulator to its MQTT message at a subscriber; beside it the raw pymodbus read
rate (and CPU per request) measured in the same run. No asserts: figures only.

    .venv/bin/python bench/modbus_poll.py            # 60 s measurement
    .venv/bin/python bench/modbus_poll.py --quick    # a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from pymodbus.client import AsyncModbusTcpClient  # noqa: E402

from bench.line_scale import start_agent  # noqa: E402
from simulators.modbus.server import ModbusSimulator  # noqa: E402
from tests.fixtures.mosquitto import MosquittoBroker  # noqa: E402

ROOT = "bench/line/modbus"
SYNC, ACK = "edge/bench/sync", "edge/bench/ack"  # {sync_prefix}/{gateway.id}/sync|ack
SPARE_START, SPARE_COUNT = 300, 100


def config(broker: MosquittoBroker, ports: list[int], tags_per_device: int, data_dir: Path) -> str:
    """Agent config: N devices, each with bulk tags plus the 100 spare registers."""
    lines = [
        "[gateway]",
        'id = "bench"',
        'site = "bench"',
        'area = "line"',
        'line = "modbus"',
        f'data_dir = "{data_dir}"',
        "[mqtt]",
        f'url = "{broker.url}"',
        "[http]",
        "enabled = false",
    ]
    for index, port in enumerate(ports):
        lines += [
            "[[devices]]",
            f'name = "plc{index}"',
            'driver = "modbus"',
            f'url = "tcp://127.0.0.1:{port}"',
            'poll_interval = "1s"',
            'timeout = "1s"',
            'max_interval = "1h"',
        ]
        bulk = tags_per_device - SPARE_COUNT
        for i in range(bulk):
            lines += [
                "[[devices.tags]]",
                f'name = "b{i}"',
                f'address = "hr:{1000 + index * 1000 + i}"',
            ]
        for i in range(SPARE_COUNT):
            lines += ["[[devices.tags]]", f'name = "s{i}"', f'address = "hr:{SPARE_START + i}"']
    return "\n".join(lines) + "\n"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident set size in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Subscriber:
    """Records arrival times of spare-register values (topic, value) -> monotonic time."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.arrivals: dict[tuple[str, int], float] = {}
        self.count = 0
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-subscriber")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"{ROOT}/#", qos=1)
        self.client.subscribe(SYNC, qos=1)
        self._acked: dict[str, int] = {}
        self.client.loop_start()

    def _ack(self, batch: dict[str, object]) -> None:
        # Plays the central store: acknowledges the contiguous watermark of the durable path
        # at once, so that the agent's outbox stays small and nothing is resent.
        stream, first, last = str(batch["stream"]), batch["first_seq"], batch["last_seq"]
        assert isinstance(first, int)
        assert isinstance(last, int)
        acked = self._acked.get(stream, first - 1)
        if first <= acked + 1:
            acked = max(acked, last)
        self._acked[stream] = acked
        self.client.publish(ACK, json.dumps({"stream": stream, "acked_seq": acked}), qos=1)

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        now = time.monotonic()
        if message.topic == SYNC:
            self._ack(json.loads(message.payload))
            return
        self.count += 1
        if message.topic.startswith(f"{ROOT}/plc0/s"):
            value = json.loads(message.payload)["value"]
            with self._lock:
                self.arrivals.setdefault((message.topic, value), now)

    def arrival(self, topic: str, value: int) -> float | None:
        """When (topic, value) first arrived."""
        with self._lock:
            return self.arrivals.get((topic, value))

    def close(self) -> None:
        """Stop."""
        self.client.loop_stop()
        self.client.disconnect()


async def raw_pymodbus_rate(port: int, seconds: float) -> tuple[float, float]:
    """Bare pymodbus: 125-register reads back to back; (requests/s, CPU µs per request)."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
    await client.connect()
    count = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        await client.read_holding_registers(1000 + (count % 40) * 125, count=125)
        count += 1
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    client.close()
    return count / elapsed, cpu / count * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--tags-per-device", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--change-fraction", type=float, default=1 / 3)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.devices, args.tags_per_device = 4.0, 2.0, 2, 300

    broker = MosquittoBroker()
    broker.start()
    simulators = [
        ModbusSimulator(
            port=0, seed=index + 1, speed=1.0, bulk_change_fraction=args.change_fraction
        )
        for index in range(args.devices)
    ]
    for simulator in simulators:
        await simulator.start()
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    config_path = workdir / "agent.toml"
    config_path.write_text(
        config(broker, [s.port for s in simulators], args.tags_per_device, workdir / "data")
    )
    subscriber = Subscriber(broker)
    agent = start_agent(config_path)
    writer = AsyncModbusTcpClient("127.0.0.1", port=simulators[0].port, timeout=1, retries=0)
    await writer.connect()
    delays: list[float] = []
    try:
        await asyncio.sleep(args.warmup)
        cpu0, t0, messages0 = cpu_seconds(agent.pid), time.monotonic(), subscriber.count
        pending: list[tuple[str, int, float]] = []
        rng = random.Random(7)
        next_change = time.monotonic()
        second = 0
        while time.monotonic() - t0 < args.seconds:
            # 10 spare registers change at a random moment in each second; odd and even seconds
            # use different halves, so no register changes twice within one poll interval.
            next_change += 1.0
            second += 1
            await asyncio.sleep(max(0.0, next_change - time.monotonic() - rng.random() * 0.9))
            half = range(second % 2, SPARE_COUNT, 2)
            for register in rng.sample(half, 10):
                value = rng.randrange(1, 60000)
                changed_at = time.monotonic()
                await writer.write_register(SPARE_START + register, value)
                pending.append((f"{ROOT}/plc0/s{register}", value, changed_at))
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(agent.pid) - cpu0
        messages = subscriber.count - messages0
        rss = rss_mib(agent.pid)
        await asyncio.sleep(3.0)  # let the last changes arrive
        for topic, value, changed_at in pending:
            arrived = subscriber.arrival(topic, value)
            if arrived is not None:
                delays.append(arrived - changed_at)
        lost = len(pending) - len(delays)
        writer.close()
        raw_rate, raw_cpu_us = await raw_pymodbus_rate(simulators[1 % args.devices].port, 5.0)
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        subscriber.close()
        for simulator in simulators:
            await simulator.close()
        broker.close()
        shutil.rmtree(workdir, ignore_errors=True)
    tags = args.devices * args.tags_per_device
    requests_per_cycle = args.devices * (-(-(args.tags_per_device - SPARE_COUNT) // 125) + 1)
    delays.sort()
    print(f"edge-agent modbus poll benchmark ({tags} tags, {args.devices} devices, 1 s poll)")
    print(f"  window                      {elapsed:.1f} s after {args.warmup:.0f} s warm-up")
    print(f"  Modbus requests per cycle   {requests_per_cycle}")
    print(f"  agent CPU                   {cpu / elapsed * 100:.1f} % of one core")
    print(f"  agent RSS                   {rss:.1f} MiB")
    print(f"  MQTT messages at subscriber {messages / elapsed:.0f} /s")
    if delays:
        p50 = statistics.median(delays)
        p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
        print(
            f"  change -> subscriber        p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
            f"({len(delays)} changes, {lost} not seen)"
        )
    agent_cpu_per_request = cpu / (elapsed * requests_per_cycle) * 1e6
    print(
        f"  raw pymodbus (same run)     {raw_rate:.0f} reads/s of 125 registers, "
        f"{raw_cpu_us:.0f} µs CPU per read"
    )
    print(
        f"  agent CPU per request       {agent_cpu_per_request:.0f} µs "
        f"= {agent_cpu_per_request / raw_cpu_us:.1f} x raw pymodbus (all work included)"
    )


if __name__ == "__main__":
    uvloop.run(main())
