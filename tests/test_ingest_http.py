"""`edge-agent ingest` as a process: /healthz /readyz /status /metrics, and how it ends."""

from __future__ import annotations

import json
import socket
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sync.events import dumps
from tests.fixtures import MosquittoBroker, MqttTestClient, PostgresServer, free_port, wait_until
from tests.fixtures.central import batch_doc
from tests.fixtures.child import ChildProcess
from tests.fixtures.procs import read_text_lossy

pytestmark = pytest.mark.slow

PREFIX = "edge_agent_ingest"
COUNTERS = (
    "messages",
    "batches_committed",
    "rows_inserted",
    "rows_duplicate",
    "malformed",
    "uncovered",
    "out_of_window",
    "commit_errors",
    "db_failures",
    "acks_published",
    "acks_unsent",
    "overflow_dropped",
    "maintenance_runs",
    "maintenance_failures",
)


def get(port: int, path: str) -> tuple[int, bytes]:
    """Status and body of ``GET path`` (connection refused: status 0)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def metrics(port: int) -> dict[str, float]:
    """Every sample of /metrics: ``name`` or ``name{label="value"}`` -> value."""
    status, body = get(port, "/metrics")
    assert status == 200
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def central_config(path: Path, broker: MosquittoBroker, dsn: str, http_port: int) -> Path:
    """An ingest config file on ``broker`` and ``dsn``, serving HTTP on ``http_port``."""
    path.write_text(
        f'[mqtt]\nurl = "{broker.url}"\n\n[postgres]\ndsn = "{dsn}"\n\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n\n'
        '[events]\noldest = "2000-01-01"\nmax_future = "1h"\n'
    )
    return path


def ingest_process(config: Path, log: Path) -> ChildProcess:
    """``edge-agent ingest -c config`` from the repository root, logging to ``log``."""
    return ChildProcess(
        "ingest", [sys.executable, "-m", "agent.cli", "ingest", "-c", str(config)], log
    )


def deliver_until_acked(client: MqttTestClient, doc: dict[str, object]) -> None:
    """Publish an S/sync batch, again every second until its S/ack arrives (a subscription that
    is still being set up may miss the first one)."""
    topic = f"edge/{doc['gateway']}/sync"

    def acked() -> bool:
        client.publish(topic, dumps(doc))
        try:
            message = client.wait_for_message(timeout=1.0)
        except TimeoutError:
            return False
        return bool(json.loads(message.payload)["acked_seq"] == doc["last_seq"])

    wait_until(acked, timeout=30, message=f"S/ack of {topic}")


def test_ingest_serves_health_readiness_and_metrics(
    mosquitto: MosquittoBroker,
    postgres: PostgresServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    port = free_port()
    config = central_config(tmp_path / "central.toml", mosquitto, postgres.dsn, port)
    postgres.stop()  # not ready without its database, alive all the same
    ingest = ingest_process(config, tmp_path / "ingest.log")
    request.addfinalizer(ingest.ensure_dead)
    ingest.start()

    wait_until(lambda: get(port, "/healthz") == (200, b'{"status":"alive"}'), timeout=30)

    def unready_without_database() -> bool:
        status, body = get(port, "/readyz")
        return status == 503 and json.loads(body)["database_up"] is False

    wait_until(unready_without_database, timeout=30, message="/readyz 503, database down")
    assert metrics(port)[f"{PREFIX}_database_up"] == 0.0

    postgres.start()
    wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=30, message="/readyz 200")
    status, body = get(port, "/readyz")
    assert json.loads(body) == {"ready": True, "database_up": True, "mqtt_connected": True}
    samples = metrics(port)
    for name in COUNTERS:
        assert f"{PREFIX}_{name}_total" in samples, name
    assert samples[f"{PREFIX}_database_up"] == 1.0
    assert samples[f"{PREFIX}_mqtt_connected"] == 1.0
    assert samples[f"{PREFIX}_queue_depth"] == 0.0
    assert samples[f"{PREFIX}_db_failures_total"] >= 1  # the outage at start

    with MqttTestClient.for_broker(mosquitto) as client:
        client.subscribe("edge/+/ack")
        good = batch_doc(1, 5, stream=str(uuid.uuid4()), gateway="gw-good")
        deliver_until_acked(client, good)
        client.publish("edge/gw-bad/sync", b'{"gateway": "gw-bad", "stream": "not a uuid"}')
        client.publish("edge/gw-bad/sync", b"not json")
        # A range claimed without its events (a forged ack), an event dated before [events]
        # oldest, one dated more than max_future ahead.
        forged = {**batch_doc(1, 5, stream=str(uuid.uuid4()), gateway="gw-bad"), "events": []}
        client.publish("edge/gw-bad/sync", dumps(forged))
        for moment in ("1999-12-31T23:59:59Z", "2999-01-01T00:00:00Z"):
            dated = batch_doc(1, 1, stream=str(uuid.uuid4()), gateway="gw-bad")
            dated["events"][0]["ts"] = moment
            client.publish("edge/gw-bad/sync", dumps(dated))
        wait_until(
            lambda: (
                metrics(port).get(f'{PREFIX}_malformed_by_sender_total{{sender="gw-bad"}}') == 5.0
            ),
            timeout=15,
            message="five malformed batches counted for gw-bad",
        )
    samples = metrics(port)
    assert samples[f"{PREFIX}_malformed_total"] == 5.0
    assert samples[f"{PREFIX}_uncovered_total"] == 1.0
    assert samples[f"{PREFIX}_out_of_window_total"] == 2.0
    assert samples[f"{PREFIX}_absurd_rows"] == 0.0
    assert f'{PREFIX}_malformed_by_sender_total{{sender="gw-good"}}' not in samples
    assert samples[f"{PREFIX}_batches_committed_total"] >= 1
    assert samples[f"{PREFIX}_rows_inserted_total"] == 5.0  # resends are counted as duplicates
    assert samples[f"{PREFIX}_acks_published_total"] >= 1
    assert samples[f"{PREFIX}_maintenance_runs_total"] >= 1
    status, body = get(port, "/status")
    assert status == 200
    assert json.loads(body)["stats"]["malformed_by_sender"] == {"gw-bad": 5}

    assert ingest.stop() == 0
    log = read_text_lossy(tmp_path / "ingest.log")
    assert "ingest stopped" in log
    assert "Traceback" not in log


def test_ingest_runs_on_when_its_port_is_taken(
    mosquitto: MosquittoBroker,
    postgres_database: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = central_config(tmp_path / "central.toml", mosquitto, postgres_database, port)
        ingest = ingest_process(config, tmp_path / "ingest.log")
        request.addfinalizer(ingest.ensure_dead)
        ingest.start()
        with MqttTestClient.for_broker(mosquitto) as client:
            client.subscribe("edge/+/ack")
            deliver_until_acked(client, batch_doc(1, 3, stream=str(uuid.uuid4())))
    assert ingest.stop() == 0
    log = read_text_lossy(tmp_path / "ingest.log")
    assert f"http: cannot listen on 127.0.0.1:{port}" in log
    assert "Traceback" not in log


def test_a_failing_ingest_logs_its_cause_and_exits_1(
    mosquitto: MosquittoBroker,
    postgres_session: PostgresServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    dsn = postgres_session.dsn_for("no_such_database")  # a configuration error: not retried
    config = central_config(tmp_path / "central.toml", mosquitto, dsn, free_port())
    ingest = ingest_process(config, tmp_path / "ingest.log")
    request.addfinalizer(ingest.ensure_dead)
    ingest.start()
    process = ingest.process
    assert process is not None
    assert process.wait(timeout=60) == 1
    log = read_text_lossy(tmp_path / "ingest.log")
    assert 'ingest: stopped by InvalidCatalogNameError: database "no_such_database"' in log
    assert "Traceback" not in log  # PostgreSQL's own words say it all
    assert "ingest stopped" not in log
