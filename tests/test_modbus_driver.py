"""ModbusDriver against the Modbus simulator over real TCP and over RTU on a pty pair."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from drivers.base import (
    DriverContext,
    DriverFault,
    DriverUnavailable,
    SharedResources,
    WriteUnverified,
)
from drivers.modbus.config import ModbusDeviceConfig
from drivers.modbus.driver import ModbusDriver
from simulators.modbus.server import ModbusSimulator
from simulators.ptybridge import PtyBridge

TYPED_TAGS: list[dict[str, Any]] = [
    {"name": "temperature", "address": "ir:0", "type": "int16", "scale": 0.1},
    {"name": "state_ir", "address": "ir:1", "type": "uint16"},
    {"name": "total_big", "address": "ir:2", "type": "uint32"},
    {"name": "total_little", "address": "ir:4", "type": "uint32", "word_order": "little"},
    {"name": "temp_f32", "address": "ir:6", "type": "float32"},
    {"name": "temp_f32_swapped", "address": "ir:8", "type": "float32", "word_order": "little"},
    {"name": "runtime_ms", "address": "ir:10", "type": "uint64"},
    {"name": "energy", "address": "ir:14", "type": "float64"},
    {"name": "energy_swapped", "address": "ir:18", "type": "float64", "word_order": "little"},
    {"name": "i16", "address": "ir:23", "type": "int16"},
    {"name": "i32", "address": "ir:24", "type": "int32"},
    {"name": "i64", "address": "ir:26", "type": "int64"},
    {"name": "u32", "address": "ir:30", "type": "uint32"},
    {"name": "byteswapped", "address": "ir:32", "type": "uint16", "byte_order": "little"},
    {"name": "state", "address": "hr:100", "type": "uint16"},
    {"name": "product_code", "address": "hr:200", "type": "uint16", "writable": True},
    {"name": "target_qty", "address": "hr:201", "type": "uint32", "writable": True},
    {"name": "product_name", "address": "hr:210", "type": "string", "length": 16, "writable": True},
    {"name": "spare_f32", "address": "hr:300", "type": "float32", "writable": True},
    {"name": "spare_scaled", "address": "hr:302", "type": "int16", "scale": 0.1, "writable": True},
    {"name": "spare_bit3", "address": "hr:304.3", "type": "bool", "writable": True},
    {"name": "start", "address": "co:0", "type": "bool", "writable": True},
    {"name": "running", "address": "di:0", "type": "bool"},
]


def device(url: str, tags: list[dict[str, Any]], **extra: Any) -> ModbusDeviceConfig:
    return ModbusDeviceConfig.model_validate(
        {"name": "press", "driver": "modbus", "url": url, "timeout": "500ms", "tags": tags, **extra}
    )


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[ModbusSimulator]:
    # speed=0 freezes the model so that values can be compared exactly.
    async with ModbusSimulator(
        port=0, seed=3, speed=0.0, write_log=tmp_path / "writes.jsonl"
    ) as simulator:
        yield simulator


def url(sim: ModbusSimulator) -> str:
    return f"tcp://127.0.0.1:{sim.port}"


async def test_every_type_and_word_order_decodes(sim: ModbusSimulator) -> None:
    model = sim.model(1)
    async with ModbusDriver(device(url(sim), TYPED_TAGS)) as driver:
        readings = {r.tag: r for r in await driver.read()}
    assert all(r.quality == "good" for r in readings.values()), readings
    values = {name: r.value for name, r in readings.items()}
    assert values["temperature"] == pytest.approx(round(model.temperature * 10) / 10, abs=0.051)
    assert values["total_big"] == values["total_little"] == model.total_count
    assert values["temp_f32"] == values["temp_f32_swapped"]
    assert values["temp_f32"] == pytest.approx(model.temperature, rel=1e-6)
    assert values["energy"] == values["energy_swapped"] == pytest.approx(model.energy_kwh)
    assert values["i16"] == -1234
    assert values["i32"] == -123456
    assert values["i64"] == -1234567890123
    assert values["u32"] == 0xDEADBEEF
    assert values["byteswapped"] == 0x1234
    assert values["state"] == values["state_ir"] == model.state
    assert values["product_name"] == model.product_name
    assert isinstance(values["start"], bool)
    assert isinstance(values["total_big"], int)


async def test_coalescing_reads_1000_tags_in_tens_of_requests(sim: ModbusSimulator) -> None:
    tags = [{"name": f"b{i}", "address": f"hr:{1000 + i}"} for i in range(1000)]
    async with ModbusDriver(device(url(sim), tags)) as driver:
        readings = await driver.read()
        assert driver.requests_last_cycle == 8  # ceil(1000 / 125)
    assert len(readings) == 1000
    assert all(r.quality == "good" for r in readings)


async def test_illegal_address_only_marks_the_offending_tag_bad(sim: ModbusSimulator) -> None:
    # hr:150 is a hole in the simulator's map; the block hr:100..hr:200 would fail as a whole.
    tags = [
        {"name": "state", "address": "hr:100"},
        {"name": "fault", "address": "hr:101"},
        {"name": "hole", "address": "hr:150"},
        {"name": "product_code", "address": "hr:200"},
        {"name": "spare", "address": "hr:300"},
    ]
    async with ModbusDriver(device(url(sim), tags, max_gap=125)) as driver:
        first = {r.tag: r for r in await driver.read()}
        assert first["hole"].quality == "bad"
        assert first["hole"].error is not None
        assert "illegal data address" in first["hole"].error
        assert [first[n].quality for n in ("state", "fault", "product_code", "spare")] == [
            "good"
        ] * 4
        # The finer plan is kept: the next cycle does not fail the big block again.
        requests_after_split = len(driver.plan)
        second = {r.tag: r for r in await driver.read()}
        assert driver.requests_last_cycle == requests_after_split
        assert second["hole"].quality == "bad"
        assert second["state"].quality == "good"


async def test_write_goes_out_once_and_is_verified(sim: ModbusSimulator, tmp_path: Path) -> None:
    async with ModbusDriver(device(url(sim), TYPED_TAGS)) as driver:
        assert await driver.write("product_code", 4711) == 4711
        assert await driver.write("target_qty", 100000) == 100000
        assert await driver.write("product_name", "PART-Z") == "PART-Z"
        assert await driver.write("spare_f32", 12.5) == 12.5
        assert await driver.write("spare_scaled", 21.5) == pytest.approx(21.5)
        assert await driver.write("spare_bit3", True) is True
        assert await driver.write("start", True) is True
    model = sim.model(1)
    assert (model.product_code, model.target_qty, model.product_name) == (4711, 100000, "PART-Z")
    log = [json.loads(line) for line in (tmp_path / "writes.jsonl").read_text().splitlines()]
    by_address = [(entry["function_code"], entry["address"]) for entry in log]
    # One request per write: FC6 single register, FC16 multi-register, FC22 bit, FC5 coil.
    assert by_address == [(6, 200), (16, 201), (16, 210), (16, 300), (6, 302), (22, 304), (5, 0)]
    raw = next(entry["values"] for entry in log if entry["address"] == 302)
    assert raw == [215]


async def test_write_multiple_uses_fc15_and_fc16(sim: ModbusSimulator, tmp_path: Path) -> None:
    async with ModbusDriver(device(url(sim), TYPED_TAGS, write_multiple=True)) as driver:
        await driver.write("product_code", 12)
        await driver.write("start", True)
    log = [json.loads(line) for line in (tmp_path / "writes.jsonl").read_text().splitlines()]
    assert [(e["function_code"], e["address"]) for e in log] == [(16, 200), (15, 0)]


async def test_refused_and_invalid_writes(sim: ModbusSimulator, tmp_path: Path) -> None:
    async with ModbusDriver(device(url(sim), TYPED_TAGS)) as driver:
        with pytest.raises(DriverFault, match="illegal data value"):
            await driver.write("product_code", 10000)  # the simulator allows 0..9999
        with pytest.raises(DriverFault, match="not writable"):
            await driver.write("state", 1)
        with pytest.raises(DriverFault, match="does not fit"):
            await driver.write("product_code", 70000)
        with pytest.raises(DriverFault, match="longer than"):
            await driver.write("product_name", "X" * 17)
        with pytest.raises(DriverFault, match="no tag"):
            await driver.write("nope", 1)
    log = (tmp_path / "writes.jsonl").read_text().splitlines()
    assert len(log) == 1  # only the refused 10000 reached the device; the rest never left


async def test_write_that_the_plc_overrides_is_unverified(sim: ModbusSimulator) -> None:
    async with ModbusDriver(device(url(sim), TYPED_TAGS)) as driver:
        await driver.write("product_code", 1)
        sim.model(1).write("maintenance_lock", True)  # locked: start is ignored
        with pytest.raises(WriteUnverified, match="read back False"):
            await driver.write("start", True)


async def test_stalled_device_times_out_as_unavailable(sim: ModbusSimulator) -> None:
    config = device(url(sim), [{"name": "state", "address": "hr:100"}], read_retries=0)
    async with ModbusDriver(config) as driver:
        assert (await driver.read())[0].quality == "good"
        sim.stall()
        with pytest.raises(DriverUnavailable, match="timeout"):
            await driver.read()
        sim.unstall()


@pytest.mark.parametrize("fault", ["garbage", "wrong_transaction_id"])
async def test_corrupt_answers_give_no_value(sim: ModbusSimulator, fault: str) -> None:
    config = device(url(sim), [{"name": "state", "address": "hr:100"}], read_retries=0)
    async with ModbusDriver(config) as driver:
        getattr(sim, fault)(True)
        with pytest.raises(DriverUnavailable):
            await driver.read()
        getattr(sim, fault)(False)
    # A fresh connection reads good values again.
    async with ModbusDriver(config) as driver:
        assert (await driver.read())[0].quality == "good"


async def test_closed_connection_is_unavailable_then_reconnects(sim: ModbusSimulator) -> None:
    config = device(url(sim), [{"name": "state", "address": "hr:100"}], read_retries=0)
    async with ModbusDriver(config) as driver:
        await driver.read()
        sim.close_connections()
        await asyncio.sleep(0)  # let the close reach the client

        async def read_until_error() -> None:
            for _ in range(3):
                await driver.read()

        with pytest.raises(DriverUnavailable):
            await read_until_error()
    async with ModbusDriver(config) as driver:
        assert (await driver.read())[0].quality == "good"


async def test_connect_refused() -> None:
    from tests.fixtures.ports import free_port

    config = device(f"tcp://127.0.0.1:{free_port()}", [{"name": "s", "address": "hr:1"}])
    with pytest.raises(DriverUnavailable, match="cannot connect"):
        async with ModbusDriver(config):
            pass


async def test_devices_on_one_link_share_it(tmp_path: Path) -> None:
    async with ModbusSimulator(port=0, seed=1, speed=0.0, units=2) as simulator:
        shared = SharedResources()
        first = ModbusDriver(
            device(url(simulator), [{"name": "state", "address": "hr:100"}], unit_id=1),
            DriverContext(shared=shared),
        )
        second = ModbusDriver(
            ModbusDeviceConfig.model_validate(
                {
                    "name": "press2",
                    "driver": "modbus",
                    "url": url(simulator),
                    "unit_id": 2,
                    "tags": [{"name": "state", "address": "hr:100"}],
                }
            ),
            DriverContext(shared=shared),
        )
        async with first, second:
            assert len(shared) == 1
            results = await asyncio.gather(*(d.read() for d in (first, second, first, second)))
            assert all(r[0].quality == "good" for r in results)
            assert simulator.connections == 1  # one TCP connection, one request at a time


async def test_rtu_over_a_pty_pair(tmp_path: Path) -> None:
    async with (
        PtyBridge() as cable,
        ModbusSimulator(port=None, serial=cable.a, seed=3, speed=0.0) as simulator,
    ):
        config = device(
            f"rtu://{cable.b}?baudrate=19200&parity=N",
            [
                t
                for t in TYPED_TAGS
                if t["name"] in ("state", "total_big", "i64", "running", "product_name")
            ],
            frame_gap="2ms",
        )
        async with ModbusDriver(config) as driver:
            readings = {r.tag: r for r in await driver.read()}
            assert all(r.quality == "good" for r in readings.values()), readings
            assert readings["i64"].value == -1234567890123
            assert readings["total_big"].value == simulator.model(1).total_count
            assert await driver.write("product_name", "RTU") == "RTU"


def test_struct_sanity() -> None:
    # The simulator's documented constant, decoded independently of the driver.
    assert struct.unpack(">q", struct.pack(">q", -1234567890123))[0] == -1234567890123
