"""Hostile input at the gRPC edge: each poison input gets a clear status with a short message, and subscribers
matching everything keep receiving every later event.

The same checks run for every edge (they live in ``Event.create``); the unit tests of ``nexus.events`` cover
each rule, these prove the edge reports them as statuses and that nobody else's delivery is touched.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from nexus import Event, EventHandler, Stream, StreamingEventHandler
from nexus.grpc.convert import event_from_response
from nexus.testing import TestServer, run_server
from nexus.v1 import nexus_pb2

GUARD = 10.0


class Echo(EventHandler):
    event_type = "bad:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"ok": True}


@pytest.fixture
async def nexus() -> AsyncIterator[TestServer]:
    async with run_server(Echo()) as server:
        yield server


def nested_struct(depth: int) -> struct_pb2.Struct:
    """A payload whose objects nest ``depth`` levels (the payload itself is level 1)."""
    value: Any = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


async def emit_raw(server: TestServer, request: nexus_pb2.EventRequest) -> grpc.aio.AioRpcError:
    """Send a raw EmitEvent and return the error it must end with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.client.stub.EmitEvent(request)
    return caught.value


POISON: list[tuple[str, nexus_pb2.EventRequest, grpc.StatusCode]] = [
    (
        "a 5,000-digit version",
        nexus_pb2.EventRequest(event_type="a:b:v" + "9" * 5000 + ":c"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "a version over 31 bits",
        nexus_pb2.EventRequest(event_type="a:b:v99999999999999999999999:c"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    ("a long bad event type", nexus_pb2.EventRequest(event_type="X" * 20_000), grpc.StatusCode.INVALID_ARGUMENT),
    (
        "an event id with a newline",
        nexus_pb2.EventRequest(event_type="bad:thing:v1:made", event_id="a\nb"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "an event id with NUL",
        nexus_pb2.EventRequest(event_type="bad:thing:v1:made", event_id="a\x00b"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "an event id of 257 characters",
        nexus_pb2.EventRequest(event_type="bad:thing:v1:made", event_id="x" * 257),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "a payload 33 levels deep",
        nexus_pb2.EventRequest(event_type="bad:thing:v1:made", payload=nested_struct(33)),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "3.9 MB of metadata",
        nexus_pb2.EventRequest(event_type="bad:thing:v1:made", metadata={"k": "v" * 3_900_000}),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    (
        "100,000 metadata entries",
        nexus_pb2.EventRequest(event_type="bad:thing:v1:made", metadata={f"k{i}": "v" for i in range(100_000)}),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
]


@pytest.mark.parametrize(("what", "request_", "code"), POISON, ids=[p[0] for p in POISON])
async def test_poison_is_refused_with_a_short_clear_status(
    nexus: TestServer, what: str, request_: nexus_pb2.EventRequest, code: grpc.StatusCode
) -> None:
    """Each poison input ends the call with its status code and a message of at most a few hundred characters;
    nothing is stored, and a subscriber to '>' still gets the next valid event."""
    recorder = await nexus.record(">")
    try:
        head = await nexus.bus.head_offset()
        error = await emit_raw(nexus, request_)
        assert error.code() == code, error.details()
        details = error.details() or ""
        assert 0 < len(details) <= 300, details
        assert "Traceback" not in details
        assert await nexus.bus.head_offset() == head
        after = await nexus.client.emit("bad:thing:v1:made", {"after": what})
        events = await recorder.wait_for(lambda evs: any(e.offset == after.offset for e in evs), GUARD)
        assert [e.offset for e in events] == [after.offset]
    finally:
        await recorder.stop()


async def test_the_largest_allowed_event_is_stored(nexus: TestServer) -> None:
    """Limits refuse what is over them, not what is at them: depth 32, 64 metadata entries, a 256-char id."""
    request = nexus_pb2.EventRequest(
        event_type="bad:thing:v2147483647:made",
        event_id="i" * 256,
        payload=nested_struct(32),
        metadata={f"k{i}": "v" for i in range(64)},
    )
    reply = await nexus.client.stub.EmitEvent(request)
    stored = event_from_response(reply)
    assert stored.offset > 0
    assert stored.event_type == "bad:thing:v2147483647:made"


async def test_a_bad_pattern_quotes_only_a_little_of_itself(nexus: TestServer) -> None:
    """A huge invalid pattern is refused with INVALID_ARGUMENT and a short message."""
    call = nexus.client.stub.SubscribeEvents(nexus_pb2.SubscribeRequest(event_types=["Q" * 50_000]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), GUARD)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(caught.value.details() or "") <= 300


async def test_a_subscribe_with_100_000_patterns_is_refused_at_once(nexus: TestServer) -> None:
    """Too many patterns end the call with RESOURCE_EXHAUSTED before any is indexed; others keep being served."""
    recorder = await nexus.record(">")
    try:
        patterns = [f"bad:p{n}:*:*" for n in range(100_000)]
        call = nexus.client.stub.SubscribeEvents(nexus_pb2.SubscribeRequest(event_types=patterns))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), GUARD)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over the limit of 256" in (caught.value.details() or "")
        after = await nexus.client.emit("bad:thing:v1:made")
        events = await recorder.wait_for(lambda evs: any(e.offset == after.offset for e in evs), GUARD)
        assert events[-1].offset == after.offset
    finally:
        await recorder.stop()


class Hold(StreamingEventHandler):
    event_type = "bad:stream_hold"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"held": True})
        await asyncio.Event().wait()


async def test_a_connection_publishing_over_its_rate_is_refused_and_others_are_not() -> None:
    """Past its burst, a connection's publishes get RESOURCE_EXHAUSTED; another connection still publishes."""
    async with run_server(Echo(), publish_rate_per_s=0.5, publish_burst=5) as server:
        for n in range(5):
            await server.client.emit("bad:thing:v1:made", {"n": n})
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.client.stub.EmitEvent(nexus_pb2.EventRequest(event_type="bad:thing:v1:made"))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "publishes per second on this connection" in (caught.value.details() or "")
        other = await server.client_for()
        try:
            assert (await other.emit("bad:thing:v1:made", {"other": True})).offset > 0
        finally:
            await other.close()


async def test_a_connection_holds_a_bounded_number_of_subscriptions_and_requests() -> None:
    """Subscriptions and running requests per connection are bounded; ending one makes room again."""
    async with run_server(Echo(), Hold(), max_subscriptions_per_connection=2, max_requests_per_connection=1) as server:
        stub = server.client.stub
        first = stub.SubscribeEvents(nexus_pb2.SubscribeRequest(event_types=[">"]))
        second = stub.SubscribeEvents(nexus_pb2.SubscribeRequest(event_types=[">"]))
        await first.initial_metadata()
        await second.initial_metadata()
        third = stub.SubscribeEvents(nexus_pb2.SubscribeRequest(event_types=[">"]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(third.read(), GUARD)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.cancel()
        await asyncio.sleep(0.1)
        fourth = stub.SubscribeEvents(nexus_pb2.SubscribeRequest(event_types=[">"]))
        assert dict(await fourth.initial_metadata())["nexus-epoch"]
        fourth.cancel()
        second.cancel()

        held = stub.RequestEvent(
            nexus_pb2.RequestEventRequest(event=nexus_pb2.EventRequest(event_type="bad:stream_hold:v1:requested"))
        )
        await asyncio.wait_for(held.read(), GUARD)
        refused = stub.RequestEvent(
            nexus_pb2.RequestEventRequest(event=nexus_pb2.EventRequest(event_type="bad:echo:v1:requested"))
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(refused.read(), GUARD)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "still running" in (caught.value.details() or "")
        held.cancel()
