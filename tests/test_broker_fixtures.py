"""The interop matrix's broker fixtures (tests/fixtures/brokers.py): private ports, kill -9 and
restart on the same port, nothing left behind; a port someone else took is not theirs.
RabbitMQ (10-15 s to start) is proven by the matrix itself, whose teardown checks the same."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from tests.fixtures.brokers import (
    AedesBroker,
    AmqttBroker,
    BrokerProcess,
    NatsBroker,
    connack_code,
)
from tests.fixtures.ports import LOOPBACK, RESERVED_PORTS, port_accepts
from tests.fixtures.procs import live_pids_in_group

BROKERS: list[Callable[[], BrokerProcess]] = [NatsBroker, AedesBroker, AmqttBroker]


@pytest.mark.parametrize("make", BROKERS, ids=lambda make: make.name)  # type: ignore[attr-defined]
def test_kill_restart_close(make: Callable[[], BrokerProcess]) -> None:
    broker = make()
    try:
        broker.start()
        port = broker.port
        assert port not in RESERVED_PORTS
        assert connack_code(broker.host, port) == 0
        leader = broker.pid
        assert leader is not None
        broker.kill()
        assert not broker.is_running
        assert live_pids_in_group(leader) == []
        assert not port_accepts(LOOPBACK, port)
        broker.start()
        assert broker.port == port
        assert connack_code(broker.host, port) == 0
        leader = broker.pid
        assert leader is not None
    finally:
        broker.close()
    assert live_pids_in_group(leader) == []
    assert not broker.workdir.exists()


@pytest.mark.parametrize("make", BROKERS, ids=lambda make: make.name)  # type: ignore[attr-defined]
def test_a_taken_port_is_left_alone(make: Callable[[], BrokerProcess]) -> None:
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        broker = make()
        broker._port = taken  # as if free_port() had raced with the squatter
        try:
            broker.start()
            assert broker.port != taken
            assert connack_code(broker.host, broker.port) == 0
        finally:
            broker.close()
