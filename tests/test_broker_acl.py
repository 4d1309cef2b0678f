"""The broker ACL of docs/install.md ("Broker ACL"), read from the docs verbatim, in a real
mosquitto with the agent (in-process, on the Modbus simulator), `edge-agent ingest` and
PostgreSQL: one gateway cannot publish another's batches or acks, only the MES user's commands
reach the agent, and the authorised paths (the agent's batches, another gateway's own batches,
the MES's command) still work.

The negative checks need a barrier, not a sleep. The ingest runs one worker (`pool_size = 1`)
over one subscription, and the agent handles commands and acks in the order it receives them;
mosquitto routes a QoS 1 message before it sends the PUBACK, and keeps one subscriber's
messages in order. So once a message published after a forgery has been handled, the forgery
would have been handled too, had the broker let it through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from agent.daemon.runtime import Runtime
from simulators.modbus.server import ModbusSimulator
from sync.events import dumps, rfc3339
from sync.uplink.forwarder import Forwarder
from tests.fixtures import (
    ChildProcess,
    MosquittoBroker,
    MqttConnectError,
    MqttTestClient,
    async_wait_until,
    free_port,
    wait_until,
)
from tests.fixtures.pool import MosquittoFactory
from tests.fixtures.workflows import running, settings_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
INSTALL_DOC = REPO / "docs" / "install.md"
CENTRAL_DOC = REPO / "docs" / "central.md"
ACL_FIRST_LINE = (
    "# /etc/mosquitto/edge-agent.acl: mosquitto acl_file for edge-agent (docs/install.md)"
)

# The users of the documented ACL.
GATEWAY = "plant1-line3"
OTHER_GATEWAY = "plant1-line4"
INGEST = "ingest.plant1"
MES = "mes.plant1"
DASHBOARD = "dashboard.plant1"
ROOT = "plant1/assembly/line3"  # GATEWAY's topic root
AGENT_CLIENT_ID = f"edge-agent-{GATEWAY}"
INGEST_CLIENT_ID = "ingest-acl-test"
PRODUCT_ADDRESS = 200  # hr:200, press1/product_code


def fenced_blocks(text: str) -> list[str]:
    """The contents of every ``` block of a Markdown text."""
    return [match.group(1) for match in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)]


def documented_acl() -> str:
    """The ACL file of docs/install.md, verbatim."""
    blocks = [b for b in fenced_blocks(INSTALL_DOC.read_text()) if b.startswith(ACL_FIRST_LINE)]
    assert len(blocks) == 1, f"docs/install.md must show the ACL once, starting {ACL_FIRST_LINE!r}"
    return blocks[0]


def acl_users(acl: str) -> list[str]:
    """The user names an ACL file grants anything to."""
    return [line.split()[1] for line in acl.splitlines() if line.startswith("user ")]


def password(user: str) -> str:
    """The test password of a user."""
    return f"pw-{user}"


def peer(broker: MosquittoBroker, user: str) -> MqttTestClient:
    """An MQTT 3.1.1 client with a user's credentials, for ``with`` (which connects); on 3.1.1
    mosquitto PUBACKs a denied PUBLISH like any other."""
    return MqttTestClient.for_broker(broker, username=user, password=password(user))


def publish_anonymously(broker: MosquittoBroker, messages: list[tuple[str, bytes]]) -> bool:
    """Publish as a client without a user name; False if the broker refused the CONNECT."""
    client = MqttTestClient.for_broker(broker)
    try:
        client.connect()
    except MqttConnectError:
        return False
    try:
        for topic, payload in messages:
            client.publish(topic, payload)
    finally:
        client.close()
    return True


def final_reply_and_before(client: MqttTestClient, command_id: str) -> list[dict[str, Any]]:
    """Every reply received up to the final one of `command_id` (deadline 30 s)."""
    replies: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while True:
        message = client.wait_for_message(timeout=max(0.0, deadline - time.monotonic()))
        reply = json.loads(message.payload)
        replies.append(reply)
        if reply["id"] == command_id and reply["status"] != "accepted":
            return replies


def sync_batch(gateway: str, stream: str, count: int) -> bytes:
    """A valid S/sync batch of `count` samples, seqs 1..count: what the ingest would store."""
    now = time.time()
    return dumps(
        {
            "gateway": gateway,
            "stream": stream,
            "first_seq": 1,
            "last_seq": count,
            "events": [
                {
                    "seq": seq,
                    "ts": rfc3339(now + seq / 1000),
                    "kind": "sample",
                    "device": "press1",
                    "tag": "temperature",
                    "value": 20 + seq,
                    "quality": "good",
                }
                for seq in range(1, count + 1)
            ],
        }
    )


def agent_config(
    broker: MosquittoBroker, data_dir: Path, press_port: int, user: str, password_file: Path
) -> str:
    """GATEWAY on the simulated press, with a broker user and one workflow writing the PLC."""
    return f"""
[gateway]
id = "{GATEWAY}"
site = "plant1"
area = "assembly"
line = "line3"
data_dir = "{data_dir}"

[mqtt]
url = "{broker.url}"
username = "{user}"
password_file = "{password_file}"
ack_timeout = "2s"

[http]
enabled = false

[[devices]]
name = "press1"
driver = "modbus"
url = "tcp://127.0.0.1:{press_port}"
poll_interval = "100ms"
timeout = "500ms"
read_retries = 0

  [[devices.tags]]
  name = "state_code"
  address = "hr:100"
  [[devices.tags]]
  name = "product_code"
  address = "hr:{PRODUCT_ADDRESS}"
  writable = true

[[workflows]]
name = "set_product"
params = {{ product = "int:1..9999" }}
steps = [
  {{ write = "press1/product_code", value = "{{product}}" }},
  {{ confirm = "central", timeout = "20s" }},
]
"""


def ingest_config(
    path: Path, broker: MosquittoBroker, dsn: str, password_file: Path, http_port: int
) -> Path:
    """The ingest's config: its broker user, a shared subscription, one database worker."""
    path.write_text(
        f"""
[mqtt]
url = "{broker.url}"
username = "{INGEST}"
password_file = "{password_file}"
client_id = "{INGEST_CLIENT_ID}"
shared_group = "ingest"

[postgres]
dsn = "{dsn}"
pool_size = 1

[http]
listen = "127.0.0.1:{http_port}"
"""
    )
    return path


def ingest_ready(port: int) -> bool:
    """Whether the ingest answers /readyz with 200 (database and broker up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Plant:
    """The agent, the ingest and their database, on a broker with the documented ACL."""

    broker: MosquittoBroker
    runtime: Runtime
    press: ModbusSimulator
    db: asyncpg.Connection

    async def stored_seqs(self, gateway: str, stream: str) -> list[int]:
        """The seqs PostgreSQL holds for a stream."""
        rows = await self.db.fetch(
            "SELECT seq FROM edge_events WHERE gateway_id = $1 AND stream_id = $2 ORDER BY seq",
            gateway,
            uuid.UUID(stream),
        )
        return [row["seq"] for row in rows]

    async def central_watermark(self, gateway: str, stream: str) -> int | None:
        """The acked_seq of a stream in edge_streams (None: never committed, never acked)."""
        value = await self.db.fetchval(
            "SELECT acked_seq FROM edge_streams WHERE gateway_id = $1 AND stream_id = $2",
            gateway,
            uuid.UUID(stream),
        )
        return None if value is None else int(value)

    async def audited_command_ids(self) -> set[str]:
        """Every command id in the workflow audit events PostgreSQL received."""
        rows = await self.db.fetch(
            "SELECT value->>'command_id' AS id FROM edge_events WHERE kind = 'workflow'"
        )
        return {row["id"] for row in rows}

    def health(self) -> dict[str, Any]:
        """The agent's health document."""
        health = self.runtime.health()
        assert health is not None
        return dict(health)

    def product_writes(self) -> list[int]:
        """Every value written to press1/product_code."""
        return [
            value
            for record in self.press.writes
            if record.address == PRODUCT_ADDRESS and record.result == "ok"
            for value in record.values
        ]


@pytest.fixture
def acl_broker(mosquitto_factory: MosquittoFactory) -> MosquittoBroker:
    """A started broker with the documented ACL, every user in it, no anonymous access."""
    acl = documented_acl()
    return mosquitto_factory(
        users={user: password(user) for user in acl_users(acl)},
        allow_anonymous=False,
        acl=acl,
        # "Denied PUBLISH" is a debug line: the test checks the agent and ingest never get one.
        log_types=("error", "warning", "notice", "information", "debug"),
    )


@contextlib.asynccontextmanager
async def plant(
    broker: MosquittoBroker,
    dsn: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    agent_user: str = GATEWAY,
) -> AsyncIterator[Plant]:
    """Start the ingest (waits until ready), then the agent as `agent_user` (waits until its
    press is up)."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for user in (agent_user, INGEST):
        (secrets / user).write_text(password(user) + "\n")
    http_port = free_port()
    config = ingest_config(tmp_path / "central.toml", broker, dsn, secrets / INGEST, http_port)
    ingest = ChildProcess(
        "ingest",
        [sys.executable, "-m", "agent.cli", "ingest", "-c", str(config)],
        tmp_path / "ingest.log",
    )
    request.addfinalizer(ingest.ensure_dead)
    ingest.start()
    await asyncio.to_thread(
        wait_until, lambda: ingest_ready(http_port), timeout=60, message="ingest /readyz 200"
    )
    db = await asyncpg.connect(dsn)
    try:
        async with ModbusSimulator(port=0, seed=5, speed=0.0) as press:
            assert press.port is not None
            text = agent_config(
                broker, tmp_path / "data", press.port, agent_user, secrets / agent_user
            )
            async with running(settings_for(tmp_path, text)) as runtime:
                await async_wait_until(
                    lambda: runtime.device_states() == {"press1": "up"}, message="press1 up"
                )
                yield Plant(broker, runtime, press, db)
    finally:
        await db.close()
    assert ingest.stop() == 0


def denied_publishes(broker: MosquittoBroker, client_id: str) -> list[str]:
    """The broker's `Denied PUBLISH` lines for one client id."""
    return [
        line
        for line in broker.log_text().splitlines()
        if f"Denied PUBLISH from {client_id} " in line
    ]


def assert_agent_and_ingest_never_denied(broker: MosquittoBroker) -> None:
    """Every publish of the agent and of the ingest passed the ACL (nothing lost silently)."""
    assert denied_publishes(broker, AGENT_CLIENT_ID) == []
    assert denied_publishes(broker, INGEST_CLIENT_ID) == []


def test_the_docs_show_one_acl_and_the_ingest_part_of_it() -> None:
    acl = documented_acl()
    assert acl_users(acl) == [GATEWAY, OTHER_GATEWAY, INGEST, MES, DASHBOARD]
    # Nothing before the first "user" line but comments and patterns: anonymous gets nothing.
    head = acl.split("\nuser ", 1)[0].splitlines()
    assert all(not line or line.startswith(("#", "pattern ")) for line in head), head
    config = [b for b in fenced_blocks(INSTALL_DOC.read_text()) if b.startswith("allow_anonymous")]
    assert config == [
        "allow_anonymous false\npassword_file /etc/mosquitto/passwd\n"
        "acl_file /etc/mosquitto/edge-agent.acl\n"
    ]
    central = [b for b in fenced_blocks(CENTRAL_DOC.read_text()) if b.startswith("user ")]
    assert len(central) == 1
    assert central[0] in acl  # docs/central.md quotes the ingest's block, verbatim


# (user, "write" or "read", topic, allowed, subscription filter for a read if not the topic):
# every line of the table in docs/install.md, "Broker ACL", and what each user must not do.
RULES: list[tuple[str, str, str, bool, str | None]] = [
    (GATEWAY, "write", f"edge/{GATEWAY}/sync", True, None),
    (GATEWAY, "write", f"edge/{OTHER_GATEWAY}/sync", False, None),
    (GATEWAY, "write", f"edge/{GATEWAY}/ack", False, None),
    (GATEWAY, "read", f"edge/{GATEWAY}/ack", True, None),
    (GATEWAY, "read", f"edge/{OTHER_GATEWAY}/ack", False, "edge/+/ack"),
    (GATEWAY, "read", "edge/_central/status/ingest-1", True, "edge/_central/status/+"),
    (GATEWAY, "write", "edge/_central/status/ingest-1", False, None),
    (GATEWAY, "write", f"{ROOT}/press1/temperature", True, None),
    (GATEWAY, "write", "plant1/assembly/line4/press1/temperature", False, None),
    (GATEWAY, "write", f"{ROOT}/_cmd/set_product/reply", True, None),
    (GATEWAY, "read", f"{ROOT}/_cmd/set_product", True, f"{ROOT}/_cmd/+"),
    (GATEWAY, "read", "plant1/assembly/line4/_cmd/set_product", False, None),
    (GATEWAY, "read", f"{ROOT}/press1/temperature", False, None),
    (INGEST, "read", f"edge/{OTHER_GATEWAY}/sync", True, "edge/+/sync"),
    (INGEST, "read", f"edge/{GATEWAY}/sync", True, "$share/ingest/edge/+/sync"),
    (INGEST, "write", f"edge/{OTHER_GATEWAY}/ack", True, None),
    (INGEST, "write", "edge/_central/status/ingest-1", True, None),
    (INGEST, "write", f"edge/{GATEWAY}/sync", False, None),
    (INGEST, "read", f"edge/{GATEWAY}/ack", False, None),
    (INGEST, "write", f"{ROOT}/_cmd/set_product", False, None),
    (MES, "write", f"{ROOT}/_cmd/set_product", True, None),
    (MES, "write", "plant1/assembly/line4/_cmd/set_product", True, None),
    (MES, "read", f"{ROOT}/_cmd/set_product/reply", True, "plant1/+/+/_cmd/+/reply"),
    (MES, "write", f"{ROOT}/_cmd/set_product/reply", False, None),
    (MES, "write", f"{ROOT}/press1/temperature", False, None),
    (MES, "write", f"edge/{GATEWAY}/sync", False, None),
    (MES, "write", f"edge/{GATEWAY}/ack", False, None),
    (DASHBOARD, "read", f"{ROOT}/press1/temperature", True, "plant1/#"),
    (DASHBOARD, "read", f"{ROOT}/_cmd/set_product", True, None),
    (DASHBOARD, "write", f"{ROOT}/_cmd/set_product", False, None),
    (DASHBOARD, "write", f"{ROOT}/press1/temperature", False, None),
    (DASHBOARD, "write", f"edge/{GATEWAY}/sync", False, None),
    (DASHBOARD, "write", f"edge/{GATEWAY}/ack", False, None),
    (DASHBOARD, "read", f"edge/{GATEWAY}/sync", False, "$share/ingest/edge/+/sync"),
    (DASHBOARD, "write", f"edge/{DASHBOARD}/sync", True, None),  # the ingest refuses it
]
SPY = "spy.test"  # appended to the ACL for this test only: reads and writes everything
# A topic each user may read, published after a probe: once it arrives, so would the probe.
BARRIER_FOR = {
    GATEWAY: "edge/_central/status/barrier",
    INGEST: f"edge/{OTHER_GATEWAY}/sync",
    MES: f"{ROOT}/_cmd/barrier/reply",
    DASHBOARD: f"{ROOT}/barrier",
}


def received_until(client: MqttTestClient, barrier: bytes) -> list[tuple[str, bytes]]:
    """(topic, payload) of every message before the one carrying `barrier`."""
    seen: list[tuple[str, bytes]] = []
    while (message := client.wait_for_message(timeout=10)).payload != barrier:
        seen.append((message.topic, bytes(message.payload)))
    return seen


def test_each_rule_of_the_documented_acl(mosquitto_factory: MosquittoFactory) -> None:
    acl = documented_acl() + f"\nuser {SPY}\ntopic readwrite #\n"
    broker = mosquitto_factory(
        users={user: password(user) for user in acl_users(acl)}, allow_anonymous=False, acl=acl
    )
    wrong = []
    with peer(broker, SPY) as spy:
        spy.subscribe("#")
        for n, (user, verb, topic, allowed, subscription) in enumerate(RULES):
            probe, barrier = f"probe-{n}".encode(), f"barrier-{n}".encode()
            # A new client each time: no subscription of an earlier rule delivers the probe.
            with peer(broker, user) as client:
                if verb == "write":
                    client.publish(topic, probe)
                    spy.publish("spy/barrier", barrier)
                    seen = received_until(spy, barrier)
                else:
                    client.subscribe(subscription or topic)
                    client.subscribe(BARRIER_FOR[user])
                    spy.publish(topic, probe)
                    spy.publish(BARRIER_FOR[user], barrier)
                    seen = received_until(client, barrier)
                    received_until(spy, barrier)  # the spy's own copies
            if ((topic, probe) in seen) != allowed:
                wrong.append(f"{user} {verb} {topic}: {'denied' if allowed else 'allowed'}")
    assert wrong == []


async def test_a_gateway_cannot_forge_another_gateways_batches_or_acks(
    acl_broker: MosquittoBroker,
    postgres_database: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with plant(acl_broker, postgres_database, tmp_path, request) as line:
        agent_stream = line.health()["stream"]
        # The authorised path: the agent's batches are stored and acked.
        await async_wait_until(
            lambda: line.health()["acked_seq"] >= 1, timeout=30, message="the agent's first ack"
        )

        # Each forger: a valid batch as GATEWAY's (its own stream), an ack for the agent's
        # stream far beyond anything sent, and an ack for a stream the agent never had.
        forgers = ("other gateway", "dashboard", "anonymous")
        streams = {who: str(uuid.uuid4()) for who in forgers}
        beyond = {who: 2**62 + n for n, who in enumerate(forgers)}
        foreign = {who: str(uuid.uuid4()) for who in forgers}

        def forgeries(who: str) -> list[tuple[str, bytes]]:
            return [
                (f"edge/{GATEWAY}/sync", sync_batch(GATEWAY, streams[who], 5)),
                (f"edge/{GATEWAY}/ack", dumps({"stream": agent_stream, "acked_seq": beyond[who]})),
                (f"edge/{GATEWAY}/ack", dumps({"stream": foreign[who], "acked_seq": 7})),
            ]

        other_stream, dashboard_stream = str(uuid.uuid4()), str(uuid.uuid4())
        with peer(acl_broker, OTHER_GATEWAY) as other, peer(acl_broker, DASHBOARD) as dashboard:
            for who, client in (("other gateway", other), ("dashboard", dashboard)):
                for topic, payload in forgeries(who):
                    client.publish(topic, payload)
            anonymous_connected = publish_anonymously(acl_broker, forgeries("anonymous"))
            # What the %u patterns give a user that is not a gateway: a topic the ingest
            # refuses (not a gateway id), so this one is stopped by the ingest, not the ACL.
            dashboard.publish(f"edge/{DASHBOARD}/sync", sync_batch(DASHBOARD, dashboard_stream, 2))
            # Another gateway's own batch: allowed, and queued after the forgeries.
            other.publish(f"edge/{OTHER_GATEWAY}/sync", sync_batch(OTHER_GATEWAY, other_stream, 3))

        async def other_gateway_stored() -> bool:
            return await line.stored_seqs(OTHER_GATEWAY, other_stream) == [1, 2, 3]

        await async_wait_until(other_gateway_stored, timeout=30, message="plant1-line4's batch")
        assert await line.central_watermark(OTHER_GATEWAY, other_stream) == 3
        assert not anonymous_connected
        # The ingest had the forged batches before plant1-line4's, had they come through.
        for who in forgers:
            assert await line.stored_seqs(GATEWAY, streams[who]) == [], f"{who}'s batch stored"
            assert await line.central_watermark(GATEWAY, streams[who]) is None, f"{who}'s acked"
        assert await line.stored_seqs(DASHBOARD, dashboard_stream) == []

        # An event committed now is sent, stored and acked after the forged acks went by: once
        # the agent has that ack, it would have had theirs.
        committed = line.health()["committed_seq"]
        line.press.model(1).write("product_code", 1234)  # a new sample
        await async_wait_until(
            lambda: line.health()["committed_seq"] > committed, message="a new event"
        )
        committed = line.health()["committed_seq"]
        await async_wait_until(
            lambda: line.health()["acked_seq"] >= committed, timeout=30, message="its ack"
        )
        assert (await line.central_watermark(GATEWAY, agent_stream) or 0) >= committed
        log = [record.getMessage() for record in caplog.records]
        for who in forgers:
            heard = [m for m in log if str(beyond[who]) in m or foreign[who] in m]
            assert heard == [], f"{who}'s forged ack reached the agent"
    assert_agent_and_ingest_never_denied(acl_broker)


async def test_only_the_mes_user_can_run_a_workflow(
    acl_broker: MosquittoBroker,
    postgres_database: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    topic = f"{ROOT}/_cmd/set_product"
    unauthorised = {"evil-anonymous": 6661, "evil-dashboard": 6662, "evil-other-gateway": 6663}

    def command(command_id: str) -> bytes:
        product = unauthorised.get(command_id, 4242)
        return dumps({"id": command_id, "params": {"product": product}})

    async with plant(acl_broker, postgres_database, tmp_path, request) as line:
        with peer(acl_broker, MES) as mes:
            mes.subscribe(f"{ROOT}/_cmd/+/reply")
            anonymous_connected = publish_anonymously(
                acl_broker, [(topic, command("evil-anonymous"))]
            )
            with peer(acl_broker, DASHBOARD) as dashboard:
                dashboard.publish(topic, command("evil-dashboard"))
            with peer(acl_broker, OTHER_GATEWAY) as other:
                other.publish(topic, command("evil-other-gateway"))
            # The authorised command, after the others in the agent's command queue: every
            # command that reached the agent before it is answered before it.
            mes.publish(topic, command("mes-1"))
            replies = await asyncio.to_thread(final_reply_and_before, mes, "mes-1")

        assert not anonymous_connected
        assert [r["id"] for r in replies if r["id"] != "mes-1"] == [], "a command reached the agent"
        assert replies[-1]["status"] == "completed", replies
        engine = line.runtime.gateway.workflows if line.runtime.gateway else None
        assert engine is not None
        assert engine.saga_log is not None
        for command_id in unauthorised:
            assert await engine.saga_log.find("set_product", command_id) is None, command_id
        assert line.product_writes() == [4242]  # no PLC write for anybody else

        # Even a rejected command leaves an audit event: once mes-1's last one is in
        # PostgreSQL, any earlier command's would be too.
        async def mes_finished_in_central() -> bool:
            count = await line.db.fetchval(
                "SELECT count(*) FROM edge_events WHERE kind = 'workflow'"
                " AND value->>'command_id' = 'mes-1' AND value->>'step' = 'finished'"
            )
            return bool(count == 1)

        await async_wait_until(mes_finished_in_central, timeout=30, message="mes-1's audit trail")
        assert await line.audited_command_ids() == {"mes-1"}
    assert_agent_and_ingest_never_denied(acl_broker)


async def test_a_gateway_the_acl_refuses_says_so_and_does_not_spin(
    acl_broker: MosquittoBroker,
    postgres_database: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Gateway plant1-line3 logged in as plant1-line4: the ACL refuses its S/sync, with a
    # PUBACK "Not authorized" (MQTT 5). That is no size problem, and resending at once spins.
    caplog.set_level(logging.INFO)
    async with plant(
        acl_broker, postgres_database, tmp_path, request, agent_user=OTHER_GATEWAY
    ) as line:
        assert line.runtime.gateway is not None
        (forwarder,) = (s for s in line.runtime.gateway.sinks if isinstance(s, Forwarder))

        def said(text: str) -> list[str]:
            return [r.getMessage() for r in caplog.records if text in r.getMessage()]

        # Either the batch goes again after ack_timeout (2 s), or it was resent at once.
        await async_wait_until(
            lambda: bool(said("(no ack for 2s)") or said("(broker rejected a batch)")),
            timeout=30,
            message="S/sync sent again",
        )
        assert said("(broker rejected a batch)") == [], "resent at once: a refusal loop"
        assert said("S/sync batches cut") == []  # not taken for a size limit
        assert forwarder.batch_bytes == 256 * 1024
        refusals = said("refused S/sync")
        assert refusals == [
            f"forwarder: the broker refused S/sync on edge/{GATEWAY}/sync: Not authorized; its "
            "ACL must let this gateway's MQTT user write that topic (the user name is the "
            'gateway id, docs/install.md, "Broker ACL"); sending again every 2s'
        ]
        assert line.health()["acked_seq"] == 0  # nothing deleted, nothing lost
        # The refusal is counted per reason on /metrics too.
        assert re.search(
            r'^edge_agent_mqtt_publish_refused_total\{reason="Not authorized"\} [1-9]',
            line.runtime.metrics.render().decode(),
            re.MULTILINE,
        )
