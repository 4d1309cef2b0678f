"""The OPC UA simulator with asyncua's own client: namespace, node types, model writes, the
control channel, the CLI's exit codes."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.uaerrors import UaStatusCodeError

from simulators.opcua.cli import main
from simulators.opcua.control import send_control
from simulators.opcua.nodes import NAMESPACE_URI, NODE_TABLE
from simulators.opcua.server import OpcUaSimulator

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module", autouse=True)
def _quiet_asyncua() -> Iterator[None]:
    logger = logging.getLogger("asyncua")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sim() -> AsyncIterator[OpcUaSimulator]:
    async with OpcUaSimulator(port=0, speed=0.0, bulk_count=10, control_port=0) as simulator:
        yield simulator


@pytest_asyncio.fixture(loop_scope="module")
async def client(sim: OpcUaSimulator) -> AsyncIterator[Client]:
    opcua = Client(sim.url, timeout=2)
    await opcua.connect()
    try:
        yield opcua
    finally:
        await opcua.disconnect()
        await sim.clear_faults()


async def control(sim: OpcUaSimulator, command: str) -> str:
    assert sim.control_port is not None
    async with asyncio.timeout(5):
        return await send_control(sim.control_port, command)


async def test_namespace_has_index_2_and_every_node_its_type(
    sim: OpcUaSimulator, client: Client
) -> None:
    assert await client.get_namespace_index(NAMESPACE_URI) == 2
    for spec in NODE_TABLE:
        value = await client.get_node(spec.node_id).read_data_value()
        assert value.Value is not None
        assert value.Value.VariantType.name == spec.type, spec.name
        assert value.Value.is_array == spec.array, spec.name
        assert value.SourceTimestamp is not None
    bulk = await client.get_node("ns=2;s=Bulk.0009").read_value()
    assert bulk == sim.bulk.value(9, sim.model.sim_time_s)


async def test_client_writes_command_the_model_and_are_logged(
    sim: OpcUaSimulator, client: Client
) -> None:
    node = client.get_node("ns=2;s=Filler.ProductCode")
    await node.write_value(ua.DataValue(ua.Variant(321, ua.VariantType.UInt16)))
    assert sim.model.product_code == 321
    with pytest.raises(UaStatusCodeError, match="BadTypeMismatch"):
        await node.write_value(ua.DataValue(ua.Variant(322, ua.VariantType.Int32)))
    with pytest.raises(UaStatusCodeError, match="BadOutOfRange"):
        await node.write_value(ua.DataValue(ua.Variant(10000, ua.VariantType.UInt16)))
    assert sim.model.product_code == 321
    assert [w.result for w in sim.writes[-3:]] == ["Good", "BadTypeMismatch", "BadOutOfRange"]


async def test_control_channel_faults(sim: OpcUaSimulator, client: Client) -> None:
    assert await control(sim, "ping") == ""
    await control(sim, "set_value Filler.Temperature NaN")
    value = await client.get_node("ns=2;s=Filler.Temperature").read_value()
    assert math.isnan(value)
    assert json.loads(await control(sim, "read Filler.Temperature"))["value"] == "nan"
    await control(sim, "status_code ns=2;s=Filler.State BadSensorFailure")
    state = await client.get_node("ns=2;s=Filler.State").read_data_value(raise_on_bad_status=False)
    assert state.StatusCode is not None
    assert state.StatusCode.name == "BadSensorFailure"
    await control(sim, "change_type Filler.Counters.Total String")
    total = await client.get_node("ns=2;s=Filler.Counters.Total").read_data_value()
    assert total.Value is not None
    assert total.Value.VariantType == ua.VariantType.String
    status = json.loads(await control(sim, "status"))
    assert status["pinned"] == ["Filler.Temperature"]
    assert status["status_codes"] == {"Filler.State": "BadSensorFailure"}
    assert status["types"] == {"Filler.Counters.Total": "String"}
    await control(sim, "clear")
    status = json.loads(await control(sim, "status"))
    assert (status["pinned"], status["status_codes"], status["types"]) == ([], {}, {})
    assert await client.get_node("ns=2;s=Filler.Counters.Total").read_value() == (
        sim.model.total_count
    )
    with pytest.raises(RuntimeError, match="unknown command"):
        await control(sim, "explode")


async def test_stall_and_restart(sim: OpcUaSimulator) -> None:
    opcua = Client(sim.url, timeout=0.5)
    await opcua.connect()
    try:
        await control(sim, "stall")
        with pytest.raises((TimeoutError, ConnectionError)):
            await opcua.get_node("ns=2;s=Filler.State").read_value()
        await control(sim, "unstall")
        await control(sim, "restart")
        assert sim.connections == 0
    finally:
        await opcua.disconnect()
    async with Client(sim.url, timeout=2) as again:
        assert await again.get_node("ns=2;s=Filler.State").read_value() == sim.model.state


async def test_cli_exit_codes() -> None:
    # Usage errors return before any event loop is started.
    assert main(["--bogus"]) == 2
    assert main(["--speed", "-1"]) == 2
