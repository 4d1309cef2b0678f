"""Benchmark: offline OEE replay (`edge-agent oee --replay`) over a week of recorded samples.

Default: 10 machines x 7 days, each machine's state and two counters every second (about
18 million CSV rows, ~0.8 GB in a temp dir). Prints samples/s of the replay *including file
parsing*, and for comparison the raw `csv.reader` rate over the same file in the same run.
Generation time is printed but not counted. Prints figures only; never asserts on speed.

    python bench/oee_replay.py                 # the full week (takes a few minutes)
    python bench/oee_replay.py --quick         # smoke mode: a few seconds
    python bench/oee_replay.py --days 1 --machines 2 --order by-tag
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.oee.replay import run_replay  # noqa: E402
from agent.settings.loader import load_agent_settings  # noqa: E402

START = datetime(2026, 3, 2, tzinfo=UTC).timestamp()  # a Monday

CONFIG_HEAD = """\
[gateway]
id = "bench"
site = "plant"
area = "area"
line = "line"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[calendars]]
name = "three-shifts"
timezone = "Europe/Berlin"
[[calendars.shifts]]
name = "night"
start = "22:00"
end = "06:00"
days = "sun-thu"
breaks = [["02:00", "02:30"]]
[[calendars.shifts]]
name = "early"
start = "06:00"
end = "14:00"
days = "mon-fri"
breaks = [["09:00", "09:15"], ["12:00", "12:30"]]
[[calendars.shifts]]
name = "late"
start = "14:00"
end = "22:00"
days = "mon-fri"
breaks = [["18:00", "18:30"]]
"""

MACHINE = """
[[devices]]
name = "{name}"
driver = "modbus"
url = "tcp://127.0.0.1:5020"
  [[devices.tags]]
  name = "state_code"
  address = "hr:100"
  type = "uint16"
  [[devices.tags]]
  name = "total_count"
  address = "hr:102"
  type = "uint16"
  [[devices.tags]]
  name = "reject_count"
  address = "hr:104"
  type = "uint32"

[[machines]]
name = "{name}"
state = {{ tag = "{name}/state_code", running = [1], planned_stop = [3], unplanned_stop = [2, 4] }}
total_count = "{name}/total_count"
reject_count = "{name}/reject_count"
ideal_cycle_time = "1s"
microstop_threshold = "2m"
calendar = "three-shifts"
"""


def machine_names(count: int) -> list[str]:
    """m01, m02, ..."""
    return [f"m{index + 1:02d}" for index in range(count)]


def write_config(directory: Path, machines: int) -> Path:
    """An agent config with `machines` Modbus machines on one three-shift calendar."""
    text = CONFIG_HEAD + "".join(MACHINE.format(name=name) for name in machine_names(machines))
    path = directory / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _series(seed: int, seconds: int) -> Iterator[tuple[int, int, int]]:
    """(state, total, reject) per second of one simulated machine (16-bit total rolls over)."""
    rng = random.Random(seed)
    state, left = 1, rng.randint(60, 3600)
    total, reject, made = rng.randint(0, 65535), 0, 0.0
    for _ in range(seconds):
        left -= 1
        if left <= 0:
            if state == 1:
                state = rng.choices((2, 4, 3), weights=(6, 3, 1))[0]
                left = rng.randint(10, 200) if state != 3 else rng.randint(600, 2400)
            else:
                state, left = 1, rng.randint(60, 3600)
        if state == 1:
            made += rng.uniform(0.6, 1.0)
            while made >= 1.0:
                made -= 1.0
                total = (total + 1) & 0xFFFF
                if rng.random() < 0.01:
                    reject += 1
        yield state, total, reject


def _stamps(start: float, seconds: int) -> Iterator[str]:
    """RFC 3339 text of each second from `start` (the date part formatted once a day)."""
    day_text = ""
    day_start = -1.0
    for second in range(seconds):
        ts = start + second
        if ts - day_start >= 86400 or day_start < 0:
            day_start = ts - (ts % 86400)
            day_text = datetime.fromtimestamp(day_start, tz=UTC).strftime("%Y-%m-%dT")
        rest = int(ts - day_start)
        yield f"{day_text}{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}.000Z"


def write_samples(path: Path, machines: int, seconds: int, order: str, start: float = START) -> int:
    """The sample CSV; `order` is 'time' (as recorded) or 'by-tag' (grouped per tag)."""
    names = machine_names(machines)
    rows = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write("ts,device,tag,value\n")
        if order == "time":
            series = [_series(index, seconds) for index in range(machines)]
            for stamp in _stamps(start, seconds):
                parts = []
                for name, source in zip(names, series, strict=True):
                    state, total, reject = next(source)
                    parts.append(
                        f"{stamp},{name},state_code,{state}\n"
                        f"{stamp},{name},total_count,{total}\n"
                        f"{stamp},{name},reject_count,{reject}\n"
                    )
                handle.write("".join(parts))
                rows += 3 * machines
        else:
            for index, name in enumerate(names):
                columns: tuple[list[str], list[str], list[str]] = ([], [], [])
                for stamp, (state, total, reject) in zip(
                    _stamps(start, seconds), _series(index, seconds), strict=True
                ):
                    columns[0].append(f"{stamp},{name},state_code,{state}\n")
                    columns[1].append(f"{stamp},{name},total_count,{total}\n")
                    columns[2].append(f"{stamp},{name},reject_count,{reject}\n")
                for column in columns:
                    handle.write("".join(column))
                    rows += len(column)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--machines", type=int, default=10)
    parser.add_argument("--order", choices=["time", "by-tag"], default="time")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 2 machines, 3 hours")
    args = parser.parse_args(argv)
    days, machines = args.days, args.machines
    with tempfile.TemporaryDirectory(prefix="oee-bench-") as tmp:
        directory = Path(tmp)
        if args.quick:
            machines = 2
        config = write_config(directory, machines)
        settings = load_agent_settings(config)
        samples = directory / "samples.csv"
        began = time.perf_counter()
        if args.quick:  # 3 hours around a shift change
            start = datetime(2026, 3, 2, 11, 0, tzinfo=UTC).timestamp()
            rows = write_samples(samples, machines, 3 * 3600, args.order, start)
        else:
            rows = write_samples(samples, machines, days * 86400, args.order)
        generated = time.perf_counter() - began
        size = samples.stat().st_size
        print(
            f"generated {rows:,} rows ({machines} machines x "
            f"{'3 h' if args.quick else f'{days} d'}, order {args.order}, "
            f"{size / 1e6:.0f} MB) in {generated:.1f} s (not counted)"
        )

        # Wall time, and CPU time of this process (the fairer figure on a shared machine).
        began, began_cpu = time.perf_counter(), time.process_time()
        with samples.open(newline="", encoding="utf-8") as handle:
            parsed = sum(1 for _ in csv.reader(handle)) - 1
        raw, raw_cpu = time.perf_counter() - began, time.process_time() - began_cpu
        print(
            f"csv.reader alone:      {parsed / raw:>12,.0f} rows/s wall ({raw:.1f} s), "
            f"{parsed / raw_cpu:,.0f} rows/s CPU"
        )

        began, began_cpu = time.perf_counter(), time.process_time()
        result = run_replay(settings, samples)
        took, took_cpu = time.perf_counter() - began, time.process_time() - began_cpu
        print(
            f"replay incl. parsing:  {result.rows / took:>12,.0f} samples/s wall ({took:.1f} s), "
            f"{result.rows / took_cpu:,.0f} samples/s CPU; {took_cpu / raw_cpu:.1f}x the CPU "
            "of csv.reader alone"
        )
        print(
            f"records: {len(result.records)} (machines x shifts); input sorted: "
            f"{result.sorted_input}"
        )
        if result.records:
            first = result.records[0]
            print(
                f"e.g. {first['machine']} {first['window']['name']} "
                f"{first['window']['shift_start']}: oee={first['oee']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
