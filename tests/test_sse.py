"""Server-Sent Events at ``/sse`` on the gateway port: a raw HTTP client on asyncio streams, and Chromium's own
``EventSource`` resuming across a restart on the NATS bus."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats_support import delete_stream, free_port, nats_settings, shared_nats_url, unique_names
from nexus.gateway.server import GatewayServer, GatewaySettings
from nexus.gateway.sse import SseQuery, event_message, parse_request, sse_message
from test_gateway_browser import CHROMIUM_ARGS, EXECUTABLE, _missing, wait_js

from nexus import Event, Stream, StreamingEventHandler
from nexus.auth import Credentials
from nexus.errors import (
    InvalidArgument,
    InvalidPattern,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from nexus.identity import Principal
from nexus.node_remote import RemoteNode
from nexus.testing import TestServer, run_server

GUARD = 15.0
"""Seconds any awaited condition may take before the test fails (a guard, not a measurement)."""


class Countdown(StreamingEventHandler):
    """Sends ``n`` chunks, ``every`` seconds apart (heartbeats flow meanwhile)."""

    event_type = "demo:stream_countdown"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        for i in range(int(event.payload.get("n", 3))):
            await stream.send({"i": i})
            await asyncio.sleep(float(event.payload.get("every", 0.05)))


@pytest.fixture
async def nexus() -> AsyncIterator[TestServer]:
    """A server with its gateway on a free port, a streaming handler and 50 ms heartbeats."""
    async with run_server(Countdown(), gateway=True, heartbeat_interval=0.05) as server:
        yield server


def gateway_of(server: TestServer) -> GatewayServer:
    gateway = server.server.gateway
    assert isinstance(gateway, GatewayServer)
    return gateway


@contextlib.asynccontextmanager
async def gateway_for(server: TestServer, node: Any = None, **settings: Any) -> AsyncIterator[GatewayServer]:
    """A gateway with custom settings over ``server``'s node (or ``node``); stopped afterwards."""
    authenticator = settings.pop("authenticator", None)
    extra = {"authenticator": authenticator} if authenticator is not None else {}
    gateway = GatewayServer(node or server.server.node, GatewaySettings(host="127.0.0.1", port=0, **settings), **extra)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop(grace=1.0)


# --- a raw HTTP client ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Message:
    """One SSE block: its fields as sent (a comment-only block has just ``comments``)."""

    id: str | None = None
    data: str | None = None
    retry: int | None = None
    event: str | None = None
    comments: list[str] = dataclasses.field(default_factory=list)

    @property
    def json(self) -> dict[str, Any]:
        assert self.data is not None, f"no data in {self}"
        value: dict[str, Any] = json.loads(self.data)
        return value


class SseClient:
    """``GET`` a URL over a plain socket; read the status, the headers, then SSE blocks or the body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}

    @classmethod
    async def open(
        cls, port: int, target: str, headers: dict[str, str] | None = None, *, sock: socket.socket | None = None
    ) -> SseClient:
        if sock is not None:
            reader, writer = await asyncio.open_connection(sock=sock)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(GUARD):
            status_line = (await reader.readline()).decode()
            assert status_line.startswith("HTTP/1.1 "), status_line
            client.status = int(status_line.split()[1])
            while (line := (await reader.readline()).decode().rstrip("\r\n")) != "":
                name, _, value = line.partition(":")
                client.headers[name.strip().lower()] = value.strip()
        return client

    async def body(self) -> bytes:
        """The body of a response with a Content-Length."""
        async with asyncio.timeout(GUARD):
            return await self.reader.readexactly(int(self.headers["content-length"]))

    async def block(self) -> Message | None:
        """The next SSE block (None at the end of the stream)."""
        message = Message()
        data: list[str] = []
        async with asyncio.timeout(GUARD):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    return None
                line = raw.decode().rstrip("\n")
                if line == "":
                    if data or message.comments or message.id is not None or message.retry is not None:
                        message.data = "\n".join(data) if data else None
                        return message
                    continue
                if line.startswith(":"):
                    message.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                elif name == "id":
                    message.id = value
                elif name == "retry":
                    message.retry = int(value)
                elif name == "event":
                    message.event = value

    async def message(self) -> Message:
        """The next block that carries data (keep-alive comments are skipped)."""
        while True:
            block = await self.block()
            assert block is not None, "the stream ended"
            if block.data is not None:
                return block

    async def messages(self, count: int) -> list[Message]:
        return [await self.message() for _ in range(count)]

    async def until_end(self) -> list[Message]:
        """Every block with data up to the end of the stream."""
        blocks = []
        while (block := await self.block()) is not None:
            if block.data is not None:
                blocks.append(block)
        return blocks

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def sse(port: int, target: str, headers: dict[str, str] | None = None) -> AsyncIterator[SseClient]:
    client = await SseClient.open(port, target, headers)
    try:
        yield client
    finally:
        await client.close()


async def publish(server: TestServer, count: int, event_type: str = "demo:tick:v1:happened") -> list[int]:
    """Store ``count`` events; their offsets."""
    return [(await server.bus.publish(Event(event_type, {"n": n}))).event.offset for n in range(count)]


async def wait_until(what: str, condition: Any) -> None:
    deadline = time.monotonic() + GUARD
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


def sse_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("nexus-gateway") and not t.done()]


# --- the request and messages, without a loop ---------------------------------------------------------------------


def test_patterns_may_be_repeated_or_comma_separated() -> None:
    """Patterns come from repeated and comma-separated `patterns` parameters, in order, without repeats."""
    query = parse_request("/sse?patterns=a:>,b:*:v1:*&patterns=%3E&patterns=a:%3E&token=t")
    assert query == SseQuery(("a:>", "b:*:v1:*", ">"))


def test_last_event_id_wins_over_the_query_and_may_carry_the_epoch() -> None:
    """Last-Event-ID (where the client got to) overrides ?since_offset; its epoch overrides ?epoch."""
    assert parse_request("/sse?patterns=>&since_offset=3&epoch=e1") == SseQuery((">",), 3, "e1")
    assert parse_request("/sse?patterns=>&since_offset=3&epoch=e1", ["e2:9"]) == SseQuery((">",), 9, "e2")
    assert parse_request("/sse?patterns=>&since_offset=3&epoch=e1", ["9"]) == SseQuery((">",), 9, "e1")
    assert parse_request("/sse?patterns=>", ["s@2025:x:7"]) == SseQuery((">",), 7, "s@2025:x")
    assert parse_request("/sse?patterns=>", [" "]) == SseQuery((">",))


@pytest.mark.parametrize(
    ("target", "last_event_ids", "error"),
    [
        ("/sse", [], InvalidArgument),
        ("/sse?patterns=", [], InvalidArgument),
        ("/sse?patterns=demo:bad", [], InvalidPattern),
        ("/sse?patterns=" + ",".join(f"s{n}:>" for n in range(257)), [], ResourceExhausted),
        ("/sse?patterns=>&since_offset=abc", [], InvalidArgument),
        ("/sse?patterns=>&since_offset=-1", [], InvalidArgument),
        ("/sse?patterns=>&since_offset=99999999999999999999", [], InvalidArgument),
        ("/sse?patterns=>&since_offset=1&since_offset=2", [], InvalidArgument),
        ("/sse?patterns=>&epoch=a%20b", [], InvalidArgument),
        ("/sse?patterns=>&epoch=" + "e" * 129, [], InvalidArgument),
        ("/sse?patterns=>", ["e:x"], InvalidArgument),
        ("/sse?patterns=>", [":5"], InvalidArgument),
        ("/sse?patterns=>", ["e:" + "9" * 4000], InvalidArgument),
        ("/sse?patterns=>", ["1", "2"], InvalidArgument),
        ("/sse?patterns=>&" + "&".join(f"x{n}=1" for n in range(600)), [], InvalidArgument),
    ],
)
def test_bad_input_is_refused_with_a_message(target: str, last_event_ids: list[str], error: type[Exception]) -> None:
    """Missing or bad patterns, offsets, epochs and ids, and too many of anything, are refused."""
    with pytest.raises(error):
        parse_request(target, last_event_ids)


def test_a_message_has_one_data_line_per_line_and_offset_zero_has_no_id() -> None:
    """Multi-line data becomes several data lines; a stored event's id is epoch:offset, an offset 0 has none."""
    assert sse_message(b'{"a":1}\n{"b":2}', event_id="e:4") == b'id: e:4\ndata: {"a":1}\ndata: {"b":2}\n\n'
    stored = Event("demo:tick:v1:happened").stored(4, "ep")
    assert event_message(stored, b"{}") == b"id: ep:4\ndata: {}\n\n"
    assert event_message(Event("demo:stream_x:v1:heartbeat").stored(0, "ep"), b"{}") == b"data: {}\n\n"


# --- streaming --------------------------------------------------------------------------------------------------


async def test_events_arrive_as_sse_messages_after_a_subscribed_message(nexus: TestServer) -> None:
    """A 200 text/event-stream without Content-Length: `retry` and `subscribed` first, then each event with id
    <epoch>:<offset> and the WebSocket frame as data, with no `event:` field (EventSource.onmessage gets all)."""
    gateway = gateway_of(nexus)
    epoch = nexus.bus.epoch
    before = await publish(nexus, 2)
    async with sse(gateway.port, "/sse?patterns=demo:tick:v1:*") as client:
        assert client.status == 200
        assert client.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert client.headers["cache-control"] == "no-cache"
        assert "content-length" not in client.headers
        assert "transfer-encoding" not in client.headers
        hint = await client.block()
        assert hint is not None
        assert hint.retry == 2000
        assert hint.data is None
        first = await client.message()
        assert first.id == f"{epoch}:{before[-1]}"  # no replay follows: resume from where live delivery starts
        assert first.json == {
            "type": "subscribed",
            "event_types": ["demo:tick:v1:*"],
            "epoch": epoch,
            "head_offset": before[-1],
        }
        stored = (await nexus.bus.publish(Event("demo:tick:v1:happened", {"x": "é\n"}, metadata={"k": "v"}))).event
        await nexus.bus.publish(Event("demo:other:v1:happened"))
        message = await client.message()
        assert message.event is None
        assert message.id == f"{epoch}:{stored.offset}"
        assert message.json == {
            "type": "demo:tick:v1:happened",
            "event_id": stored.event_id,
            "payload": {"x": "é\n"},
            "metadata": {"k": "v"},
            "offset": stored.offset,
            "epoch": epoch,
            "timestamp": stored.timestamp,
        }


async def test_repeated_and_comma_separated_patterns_deliver_each_event_once(nexus: TestServer) -> None:
    """Overlapping patterns, repeated or comma-separated, deliver each matching event once and nothing else."""
    gateway = gateway_of(nexus)
    async with sse(gateway.port, "/sse?patterns=a:>,b:x:v1:*&patterns=a:x:v1:%2A") as client:
        await client.message()
        offsets = []
        for event_type in ("a:x:v1:done", "c:x:v1:done", "b:x:v1:done", "b:y:v1:done"):
            offsets.append((await nexus.bus.publish(Event(event_type))).event.offset)
        last = (await nexus.bus.publish(Event("a:end:v1:done"))).event.offset
        received = [m.json["offset"] for m in await client.messages(3)]
        assert received == [offsets[0], offsets[2], last]


async def test_heartbeats_have_no_id_so_they_never_move_the_resume_point(nexus: TestServer) -> None:
    """Heartbeats (offset 0) arrive as data without an `id:` line; stored lifecycle events carry one."""
    gateway = gateway_of(nexus)
    async with sse(gateway.port, "/sse?patterns=demo:stream_countdown:>") as client:
        await client.message()
        await nexus.client.emit("demo:stream_countdown:v1:requested", {"n": 4, "every": 0.06})
        messages: list[Message] = []
        while not messages or messages[-1].json["type"] != "demo:stream_countdown:v1:success":
            messages.append(await client.message())
        heartbeats = [m for m in messages if m.json["type"].endswith(":heartbeat")]
        assert heartbeats, "the stream lived long enough for heartbeats"
        assert all(m.id is None and m.json["offset"] == 0 for m in heartbeats)
        stored = [m for m in messages if m not in heartbeats]
        assert all(m.id == f"{nexus.bus.epoch}:{m.json['offset']}" for m in stored)


async def test_keep_alive_comments_flow_while_nothing_else_does(nexus: TestServer) -> None:
    """An idle stream gets a `: keep-alive` comment every sse_keepalive_s."""
    async with gateway_for(nexus, sse_keepalive_s=0.1) as gateway, sse(gateway.port, "/sse?patterns=>") as client:
        await client.message()
        started = time.monotonic()
        comments: list[str] = []
        while len(comments) < 3:
            block = await client.block()
            assert block is not None
            assert block.data is None
            comments += block.comments
        assert comments == ["keep-alive"] * 3
        assert time.monotonic() - started < 2.0


# --- resuming ---------------------------------------------------------------------------------------------------


async def test_last_event_id_replays_every_missed_event_once_then_continues_live(nexus: TestServer) -> None:
    """Reconnecting with the Last-Event-ID received gets `recovered: true` (with no id, so the resume point stays)
    and every event missed, once, in order, then live events."""
    gateway = gateway_of(nexus)
    async with sse(gateway.port, "/sse?patterns=demo:>") as client:
        await client.message()
        seen = await publish(nexus, 3)
        received = await client.messages(3)
        assert [m.json["offset"] for m in received] == seen
        last_id = received[-1].id
        assert last_id is not None
    missed = await publish(nexus, 4)
    async with sse(gateway.port, "/sse?patterns=demo:>", {"Last-Event-ID": last_id}) as again:
        first = await again.message()
        assert first.json["type"] == "subscribed"
        assert first.json["recovered"] is True
        assert first.id is None
        live = await publish(nexus, 2)
        assert [m.json["offset"] for m in await again.messages(6)] == missed + live


async def test_since_offset_and_epoch_in_the_query_replay_too(nexus: TestServer) -> None:
    """?since_offset=&epoch= (for clients that keep their own position) replays what came after it."""
    gateway = gateway_of(nexus)
    offsets = await publish(nexus, 5)
    target = f"/sse?patterns=demo:>&since_offset={offsets[1]}&epoch={nexus.bus.epoch}"
    async with sse(gateway.port, target) as client:
        assert (await client.message()).json["recovered"] is True
        assert [m.json["offset"] for m in await client.messages(3)] == offsets[2:]


async def test_a_last_event_id_of_another_epoch_is_told_recovered_false(nexus: TestServer) -> None:
    """An id from a lost history is answered recovered: false (never a replay of the wrong offsets), with a new
    resume point, and the stream continues live."""
    gateway = gateway_of(nexus)
    offsets = await publish(nexus, 3)
    async with sse(gateway.port, "/sse?patterns=demo:>", {"Last-Event-ID": "gone-epoch:1"}) as client:
        first = await client.message()
        assert first.json["recovered"] is False
        assert first.id == f"{nexus.bus.epoch}:{offsets[-1]}"
        live = await publish(nexus, 1)
        assert (await client.message()).json["offset"] == live[0]


# --- refusals ---------------------------------------------------------------------------------------------------


async def test_bad_requests_get_400_with_a_json_error_and_others_are_unaffected(nexus: TestServer) -> None:
    """Bad patterns, offsets and ids get a 400 with a short JSON error, never a 500; a stream that was open
    meanwhile receives every event."""
    gateway = gateway_of(nexus)
    async with sse(gateway.port, "/sse?patterns=demo:>") as bystander:
        await bystander.message()
        cases: list[tuple[str, dict[str, str], str]] = [
            ("/sse", {}, "invalid_argument"),
            ("/sse?patterns=demo:bad", {}, "invalid_pattern"),
            ("/sse?patterns=" + ",".join(f"s{n}:>" for n in range(300)), {}, "resource_exhausted"),
            ("/sse?patterns=%3E&since_offset=1e9", {}, "invalid_argument"),
            ("/sse?patterns=%3E", {"Last-Event-ID": "x" * 6000}, "invalid_argument"),
            ("/sse?patterns=%3E", {"Last-Event-ID": "epoch:12345678901234567890"}, "invalid_argument"),
            ("/sse?patterns=%E2%28", {}, "invalid_pattern"),
        ]
        for target, headers, code in cases:
            async with sse(gateway.port, target, headers) as client:
                assert client.status == 400, target
                assert client.headers["content-type"] == "application/json"
                body = json.loads(await client.body())
                assert body["error"] == code
                assert body["message"]
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"POST /sse?patterns=%3E HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        async with asyncio.timeout(GUARD):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 405 ")
        assert b"\r\nAllow: GET\r\n" in answer
        offsets = await publish(nexus, 3)
        assert [m.json["offset"] for m in await bystander.messages(3)] == offsets


async def test_a_node_that_cannot_subscribe_ends_the_stream_with_an_error_the_client_retries_after(
    nexus: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the node cannot subscribe (its bus is down), the valid request still gets a 200 stream holding the
    retry hint and a last `unavailable` error, so EventSource tries again instead of giving up."""
    gateway = gateway_of(nexus)

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise Unavailable("the bus is down")

    monkeypatch.setattr(gateway.node, "subscribe", unavailable)
    async with sse(gateway.port, "/sse?patterns=%3E") as client:
        assert client.status == 200
        blocks = await client.until_end()
        assert [b.json for b in blocks] == [{"type": "error", "code": "unavailable", "message": "the bus is down"}]
    async with sse(gateway.port, "/sse?patterns=%3E") as client:
        first = await client.block()
        assert first is not None
        assert first.retry == 2000


async def test_the_auth_hook_refuses_with_401_or_403_and_takes_a_token_or_a_bearer(nexus: TestServer) -> None:
    """The gateway's auth hook applies: no token is 401, a forbidden one 403; ?token= and Authorization: Bearer
    are accepted."""
    seen: list[Credentials] = []

    async def check(credentials: Credentials) -> Principal:
        seen.append(credentials)
        if credentials.token is None:
            raise Unauthenticated("a token is required")
        if credentials.token != "good":
            raise PermissionDenied("that token may not read events")
        return Principal(credentials.connection_id, "alice", authenticated=True)

    async with gateway_for(nexus, authenticator=check) as gateway:
        async with sse(gateway.port, "/sse?patterns=%3E") as client:
            assert client.status == 401
            assert json.loads(await client.body())["error"] == "unauthenticated"
        async with sse(gateway.port, "/sse?patterns=%3E&token=bad") as client:
            assert client.status == 403
        async with sse(gateway.port, "/sse?patterns=%3E&token=good") as client:
            assert client.status == 200
            assert (await client.message()).json["type"] == "subscribed"
        async with sse(gateway.port, "/sse?patterns=%3E", {"Authorization": "Bearer good"}) as client:
            assert client.status == 200
        assert gateway.stats.auth_refused == 2
    assert [c.token for c in seen] == [None, "bad", "good", "good"]


# --- limits and endings -----------------------------------------------------------------------------------------


async def test_a_client_that_does_not_read_is_cut_off_and_resumes_without_loss(nexus: TestServer) -> None:
    """A stalled client overflows its subscription and its stream ends with `too_slow` naming the last offset
    written, while another client receives every event; resuming from its Last-Event-ID loses nothing."""
    total = 400
    limits: dict[str, Any] = {"write_limit": 16 * 1024, "send_buffer_bytes": 16 * 1024, "subscriber_queue": 50}
    async with gateway_for(nexus, **limits) as gateway:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gateway.port))
        sock.setblocking(False)
        stalled = await SseClient.open(gateway.port, "/sse?patterns=load:>", sock=sock)
        async with sse(gateway.port, "/sse?patterns=load:>") as reader:
            first = await stalled.message()
            await reader.message()
            progress: list[int] = []

            async def read_all() -> None:
                while len(progress) < total:
                    progress.append((await reader.message()).json["offset"])

            reading = asyncio.create_task(read_all())
            sent = []
            for n in range(total):
                sent.append(
                    (await nexus.bus.publish(Event("load:tick:v1:happened", {"n": n, "blob": "x" * 2048}))).event.offset
                )
                if n % 25 == 24:
                    await wait_until("the reader keeps up", lambda: len(progress) >= len(sent) - 25)
            await reading
            assert progress == sent
            await wait_until("the stalled client is cut off", lambda: gateway.stats.too_slow == 1)

        blocks = await stalled.until_end()
        await stalled.close()
        events, last = blocks[:-1], blocks[-1]
        received = [m.json["offset"] for m in events]
        assert received == sent[: len(received)]
        assert len(received) < total
        resume_from = received[-1] if received else 0
        assert last.id is None
        assert last.json == {
            "type": "error",
            "code": "too_slow",
            "message": f"too slow: resume from offset {resume_from}",
        }
        last_id = events[-1].id if events else first.id
        assert last_id is not None

        async with sse(gateway.port, "/sse?patterns=load:>", {"Last-Event-ID": last_id}) as resumed:
            assert (await resumed.message()).json["recovered"] is True
            rest = [m.json["offset"] for m in await resumed.messages(total - len(received))]
            assert received + rest == sent


async def test_gateway_shutdown_ends_every_stream_promptly(nexus: TestServer) -> None:
    """Stopping the gateway ends each stream with a last `going_away` message, closes the connection and leaves
    no task; the websockets side of each connection ends closed, not aborted mid-response."""
    async with gateway_for(nexus) as gateway:
        clients = [await SseClient.open(gateway.port, "/sse?patterns=>") for _ in range(3)]
        for client in clients:
            await client.message()
        await wait_until("three streams run", lambda: len(gateway.sse.streams) == 3)
        started = time.monotonic()
        await gateway.stop(grace=1.0)
        assert time.monotonic() - started < 2.0
        for client in clients:
            blocks = await client.until_end()
            assert [b.json["code"] for b in blocks] == ["going_away"]
            await client.close()
        assert gateway.sse.streams == set()
    assert sse_tasks() == []


async def test_server_shutdown_ends_streams_after_what_was_queued(nexus: TestServer) -> None:
    """`nexus serve` stopping (the node closes first) ends a stream after the events it had queued."""
    gateway = gateway_of(nexus)
    client = await SseClient.open(gateway.port, "/sse?patterns=demo:>")
    await client.message()
    offsets = await publish(nexus, 5)
    await nexus.server.stop(grace=1.0)
    blocks = await client.until_end()
    await client.close()
    assert [b.json.get("offset") for b in blocks[:-1]] == offsets
    assert blocks[-1].json["code"] == "going_away"


async def test_a_stream_outlives_the_open_timeout_which_still_drops_silent_connections(nexus: TestServer) -> None:
    """open_timeout bounds a connection that sends no request (and a WebSocket handshake), never a stream."""
    async with gateway_for(nexus, open_timeout=0.3) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        async with sse(gateway.port, "/sse?patterns=demo:>") as client:
            await client.message()
            started = time.monotonic()
            async with asyncio.timeout(GUARD):
                assert await reader.read() == b""  # the silent connection is closed
            assert time.monotonic() - started < 2.0
            writer.close()
            await asyncio.sleep(0.5)
            offsets = await publish(nexus, 1)
            assert (await client.message()).json["offset"] == offsets[0]


async def test_a_client_that_leaves_releases_its_subscription(nexus: TestServer) -> None:
    """Closing the connection, even while events are on their way to it, ends the stream on the server: no
    stream, subscription or task remains, websockets logs no error, and the others go on receiving."""
    gateway = gateway_of(nexus)
    before = nexus.bus.stats().subscribers
    with _websockets_errors() as errors:
        async with sse(gateway.port, "/sse?patterns=demo:>") as bystander:
            await bystander.message()
            leaving = [await SseClient.open(gateway.port, "/sse?patterns=demo:>") for _ in range(3)]
            for client in leaving:
                await client.message()
                await client.close()
            offsets = await publish(nexus, 20)
            await wait_until("every leaving stream ended", lambda: len(gateway.sse.streams) == 1)
            assert [m.json["offset"] for m in await bystander.messages(20)] == offsets
        await wait_until("no stream is left", lambda: not gateway.sse.streams)
        await wait_until("their subscriptions closed", lambda: nexus.bus.stats().subscribers == before)
    assert errors == []
    assert sse_tasks() == []


async def test_a_client_that_leaves_while_its_request_is_checked_leaves_nothing_behind(nexus: TestServer) -> None:
    """A client gone before the auth hook answers ends at once: no stream, task or websockets error remains."""
    checking = asyncio.Event()
    release = asyncio.Event()

    async def slow(credentials: Credentials) -> Principal:
        checking.set()
        await release.wait()
        return Principal(credentials.connection_id)

    with _websockets_errors() as errors:
        async with gateway_for(nexus, authenticator=slow, close_timeout=30.0) as gateway:
            _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(b"GET /sse?patterns=%3E HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(GUARD):
                await checking.wait()
            writer.close()
            await asyncio.sleep(0.2)
            release.set()
            await asyncio.sleep(0.5)
            assert not gateway.sse.streams
    assert errors == []
    assert sse_tasks() == []


@contextlib.contextmanager
def _websockets_errors() -> Any:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("websockets")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


async def test_a_lost_history_ends_the_stream_and_the_reconnect_is_told_recovered_false() -> None:
    """A remote gateway whose upstream restarts with a new history ends its streams (`history_reset`); the
    client's automatic reconnect with its Last-Event-ID is answered recovered: false."""
    async with run_server() as first:
        port = first.server.grpc_port
        node = RemoteNode(first.address, max_retry_delay=0.2)
        await node.start()
    try:
        async with gateway_for(first, node=node) as gateway:
            client = await SseClient.open(gateway.port, "/sse?patterns=%3E")
            subscribed = await client.message()
            async with run_server(grpc_port=port) as second:
                blocks = await client.until_end()
                await client.close()
                assert [b.json["code"] for b in blocks] == ["history_reset"]
                await wait_until("the gateway follows the new history", lambda: node.epoch == second.bus.epoch)
                assert subscribed.id is not None
                async with sse(gateway.port, "/sse?patterns=%3E", {"Last-Event-ID": subscribed.id}) as again:
                    answer = await again.message()
                    assert answer.json["recovered"] is False
                    stored = await second.client.emit("demo:tick:v1:happened")
                    assert (await again.message()).json["offset"] == stored.offset
    finally:
        await node.close()


# --- Chromium's own EventSource -------------------------------------------------------------------------------------

RECORD = """(url) => {
    window.got = [];
    const source = new EventSource(url);
    source.onmessage = (message) => window.got.push([message.lastEventId, message.data]);
}"""
"""The page's whole client: a plain EventSource and an onmessage that records what arrives."""


def _count(kind: str, at_least: int) -> str:
    """A page expression: at least ``at_least`` messages whose type is ``kind`` (``event``: any event type)."""
    test = "t.includes(':')" if kind == "event" else f"t === {json.dumps(kind)}"
    count = f"window.got.filter(([, data]) => {{ const t = JSON.parse(data).type; return {test}; }}).length"
    return f"{count} >= {at_least}"


@pytest.mark.nats
@pytest.mark.skipif(bool(_missing), reason=f"needs {' and '.join(_missing)}")
async def test_chromium_eventsource_gets_every_missed_event_once_after_a_restart_on_nats() -> None:
    """A Chromium page with a plain EventSource receives events; the server stops, another node stores events
    meanwhile, and the server restarts on the same NATS stream and gateway port: the page reconnects by itself
    and gets every missed event once, in order, then live ones, with no client code."""
    from playwright.async_api import async_playwright  # here: without it, the test is skipped, not broken

    url = shared_nats_url()
    stream, prefix = unique_names("sse")
    port = free_port()
    settings = nats_settings(url, stream, prefix, sse_retry_ms=200)
    offsets: list[int] = []

    async def emit(server: TestServer, numbers: range) -> None:
        for n in numbers:
            offsets.append((await server.client.emit("sse:tick:v1:happened", {"n": n})).offset)

    try:
        async with async_playwright() as playwright:
            chromium = await playwright.chromium.launch(executable_path=EXECUTABLE, args=CHROMIUM_ARGS)
            try:
                page = await chromium.new_page()
                async with run_server(settings=settings, gateway=True, ws_port=port) as first:
                    epoch = first.bus.epoch
                    await page.goto(f"http://127.0.0.1:{port}/healthz")  # same origin, no script of its own
                    await page.evaluate(RECORD, "/sse?patterns=sse:>")
                    await wait_js(page, _count("subscribed", 1))
                    await emit(first, range(5))
                    await wait_js(page, _count("event", 5))
                async with run_server(settings=settings) as other:  # the gateway is down; events go on
                    await emit(other, range(5, 10))
                async with run_server(settings=settings, gateway=True, ws_port=port) as second:
                    assert second.bus.epoch == epoch
                    await wait_js(page, _count("subscribed", 2))
                    await emit(second, range(10, 12))
                    await wait_js(page, _count("event", 12))
                    got: list[list[str]] = await page.evaluate("window.got")
            finally:
                await chromium.close()
    finally:
        await delete_stream(url, stream)

    messages = [(last_id, json.loads(data)) for last_id, data in got]
    events = [(last_id, m) for last_id, m in messages if ":" in m["type"]]
    assert [m["offset"] for _, m in events] == offsets
    assert [m["payload"]["n"] for _, m in events] == list(range(12))
    assert [last_id for last_id, _ in events] == [f"{epoch}:{offset}" for offset in offsets]
    others = [m for _, m in messages if ":" not in m["type"]]
    assert [m["type"] for m in others] == ["subscribed", "error", "subscribed"]
    assert "recovered" not in others[0]
    assert others[1]["code"] == "going_away"
    assert others[2]["recovered"] is True
