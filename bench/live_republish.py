"""Benchmark: the live publisher re-sending every retained topic at once (as after a reconnect).

After every (re)connect the agent publishes the newest value of every live topic again, so
that the broker's retained state is current even after a restart without persistence. This
measures that burst against a private mosquitto: CPU µs per topic, wall time until every
PUBACK arrived, and the longest time the flush blocked the event loop (what the pollers
of a busy gateway would feel). Beside it, the project's MQTT client alone doing the same
publishes (`bench.line_scale.bare_client`), in the same run. No asserts: figures only.

    .venv/bin/python bench/live_republish.py                  # 50,000 topics
    .venv/bin/python bench/live_republish.py --topics 200000
    .venv/bin/python bench/live_republish.py --quick          # 2,000 topics (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.line_scale import (  # noqa: E402
    add_broker_inflight,
    bare_client,
    broker_extra_config,
)
from sync.mqtt.client import MqttClient  # noqa: E402
from sync.uplink.live import LivePublisher  # noqa: E402
from sync.uplink.topics import live_topic, sample_payload  # noqa: E402
from tests.fixtures.mosquitto import MosquittoBroker  # noqa: E402

ROOT = "bench/line/live"


async def longest_block(stop: asyncio.Event, period: float = 0.005) -> float:
    """The longest gap beyond `period` between two wake-ups of a ticking task, in seconds."""
    worst = 0.0
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(period)
        now = time.perf_counter()
        worst = max(worst, now - last - period)
        last = now
    return worst


async def republish(
    broker: MosquittoBroker, topics: list[str], payload: bytes
) -> tuple[float, float, float, int]:
    """Offer every topic, flush, wait for the PUBACKs: (CPU µs per topic, wall s, block s,
    the client's in-flight window)."""
    async with MqttClient(
        host=broker.host, port=broker.port, client_id=f"bench-live-{os.getpid()}"
    ) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        live = LivePublisher(client, topic_root=ROOT)
        stop = asyncio.Event()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for topic in topics:  # the newest values, before the flush (as on a reconnect)
            live.offer(topic, payload)
        async with asyncio.TaskGroup() as group:
            ticker = group.create_task(longest_block(stop), name="ticker")
            await live.drain()
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0
            stop.set()
        return cpu / len(topics) * 1e6, wall, ticker.result(), client.window


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--topics", type=int, default=50_000)
    add_broker_inflight(parser)
    parser.add_argument("--quick", action="store_true", help="2,000 topics (smoke test)")
    args = parser.parse_args()
    count = 2_000 if args.quick else args.topics
    topics = [live_topic(ROOT, f"plc{index // 1000}", f"Tag.{index:06d}") for index in range(count)]
    payload = sample_payload(time.time(), 21.5, "good")
    broker = MosquittoBroker(extra_config=broker_extra_config(args.broker_inflight))
    broker.start()
    try:
        live_us, wall, block, window = await republish(broker, topics, payload)
        bare_us = await bare_client(broker, topics, [payload], count)
    finally:
        broker.close()
    print(f"edge-agent live republish ({count:,} retained topics at once, as after a reconnect)")
    print(f"  in-flight window    {window} QoS 1 messages (the broker's Receive Maximum)")
    print(f"  live publisher      {live_us:.1f} µs CPU per topic, all PUBACKs after {wall:.2f} s")
    print(f"  event loop blocked  at most {block * 1000:.0f} ms at a time")
    print(
        f"  sync.mqtt alone     {bare_us:.1f} µs CPU per publish + PUBACK, same topics: "
        f"live publisher = {live_us / bare_us:.2f}x"
    )


if __name__ == "__main__":
    uvloop.run(main())
