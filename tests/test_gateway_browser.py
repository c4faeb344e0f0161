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


async def test_with_authentication_on_the_page_takes_a_token_from_its_url(browser: Browser) -> None:
    """With a JWT secret set, the page opened with ?token=…&pattern=demo:> connects as that user, takes the token
    out of the address bar, lists its handlers and shows events; opened without a token it says it was refused."""
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
    await page.wait_for_selector("#handlers tbody tr", timeout=GUARD_MS)
    cells = await page.eval_on_selector_all("#handlers tbody tr td", "cells => cells.map(c => c.textContent)")
    name, rate, failed, p50, p99, active = cells[:6]
    assert name.endswith(":Echo")
    assert float(rate) > 0
    assert failed == "0%"
    assert p50.endswith(" ms")
    assert p99.endswith(" ms")
    assert active == "0"
    assert await page.is_hidden("#handlers-empty")
    assert await page.text_content("#slow-consumers") == "0"
    assert errors == []
