"""The ingest's status page in a real browser (headless Chromium) against `edge-agent ingest`
on a private PostgreSQL and mosquitto: two gateways with their watermarks, one sending a
malformed batch, the other a gap and a batch above a missing seq; 401 without the token off
loopback."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from selenium import webdriver

from agent.central import page
from agent.central.page import IngestPage
from sync.central.overview import OverviewReader
from sync.central.stats import SENDER_CHARS
from sync.events import dumps
from tests.fixtures import MosquittoBroker, MqttTestClient, free_port, wait_until
from tests.fixtures.browser import browser as browser
from tests.fixtures.browser import console_errors, screenshot
from tests.fixtures.central import batch_doc
from tests.fixtures.ingest import FakeGateway, running_ingest
from tests.fixtures.ingest import batch_doc as ingest_batch
from tests.fixtures.ports import async_wait_until
from tests.test_ingest_http import deliver_until_acked, ingest_process
from tests.test_page import attribute, texts

pytestmark = pytest.mark.slow

TOKEN = "ingest-page-token"
REFRESH = 2.0  # agent/central/page.py REFRESH


def status(port: int, path: str) -> int:
    """The status of GET path without credentials."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def shows(session: webdriver.Chrome, check: str) -> bool:
    """Whether a JavaScript expression is true on the page."""
    return bool(session.execute_script(f"return Boolean({check});"))


def cell(session: webdriver.Chrome, gateway: str, role: str) -> str:
    """The text of a gateway's cell ('' when the row is not there)."""
    found = texts(session, f'tr[data-gateway="{gateway}"] [data-role="{role}"]')
    return found[0] if found else ""


def test_the_ingest_page_shows_each_gateway(
    mosquitto: MosquittoBroker,
    postgres_database: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    browser: webdriver.Chrome,
) -> None:
    port = free_port()
    (tmp_path / "http.token").write_text(TOKEN + "\n")
    config = tmp_path / "central.toml"
    config.write_text(
        f'[mqtt]\nurl = "{mosquitto.url}"\n\n[postgres]\ndsn = "{postgres_database}"\n\n'
        f'[http]\nlisten = "0.0.0.0:{port}"\ntoken_file = "http.token"\n'
    )
    ingest = ingest_process(config, tmp_path / "ingest.log")
    request.addfinalizer(ingest.ensure_dead)
    ingest.start()
    wait_until(lambda: status(port, "/readyz") == 200, timeout=30, message="/readyz 200")

    # Off loopback without the token: everything but the probes (and /metrics) is refused.
    paths = ("/", "/ingest.js", "/common.js", "/page.css", "/api/page", "/status", "/healthz")
    assert {path: status(port, path) for path in paths} == {
        "/": 401,
        "/ingest.js": 401,
        "/common.js": 401,
        "/page.css": 401,
        "/api/page": 401,
        "/status": 401,
        "/healthz": 200,
    }

    now = time.time()
    stream_a, stream_b = str(uuid.uuid4()), str(uuid.uuid4())
    with MqttTestClient.for_broker(mosquitto) as client:
        client.subscribe("edge/+/ack")
        deliver_until_acked(client, batch_doc(1, 10, stream=stream_a, gateway="gw-a", ts=now))
        deliver_until_acked(client, batch_doc(11, 20, stream=stream_a, gateway="gw-a", ts=now))
        client.publish("edge/gw-a/sync", b"not json")
        # Seqs 4 and 5 dropped on gw-b (a gap event at 6), then a batch above a missing 11..14.
        deliver_until_acked(
            client, batch_doc(1, 10, stream=stream_b, gateway="gw-b", absent=(4, 5), ts=now)
        )
        client.publish(
            "edge/gw-b/sync", dumps(batch_doc(15, 20, stream=stream_b, gateway="gw-b", ts=now))
        )

        browser.get(f"http://anyone:{TOKEN}@127.0.0.1:{port}/")
        live = "document.querySelector('#link').dataset.state === 'live'"
        wait_until(lambda: shows(browser, live), timeout=10, message="live with the token")

        def both_shown() -> bool:
            return cell(browser, "gw-a", "malformed") == "1" and cell(
                browser, "gw-b", "above"
            ).startswith("up to 20")

        wait_until(both_shown, timeout=2 * REFRESH + 10, message="both gateways on the page")

    assert attribute(browser, "tr[data-gateway]", "data-gateway") == ["gw-a", "gw-b"]
    assert cell(browser, "gw-a", "acked") == "20"
    assert cell(browser, "gw-a", "ack-sent") == "20"
    assert cell(browser, "gw-a", "gaps") == "0"
    assert cell(browser, "gw-b", "acked") == "10"
    assert cell(browser, "gw-b", "above") == "up to 20 (1 ranges)"
    assert cell(browser, "gw-b", "malformed") == "0"
    assert cell(browser, "gw-b", "gaps").startswith("1 (2 seqs, last ")
    for gateway in ("gw-a", "gw-b"):
        assert cell(browser, gateway, "last-batch").endswith(" ago")
        assert cell(browser, gateway, "last-commit").endswith(" ago")
    facts = dict(
        zip(
            attribute(browser, "#overview-facts dd", "data-fact"),
            texts(browser, "#overview-facts dd"),
            strict=True,
        )
    )
    assert facts["database"] == "up"
    assert facts["broker"].endswith("(connected)")
    assert facts["subscription"] == "edge/+/sync (granted)"
    assert facts["queue"] == "0 of 256 messages"
    assert facts["malformed"].startswith("1 ")
    assert texts(browser, "#verdict") == ["healthy"]

    assert screenshot(browser, "ingest-page-desktop", 1280).stat().st_size > 10_000

    # The filter asks the ingest for the matching gateways only.
    browser.find_element("id", "filter").send_keys("gw-b")
    wait_until(
        lambda: attribute(browser, "tr[data-gateway]", "data-gateway") == ["gw-b"],
        timeout=10,
        message="only gw-b",
    )
    assert console_errors(browser) == []
    document = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(
                f"http://127.0.0.1:{port}/api/page", headers={"Authorization": f"Bearer {TOKEN}"}
            ),
            timeout=5,
        ).read()
    )
    assert "dsn" not in json.dumps(document).lower()
    assert postgres_database.rsplit("/", 1)[-1] not in json.dumps(document)
    assert ingest.stop() == 0


async def test_the_document_is_bounded_and_survives_the_database(
    mosquitto: MosquittoBroker, postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(page, "GATEWAYS_SHOWN", 2)
    async with running_ingest(postgres_database, mosquitto) as ingest, FakeGateway(mosquitto) as gw:
        docs = [ingest_batch(name, str(uuid.uuid4()), 1, 3) for name in ("gw-1", "gw-2", "gw-3")]
        await gw.deliver(docs)
        # A client publishing under a huge topic level is kept cut to SENDER_CHARS.
        gw.publish_raw("x" * 5000, b"not json")
        await async_wait_until(lambda: ingest.stats.malformed == 1, timeout=10)
        reader = OverviewReader(postgres_database)
        try:
            shown = await IngestPage(ingest, reader, broker="b:1").document()
            found = await IngestPage(ingest, reader, broker="b:1").document("GW-3")
        finally:
            await reader.close()
        unreachable = OverviewReader("postgresql://nobody@127.0.0.1:1/none", timeout=2.0)
        without_database = await IngestPage(ingest, unreachable, broker="b:1").document("gw-")
    assert [row["gateway"] for row in shown["gateways"]] == ["gw-1", "gw-2"]
    assert (shown["gateways_stored"], shown["more"]) == (3, True)
    assert [row["gateway"] for row in found["gateways"]] == ["gw-3"]
    assert found["gateways"][0]["streams"][0]["acked_seq"] == 3
    assert (found["gateways_stored"], found["more"]) == (1, False)
    assert "x" * SENDER_CHARS in ingest.senders.names()
    assert not any(len(name) > SENDER_CHARS for name in ingest.senders.names())
    # Without the database the page still lists what this replica saw, and says why.
    assert without_database["database_read"] is not None
    assert [row["gateway"] for row in without_database["gateways"]] == ["gw-1", "gw-2"]
    assert without_database["gateways"][0]["last_message"] is not None
    assert without_database["gateways"][0]["streams"] == []
    assert "the page cannot read PostgreSQL" in " ".join(without_database["overview"]["reasons"])
