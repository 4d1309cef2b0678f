"""The Modbus simulator over real sockets (and a pty pair) with pymodbus' own async clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.framer import FramerType

from simulators.line import BulkBlock, LineModel
from simulators.modbus.cli import main
from simulators.modbus.control import send_control
from simulators.modbus.registers import BULK_START, register_map_table
from simulators.modbus.server import ModbusSimulator
from simulators.ptybridge import PtyBridge

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 0.3  # client timeout where a request is expected to go unanswered


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], within: float = 5.0, what: str = ""
) -> None:
    """Poll ``predicate`` until true, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within}s: {what}")
        await asyncio.sleep(0.01)


def be_bytes(registers: Sequence[int], *, little_word_order: bool = False) -> bytes:
    """Registers as the big-endian byte string of the value they encode."""
    words = list(registers)[::-1] if little_word_order else registers
    return b"".join(word.to_bytes(2, "big") for word in words)


def tcp_client(port: int, timeout: float = 2.0) -> AsyncModbusTcpClient:
    """A pymodbus client without retries or automatic reconnection."""
    return AsyncModbusTcpClient(
        "127.0.0.1", port=port, timeout=timeout, retries=0, reconnect_delay=0
    )


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[ModbusSimulator]:
    # speed 0: the models only move when a test advances them, so reads match snapshots.
    async with ModbusSimulator(
        port=0, seed=1, speed=0.0, write_log=tmp_path / "writes.jsonl"
    ) as simulator:
        simulator.model().advance(5000.0)
        yield simulator


@pytest.fixture
async def client(sim: ModbusSimulator) -> AsyncIterator[AsyncModbusTcpClient]:
    assert sim.port is not None
    c = tcp_client(sim.port)
    assert await c.connect()
    yield c
    c.close()


# ---------------------------------------------------------------- values


async def test_coils_and_discrete_inputs(
    sim: ModbusSimulator, client: AsyncModbusTcpClient
) -> None:
    m = sim.model()
    m.force_state(2, fault_code=4)
    m.write("quality_hold", True)
    coils = await client.read_coils(0, count=4)
    assert coils.bits[:4] == [True, False, True, False]
    inputs = await client.read_discrete_inputs(0, count=4)
    assert inputs.bits[:4] == [False, False, False, False]  # held: state 3
    m.write("quality_hold", False)
    inputs = await client.read_discrete_inputs(0, count=4)
    assert inputs.bits[:4] == [False, True, False, False]
    m.force_state(4)
    inputs = await client.read_discrete_inputs(1, count=2)
    assert inputs.bits[:2] == [False, True]


async def test_input_registers(sim: ModbusSimulator, client: AsyncModbusTcpClient) -> None:
    snap = sim.model().snapshot()
    assert isinstance(snap["total_count"], int)
    assert snap["total_count"] > 1000
    regs = (await client.read_input_registers(0, count=33)).registers
    temp = snap["temperature"]
    assert isinstance(temp, float)
    assert struct.unpack(">h", be_bytes(regs[0:1]))[0] == round(temp * 10)
    assert regs[1] == snap["state"]
    assert struct.unpack(">I", be_bytes(regs[2:4]))[0] == snap["total_count"]
    assert (
        struct.unpack(">I", be_bytes(regs[4:6], little_word_order=True))[0] == snap["total_count"]
    )
    assert regs[4:6] == regs[2:4][::-1]
    assert struct.unpack(">f", be_bytes(regs[6:8]))[0] == pytest.approx(temp, abs=1e-4)
    assert struct.unpack(">f", be_bytes(regs[8:10], little_word_order=True))[0] == (
        pytest.approx(temp, abs=1e-4)
    )
    runtime_ms = struct.unpack(">Q", be_bytes(regs[10:14]))[0]
    assert runtime_ms == int(float(snap["runtime_s"]) * 1000) > 0
    assert struct.unpack(">d", be_bytes(regs[14:18]))[0] == snap["energy_kwh"]
    assert (
        struct.unpack(">d", be_bytes(regs[18:22], little_word_order=True))[0] == snap["energy_kwh"]
    )
    assert regs[22] == snap["cycle_counter16"]
    assert struct.unpack(">h", be_bytes(regs[23:24]))[0] == -1234
    assert struct.unpack(">i", be_bytes(regs[24:26]))[0] == -123456
    assert struct.unpack(">q", be_bytes(regs[26:30]))[0] == -1234567890123
    assert struct.unpack(">I", be_bytes(regs[30:32]))[0] == 0xDEADBEEF
    assert regs[32] == 0x3412
    assert struct.unpack("<H", be_bytes(regs[32:33]))[0] == 0x1234


async def test_holding_registers(sim: ModbusSimulator, client: AsyncModbusTcpClient) -> None:
    m = sim.model()
    m.force_state(2, fault_code=6)
    m.write("product_name", "WIDGET-7")
    snap = m.snapshot()
    regs = (await client.read_holding_registers(100, count=11)).registers
    assert regs[0:2] == [2, 6]
    assert struct.unpack(">III", be_bytes(regs[2:8])) == (
        snap["total_count"],
        snap["reject_count"],
        snap["good_count"],
    )
    assert regs[8:11] == [
        snap["total_count16"],
        snap["reject_count16"],
        snap["last_cycle_ms"],
    ]
    regs = (await client.read_holding_registers(200, count=3)).registers
    assert regs == [1, 0, 0]
    regs = (await client.read_holding_registers(210, count=8)).registers
    assert be_bytes(regs) == b"WIDGET-7\0\0\0\0\0\0\0\0"
    # Part of a multi-register value is readable on its own.
    low = (await client.read_holding_registers(103, count=1)).registers[0]
    assert low == int(snap["total_count"]) & 0xFFFF


async def test_values_follow_the_model(tmp_path: Path) -> None:
    async with ModbusSimulator(port=0, seed=1, speed=200.0) as simulator:
        assert simulator.port is not None
        c = tcp_client(simulator.port)
        await c.connect()

        async def produced() -> bool:
            regs = (await c.read_holding_registers(102, count=2)).registers
            total: int = struct.unpack(">I", be_bytes(regs))[0]
            return total >= 5

        await eventually(produced, what="parts produced at speed 200")
        c.close()


async def test_sixteen_bit_counters_roll_over() -> None:
    def factory(_unit: int, seed: int) -> LineModel:
        return LineModel(
            seed=seed,
            counter_bits=16,
            initial_total=0xFFFE,
            mean_time_between_faults_s=float("inf"),
            mean_time_between_starved_s=float("inf"),
            mean_time_between_changeovers_s=float("inf"),
        )

    async with ModbusSimulator(port=0, speed=0.0, model_factory=factory) as simulator:
        assert simulator.port is not None
        c = tcp_client(simulator.port)
        await c.connect()
        simulator.model().advance(10.0)
        regs = (await c.read_holding_registers(102, count=7)).registers
        total = struct.unpack(">I", be_bytes(regs[0:2]))[0]
        assert total == simulator.model().total_count < 0xFFFE
        assert regs[6] == total
        c.close()


async def test_spare_registers_and_bulk(sim: ModbusSimulator, client: AsyncModbusTcpClient) -> None:
    assert (await client.read_holding_registers(300, count=100)).registers == [0] * 100
    await client.write_registers(350, [1, 2, 65535])
    assert (await client.read_holding_registers(349, count=5)).registers == [0, 1, 2, 65535, 0]
    await client.mask_write_register(address=350, and_mask=0x00F0, or_mask=0x1203)
    rw = await client.readwrite_registers(
        read_address=350, read_count=2, write_address=399, values=[9]
    )
    assert rw.registers == [(1 & 0x00F0) | (0x1203 & ~0x00F0 & 0xFFFF), 2]
    assert (await client.read_holding_registers(399, count=1)).registers == [9]

    m = sim.model()
    bulk = BulkBlock(seed=1, size=5000, change_fraction=0.1)  # the documented default
    values: list[int] = []
    for block in range(40):  # the whole 5,000-register block in 40 requests
        response = await client.read_holding_registers(BULK_START + block * 125, count=125)
        values += response.registers
    assert values == bulk.values(0, 5000, m.sim_time_s)
    m.advance(1.0)
    after = (await client.read_holding_registers(BULK_START, count=125)).registers
    changed = sum(a != b for a, b in zip(values[:125], after, strict=True))
    assert 0 < changed < 40  # about 10 % of 125


@pytest.mark.parametrize(
    ("kind", "address", "count"),
    [
        ("hr", 0, 1),
        ("hr", 99, 1),
        ("hr", 98, 4),  # partly covers hr:100-101
        ("hr", 110, 2),
        ("hr", 111, 1),
        ("hr", 199, 2),
        ("hr", 202, 2),
        ("hr", 203, 1),
        ("hr", 209, 1),
        ("hr", 217, 2),
        ("hr", 299, 1),
        ("hr", 400, 1),
        ("hr", 999, 2),
        ("hr", 5990, 20),
        ("hr", 6000, 1),
        ("hr", 65535, 1),
        ("ir", 33, 1),
        ("ir", 30, 5),
        ("ir", 100, 1),
        ("co", 4, 1),
        ("co", 2, 3),
        ("co", 100, 1),
        ("di", 4, 1),
        ("di", 0, 5),
    ],
)
async def test_illegal_addresses(
    client: AsyncModbusTcpClient, kind: str, address: int, count: int
) -> None:
    read = {
        "hr": client.read_holding_registers,
        "ir": client.read_input_registers,
        "co": client.read_coils,
        "di": client.read_discrete_inputs,
    }[kind]
    response = await read(address, count=count)
    assert response.isError()
    assert response.exception_code == 2


@pytest.mark.parametrize(
    ("address", "values"),
    [(100, [1]), (110, [5]), (199, [1, 2]), (202, [0, 0]), (217, [1, 1]), (1000, [1])],
)
async def test_writes_to_read_only_or_holes_rejected(
    sim: ModbusSimulator, client: AsyncModbusTcpClient, address: int, values: list[int]
) -> None:
    before = sim.model().snapshot()
    response = await client.write_registers(address, values)
    assert response.isError()
    assert response.exception_code == 2
    assert sim.model().snapshot() == before
    assert sim.writes[-1].result == "exception 2"
    assert (await client.write_coils(3, [True, True])).exception_code == 2


async def test_writes_land_in_model_and_write_log(
    sim: ModbusSimulator, client: AsyncModbusTcpClient, tmp_path: Path
) -> None:
    m = sim.model()
    m.force_state(1)
    assert not (await client.write_register(200, 4711)).isError()
    assert not (await client.write_registers(201, [0x0001, 0x86A0])).isError()
    name = b"PART-XYZ".ljust(16, b"\0")
    name_regs = [int.from_bytes(name[i : i + 2], "big") for i in range(0, 16, 2)]
    assert not (await client.write_registers(210, name_regs)).isError()
    assert not (await client.write_coil(2, True)).isError()
    assert (m.product_code, m.target_qty, m.product_name) == (4711, 100_000, "PART-XYZ")
    assert m.state == 3
    assert (await client.read_holding_registers(100, count=1)).registers == [3]
    assert not (await client.write_coils(0, [False, True, False])).isError()
    assert (m.start, m.stop, m.quality_hold, m.state) == (False, True, False, 0)

    expected = [
        (6, 200, [4711]),
        (16, 201, [1, 0x86A0]),
        (16, 210, name_regs),
        (5, 2, [True]),
        (15, 0, [False, True, False]),
    ]
    assert [(w.function_code, w.address, w.values, w.result) for w in sim.writes] == [
        (*e, "ok") for e in expected
    ]
    lines = (tmp_path / "writes.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["unit"], r["function_code"], r["address"], r["values"]) for r in records] == [
        (1, *e) for e in expected
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"]) for r in records)
    assert records[3]["values"] == [True]  # coils are JSON booleans


async def test_invalid_values_rejected_with_exception_3(
    sim: ModbusSimulator, client: AsyncModbusTcpClient
) -> None:
    m = sim.model()
    assert (await client.write_register(200, 10000)).exception_code == 3
    bad_name = [0xC3A4, 0x0000]  # "ä" in UTF-8: not ASCII
    assert (await client.write_registers(210, bad_name)).exception_code == 3
    # One bad value in a multi-point write changes nothing.
    assert (await client.write_registers(200, [10000, 0, 5])).exception_code == 3
    assert (m.product_code, m.target_qty, m.product_name) == (1, 0, "PART-A")
    assert [w.result for w in sim.writes] == ["exception 3"] * 3


async def test_partial_write_keeps_other_word(
    sim: ModbusSimulator, client: AsyncModbusTcpClient
) -> None:
    await client.write_registers(201, [0x0001, 0x0002])
    await client.write_register(202, 0x0007)
    assert sim.model().target_qty == 0x0001_0007
    await client.write_register(212, 0x4142)  # chars 5-6 of the name
    assert sim.model().product_name == "PARTAB"


async def test_start_ignored_while_locked_but_echoed(
    sim: ModbusSimulator, client: AsyncModbusTcpClient
) -> None:
    m = sim.model()
    assert not (await client.write_coil(3, True)).isError()
    response = await client.write_coil(0, True)
    assert not response.isError()
    assert response.bits[0] is True  # the response echoes the request
    assert (await client.read_coils(0, count=1)).bits[0] is False
    assert m.state == 3
    await client.write_coil(3, False)
    assert (await client.read_holding_registers(100, count=1)).registers == [0]
    await client.write_coil(0, True)
    assert m.state in (1, 2, 3, 4)
    assert m.start


async def test_units(tmp_path: Path) -> None:
    async with ModbusSimulator(port=0, seed=10, speed=0.0, units=2) as simulator:
        assert simulator.port is not None
        assert [simulator.model(u).seed for u in simulator.units] == [10, 11]
        c = tcp_client(simulator.port)
        await c.connect()
        await c.write_register(200, 22, device_id=2)
        assert simulator.model(2).product_code == 22
        assert simulator.model(1).product_code == 1
        assert (await c.read_holding_registers(200, count=1, device_id=2)).registers == [22]
        response = await c.read_holding_registers(200, count=1, device_id=3)
        assert response.isError()
        assert response.exception_code == 0x0B
        c.close()


async def test_concurrent_connections(sim: ModbusSimulator) -> None:
    assert sim.port is not None
    clients = [tcp_client(sim.port) for _ in range(8)]
    await asyncio.gather(*(c.connect() for c in clients))
    await eventually(lambda: sim.connections == 8, what="8 connections")

    async def poll(c: AsyncModbusTcpClient) -> int:
        for i in range(20):
            response = await c.read_holding_registers(BULK_START + i * 125, count=125)
            assert not response.isError()
        return 20

    assert sum(await asyncio.gather(*(poll(c) for c in clients))) == 160
    for c in clients:
        c.close()


# ---------------------------------------------------------------- faults


async def test_close_connections(sim: ModbusSimulator, client: AsyncModbusTcpClient) -> None:
    assert sim.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    await eventually(lambda: sim.connections == 2, what="2 connections")
    assert sim.close_connections() == 2
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # EOF
    writer.close()
    await eventually(lambda: not client.connected, what="client sees the close")
    with pytest.raises(ConnectionException):
        await client.read_holding_registers(100, count=1)
    # The server itself still accepts new connections.
    again = tcp_client(sim.port)
    assert await again.connect()
    assert not (await again.read_holding_registers(100, count=1)).isError()
    again.close()


async def test_stall(sim: ModbusSimulator) -> None:
    assert sim.port is not None
    c = tcp_client(sim.port, timeout=TIMEOUT)
    await c.connect()
    sim.stall()
    with pytest.raises(ModbusIOException):
        await c.read_holding_registers(100, count=1)
    with pytest.raises(ModbusIOException):
        await c.write_register(200, 77)
    assert sim.model().product_code == 1  # a stalled write is not executed
    assert sim.writes[-1].result == "dropped"
    assert sim.connections == 1  # the connection stays open
    assert c.connected
    sim.unstall()
    assert (await c.read_holding_registers(200, count=1)).registers == [1]

    sim.stall(0.2)  # with a duration it ends by itself
    with pytest.raises(ModbusIOException):
        await c.read_holding_registers(100, count=1)
    await eventually(lambda: sim.faults()["stall"] is None, what="stall expiry")
    assert not (await c.read_holding_registers(100, count=1)).isError()
    c.close()


async def test_exception_mode(sim: ModbusSimulator, client: AsyncModbusTcpClient) -> None:
    sim.exception(4)
    assert (await client.read_holding_registers(100, count=1)).exception_code == 4
    assert (await client.read_coils(0, count=1)).exception_code == 4
    assert (await client.write_register(200, 5)).exception_code == 4
    assert sim.model().product_code == 1  # not executed
    sim.exception(6, ["hr:100", 5])
    assert (await client.read_holding_registers(100, count=2)).exception_code == 6
    assert (await client.read_holding_registers(98, count=4)).exception_code == 6
    assert (await client.read_input_registers(4, count=2)).exception_code == 6  # 5, any area
    assert not (await client.read_holding_registers(101, count=1)).isError()
    assert not (await client.read_input_registers(0, count=1)).isError()
    sim.exception(None)
    assert not (await client.read_holding_registers(100, count=1)).isError()
    with pytest.raises(ValueError, match="9 is not a valid ExcCodes"):
        sim.exception(9)  # not a Modbus exception code


async def test_wrong_transaction_id(sim: ModbusSimulator) -> None:
    assert sim.port is not None
    c = tcp_client(sim.port, timeout=TIMEOUT)
    await c.connect()
    sim.wrong_transaction_id(True)
    with pytest.raises(ModbusIOException):
        await c.read_holding_registers(100, count=1)
    sim.wrong_transaction_id(False)
    assert not (await c.read_holding_registers(100, count=1)).isError()
    c.close()


async def test_wrong_transaction_id_on_the_wire(sim: ModbusSimulator) -> None:
    assert sim.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    request = bytes.fromhex("1234 0000 0006 01 03 0064 0001")
    sim.wrong_transaction_id(True)
    writer.write(request)
    async with asyncio.timeout(5):
        header = await reader.readexactly(7)
    assert header[0:2] == (0x1235).to_bytes(2, "big")
    writer.close()


async def test_garbage(sim: ModbusSimulator) -> None:
    assert sim.port is not None
    c = tcp_client(sim.port, timeout=TIMEOUT)
    await c.connect()
    sim.garbage(True)
    with pytest.raises(ModbusIOException):
        await c.read_holding_registers(100, count=1)
    response_or_error: object
    try:
        response_or_error = await c.write_register(200, 42)
    except ModbusIOException as exc:
        response_or_error = exc
    assert isinstance(response_or_error, ModbusIOException)
    assert sim.model().product_code == 42  # executed: only the answer is lost
    sim.garbage(False)
    assert (await c.read_holding_registers(200, count=1)).registers == [42]
    c.close()


async def test_restart_same_port(sim: ModbusSimulator, client: AsyncModbusTcpClient) -> None:
    port = sim.port
    assert port is not None
    await client.write_register(300, 9)
    await sim.restart()
    assert sim.port == port
    await eventually(lambda: not client.connected, what="old connection dropped")
    again = tcp_client(port)
    assert await again.connect()
    assert (await again.read_holding_registers(300, count=1)).registers == [9]  # state kept
    again.close()


# ---------------------------------------------------------------- RTU


async def test_rtu_over_pty(tmp_path: Path) -> None:
    async with (
        PtyBridge() as cable,
        ModbusSimulator(port=None, serial=cable.a, speed=0.0, units=2) as simulator,
    ):
        assert simulator.serial_device == cable.a
        c = AsyncModbusSerialClient(
            cable.b, framer=FramerType.RTU, baudrate=19200, timeout=0.5, retries=0
        )
        assert await c.connect()
        m = simulator.model()
        m.advance(1000.0)
        regs = (await c.read_holding_registers(100, count=11, device_id=1)).registers
        assert struct.unpack(">I", be_bytes(regs[2:4]))[0] == m.total_count
        assert not (await c.write_register(200, 321, device_id=2)).isError()
        assert simulator.model(2).product_code == 321
        assert (await c.read_holding_registers(98, count=4)).exception_code == 2
        with pytest.raises(ModbusIOException):  # an unknown unit stays silent on a bus
            await c.read_holding_registers(100, count=1, device_id=9)
        simulator.wrong_transaction_id(True)  # RTU: answers as another unit
        with pytest.raises(ModbusIOException):
            await c.read_holding_registers(100, count=1, device_id=1)
        simulator.wrong_transaction_id(False)
        assert not (await c.read_input_registers(0, count=33, device_id=1)).isError()
        c.close()


# ---------------------------------------------------------------- CLI / subprocess


class Proc:
    """The simulator CLI in a subprocess, with its startup lines parsed."""

    def __init__(self, process: asyncio.subprocess.Process, lines: list[str]) -> None:
        self.process = process
        self.lines = lines

    def find(self, pattern: str) -> re.Match[str]:
        for line in self.lines:
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"{pattern!r} not printed: {self.lines}")


async def start_cli(*args: str) -> Proc:
    """Start ``python -m simulators.modbus`` and read its output up to the settings line."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators.modbus",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(15):
        while not (lines and lines[-1].startswith("units ")):
            line = await process.stdout.readline()
            assert line, f"simulator exited early: {lines}"
            lines.append(line.decode().rstrip("\n"))
    return Proc(process, lines)


async def stop_cli(proc: Proc, sig: signal.Signals = signal.SIGTERM) -> int:
    """Signal the subprocess and return its exit code."""
    if proc.process.returncode is None:
        proc.process.send_signal(sig)
    async with asyncio.timeout(10):
        return await proc.process.wait()


async def test_cli_serves_controls_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "w.jsonl"
    proc = await start_cli(
        "--port", "0", "--control-port", "0", "--serial", "pty", "--write-log", str(log),
        "--speed", "5",
    )  # fmt: skip
    try:
        assert register_map_table() in "\n".join(proc.lines)
        port = int(proc.find(r"modbus simulator listening on 127\.0\.0\.1:(\d+)")[1])
        control = int(proc.find(r"control on 127\.0\.0\.1:(\d+)")[1])
        device = proc.find(r"RTU on (\S+)")[1]

        c = tcp_client(port, timeout=TIMEOUT)
        assert await c.connect()
        assert not (await c.write_register(200, 17)).isError()
        assert json.loads(log.read_text().splitlines()[-1])["values"] == [17]

        assert await send_control(control, "ping") == ""
        status = json.loads(await send_control(control, "status"))
        assert status["port"] == port
        assert status["units"]["1"]["product_code"] == 17

        await send_control(control, "exception 4 hr:100")
        assert (await c.read_holding_registers(100, count=1)).exception_code == 4
        assert not (await c.read_holding_registers(200, count=1)).isError()
        await send_control(control, "exception off")
        await send_control(control, "force_state 1 2 5")
        assert (await c.read_holding_registers(100, count=2)).registers == [2, 5]
        await send_control(control, 'write 1 product_name "ABC"')
        regs = (await c.read_holding_registers(210, count=2)).registers
        assert be_bytes(regs) == b"ABC\0"

        for fault in ("stall", "garbage on", "wrong_tid on"):
            await send_control(control, fault)
            with pytest.raises(ModbusIOException):
                await c.read_holding_registers(100, count=1)
            await send_control(control, "clear")
            assert not (await c.read_holding_registers(100, count=1)).isError()

        assert await send_control(control, "close") == "1"
        await eventually(lambda: not c.connected, what="closed by the control channel")
        c.close()
        await send_control(control, "restart")
        c = tcp_client(port)
        assert await c.connect()
        assert (await c.read_holding_registers(200, count=1)).registers == [17]
        c.close()

        rtu = AsyncModbusSerialClient(device, framer=FramerType.RTU, timeout=1, retries=0)
        assert await rtu.connect()
        assert (await rtu.read_holding_registers(200, count=1)).registers == [17]
        rtu.close()

        with pytest.raises(RuntimeError, match="unknown command"):
            await send_control(control, "bogus")
    finally:
        code = await stop_cli(proc)
    assert code == 0


async def test_cli_sigkill_keeps_write_log_and_restarts_on_same_port(tmp_path: Path) -> None:
    log = tmp_path / "w.jsonl"
    proc = await start_cli("--port", "0", "--write-log", str(log))
    port = int(proc.find(r"listening on 127\.0\.0\.1:(\d+)")[1])
    try:
        c = tcp_client(port)
        await c.connect()
        for value in range(1, 6):
            assert not (await c.write_register(300, value)).isError()
        c.close()
    finally:
        assert await stop_cli(proc, signal.SIGKILL) == -signal.SIGKILL
    assert [json.loads(line)["values"] for line in log.read_text().splitlines()] == [
        [v] for v in range(1, 6)
    ]

    proc = await start_cli("--port", str(port), "--write-log", str(log))
    try:
        c = tcp_client(port)
        assert await c.connect()
        await c.write_register(301, 99)
        c.close()
    finally:
        assert await stop_cli(proc, signal.SIGINT) == 0
    assert len(log.read_text().splitlines()) == 6  # appended, not truncated


def test_main_usage_and_listen_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bogus"]) == 2
    assert main(["--speed", "-1"]) == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["--port", str(busy.getsockname()[1])]) == 1
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err
    assert "Traceback" not in err


def test_readme_has_the_register_map() -> None:
    readme = (REPO / "simulators" / "README.md").read_text()
    assert register_map_table() in readme
