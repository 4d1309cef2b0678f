"""Benchmark: 5,000 OPC UA monitored items changing every second, subscribed by `edge-agent run`.

The simulator runs as its own process (every bulk variable changes once per simulated second,
spread over the second), the agent as another; a subscriber in this process measures when
each value arrives. This process also plays the central store (it acknowledges every S/sync
batch at once), so the agent's CPU includes the whole durable path: outbox commits and S/sync
batches.

Prints: notifications per second handled (= value changes published to
MQTT), agent CPU % of one core, RSS, p50/p99 delay from the value's SourceTimestamp to the
subscriber; beside it the driver alone (no pipeline, no MQTT) in this process, same
simulator. In the same run, the raw limits of the same work with the bare libraries
(asyncua subscription notifications, paho QoS 1 retained publishes, sqlite3 grouped inserts)
and their sum at the measured rate, as % of one core. No asserts: figures only.
Also whether mosquitto logged dropping messages toward the subscriber (its queue limit).

    .venv/bin/python bench/opcua_subscribe.py            # 60 s measurement
    .venv/bin/python bench/opcua_subscribe.py --quick    # a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.line_scale import (  # noqa: E402
    add_broker_inflight,
    agent_metrics,
    bare_client,
    broker_extra_config,
    delta,
    host_reference_ms,
    raw_asyncua,
    raw_paho,
    raw_sqlite,
    start_agent,
)
from drivers.opcua.config import OpcUaDeviceConfig  # noqa: E402
from drivers.opcua.driver import OpcUaDriver  # noqa: E402
from sync.events import Event, parse_rfc3339  # noqa: E402
from sync.mqtt.client import Message, MqttClient, NotConnected  # noqa: E402
from sync.uplink.topics import live_topic, sample_payload  # noqa: E402
from tests.fixtures.mosquitto import MosquittoBroker  # noqa: E402
from tests.fixtures.ports import free_port, port_accepts, wait_until  # noqa: E402

ROOT = "bench/line/opcua"
SYNC, ACK = "edge/bench/sync", "edge/bench/ack"  # {sync_prefix}/{gateway.id}/sync|ack


def config(
    broker: MosquittoBroker, port: int, items: int, interval: str, data_dir: Path, http_port: int
) -> str:
    """Agent config: one OPC UA device subscribing to Bulk.0000 .. Bulk.{items-1}."""
    lines = [
        "[gateway]",
        'id = "bench"',
        'site = "bench"',
        'area = "line"',
        'line = "opcua"',
        f'data_dir = "{data_dir}"',
        "[mqtt]",
        f'url = "{broker.url}"',
        "[http]",
        f'listen = "127.0.0.1:{http_port}"',
        "[[devices]]",
        'name = "plc"',
        'driver = "opcua"',
        f'url = "opc.tcp://127.0.0.1:{port}"',
        f'publishing_interval = "{interval}"',
        'timeout = "2s"',
        'max_interval = "1h"',
    ]
    for i in range(items):
        lines += [
            "[[devices.tags]]",
            f'name = "b{i}"',
            f'node_id = "ns=2;s=Bulk.{i:04d}"',
            f'sampling_interval = "{interval}"',
        ]
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
    """Counts live messages and records SourceTimestamp-to-arrival delays after `start()`;
    acknowledges S/sync batches. Use as ``async with Subscriber(broker) as subscriber``.

    It runs on this process's event loop with the project's MQTT client. With paho in a thread
    (until 2026-11-29) the subscriber alone took ~40 % of one core on this 2-core machine,
    which also runs the simulator, the broker and the agent: the simulator then no longer
    produced 5,000 changes per second on a slow host.
    """

    def __init__(self, broker: MosquittoBroker) -> None:
        self.count = 0
        self.delays: list[float] = []
        self.recording = False
        self.client = MqttClient(
            host=broker.host, port=broker.port, client_id="bench-subscriber", name="subscriber"
        )
        self._acked: dict[str, int] = {}

    async def __aenter__(self) -> Subscriber:
        await self.client.__aenter__()
        self.client.subscribe(f"{ROOT}/plc/#", self._on_live, qos=1)
        self.client.subscribe(SYNC, self._on_sync, qos=1)
        async with asyncio.timeout(10):
            await self.client.wait_connected()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(None, None, None)

    def _on_sync(self, message: Message) -> None:
        # Plays the central store: acknowledges the contiguous watermark of the durable path
        # at once, so that the agent's outbox stays small and nothing is resent.
        batch = json.loads(message.payload)
        stream, first, last = str(batch["stream"]), batch["first_seq"], batch["last_seq"]
        assert isinstance(first, int)
        assert isinstance(last, int)
        acked = self._acked.get(stream, first - 1)
        if first <= acked + 1:
            acked = max(acked, last)
        self._acked[stream] = acked
        with contextlib.suppress(NotConnected):  # the agent resends what is not acknowledged
            self.client.publish(ACK, json.dumps({"stream": stream, "acked_seq": acked}).encode())

    def _on_live(self, message: Message) -> None:
        arrived = time.time()
        self.count += 1
        if self.recording and not message.retain:
            ts = json.loads(message.payload)["ts"]
            self.delays.append(arrived - parse_rfc3339(ts))

    def start(self) -> int:
        """Begin recording delays; returns the message count so far."""
        self.recording = True
        self.delays.clear()
        return self.count

    def stop(self) -> tuple[int, list[float]]:
        """Stop recording; (message count, delays)."""
        self.recording = False
        return self.count, sorted(self.delays)


def start_simulator(port: int, control: int, items: int) -> subprocess.Popen[bytes]:
    """The OPC UA simulator as its own process, every bulk variable changing each second."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.opcua",
            "--port",
            str(port),
            "--control-port",
            str(control),
            "--bulk",
            str(items),
            "--bulk-change-fraction",
            "1.0",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    wait_until(lambda: port_accepts("127.0.0.1", control), timeout=60, message="simulator")
    return process


async def driver_alone(
    port: int, items: int, interval: float, seconds: float
) -> tuple[float, float, list[float]]:
    """The OPC UA driver without pipeline and MQTT, in this process: (notifications/s, CPU %
    of one core, sorted SourceTimestamp-to-driver delays)."""
    tags = [{"name": f"b{i}", "node_id": f"ns=2;s=Bulk.{i:04d}"} for i in range(items)]
    config = OpcUaDeviceConfig.model_validate(
        {
            "name": "plc",
            "driver": "opcua",
            "url": f"opc.tcp://127.0.0.1:{port}",
            "publishing_interval": f"{interval}s",
            "timeout": "2s",
            "tags": tags,
        }
    )
    delays: list[float] = []
    async with OpcUaDriver(config) as driver:
        stream = driver.subscriptions()
        assert stream is not None
        count = 0
        async for batch in stream:  # the initial values (old SourceTimestamps)
            count += len(batch)
            if count >= items:
                break
        count = 0
        cpu0, t0 = time.process_time(), time.monotonic()
        async for batch in stream:
            now = time.time()
            count += len(batch)
            delays.extend(now - reading.ts for reading in batch)
            if time.monotonic() - t0 >= seconds:
                break
        elapsed = time.monotonic() - t0
        return count / elapsed, (time.process_time() - cpu0) / elapsed * 100, sorted(delays)


# The outbox commits every commit_interval (50 ms): at 5,000 values/s about 250 per transaction.
RAW_SQLITE_GROUP = 250


async def raw_limits(
    broker: MosquittoBroker, port: int, items: int, interval: float, quick: bool, workdir: Path
) -> dict[str, float]:
    """CPU µs per value of the bare libraries doing the agent's work for one changed value."""
    seconds = 2.0 if quick else 10.0
    nodes = [f"Bulk.{i:04d}" for i in range(items)]
    asyncua_us, _ = await raw_asyncua(port, nodes, seconds, interval * 1000.0)
    now = time.time()
    events = [
        Event(now + i * 2e-4, "sample", "plc", f"b{i % items}", i * 0.37, "good")
        for i in range(20_000 if quick else 200_000)
    ]
    sqlite_us = min(raw_sqlite(workdir / f"raw{i}.db", events, RAW_SQLITE_GROUP) for i in range(3))
    topics = [live_topic(ROOT, "plc", f"b{i}") for i in range(items)]
    payloads = [sample_payload(now + i * 1e-3, i * 0.37, "good") for i in range(1000)]
    publishes = 2_000 if quick else 20_000
    paho_us = min(
        [await asyncio.to_thread(raw_paho, broker, topics, payloads, publishes) for _ in range(3)]
    )
    client_us = min([await bare_client(broker, topics, payloads, publishes) for _ in range(3)])
    return {
        "asyncua": asyncua_us,
        "paho": paho_us,
        "sqlite3": sqlite_us,
        "sync.mqtt": client_us,
    }


def log_time(line: str) -> float:
    """Epoch seconds of a mosquitto log line (`log_timestamp_format %Y-%m-%dT%H:%M:%S`)."""
    stamp = line.split(": ", 1)[0]
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))


def percentile(values: list[float], fraction: float) -> float:
    """The value at `fraction` of a sorted list."""
    return values[min(len(values) - 1, int(len(values) * fraction))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--publishing-interval", default="100ms")
    add_broker_inflight(parser)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.items = 4.0, 5.0, 300
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    interval = float(args.publishing_interval.removesuffix("ms")) / 1000.0

    reference_before = host_reference_ms()
    broker = MosquittoBroker(extra_config=broker_extra_config(args.broker_inflight))
    broker.start()
    port, control, http_port = free_port(), free_port(), free_port()
    simulator = start_simulator(port, control, args.items)
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    config_path = workdir / "agent.toml"
    config_path.write_text(
        config(broker, port, args.items, args.publishing_interval, workdir / "data", http_port)
    )
    async with Subscriber(broker) as subscriber:
        agent = start_agent(config_path)
        agent_start = time.time()
        try:
            await asyncio.sleep(args.warmup)
            metrics0 = await agent_metrics(http_port)
            messages0 = subscriber.start()
            window_start = time.time()
            others = {
                "simulator": simulator.pid,
                "mosquitto": broker.pid or 0,
                "bench process (subscriber, acks)": os.getpid(),
            }
            others0 = {name: cpu_seconds(pid) for name, pid in others.items()}
            cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
            await asyncio.sleep(args.seconds)
            elapsed = time.monotonic() - t0
            window_end = time.time()
            cpu = cpu_seconds(agent.pid) - cpu0
            rss = rss_mib(agent.pid)
            load = {
                name: (cpu_seconds(pid) - others0[name]) / elapsed for name, pid in others.items()
            }
            messages, delays = subscriber.stop()
            messages -= messages0
            metrics1 = await agent_metrics(http_port)
        finally:
            agent.terminate()
            agent.wait(timeout=30)
    try:
        alone_rate, alone_cpu, alone_delays = await driver_alone(
            port, args.items, interval, min(args.seconds, 20.0)
        )
        raw = await raw_limits(broker, port, args.items, interval, args.quick, workdir)
    finally:
        simulator.terminate()
        simulator.wait(timeout=30)
        # mosquitto drops QoS 1 messages for a subscriber whose queue is full (its
        # max_queued_messages) and says so once per episode at NOTICE level: the subscriber's
        # count would then be short of what the agent sent, without an error anywhere.
        drops = [line for line in broker.log_text().splitlines() if "being dropped" in line]
        broker.close()
        shutil.rmtree(workdir, ignore_errors=True)
    reference_after = host_reference_ms()
    print(
        f"edge-agent OPC UA subscription benchmark ({args.items} monitored items changing "
        f"every second, publishing interval {args.publishing_interval})"
    )
    print(f"  window                      {elapsed:.1f} s after {args.warmup:.0f} s warm-up")
    inflight = "20 (mosquitto's default)" if args.broker_inflight is None else args.broker_inflight
    print(f"  broker Receive Maximum      {inflight} QoS 1 messages in flight per client")
    print(
        f"  host speed                  reference loop {reference_before:.0f} ms before, "
        f"{reference_after:.0f} ms after (CPython, best of 5; lower is faster)"
    )
    print(
        f"  notifications handled       {messages / elapsed:.0f} /s (values published to MQTT; "
        f"the simulator is set to {args.items} changes/s)"
    )
    in_window = [line for line in drops if window_start - 1 <= log_time(line) <= window_end + 1]
    print(
        f"  broker drops to subscriber  {len(in_window)} episodes in the window, "
        f"{len(drops) - len(in_window)} outside it (mosquitto log"
        + "".join(
            f"; {log_time(line) - agent_start:+.0f} s after the agent started" for line in drops
        )
        + ")"
    )
    print(
        "  in the agent (/metrics)     "
        f"{delta(metrics1, metrics0, 'edge_agent_events_total'):.0f} readings accepted, "
        f"{delta(metrics1, metrics0, 'edge_agent_live_published_total'):.0f} live values "
        f"published, the subscriber received {messages} (window edges: values in flight)"
    )
    print(f"  agent CPU                   {cpu / elapsed * 100:.1f} % of one core")
    print(f"  agent RSS                   {rss:.1f} MiB")
    if delays:
        print(
            f"  SourceTimestamp -> subscriber  p50 {percentile(delays, 0.5) * 1000:.0f} ms, "
            f"p99 {percentile(delays, 0.99) * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms "
            f"({len(delays)} values)"
        )
    print(
        f"  driver alone (same server)  {alone_rate:.0f} notifications/s at "
        f"{alone_cpu:.1f} % of one core (decode + Reading, no pipeline, no MQTT)"
    )
    if alone_delays:
        print(
            f"  SourceTimestamp -> driver   p50 {percentile(alone_delays, 0.5) * 1000:.0f} ms, "
            f"p99 {percentile(alone_delays, 0.99) * 1000:.0f} ms (driver alone)"
        )
    rate = messages / elapsed
    client_us = raw.pop("sync.mqtt")
    raw_sum = sum(raw.values())
    agent_us = cpu / max(messages, 1) * 1e6
    print(
        "  raw libraries, same run     "
        + ", ".join(f"{name} {us:.1f}" for name, us in raw.items())
        + f" = {raw_sum:.1f} µs CPU per value"
    )
    print(
        f"  the agent's MQTT client     sync.mqtt alone {client_us:.1f} µs per QoS 1 retained "
        f"publish + PUBACK (paho {raw['paho']:.1f})"
    )
    print(
        f"  raw sum at {rate:.0f} values/s  {raw_sum * rate / 1e4:.1f} % of one core; agent "
        f"{agent_us:.1f} µs per value = {agent_us / raw_sum:.2f}x the raw sum"
    )
    print(
        f"  same machine ({os.cpu_count()} cores)   "
        + ", ".join(f"{name} {share * 100:.0f} %" for name, share in load.items())
    )


if __name__ == "__main__":
    uvloop.run(main())
