"""Metrics: the Prometheus endpoint, what moves under traffic, health and readiness, the page's handlers view."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import sys
import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from nats_support import delete_stream, nats_settings, shared_nats_url, unique_names
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from nexus import Event, EventHandler
from nexus.auth import mint_token
from nexus.errors import InvalidArgument, PermissionDenied
from nexus.telemetry import Telemetry
from nexus.testing import TestServer, run_server
from nexus.v1 import nexus_pb2

GUARD = 10.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Echo(EventHandler):
    event_type = "demo:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"echo": event.payload}


class Boom(EventHandler):
    event_type = "demo:boom"

    async def handle(self, event: Event) -> dict[str, Any]:
        raise RuntimeError("kaboom")


class Sleepy(EventHandler):
    event_type = "demo:sleepy"
    stream_timeout = 0.2

    async def handle(self, event: Event) -> dict[str, Any]:
        await asyncio.sleep(5)
        return {}


async def http_get(port: int, path: str, headers: str = "") -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 GET: status, headers (lower-cased names) and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}Connection: close\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(GUARD):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    found = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), found, body


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by name and labels (fails if the text does not parse)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape(port: int) -> Samples:
    status, headers, body = await http_get(port, "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    return parse(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(GUARD):
        while not condition():  # noqa: ASYNC110 - server-side state that offers no event to wait on
            await asyncio.sleep(0.01)


@pytest.fixture
async def nexus() -> AsyncIterator[TestServer]:
    async with run_server(Echo(), Boom(), Sleepy(), gateway=True, subscriber_queue=20) as server:
        yield server


async def stall_a_websocket(nexus: TestServer) -> None:
    """A WebSocket subscriber that reads nothing while big events pile up: the gateway cuts it off (4008)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", nexus.server.ws_port))
    url = f"ws://127.0.0.1:{nexus.server.ws_port}/ws"
    async with connect(url, sock=sock, subprotocols=["nexus.v1"], max_queue=1, ping_interval=None) as ws:  # type: ignore[list-item]
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "subscribe", "event_types": ["load:>"]}))
        async with asyncio.timeout(GUARD):
            json.loads(await ws.recv())
        for n in range(700):  # past the socket's outbox (16 MiB)
            await nexus.server.node.publish(Event("load:tick:v1:happened", {"blob": "x" * 30_000, "n": n}))
            if n % 20 == 19:
                await asyncio.sleep(0)
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(GUARD):
                while True:
                    await ws.recv()
        assert ws.close_code == 4008


async def test_metrics_parse_as_prometheus_text_and_move_with_traffic(nexus: TestServer) -> None:
    """Under requests that succeed, fail and time out, publishes over WebSocket, a refused publish and a stalled
    WebSocket, every metric on `/metrics` moves: sent, consumed, run times by outcome, failures by error type,
    refusals by code, publish and delivery latency, slow-consumer disconnects, connections, streams, history."""
    port = nexus.server.ws_port
    before = await scrape(port)
    assert value(before, "messaging_client_sent_messages_total") == 0

    assert (await nexus.client.call("demo:echo:v1:requested", {"n": 1})).event_type.endswith(":success")
    assert (await nexus.client.call("demo:boom:v1:requested", {})).event_type.endswith(":failed")
    assert (await nexus.client.call("demo:sleepy:v1:requested", {})).event_type.endswith(":timeout")
    await nexus.client.emit("chat:said:v1:happened", {"text": "hi"})
    with pytest.raises(PermissionDenied):
        await nexus.client.emit("demo:echo:v1:success", {})
    with pytest.raises(InvalidArgument):
        await nexus.client.emit("not an event type", {})
    async with connect(f"ws://127.0.0.1:{port}/ws", subprotocols=["nexus.v1"]) as ws:  # type: ignore[list-item]
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "subscribe", "event_types": ["chat:>"]}))
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "chat:said:v1:happened", "payload": {"n": 2}, "ref": "p1"}))
        async with asyncio.timeout(GUARD):
            while json.loads(await ws.recv())["type"] != "chat:said:v1:happened":
                pass
        await ws.send(json.dumps({"type": "no such frame"}))  # refused: an error frame, not a publish
        # A gRPC client with a subscription open is a connection; an /sse request refused is counted.
        grpc_sub = nexus.client.stub.SubscribeEvents(nexus_pb2.SubscribeRequest(event_types=["chat:>"]))
        await grpc_sub.initial_metadata()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /sse?patterns=Bad HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        async with asyncio.timeout(GUARD):
            assert b" 400 " in await reader.readuntil(b"\r\n")
        writer.close()
        during = await scrape(port)
        assert value(during, "nexus_connections_active", nexus_transport="websocket") == 1
        assert value(during, "nexus_connections_active", nexus_transport="grpc") == 1
        assert value(during, "nexus_refused_total", error_type="invalid_pattern", nexus_transport="sse") == 1
        grpc_sub.cancel()
    await stall_a_websocket(nexus)
    after = await scrape(port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Events accepted, by the service token (bounded: a service no handler serves is "other") and transport.
    assert (
        moved("messaging_client_sent_messages_total", messaging_destination_service="other", nexus_transport="grpc")
        == 1
    )
    assert moved("messaging_client_sent_messages_total", nexus_transport="websocket") == 1
    # Requests are sent messages too (three RequestEvent calls to the handled service "demo").
    assert (
        moved("messaging_client_sent_messages_total", messaging_destination_service="demo", nexus_transport="grpc")
        == 3
    )
    assert moved("messaging_client_sent_messages_total", messaging_system="nexus") >= 702
    assert moved("messaging_client_operation_duration_seconds_count", nexus_transport="grpc") >= 1
    # Handler runs by outcome, failures by error type.
    for outcome in ("success", "failed", "timeout"):
        assert (
            moved(
                "messaging_process_duration_seconds_count",
                nexus_handler="test_telemetry:Echo"
                if outcome == "success"
                else "test_telemetry:Boom"
                if outcome == "failed"
                else "test_telemetry:Sleepy",
                nexus_outcome=outcome,
            )
            == 1
        ), outcome
    assert moved("nexus_handler_failures_total", nexus_handler="test_telemetry:Boom", error_type="handler_error") == 1
    assert moved("nexus_handler_failures_total", nexus_handler="test_telemetry:Sleepy", error_type="timeout") == 1
    assert moved("nexus_refused_total", error_type="permission_denied", nexus_transport="grpc") == 1
    assert moved("nexus_refused_total", error_type="invalid_argument", nexus_transport="grpc") == 1
    assert moved("nexus_refused_total", nexus_transport="websocket") == 1  # the bad frame, counted once
    # Deliveries, their latency, the stalled socket, the history.
    assert moved("messaging_client_consumed_messages_total", nexus_transport="websocket") >= 2
    assert moved("nexus_delivery_latency_seconds_count") >= 1
    assert moved("nexus_slow_consumer_disconnects_total", nexus_transport="websocket") == 1
    assert value(after, "nexus_connections_active", nexus_transport="websocket") == 0
    assert value(after, "nexus_history_events") >= 100
    assert value(after, "nexus_history_bytes") > 100 * 30_000
    assert value(after, "nexus_streams_active", nexus_handler="test_telemetry:Echo") == 0
    # Label values stay bounded: no raw event type reaches a label.
    assert not any("tick" in v or "said" in v for (_, labels) in after for _, v in labels)


async def test_active_streams_show_per_handler_while_a_request_runs(nexus: TestServer) -> None:
    """A running request shows in `nexus_streams_active` for its handler, and in the page's `/api/metrics`."""
    call = asyncio.create_task(nexus.client.call("demo:sleepy:v1:requested", {}))
    await wait_until(lambda: bool(nexus.server.provider.streams()))
    samples = await scrape(nexus.server.ws_port)
    assert value(samples, "nexus_streams_active", nexus_handler="test_telemetry:Sleepy") == 1
    status, _, body = await http_get(nexus.server.ws_port, "/api/metrics")
    assert status == 200
    assert json.loads(body)["streams_by_handler"] == {"test_telemetry:Sleepy": 1}
    await call


async def test_api_metrics_gives_the_page_rates_failure_rates_and_percentiles(nexus: TestServer) -> None:
    """`/api/metrics` answers per handler: requests/s, failure rate, p50/p99 run time; and slow disconnects."""
    for _ in range(3):
        await nexus.client.call("demo:echo:v1:requested", {})
    await nexus.client.call("demo:boom:v1:requested", {})
    status, headers, body = await http_get(nexus.server.ws_port, "/api/metrics")
    assert status == 200
    assert headers["content-type"] == "application/json"
    data = json.loads(body)
    echo, boom = data["handlers"]["test_telemetry:Echo"], data["handlers"]["test_telemetry:Boom"]
    assert echo["total"] == 3
    assert echo["failure_rate"] == 0
    assert boom["failure_rate"] == 1
    assert echo["requests_per_s"] > 0
    assert 0 <= echo["p50_ms"] <= echo["p99_ms"]
    assert data["slow_consumer_disconnects"] == 0


async def test_two_servers_in_one_process_keep_their_own_metrics() -> None:
    """Each server has its own registry: what one counts never shows on the other's `/metrics`."""
    async with run_server(gateway=True) as one, run_server(gateway=True) as two:
        await one.client.emit("chat:said:v1:happened", {})
        assert value(await scrape(one.server.ws_port), "messaging_client_sent_messages_total") == 1
        assert value(await scrape(two.server.ws_port), "messaging_client_sent_messages_total") == 0


async def test_readyz_follows_the_handlers_and_healthz_stays_alive(nexus: TestServer) -> None:
    """`/readyz` is 200 while the handlers run and 503 once they stop; `/healthz` says the process is alive."""
    port = nexus.server.ws_port
    assert (await http_get(port, "/readyz"))[0] == 200
    assert (await http_get(port, "/healthz"))[0] == 200
    await nexus.server.provider.stop("server_shutdown")
    assert (await http_get(port, "/readyz"))[0] == 503
    assert (await http_get(port, "/healthz"))[0] == 200


async def test_metrics_port_serves_metrics_without_the_gateway() -> None:
    """With the gateway off, `metrics_port` serves `/metrics`, `/healthz` and `/readyz` on a port of its own."""
    async with run_server(Echo(), metrics_port=0) as nexus:
        await nexus.client.call("demo:echo:v1:requested", {})
        metrics_server = nexus.server.metrics_server
        assert metrics_server is not None
        samples = await scrape(metrics_server.port)
        assert value(samples, "messaging_process_duration_seconds_count", nexus_outcome="success") == 1
        assert (await http_get(metrics_server.port, "/readyz"))[0] == 200
        assert (await http_get(metrics_server.port, "/nope"))[0] == 404


async def test_metrics_off_keeps_nothing_and_says_so() -> None:
    """`metrics = false`: `/metrics` answers 404 and nothing is recorded."""
    async with run_server(Echo(), gateway=True, metrics=False) as nexus:
        await nexus.client.call("demo:echo:v1:requested", {})
        status, _, body = await http_get(nexus.server.ws_port, "/metrics")
        assert status == 404
        assert b"metrics are off" in body
        assert nexus.server.telemetry.handlers == {}


def test_service_tokens_are_capped() -> None:
    """At most 64 service tokens are labelled by name; any further one counts as `other`."""
    telemetry = Telemetry(enabled=False)
    telemetry.add_services(f"s{i}" for i in range(100))
    assert len(telemetry.services) == 64
    assert telemetry.service_of("s99:x:v1:happened") == "other"
    assert telemetry.service_of("s1:x:v1:happened") == "s1"


SECRET = "s" * 32


async def test_with_authentication_metrics_need_an_admin_token_unless_public() -> None:
    """Authentication on: `/metrics` answers 401 without a token, 403 to a user, 200 to an admin; with
    `metrics_public` a scraper without a token gets it."""
    async with run_server(gateway=True, jwt_secret=SECRET) as nexus:
        port = nexus.server.ws_port
        assert (await http_get(port, "/metrics"))[0] == 401
        user = mint_token(SECRET, "alice")
        assert (await http_get(port, "/metrics", f"Authorization: Bearer {user}\r\n"))[0] == 403
        assert (await http_get(port, f"/api/metrics?token={user}"))[0] == 403
        admin = mint_token(SECRET, "root", admin=True)
        status, _, body = await http_get(port, "/metrics", f"Authorization: Bearer {admin}\r\n")
        assert status == 200
        parse(body.decode())
        assert (await http_get(port, "/readyz"))[0] == 200  # health stays open
    async with run_server(gateway=True, jwt_secret=SECRET, metrics_public=True) as nexus:
        assert (await http_get(nexus.server.ws_port, "/metrics"))[0] == 200


@pytest.mark.nats
async def test_on_nats_the_consumer_lag_and_reconnects_are_reported() -> None:
    """On the NATS bus `/metrics` carries the tail's consumer lag (0 once caught up) and the reconnect count."""
    url = shared_nats_url()
    stream, prefix = unique_names("metrics")
    try:
        async with run_server(Echo(), gateway=True, settings=nats_settings(url, stream, prefix)) as nexus:
            await nexus.client.call("demo:echo:v1:requested", {})
            samples = await scrape(nexus.server.ws_port)
            assert ("nexus_nats_reconnects_total", frozenset({("messaging_system", "nexus")})) in samples
            assert value(samples, "nexus_nats_reconnects_total") == 0
            bus: Any = nexus.server.bus
            bus.reconnects += 1  # what a reconnection does (a real one is tested in tests/test_bus_nats.py)
            await wait_until(lambda: bus.consumer_lag == 0)
            samples = await scrape(nexus.server.ws_port)
            assert value(samples, "nexus_nats_reconnects_total") == 1
            assert ("nexus_nats_consumer_lag", frozenset({("messaging_system", "nexus")})) in samples
            assert value(samples, "nexus_nats_consumer_lag") == 0
    finally:
        await delete_stream(url, stream)


def test_otlp_export_is_wired_only_with_the_extra_and_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """No endpoint: no OTLP reader. An endpoint without the `otlp` extra: none either, and no error. An endpoint
    with the exporter importable: the metrics are pushed to it (flushed at shutdown)."""
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", raising=False)
    assert Telemetry().otlp is False
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.metric_exporter", None)
    assert Telemetry().otlp is False

    exported = io.StringIO()

    class OTLPMetricExporter(ConsoleMetricExporter):  # stands in for the extra's exporter
        def __init__(self) -> None:
            super().__init__(out=exported)

    module = types.ModuleType("opentelemetry.exporter.otlp.proto.grpc.metric_exporter")
    module.OTLPMetricExporter = OTLPMetricExporter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.metric_exporter", module)
    telemetry = Telemetry()
    assert telemetry.otlp is True
    telemetry.handler_ended("echo", "success", 0.01, None)
    telemetry.shutdown()
    assert "messaging.process.duration" in exported.getvalue()
