"""The Origin check against cross-site WebSocket hijacking: the pure policy, then raw clients sending Origin
headers to ``/ws``, ``/sse`` and the JSON listings. (A page of another origin in Chromium is in
tests/test_gateway_browser.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from nexus.gateway.server import GatewayServer
from test_sse import SseClient, sse
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from nexus.config import ConfigError, load_settings
from nexus.origins import DEFAULT_ALLOWED_ORIGINS, OriginPolicy, check_allowed_origin
from nexus.testing import TestServer, run_server

GUARD = 15.0
NEXUS_V1 = [Subprotocol("nexus.v1")]


# --- the policy (pure) -------------------------------------------------------------------------------------------


def test_default_policy_allows_no_origin_localhost_and_its_own_origin_only() -> None:
    """Programs (no Origin), pages on localhost ports and the gateway's own page pass; other sites and null do not."""
    policy = OriginPolicy()
    host = "nexus.internal:8080"
    assert policy.refusal([], host) is None
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "http://[::1]:8080", "https://localhost"):
        assert policy.refusal([origin], host) is None, origin
    assert policy.refusal(["http://nexus.internal:8080"], host) is None
    assert policy.refusal(["HTTP://Nexus.Internal:8080"], host) is None
    for origin in ("https://evil.example", "http://nexus.internal:8081", "https://nexus.internal:8080", "null"):
        assert policy.refusal([origin], host) is not None, origin
    assert policy.refusal(["http://127.0.0.2:8000"], "127.0.0.1:8080") is not None
    assert policy.refusal(["null"], "127.0.0.1:8080") == "an opaque origin (null) may not use this gateway"
    assert policy.refusal(["http://localhost:1", "http://localhost:2"], host) is not None
    assert policy.refusal(["not an origin"], host) is not None


def test_own_origin_follows_the_scheme_and_default_ports() -> None:
    """A TLS gateway's own page is https://host; a Host without a port means the scheme's default port."""
    tls = OriginPolicy((), scheme="https")
    assert tls.refusal(["https://nexus.example.com"], "nexus.example.com") is None
    assert tls.refusal(["https://nexus.example.com:443"], "nexus.example.com") is None
    assert tls.refusal(["http://nexus.example.com"], "nexus.example.com") is not None
    assert OriginPolicy(()).refusal(["http://localhost:3000"], "nexus.example.com") is not None


def test_configured_entries_replace_the_defaults_and_star_allows_everything() -> None:
    """An explicit list is the whole allowlist (besides the gateway's own origin); '*' turns the check off."""
    policy = OriginPolicy(["https://app.example.com", "http://dev.example.com:*"])
    assert policy.refusal(["https://app.example.com"], "gw:8080") is None
    assert policy.refusal(["https://app.example.com:443"], "gw:8080") is None
    assert policy.refusal(["https://app.example.com:8443"], "gw:8080") is not None
    assert policy.refusal(["http://dev.example.com:1234"], "gw:8080") is None
    assert policy.refusal(["http://localhost:3000"], "gw:8080") is not None
    anything = OriginPolicy(["*"])
    assert anything.refusal(["https://evil.example"], "gw:8080") is None
    assert anything.refusal(["null"], "gw:8080") is None


@pytest.mark.parametrize(
    "entry", ["example.com", "ftp://example.com", "https://example.com/path", "https://user@example.com", "http://:80"]
)
def test_entries_that_are_no_origins_are_refused(entry: str) -> None:
    """An allowlist entry must be scheme://host[:port|:*] or *."""
    with pytest.raises(ValueError, match="is not an origin"):
        check_allowed_origin(entry)


def test_the_setting_from_flags_and_environment() -> None:
    """--ws-allowed-origin may repeat and carry comma-separated lists; a bad entry names the flag."""
    settings = load_settings(None, {}, {"ws_allowed_origins": ["https://a.example", "https://b.example, http://c:*"]})
    assert settings.ws_allowed_origins == ["https://a.example", "https://b.example", "http://c:*"]
    assert load_settings(None, {}, {}).ws_allowed_origins == list(DEFAULT_ALLOWED_ORIGINS)
    with pytest.raises(ConfigError, match="--ws-allowed-origin"):
        load_settings(None, {}, {"ws_allowed_origins": ["https://a.example/app"]})
    with pytest.raises(ConfigError, match="NEXUS_WS_ALLOWED_ORIGINS"):
        load_settings(None, {"NEXUS_WS_ALLOWED_ORIGINS": "evil"}, {})


# --- the gateway ---------------------------------------------------------------------------------------------------


@pytest.fixture
async def nexus() -> AsyncIterator[TestServer]:
    """A server with its gateway on a free port and the default allowlist."""
    async with run_server(gateway=True) as server:
        yield server


def gateway_of(server: TestServer) -> GatewayServer:
    gateway = server.server.gateway
    assert isinstance(gateway, GatewayServer)
    return gateway


async def handshake(url: str, origin: str | None, **kwargs: Any) -> dict[str, Any]:
    """Open a WebSocket with ``origin`` (None: no Origin header) and return its connection frame."""
    wanted = Origin(origin) if origin is not None else None
    async with connect(url, subprotocols=NEXUS_V1, open_timeout=GUARD, origin=wanted, **kwargs) as ws:
        async with asyncio.timeout(GUARD):
            frame: dict[str, Any] = json.loads(await ws.recv())
        return frame


async def refused(url: str, origin: str | None = None, **kwargs: Any) -> InvalidStatus:
    wanted = Origin(origin) if origin is not None else None
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, subprotocols=NEXUS_V1, open_timeout=GUARD, origin=wanted, **kwargs):
            pass
    return caught.value


async def test_websocket_without_origin_or_from_an_allowed_origin_connects(nexus: TestServer) -> None:
    """A program (no Origin), a localhost page and the gateway's own page all get the connection frame."""
    gateway = gateway_of(nexus)
    own = gateway.http_url.rstrip("/")
    for origin in (None, "http://localhost:3000", own):
        frame = await handshake(gateway.url, origin)
        assert frame["type"] == "connection", origin
        assert frame["status"] == "connected", origin
    assert gateway.stats.origin_refused == 0


async def test_websocket_from_another_site_or_null_is_refused_with_403_before_the_upgrade(nexus: TestServer) -> None:
    """Origin https://evil.example, null, and two Origin headers: 403 with a short text body, no connection."""
    gateway = gateway_of(nexus)
    for origin in ("https://evil.example", "null", "http://127.0.0.2:8000"):
        error = await refused(gateway.url, origin)
        assert error.response.status_code == 403, origin
        assert error.response.headers["Content-Type"].startswith("text/plain")
        assert b"forbidden" in error.response.body
    two = Headers([("Origin", "http://localhost:1"), ("Origin", "http://localhost:2")])
    error = await refused(gateway.url, additional_headers=two)
    assert error.response.status_code == 403
    assert gateway.stats.origin_refused == 4
    assert gateway.stats.connections_total == 0


async def test_refused_origins_are_warned_about_at_a_bounded_rate(nexus: TestServer) -> None:
    """Each refusal is a warning naming the origin, at most 5 lines per window however many pages try."""
    gateway = gateway_of(nexus)
    with structlog.testing.capture_logs() as logs:
        for _ in range(8):
            await refused(gateway.url, "https://evil.example")
    warnings = [line for line in logs if line["event"] == "gateway_origin_refused"]
    assert len(warnings) == 5
    assert all(line["log_level"] == "warning" and line["origin"] == "https://evil.example" for line in warnings)
    assert gateway.stats.origin_refused == 8


async def test_sse_and_the_listings_check_the_origin_too(nexus: TestServer) -> None:
    """/sse and /api/streams answer 403 to another site's page, and go on for no Origin or an allowed one."""
    port = gateway_of(nexus).port
    async with sse(port, "/sse?patterns=demo:>", {"Origin": "https://evil.example"}) as client:
        assert client.status == 403
        assert b"forbidden" in await client.body()
    async with sse(port, "/sse?patterns=demo:>", {"Origin": "http://localhost:3000"}) as client:
        assert client.status == 200
        assert (await client.message()).json["type"] == "subscribed"
    for origin, status in (("https://evil.example", 403), ("null", 403), ("http://127.0.0.1:9", 200)):
        client = await SseClient.open(port, "/api/streams", {"Origin": origin})
        try:
            assert client.status == status, origin
        finally:
            await client.close()


async def test_an_explicit_allowlist_replaces_the_localhost_defaults() -> None:
    """With ws_allowed_origins=[https://app.example.com], a localhost page is refused, that site and the
    gateway's own page connect; with '*', any page does."""
    async with run_server(gateway=True, ws_allowed_origins=["https://app.example.com"]) as server:
        gateway = gateway_of(server)
        assert (await refused(gateway.url, "http://localhost:3000")).response.status_code == 403
        assert (await handshake(gateway.url, "https://app.example.com"))["type"] == "connection"
        assert (await handshake(gateway.url, gateway.http_url.rstrip("/")))["type"] == "connection"
    async with run_server(gateway=True, ws_allowed_origins=["*"]) as server:
        gateway = gateway_of(server)
        assert (await handshake(gateway.url, "https://evil.example"))["type"] == "connection"
