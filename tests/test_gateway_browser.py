"""The gateway in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): the operator page,
the browser's own WebSocket, and nexus-client.js resuming after a cut.

Without Chromium or Playwright these tests are skipped, except under CI=true, where they must run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ci_support import in_ci
from nexus.gateway.server import GatewayServer, GatewaySettings

from nexus import Event, EventHandler, Stream, StreamingEventHandler
from nexus.plugins import discover
from nexus.testing import TestServer, run_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
GUARD_MS = 15_000
"""Milliseconds any awaited condition may take before the test fails (a guard, not a measurement)."""

try:
    from playwright.async_api import Browser, Page, async_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    async_playwright = None  # type: ignore[assignment]

EXECUTABLE = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")

_missing = []
if async_playwright is None:
    _missing.append("the playwright package")
if EXECUTABLE is None:
    _missing.append(CHROMIUM)
if _missing and in_ci():
    raise RuntimeError(f"CI is set but {' and '.join(_missing)} is missing: browser tests must run in CI")
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"needs {' and '.join(_missing)}")


class Countdown(StreamingEventHandler):
    """Sends ``n`` chunks ``{"remaining": …}``, ``every`` seconds apart."""

    event_type = "demo:stream_countdown"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        n = int(event.payload.get("n", 3))
        every = float(event.payload.get("every", 0.05))
        for i in range(n, 0, -1):
            await stream.send({"remaining": i})
            await asyncio.sleep(every)


class Echo(EventHandler):
    event_type = "demo:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"echo": event.payload}


@pytest.fixture
async def nexus() -> AsyncIterator[TestServer]:
    """A server with its gateway on a free port, a streaming and a plain handler, 100 ms heartbeats."""
    async with run_server(Countdown(), Echo(), gateway=True, heartbeat_interval=0.1) as server:
        yield server


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium from the system (never a downloaded browser)."""
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=EXECUTABLE,
            args=CHROMIUM_ARGS,
        )
        try:
            yield chromium
        finally:
            await chromium.close()


async def open_page(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """A page at ``url``, collecting its script errors."""
    page = await browser.new_page(viewport={"width": 1440, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(url)
    return page, errors


async def wait_js(page: Page, expression: str) -> None:
    """Wait until ``expression`` is truthy in the page. (Playwright's wait_for_function evaluates strings, which
    the page's Content-Security-Policy rightly forbids; page.evaluate is not subject to it.)"""
    async with asyncio.timeout(GUARD_MS / 1000):
        while not await page.evaluate(expression):  # noqa: ASYNC110 - the page's state, polled
            await asyncio.sleep(0.02)


def page_url(nexus: TestServer) -> str:
    gateway: GatewayServer = nexus.server.gateway
    assert gateway is not None
    return str(gateway.http_url)


async def test_page_connects_and_shows_a_streaming_requests_lifecycle(nexus: TestServer, browser: Browser) -> None:
    """The operator page connects, sends a streaming request from its form and shows the started, stream and
    success rows; a screenshot goes to test-artifacts/."""
    page, errors = await open_page(browser, page_url(nexus))
    await page.wait_for_selector("#status[data-state=connected]", timeout=GUARD_MS)
    await wait_js(page, "document.querySelectorAll('#handler-types option').length === 2")
    await page.fill("#request-type", "demo:stream_countdown:v1:requested")
    await page.fill("#request-payload", json.dumps({"n": 3, "every": 0.15}))
    await page.click("#request-send")

    await page.wait_for_selector("#request-log li[data-state=stream]", timeout=GUARD_MS)
    await page.wait_for_selector("#streams tbody tr", timeout=GUARD_MS)  # the stream is listed while it runs
    await page.wait_for_selector("#request-log li[data-state=success]", timeout=GUARD_MS)
    log_states = await page.eval_on_selector_all(
        "#request-log li[data-state]", "items => items.map(i => i.dataset.state)"
    )
    assert log_states == ["started", "stream", "stream", "stream", "success"]

    await page.wait_for_selector("#events tbody tr[data-state=success]", timeout=GUARD_MS)
    table_states = await page.eval_on_selector_all(
        "#events tbody tr:not([hidden])", "rows => rows.map(r => r.dataset.state).reverse()"
    )
    assert table_states == ["requested", "started", "stream", "stream", "stream", "success"]
    await wait_js(page, "document.querySelector('#streams tbody').children.length === 0")
    await wait_js(page, "Number(document.querySelector('#total').textContent) >= 6")

    # The pattern filter: only matching events are shown from now on.
    await page.fill("#filter", "places:>")
    await page.click("#filter-form button")
    await page.wait_for_selector("#events-empty:not([hidden])", timeout=GUARD_MS)
    await nexus.client.emit("places:encounter:v1:detected", {"agents": [1, 2]})
    await nexus.client.emit("demo:ignored:v1:happened")
    await page.wait_for_selector("#events tbody tr[data-type='places:encounter:v1:detected']:not([hidden])")
    visible = await page.eval_on_selector_all("#events tbody tr:not([hidden])", "rows => rows.map(r => r.dataset.type)")
    assert visible == ["places:encounter:v1:detected"]
    await page.fill("#filter", ">")
    await page.click("#filter-form button")
    await wait_js(page, "document.querySelectorAll('#events tbody tr:not([hidden])').length >= 7")

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "gateway-page.png"), full_page=True)
    assert errors == []


BROWSER_LIFECYCLE = """
async ([url, count]) => {
  const ws = new WebSocket(url, ["nexus.v1"]);
  const frames = [];
  const done = new Promise((resolve, reject) => {
    ws.onmessage = (message) => {
      const frame = JSON.parse(message.data);
      frames.push(frame);
      if (frame.type === "connection") {
        ws.send(JSON.stringify({type: "subscribe", event_types: ["demo:stream_countdown:v1:*"]}));
      } else if (frame.type === "subscribed") {
        ws.send(JSON.stringify({type: "demo:stream_countdown:v1:requested", event_id: "from-browser",
                                payload: {n: count, every: 0.02}}));
      } else if (frame.type.endsWith(":success") || frame.type === "error") {
        resolve();
      }
    };
    ws.onerror = () => reject(new Error("websocket error"));
  });
  await done;
  ws.close();
  return {protocol: ws.protocol, frames};
}
"""


async def test_browser_websocket_subscribes_publishes_and_receives_the_whole_lifecycle(
    nexus: TestServer, browser: Browser
) -> None:
    """Chromium's own WebSocket (offering nexus.v1) subscribes, publishes a streaming request and receives its
    whole lifecycle, each event once."""
    page, errors = await open_page(browser, page_url(nexus))
    result = await page.evaluate(BROWSER_LIFECYCLE, [nexus.ws_url, 4])
    assert result["protocol"] == "nexus.v1"
    frames = result["frames"]
    kinds = [f["type"] for f in frames]
    assert kinds[:3] == ["connection", "subscribed", "published"]
    events = [f for f in frames[3:] if not f["type"].endswith(":heartbeat")]
    assert [f["type"].rsplit(":", 1)[1] for f in events] == [
        "requested",
        "started",
        "stream",
        "stream",
        "stream",
        "stream",
        "success",
    ]
    assert [f["payload"] for f in events if f["type"].endswith(":stream")] == [{"remaining": i} for i in (4, 3, 2, 1)]
    assert all(f["metadata"].get("correlation_id") == "from-browser" for f in events[1:])
    offsets = [f["offset"] for f in events]
    assert offsets == sorted(set(offsets))
    assert errors == []


BROWSER_RESUME = """
async ([url, since, epoch, expect]) => {
  const ws = new WebSocket(url, ["nexus.v1"]);
  const frames = [];
  await new Promise((resolve, reject) => {
    ws.onmessage = (message) => {
      const frame = JSON.parse(message.data);
      frames.push(frame);
      if (frame.type === "connection") {
        const subscribe = {type: "subscribe", event_types: ["demo:>"], since_offset: since};
        if (epoch) subscribe.epoch = epoch;
        ws.send(JSON.stringify(subscribe));
      }
      if (frame.type === "subscribed" && expect === 0) resolve();
      if (frame.type.includes(":") && frames.filter((f) => f.type.includes(":")).length === expect) resolve();
    };
    ws.onerror = () => reject(new Error("websocket error"));
  });
  ws.close();
  return frames;
}
"""


async def test_browser_websocket_resumes_after_a_reconnect(nexus: TestServer, browser: Browser) -> None:
    """A browser that reconnects with its last offset and epoch gets exactly the events it missed, and is told
    recovered: false when history cannot hold the gap (another epoch)."""
    page, errors = await open_page(browser, page_url(nexus))
    await nexus.client.emit("demo:tick:v1:happened", {"n": -1})
    seen = [await nexus.client.emit("demo:tick:v1:happened", {"n": n}) for n in range(3)]
    first = await page.evaluate(BROWSER_RESUME, [nexus.ws_url, seen[0].offset - 1, nexus.bus.epoch, 3])
    assert [f["offset"] for f in first if ":" in f["type"]] == [e.offset for e in seen]
    last = first[-1]["offset"]

    missed = [await nexus.client.emit("demo:tick:v1:happened", {"n": n}) for n in range(3, 8)]
    second = await page.evaluate(BROWSER_RESUME, [nexus.ws_url, last, nexus.bus.epoch, len(missed)])
    subscribed = next(f for f in second if f["type"] == "subscribed")
    assert subscribed["recovered"] is True
    assert second.index(subscribed) < next(i for i, f in enumerate(second) if ":" in f["type"])
    assert [f["offset"] for f in second if ":" in f["type"]] == [e.offset for e in missed]

    gone = await page.evaluate(BROWSER_RESUME, [nexus.ws_url, last, "an-epoch-that-is-gone", 0])
    assert next(f for f in gone if f["type"] == "subscribed")["recovered"] is False
    assert errors == []


JS_CLIENT_RESUME = """
async ([n]) => {
  const nexus = window.nexus;
  const offsets = [];
  nexus.on("event", (event) => { if (event.type === "demo:tick:v1:happened") offsets.push(event.offset); });
  window.__offsets = offsets;
  await new Promise((resolve) => {
    const check = () => (nexus.state === "open" ? resolve() : setTimeout(check, 20));
    check();
  });
  return nexus.connectionId;
}
"""


async def test_nexus_client_js_reconnects_and_resumes_without_loss_or_duplicates(
    nexus: TestServer, browser: Browser
) -> None:
    """nexus-client.js, cut off by the server (4008), reconnects by itself and resumes from its last offset:
    the events published while it was away arrive once, in order."""
    page, errors = await open_page(browser, page_url(nexus))
    await page.wait_for_selector("#status[data-state=connected]", timeout=GUARD_MS)
    first_connection = await page.evaluate(JS_CLIENT_RESUME, [0])
    gateway: GatewayServer = nexus.server.gateway
    assert gateway is not None

    before = [await nexus.client.emit("demo:tick:v1:happened", {"n": n}) for n in range(3)]
    await wait_js(page, "window.__offsets.length === 3")
    for connection in list(gateway.connections.values()):
        connection.close(4008, "too slow: resume from offset 0")
    during = [await nexus.client.emit("demo:tick:v1:happened", {"n": n}) for n in range(3, 6)]
    reconnected = f"window.nexus.connectionId !== {json.dumps(first_connection)} && window.nexus.state === 'open'"
    await wait_js(page, reconnected)
    after = [await nexus.client.emit("demo:tick:v1:happened", {"n": n}) for n in range(6, 8)]
    await wait_js(page, "window.__offsets.length >= 8")
    offsets = await page.evaluate("window.__offsets")
    assert offsets == [e.offset for e in before + during + after]
    assert await page.evaluate("window.nexus.recovered") is True
    assert errors == []


JS_CLIENT_LIVE_START = """
([url]) => {
  const client = new NexusClient(url, { patterns: ["demo:cut:>"], reconnect: false });
  const state = { client, offsets: [], subscribed: 0 };
  client.on("event", (event) => state.offsets.push(event.offset));
  client.on("subscribed", () => { state.subscribed += 1; });
  window.__cut = state;
  client.connect();
}
"""


async def test_nexus_client_js_cut_off_before_any_event_resumes_after_the_head_it_went_live_at(
    nexus: TestServer, browser: Browser
) -> None:
    """A client that subscribed live and was cut off before anything arrived subscribes again, on its next
    connection, after the head it went live at: what was stored meanwhile arrives, and nothing from before."""
    await nexus.client.emit("demo:cut:v1:before")
    page, errors = await open_page(browser, page_url(nexus))
    await page.evaluate(JS_CLIENT_LIVE_START, [nexus.ws_url])
    await wait_js(page, "window.__cut.subscribed === 1")
    gateway: GatewayServer = nexus.server.gateway
    assert gateway is not None
    connection_id = await page.evaluate("window.__cut.client.connectionId")
    gateway.connections[connection_id].close(1001, "going away")
    await wait_js(page, "window.__cut.client.state === 'closed'")
    during = [await nexus.client.emit("demo:cut:v1:happened", {"n": n}) for n in (1, 2)]
    await page.evaluate("window.__cut.client.connect()")
    await wait_js(page, "window.__cut.offsets.length >= 2")
    assert await page.evaluate("window.__cut.offsets") == [e.offset for e in during]
    assert await page.evaluate("window.__cut.client.recovered") is True
    assert errors == []


OTHER_ORIGIN_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>another site</title></head><body>
<script>
  const result = { opened: false, error: false, closed: null, frames: [] };
  window.result = result;
  const target = new URLSearchParams(location.search).get("ws");
  const ws = new WebSocket(target, ["nexus.v1"]);
  ws.onopen = () => { result.opened = true; };
  ws.onmessage = (message) => { result.frames.push(JSON.parse(message.data)); };
  ws.onerror = () => { result.error = true; };
  ws.onclose = (event) => { result.closed = event.code; };
</script>
</body></html>
"""


@contextlib.asynccontextmanager
async def page_server(host: str, body: bytes) -> AsyncIterator[str]:
    """A tiny HTTP server on ``host`` (a free port) answering every GET with ``body``; yields its origin."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            head = f"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {len(body)}\r\nConnection: close"
            writer.write(head.encode() + b"\r\n\r\n" + body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, host, 0)
    try:
        yield f"http://{host}:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def test_a_page_on_another_origin_cannot_open_the_websocket(nexus: TestServer, browser: Browser) -> None:
    """A page served from http://127.0.0.2:<port> (another origin for Chromium) gets no WebSocket to the
    gateway (the handshake is refused: error, close 1006, never open), while the gateway's own page connects;
    the same page connects once its origin is in ws_allowed_origins."""
    gateway: GatewayServer = nexus.server.gateway
    async with page_server("127.0.0.2", OTHER_ORIGIN_PAGE) as origin:
        other, errors = await open_page(browser, f"{origin}/?ws={gateway.url}")
        await wait_js(other, "window.result.closed !== null || window.result.frames.length > 0")
        result = await other.evaluate("window.result")
        assert result == {"opened": False, "error": True, "closed": 1006, "frames": []}
        assert gateway.stats.origin_refused == 1
        assert gateway.stats.connections_total == 0
        assert errors == []

        own, own_errors = await open_page(browser, page_url(nexus))
        await own.wait_for_selector("#status[data-state=connected]", timeout=GUARD_MS)
        assert own_errors == []

        allowing = GatewayServer(
            nexus.server.node, GatewaySettings(host="127.0.0.1", port=0, allowed_origins=("http://127.0.0.2:*",))
        )
        await allowing.start()
        try:
            allowed, _ = await open_page(browser, f"{origin}/?ws={allowing.url}")
            await wait_js(allowed, "window.result.frames.length > 0")
            result = await allowed.evaluate("window.result")
            assert result["opened"] is True
            assert result["frames"][0]["type"] == "connection"
        finally:
            await allowing.stop(grace=1.0)


async def open_catalogue(page: Page) -> Any:
    """Click the page's AsyncAPI link and read the JSON document the new tab shows."""
    async with page.context.expect_page(timeout=GUARD_MS) as opened:
        await page.click("#asyncapi-link")
    tab = await opened.value
    await tab.wait_for_load_state()
    text = await tab.text_content("body")
    await tab.close()
    return json.loads(text or "null")


async def test_the_page_links_the_event_catalogue(nexus: TestServer, browser: Browser) -> None:
    """The page's AsyncAPI link opens the gateway's AsyncAPI document, which describes this server's handlers."""
    page, errors = await open_page(browser, page_url(nexus))
    document = await open_catalogue(page)
    assert document["asyncapi"] == "3.0.0"
    assert document["servers"]["gateway"]["host"] == f"127.0.0.1:{nexus.server.ws_port}"
    assert {"demo.stream_countdown.v1.requested", "demo.echo.v1.requested"} <= set(document["components"]["messages"])
    assert errors == []


async def test_with_authentication_on_the_page_takes_a_token_from_its_url(browser: Browser) -> None:
    """With a JWT secret set, the page opened with ?token=…&pattern=demo:> connects as that user, takes the token
    out of the address bar, lists its handlers, shows events and opens the event catalogue; opened without a token
    it says it was refused."""
    from nexus.auth import mint_token
    from nexus.client import NexusClient

    secret = "browser-secret-" + "z" * 32
    async with run_server(Countdown(), Echo(), gateway=True, jwt_secret=secret) as nexus:
        alice = mint_token(secret, "alice", publish=["demo:>"], subscribe=["demo:>"])
        page, errors = await open_page(browser, f"{page_url(nexus)}?token={alice}&pattern=demo:%3E")
        await page.wait_for_selector("#status[data-state=connected]", timeout=GUARD_MS)
        assert "token" not in page.url
        assert page.url.endswith("?pattern=demo%3A%3E")
        await wait_js(page, "document.querySelectorAll('#handler-types option').length === 2")
        async with NexusClient(nexus.address, token=alice) as client:
            await client.emit("demo:seen:v1:happened", {})
        await page.wait_for_selector("#events tbody tr[data-type='demo:seen:v1:happened']", timeout=GUARD_MS)
        # The event catalogue needs the token too: the link fetches it with the token and shows it.
        document = await open_catalogue(page)
        assert document["asyncapi"] == "3.0.0"
        assert "demo.stream_countdown.v1.requested" in document["components"]["messages"]
        assert errors == []

        anonymous, _ = await open_page(browser, page_url(nexus))
        await wait_js(anonymous, "document.getElementById('status-text').textContent === 'refused'")


async def test_handlers_view_shows_rates_failures_run_times_and_slow_consumers(
    nexus: TestServer, browser: Browser
) -> None:
    """The page's Handlers panel, fed by `/api/metrics`, lists each handler that ran with its requests/s, failure
    rate and p50 / p99 run time, and the slow-consumer disconnects."""
    for _ in range(4):
        await nexus.client.call("demo:echo:v1:requested", {"n": 1})
    page, errors = await open_page(browser, page_url(nexus))
    echo = "#handlers tbody tr[data-handler$=':Echo'] td"
    await page.wait_for_selector(echo, timeout=GUARD_MS)
    rate_shown = "document.querySelector(`#handlers tr[data-handler$=':Echo'] td.rate`).textContent !== '\\u2013'"
    await wait_js(page, rate_shown)
    cells = await page.eval_on_selector_all(echo, "cells => cells.map(c => c.textContent)")
    name, rate, failed, p50, p99, active, runs = cells
    assert name.endswith(":Echo")
    assert float(rate) > 0
    assert failed == "0%"
    assert p50.endswith(" ms")
    assert p99.endswith(" ms")
    assert active == "0"
    assert runs == "in-process"  # the listing says nothing of where it runs: in this process
    # A handler that has not run yet is listed too, with nothing to report.
    idle = await page.eval_on_selector_all(
        "#handlers tbody tr[data-handler$=':Countdown'] td", "cells => cells.map(c => c.textContent)"
    )
    assert idle[1:] == ["0", "0%", "0.0 ms", "0.0 ms", "0", "in-process"]
    assert await page.is_hidden("#handlers-empty")
    assert await page.text_content("#slow-consumers") == "0"
    assert errors == []


async def test_handlers_view_shows_where_each_handler_runs(nexus: TestServer, browser: Browser) -> None:
    """When the handler listing reports `location` and `workers`, the Handlers panel shows them (remote
    handlers with their worker count); a handler without them runs in-process."""
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    listing = [
        {"name": "demo.echo", "event_type": "demo:echo", "streaming": False, "location": "remote", "workers": 3},
        {"name": "demo.one", "event_type": "demo:one", "streaming": False, "location": "pool", "workers": 1},
        {"name": "demo.local", "event_type": "demo:local", "streaming": True},
    ]
    await page.route("**/api/handlers", lambda route: route.fulfill(json=listing))
    await page.goto(page_url(nexus))
    await wait_js(page, "document.querySelectorAll('#handlers tbody tr').length >= 3")
    runs = await page.eval_on_selector_all(
        "#handlers tbody tr", "rows => Object.fromEntries(rows.map(r => [r.dataset.handler, r.lastChild.textContent]))"
    )
    assert runs == {"demo.echo": "remote · 3 workers", "demo.local": "in-process", "demo.one": "pool · 1 worker"}
    await assert_fits(page, "handlers-remote")


# --- the page's layout, history and request form, at a desktop and a phone width ---------------------------------

WIDE = {"width": 1400, "height": 900}
PHONE = {"width": 390, "height": 844}
SMALLEST = {"width": 360, "height": 740}

OVERFLOW = r"""
() => {
  // Every visible element lies within its panel horizontally (or within the nearest element inside the panel
  // that clips it); only .table-scroll may scroll sideways, and the page itself never does.
  const problems = [];
  const describe = (e) => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") +
    (e.className && typeof e.className === "string" ? "." + e.className.trim().split(/\s+/).join(".") : "");
  const clips = (e) => getComputedStyle(e).overflowX !== "visible";
  for (const panel of document.querySelectorAll(".panel, .stat, .topbar, .notice:not([hidden])")) {
    const panelRect = panel.getBoundingClientRect();
    for (const e of panel.querySelectorAll("*")) {
      const rect = e.getBoundingClientRect();
      if (rect.width === 0 && rect.height === 0) continue;
      let bound = panel;
      for (let a = e.parentElement; a && a !== panel; a = a.parentElement) {
        if (clips(a)) { bound = a; break; }
      }
      if (bound.classList.contains("table-scroll")) continue;
      const b = bound === panel ? panelRect : bound.getBoundingClientRect();
      if (rect.left < b.left - 1 || rect.right > b.right + 1) {
        problems.push(`${describe(e)} [${Math.round(rect.left)}, ${Math.round(rect.right)}] outside ` +
          `${describe(bound)} [${Math.round(b.left)}, ${Math.round(b.right)}]`);
      }
      const style = getComputedStyle(e);
      if (["auto", "scroll"].includes(style.overflowX) && !e.classList.contains("table-scroll") &&
          e.scrollWidth > e.clientWidth + 1) {
        problems.push(`${describe(e)} scrolls sideways (${e.scrollWidth} > ${e.clientWidth})`);
      }
      if (style.overflowX === "visible" && e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1) {
        problems.push(`${describe(e)}: its content (${e.scrollWidth} px) is wider than it (${e.clientWidth} px)`);
      }
    }
  }
  if (document.documentElement.scrollWidth > window.innerWidth) {
    problems.push(`the page scrolls sideways (${document.documentElement.scrollWidth} > ${window.innerWidth})`);
  }
  const rate = document.getElementById("rate").getBoundingClientRect();
  const spark = document.getElementById("spark").getBoundingClientRect();
  if (spark.width > 0 && spark.left < rate.right && rate.left < spark.right && spark.top < rate.bottom &&
      rate.top < spark.bottom) {
    problems.push("the sparkline overlaps the events/s figure");
  }
  return problems;
}
"""


def artifact(name: str) -> Path:
    """Where a screenshot goes (test-artifacts/, git-ignored); the path is printed."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    print(f"screenshot: {path}")
    return path


async def assert_fits(page: Page, name: str) -> None:
    """No element of the page spills out of its panel (see OVERFLOW); a full-page screenshot is saved first."""
    await page.screenshot(path=str(artifact(name)), full_page=True)
    assert await page.evaluate(OVERFLOW) == []


@pytest.fixture
async def built_in() -> AsyncIterator[TestServer]:
    """A server with the built-in plugins (as `nexus serve` loads them) and its gateway."""
    async with run_server(*discover(True, (), ()), gateway=True, heartbeat_interval=0.2) as server:
        yield server


async def open_at(browser: Browser, nexus: TestServer, viewport: dict[str, int]) -> tuple[Page, list[str]]:
    page = await browser.new_page(viewport=viewport)  # type: ignore[arg-type]
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(page_url(nexus))
    await page.wait_for_selector("#status[data-state=connected]", timeout=GUARD_MS)
    return page, errors


async def test_the_page_shows_the_last_events_on_load(nexus: TestServer, browser: Browser) -> None:
    """Opened after 60 events were stored, the page shows the last 50 of them (replayed, not counted in the
    rate) and the last offset; events published afterwards are added live above them."""
    stored = [await nexus.client.emit("demo:tick:v1:happened", {"n": n}) for n in range(60)]
    page, errors = await open_at(browser, nexus, WIDE)
    await wait_js(page, "document.querySelectorAll('#events tbody tr').length === 50")
    offsets = await page.eval_on_selector_all("#events tbody tr", "rows => rows.map(r => Number(r.dataset.offset))")
    assert offsets == [e.offset for e in reversed(stored[10:])]
    assert await page.text_content("#offset") == str(stored[-1].offset)
    assert await page.is_hidden("#events-empty")
    assert await page.text_content("#rate") == "0.0"
    assert await page.is_hidden("#notice")

    live = await nexus.client.emit("demo:tick:v1:happened", {"n": 60})
    await wait_js(page, f"document.querySelector('#events tbody tr').dataset.offset === '{live.offset}'")
    assert await page.eval_on_selector("#events tbody tr", "row => row.className") == "fresh"
    assert await page.text_content("#offset") == str(live.offset)
    assert errors == []


async def test_a_page_opened_on_a_young_history_shows_all_of_it(nexus: TestServer, browser: Browser) -> None:
    """With fewer stored events than the page replays, it shows every one, from offset 1."""
    stored = [await nexus.client.emit("demo:tick:v1:happened", {"n": n}) for n in range(3)]
    page, errors = await open_at(browser, nexus, PHONE)
    await wait_js(page, "document.querySelectorAll('#events tbody tr').length === 3")
    offsets = await page.eval_on_selector_all("#events tbody tr", "rows => rows.map(r => Number(r.dataset.offset))")
    assert offsets == [3, 2, 1] == [e.offset for e in reversed(stored)]
    assert errors == []


async def test_the_form_starts_with_a_handler_example_whose_first_send_succeeds(
    built_in: TestServer, browser: Browser
) -> None:
    """With the built-in plugins, the form opens on a handler's declared example and its first Send ends in
    success; choosing another handler fills its request type and example, which succeeds too."""
    page, errors = await open_at(browser, built_in, WIDE)
    await wait_js(page, "document.querySelectorAll('#request-handler option').length > 10")
    first_type = await page.input_value("#request-type")
    classes = built_in.server.node.handler_classes().values()
    examples = {cls.takes.event_type: dict(cls.takes.example) for cls in classes if cls.takes is not None}
    assert first_type in examples
    assert json.loads(await page.input_value("#request-payload")) == examples[first_type]
    await page.click("#request-send")
    await page.wait_for_selector("#request-log li[data-state=success]", timeout=GUARD_MS)
    assert await page.query_selector("#request-log li[data-state=failed]") is None

    await page.select_option("#request-handler", "messaging.send_message")
    assert await page.input_value("#request-type") == "messaging:send_message:v1:requested"
    example = examples["messaging:send_message:v1:requested"]
    assert json.loads(await page.input_value("#request-payload")) == example
    await page.click("#request-send")
    await page.wait_for_selector("#request-log li[data-state=success]", timeout=GUARD_MS)
    assert await page.query_selector("#request-log li[data-state=failed]") is None

    # A payload the user wrote is kept when the type is typed by hand.
    await page.fill("#request-payload", '{"agent_id": "mine"}')
    await page.fill("#request-type", "places:agent_state:v1:requested")
    assert await page.input_value("#request-handler") == "places.agent_state"
    assert json.loads(await page.input_value("#request-payload")) == {"agent_id": "mine"}
    assert errors == []


@pytest.mark.parametrize("viewport", [WIDE, PHONE, SMALLEST], ids=["1400px", "390px", "360px"])
async def test_nothing_spills_out_of_its_panel(
    built_in: TestServer, browser: Browser, viewport: dict[str, int]
) -> None:
    """At 1,400, 390 and 360 px, with long event types and payloads, a live stream and its log, no element
    overflows its panel, the page never scrolls sideways, the sparkline stays clear of the figure, and the
    events table keeps its type and payload readable."""
    long_payload = {"text": "a long payload " * 30, "nested": {"values": list(range(40))}}
    for n in range(8):
        await built_in.client.emit("messaging:conversation_with_a_long_name:v1:updated", {**long_payload, "n": n})
    page, errors = await open_at(browser, built_in, viewport)
    await wait_js(page, "document.querySelectorAll('#events tbody tr').length >= 8")
    await page.select_option("#request-handler", "messaging.stream_messages")
    await page.click("#request-send")
    await page.wait_for_selector("#request-log li[data-state=started]", timeout=GUARD_MS)
    await page.wait_for_selector("#streams tbody tr", timeout=GUARD_MS)
    await wait_js(page, "document.querySelectorAll('#handlers tbody tr').length > 10")
    for n in range(30):
        await built_in.client.emit("analytics:tick:v1:happened", {"n": n})
    await wait_js(page, "Number(document.querySelector('#offset').textContent) >= 38")

    name = f"page-{viewport['width']}px"
    await assert_fits(page, name)
    cells = await page.eval_on_selector_all(
        "#events tbody tr:not([hidden])",
        "rows => Object.fromEntries([...rows[0].cells].map(c => [c.className, c.getBoundingClientRect().width]))",
    )
    assert min(cells["type"], cells["payload"]) >= 80, cells
    assert min(cells["state"], cells["offset"]) > 0, cells
    await page.click("#request-cancel")
    await page.wait_for_selector("#request-log li[data-state=cancelled]", timeout=GUARD_MS)
    assert errors == []


GEOMETRY = """
() => {
  const log = document.getElementById("request-log");
  const rows = document.querySelectorAll("#streams tbody tr");
  return {
    innerHeight: window.innerHeight,
    logHeight: log.getBoundingClientRect().height,
    logScrolls: log.scrollHeight > log.clientHeight,
    thirdRowBottom: rows[2].getBoundingClientRect().bottom,
    sendBottom: document.getElementById("request-send").getBoundingClientRect().bottom,
  };
}
"""


async def test_active_streams_stay_in_view_after_many_requests(browser: Browser) -> None:
    """At 1,400 x 900, after twelve streams were started from the form and the log holds many chunks, the Active
    streams panel shows its first rows inside the window, the Send button is still in view, and the request log
    has scrolled within its bounded height."""
    async with run_server(Countdown(), gateway=True) as nexus:
        page, errors = await open_at(browser, nexus, WIDE)
        await page.select_option("#request-handler", "test_gateway_browser:Countdown")
        await page.fill("#request-payload", json.dumps({"n": 400, "every": 0.25}))
        for n in range(1, 13):
            await page.click("#request-send")
            await wait_js(page, f"document.querySelectorAll('#streams tbody tr').length === {n}")
        await wait_js(page, "document.querySelectorAll('#request-log li[data-state=stream]').length >= 20")
        await page.screenshot(path=str(artifact("streams-after-many-requests")))
        geometry = await page.evaluate(GEOMETRY)
        lines = await page.eval_on_selector_all(
            "#request-log li[data-state]", "items => items.map(i => [i.dataset.state, i.lastChild.textContent])"
        )
        await page.close()
    assert geometry["logScrolls"]
    assert geometry["logHeight"] <= 230
    assert geometry["thirdRowBottom"] <= geometry["innerHeight"], geometry
    assert geometry["sendBottom"] <= geometry["innerHeight"], geometry
    # The log follows the latest request only: one `started`, then its own chunks, counting down from 400.
    assert [state for state, _ in lines].count("started") == 1
    remaining = [json.loads(text)["remaining"] for state, text in lines if state == "stream"]
    assert remaining == list(range(400, 400 - len(remaining), -1))
    assert errors == []
