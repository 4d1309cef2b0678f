"""Pure config primitives: durations, sizes, Modbus addresses and URLs, days, TOML lines."""

from __future__ import annotations

import pytest

from agent.central.settings import parse_months
from agent.settings.machines import parse_clock, parse_days
from agent.settings.toml_lines import key_lines, line_of
from agent.settings.workflows import parse_param_spec, parse_rate
from drivers.config import parse_duration, parse_size
from drivers.modbus.config import Address, SerialLink, TcpLink, parse_address, parse_modbus_url


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("30d", 30 * 86400.0),
        ("1w", 604800.0),
        ("0s", 0.0),
        (" 2s ", 2.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "2", "2 s", "s", "2sec", "-1s", "1h-30m", "2S", "ms"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("2GiB", 2 * 1024**3),
        ("512MiB", 512 * 1024**2),
        ("100MB", 100_000_000),
        ("4096B", 4096),
        ("1.5KiB", 1536),
        ("1 TiB", 1024**4),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "2", "2G", "2gib", "GiB", "-1MiB"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("hr:100", Address("hr", 100)),
        ("co:0", Address("co", 0)),
        ("di:65535", Address("di", 65535)),
        ("ir:7", Address("ir", 7)),
        ("hr:100.3", Address("hr", 100, 3)),
        ("ir:1.15", Address("ir", 1, 15)),
    ],
)
def test_modbus_addresses(text: str, address: Address) -> None:
    assert parse_address(text) == address
    assert str(address) == text


@pytest.mark.parametrize(
    "text", ["hr100", "xx:1", "hr:-1", "hr:65536", "co:1.2", "hr:1.16", "HR:1", "hr:", "hr:1.2.3"]
)
def test_bad_modbus_addresses(text: str) -> None:
    with pytest.raises(ValueError, match=r"offset|address|bit"):
        parse_address(text)


@pytest.mark.parametrize(
    ("url", "link"),
    [
        ("tcp://10.0.0.1", TcpLink("10.0.0.1", 502)),
        ("tcp://plc.local:5020", TcpLink("plc.local", 5020)),
        ("rtu:///dev/ttyUSB0", SerialLink("/dev/ttyUSB0")),
        (
            "rtu:///dev/ttyS1?baudrate=9600&parity=N&stopbits=2&bytesize=7",
            SerialLink("/dev/ttyS1", 9600, "N", 2, 7),
        ),
    ],
)
def test_modbus_urls(url: str, link: TcpLink | SerialLink) -> None:
    assert parse_modbus_url(url) == link


@pytest.mark.parametrize(
    "url",
    [
        "udp://x",
        "tcp://",
        "tcp://x:99999",
        "tcp://x/path",
        "rtu://dev/ttyS0",
        "rtu:///dev/ttyS0?speed=9600",
        "rtu:///dev/ttyS0?parity=Q",
        "rtu:///dev/ttyS0?stopbits=3",
        "rtu:///dev/ttyS0?baudrate=fast",
    ],
)
def test_bad_modbus_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_modbus_url(url)


@pytest.mark.parametrize(
    ("spec", "days"),
    [
        ("mon-fri", {0, 1, 2, 3, 4}),
        ("sat", {5}),
        ("mon,wed,fri", {0, 2, 4}),
        ("fri-mon", {4, 5, 6, 0}),
        ("daily", set(range(7))),
        (("mon", "sun"), {0, 6}),
    ],
)
def test_days(spec: str | tuple[str, ...], days: set[int]) -> None:
    assert parse_days(spec) == days


@pytest.mark.parametrize(("text", "minutes"), [("00:00", 0), ("06:30", 390), ("24:00", 1440)])
def test_clock(text: str, minutes: int) -> None:
    assert parse_clock(text) == minutes


@pytest.mark.parametrize("text", ["6:00", "24:01", "25:00", "12:60", "noon"])
def test_bad_clock(text: str) -> None:
    with pytest.raises(ValueError, match="invalid time"):
        parse_clock(text)


def test_param_specs_and_rates() -> None:
    spec = parse_param_spec("int:1..9999")
    assert (spec.type, spec.low, spec.high) == ("int", 1, 9999)
    assert parse_param_spec("str").type == "str"
    assert parse_param_spec("float:-1.5..2").low == -1.5
    for bad in ("int:a..b", "bool:0..1", "str:-1..3", "int:1.5..2", "list"):
        with pytest.raises(ValueError, match=r"."):
            parse_param_spec(bad)
    assert parse_rate("10/1m") == (10, 60.0)
    assert parse_months("24 months") == 24
    assert parse_months("2 years") == 24


def test_toml_key_lines() -> None:
    text = """\
[gateway]
id = "x"

[[devices]]
name = "a"
  [[devices.tags]]
  name = "t0"
  [[devices.tags]]
  name = "t1"
  address = "hr:1"

[[devices]]
name = "b"
tags = [ { name = "x" },
         { name = "y", address = "hr:2" } ]

[[machines]]
state = { tag = "a/t0", running = [1, 2] }
shifts = [
  { name = "early", breaks = [["09:00", "09:15"]] },
  { name = "late" },
]
"""
    lines = key_lines(text)
    assert lines[("gateway", "id")] == 2
    assert lines[("devices", 0, "tags", 1, "address")] == 10
    assert lines[("devices", 1, "name")] == 13
    assert lines[("devices", 1, "tags", 1)] == 15
    assert lines[("devices", 1, "tags", 1, "address")] == 15
    assert lines[("machines", 0, "state", "running")] == 18
    assert lines[("machines", 0, "shifts", 1, "name")] == 21
    assert line_of(lines, ("machines", 0, "shifts", 0, "breaks", 0, 1)) == 20
    assert line_of(lines, ("devices", 0, "tags", 0, "type")) == 6
    assert line_of(lines, ("nowhere",)) is None
