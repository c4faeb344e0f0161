"""Defence in depth: bytes no parser accepts get a clear error and a warning (never UNKNOWN, 1011 or a traceback),
and no single event, however it got onto the bus, stops a delivery loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import nats
import pytest
import structlog
from fuzz_strategies import deep_struct, field
from nats_support import delete_stream, nats_bus_of, nats_settings, shared_nats_url, unique_names
from nexus.gateway.server import GatewayServer
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from nexus import Event, EventHandler
from nexus.bus.nats_codec import encode_event, read_event
from nexus.errors import NexusError, PayloadTooLarge
from nexus.events import EventLimits
from nexus.logs import LogLimiter
from nexus.testing import TestServer, run_server
from nexus.v1 import nexus_pb2

GUARD = 10.0
SERVICE = "/nexus.v1.NexusService/"


class Echo(EventHandler):
    event_type = "bad:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"ok": True}


@pytest.fixture
async def nexus() -> AsyncIterator[TestServer]:
    async with run_server(Echo()) as server:
        yield server


# --- hand-built protobuf bytes ----------------------------------------------------------------------------------


def deep_struct_request(levels: int) -> bytes:
    """An EventRequest whose payload Struct nests ``levels`` objects."""
    return deep_struct(levels, b"bad:thing:v1:made")


def random_garbage(seed: int) -> bytes:
    """Random bytes that protobuf refuses as an EventRequest."""
    rng = random.Random(seed)
    while True:
        data = rng.randbytes(64)
        try:
            nexus_pb2.EventRequest.FromString(data)
        except Exception:
            return data


UNDECODABLE: list[tuple[str, bytes]] = [
    ("random bytes", random_garbage(1)),
    ("a truncated field", b"\x0a\xff\xff\x03abc"),
    ("a Struct nested 200 levels", deep_struct_request(200)),
    ("invalid UTF-8 in event_type", field(1, b"bad:thing:v1:\xff\xfe")),
    (
        "invalid UTF-8 in a metadata key",
        field(1, b"bad:thing:v1:made") + field(4, field(1, b"\xc3") + field(2, b"v")),
    ),
]


async def raw_unary(server: TestServer, method: str, data: bytes) -> grpc.aio.AioRpcError:
    """Send ``data`` as the request of a unary call with identity serializers; return the error it ends with."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = channel.unary_unary(SERVICE + method)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call(data), GUARD)
    return caught.value


async def raw_stream(server: TestServer, method: str, data: bytes) -> grpc.aio.AioRpcError:
    """Send ``data`` as the request of a server-streaming call; return the error it ends with."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = channel.unary_stream(SERVICE + method)(data)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), GUARD)
    return caught.value


def assert_clean_refusal(error: grpc.aio.AioRpcError, caplog: pytest.LogCaptureFixture) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    details = error.details() or ""
    assert "not a valid nexus.v1." in details, details
    assert len(details) <= 300
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an error was logged"


@pytest.mark.parametrize(("what", "data"), UNDECODABLE, ids=[u[0] for u in UNDECODABLE])
async def test_undecodable_bytes_get_invalid_argument_and_one_warning(
    nexus: TestServer, caplog: pytest.LogCaptureFixture, what: str, data: bytes
) -> None:
    """Bytes that are no EventRequest end EmitEvent with INVALID_ARGUMENT naming the message type, log a
    warning without a traceback (nothing at error level), and the server goes on serving: a subscriber to '>'
    gets the next valid event."""
    recorder = await nexus.record(">")
    try:
        with structlog.testing.capture_logs() as logs:
            error = await raw_unary(nexus, "EmitEvent", data)
        assert_clean_refusal(error, caplog)
        [warning] = [line for line in logs if line["event"] == "grpc_undecodable_request"]
        assert warning["log_level"] == "warning"
        assert warning["method"] == SERVICE + "EmitEvent"
        assert "exc_info" not in warning
        after = await nexus.client.emit("bad:thing:v1:made", {"after": what})
        events = await recorder.wait_for(lambda evs: any(e.offset == after.offset for e in evs), GUARD)
        assert [e.offset for e in events] == [after.offset]
    finally:
        await recorder.stop()


@pytest.mark.parametrize("method", ["SubscribeEvents", "SubscribeEventBatches", "RequestEvent"])
async def test_server_streaming_methods_refuse_undecodable_bytes(
    nexus: TestServer, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    """Garbage sent to a server-streaming method (handlers written with context.write or as async generators)
    ends it with INVALID_ARGUMENT too."""
    error = await raw_stream(nexus, method, deep_struct_request(200) if method == "RequestEvent" else b"\x0a\xff")
    assert_clean_refusal(error, caplog)


async def test_cancel_and_listings_refuse_undecodable_bytes(
    nexus: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Every unary method checks its request, not only the publishing ones."""
    for method in ("CancelStream", "ListHandlers", "ListStreams"):
        assert_clean_refusal(await raw_unary(nexus, method, b"\x0a\xff\xff\x03abc"), caplog)


async def test_a_publish_stream_stops_at_an_undecodable_message(
    nexus: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """PublishEvents stores what came before a message it cannot decode, then ends with INVALID_ARGUMENT naming
    the message's index in the stream."""
    good = nexus_pb2.PublishEventsRequest(
        event=nexus_pb2.EventRequest(event_type="bad:thing:v1:made", event_id="first")
    ).SerializeToString()
    head = await nexus.bus.head_offset()

    async def requests() -> AsyncIterator[bytes]:
        yield good
        yield field(1, deep_struct_request(200))  # PublishEventsRequest.event

    async with grpc.aio.insecure_channel(nexus.address) as channel:
        call = channel.stream_unary(SERVICE + "PublishEvents")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call(requests()), GUARD)
    assert_clean_refusal(caught.value, caplog)
    assert (caught.value.details() or "").startswith("message 1 of the stream")
    assert await nexus.bus.head_offset() == head + 1


# --- rate-limited warnings --------------------------------------------------------------------------------------


def test_warnings_of_one_kind_are_rate_limited_and_report_what_was_dropped() -> None:
    """At most N lines per kind per window; the first line after the window says how many were held back; other
    kinds are counted apart."""
    now = [0.0]
    limiter = LogLimiter(lines=2, window_s=10.0, clock=lambda: now[0])
    log = structlog.get_logger("test")
    with structlog.testing.capture_logs() as logs:
        written = [limiter.warning(log, "bad_frame", code="x") for _ in range(5)]
        assert limiter.warning(log, "other_kind")
        now[0] = 10.0
        assert limiter.warning(log, "bad_frame", code="x")
    assert written == [True, True, False, False, False]
    assert [(line["event"], line.get("suppressed")) for line in logs] == [
        ("bad_frame", None),
        ("bad_frame", None),
        ("other_kind", None),
        ("bad_frame", 3),
    ]
    assert all(line["log_level"] == "warning" and "exc_info" not in line for line in logs)


# --- one event that cannot be sent never stops a delivery loop ----------------------------------------------------


def deep_payload(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"n": value}
    return value


def unsendable_events() -> list[Event]:
    """Events no edge would accept, built directly (as if read from an old NATS stream) to bypass validation."""
    return [
        Event("bad:thing:v1:made", {"s": "x"}, metadata={"k": "\ud800"}),
        Event("bad:thing:v1:made", {"\udfff": 1}),
        Event("bad:thing:v1:made", deep_payload(200)),
        Event("bad:thing:v1:made", {"n": float("nan")}),
    ]


class WsPeer:
    """A WebSocket client reading JSON frames."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, frame: Any) -> None:
        await self.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        async with asyncio.timeout(GUARD):
            data = await self.ws.recv()
        frame: dict[str, Any] = json.loads(data)
        return frame

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        frames = []
        while True:
            frames.append(await self.recv())
            if predicate(frames[-1]):
                return frames


@contextlib.asynccontextmanager
async def ws_peer(server: TestServer) -> AsyncIterator[WsPeer]:
    async with connect(server.ws_url, subprotocols=[Subprotocol("nexus.v1")]) as ws:
        peer = WsPeer(ws)
        assert (await peer.recv())["type"] == "connection"
        yield peer


@pytest.fixture
async def gateway() -> AsyncIterator[TestServer]:
    async with run_server(Echo(), gateway=True) as server:
        yield server


async def test_subscribers_skip_an_event_they_cannot_be_sent_and_keep_their_place(gateway: TestServer) -> None:
    """Events holding lone surrogates, a 200-deep payload or NaN, put straight on the bus, are skipped by gRPC
    subscribers (SubscribeEvents and SubscribeEventBatches) and WebSocket subscribers to '>', each counted once;
    every valid event before and after them arrives, in order, on the same calls and socket."""
    bus = gateway.bus
    recorder = await gateway.record(">")  # the SDK: SubscribeEventBatches
    single = gateway.client.stub.SubscribeEvents(nexus_pb2.SubscribeRequest(event_types=[">"]))
    await asyncio.wait_for(single.initial_metadata(), GUARD)
    try:
        async with ws_peer(gateway) as peer:
            await peer.send({"type": "subscribe", "event_types": [">"]})
            await peer.until(lambda f: f["type"] == "subscribed")
            before = (await bus.publish(Event("bad:thing:v1:made", {"i": "before"}))).event.offset
            for bad in unsendable_events():
                await bus.publish(bad)
            after = [(await bus.publish(Event("bad:thing:v1:made", {"i": i}))).event.offset for i in range(3)]
            wanted = [before, *after]

            frames = await peer.until(lambda f: f.get("offset") == after[-1])
            offsets = [f["offset"] for f in frames if f["type"] == "bad:thing:v1:made"]
            deep = before + 3  # the 200-deep payload is valid JSON: WebSocket clients get it
            assert offsets == [before, deep, *after]
            batched = await recorder.wait_for(lambda evs: any(e.offset == after[-1] for e in evs), GUARD)
            assert [e.offset for e in batched] == wanted
            received: list[int] = []
            while len(received) < len(wanted):
                reply = await asyncio.wait_for(single.read(), GUARD)
                received.append(reply.offset)
            assert received == wanted

            # The socket still works both ways.
            await peer.send({"type": "ping", "ref": "still-open"})
            assert (await peer.until(lambda f: f["type"] == "pong"))[-1]["ref"] == "still-open"
        server = gateway.server
        assert server.servicer.events_skipped == len(unsendable_events())
        assert isinstance(server.gateway, GatewayServer)
        assert server.gateway.stats.events_skipped == 3  # JSON carries a 200-deep payload
    finally:
        single.cancel()
        await recorder.stop()


# --- the gateway's decoder ----------------------------------------------------------------------------------------

BAD_FRAMES: list[tuple[str, str | bytes, str]] = [
    ("text that is not JSON", "not json {", "invalid_json"),
    ("arrays nested 10,000 deep", "[" * 10_000 + "]" * 10_000, "invalid_json"),
    ("objects nested 10,000 deep", '{"a":' * 10_000 + "1" + "}" * 10_000, "invalid_json"),
    ("a binary frame that is not UTF-8", b"\xff\xfe\x00garbage", "invalid_json"),
    ("a binary frame of random bytes", random.Random(7).randbytes(300), "invalid_json"),
    ("a JSON array", "[1, 2, 3]", "not_an_object"),
    ("a JSON string", '"subscribe"', "not_an_object"),
    ("NaN", '{"type":"bad:thing:v1:made","payload":{"x":NaN}}', "invalid_json"),
    ("1e999 in a payload", '{"type":"bad:thing:v1:made","payload":{"x":1e999}}', "invalid_payload"),
    ("1e999 as since_offset", '{"type":"subscribe","event_types":[">"],"since_offset":1e999}', "invalid_frame"),
    ("a 5,000-digit integer", '{"type":"bad:thing:v1:made","payload":{"x":' + "9" * 5000 + "}}", "invalid_json"),
    ("a lone surrogate in metadata", '{"type":"bad:thing:v1:made","metadata":{"k":"\\ud800"}}', "invalid_payload"),
    ("a lone surrogate in a payload key", '{"type":"bad:thing:v1:made","payload":{"\\udfff":1}}', "invalid_payload"),
    ("a lone surrogate in ref", '{"type":"nope","ref":"\\ud800"}', "unknown_type"),
    ("a lone surrogate in an epoch", '{"type":"subscribe","event_types":[">"],"epoch":"\\ud800"}', "invalid_frame"),
    ("a lone surrogate in a cancel", '{"type":"cancel","correlation_id":"c","reason":"\\ud800"}', "invalid_frame"),
]


@pytest.mark.parametrize(("what", "frame", "code"), BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
async def test_a_bad_frame_gets_an_error_frame_and_the_connection_stays_open(
    gateway: TestServer, caplog: pytest.LogCaptureFixture, what: str, frame: str | bytes, code: str
) -> None:
    """Each bad frame is answered by an error frame with its stable code and a short message, logged as a
    warning without a traceback; the socket stays open (no 1011) and still publishes and receives events."""
    async with ws_peer(gateway) as peer:
        await peer.send({"type": "subscribe", "event_types": ["bad:>"]})
        await peer.until(lambda f: f["type"] == "subscribed")
        with structlog.testing.capture_logs() as logs:
            await peer.send(frame)
            [error] = await peer.until(lambda f: f["type"] == "error")
        assert error["code"] == code, error
        assert 0 < len(error["message"]) <= 300, error
        assert "sys.set_int_max_str_digits" not in error["message"]
        assert [line for line in logs if line["event"] == "gateway_bad_frame"], logs
        assert not [line for line in logs if line["log_level"] in ("error", "critical") or "exc_info" in line]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

        await peer.send({"type": "bad:thing:v1:made", "payload": {"after": what}})
        frames = await peer.until(lambda f: f["type"] == "bad:thing:v1:made")
        assert frames[-1]["payload"] == {"after": what}
        assert peer.ws.close_code is None


# --- the NATS tail checks what others wrote -----------------------------------------------------------------------


def nats_poison(prefix: str) -> list[tuple[str, bytes]]:
    """Messages on Nexus subjects that are no valid event, as another writer (an old Nexus, a NATS tool) might
    leave them in the stream."""
    subject = f"{prefix}.bad.thing.v1.made"

    def envelope(payload: str = "{}", metadata: str = "{}", ts: str = '"2024-01-01T00:00:00Z"') -> bytes:
        return f'{{"v":1,"id":"poison","ts":{ts},"payload":{payload},"metadata":{metadata}}}'.encode()

    many = "{" + ",".join(f'"k{i}":"v"' for i in range(65)) + "}"
    return [
        (subject, b"not json {"),
        (subject, b"\xff\xfe not UTF-8"),
        (subject, b"[1, 2, 3]"),
        (subject, envelope(payload='{"s":"\\ud800"}')),
        (subject, envelope(metadata='{"\\udc00":"v"}')),
        (subject, b'{"\\ud83d": 1}'),
        (subject, envelope(payload='{"a":' * 200 + "1" + "}" * 200)),
        (subject, b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
        (subject, b'{"x": NaN}'),
        (subject, b'{"x": 1e999}'),
        (subject, b'{"x": ' + b"9" * 5000 + b"}"),
        (subject, envelope(metadata=many)),
        (subject, envelope(ts='"yesterday"')),
        (f"{prefix}.Bad.thing.v1.made", b"{}"),
        (f"{prefix}.bad.thing", b"{}"),
        (f"{prefix}.bad.thing.v99999999999.made", b"{}"),
    ]


async def test_the_nats_tail_quarantines_poison_and_keeps_its_place() -> None:
    """Messages that are no valid event are skipped by the tail (counted in the bus stats, one warning each, never
    delivered) while live gRPC and WebSocket subscribers and a subscriber replaying from before them receive every
    valid event, in order — a plain JSON object from another tool included."""
    url = shared_nats_url()
    stream, prefix = unique_names("poison")
    try:
        settings = nats_settings(url, stream, prefix)
        async with run_server(Echo(), settings=settings, gateway=True) as nexus, ws_peer(nexus) as peer:
            bus = nats_bus_of(nexus)
            before = await nexus.client.emit("bad:thing:v1:made", {"i": "before"})
            live = await nexus.record(">")
            await peer.send({"type": "subscribe", "event_types": [">"]})
            await peer.until(lambda f: f["type"] == "subscribed")
            poison = nats_poison(prefix)
            nc = await nats.connect(url)
            try:
                js = nc.jetstream()
                with structlog.testing.capture_logs() as logs:
                    for subject, body in poison:
                        await js.publish(subject, body, stream=stream)
                    foreign = (await js.publish(f"{prefix}.bad.thing.v1.made", b'{"temperature": 21}')).seq
                    after = await nexus.client.emit("bad:thing:v1:made", {"i": "after"})
                    wanted = [foreign, after.offset]

                    events = await live.wait_for(lambda evs: any(e.offset == after.offset for e in evs), GUARD)
                    assert [e.offset for e in events] == wanted
                    assert events[0].payload == {"temperature": 21}
                    frames = await peer.until(lambda f: f.get("offset") == after.offset)
                    assert [f["offset"] for f in frames if "offset" in f] == wanted

                    replay = await nexus.record(">", since_offset=before.offset)
                    try:
                        replayed = await replay.wait_for(lambda evs: any(e.offset == after.offset for e in evs), GUARD)
                        assert [e.offset for e in replayed] == wanted
                    finally:
                        await replay.stop()
            finally:
                await nc.close()
            assert bus.stats().quarantined == len(poison)
            assert nexus.server.provider.stats()["quarantined"] == len(poison)
            tail_warnings = [
                line for line in logs if line["event"] == "nats_message_quarantined" and line["path"] == "tail"
            ]
            assert len(tail_warnings) == 5  # rate-limited: the rest are counted, not logged
            assert all(line["log_level"] == "warning" and "exc_info" not in line for line in tail_warnings)
            await live.stop()
    finally:
        await delete_stream(url, stream)


def test_every_poison_body_is_refused_with_a_reason_without_a_server() -> None:
    """The codec refuses each poison body with a NexusError and a short reason (no NATS needed), and still reads a
    valid envelope and a plain object from another tool."""
    for subject, body in nats_poison("p"):
        if subject != "p.bad.thing.v1.made":
            continue  # the bus refuses those by subject
        with pytest.raises(NexusError) as caught:
            read_event("bad:thing:v1:made", body, offset=1, epoch="E")
        assert 0 < len(caught.value.message) <= 300
    event = Event.create("bad:thing:v1:made", {"n": 1}, metadata={"k": "v"})
    assert read_event("bad:thing:v1:made", encode_event(event), offset=3, epoch="E") == event.stored(3, "E")
    assert read_event("bad:thing:v1:made", b'{"t": 21}', offset=4, epoch="E").payload == {"t": 21}


def test_the_codec_measures_events_that_may_be_over_the_limits() -> None:
    """A body over the limits is refused as too large, also when its numbers only grow past the limit once
    re-encoded (1e15 is 1000000000000000.0), and text with escapes is checked for lone surrogates."""
    limits = EventLimits(max_event_bytes=2_000, max_payload_bytes=1_500)
    with pytest.raises(PayloadTooLarge):
        read_event("bad:thing:v1:made", b'{"s": "' + b"x" * 1_600 + b'"}', offset=1, epoch="E", limits=limits)
    numbers = b'{"a": [' + b",".join([b"1e15"] * 100) + b"]}"  # 500 bytes here, 1,900 re-encoded
    with pytest.raises(PayloadTooLarge):
        read_event("bad:thing:v1:made", numbers, offset=1, epoch="E", limits=limits)
    escaped = b'{"ok": "\\u00e9\\ud83d\\ude00", "bad": "\\ud800"}'
    with pytest.raises(NexusError, match="surrogate"):
        read_event("bad:thing:v1:made", escaped, offset=1, epoch="E", limits=limits)
    fine = read_event("bad:thing:v1:made", b'{"ok": "\\u00e9\\ud83d\\ude00"}', offset=1, epoch="E", limits=limits)
    assert fine.payload == {"ok": "é😀"}
