"""OpcUaDriver against the OPC UA simulator over real sockets: typed values (subscribe and
poll), deadband, status codes, NaN/Inf, type changes, verified writes, the security matrix,
certificates, stall detection and 20 restarts without leaking sockets or tasks."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
from asyncua import ua
from asyncua.ua.status_codes import StatusCodes
from cryptography import x509

from drivers.base import DriverContext, DriverFault, DriverUnavailable, Reading, WriteUnverified
from drivers.opcua.config import OpcUaDeviceConfig
from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.security import create_client_certificate, fingerprint
from drivers.opcua.values import (
    NotFinite,
    json_value,
    make_reading,
    status_name,
    to_variant,
)
from simulators.opcua.nodes import CONST_BYTES
from simulators.opcua.security import ALL_ENDPOINTS
from simulators.opcua.server import OpcUaSimulator
from tests.fixtures.modes import modes_under, umask, wider_than_private
from tests.fixtures.ports import async_wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

APP_URI = "urn:plant1-line3:edge-agent"
PASSWORD = "s3cret-pw"


@pytest.fixture(scope="module", autouse=True)
def _quiet_asyncua() -> Iterator[None]:
    # asyncua logs every refused login and dropped connection; the agent logs transitions.
    logger = logging.getLogger("asyncua")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sim() -> AsyncIterator[OpcUaSimulator]:
    # speed=0 freezes the line model so that values can be compared exactly.
    async with OpcUaSimulator(port=0, seed=3, speed=0.0, bulk_count=20) as simulator:
        yield simulator


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure_sim(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[OpcUaSimulator]:
    async with OpcUaSimulator(
        port=0,
        speed=0.0,
        bulk_count=0,
        endpoints=ALL_ENDPOINTS,
        users={"edge": PASSWORD},
        allow_anonymous=True,
        pki_dir=tmp_path_factory.mktemp("server-pki"),
    ) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data_dir for the module: the client key pair is generated once."""
    return tmp_path_factory.mktemp("agent-data")


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def _clean(sim: OpcUaSimulator) -> AsyncIterator[None]:
    yield
    sim.unstall()
    await sim.clear_faults()


def device(url: str, tags: list[dict[str, Any]], **extra: Any) -> OpcUaDeviceConfig:
    return OpcUaDeviceConfig.model_validate(
        {
            "name": "filler",
            "driver": "opcua",
            "url": url,
            "timeout": "500ms",
            "publishing_interval": "100ms",
            "tags": tags,
            **extra,
        }
    )


def driver(config: OpcUaDeviceConfig, data_dir: Path | None = None) -> OpcUaDriver:
    return OpcUaDriver(config, DriverContext(data_dir=data_dir, application_uri=APP_URI))


# Every type the simulator serves and the JSON value the agent must publish for it.
TYPED: dict[str, Any] = {
    "Filler.Const.Boolean": True,
    "Filler.Const.SByte": -100,
    "Filler.Const.Byte": 200,
    "Filler.Const.Int16": -1234,
    "Filler.Const.UInt16": 65535,
    "Filler.Const.Int32": -123456,
    "Filler.Const.UInt32": 0xDEADBEEF,
    "Filler.Const.Int64": -1234567890123,
    "Filler.Const.UInt64": 2**64 - 1,
    "Filler.Const.Float": 1.5,
    "Filler.Const.Double": math.pi,
    "Filler.Const.String": "edge-agent",
    "Filler.Const.DateTime": "2024-01-02T03:04:05.678Z",
    "Filler.Const.ByteString": base64.b64encode(CONST_BYTES).decode(),
    "Filler.Setpoints.Zones": [60, 62, 64, 66],
}


def tag_name(node: str) -> str:
    return node.replace(".", "_")


def typed_tags(mode: str) -> list[dict[str, Any]]:
    return [
        {"name": tag_name(node), "node_id": f"ns=2;s={node}", "mode": mode} for node in TYPED
    ] + [
        {"name": "state", "node_id": "ns=2;s=Filler.State", "mode": mode},
        {"name": "total", "node_id": "ns=2;s=Filler.Counters.Total", "mode": mode},
        {"name": "temperature", "node_id": "ns=2;s=Filler.Temperature", "mode": mode},
        {"name": "fill_level", "node_id": "ns=2;s=Filler.FillLevel", "mode": mode},
        {"name": "recipe", "node_id": "ns=2;s=Filler.Recipe", "mode": mode},
        {"name": "hold", "node_id": "ns=2;s=Filler.QualityHold", "mode": mode},
        {"name": "zones", "node_id": "ns=2;s=Filler.ZoneTemperatures", "mode": mode},
        {"name": "bulk", "node_id": "ns=2;s=Bulk.0007", "mode": mode},
    ]


def check_typed(sim: OpcUaSimulator, readings: dict[str, Reading]) -> None:
    assert all(r.quality == "good" for r in readings.values()), readings
    for node, expected in TYPED.items():
        value = readings[tag_name(node)].value
        assert value == expected, node
        assert type(value) is type(expected), node
    model = sim.model
    assert readings["state"].value == model.state
    assert readings["total"].value == model.total_count
    assert readings["temperature"].value == model.temperature
    assert isinstance(readings["fill_level"].value, float)
    assert readings["recipe"].value == model.product_name
    assert readings["hold"].value is False
    zones = readings["zones"].value
    assert isinstance(zones, list)
    assert len(zones) == 4
    assert all(isinstance(z, float) for z in zones)
    assert readings["bulk"].value == sim.bulk.value(7, model.sim_time_s)


class Pushed:
    """Readings of a subscription stream, kept per tag: each wait consumes up to its match."""

    def __init__(self, stream: Any) -> None:
        assert stream is not None
        self.stream = stream
        self.by_tag: dict[str, list[Reading]] = {}
        self.cursor: dict[str, int] = {}

    async def wait(self, tag: str, predicate: Any = None, within: float = 5.0) -> Reading:
        """The next reading of `tag` (matching `predicate`) not returned before."""
        async with asyncio.timeout(within):
            while True:
                history = self.by_tag.get(tag, [])
                for index in range(self.cursor.get(tag, 0), len(history)):
                    if predicate is None or predicate(history[index]):
                        self.cursor[tag] = index + 1
                        return history[index]
                self.cursor[tag] = len(history)
                for reading in await anext(self.stream):
                    self.by_tag.setdefault(reading.tag, []).append(reading)


async def drain(stream: Any, within: float = 10.0) -> None:
    """Consume a subscription stream until it raises (or fail after `within` seconds)."""
    async with asyncio.timeout(within):
        async for _ in stream:
            pass


# ---------------------------------------------------------------------- values


async def test_subscribe_mode_delivers_every_type(sim: OpcUaSimulator) -> None:
    config = device(sim.url, typed_tags("subscribe"))
    async with driver(config) as opcua:
        assert opcua.polled_tags == ()
        assert await opcua.read() == []
        stream = opcua.subscriptions()
        assert stream is not None
        readings: dict[str, Reading] = {}
        async with asyncio.timeout(5):
            async for batch in stream:
                readings.update((r.tag, r) for r in batch)
                if len(readings) == len(config.tags):
                    break
        assert opcua.state_detail["notifications"] >= len(config.tags)
    check_typed(sim, readings)


async def test_poll_mode_reads_every_tag_in_one_service_call(sim: OpcUaSimulator) -> None:
    config = device(sim.url, typed_tags("poll"))
    async with driver(config) as opcua:
        assert opcua.subscriptions() is None
        assert len(opcua.polled_tags) == len(config.tags)
        reads = opcua.reads
        readings = {r.tag: r for r in await opcua.read()}
        assert opcua.reads == reads + 1  # one Read request for all nodes
        check_typed(sim, readings)
        # The event time is the server's SourceTimestamp, not the time of the read.
        source = sim.value("Filler.State").SourceTimestamp
        assert source is not None
        assert readings["state"].ts == pytest.approx(source.timestamp(), abs=1e-6)


async def test_mixed_device_and_read_tag_of_any_mode(sim: OpcUaSimulator) -> None:
    tags = [
        {"name": "state", "node_id": "ns=2;s=Filler.State"},
        {"name": "recipe", "node_id": "ns=2;s=Filler.Recipe", "mode": "poll"},
        {"name": "missing", "node_id": "ns=2;s=No.Such.Node", "mode": "poll"},
        {"name": "gone", "node_id": "ns=2;s=No.Such.Node"},
        {"name": "by_uri", "node_id": "nsu=urn:edge-agent:simulator;s=Filler.Const.Int16"},
    ]
    async with driver(device(sim.url, tags)) as opcua:
        assert [t.name for t in opcua.polled_tags] == ["recipe", "missing"]
        polled = {r.tag: r for r in await opcua.read()}
        assert polled["recipe"].value == sim.model.product_name
        assert (polled["missing"].quality, polled["missing"].error) == ("bad", "BadNodeIdUnknown")
        assert (await opcua.read_tag("state")).value == sim.model.state
        assert (await opcua.read_tag("by_uri")).value == -1234
        stream = Pushed(opcua.subscriptions())
        gone = await stream.wait("gone")
        assert (gone.quality, gone.value, gone.error) == ("bad", None, "BadNodeIdUnknown")
        with pytest.raises(DriverFault, match="no tag"):
            await opcua.read_tag("nope")


async def test_deadband_is_an_absolute_filter_on_the_server(sim: OpcUaSimulator) -> None:
    tags = [
        {"name": "speed", "node_id": "ns=2;s=Filler.Setpoints.SpeedBpm", "deadband": 0.5},
        {"name": "recipe", "node_id": "ns=2;s=Filler.Recipe", "deadband": 0.5},
    ]
    async with driver(device(sim.url, tags)) as opcua:
        stream = Pushed(opcua.subscriptions())
        first = await stream.wait("speed")
        await stream.wait("recipe")  # a deadband on a string node is ignored
        assert isinstance(first.value, float)
        base = first.value + 10.0  # a change larger than the deadband
        await sim.set_value("Filler.Setpoints.SpeedBpm", base)
        await stream.wait("speed", lambda r: r.value == base)
        await sim.set_value("Filler.Setpoints.SpeedBpm", base + 0.3)  # within the deadband
        await sim.set_value("Filler.Setpoints.SpeedBpm", base + 1.0)
        await sim.set_value("Filler.Recipe", "OTHER")
        await stream.wait("recipe", lambda r: r.value == "OTHER")
        await stream.wait("speed", lambda r: r.value == base + 1.0)
    speeds = [r.value for r in stream.by_tag["speed"]]
    assert speeds[speeds.index(base) :] == [base, base + 1.0]  # base + 0.3 was filtered


async def test_status_codes_become_quality_with_the_status_name(sim: OpcUaSimulator) -> None:
    tags = [{"name": "temp", "node_id": "ns=2;s=Filler.Temperature"}]
    async with driver(device(sim.url, tags)) as opcua:
        stream = Pushed(opcua.subscriptions())
        await stream.wait("temp")
        await sim.set_status("Filler.Temperature", "BadSensorFailure")
        bad = await stream.wait("temp")
        assert (bad.value, bad.quality, bad.error) == (None, "bad", "BadSensorFailure")
        polled = await opcua.read_tag("temp")
        assert (polled.value, polled.quality, polled.error) == (None, "bad", "BadSensorFailure")
        await sim.set_status("Filler.Temperature", "UncertainLastUsableValue")
        uncertain = await stream.wait("temp")
        assert uncertain.quality == "uncertain"
        assert uncertain.error == "UncertainLastUsableValue"
        assert uncertain.value == sim.model.temperature
        await sim.set_status("Filler.Temperature", "Good")
        good = await stream.wait("temp")
        assert (good.quality, good.error) == ("good", None)


@pytest.mark.parametrize(
    ("node", "value", "text"),
    [
        ("Filler.Temperature", float("nan"), "nan"),
        ("Filler.Temperature", float("inf"), "inf"),
        ("Filler.Temperature", float("-inf"), "-inf"),
        ("Filler.FillLevel", float("nan"), "nan"),
        ("Filler.ZoneTemperatures", [20.0, float("nan"), 21.0, 22.0], "nan"),
    ],
)
async def test_nan_and_inf_are_published_as_null_with_bad_quality(
    sim: OpcUaSimulator, node: str, value: Any, text: str
) -> None:
    tags = [
        {"name": "sub", "node_id": f"ns=2;s={node}"},
        {"name": "poll", "node_id": f"ns=2;s={node}", "mode": "poll"},
    ]
    async with driver(device(sim.url, tags)) as opcua:
        stream = Pushed(opcua.subscriptions())
        await stream.wait("sub")
        await sim.set_value(node, value)
        pushed = await stream.wait("sub")
        (polled,) = await opcua.read()
        await sim.set_value(node, 20.5 if not isinstance(value, list) else [1.0, 2.0, 3.0, 4.0])
        recovered = await stream.wait("sub")
    for reading in (pushed, polled):
        assert (reading.value, reading.quality) == (None, "bad")
        assert reading.error == f"not a finite number ({text})"
    assert recovered.quality == "good"


async def test_type_change_at_runtime_is_followed(sim: OpcUaSimulator) -> None:
    tags: list[dict[str, Any]] = [
        {"name": "temp", "node_id": "ns=2;s=Filler.Temperature"},
        {"name": "batch", "node_id": "ns=2;s=Filler.Setpoints.BatchSize", "writable": True},
    ]
    async with driver(device(sim.url, tags)) as opcua:
        stream = Pushed(opcua.subscriptions())
        before = await stream.wait("temp")
        assert isinstance(before.value, float)
        await sim.change_type("Filler.Temperature", "String")
        text = await stream.wait("temp")
        assert text.value == str(sim.model.temperature)
        await sim.change_type("Filler.Temperature", "Int32")
        number = await stream.wait("temp", lambda r: not isinstance(r.value, str))
        assert number.value == int(sim.model.temperature)
        assert type(number.value) is int
        # A write converts to the type read once and cached; after the PLC changed the type
        # the write is refused once (never resent), the cache dropped, the next write works.
        assert await opcua.write("batch", 30) == 30
        await sim.change_type("Filler.Setpoints.BatchSize", "Double")
        with pytest.raises(DriverFault, match="BadTypeMismatch"):
            await opcua.write("batch", 31)
        assert await opcua.write("batch", 32) == 32.0
    results = [w.result for w in sim.writes if w.node.endswith("BatchSize")][-3:]
    assert results == ["Good", "BadTypeMismatch", "Good"]


# ---------------------------------------------------------------------- writes

WRITES: list[tuple[str, Any, Any, str]] = [
    # node, value written (JSON), value read back, variant type on the server
    ("Filler.Setpoints.Offset", -5, -5, "Int16"),
    ("Filler.Setpoints.BatchSize", 48.0, 48, "Int32"),
    ("Filler.Setpoints.SpeedBpm", 130, 130.0, "Double"),
    ("Filler.Setpoints.FillTarget", 0.1, 0.1, "Float"),  # the float32, written short
    ("Filler.Setpoints.Operator", "anna", "anna", "String"),
    ("Filler.Setpoints.Zones", [70, 71, 72, 73], [70, 71, 72, 73], "Int32"),
    ("Filler.QualityHold", True, True, "Boolean"),
    ("Filler.ProductCode", 4711, 4711, "UInt16"),
    ("Filler.TargetQty", 100000, 100000, "UInt32"),
    ("Filler.Recipe", "PART-Z", "PART-Z", "String"),
]


async def test_writes_are_converted_to_the_node_type_sent_once_and_verified(
    sim: OpcUaSimulator,
) -> None:
    tags = [
        {"name": tag_name(node), "node_id": f"ns=2;s={node}", "writable": True, "mode": "poll"}
        for node, *_ in WRITES
    ]
    before = len(sim.writes)
    async with driver(device(sim.url, tags)) as opcua:
        for node, value, expected, _ in WRITES:
            assert await opcua.write(tag_name(node), value) == expected, node
    records = sim.writes[before:]
    assert [r.node.removeprefix("ns=2;s=") for r in records] == [node for node, *_ in WRITES]
    assert all(r.result == "Good" for r in records)
    for node, _, _, type_name in WRITES:
        variant = sim.value(node).Value
        assert variant is not None
        assert variant.VariantType.name == type_name, node
    model = sim.model
    assert (model.product_code, model.target_qty, model.product_name) == (4711, 100000, "PART-Z")
    assert model.quality_hold is True
    model.write("quality_hold", False)


async def test_refused_and_unconvertible_writes(sim: OpcUaSimulator) -> None:
    tags: list[dict[str, Any]] = [
        {"name": "code", "node_id": "ns=2;s=Filler.ProductCode", "writable": True},
        {"name": "state", "node_id": "ns=2;s=Filler.State"},
        {"name": "hold", "node_id": "ns=2;s=Filler.QualityHold", "writable": True},
        {"name": "const", "node_id": "ns=2;s=Filler.Const.Int16", "writable": True},
    ]
    before = len(sim.writes)
    async with driver(device(sim.url, tags)) as opcua:
        with pytest.raises(DriverFault, match="not writable"):
            await opcua.write("state", 1)
        with pytest.raises(DriverFault, match="out of range for UInt16"):
            await opcua.write("code", 70000)  # never sent
        with pytest.raises(DriverFault, match="expected an integer"):
            await opcua.write("code", "abc")
        with pytest.raises(DriverFault, match="expected a boolean"):
            await opcua.write("hold", "yes")
        with pytest.raises(DriverFault, match="BadOutOfRange"):
            await opcua.write("code", 10000)  # the PLC refuses it
        with pytest.raises(DriverFault, match=r"BadUserAccessDenied|BadNotWritable"):
            await opcua.write("const", 1)  # read-only on the server
    # Only the two that reached the server; the PLC refused both.
    assert [w.result for w in sim.writes[before:]] == ["BadOutOfRange", "BadUserAccessDenied"]


async def test_write_the_plc_overrides_is_unverified(sim: OpcUaSimulator) -> None:
    tags = [{"name": "start", "node_id": "ns=2;s=Filler.Start", "writable": True}]
    sim.model.write("maintenance_lock", True)  # a locked-out machine ignores Start
    try:
        async with driver(device(sim.url, tags)) as opcua:
            with pytest.raises(WriteUnverified, match="read back False") as caught:
                await opcua.write("start", True)
        assert caught.value.read_back is False
        assert [w.result for w in sim.writes][-1] == "Good"  # written once, never resent
    finally:
        sim.model.write("maintenance_lock", False)
        sim.model.write("start", True)


# ---------------------------------------------------------------------- security


@pytest.mark.parametrize("user", [None, "edge"])
@pytest.mark.parametrize(("policy", "mode"), [e for e in ALL_ENDPOINTS if e[0] != "None"])
async def test_security_matrix(
    secure_sim: OpcUaSimulator, agent_dir: Path, policy: str, mode: str, user: str | None
) -> None:
    extra: dict[str, Any] = {
        "security_policy": policy,
        "security_mode": mode,
        "server_certificate": str(secure_sim.certificate_path),
    }
    if user:
        extra |= {"username": user, "password": PASSWORD}
    tags = [
        {"name": "state", "node_id": "ns=2;s=Filler.State", "mode": "poll"},
        {"name": "total", "node_id": "ns=2;s=Filler.Counters.Total"},
    ]
    async with driver(device(secure_sim.url, tags, **extra), agent_dir) as opcua:
        assert opcua.security_label == f"{policy}/{mode}"
        (state,) = await opcua.read()
        assert (state.quality, state.value) == ("good", secure_sim.model.state)
        pushed = await Pushed(opcua.subscriptions()).wait("total")
        assert pushed.value == secure_sim.model.total_count


async def test_client_certificate_is_created_once_with_the_application_uri(
    secure_sim: OpcUaSimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = device(
        secure_sim.url,
        [{"name": "state", "node_id": "ns=2;s=Filler.State", "mode": "poll"}],
        security_policy="Basic256Sha256",
        security_mode="SignAndEncrypt",
        server_certificate=str(secure_sim.certificate_path),
    )
    cert_path, key_path = tmp_path / "pki" / "agent-cert.der", tmp_path / "pki" / "agent-key.pem"
    with caplog.at_level(logging.INFO, logger="edge_agent.opcua"):
        async with driver(config, tmp_path) as opcua:
            assert (await opcua.read())[0].quality == "good"
        created = [r.getMessage() for r in caplog.records if "certificate created" in r.message]
        der = cert_path.read_bytes()
        mtime = cert_path.stat().st_mtime_ns
        async with driver(config, tmp_path) as opcua:  # a second start reuses the pair
            assert (await opcua.read())[0].quality == "good"
    assert len(created) == 1
    assert f"created at {cert_path}, SHA-256 fingerprint {fingerprint(der)}" in created[0]
    assert cert_path.stat().st_mtime_ns == mtime
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [APP_URI]


async def test_the_pki_is_private_whatever_the_umask(
    secure_sim: OpcUaSimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The pki directory 0700 and the pair 0600 under umask 022; a pair found wider is
    tightened, logged once."""
    config = device(
        secure_sim.url,
        [{"name": "state", "node_id": "ns=2;s=Filler.State", "mode": "poll"}],
        security_policy="Basic256Sha256",
        security_mode="SignAndEncrypt",
        server_certificate=str(secure_sim.certificate_path),
    )
    data = tmp_path / "data"
    with umask(0o022):
        async with driver(config, data) as opcua:
            assert (await opcua.read())[0].quality == "good"
        assert set(modes_under(tmp_path)) == {
            "data/",
            "data/pki/",
            "data/pki/agent-cert.der",
            "data/pki/agent-key.pem",
        }
        assert wider_than_private(modes_under(tmp_path)) == {}

        for name in ("agent-cert.der", "agent-key.pem"):
            (data / "pki" / name).chmod(0o644)
        for _ in range(2):
            with caplog.at_level(logging.WARNING, logger="edge_agent.opcua"):
                async with driver(config, data) as opcua:
                    assert (await opcua.read())[0].quality == "good"
        assert wider_than_private(modes_under(tmp_path)) == {}
    tightened = [r.getMessage() for r in caplog.records if "tightened" in r.getMessage()]
    assert tightened == [
        f"{data / 'pki' / name} had mode 0644; tightened to 0600"
        for name in ("agent-key.pem", "agent-cert.der")
    ]


async def test_only_one_of_certificate_and_key_is_a_fault(
    secure_sim: OpcUaSimulator, tmp_path: Path
) -> None:
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "agent-key.pem").write_bytes(b"orphan")
    config = device(
        secure_sim.url,
        [{"name": "state", "node_id": "ns=2;s=Filler.State", "mode": "poll"}],
        security_policy="Basic256Sha256",
        security_mode="Sign",
        server_certificate=str(secure_sim.certificate_path),
    )
    with pytest.raises(DriverFault, match=r"agent-key\.pem exists but .*agent-cert\.der does not"):
        async with driver(config, tmp_path):
            pass
    assert (tmp_path / "pki" / "agent-key.pem").read_bytes() == b"orphan"  # never overwritten


async def test_wrong_server_certificate_is_refused(
    secure_sim: OpcUaSimulator, agent_dir: Path
) -> None:
    impostor = agent_dir / "impostor.der"  # any other certificate
    if not impostor.exists():
        create_client_certificate(impostor, agent_dir / "impostor.pem", "urn:impostor")
    config = device(
        secure_sim.url,
        [{"name": "state", "node_id": "ns=2;s=Filler.State", "mode": "poll"}],
        security_policy="Aes256_Sha256_RsaPss",
        security_mode="SignAndEncrypt",
        server_certificate=str(impostor),
    )
    opcua = driver(config, agent_dir)
    try:
        with pytest.raises(DriverFault) as caught:
            await opcua.connect()
    finally:
        await opcua.close()
    expected = fingerprint(impostor.read_bytes())
    assert str(caught.value) == (
        "server certificate does not match server_certificate "
        f"(expected SHA-256 {expected}, got {secure_sim.certificate_fingerprint})"
    )


@pytest.mark.parametrize("mode", ["None", "SignAndEncrypt"])
async def test_wrong_password_is_refused_clearly(
    secure_sim: OpcUaSimulator, agent_dir: Path, mode: str
) -> None:
    extra: dict[str, Any] = {"username": "edge", "password": "wrong"}
    if mode != "None":
        extra |= {
            "security_policy": "Basic256Sha256",
            "security_mode": mode,
            "server_certificate": str(secure_sim.certificate_path),
        }
    config = device(secure_sim.url, [{"name": "s", "node_id": "ns=2;s=Filler.State"}], **extra)
    opcua = driver(config, agent_dir)
    try:
        with pytest.raises(DriverFault) as caught:
            await opcua.connect()
    finally:
        await opcua.close()
    assert str(caught.value) == "server refused user 'edge': BadUserAccessDenied"


async def test_secure_simulator_accepts_only_sign_and_encrypt_with_a_user(
    tmp_path: Path, agent_dir: Path
) -> None:
    async with OpcUaSimulator(
        port=0, speed=0.0, bulk_count=0, secure=True, password="pw", pki_dir=tmp_path
    ) as secure:
        tags = [{"name": "s", "node_id": "ns=2;s=Filler.State", "mode": "poll"}]
        pinned = {"server_certificate": str(secure.certificate_path)}
        cases: list[tuple[dict[str, Any], str]] = [
            ({}, "offers no None/None endpoint"),
            (
                {"security_policy": "Basic256Sha256", "security_mode": "Sign", **pinned},
                "offers no Basic256Sha256/Sign endpoint",
            ),
            (
                {"security_policy": "Basic256Sha256", "security_mode": "SignAndEncrypt", **pinned},
                "server refused anonymous login",
            ),
        ]
        for extra, message in cases:
            opcua = driver(device(secure.url, tags, **extra), agent_dir)
            try:
                with pytest.raises(DriverFault, match=message):
                    await opcua.connect()
            finally:
                await opcua.close()
        good = device(
            secure.url,
            tags,
            security_policy="Basic256Sha256",
            security_mode="SignAndEncrypt",
            username="edge",
            password="pw",
            **pinned,
        )
        async with driver(good, agent_dir) as opcua:
            assert (await opcua.read())[0].quality == "good"


# ---------------------------------------------------------------------- faults


async def test_stalled_server_ends_the_subscription_in_bounded_time(sim: OpcUaSimulator) -> None:
    tags = [
        {"name": "state", "node_id": "ns=2;s=Filler.State"},
        {"name": "recipe", "node_id": "ns=2;s=Filler.Recipe", "mode": "poll"},
    ]
    opcua = driver(device(sim.url, tags))
    await opcua.connect()
    try:
        stream = Pushed(opcua.subscriptions())
        await stream.wait("state")
        sim.stall()
        started = time.monotonic()
        with pytest.raises(DriverUnavailable):
            await opcua.read()  # a Read under a deadline
        assert time.monotonic() - started < 2.0
        with pytest.raises(DriverUnavailable):
            await drain(stream.stream)
        assert time.monotonic() - started < 6.0  # keep-alive deadline: 3 x 1 s + 1 s
    finally:
        closing = time.monotonic()
        await opcua.close()  # CloseSession is never answered: close must not hang
        assert time.monotonic() - closing < 3.0


async def test_connect_to_a_stalled_server_times_out(sim: OpcUaSimulator) -> None:
    sim.stall()
    opcua = driver(device(sim.url, [{"name": "s", "node_id": "ns=2;s=Filler.State"}]))
    started = time.monotonic()
    try:
        with pytest.raises(DriverUnavailable):
            await opcua.connect()
    finally:
        await opcua.close()
    assert time.monotonic() - started < 6.0


async def test_connection_refused_is_unavailable() -> None:
    opcua = driver(device("opc.tcp://127.0.0.1:1", [{"name": "s", "node_id": "i=2258"}]))
    with pytest.raises(DriverUnavailable, match="cannot connect"):
        await opcua.connect()
    await opcua.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_twenty_restarts_leak_no_sockets_or_tasks(sim: OpcUaSimulator) -> None:
    tags = [
        {"name": "state", "node_id": "ns=2;s=Filler.State"},
        {"name": "recipe", "node_id": "ns=2;s=Filler.Recipe", "mode": "poll"},
    ]
    config = device(sim.url, tags)
    baseline: tuple[int, int] | None = None
    for cycle in range(21):
        opcua = driver(config)  # a fresh driver (and client) per connection, as the poller
        await opcua.connect()
        try:
            stream = Pushed(opcua.subscriptions())
            await stream.wait("state")
            assert (await opcua.read())[0].quality == "good"
            await sim.restart()
            started = time.monotonic()
            with pytest.raises(DriverUnavailable):
                await drain(stream.stream)
            assert time.monotonic() - started < 5.0
        finally:
            await opcua.close()
        if cycle == 0:
            # Measured after one full cycle, so that lazily created objects are included.
            await asyncio.sleep(0.2)
            baseline = (open_fds(), len(asyncio.all_tasks()))
    assert baseline is not None
    fds, tasks = baseline
    await async_wait_until(
        lambda: open_fds() <= fds and len(asyncio.all_tasks()) <= tasks,
        timeout=5,
        message=f"fds <= {fds} and tasks <= {tasks} "
        f"(now {open_fds()} fds, {len(asyncio.all_tasks())} tasks)",
    )


# ---------------------------------------------------------------------- conversions (no I/O)


async def test_json_values_of_opcua_types() -> None:
    stamp = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert json_value(stamp) == "2024-01-02T03:04:05.678Z"
    assert json_value(b"\x01\x02\xff") == "AQL/"
    assert json_value(ua.LocalizedText("Hallo", "de")) == "Hallo"
    assert json_value(ua.NodeId.from_string("ns=2;s=A.B")) == "ns=2;s=A.B"
    assert json_value(ua.Variant(5, ua.VariantType.Int32)) == 5
    assert json_value([[1, 2], [3, 4]]) == [[1, 2], [3, 4]]
    assert json_value(ua.MessageSecurityMode.Sign) == 2  # enumerations are integers
    with pytest.raises(NotFinite, match=r"not a finite number \(-inf\)"):
        json_value([1.0, float("-inf")])


async def test_status_names_ignore_info_bits() -> None:
    overflow = 0x480  # InfoType DataValue, Overflow
    assert status_name(StatusCodes.BadSensorFailure | overflow) == "BadSensorFailure"
    assert status_name(StatusCodes.Good | overflow) == "Good"
    assert status_name(StatusCodes.UncertainLastUsableValue) == "UncertainLastUsableValue"
    assert status_name(0x80FF0000) == "0x80FF0000"


def stamp(moment: datetime) -> ua.DateTime:
    return cast(ua.DateTime, moment)


async def test_event_time_falls_back_to_server_time_then_receipt() -> None:
    source = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)
    server = datetime(2025, 5, 1, 12, 0, 1, tzinfo=UTC)
    both = ua.DataValue(
        ua.Variant(1.0), SourceTimestamp=stamp(source), ServerTimestamp=stamp(server)
    )
    only_server = ua.DataValue(ua.Variant(1.0), ServerTimestamp=stamp(server))
    no_clock = ua.DataValue(
        ua.Variant(1.0), SourceTimestamp=stamp(datetime(1601, 1, 1, tzinfo=UTC))
    )
    assert make_reading("t", both, 5.0).ts == source.timestamp()
    assert make_reading("t", only_server, 5.0).ts == server.timestamp()
    assert make_reading("t", no_clock, 5.0).ts == 5.0


@pytest.mark.parametrize(
    ("value", "vtype", "array", "expected"),
    [
        (True, ua.VariantType.Boolean, False, True),
        (1, ua.VariantType.Boolean, False, True),
        (42.0, ua.VariantType.UInt16, False, 42),
        ("-7", ua.VariantType.Int32, False, -7),
        (2**64 - 1, ua.VariantType.UInt64, False, 2**64 - 1),
        (3, ua.VariantType.Double, False, 3.0),
        (0.1, ua.VariantType.Float, False, 0.1),  # the float32 0.10000000149011612, short
        ("2024-01-02T03:04:05.678Z", ua.VariantType.DateTime, False, "2024-01-02T03:04:05.678Z"),
        ("AQL/", ua.VariantType.ByteString, False, "AQL/"),
        ([1, 2], ua.VariantType.Int16, True, [1, 2]),
        ([1, 2], ua.VariantType.Int16, None, [1, 2]),  # ValueRank Any: the value decides
    ],
)
async def test_writes_convert_json_to_the_node_type(
    value: Any, vtype: ua.VariantType, array: bool | None, expected: Any
) -> None:
    variant, read_back = to_variant(value, vtype, array)
    assert variant.VariantType == vtype
    assert read_back == expected


@pytest.mark.parametrize(
    ("value", "vtype", "array", "reason"),
    [
        (True, ua.VariantType.Int32, False, "expected an integer"),
        (1.5, ua.VariantType.Int32, False, "expected an integer"),
        (-1, ua.VariantType.UInt32, False, "out of range for UInt32"),
        (1e39, ua.VariantType.Float, False, "does not fit a Float"),
        (math.nan, ua.VariantType.Double, False, "cannot write nan"),
        ("1", ua.VariantType.Double, False, "expected a number"),
        (5, ua.VariantType.String, False, "expected a string"),
        ([1], ua.VariantType.Int32, False, "got a list"),
        (1, ua.VariantType.Int32, True, "expected a list"),
        (None, ua.VariantType.Int32, False, "cannot write null"),
        ("x", ua.VariantType.Guid, False, "not supported"),
    ],
)
async def test_unconvertible_writes_say_why(
    value: Any, vtype: ua.VariantType, array: bool, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        to_variant(value, vtype, array)
