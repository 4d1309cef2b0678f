"""Benchmark: CPU per value with the Sparkplug B edge node on, beside the JSON topics only.

The same committed sample events (devices x tags, every value changed, one batch per device
and round as a poll delivers them, each round published before the next) are offered to the
sinks of a gateway, against a private mosquitto, in interleaved runs: the live JSON publisher
alone (every value its own retained QoS 1 message, until its PUBACK), and the live publisher
with the Sparkplug node beside it (one DDATA per batch, protobuf, QoS 0; on its own
connection, born before the clock starts). The figure is the process's CPU time divided by the
values; median of `--runs`. The difference of the two is what Sparkplug adds per value.
No asserts: figures only.

    .venv/bin/python bench/sparkplug.py                  # 20 devices x 50 tags x 100 rounds
    .venv/bin/python bench/sparkplug.py --rounds 300 --runs 5
    .venv/bin/python bench/sparkplug.py --quick          # 2 devices x 10 tags x 20 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sync.events import Event  # noqa: E402
from sync.mqtt.client import MqttClient, Will  # noqa: E402
from sync.sparkplug.bdseq import BdSeq  # noqa: E402
from sync.sparkplug.codec import DataType  # noqa: E402
from sync.sparkplug.history import History  # noqa: E402
from sync.sparkplug.model import DeviceModel, NodeModel, NodeStatus, TagModel  # noqa: E402
from sync.uplink.live import LivePublisher  # noqa: E402
from sync.uplink.sparkplug.node import SparkplugNode  # noqa: E402
from tests.fixtures.mosquitto import MosquittoBroker  # noqa: E402
from tests.fixtures.ports import async_wait_until  # noqa: E402

ROOT = "bench/sparkplug/live"


def batches(devices: int, tags: int, rounds: int) -> list[list[Event]]:
    """One batch per device and round, every tag changed (a float, as most PLC values)."""
    start = time.time()
    return [
        [
            Event(start + r * 0.001, "sample", f"dev{d}", f"tag{t}", r + t / 1000, "good")
            for t in range(tags)
        ]
        for r in range(rounds)
        for d in range(devices)
    ]


def model(devices: int, tags: int) -> NodeModel:
    """The node's devices: the same names, Double tags."""
    return NodeModel(
        "bench",
        "node1",
        None,
        "bench",
        tuple(
            DeviceModel(f"dev{d}", tuple(TagModel(f"tag{t}", DataType.DOUBLE) for t in range(tags)))
            for d in range(devices)
        ),
        (),
    )


async def one_run(
    broker: MosquittoBroker, work: list[list[Event]], node_model: NodeModel | None, data: Path
) -> float:
    """CPU µs per value: offer every batch to the sinks, wait for the last PUBACK."""
    values = sum(len(batch) for batch in work)
    async with MqttClient(
        host=broker.host, port=broker.port, client_id=f"bench-json-{os.getpid()}"
    ) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        live = LivePublisher(client, topic_root=ROOT)
        node: SparkplugNode | None = None
        tasks = [asyncio.create_task(live.run())]
        if node_model is not None:

            def connect(will: Will) -> MqttClient:
                return MqttClient(
                    host=broker.host,
                    port=broker.port,
                    client_id=f"bench-spb-{os.getpid()}",
                    will=will,
                )

            node = SparkplugNode(
                model=node_model,
                connect=connect,
                bdseq=BdSeq(data),
                status=lambda: NodeStatus(0, True),
                history=History(data, max_rows=1_000_000),
            )
            tasks.append(asyncio.create_task(node.run()))
            born = node
            await async_wait_until(
                lambda: any(f.name == "sparkplug_births" and f.value for f in born.figures())
            )
            node.offer_events(work[0])  # the DBIRTHs: before the clock, as at a gateway's start
        devices = len(node_model.devices) if node_model is not None else 0
        per_round = devices or len({batch[0].device for batch in work})
        cpu0 = time.process_time()
        for index, batch in enumerate(work):
            live.offer_events(batch)
            if node is not None:
                node.offer_events(batch)
            if index % per_round == per_round - 1:
                # A round of polls is published before the next one (as at a 1 s poll): every
                # value goes out, none is replaced by a newer one while it waits.
                await live.drain()
        await asyncio.sleep(0)  # the last QoS 0 DDATA written
        cpu = time.process_time() - cpu0
        if node is not None:
            await node.drain()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return cpu / values * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--tags", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 x 10 x 20, 1 run (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.tags, args.rounds, args.runs = 2, 10, 20, 1
    work = batches(args.devices, args.tags, args.rounds)
    node_model = model(args.devices, args.tags)
    json_only: list[float] = []
    with_spb: list[float] = []
    with MosquittoBroker() as broker, tempfile.TemporaryDirectory() as data:
        for _ in range(args.runs):
            json_only.append(await one_run(broker, work, None, Path(data)))
            with_spb.append(await one_run(broker, work, node_model, Path(data)))
    values = sum(len(batch) for batch in work)
    a, b = statistics.median(json_only), statistics.median(with_spb)
    print(
        f"{values:,} values ({args.devices} devices x {args.tags} tags x {args.rounds} rounds), "
        f"median of {args.runs}; load average {os.getloadavg()[0]:.1f}"
    )
    print("  CPU µs per value")
    print(f"  JSON topics only                 {a:8.1f}")
    print(f"  JSON topics + Sparkplug B node   {b:8.1f}")
    print(f"  added by Sparkplug               {b - a:8.1f}  ({(b - a) / a:+.0%})")


if __name__ == "__main__":
    uvloop.run(main())
