"""End to end against a real gRPC server: emit, subscribe, resume, slow subscribers, requests and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nexus import Event, EventHandler, Stream, StreamingEventHandler
from nexus.client import NexusClient
from nexus.errors import NexusError
from nexus.grpc.convert import event_from_response, payload_to_struct, struct_to_payload
from nexus.testing import Recorder, TestServer, run_server
from nexus.v1 import nexus_pb2, nexus_pb2_grpc

GUARD = 10.0
"""Seconds any awaited condition may take before the test fails (a guard, not a measurement)."""

RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z\Z")

SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
"""Channel options that keep a client's receive window tiny, so a client that does not read pushes back at once
instead of gRPC buffering megabytes for it."""

SERVICE = "nexus.v1.NexusService"


# --- handlers ---------------------------------------------------------------------------------------------------


class Echo(EventHandler):
    event_type = "demo:echo"

    def __init__(self) -> None:
        self.seen: list[Event] = []

    async def handle(self, event: Event) -> dict[str, Any]:
        self.seen.append(event)
        return {"echo": event.payload}


class Boom(EventHandler):
    event_type = "demo:boom"

    async def handle(self, event: Event) -> dict[str, Any]:
        raise ValueError("boom: the handler broke")


class Chunks(StreamingEventHandler):
    """Sends ``n`` chunks ``{"i": i}``; with ``hold`` waits for ``gate`` afterwards; with ``fail`` raises."""

    event_type = "demo:stream_chunks"

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        for i in range(int(event.payload["n"])):
            await stream.send({"i": i})
        if event.payload.get("hold"):
            await self.gate.wait()
        if event.payload.get("fail"):
            raise RuntimeError("chunks ran dry")


class Hold(StreamingEventHandler):
    """Runs until ``release`` is set (no timeout); with ``trickle`` sends a chunk every ``every`` seconds."""

    event_type = "demo:stream_hold"
    stream_timeout = None

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        if not event.payload.get("trickle"):
            await self.release.wait()
            return
        every = float(event.payload.get("every", 0.02))
        sent = 0
        while not self.release.is_set():
            await stream.send({"i": sent})
            sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), every)


class ShortHang(StreamingEventHandler):
    """Never ends by itself; its 0.3 s stream timeout ends it."""

    event_type = "demo:stream_short"
    stream_timeout = 0.3

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await asyncio.Event().wait()


@dataclasses.dataclass
class Handlers:
    echo: Echo
    boom: Boom
    chunks: Chunks
    hold: Hold
    short: ShortHang


@pytest.fixture
def handlers() -> Handlers:
    """Fresh handler instances for one test."""
    return Handlers(Echo(), Boom(), Chunks(), Hold(), ShortHang())


@pytest.fixture
async def nexus(handlers: Handlers) -> AsyncIterator[TestServer]:
    """A server with every test handler and 50 ms heartbeats."""
    async with run_server(
        handlers.echo, handlers.boom, handlers.chunks, handlers.hold, handlers.short, heartbeat_interval=0.05
    ) as server:
        yield server


# --- helpers ----------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_stub(address: str, options: list[tuple[str, int]] | None = None) -> AsyncIterator[Any]:
    """A ``NexusServiceStub`` on its own channel, closed afterwards."""
    channel = grpc.aio.insecure_channel(address, options=options or [])
    try:
        yield nexus_pb2_grpc.NexusServiceStub(channel)
    finally:
        await channel.close()


def event_request(
    event_type: str,
    payload: dict[str, Any] | None = None,
    *,
    event_id: str = "",
    metadata: dict[str, str] | None = None,
) -> nexus_pb2.EventRequest:
    return nexus_pb2.EventRequest(
        event_type=event_type, event_id=event_id, payload=payload_to_struct(payload or {}), metadata=metadata or {}
    )


def subscribe_request(*patterns: str, since_offset: int = 0, epoch: str = "") -> nexus_pb2.SubscribeRequest:
    return nexus_pb2.SubscribeRequest(event_types=list(patterns), since_offset=since_offset, epoch=epoch)


async def take(call: Any, count: int, *, skip_heartbeats: bool = False) -> list[Any]:
    """Read ``count`` messages from a server stream; fail if it ends first or after GUARD seconds."""
    messages: list[Any] = []
    async with asyncio.timeout(GUARD):
        while len(messages) < count:
            message = await call.read()
            assert message is not grpc.aio.EOF, f"the stream ended after {len(messages)} messages"
            if skip_heartbeats and message.event_type.endswith(":heartbeat"):
                continue
            messages.append(message)
    return messages


async def drain(call: Any, messages: list[Any] | None = None) -> list[Any]:
    """Read a server stream to its end into ``messages`` (a status other than OK raises AioRpcError)."""
    messages = [] if messages is None else messages
    async with asyncio.timeout(GUARD):
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return messages
            messages.append(message)


async def metadata_of(call: Any) -> dict[str, str]:
    async with asyncio.timeout(GUARD):
        return {str(key): str(value) for key, value in (await call.initial_metadata() or ())}


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` until it holds; fail after GUARD seconds naming ``what``."""
    try:
        async with asyncio.timeout(GUARD):
            while True:
                if await condition():
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out waiting until {what}")


async def assert_still_serves(address: str) -> None:
    """A new client can subscribe, emit, and receive what it emitted."""
    async with raw_stub(address) as stub:
        call = stub.SubscribeEvents(subscribe_request("check:>"))
        await metadata_of(call)
        stored = await stub.EmitEvent(event_request("check:alive:v1:happened", {"ok": True}))
        assert stored.message == "stored"
        [delivered] = await take(call, 1)
        assert delivered.event_id == stored.event_id
        call.cancel()


def is_rfc3339_utc(text: str) -> bool:
    if not RFC3339_UTC.match(text):
        return False
    return datetime.fromisoformat(text.replace("Z", "+00:00")).utcoffset() == UTC.utcoffset(None)


# --- EmitEvent ------------------------------------------------------------------------------------------------


async def test_emit_returns_the_stored_event(nexus: TestServer) -> None:
    """EmitEvent answers with the event as stored: offset from 1, the bus epoch, an RFC 3339 UTC time, 'stored'."""
    async with raw_stub(nexus.address) as stub:
        reply = await stub.EmitEvent(
            event_request("demo:ping:v1:happened", {"n": 1, "tags": ["a"]}, metadata={"user_id": "u-1"})
        )
    assert reply.success
    assert reply.message == "stored"
    assert reply.event_type == "demo:ping:v1:happened"
    assert reply.event_id
    assert reply.offset == 1
    assert reply.epoch == nexus.bus.epoch
    assert is_rfc3339_utc(reply.timestamp.ToJsonString())
    assert struct_to_payload(reply.payload) == {"n": 1, "tags": ["a"]}
    # As sent, plus what the server says about who sent it (anonymous: the user id is only the client's claim).
    metadata = dict(reply.metadata)
    assert metadata.pop("owner").startswith("connection:")
    assert metadata == {"user_id": "u-1", "auth": "none"}

    second = await nexus.client.emit("demo:ping:v1:happened", {"n": 2})
    assert second.offset == 2
    assert is_rfc3339_utc(second.timestamp)


async def test_repeated_event_id_returns_the_original(nexus: TestServer) -> None:
    """Re-sending an event_id returns the stored original marked 'duplicate'; a new id is always stored."""
    recorder = await nexus.record("demo:>")
    async with raw_stub(nexus.address) as stub:
        first = await stub.EmitEvent(event_request("demo:pay:v1:made", {"amount": 5}, event_id="pay-1"))
        again = await stub.EmitEvent(event_request("demo:pay:v1:made", {"amount": 7}, event_id="pay-1"))
        other = await stub.EmitEvent(event_request("demo:pay:v1:made", {"amount": 5}, event_id="pay-2"))
        anonymous = [await stub.EmitEvent(event_request("demo:pay:v1:made", {"amount": 5})) for _ in range(2)]

    assert first.message == "stored"
    assert again.message == "duplicate"
    assert again.event_id == "pay-1"
    assert again.offset == first.offset
    assert struct_to_payload(again.payload) == {"amount": 5}
    assert again.timestamp == first.timestamp
    assert other.message == "stored"
    assert other.offset == first.offset + 1
    assert [reply.message for reply in anonymous] == ["stored", "stored"]
    assert [reply.offset for reply in anonymous] == [other.offset + 1, other.offset + 2]
    assert await nexus.bus.head_offset() == other.offset + 2

    events = await recorder.wait_count(4)
    assert [event.offset for event in events] == [first.offset, other.offset, *(r.offset for r in anonymous)]
    await recorder.stop()


# --- bad input ------------------------------------------------------------------------------------------------


async def _emit_bad_type(stub: Any) -> None:
    await stub.EmitEvent(event_request("demo:ping:1:happened"))


async def _emit_short_type(stub: Any) -> None:
    await stub.EmitEvent(event_request("demo:ping"))


async def _subscribe_bad_pattern(stub: Any) -> None:
    await stub.SubscribeEvents(subscribe_request("demo:*:v1:BAD")).read()


async def _subscribe_nothing(stub: Any) -> None:
    await stub.SubscribeEvents(subscribe_request()).read()


async def _emit_nan(stub: Any) -> None:
    payload = struct_pb2.Struct()
    payload.update({"x": float("nan")})
    await stub.EmitEvent(nexus_pb2.EventRequest(event_type="demo:ping:v1:happened", payload=payload))


async def _emit_too_large(stub: Any) -> None:
    await stub.EmitEvent(event_request("demo:ping:v1:happened", {"blob": "x" * 3000}))


async def _request_not_requested(stub: Any) -> None:
    call = stub.RequestEvent(nexus_pb2.RequestEventRequest(event=event_request("demo:echo:v1:success")))
    await call.read()


@pytest.mark.parametrize(
    ("attempt", "code", "words"),
    [
        pytest.param(_emit_bad_type, grpc.StatusCode.INVALID_ARGUMENT, ["version", "'1'"], id="bad-version"),
        pytest.param(_emit_short_type, grpc.StatusCode.INVALID_ARGUMENT, ["4", "tokens"], id="two-tokens"),
        pytest.param(_subscribe_bad_pattern, grpc.StatusCode.INVALID_ARGUMENT, ["state", "'BAD'"], id="pattern"),
        pytest.param(_subscribe_nothing, grpc.StatusCode.INVALID_ARGUMENT, ["pattern"], id="no-patterns"),
        pytest.param(_emit_nan, grpc.StatusCode.INVALID_ARGUMENT, ["payload.x", "NaN"], id="nan"),
        pytest.param(_emit_too_large, grpc.StatusCode.RESOURCE_EXHAUSTED, ["1000 bytes"], id="too-large"),
        pytest.param(_request_not_requested, grpc.StatusCode.INVALID_ARGUMENT, ["requested"], id="not-a-request"),
    ],
)
async def test_bad_input_is_refused_and_the_server_keeps_serving(
    attempt: Callable[[Any], Awaitable[None]], code: grpc.StatusCode, words: list[str]
) -> None:
    """Bad input ends the call with the documented status and a message naming the problem; others carry on."""
    async with run_server(Echo(), max_payload_bytes=1000) as nexus:
        async with raw_stub(nexus.address) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await attempt(stub)
        assert caught.value.code() == code
        details = caught.value.details() or ""
        for word in words:
            assert word in details, details
        assert await nexus.bus.head_offset() == 0
        await assert_still_serves(nexus.address)


# --- SubscribeEvents --------------------------------------------------------------------------------------------


async def test_initial_metadata_arrives_before_any_event(nexus: TestServer) -> None:
    """A subscriber learns the epoch and head offset at once, and 'recovered' only when it asked to resume."""
    await nexus.client.emit("demo:ping:v1:happened", {})
    async with raw_stub(nexus.address) as stub:
        live = stub.SubscribeEvents(subscribe_request(">"))
        metadata = await metadata_of(live)
        assert metadata["nexus-epoch"] == nexus.bus.epoch
        assert metadata["nexus-head-offset"] == "1"
        assert "nexus-recovered" not in metadata

        resuming = stub.SubscribeEvents(subscribe_request(">", since_offset=1, epoch=nexus.bus.epoch))
        metadata = await metadata_of(resuming)
        assert metadata["nexus-recovered"] == "true"
        assert metadata["nexus-head-offset"] == "1"
        live.cancel()
        resuming.cancel()


async def test_patterns_select_events_in_order(nexus: TestServer) -> None:
    """Each subscription receives exactly the events its pattern matches, in publish order."""
    published = [
        "demo:note:v1:created",
        "demo:note:v2:created",
        "places:encounter:v1:started",
        "places:visit:v3:ended",
        "demo:login:v1:done",
        "other:thing:v1:happened",
        "demo:end:v1:done",
        "places:end:v1:done",
    ]
    expected = {
        "demo:*:v1:*": ["demo:note:v1:created", "demo:login:v1:done", "demo:end:v1:done"],
        "places:>": ["places:encounter:v1:started", "places:visit:v3:ended", "places:end:v1:done"],
        ">": published,
    }
    async with raw_stub(nexus.address) as stub:
        calls = {pattern: stub.SubscribeEvents(subscribe_request(pattern)) for pattern in expected}
        for call in calls.values():
            await metadata_of(call)
        stored = [await nexus.client.emit(event_type, {"i": i}) for i, event_type in enumerate(published)]
        offsets = {event.event_type: event.offset for event in stored}
        for pattern, types in expected.items():
            received = await take(calls[pattern], len(types))
            assert [message.event_type for message in received] == types, pattern
            assert [message.offset for message in received] == [offsets[t] for t in types], pattern
            calls[pattern].cancel()


async def test_clients_may_publish_stream_and_heartbeat_types(nexus: TestServer) -> None:
    """Events whose state is 'stream' or 'heartbeat' can be emitted by a client and are stored and delivered."""
    recorder = await nexus.record("chat:>")
    chunk = await nexus.client.emit("chat:typing:v1:stream", {"text": "hel"})
    beat = await nexus.client.emit("chat:typing:v1:heartbeat", {"alive": True})
    assert chunk.offset > 0
    assert beat.offset == chunk.offset + 1
    events = await recorder.wait_count(2)
    assert [(e.event_type, e.payload) for e in events] == [
        ("chat:typing:v1:stream", {"text": "hel"}),
        ("chat:typing:v1:heartbeat", {"alive": True}),
    ]
    await recorder.stop()


# --- resume ---------------------------------------------------------------------------------------------------


async def test_resume_replays_every_missed_event_once_then_continues_live(nexus: TestServer) -> None:
    """A subscriber that reconnects with its last offset gets each missed event once, in order, then live ones."""
    client = nexus.client

    async def publish(numbers: range) -> list[Event]:
        matching = []
        for n in numbers:
            matching.append(await client.emit("tick:count:v1:happened", {"n": n}))
            await client.emit("noise:count:v1:happened", {"n": n})  # not matched: never delivered
        return matching

    async with raw_stub(nexus.address) as stub:
        first = stub.SubscribeEvents(subscribe_request("tick:>"))
        await metadata_of(first)
        before = await publish(range(1, 11))
        seen = await take(first, 4)
        assert [struct_to_payload(m.payload)["n"] for m in seen] == [1, 2, 3, 4]
        first.cancel()
        last_seen = seen[-1].offset

        during = await publish(range(11, 16))
        second = stub.SubscribeEvents(subscribe_request("tick:>", since_offset=last_seen, epoch=nexus.bus.epoch))
        metadata = await metadata_of(second)
        assert metadata["nexus-recovered"] == "true"
        assert metadata["nexus-head-offset"] == str(await nexus.bus.head_offset())

        missed = await take(second, 6 + 5)
        assert [m.offset for m in missed] == [e.offset for e in before[4:] + during]
        assert [struct_to_payload(m.payload)["n"] for m in missed] == list(range(5, 16))

        after = await publish(range(16, 18))
        live = await take(second, 2)
        assert [m.offset for m in live] == [e.offset for e in after]
        second.cancel()


@pytest.mark.parametrize(
    ("case", "since_offset", "epoch"),
    [
        pytest.param("older than history", 2, None, id="too-old"),
        pytest.param("another epoch", 9, "0123456789abcdef", id="other-epoch"),
        pytest.param("ahead of head", 1_000, None, id="ahead"),
    ],
)
async def test_resume_that_cannot_replay_says_so_and_continues_live(
    case: str, since_offset: int, epoch: str | None
) -> None:
    """When the gap cannot be replayed exactly the server says recovered=false and continues live."""
    async with run_server(history_size=5) as nexus:
        for n in range(10):
            await nexus.client.emit("tick:count:v1:happened", {"n": n})
        async with raw_stub(nexus.address) as stub:
            call = stub.SubscribeEvents(
                subscribe_request("tick:>", since_offset=since_offset, epoch=epoch or nexus.bus.epoch)
            )
            metadata = await metadata_of(call)
            assert metadata["nexus-recovered"] == "false", case
            assert metadata["nexus-head-offset"] == "10"
            fresh = await nexus.client.emit("tick:count:v1:happened", {"n": 10})
            [first] = await take(call, 1)
            assert first.offset == fresh.offset == 11, case
            call.cancel()


async def test_resume_at_the_edge_of_the_history() -> None:
    """With history_size=5 resuming after offset 5 of 10 replays 6..10; after offset 4 cannot (5 is gone)."""
    async with run_server(history_size=5) as nexus:
        for n in range(10):
            await nexus.client.emit("tick:count:v1:happened", {"n": n})
        async with raw_stub(nexus.address) as stub:
            edge = stub.SubscribeEvents(subscribe_request("tick:>", since_offset=5, epoch=nexus.bus.epoch))
            assert (await metadata_of(edge))["nexus-recovered"] == "true"
            assert [m.offset for m in await take(edge, 5)] == [6, 7, 8, 9, 10]
            beyond = stub.SubscribeEvents(subscribe_request("tick:>", since_offset=4))
            assert (await metadata_of(beyond))["nexus-recovered"] == "false"
            edge.cancel()
            beyond.cancel()


# --- slow subscribers -------------------------------------------------------------------------------------------


def load_events(count: int) -> list[Event]:
    return [Event(event_type="load:item:v1:created", payload={"n": n, "pad": "x" * 64}) for n in range(count)]


async def test_slow_subscriber_is_cut_off_with_its_resume_offset() -> None:
    """A subscriber that does not read is ended with RESOURCE_EXHAUSTED naming its last offset; others get all."""
    total = 5_000
    async with (
        run_server(subscriber_queue=50) as nexus,
        raw_stub(nexus.address, SMALL_WINDOW) as slow_stub,
        raw_stub(nexus.address) as stub,
    ):
        slow = slow_stub.SubscribeEvents(subscribe_request("load:>"))
        await metadata_of(slow)
        fast = stub.SubscribeEvents(subscribe_request("load:>"))
        await metadata_of(fast)
        reader = asyncio.create_task(take(fast, total))
        summary = await nexus.client.publish_many(load_events(total))
        assert summary.stored == total
        received = await reader
        assert [m.offset for m in received] == list(range(1, total + 1))
        assert [struct_to_payload(m.payload)["n"] for m in received] == list(range(total))
        fast.cancel()

        got: list[Any] = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await drain(slow, got)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        last = got[-1].offset if got else 0
        assert [m.offset for m in got] == list(range(1, last + 1))
        assert last < total
        assert f"resume from offset {last}" in (caught.value.details() or "")

        resumed = stub.SubscribeEvents(subscribe_request("load:>", since_offset=last, epoch=nexus.bus.epoch))
        assert (await metadata_of(resumed))["nexus-recovered"] == "true"
        rest = await take(resumed, total - last)
        assert [m.offset for m in rest] == list(range(last + 1, total + 1))
        resumed.cancel()


async def test_sdk_subscription_resumes_after_being_cut_off() -> None:
    """The client SDK's subscription resumes from its last offset after a RESOURCE_EXHAUSTED cut: nothing lost."""
    await _sdk_subscription_cut_off_and_resumed(total=5_000, heartbeat_last=False)


async def test_sdk_subscription_whose_last_event_was_a_heartbeat_resumes_after_its_last_stored_event() -> None:
    """A heartbeat (offset 0) does not move the SDK's resume offset: after a cut nothing stored is lost."""
    await _sdk_subscription_cut_off_and_resumed(total=2_000, heartbeat_last=True)


async def _sdk_subscription_cut_off_and_resumed(*, total: int, heartbeat_last: bool) -> None:
    """An SDK subscriber reads offset 1 (then a heartbeat when ``heartbeat_last``), pauses while ``total`` events
    go out until the server cuts it off, then must receive every one of them, in order, after reconnecting."""
    async with run_server(subscriber_queue=50) as nexus:
        channel = grpc.aio.insecure_channel(nexus.address, options=SMALL_WINDOW)
        async with NexusClient(nexus.address, channel=channel) as client:
            connected = asyncio.Event()
            subscription = client.subscribe("load:>", on_connect=lambda _: connected.set())
            events = aiter(subscription)
            assert isinstance(events, AsyncGenerator)
            first_read = asyncio.ensure_future(anext(events))
            async with asyncio.timeout(GUARD):
                await connected.wait()
            await nexus.client.emit("load:item:v1:created", {"n": -1})
            async with asyncio.timeout(GUARD):
                first = await first_read
            assert first.offset == 1
            if heartbeat_last:
                await nexus.bus.publish_live(Event(event_type="load:item:v1:heartbeat"))
                async with asyncio.timeout(GUARD):
                    heartbeat = await anext(events)
                assert (heartbeat.state, heartbeat.offset, subscription.last_offset) == ("heartbeat", 0, 1)

            # The consumer pauses while the burst goes out, so the server cuts it off.
            await nexus.client.publish_many(load_events(total))
            await wait_until(lambda: _has_slow_consumer(nexus), "the server cut the paused subscriber off")

            received: list[Event] = []
            async with asyncio.timeout(GUARD):
                while len(received) < total:
                    received.append(await anext(events))
            assert [e.offset for e in received] == list(range(2, total + 2))
            assert subscription.connects == 2
            assert subscription.recovered is True
            subscription.close()
            await events.aclose()
        await channel.close()


async def _has_slow_consumer(nexus: TestServer) -> bool:
    return nexus.bus.stats().slow_consumers >= 1


# --- RequestEvent -----------------------------------------------------------------------------------------------


async def test_streaming_request_lifecycle(nexus: TestServer, handlers: Handlers) -> None:
    """A streaming request yields started, its chunks in order, live heartbeats and one success, all correlated."""
    stream = nexus.client.request(
        "demo:stream_chunks:v1:requested", {"n": 3, "hold": True}, metadata={"user_id": "u-7"}
    )
    events: list[Event] = []
    async with asyncio.timeout(GUARD):
        async for event in stream:
            events.append(event)
            if event.state == "heartbeat":
                handlers.chunks.gate.set()

    request = stream.request
    assert request is not None
    assert request.event_type == "demo:stream_chunks:v1:requested"
    assert {k: v for k, v in request.metadata.items() if k != "owner"} == {"user_id": "u-7", "auth": "none"}
    assert request.offset > 0

    stored = [e for e in events if e.state != "heartbeat"]
    assert [e.event_type for e in stored] == [
        "demo:stream_chunks:v1:started",
        "demo:stream_chunks:v1:stream",
        "demo:stream_chunks:v1:stream",
        "demo:stream_chunks:v1:stream",
        "demo:stream_chunks:v1:success",
    ]
    assert [e.payload for e in stored[1:4]] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert stored[-1].payload["stream_count"] == 3
    assert stored[-1].payload["duration_s"] >= 0
    assert stream.terminal is events[-1] is stored[-1]
    offsets = [e.offset for e in stored]
    assert offsets == sorted(offsets)
    assert offsets[0] > request.offset

    heartbeats = [e for e in events if e.state == "heartbeat"]
    assert heartbeats
    for beat in heartbeats:
        assert beat.offset == 0
        assert set(beat.payload) == {"stream_count", "elapsed_s"}

    for event in events:
        assert event.metadata["correlation_id"] == request.event_id
        assert event.metadata["user_id"] == "u-7"
    assert len({request.event_id, *(e.event_id for e in events)}) == len(events) + 1


@pytest.mark.parametrize(
    ("event_type", "payload", "message"),
    [
        pytest.param("demo:boom:v1:requested", {}, "ValueError: boom: the handler broke", id="plain"),
        pytest.param("demo:stream_chunks:v1:requested", {"n": 2, "fail": True}, "chunks ran dry", id="streaming"),
    ],
)
async def test_handler_that_raises_fails_the_request(
    nexus: TestServer, event_type: str, payload: dict[str, Any], message: str
) -> None:
    """A handler that raises ends its request with failed / handler_error and the message; serving goes on."""
    done = await asyncio.wait_for(nexus.client.call(event_type, payload), GUARD)
    assert done.state == "failed"
    assert done.payload["error"]["type"] == "handler_error"
    assert message in done.payload["error"]["message"]
    echo = await asyncio.wait_for(nexus.client.call("demo:echo:v1:requested", {"after": "failure"}), GUARD)
    assert echo.state == "success"


async def test_stream_outliving_its_timeout_times_out(nexus: TestServer) -> None:
    """A handler that hangs past its stream_timeout ends with a timeout event naming the limit."""
    done = await asyncio.wait_for(nexus.client.call("demo:stream_short:v1:requested", {}), GUARD)
    assert done.event_type == "demo:stream_short:v1:timeout"
    assert done.payload["timeout_s"] == pytest.approx(0.3)
    assert done.payload["stream_count"] == 0


async def test_cancel_ends_the_stream_and_frees_everything(nexus: TestServer) -> None:
    """client.cancel() ends a live stream with 'cancelled'; no stream or task of it is left behind."""
    client = nexus.client
    baseline = len(asyncio.all_tasks())
    assert await client.cancel("no-such-stream") is False
    stream = client.request("demo:stream_hold:v1:requested", {})
    events: list[Event] = []
    async with asyncio.timeout(GUARD):
        async for event in stream:
            events.append(event)
            if event.state == "started":
                assert [s["correlation_id"] for s in await client.streams()] == [stream.correlation_id]
                assert await client.cancel(stream.correlation_id, "user pressed stop") is True
    terminal = events[-1]
    assert terminal.event_type == "demo:stream_hold:v1:cancelled"
    assert terminal.payload["reason"] == "user pressed stop"
    assert terminal.correlation_id == stream.correlation_id

    async def settled() -> bool:
        return not await client.streams() and len(asyncio.all_tasks()) <= baseline

    await wait_until(settled, "no stream and no extra task is left")


async def _cancelled_seen(recorder: Recorder, correlation_id: str) -> Event:
    events = await recorder.wait_for(
        lambda evs: any(e.state == "cancelled" and e.correlation_id == correlation_id for e in evs)
    )
    return next(e for e in events if e.state == "cancelled" and e.correlation_id == correlation_id)


async def test_leaving_the_request_iterator_cancels_the_stream(nexus: TestServer) -> None:
    """Breaking out of client.request() early ends the call, and the server cancels the stream."""
    recorder = await nexus.record(">")
    stream = nexus.client.request("demo:stream_hold:v1:requested", {})
    async with asyncio.timeout(GUARD):
        async for event in stream:
            if event.state == "started":
                break
    cancelled = await _cancelled_seen(recorder, stream.correlation_id)
    assert cancelled.event_type == "demo:stream_hold:v1:cancelled"
    await wait_until(_no_streams(nexus), "the stream is gone")
    await recorder.stop()


async def test_cancelling_the_request_call_cancels_the_stream(nexus: TestServer) -> None:
    """Cancelling a raw RequestEvent call makes the server cancel the stream it started."""
    recorder = await nexus.record(">")
    async with raw_stub(nexus.address) as stub:
        call = stub.RequestEvent(
            nexus_pb2.RequestEventRequest(event=event_request("demo:stream_hold:v1:requested", event_id="hold-1"))
        )
        [request, started] = [reply.event for reply in await take(call, 2)]
        assert request.message == "stored"
        assert started.event_type == "demo:stream_hold:v1:started"
        call.cancel()
    cancelled = await _cancelled_seen(recorder, "hold-1")
    assert cancelled.payload["stream_count"] == 0
    await wait_until(_no_streams(nexus), "the stream is gone")
    await recorder.stop()


async def test_requester_leaving_while_the_server_waits_to_send_cancels_the_stream(nexus: TestServer) -> None:
    """A requester that stops reading and then cancels its call still gets its stream cancelled on the server."""
    recorder = await nexus.record("demo:stream_hold:v1:cancelled")
    async with raw_stub(nexus.address, SMALL_WINDOW) as stub:
        call = stub.RequestEvent(
            nexus_pb2.RequestEventRequest(
                event=event_request(
                    "demo:stream_hold:v1:requested", {"trickle": True, "every": 0.002}, event_id="backlogged-1"
                )
            )
        )
        await take(call, 2)

        async def backlogged() -> bool:
            # Far more chunks than the tiny window holds: the server is now waiting to send the next one. (The
            # server's own view: another client is not shown the requester's streams.)
            return any(s["stream_count"] >= 100 for s in await nexus.server.node.streams())

        await wait_until(backlogged, "the stream has run far ahead of the requester")
        call.cancel()
    [cancelled] = await recorder.wait_count(1)
    assert cancelled.correlation_id == "backlogged-1"
    assert await nexus.server.node.streams() == []
    await recorder.stop()


def _has_streams(nexus: TestServer) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(await nexus.client.streams())

    return check


def _no_streams(nexus: TestServer) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not await nexus.client.streams()

    return check


async def test_repeated_request_replays_the_original_lifecycle(nexus: TestServer, handlers: Handlers) -> None:
    """Re-sending a request's event_id returns the original request and its lifecycle; the handler runs once."""
    first = nexus.client.request("demo:echo:v1:requested", {"a": 1}, event_id="req-1")
    done = await asyncio.wait_for(first.result(), GUARD)
    again = nexus.client.request("demo:echo:v1:requested", {"a": 2}, event_id="req-1")
    repeated = await asyncio.wait_for(again.result(), GUARD)
    assert first.duplicate is False
    assert again.duplicate is True
    assert again.request is not None
    assert first.request is not None
    assert again.request.offset == first.request.offset
    assert repeated.event_id == done.event_id
    assert repeated.payload == {"echo": {"a": 1}}
    assert len(handlers.echo.seen) == 1


async def test_request_reusing_the_id_of_another_event_does_not_hang(nexus: TestServer) -> None:
    """A request whose event_id already names a stored non-request event is refused instead of waiting forever."""
    await nexus.client.emit("demo:note:v1:written", {}, event_id="taken-1")
    with pytest.raises(NexusError):
        await asyncio.wait_for(nexus.client.call("demo:echo:v1:requested", {}, event_id="taken-1"), GUARD)


@pytest.mark.parametrize("event_type", ["nobody:home:v1:requested", "nobody:stream_home:v1:requested"])
async def test_request_without_handler_fails_with_no_handler(nexus: TestServer, event_type: str) -> None:
    """A request nobody handles ends with failed / no_handler."""
    done = await asyncio.wait_for(nexus.client.call(event_type, {}), GUARD)
    assert done.state == "failed"
    assert done.payload["error"]["type"] == "no_handler"
    assert event_type in done.payload["error"]["message"]


async def test_plain_request_succeeds_with_the_handler_result(nexus: TestServer, handlers: Handlers) -> None:
    """A plain handler's return value is the success payload; whole numbers reach the handler as int."""
    payload = {"n": 3, "ratio": 2.5, "nested": {"items": [1, 2]}, "big": -(2**40)}
    done = await asyncio.wait_for(nexus.client.call("demo:echo:v1:requested", payload), GUARD)
    assert done.event_type == "demo:echo:v1:success"
    assert done.payload == {"echo": payload}
    [seen] = handlers.echo.seen
    assert type(seen.payload["n"]) is int
    assert seen.payload["n"] == 3
    assert type(seen.payload["nested"]["items"][0]) is int
    assert type(seen.payload["big"]) is int
    assert type(seen.payload["ratio"]) is float


async def test_streams_never_block_other_events(nexus: TestServer, handlers: Handlers) -> None:
    """While 20 slow streams run, plain emits and a plain request still complete."""
    started = await nexus.record("demo:stream_hold:v1:started")
    ended = await nexus.record("demo:stream_hold:v1:success")
    for k in range(20):
        await nexus.client.emit("demo:stream_hold:v1:requested", {"k": k, "trickle": True})
    await started.wait_count(20)

    async with asyncio.timeout(GUARD):
        notes = [await nexus.client.emit("demo:note:v1:written", {"i": i}) for i in range(20)]
        done = await nexus.client.call("demo:echo:v1:requested", {"while": "streaming"})
    assert [note.offset for note in notes] == sorted(note.offset for note in notes)
    assert done.state == "success"
    assert len(await nexus.client.streams()) == 20

    handlers.hold.release.set()
    successes = await ended.wait_count(20)
    assert all(e.payload["stream_count"] >= 1 for e in successes)
    await started.stop()
    await ended.stop()


# --- shutdown ---------------------------------------------------------------------------------------------------


async def test_shutdown_cancels_live_streams_before_subscriptions_end() -> None:
    """On stop a live stream ends with cancelled/server_shutdown, delivered before the subscription ends with OK."""
    async with run_server(Hold()) as nexus, raw_stub(nexus.address) as stub:
        call = stub.SubscribeEvents(subscribe_request("demo:>"))
        await metadata_of(call)
        request = await nexus.client.emit("demo:stream_hold:v1:requested", {})
        head = await take(call, 2, skip_heartbeats=True)
        assert [m.event_type for m in head] == ["demo:stream_hold:v1:requested", "demo:stream_hold:v1:started"]

        await nexus.server.stop(grace=1.0)
        rest = [m for m in await drain(call) if not m.event_type.endswith(":heartbeat")]
        assert await call.code() == grpc.StatusCode.OK
        assert [m.event_type for m in rest] == ["demo:stream_hold:v1:cancelled"]
        cancelled = event_from_response(rest[0])
        assert cancelled.payload["reason"] == "server_shutdown"
        assert cancelled.correlation_id == request.event_id


async def test_shutdown_ends_a_live_request_call_with_cancelled() -> None:
    """A client following a request when the server stops sees the stream's cancelled event as its last."""
    async with run_server(Hold()) as nexus:
        stream = nexus.client.request("demo:stream_hold:v1:requested", {})
        states: list[str] = []

        async def follow() -> None:
            async for event in stream:
                states.append(event.state)

        follower = asyncio.create_task(follow())
        await wait_until(_has_streams(nexus), "the stream is live")
        await nexus.server.stop(grace=1.0)
        await asyncio.wait_for(follower, GUARD)
        assert states[0] == "started"
        assert states[-1] == "cancelled"
        assert stream.terminal is not None
        assert stream.terminal.payload["reason"] == "server_shutdown"


# --- health, reflection, listings -------------------------------------------------------------------------------


async def test_health_service_reports_serving(nexus: TestServer) -> None:
    """The standard health service answers SERVING for the server and for nexus.v1.NexusService."""
    async with grpc.aio.insecure_channel(nexus.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=GUARD)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_reflection_lists_and_describes_the_service(nexus: TestServer) -> None:
    """Server reflection lists nexus.v1.NexusService and serves the file that defines it."""
    async with grpc.aio.insecure_channel(nexus.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
        ]
        replies = [reply async for reply in reflection.ServerReflectionInfo(iter(requests), timeout=GUARD)]
    services = {service.name for service in replies[0].list_services_response.service}
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in replies[1].file_descriptor_response.file_descriptor_proto
    ]
    defining = [f for f in files if f.package == "nexus.v1"]
    assert defining
    assert "NexusService" in {service.name for f in defining for service in f.service}


async def test_list_handlers_returns_registered_handlers(nexus: TestServer) -> None:
    """ListHandlers describes every registered handler, sorted by event type."""
    listed = await nexus.client.handlers()
    assert [h["event_type"] for h in listed] == [
        "demo:boom",
        "demo:echo",
        "demo:stream_chunks",
        "demo:stream_hold",
        "demo:stream_short",
    ]
    by_type = {str(h["event_type"]): h for h in listed}
    assert by_type["demo:echo"]["streaming"] is False
    assert by_type["demo:stream_chunks"]["streaming"] is True
    assert str(by_type["demo:echo"]["class_path"]).endswith(":Echo")
    assert by_type["demo:stream_short"]["stream_timeout_s"] == pytest.approx(0.3)
    assert by_type["demo:stream_hold"]["stream_timeout_s"] is None


async def test_client_errors_carry_meaning() -> None:
    """The SDK raises NexusError subclasses with the server's message, not raw gRPC errors."""
    async with run_server() as nexus:
        with pytest.raises(NexusError) as caught:
            await nexus.client.emit("Demo:ping:v1:happened", {})
        assert "service 'Demo'" in caught.value.message
