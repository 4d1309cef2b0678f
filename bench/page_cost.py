"""Benchmark: what one open status page tab costs the agent at line scale.

The agent runs in this process on the Modbus simulator's bulk block: 10,000 tags on four
devices polled every second (a third of the values changing each cycle), 10 machines with OEE,
a private mosquitto. The process CPU is measured over `--seconds` with no tab, then over the
same time with one "tab": a thread that fetches /api/page every refresh (as page.js does) and
parses it. The tab's own CPU (its thread's time: urllib and json.loads, the browser's part) is
taken off, so the difference is what serving the page costs the agent, as a share of one core.
Prints a table (and JSON with --json). Figures only, no asserts.

    .venv/bin/python bench/page_cost.py                 # 60 s each way
    .venv/bin/python bench/page_cost.py --quick         # a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import uvloop

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.daemon.runtime import Runtime  # noqa: E402
from agent.settings.loader import load_agent_settings  # noqa: E402
from simulators.modbus.server import ModbusSimulator  # noqa: E402
from tests.fixtures.mosquitto import MosquittoBroker  # noqa: E402
from tests.fixtures.ports import async_wait_until, free_port  # noqa: E402

BULK_START = 1000  # the simulator's bulk block, hr:1000-5999
DEVICES = 4
MACHINES = 10


def config(broker: MosquittoBroker, data_dir: Path, sim_port: int, http: int, tags: int) -> str:
    """The agent's config: `tags` bulk tags over DEVICES devices, MACHINES machines."""
    per_device = tags // DEVICES
    blocks = []
    for device in range(DEVICES):
        rows = "".join(
            f'  [[devices.tags]]\n  name = "b{i}"\n  address = "hr:{BULK_START + i}"\n'
            for i in range(per_device)
        )
        blocks.append(
            f'[[devices]]\nname = "d{device}"\ndriver = "modbus"\n'
            f'url = "tcp://127.0.0.1:{sim_port}"\npoll_interval = "1s"\n'
            '  [[devices.tags]]\n  name = "state_code"\n  address = "hr:100"\n'
            '  [[devices.tags]]\n  name = "total_count"\n  address = "hr:102"\n'
            '  type = "uint32"\n' + rows
        )
    machines = "".join(
        f'[[machines]]\nname = "m{m}"\n'
        f'state = {{ tag = "d{m % DEVICES}/state_code", running = [1], planned_stop = [3], '
        "unplanned_stop = [2, 4] }\n"
        f'total_count = "d{m % DEVICES}/total_count"\nideal_cycle_time = "1.2s"\n'
        'calendar = "always"\n\n'
        for m in range(MACHINES)
    )
    return (
        f'[gateway]\nid = "bench-page"\nsite = "plant1"\narea = "bench"\nline = "page"\n'
        f'data_dir = "{data_dir}"\n\n'
        f'[mqtt]\nurl = "{broker.url}"\n\n[http]\nlisten = "127.0.0.1:{http}"\n\n'
        + "\n".join(blocks)
        + "\n"
        + machines
        + '[[calendars]]\nname = "always"\ntimezone = "UTC"\nshifts = [\n'
        '  { name = "a", start = "06:00", end = "14:00", days = "daily" },\n'
        '  { name = "b", start = "14:00", end = "22:00", days = "daily" },\n'
        '  { name = "c", start = "22:00", end = "06:00", days = "daily" },\n]\n'
    )


class Tab(threading.Thread):
    """Fetches /api/page every refresh, like page.js; counts its own CPU time."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        super().__init__(name="tab", daemon=True)
        self._url = url
        self._done = stop
        self.fetches = 0
        self.bytes = 0
        self.cpu = 0.0
        self.refresh = 1.0

    def run(self) -> None:
        start = time.thread_time()
        while not self._done.is_set():
            with urllib.request.urlopen(self._url, timeout=10) as response:
                body = response.read()
            document = json.loads(body)
            self.refresh = float(document["refresh_s"])
            self.fetches += 1
            self.bytes = len(body)
            self._done.wait(self.refresh)
        self.cpu = time.thread_time() - start


async def measure(seconds: float, tab_url: str | None) -> tuple[float, Tab | None]:
    """Process CPU seconds over `seconds` (with a tab open if `tab_url`), and the tab."""
    stop = threading.Event()
    tab = Tab(tab_url, stop) if tab_url is not None else None
    cpu = time.process_time()
    if tab is not None:
        tab.start()
    await asyncio.sleep(seconds)
    stop.set()
    if tab is not None:
        await asyncio.to_thread(tab.join)
    return time.process_time() - cpu, tab


async def run(args: argparse.Namespace) -> dict[str, float]:
    tags = 400 if args.quick else args.tags
    seconds = 3.0 if args.quick else args.seconds
    with tempfile.TemporaryDirectory(prefix="bench-page-") as tmp, MosquittoBroker() as broker:
        async with ModbusSimulator(port=0, seed=3, speed=1.0) as sim:
            assert sim.port is not None
            http = free_port()
            path = Path(tmp) / "agent.toml"
            path.write_text(config(broker, Path(tmp) / "data", sim.port, http, tags))
            runtime = Runtime(load_agent_settings(path, environ={}))
            stop = asyncio.Event()
            task = asyncio.create_task(runtime.run(stop))
            await runtime.started.wait()
            await async_wait_until(
                lambda: all(p.polls >= 3 for p in runtime.pollers.values()), timeout=60
            )
            await asyncio.sleep(1.0 if args.quick else 10.0)  # warm-up
            idle, _ = await measure(seconds, None)
            busy, tab = await measure(seconds, f"http://127.0.0.1:{http}/api/page")
            stop.set()
            await task
    assert tab is not None
    page = max(0.0, busy - tab.cpu - idle)
    return {
        "tags": float(tags),
        "machines": float(MACHINES),
        "seconds": seconds,
        "agent_cpu_no_tab_pct": 100 * idle / seconds,
        "agent_cpu_one_tab_pct": 100 * (busy - tab.cpu) / seconds,
        "page_cost_pct_of_one_core": 100 * page / seconds,
        "tab_fetches": float(tab.fetches),
        "document_bytes": float(tab.bytes),
        "refresh_s": tab.refresh,
        "cpu_ms_per_fetch": 1000 * page / max(1, tab.fetches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tags", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="a few seconds (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    figures = uvloop.run(run(args))
    for name, value in figures.items():
        print(f"{name:<28} {value:12.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
