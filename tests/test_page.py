"""The status page in a real browser (headless Chromium), against the agent on the simulator:
what it shows, live updates without reload, a device going down, the machine timeline, the
workflows, screenshots, and 401 off loopback without the token."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from agent.daemon import page
from agent.daemon.runtime import Runtime
from agent.oee.state_timeline import StateTimeline
from agent.oee.states import StateChange
from simulators.modbus.server import ModbusSimulator
from sync.uplink.topics import sample_payload, value_text
from tests.fixtures.browser import browser as browser
from tests.fixtures.browser import console_errors, screenshot
from tests.fixtures.daemon import ROOT, config_text, machine_config, running, settings_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ports import async_wait_until, free_port
from tests.fixtures.workflows import CommandSender

POLL = 0.2  # the devices' poll_interval in config_text
REFRESH = 0.5  # the page's refresh with that poll interval (MIN_REFRESH, docs/page.md)

LINE = (
    """
  [[devices.tags]]
  name = "hold"
  address = "co:2"
  type = "bool"
  writable = true
"""
    + machine_config("press")
    + """
[[workflows]]
name = "hold_check"
description = "Hold the press until it reports state 99 (it never does: compensated)."
params = { reason = "str:1..16" }
on_uplink_failure = "continue"
steps = [
  { write = "press1/hold", value = true, compensate_value = false },
  { wait = "press1/state_code", value = 99, timeout = "1s" },
]
"""
)


# The page redraws its sections on every refresh: read them in one script, never through
# element references kept across a refresh (they go stale).


def texts(session: webdriver.Chrome, selector: str) -> list[str]:
    """The text of every element matching a CSS selector."""
    found = session.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent);",
        selector,
    )
    return [str(text) for text in found]


def attribute(session: webdriver.Chrome, selector: str, name: str) -> list[str]:
    """An attribute of every element matching a CSS selector."""
    found = session.execute_script(
        "return [...document.querySelectorAll(arguments[0])]"
        ".map((e) => e.getAttribute(arguments[1]) || '');",
        selector,
        name,
    )
    return [str(value) for value in found]


def shown_rows(session: webdriver.Chrome, selector: str) -> list[str]:
    """The data-tag of the rows matching a selector that are displayed."""
    found = session.execute_script(
        "return [...document.querySelectorAll(arguments[0])]"
        ".filter((e) => e.offsetParent !== null).map((e) => e.dataset.tag);",
        selector,
    )
    return [str(tag) for tag in found]


def tag_value(session: webdriver.Chrome, device: str, tag: str) -> str:
    """The value cell of a tag on the page ('' when it is not there)."""
    found = texts(session, f'article[data-device="{device}"] tr[data-tag="{tag}"] td.value')
    return found[0] if found else ""


async def until(session: webdriver.Chrome, check: str, within: float, what: str) -> None:
    """Wait until a JavaScript expression is true on the page."""

    def holds() -> bool:
        return bool(session.execute_script(f"return Boolean({check});"))

    await async_wait_until(lambda: asyncio.to_thread(holds), timeout=within, message=what)


def machine_states(session: webdriver.Chrome) -> list[str]:
    """The timeline segments of the press, in order."""
    return attribute(session, 'article[data-machine="press"] .segment', "data-state")


async def test_the_page_shows_the_line_live(
    mosquitto: MosquittoBroker, tmp_path: Path, browser: webdriver.Chrome
) -> None:
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        text = config_text(mosquitto, tmp_path / "data", [("press1", sim.port)]) + LINE
        text = text.replace('name = "temperature"\n', 'name = "temperature"\n  unit = "degC"\n')
        settings = settings_for(tmp_path, text)
        url = f"http://127.0.0.1:{settings.http.port}/"
        async with running(settings) as runtime:
            await async_wait_until(lambda: runtime.pollers["press1"].polls >= 2, timeout=10)
            await asyncio.to_thread(browser.get, url)
            await until(
                browser, "document.querySelector('#link').dataset.state === 'live'", 10, "live"
            )
            await until(
                browser,
                "document.querySelector('article[data-device=\"press1\"] td.value')",
                10,
                "the device table",
            )
            await check_sections(browser, runtime)

            # A value changed in the simulator shows without a reload within two refreshes
            # (one poll to read it, one refresh to fetch it; docs/page.md "Live updates").
            await asyncio.to_thread(browser.execute_script, "window.__kept = true;")
            name = f"P{uuid.uuid4().hex[:6]}"
            sim.model().write("product_name", name)
            await until(
                browser,
                f'document.querySelector(\'article[data-device="press1"] '
                f'tr[data-tag="product_name"] td.value\').textContent === {json.dumps(json.dumps(name))}',
                2 * REFRESH + POLL + 2.0,  # plus room for a busy 2-core machine
                "the new product name",
            )
            assert await asyncio.to_thread(browser.execute_script, "return window.__kept;")

            await check_timeline(browser, runtime, sim)
            await check_workflow(browser, mosquitto)
            assert await asyncio.to_thread(console_errors, browser) == []
            for name, width in (("page-desktop", 1280), ("page-phone", 390)):
                path = await asyncio.to_thread(screenshot, browser, name, width)
                assert path.stat().st_size > 10_000

            # A stopped device shows as down: its reads fail at once (a stalled one would
            # take its read deadline, 3 x max(poll_interval, timeout) + 5 s).
            await asyncio.to_thread(browser.set_window_size, 1280, 900)
            await sim.close()
            await until(
                browser,
                "document.querySelector('article[data-device=\"press1\"]').dataset.state !== 'up'",
                10,
                "press1 down",
            )
            reason = await asyncio.to_thread(
                texts, browser, 'article[data-device="press1"] [data-role="reason"]'
            )
            assert reason != [""], "a down device says why"
            assert len(reason) == 1
            reasons = await asyncio.to_thread(texts, browser, "#reasons li")
            assert "device press1 is down" in " ".join(reasons)
            assert await asyncio.to_thread(texts, browser, "#verdict") == ["degraded"]
        # The agent stops: the page says it is reconnecting, without a reload.
        await until(
            browser,
            "document.querySelector('#link').dataset.state === 'reconnecting'",
            10,
            "reconnecting",
        )
        assert not await asyncio.to_thread(
            browser.find_element(By.ID, "banner").get_attribute, "hidden"
        )
        assert await asyncio.to_thread(browser.execute_script, "return window.__kept;")


async def check_sections(session: webdriver.Chrome, runtime: Runtime) -> None:
    """Overview, devices, machines and workflows show what the agent holds."""
    page = await asyncio.to_thread(texts, session, "#overview-facts dd")
    assert "plant1-line3" in page
    assert await asyncio.to_thread(texts, session, "#verdict") in (["healthy"], ["degraded"])
    device = 'article[data-device="press1"]'
    assert await asyncio.to_thread(attribute, session, device, "data-state") == ["up"]
    gateway = runtime.gateway
    assert gateway is not None
    # Every tag's value is the text its R/{device}/{tag} payload carries.
    for tag in ("temperature", "state_code", "total_count", "running", "energy"):
        latest = gateway.pipeline.latest("press1", tag)
        assert latest is not None
        shown = await asyncio.to_thread(tag_value, session, "press1", tag)
        assert json.loads(shown) == latest.value, tag
    # The unit where the config names one (temperature's), nothing where it does not.
    units = {
        tag: await asyncio.to_thread(texts, session, f'{device} tr[data-tag="{tag}"] td.unit')
        for tag in ("temperature", "state_code")
    }
    assert units == {"temperature": ["degC"], "state_code": [""]}
    # The filter box hides the tags that do not match.
    box = session.find_element(By.ID, "filter")
    await asyncio.to_thread(box.send_keys, "temp")
    shown_tags = await asyncio.to_thread(shown_rows, session, f"{device} tr[data-tag]")
    assert shown_tags == ["temperature"]
    await asyncio.to_thread(box.clear)
    await asyncio.to_thread(box.send_keys, " ")
    machine = await asyncio.to_thread(
        attribute, session, 'article[data-machine="press"]', "data-state"
    )
    engine_state = gateway.oee.engine("press")
    assert engine_state is not None
    assert engine_state.state is not None
    assert machine == [engine_state.state.state]
    assert "hold_check" in " ".join(await asyncio.to_thread(texts, session, "#saga-list"))


async def check_timeline(session: webdriver.Chrome, runtime: Runtime, sim: ModbusSimulator) -> None:
    """One timeline segment per state change the simulator made, hover shows the times."""
    gateway = runtime.gateway
    assert gateway is not None
    engine = gateway.oee.engine("press")
    assert engine is not None
    await until(
        session,
        "document.querySelectorAll('article[data-machine=\"press\"] .segment').length >= 1",
        10,
        "a segment",
    )
    before = await asyncio.to_thread(machine_states, session)
    assert len(before) == 1, before  # the state read at the start, unchanged since
    expected = list(before)
    for code, published in ((3, "planned_stop"), (2, "unplanned_stop"), (1, "running")):
        sim.model().force_state(code)
        await async_wait_until(
            lambda published=published: (  # type: ignore[misc]
                engine.state is not None and engine.state.state == published
            ),
            timeout=10,
            message=published,
        )
        expected.append(published)
    await until(
        session,
        f"document.querySelectorAll('article[data-machine=\"press\"] .segment').length === {len(expected)}",
        2 * REFRESH + 2.0 + 1.0,  # the OEE task flushes state changes every second
        "one segment per state change",
    )
    assert await asyncio.to_thread(machine_states, session) == expected
    titles = await asyncio.to_thread(
        attribute, session, 'article[data-machine="press"] .segment', "title"
    )
    assert titles[1].startswith("planned stop (code 3): ")
    # Hover: the mouse goes over the segment (the page keeps the hovered one over redraws).
    await asyncio.to_thread(
        session.execute_script,
        "document.querySelectorAll('article[data-machine=\"press\"] .segment')[1]"
        ".dispatchEvent(new MouseEvent('mouseenter'));",
    )
    await until(
        session,
        '(document.querySelector(\'article[data-machine="press"] [data-role="hover-info"]\')'
        ".textContent || '').startsWith('planned stop')",
        5,
        "the hovered segment's times",
    )


async def check_workflow(session: webdriver.Chrome, mosquitto: MosquittoBroker) -> None:
    """A saga shows with its steps and outcome."""
    with CommandSender(mosquitto, ROOT) as sender:
        await asyncio.to_thread(
            sender.send, "hold_check", {"id": "page-1", "params": {"reason": "test"}}
        )
        await until(
            session,
            "[...document.querySelectorAll('details.saga .badge')].some("
            "(b) => b.textContent === 'compensated')",
            15,
            "the compensated saga",
        )
    summary = " ".join(await asyncio.to_thread(texts, session, "details.saga summary"))
    assert "hold_check" in summary
    assert "command page-1" in summary
    await asyncio.to_thread(
        session.execute_script, "document.querySelector('details.saga summary').click();"
    )
    await until(session, "document.querySelector('details.saga').open", 5, "the steps shown")
    cells = " ".join(await asyncio.to_thread(texts, session, "details.saga td"))
    assert "press1/hold" in cells
    assert "compensated" in cells  # the write was undone
    assert "timeout" in cells  # the wait step's outcome


async def test_the_page_comes_back_when_the_agent_restarts(
    mosquitto: MosquittoBroker, tmp_path: Path, browser: webdriver.Chrome
) -> None:
    settings = settings_for(tmp_path, config_text(mosquitto, tmp_path / "data", []))
    live = "document.querySelector('#link').dataset.state === 'live'"
    async with running(settings) as first:
        await asyncio.to_thread(browser.get, f"http://127.0.0.1:{settings.http.port}/")
        await until(browser, live, 10, "live")
        await asyncio.to_thread(browser.execute_script, "window.__kept = true;")
        uptime_before = await asyncio.to_thread(texts, browser, '[data-fact="uptime"]')
    await until(
        browser,
        "document.querySelector('#link').dataset.state === 'reconnecting'",
        10,
        "reconnecting while the agent is away",
    )
    # The last data stays on screen while the agent is away.
    assert await asyncio.to_thread(texts, browser, '[data-fact="uptime"]') == uptime_before
    # A new agent on the same listen address: the page's retries (backoff of at most 5 s,
    # docs/page.md "Live updates") find it, without a reload.
    async with running(settings) as second:
        assert second is not first
        await until(browser, live, 5 + 10, "live again after the restart")
        assert await asyncio.to_thread(browser.execute_script, "return window.__kept;")
        assert await asyncio.to_thread(
            browser.find_element(By.ID, "banner").get_attribute, "hidden"
        )
    # The fetches refused while the agent was away are logged by Chromium; nothing else is.
    errors = await asyncio.to_thread(console_errors, browser)
    assert [e for e in errors if "ERR_CONNECTION_REFUSED" not in e] == []


def get(url: str) -> int:
    """The status of GET url."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_off_loopback_the_page_needs_the_token(
    mosquitto: MosquittoBroker, tmp_path: Path, browser: webdriver.Chrome
) -> None:
    (tmp_path / "http.token").write_text("page-token\n")
    port = free_port()
    text = config_text(mosquitto, tmp_path / "data", []).replace(
        "[http]\nlisten = ", f'[http]\ntoken_file = "http.token"\nlisten = "0.0.0.0:{port}"\n# '
    )
    settings = settings_for(tmp_path, text)
    async with running(settings):
        codes = {
            path: await asyncio.to_thread(get, f"http://127.0.0.1:{port}{path}")
            for path in ("/", "/page.js", "/api/page", "/status", "/healthz")
        }
        # With the token as basic auth (what a browser asks for) the page works.
        await asyncio.to_thread(browser.get, f"http://anyone:page-token@127.0.0.1:{port}/")
        await until(
            browser,
            "document.querySelector('#link').dataset.state === 'live'",
            10,
            "live with the token",
        )
    assert codes == {"/": 401, "/page.js": 401, "/api/page": 401, "/status": 401, "/healthz": 200}


@pytest.mark.parametrize("value", [None, True, False, 7, -3, 56.9, 1e21, "P-1", [1, 2.5], math.nan])
def test_a_value_shows_as_its_live_payload_writes_it(value: object) -> None:
    payload = sample_payload(0.0, value, "good").decode()
    assert f'"value":{value_text(value)},' in payload


def test_the_timeline_cuts_its_segments_to_the_span() -> None:
    timeline = StateTimeline(limit=3)
    timeline.add([StateChange(5.0, "unknown", None)])  # the oldest: dropped by the limit
    timeline.add(
        [
            StateChange(10.0, "running", 1),
            StateChange(20.0, "planned_stop", 3),
            StateChange(30.0, "unplanned_stop", 2),
        ]
    )
    spans = [(s["state"], s["start"], s["end"]) for s in timeline.segments(15.0, 40.0)]
    assert spans == [
        ("running", 15.0, 20.0),
        ("planned_stop", 20.0, 30.0),
        ("unplanned_stop", 30.0, 40.0),
    ]
    assert [(s["state"], s["start"], s["end"]) for s in timeline.segments(25.0, 27.0)] == [
        ("planned_stop", 25.0, 27.0)
    ]
    assert timeline.segments(0.0, 8.0) == []


async def test_the_document_shows_a_bounded_number_of_tags(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(page, "TAGS_SHOWN", 3)
    async with ModbusSimulator(port=0, seed=5, speed=0.0) as sim:
        settings = settings_for(
            tmp_path, config_text(mosquitto, tmp_path / "data", [("press1", sim.port)])
        )
        base = f"http://127.0.0.1:{settings.http.port}/api/page"
        async with running(settings) as runtime:
            await async_wait_until(lambda: runtime.pollers["press1"].polls >= 1, timeout=10)
            every = json.loads(await asyncio.to_thread(read, base))["devices"][0]
            found = json.loads(await asyncio.to_thread(read, f"{base}?filter=TEMP"))["devices"][0]
            by_device = json.loads(await asyncio.to_thread(read, f"{base}?filter=press"))
    assert (every["tags_total"], every["tags_matching"], len(every["tags"])) == (6, 6, 3)
    assert [tag["name"] for tag in found["tags"]] == ["temperature"]
    assert (found["tags_total"], found["tags_matching"]) == (6, 1)
    assert by_device["devices"][0]["tags_matching"] == 6  # the device's name matches


def read(url: str) -> bytes:
    """The body of GET url."""
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
    return body
