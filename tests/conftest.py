"""Shared pytest fixtures: private mosquitto brokers and PostgreSQL servers on free ports.

- ``mosquitto_factory`` / ``postgres_factory``: ``make(**kwargs)`` starts a new peer (kwargs go
  to ``MosquittoBroker`` / ``PostgresServer``; ``start=False`` to only prepare it). Every peer
  made is killed and its temp dir removed on teardown, even if the test failed.
- ``mosquitto`` / ``postgres``: one started peer each, private to the test (kill it at will).
- ``postgres_session``: one server for the whole session; never stop or kill it.
- ``postgres_database``: DSN of a fresh, empty database on ``postgres_session``.
- ``track_peer``: ``track(peer)`` adds a peer's log tail to the test's report if it fails.

When a test fails, the log tails of the peers it used are added to its report. Every async
test runs on uvloop's event loop, the one every program runs on (`pytest_asyncio_loop_factories`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Generator, Iterator

import pytest
import uvloop

from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.pool import MosquittoFactory, Peer, PeerPool, PostgresFactory
from tests.fixtures.postgres import PostgresServer

_PEERS_KEY = pytest.StashKey[list[Peer]]()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on the event loop the programs run on (uvloop's)."""
    return {"uvloop": uvloop.new_event_loop}


def _track(item: pytest.Item) -> Callable[[Peer], None]:
    """Return a callback that attaches a peer to ``item`` for failure reports."""

    def track(peer: Peer) -> None:
        item.stash.setdefault(_PEERS_KEY, []).append(peer)

    return track


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, append the log tail of every peer the test used to its report."""
    report = yield
    if report.failed and call.when in ("setup", "call"):
        for peer in item.stash.get(_PEERS_KEY, []):
            report.sections.append((f"log tail of {peer!r}", peer.log_tail(60)))
    return report


@pytest.fixture
def track_peer(request: pytest.FixtureRequest) -> Callable[[Peer], None]:
    """Attach a peer made elsewhere (e.g. a module-scoped broker) to this test's failure report."""
    assert isinstance(request.node, pytest.Item)
    return _track(request.node)


@pytest.fixture
def mosquitto_factory(request: pytest.FixtureRequest) -> Iterator[MosquittoFactory]:
    """Factory of started private brokers; all are killed on teardown."""
    assert isinstance(request.node, pytest.Item)
    with PeerPool(MosquittoBroker, on_make=_track(request.node)) as pool:
        yield pool.make


@pytest.fixture
def mosquitto(mosquitto_factory: MosquittoFactory) -> MosquittoBroker:
    """One started private broker (anonymous, plain MQTT on 127.0.0.1)."""
    return mosquitto_factory()


@pytest.fixture
def postgres_factory(request: pytest.FixtureRequest) -> Iterator[PostgresFactory]:
    """Factory of started private PostgreSQL servers; all are killed on teardown."""
    assert isinstance(request.node, pytest.Item)
    with PeerPool(PostgresServer, on_make=_track(request.node)) as pool:
        yield pool.make


@pytest.fixture
def postgres(postgres_factory: PostgresFactory) -> PostgresServer:
    """One started private PostgreSQL server (initdb ~1 s); stop/kill/restart it at will."""
    return postgres_factory()


@pytest.fixture(scope="session")
def postgres_session() -> Iterator[PostgresServer]:
    """One PostgreSQL server shared by the session: do not stop or kill it."""
    with PeerPool(PostgresServer) as pool:
        yield pool.make()


@pytest.fixture
def postgres_database(request: pytest.FixtureRequest, postgres_session: PostgresServer) -> str:
    """DSN of a fresh empty database on the session server."""
    if not postgres_session.is_running:
        pytest.fail("the session-scoped PostgreSQL server was stopped; use postgres_factory")
    assert isinstance(request.node, pytest.Item)
    _track(request.node)(postgres_session)
    return postgres_session.create_database(f"test_{uuid.uuid4().hex[:16]}")
