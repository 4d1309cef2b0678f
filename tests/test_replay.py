"""`edge-agent oee --replay`: file formats, any row order, errors naming the line, and the same
figures as the live engine fed the same samples."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import pytest

from agent.oee.engine import OeeEngine
from agent.oee.replay import (
    ReplayError,
    Sample,
    cmd_oee,
    parse_ts,
    read_samples,
    replay,
    replay_samples,
    run_replay,
)
from agent.settings.config_file import AgentSettings
from agent.settings.loader import load_agent_settings
from sync.events import parse_rfc3339, rfc3339

CONFIG = """\
[gateway]
id = "line1"
site = "plant"
area = "area"
line = "line1"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "press1"
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
  [[devices.tags]]
  name = "temperature"
  address = "ir:0"
  type = "int16"
  scale = 0.1

[[devices]]
name = "filler"
driver = "opcua"
url = "opc.tcp://127.0.0.1:4840"
  [[devices.tags]]
  name = "state_code"
  node_id = "ns=2;s=Filler.State"
  [[devices.tags]]
  name = "total_count"
  node_id = "ns=2;s=Filler.Total"

[[machines]]
name = "press1"
state = { tag = "press1/state_code", running = [1], planned_stop = [3], unplanned_stop = [2, 4] }
total_count = "press1/total_count"
reject_count = "press1/reject_count"
ideal_cycle_time = "1s"
microstop_threshold = "2m"
calendar = "two-shifts"

[[machines]]
name = "filler"
state = { tag = "filler/state_code", running = [1], planned_stop = [3], unplanned_stop = [2] }
total_count = "filler/total_count"
ideal_cycle_time = "500ms"
microstop_threshold = "1m"
calendar = "two-shifts"

[[calendars]]
name = "two-shifts"
timezone = "UTC"
shifts = [
  { name = "early", start = "06:00", end = "14:00", days = "mon-fri", breaks = [["09:00", "09:15"]] },
  { name = "late", start = "14:00", end = "22:00", days = "mon-fri", breaks = [["18:00", "18:30"]] },
]
"""

HEADER = "ts,device,tag,value\n"
# Monday 2026-03-02. press1: running from 06:00, fault 07:00-07:30 (1,800 s), 16-bit total
# 65,000 -> 1,000 at 10:00 = rollover: 1,000 + 65,536 - 65,000 = 1,536 parts; 20 rejects.
# Data ends at 14:00: early is complete. Planned = 28,800 - 900 = 27,900; APT = 26,100.
# The machine runs through the 09:00-09:15 break, whose parts count nowhere (docs/oee.md
# "Counters"): the 1,536 were made over 11,700 s planned + 900 s in the break: 1,536 x
# 11,700/12,600 = 1,426.3 -> 1,426; the 20 rejects over 15,300 s planned + 900 s in the
# break: 20 x 15,300/16,200 = 18.9 -> 19.
ROWS = [
    "2026-03-02T06:00:00.000Z,press1,state_code,1",
    "2026-03-02T06:00:00.000Z,press1,total_count,65000",
    "2026-03-02T06:00:00.000Z,press1,reject_count,0",
    "2026-03-02T06:00:00.000Z,press1,temperature,21.5",
    "2026-03-02T07:00:00.000Z,press1,state_code,2",
    "2026-03-02T07:30:00.000Z,press1,state_code,1",
    "2026-03-02T10:00:00.000Z,press1,total_count,1000",
    "2026-03-02T11:00:00.000Z,press1,reject_count,20",
    "2026-03-02T14:00:00.000Z,other,tag,x",
]


@pytest.fixture
def settings(tmp_path: Path) -> AgentSettings:
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return load_agent_settings(path)


def write(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text(header + "".join(row + "\n" for row in rows), encoding="utf-8")
    return path


def test_csv_replay_hand_computed(settings: AgentSettings, tmp_path: Path) -> None:
    [record] = replay(settings, write(tmp_path / "s.csv", ROWS))
    assert record["machine"] == "press1"
    assert record["window"]["name"] == "early"
    assert record["window"]["complete"] is True
    assert record["planned_busy_time_s"] == 27900.0
    assert record["actual_production_time_s"] == 26100.0
    assert record["unplanned_downtime_s"] == 1800.0
    # The uint16 width comes from the tag's type: the drop is a rollover, not a reset.
    assert record["produced_quantity"] == 1426
    assert (record["reject_quantity"], record["good_quantity"]) == (19, 1407)
    assert record["availability"] == 26100 / 27900
    assert record["performance"] == pytest.approx(1426 / 26100)
    assert record["quality"] == 1407 / 1426


def test_rows_in_any_order_give_the_same_records(settings: AgentSettings, tmp_path: Path) -> None:
    ordered = run_replay(settings, write(tmp_path / "a.csv", ROWS))
    shuffled_rows = ROWS[:]
    random.Random(7).shuffle(shuffled_rows)
    shuffled = run_replay(settings, write(tmp_path / "b.csv", shuffled_rows))
    assert ordered.sorted_input is True
    assert shuffled.sorted_input is False
    assert shuffled.records == ordered.records
    assert (shuffled.rows, shuffled.used) == (9, 7)


def test_jsonl_with_quality(settings: AgentSettings, tmp_path: Path) -> None:
    lines = []
    for row in ROWS:
        ts, device, tag, value = row.split(",")
        lines.append(json.dumps({"ts": ts, "device": device, "tag": tag, "value": _json(value)}))
    # A bad-quality zero is ignored: no PLC reset, no state change.
    lines.append(
        '{"ts":"2026-03-02T08:00:00Z","device":"press1","tag":"total_count","value":0,'
        '"quality":"bad"}'
    )
    lines.append(
        '{"ts":"2026-03-02T08:00:00Z","device":"press1","tag":"state_code","value":2,'
        '"quality":"bad"}'
    )
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    assert replay(settings, path) == replay(settings, write(tmp_path / "s.csv", ROWS))


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def test_csv_quality_column(settings: AgentSettings, tmp_path: Path) -> None:
    rows = [row + ",good" for row in ROWS] + ["2026-03-02T08:00:00.000Z,press1,total_count,,bad"]
    path = write(tmp_path / "q.csv", rows, header="ts,device,tag,value,quality\n")
    assert replay(settings, path) == replay(settings, write(tmp_path / "s.csv", ROWS))


def test_shifts_cut_short_by_the_data(settings: AgentSettings, tmp_path: Path) -> None:
    # press1 observed 12:00 -> 15:00 (the last row): early from 12:00 (not from 06:00) and
    # late until 15:00, both marked incomplete. filler: OPC UA counter of unknown width, so
    # the drop 500 -> 20 is a reset (+20), never a rollover.
    rows = [
        "2026-03-02T12:00:00.000Z,press1,state_code,1",
        "2026-03-02T12:00:00.000Z,filler,state_code,1",
        "2026-03-02T12:00:00.000Z,filler,total_count,100",
        "2026-03-02T13:00:00.000Z,filler,total_count,500",
        "2026-03-02T13:30:00.000Z,filler,total_count,20",
        "2026-03-02T15:00:00.000Z,press1,state_code,1",
    ]
    records = replay(settings, write(tmp_path / "s.csv", rows))
    # Ordered by shift start, then machine order in the config.
    assert [(r["window"]["name"], r["machine"]) for r in records] == [
        ("early", "press1"),
        ("early", "filler"),
        ("late", "press1"),
        ("late", "filler"),
    ]
    early, filler_early, late, _ = records
    assert early["window"]["start"] == "2026-03-02T12:00:00.000Z"
    assert early["window"]["complete"] is False
    assert early["planned_busy_time_s"] == 7200.0
    assert late["window"]["end"] == "2026-03-02T15:00:00.000Z"
    assert late["window"]["complete"] is False
    assert late["planned_busy_time_s"] == 3600.0
    assert filler_early["produced_quantity"] == 400 + 20


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        (["x,press1,state_code,1"], HEADER, "s.csv:2: invalid timestamp 'x'"),
        (
            ["2026-03-02T06:00:00Z,press1,state_code,1", "2026-03-02 06:00,press1,state_code,1"],
            HEADER,
            "s.csv:3: invalid timestamp '2026-03-02 06:00'",
        ),
        (
            ["2026-03-02T06:00:00Z,press1,total_count,abc"],
            HEADER,
            "s.csv:2: press1/total_count: counter value 'abc' is not an integer",
        ),
        (
            ["2026-03-02T06:00:00Z,press1,total_count,12.5"],
            HEADER,
            "s.csv:2: press1/total_count: counter value 12.5 is not an integer",
        ),
        (
            ["2026-03-02T06:00:00Z,press1,state_code,"],
            HEADER,
            "s.csv:2: press1/state_code: empty value",
        ),
        (["2026-03-02T06:00:00Z,press1,1"], HEADER, "s.csv:2: expected 4 columns"),
        (
            ["2026-03-02T06:00:00Z,press1,state_code,1"],
            "time,device,tag,value\n",
            "s.csv:1: header",
        ),
        (
            ["2026-03-02T06:00:00Z,press1,state_code,1,meh"],
            "ts,device,tag,value,quality\n",
            "s.csv:2: invalid quality 'meh'",
        ),
    ],
)
def test_csv_errors_name_the_line(
    settings: AgentSettings, tmp_path: Path, rows: list[str], header: str, message: str
) -> None:
    path = write(tmp_path / "s.csv", rows, header=header)
    with pytest.raises(ReplayError) as caught:
        replay(settings, path)
    assert str(caught.value).startswith(f"{tmp_path}/{message}")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "s.jsonl:2: invalid JSON"),
        (
            '{"ts":"2026-03-02T06:00:00Z","device":"press1","tag":"x"}',
            "s.jsonl:2: missing key 'value'",
        ),
        ('{"ts":5,"device":"press1","tag":"x","value":1}', "s.jsonl:2: invalid timestamp 5"),
        (
            '{"ts":"2026-03-02T06:00:00Z","device":"press1","tag":"total_count","value":true}',
            "s.jsonl:2: press1/total_count: counter value True is not an integer",
        ),
    ],
)
def test_jsonl_errors_name_the_line(
    settings: AgentSettings, tmp_path: Path, line: str, message: str
) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"ts":"2026-03-02T06:00:00Z","device":"press1","tag":"state_code","value":1}\n'
        + line
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(ReplayError) as caught:
        replay(settings, path)
    assert str(caught.value).startswith(f"{tmp_path}/{message}")


def test_missing_file(settings: AgentSettings, tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="no such file"):
        replay(settings, tmp_path / "nope.csv")


def test_timestamp_fast_path_equals_rfc3339_parser() -> None:
    cache: dict[str, int] = {}
    rng = random.Random(3)
    for _ in range(2000):
        ts = rng.randint(1_700_000_000_000, 1_900_000_000_000) / 1000
        text = rfc3339(ts)
        assert parse_ts(text, cache) == parse_rfc3339(text)  # miss, then hit
        assert parse_ts(text, cache) == parse_rfc3339(text)
    for text in ("2026-03-02T06:00:00Z", "2026-03-02T07:00:00+01:00", "2026-03-02T06:00:00.5Z"):
        assert parse_ts(text, cache) == parse_rfc3339(text)


def test_cmd_oee(
    settings: AgentSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.toml"
    samples = write(tmp_path / "s.csv", ROWS)
    assert cmd_oee(argparse.Namespace(config=config, replay=samples)) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [json.loads(line) for line in lines] == replay(settings, samples)
    assert "machine 'filler': no good sample of its state tag" in err

    bad = write(tmp_path / "bad.csv", ["nope,press1,state_code,1"])
    assert cmd_oee(argparse.Namespace(config=config, replay=bad)) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"{bad}:2: invalid timestamp 'nope'; write RFC 3339 with a zone\n")

    broken = tmp_path / "broken.toml"
    broken.write_text("[gateway]\nid = 'x'\n", encoding="utf-8")
    assert cmd_oee(argparse.Namespace(config=broken, replay=samples)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip()


# ---------------------------------------------------------------------------------------------
# The replay and the live engine give identical figures for the same samples


def generate(seed: int) -> list[Sample]:
    """36 hours of two machines from Monday 05:00, readings at odd instants (ms), with faults
    shorter and longer than the microstop thresholds, a 16-bit rollover, a PLC reset, and
    bad-quality reads."""
    rng = random.Random(seed)
    start = parse_rfc3339("2026-03-02T05:00:00Z")
    samples: list[Sample] = []
    for device, width in (("press1", 65536), ("filler", None)):
        t = start + rng.randint(0, 999) / 1000
        samples.append(Sample(t, device, "state_code", 1))
        total = 64000 if width else 0
        samples.append(Sample(t + 0.001, device, "total_count", total))
        state = 1
        while t < start + 36 * 3600:
            t += rng.randint(1000, rng.choice([90_000, 900_000])) / 1000
            if rng.random() < 0.35:
                state = rng.choice([1, 1, 2, 3, 4, 7])
                quality = "bad" if rng.random() < 0.05 else "good"
                samples.append(Sample(t, device, "state_code", state, quality))
            elif rng.random() < 0.03:
                total = rng.randint(0, 50)  # a PLC reset
                samples.append(Sample(t, device, "total_count", total))
            else:
                if state == 1:
                    total += rng.randint(0, 400)
                    if width:
                        total %= width
                quality = "bad" if rng.random() < 0.05 else "good"
                value = 0 if quality == "bad" else total
                samples.append(Sample(t, device, "total_count", value, quality))
    return samples


def live(settings: AgentSettings, samples: list[Sample], end: float) -> list[dict[str, Any]]:
    """What the live task does: readings as they come, a tick every 60 s that advances time
    and reports shift-so-far and rolling records, final records collected as they appear."""
    engines = {m.name: OeeEngine.from_settings(settings, m) for m in settings.machines}
    roles = {}
    for m in settings.machines:
        roles[m.state.tag] = (engines[m.name], None)
        roles[m.total_count] = (engines[m.name], "total")
    finals: list[dict[str, Any]] = []
    tick = samples[0].ts
    for sample in sorted(samples, key=lambda s: s.ts):
        while tick <= sample.ts:
            for engine in engines.values():
                engine.advance(tick)
                engine.report_shift()
                engine.report_rolling()
                finals.extend(engine.pop_finished())
                engine.pop_state_changes()
            tick += 60.0
        engine, which = roles[f"{sample.device}/{sample.tag}"]
        if which is None:
            engine.on_state(sample.ts, sample.value, sample.quality)
        else:
            engine.on_count(sample.ts, which, sample.value, sample.quality)
    for engine in engines.values():
        engine.advance(end)
        finals.extend(engine.pop_finished())
        finals.extend(engine.finish(end))
    order = {m.name: i for i, m in enumerate(settings.machines)}
    return sorted(finals, key=lambda r: (r["window"]["shift_start"], order[r["machine"]]))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_replay_and_live_engine_agree(settings: AgentSettings, tmp_path: Path, seed: int) -> None:
    samples = generate(seed)
    rows = [f"{rfc3339(s.ts)},{s.device},{s.tag},{s.value},{s.quality}" for s in samples]
    random.Random(seed).shuffle(rows)
    path = write(tmp_path / "s.csv", rows, header="ts,device,tag,value,quality\n")
    # The live side stamps readings with floats; the file holds them as RFC 3339 text.
    stamped = [
        Sample(parse_rfc3339(rfc3339(s.ts)), s.device, s.tag, s.value, s.quality) for s in samples
    ]
    end = max(s.ts for s in stamped)
    from_file = replay(settings, path)
    assert len(from_file) >= 6  # two machines x (early, late, early of Tuesday, ...)
    assert any(r["microstops"] for r in from_file)
    assert any(r["mttr_s"] for r in from_file)
    assert from_file == live(settings, stamped, end)
    assert from_file == replay_samples(settings, list(read_samples(path)))


# ---------------------------------------------------------------------------------------------
# Data that never meets the calendar; a product tag


def test_cmd_oee_says_when_data_and_calendar_never_meet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Saturday 2026-03-07: the calendar plans mon-fri only. No record at all: exit 1.
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG, encoding="utf-8")
    rows = [
        "2026-03-07T06:00:00.000Z,press1,state_code,1",
        "2026-03-07T06:00:00.000Z,press1,total_count,0",
        "2026-03-07T13:00:00.000Z,press1,total_count,900",
    ]
    samples = write(tmp_path / "s.csv", rows)
    assert cmd_oee(argparse.Namespace(config=config, replay=samples)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        f"{samples}: no planned time for machine 'press1' between 2026-03-07T06:00:00.000Z "
        "and 2026-03-07T13:00:00.000Z: check the calendar's days and time zone"
    ) in err
    assert f"{samples}: no machine produced an OEE record" in err


def test_cmd_oee_names_the_machine_without_planned_time_and_still_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # filler's data is all on Saturday, press1's from Monday: press1 has records (its
    # shifts until the data ends on Saturday: exit 0), and filler is named.
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG, encoding="utf-8")
    rows = [*ROWS, "2026-03-07T06:00:00.000Z,filler,state_code,1"]
    samples = write(tmp_path / "s.csv", sorted(rows))
    assert cmd_oee(argparse.Namespace(config=config, replay=samples)) == 0
    out, err = capsys.readouterr()
    assert {json.loads(line)["machine"] for line in out.splitlines()} == {"press1"}
    assert "no planned time for machine 'filler' between 2026-03-07T06:00:00.000Z" in err
    assert "no planned time for machine 'press1'" not in err


def test_empty_sample_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG, encoding="utf-8")
    samples = write(tmp_path / "s.csv", [])
    assert cmd_oee(argparse.Namespace(config=config, replay=samples)) == 1
    _, err = capsys.readouterr()
    assert "no machine produced an OEE record" in err


PRODUCT_CONFIG = CONFIG.replace(
    """  [[devices.tags]]
  name = "temperature\"""",
    """  [[devices.tags]]
  name = "product_code"
  address = "hr:106"
  type = "uint16"
  [[devices.tags]]
  name = "temperature\"""",
).replace(
    'reject_count = "press1/reject_count"\nideal_cycle_time = "1s"',
    'reject_count = "press1/reject_count"\nideal_cycle_time = "1s"\n'
    'product = "press1/product_code"\nideal_cycle_times = { "1" = "1.2s", "2" = "800ms" }',
)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_replay_with_a_product_tag(tmp_path: Path, suffix: str) -> None:
    # Product 1 (1.2 s) 06:00-09:00, changeover in the break (stopped), product 2 (0.8 s)
    # 09:15-14:00. Read at 06:00, 09:00 (8,100 made) and 14:00 (+17,000); rejects 81, 170.
    # APT = 10,800 + 17,100 = 27,900 (the 09:00-09:15 break is the only one).
    # performance = (1.2 x 8,100 + 0.8 x 17,000) / 27,900.
    path = tmp_path / "agent.toml"
    path.write_text(PRODUCT_CONFIG, encoding="utf-8")
    settings = load_agent_settings(path)
    rows = [
        "2026-03-02T06:00:00.000Z,press1,product_code,1",
        "2026-03-02T06:00:00.000Z,press1,state_code,1",
        "2026-03-02T06:00:00.000Z,press1,total_count,0",
        "2026-03-02T06:00:00.000Z,press1,reject_count,0",
        "2026-03-02T09:00:00.000Z,press1,state_code,3",
        "2026-03-02T09:00:00.000Z,press1,total_count,8100",
        "2026-03-02T09:00:00.000Z,press1,reject_count,81",
        "2026-03-02T09:05:00.000Z,press1,product_code,2",
        "2026-03-02T09:15:00.000Z,press1,state_code,1",
        "2026-03-02T14:00:00.000Z,press1,total_count,25100",
        "2026-03-02T14:00:00.000Z,press1,reject_count,251",
    ]
    if suffix == ".csv":
        samples = write(tmp_path / "s.csv", rows)
    else:
        samples = tmp_path / "s.jsonl"
        lines = []
        for row in rows:
            ts, device, tag, value = row.split(",")
            lines.append(json.dumps({"ts": ts, "device": device, "tag": tag, "value": int(value)}))
        samples.write_text("\n".join(lines) + "\n", encoding="utf-8")
    [record] = replay(settings, samples)
    assert record["products"] == {
        "1": {"produced": 8100, "good": 8019, "reject": 81, "ideal_cycle_time_s": 1.2},
        "2": {"produced": 17000, "good": 16830, "reject": 170, "ideal_cycle_time_s": 0.8},
    }
    assert record["actual_production_time_s"] == 27900.0
    assert record["performance"] == pytest.approx((1.2 * 8100 + 0.8 * 17000) / 27900, abs=1e-9)
    # Any row order: the same record.
    shuffled = rows[:]
    random.Random(5).shuffle(shuffled)
    if suffix == ".csv":
        assert replay(settings, write(tmp_path / "b.csv", shuffled)) == [record]
