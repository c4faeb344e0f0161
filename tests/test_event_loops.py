"""The event loop ``nexus serve`` runs on: uvloop when installed (or asked for), the standard loop otherwise, and
every transport (gRPC, WebSocket, SSE, the NATS bus) working end to end on both."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nats_support import delete_stream, nats_settings, shared_nats_url, unique_names
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from nexus import Event, EventHandler, Stream, StreamingEventHandler
from nexus.cli import main
from nexus.config import load_settings
from nexus.errors import ConfigurationError
from nexus.server import loop_factory, run, running_loop_name
from nexus.testing import Recorder, StreamFollower, TestServer, run_server

pytest.importorskip("uvloop")  # the dev extra installs it: these tests check the server on it

LOOPS = ["asyncio", "uvloop"]
GUARD = 20.0
"""Seconds any awaited condition may take (a guard against hangs, not a measurement)."""


class Echo(EventHandler):
    event_type = "demo:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"echo": event.payload}


class Chunks(StreamingEventHandler):
    event_type = "demo:stream_chunks"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        for i in range(int(event.payload.get("n", 3))):
            await stream.send({"i": i})


class Burst(EventHandler):
    """Publishes ``n`` events in a loop, awaiting nothing but its own publishes."""

    event_type = "demo:burst"

    async def handle(self, event: Event) -> dict[str, Any]:
        count = int(event.payload["n"])
        for i in range(count):
            await self.ctx.publish("demo:item:v1:made", {"i": i})
        return {"published": count}


def on_loop(loop: str, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run ``scenario`` on a new event loop of the kind ``loop`` names, checking that it is that kind."""

    async def checked() -> None:
        assert running_loop_name() == loop
        async with asyncio.timeout(60):
            await scenario()

    run(checked(), loop=loop)


# --- choosing the loop -----------------------------------------------------------------------------------------


def test_auto_picks_uvloop_when_it_is_installed() -> None:
    """``loop = "auto"`` (the default) runs on uvloop when it can be imported."""
    assert load_settings(None, {}, {}).loop == "auto"
    run_on = loop_factory("auto")()
    try:
        assert type(run_on).__module__.startswith("uvloop")
    finally:
        run_on.close()


def test_asyncio_picks_the_standard_loop() -> None:
    """``loop = "asyncio"`` runs on the standard loop even with uvloop installed."""
    run_on = loop_factory("asyncio")()
    try:
        assert type(run_on).__module__.startswith("asyncio")
    finally:
        run_on.close()


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without uvloop, ``auto`` uses the standard loop; ``uvloop`` asked for is an error naming the extra."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(ConfigurationError, match=r"pip install 'nexus-bus\[uvloop\]'"):
        loop_factory("uvloop")


def test_serve_with_loop_uvloop_missing_exits_2_before_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``nexus serve --loop uvloop`` without uvloop prints why and exits 2; nothing is served."""
    monkeypatch.setitem(sys.modules, "uvloop", None)
    code = main(["serve", "--loop", "uvloop", "--grpc-port", "0", "--no-gateway", "--no-entry-points"])
    assert code == 2
    err = capsys.readouterr().err
    assert "uvloop" in err
    assert "--loop asyncio" in err


def test_the_loop_setting_reads_the_environment_and_refuses_unknown_loops() -> None:
    """``NEXUS_LOOP`` sets the loop; a name that is no loop is a configuration error naming the choices."""
    assert load_settings(None, {"NEXUS_LOOP": "asyncio"}, {}).loop == "asyncio"
    with pytest.raises(ValueError, match="auto, asyncio, uvloop"):
        load_settings(None, {"NEXUS_LOOP": "trio"}, {})


@pytest.mark.parametrize("loop", LOOPS)
def test_the_server_logs_the_loop_it_runs_on(loop: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``server_started`` names the event loop."""

    async def scenario() -> None:
        async with run_server():
            pass

    on_loop(loop, scenario)
    assert re.search(rf"\bloop\W+{loop}\b", capsys.readouterr().out)


# --- every transport on every loop -----------------------------------------------------------------------------


async def websocket_receives(nexus: TestServer, pattern: str, emit: Callable[[], Awaitable[Event]]) -> None:
    async with connect(nexus.ws_url, subprotocols=[Subprotocol("nexus.v1")], open_timeout=GUARD) as ws:
        assert json.loads(await ws.recv())["type"] == "connection"
        await ws.send(json.dumps({"type": "subscribe", "event_types": [pattern]}))
        assert json.loads(await ws.recv())["type"] == "subscribed"
        sent = await emit()
        frame = json.loads(await ws.recv())
        assert (frame["type"], frame["event_id"], frame["offset"]) == (sent.event_type, sent.event_id, sent.offset)
        await ws.send(json.dumps({"type": "demo:echo:v1:requested", "payload": {"via": "ws"}}))
        frames = [json.loads(await ws.recv()) for _ in range(2)]
        assert {f["type"] for f in frames} == {"published", "demo:echo:v1:success"}


async def data_line(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The JSON of the next ``data:`` line of an SSE stream."""
    while not (line := (await reader.readline()).decode()).startswith("data:"):
        assert line, "the SSE stream ended"
    data: dict[str, Any] = json.loads(line.removeprefix("data:"))
    return data


async def sse_receives(nexus: TestServer, pattern: str, emit: Callable[[], Awaitable[Event]]) -> None:
    assert nexus.server.gateway is not None
    port = nexus.server.gateway.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = f"GET /sse?patterns={pattern} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n"
        writer.write(request.encode())
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        while (await reader.readline()).strip():
            pass  # headers
        assert (await data_line(reader))["type"] == "subscribed"
        sent = await emit()
        data = await data_line(reader)
        assert (data["type"], data["event_id"], data["offset"]) == (sent.event_type, sent.event_id, sent.offset)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def grpc_round_trip(nexus: TestServer) -> None:
    recorder: Recorder = await nexus.record("demo:note:>")
    try:
        sent = await nexus.client.emit("demo:note:v1:made", {"n": 1})
        [got] = await recorder.wait_count(1, GUARD)
        assert (got.event_id, got.offset, got.payload) == (sent.event_id, sent.offset, {"n": 1})
    finally:
        await recorder.stop()
    done = await nexus.client.call("demo:echo:v1:requested", {"x": 1})
    assert done.payload == {"echo": {"x": 1}}
    chunks = StreamFollower(nexus.client.request("demo:stream_chunks:v1:requested", {"n": 3}, heartbeats=False))
    assert (await chunks.ended(GUARD)).state == "success"
    assert chunks.chunks == [{"i": 0}, {"i": 1}, {"i": 2}]


@pytest.mark.parametrize("loop", LOOPS)
def test_grpc_websocket_and_sse_work_on_the_loop(loop: str) -> None:
    """On each loop: gRPC emit, subscribe and requests, a WebSocket client and an SSE stream all work."""

    async def scenario() -> None:
        async with run_server(Echo(), Chunks(), gateway=True) as nexus:
            await grpc_round_trip(nexus)
            await websocket_receives(nexus, "demo:ws:>", lambda: nexus.client.emit("demo:ws:v1:made", {}))
            await sse_receives(nexus, "demo:sse:>", lambda: nexus.client.emit("demo:sse:v1:made", {}))

    on_loop(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_tight_publisher_leaves_subscribers_their_turns_on_the_loop(loop: str) -> None:
    """On each loop: a handler publishing 5,000 events in a loop reaches a gRPC subscriber in full, in order."""
    total = 5_000

    async def scenario() -> None:
        async with run_server(Burst()) as nexus:
            recorder: Recorder = await nexus.record("demo:item:>")
            try:
                done = await nexus.client.call("demo:burst:v1:requested", {"n": total})
                assert done.payload == {"published": total}
                events = await recorder.wait_count(total, 60)
                assert [e.payload["i"] for e in events] == list(range(total))
                assert nexus.bus.stats().slow_consumers == 0
            finally:
                await recorder.stop()

    on_loop(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_the_nats_bus_works_on_the_loop(loop: str) -> None:
    """On each loop: on the NATS bus, emit and subscribe over gRPC and a request to a handler work."""
    url = shared_nats_url()
    stream, prefix = unique_names("loop")

    async def scenario() -> None:
        try:
            settings = nats_settings(url, stream, prefix)
            async with run_server(Echo(), Chunks(), settings=settings) as nexus:
                await grpc_round_trip(nexus)
        finally:
            await delete_stream(url, stream)

    on_loop(loop, scenario)


def test_gateway_with_loop_uvloop_missing_exits_2_before_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``nexus gateway --loop uvloop`` without uvloop prints why and exits 2, before connecting to any server."""
    monkeypatch.setitem(sys.modules, "uvloop", None)
    code = main(["gateway", "--loop", "uvloop", "--nexus", "127.0.0.1:1", "--ws-port", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "uvloop" in err
    assert "--loop asyncio" in err
