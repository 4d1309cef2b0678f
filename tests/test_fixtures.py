"""Tests proving the private-peer fixtures: real mosquitto and PostgreSQL on free ports."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.mqtt_client import MqttConnectError, MqttTestClient
from tests.fixtures.pool import MosquittoFactory, PeerPool, PostgresFactory
from tests.fixtures.ports import (
    async_wait_until,
    free_port,
    port_accepts,
    tcp_states,
    wait_for_port,
    wait_for_port_closed,
    wait_until,
)
from tests.fixtures.postgres import PostgresServer
from tests.fixtures.procs import iter_procs, live_children, live_pids_with_cwd, pid_is_live

# --------------------------------------------------------------------------- mosquitto


def test_broker_delivers_a_message(mosquitto: MosquittoBroker) -> None:
    assert mosquitto.is_running
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert mosquitto.port not in (1883, 8883)
    with MqttTestClient.for_broker(mosquitto) as sub, MqttTestClient.for_broker(mosquitto) as pub:
        sub.subscribe("line/1/#")
        pub.publish("line/1/counter", b"42", qos=1)
        msg = sub.wait_for_message()
    assert (msg.topic, msg.payload) == ("line/1/counter", b"42")
    assert "New client connected" in mosquitto.log_text()


def test_kill_then_clients_cannot_connect_then_restart_on_same_port(
    mosquitto: MosquittoBroker,
) -> None:
    port = mosquitto.port
    client = MqttTestClient.for_broker(mosquitto)
    client.connect()
    try:
        mosquitto.kill()
        assert not mosquitto.is_running
        assert client.disconnected.wait(5), "connected client did not notice the crash"
        assert not port_accepts("127.0.0.1", port)
        with pytest.raises(ConnectionRefusedError):
            MqttTestClient.for_broker(mosquitto).connect(timeout=2)
    finally:
        client.close()

    mosquitto.restart()
    assert mosquitto.is_running
    assert mosquitto.port == port
    with MqttTestClient.for_broker(mosquitto) as sub, MqttTestClient.for_broker(mosquitto) as pub:
        sub.subscribe("after/restart")
        pub.publish("after/restart", b"again")
        assert sub.wait_for_message().payload == b"again"


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_restart_while_port_is_in_time_wait(mosquitto: MosquittoBroker, how: str) -> None:
    """The broker closes its side first, so the port sits in TIME_WAIT; SO_REUSEADDR copes."""
    client = MqttTestClient.for_broker(mosquitto)
    client.connect()
    getattr(mosquitto, how)()
    wait_until(lambda: "TIME_WAIT" in tcp_states(mosquitto.port), timeout=5, message="TIME_WAIT")
    client.close()
    # Without SO_REUSEADDR the port cannot be bound now...
    with socket.socket() as plain, pytest.raises(OSError, match="Address already in use"):
        plain.bind(("127.0.0.1", mosquitto.port))
    # ...but mosquitto sets it, so a restart on the same port works at once.
    mosquitto.start()
    assert mosquitto.mqtt_handshake()
    assert "LISTEN" in tcp_states(mosquitto.port)


def test_two_brokers_at_once_are_isolated(mosquitto_factory: MosquittoFactory) -> None:
    first, second = mosquitto_factory(), mosquitto_factory()
    assert first.port != second.port
    assert first.workdir != second.workdir
    with (
        MqttTestClient.for_broker(first) as sub_first,
        MqttTestClient.for_broker(second) as sub_second,
        MqttTestClient.for_broker(first) as pub_first,
    ):
        sub_first.subscribe("t")
        sub_second.subscribe("t")
        pub_first.publish("t", b"only-first")
        assert sub_first.wait_for_message().payload == b"only-first"
        with pytest.raises(TimeoutError):
            sub_second.wait_for_message(timeout=0.3)
    first.kill()
    assert second.mqtt_handshake(), "killing one broker must not affect the other"


def test_password_file_and_extra_config(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory(users={"edge": "s3cret"}, extra_config=["max_packet_size 1024"])
    assert "max_packet_size 1024" in broker.config_path.read_text()
    with MqttTestClient.for_broker(broker, username="edge", password="s3cret") as client:
        client.subscribe("big")
        client.publish("big", b"x" * 100)
        assert client.wait_for_message().payload == b"x" * 100
        # An oversized packet makes the broker drop the connection.
        client.client.publish("big", b"x" * 4096, qos=0)
        assert client.disconnected.wait(5)
    with pytest.raises(MqttConnectError) as refused:
        MqttTestClient.for_broker(broker, username="edge", password="wrong").connect()
    assert refused.value.reason.is_failure
    with pytest.raises(MqttConnectError):
        MqttTestClient.for_broker(broker).connect()  # anonymous is off when users are given


def test_tls_listener(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory(tls=True)
    assert broker.tls_port is not None
    assert broker.tls_port != broker.port
    assert broker.tls_url == f"mqtts://127.0.0.1:{broker.tls_port}"
    with (
        MqttTestClient.for_broker(broker, tls=True) as tls_client,
        MqttTestClient.for_broker(broker) as plain_client,
    ):
        tls_client.subscribe("secure")
        plain_client.publish("secure", b"over-tls")
        assert tls_client.wait_for_message().payload == b"over-tls"


def test_pause_freezes_the_broker(mosquitto: MosquittoBroker) -> None:
    mosquitto.pause()
    try:
        assert port_accepts("127.0.0.1", mosquitto.port)  # the kernel still accepts TCP
        assert not mosquitto.mqtt_handshake(timeout=0.3)  # but nobody answers CONNECT
    finally:
        mosquitto.resume()
    assert mosquitto.mqtt_handshake()


def test_broker_start_failure_shows_log(mosquitto_factory: MosquittoFactory) -> None:
    with pytest.raises(RuntimeError, match="no_such_option"):
        mosquitto_factory(extra_config=["no_such_option true"])


def test_broker_picks_another_port_if_its_free_port_was_taken(
    mosquitto_factory: MosquittoFactory,
) -> None:
    broker = mosquitto_factory(start=False)
    taken = broker.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        broker.start()
        assert broker.port != taken
        assert broker.mqtt_handshake()


def test_broker_pinned_port_in_use_fails_with_log(mosquitto_factory: MosquittoFactory) -> None:
    port = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(RuntimeError, match="Address already in use"):
            mosquitto_factory(port=port, start_timeout=0.5)


async def test_wait_helpers_have_deadlines(mosquitto: MosquittoBroker) -> None:
    wait_for_port(mosquitto.host, mosquitto.port, deadline_s=2)
    with pytest.raises(TimeoutError, match="never"):
        wait_until(lambda: False, timeout=0.05, message="never")
    polls: list[int] = []

    async def third_time_lucky() -> bool:
        polls.append(1)
        return len(polls) >= 3

    await async_wait_until(third_time_lucky, timeout=2, interval=0.001)
    with pytest.raises(TimeoutError):
        await async_wait_until(lambda: False, timeout=0.05)
    mosquitto.kill()
    wait_for_port_closed(mosquitto.host, mosquitto.port, deadline_s=2)
    with pytest.raises(TimeoutError):
        wait_for_port(mosquitto.host, mosquitto.port, deadline_s=0.1)


def test_system_ports_are_refused() -> None:
    with pytest.raises(ValueError, match="1883"):
        MosquittoBroker(port=1883)
    with pytest.raises(ValueError, match="5432"):
        PostgresServer(port=5432)


# --------------------------------------------------------------------------- postgres


def _process_uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


async def test_postgres_database_accepts_queries(
    postgres_database: str, postgres_session: PostgresServer
) -> None:
    conn = await asyncpg.connect(postgres_database)
    try:
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        await conn.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
        assert await conn.fetchval("SELECT count(*) FROM t") == 2
        assert await conn.fetchval("SHOW fsync") == "on"
        assert await conn.fetchval("SHOW port") == str(postgres_session.port)
    finally:
        await conn.close()
    assert (
        postgres_session.dsn == f"postgresql://postgres@127.0.0.1:{postgres_session.port}/postgres"
    )
    assert postgres_session.port != 5432
    assert postgres_session.workdir.parent == Path("/tmp")
    if os.geteuid() == 0:  # postgres refuses root: it must run as an unprivileged account
        assert postgres_session.pid is not None
        assert _process_uid(postgres_session.pid) != 0
        assert postgres_session.run_as is not None


async def test_create_database_with_odd_name(postgres_session: PostgresServer) -> None:
    dsn = postgres_session.create_database('edge "agent" db')
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT current_database()") == 'edge "agent" db'
    finally:
        await conn.close()


async def test_postgres_kill_then_restart_keeps_committed_data(postgres: PostgresServer) -> None:
    port = postgres.port
    conn = await asyncpg.connect(postgres.dsn)
    await conn.execute("CREATE TABLE readings (id int PRIMARY KEY, v text)")
    await conn.executemany(
        "INSERT INTO readings VALUES ($1, $2)", [(i, f"v{i}") for i in range(50)]
    )
    in_flight = await asyncpg.connect(postgres.dsn)
    tx = in_flight.transaction()
    await tx.start()
    await in_flight.execute("INSERT INTO readings VALUES (1000, 'uncommitted')")
    pids = postgres.server_pids()
    assert len(pids) >= 3  # postmaster, auxiliaries, our two backends

    postgres.kill()

    assert not postgres.is_running
    assert not [pid for pid in pids if pid_is_live(pid)], "a postgres process survived kill()"
    assert not port_accepts("127.0.0.1", port)
    with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1")
    conn.terminate()
    in_flight.terminate()

    await postgres.arestart()

    assert postgres.port == port
    conn = await asyncpg.connect(postgres.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM readings") == 50
        assert await conn.fetchval("SELECT count(*) FROM readings WHERE id = 1000") == 0
    finally:
        await conn.close()
    assert "automatic recovery in progress" in postgres.log_text()


async def test_postgres_stop_is_a_fast_shutdown(postgres: PostgresServer) -> None:
    idle_in_tx = await asyncpg.connect(postgres.dsn)
    tx = idle_in_tx.transaction()
    await tx.start()
    await idle_in_tx.execute("CREATE TABLE never (x int)")
    pids = postgres.server_pids()

    await postgres.astop()  # a smart shutdown would wait for this client forever

    assert not postgres.is_running
    assert not [pid for pid in pids if pid_is_live(pid)]
    log = postgres.log_text()
    assert "received fast shutdown request" in log
    assert "database system is shut down" in log
    idle_in_tx.terminate()

    postgres.restart()
    assert "automatic recovery" not in postgres.log_text()
    conn = await asyncpg.connect(postgres.dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('never')") is None
    finally:
        await conn.close()


def test_postgres_start_failure_shows_log(postgres_factory: PostgresFactory) -> None:
    with pytest.raises(RuntimeError, match="max_connections"):
        postgres_factory(settings={"max_connections": "lots"})


# --------------------------------------------------------------------------- cleanup


@dataclass
class Spawned:
    """What a test started, to check after the fixtures' teardown."""

    pids: list[int] = field(default_factory=list)
    workdirs: list[Path] = field(default_factory=list)


def _peer_children() -> set[int]:
    return {p.pid for p in live_children(os.getpid(), ("mosquitto", "postgres"))}


@pytest.fixture
def leak_check() -> Iterator[Spawned]:
    """Requested before the factories, so its teardown runs after theirs: nothing may be left."""
    spawned = Spawned()
    before = _peer_children()  # e.g. the session-scoped server, which legitimately lives on
    yield spawned
    survivors = [pid for pid in spawned.pids if pid_is_live(pid)]
    assert not survivors, f"processes survived fixture teardown: {survivors}"
    stray_children = _peer_children() - before
    assert not stray_children, f"peer processes still children of pytest: {stray_children}"
    assert not [d for d in spawned.workdirs if d.exists()], "temp dirs left behind"
    mentions = [
        proc.pid
        for proc in iter_procs()
        if any(str(d) in _cmdline(proc.pid) for d in spawned.workdirs)
    ]
    assert not mentions, f"processes still referring to the temp dirs: {mentions}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def test_fixture_teardown_leaves_no_processes(
    leak_check: Spawned,
    mosquitto_factory: MosquittoFactory,
    postgres_factory: PostgresFactory,
) -> None:
    brokers = [mosquitto_factory(), mosquitto_factory()]
    server = postgres_factory()
    conn = await asyncpg.connect(server.dsn)  # make sure a backend exists too
    try:
        leak_check.pids += [b.pid for b in brokers if b.pid is not None]
        leak_check.pids += server.server_pids()
        leak_check.workdirs += [b.workdir for b in brokers] + [server.workdir]
        assert live_pids_with_cwd(server.data_dir)  # backends are found through their cwd
        brokers[1].kill()  # a mix of running and already-dead peers at teardown
    finally:
        await conn.close()


def test_pool_kills_everything_when_the_test_body_raises() -> None:
    made: list[MosquittoBroker] = []

    def failing_test_body() -> None:
        with PeerPool(MosquittoBroker) as pool:
            made.append(pool.make())
            made.append(pool.make(start=False))
            raise RuntimeError("test failed")

    with pytest.raises(RuntimeError, match="test failed"):
        failing_test_body()
    assert len(made) == 2
    assert not any(broker.is_running for broker in made)
    assert not any(broker.workdir.exists() for broker in made)
