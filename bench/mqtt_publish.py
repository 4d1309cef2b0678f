"""Benchmark: CPU per QoS 1 retained publish, the project's MQTT client beside paho-mqtt.

The live path publishes every changed value as its own retained QoS 1 message (docs/topics.md),
so the client's cost per publish and PUBACK is most of the agent's MQTT CPU; the project wrote
its own client (sync/mqtt/) because paho cost several times more (issue #19 asks to keep ours at
or below a quarter of paho's). This sends `--messages` (100,000) retained QoS 1 publishes over
`--topics` (10,000) live topics to a private mosquitto and measures the CPU time of this process
(every thread) from the first publish to the last PUBACK, median of `--runs` (3), for:

* sync.mqtt, the project's client (`line_scale.bare_client`; its in-flight window: the
  broker's Receive Maximum);
* paho-mqtt on asyncio without a thread (its socket in the event loop: add_reader/add_writer
  calling loop_read/loop_write, loop_misc every second, as paho's examples/loop_asyncio.py);
* paho-mqtt with its own network thread (`loop_start()`), publishing from the main thread.

Each runs against a broker with each of `--windows` (20, mosquitto's default
max_inflight_messages, which it announces as its MQTT 5 Receive Maximum; and 100); both paho
variants are held to the same window. The runs are interleaved so that a host's drift
affects all alike. Figures only, no asserts.

    .venv/bin/python bench/mqtt_publish.py                   # ~2 minutes
    .venv/bin/python bench/mqtt_publish.py --windows 20 --runs 5
    .venv/bin/python bench/mqtt_publish.py --quick           # a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from bench.line_scale import bare_client, host_reference_ms  # noqa: E402
from sync.uplink.topics import live_topic, sample_payload  # noqa: E402
from tests.fixtures.mosquitto import MosquittoBroker  # noqa: E402

ROOT = "bench/publish"
CONNECT_TIMEOUT = 10.0

Work = tuple[list[str], list[bytes], int]  # topics, payloads, messages to send


def work(topics: int, messages: int) -> Work:
    """The live topics and one sample payload per topic (values differ, like live values)."""
    names = [live_topic(ROOT, f"plc{i // 1000}", f"Tag.{i:05d}") for i in range(topics)]
    now = time.time()
    payloads = [sample_payload(now, 20.0 + i / 100, "good") for i in range(topics)]
    return names, payloads, messages


async def ours(broker: MosquittoBroker, job: Work, window: int) -> float:
    """The project's client, as `line_scale.py` measures it (`bare_client`: fire-and-forget
    publishes as the live publisher sends them, waiting for window space); its window is the
    broker's Receive Maximum, `window`."""
    topics, payloads, count = job
    return await bare_client(broker, topics, payloads, count)


def paho_client(name: str, window: int) -> paho.Client:
    """A paho MQTT 5 client holding at most `window` QoS 1 messages in flight."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-{name}-{os.getpid()}", protocol=paho.MQTTv5
    )
    client.max_inflight_messages_set(window)
    return client


class PahoOnAsyncio:
    """paho's socket driven by the running event loop: no thread (paho's loop_asyncio example)."""

    def __init__(self, client: paho.Client) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.misc: asyncio.Task[None] | None = None
        client.on_socket_open = self.on_socket_open
        client.on_socket_close = self.on_socket_close
        client.on_socket_register_write = self.on_socket_register_write
        client.on_socket_unregister_write = self.on_socket_unregister_write

    def on_socket_open(self, client: paho.Client, _userdata: Any, sock: socket.socket) -> None:
        self.loop.add_reader(sock, client.loop_read)
        self.misc = self.loop.create_task(self.misc_loop())

    def on_socket_close(self, _client: paho.Client, _userdata: Any, sock: socket.socket) -> None:
        self.loop.remove_reader(sock)
        if self.misc is not None:
            self.misc.cancel()

    def on_socket_register_write(
        self, client: paho.Client, _userdata: Any, sock: socket.socket
    ) -> None:
        self.loop.add_writer(sock, client.loop_write)

    def on_socket_unregister_write(
        self, _client: paho.Client, _userdata: Any, sock: socket.socket
    ) -> None:
        self.loop.remove_writer(sock)

    async def misc_loop(self) -> None:
        """Keep-alive and retries, once a second."""
        while True:
            await asyncio.sleep(1)
            if self.client.loop_misc() != paho.MQTT_ERR_SUCCESS:
                return


async def paho_asyncio(broker: MosquittoBroker, job: Work, window: int) -> float:
    """paho on the event loop: publish while the window has room, await PUBACKs (on_publish)."""
    topics, payloads, count = job
    client = paho_client("paho-asyncio", window)
    PahoOnAsyncio(client)
    connected = asyncio.Event()
    freed = asyncio.Event()
    acked = 0

    def on_publish(*_: Any) -> None:
        nonlocal acked
        acked += 1
        freed.set()

    client.on_connect = lambda *_: connected.set()
    client.on_publish = on_publish
    client.connect(broker.host, broker.port)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await connected.wait()
        cpu0 = time.process_time()
        sent = 0
        while acked < count:
            while sent < count and sent - acked < window:
                index = sent % len(topics)
                client.publish(topics[index], payloads[index], qos=1, retain=True)
                sent += 1
            freed.clear()
            if acked < count:
                await freed.wait()
        return (time.process_time() - cpu0) / count * 1e6
    finally:
        client.disconnect()
        await asyncio.sleep(0)  # let the loop run the socket-close callbacks


def paho_thread(broker: MosquittoBroker, job: Work, window: int) -> float:
    """paho with `loop_start()`: its network thread reads and writes, this thread publishes
    while the window has room and waits on a condition for PUBACKs."""
    topics, payloads, count = job
    client = paho_client("paho-thread", window)
    connected = threading.Event()
    freed = threading.Condition()
    acked = 0

    def on_publish(*_: Any) -> None:
        nonlocal acked
        with freed:
            acked += 1
            freed.notify()

    client.on_connect = lambda *_: connected.set()
    client.on_publish = on_publish
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        if not connected.wait(CONNECT_TIMEOUT):
            raise TimeoutError("paho (loop_start) did not connect")
        sent = 0

        def room() -> bool:
            return sent - acked < window

        cpu0 = time.process_time()
        while sent < count:
            with freed:
                freed.wait_for(room)
            index = sent % len(topics)
            client.publish(topics[index], payloads[index], qos=1, retain=True)
            sent += 1
        with freed:
            freed.wait_for(lambda: acked >= count)
        return (time.process_time() - cpu0) / count * 1e6
    finally:
        client.disconnect()
        client.loop_stop()


VARIANTS: dict[str, Callable[[MosquittoBroker, Work, int], Awaitable[float]]] = {
    "sync.mqtt (this project)": ours,
    "paho, asyncio, no thread": paho_asyncio,
    "paho, loop_start() thread": lambda broker, job, window: asyncio.to_thread(
        paho_thread, broker, job, window
    ),
}


async def measure(job: Work, window: int, runs: int) -> dict[str, float]:
    """Median CPU µs per message of every variant against one broker with this window."""
    broker = MosquittoBroker(extra_config=[f"max_inflight_messages {window}"])
    broker.start()
    try:
        samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(runs):
            for name, variant in VARIANTS.items():
                samples[name].append(await variant(broker, job, window))
        return {name: statistics.median(values) for name, values in samples.items()}
    finally:
        broker.close()


def table(results: dict[int, dict[str, float]]) -> list[str]:
    """The results as text: µs per message per window, and ours as a share of paho's."""
    windows = list(results)
    width = max(len(name) for name in VARIANTS) + len("ours / ") + 2
    head = "".join(f"{'window ' + str(w):>14}" for w in windows)
    lines = [f"{'CPU µs per publish + PUBACK':<{width}}{head}"]
    for name in VARIANTS:
        lines.append(f"{name:<{width}}" + "".join(f"{results[w][name]:>14.1f}" for w in windows))
    ours_name = next(iter(VARIANTS))
    for name in list(VARIANTS)[1:]:
        shares = "".join(f"{results[w][ours_name] / results[w][name]:>14.2f}" for w in windows)
        lines.append(f"{'ours / ' + name:<{width}}{shares}")
    return lines


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--topics", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--windows",
        default="20,100",
        help="mosquitto max_inflight_messages values (its MQTT 5 Receive Maximum), comma-separated",
    )
    parser.add_argument("--quick", action="store_true", help="2,000 messages, 1 run (smoke test)")
    args = parser.parse_args()
    messages, topics, runs = args.messages, args.topics, args.runs
    if args.quick:
        messages, topics, runs = 2_000, 200, 1
    windows = [int(text) for text in args.windows.split(",")]
    job = work(topics, messages)
    reference = host_reference_ms(runs=1 if args.quick else 5)
    results = {window: await measure(job, window, runs) for window in windows}
    version = importlib.metadata.version("paho-mqtt")
    print(
        f"MQTT publish cost: {messages:,} QoS 1 retained publishes over {topics:,} topics to a "
        f"private mosquitto, CPU of this process (all threads) to the last PUBACK, median of "
        f"{runs}; paho-mqtt {version}, MQTT 5 for all"
    )
    print(f"host reference: {reference:.0f} ms CPU for 2,000,000 Python loop steps")
    for line in table(results):
        print("  " + line)


if __name__ == "__main__":
    uvloop.run(main())
