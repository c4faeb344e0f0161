"""The provider driving handlers through the request lifecycle on a memory bus."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio
import pytest
import structlog

from nexus import (
    Event,
    EventHandler,
    HandlerContext,
    InvalidEventType,
    InvalidPayload,
    Stream,
    StreamClosed,
    StreamingEventHandler,
)
from nexus.bus import MemoryBus, Published, Subscription
from nexus.errors import HandlerConfigError
from nexus.events import TERMINAL_STATES, JSONObject
from nexus.provider import Provider, ProviderSettings
from nexus.queue import CancelRequest

QUIET = ProviderSettings(heartbeat_interval=0)


# --- harness ----------------------------------------------------------------------------------------------


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    """A started memory bus, closed after the test."""
    instance = MemoryBus()
    await instance.start()
    yield instance
    await instance.close()


@asynccontextmanager
async def serving(
    bus: MemoryBus, *handlers: EventHandler | StreamingEventHandler, settings: ProviderSettings = QUIET
) -> AsyncIterator[Provider]:
    """Run a provider with ``handlers`` for the duration of the block, then stop it."""
    provider = Provider(bus, settings)
    for handler in handlers:
        provider.register(handler)
    async with anyio.create_task_group() as task_group:
        await task_group.start(provider.run)
        try:
            yield provider
        finally:
            await provider.stop()


class Recorder:
    """Everything a subscription received, with helpers to wait for a request's lifecycle."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.events: list[Event] = []

    async def pull(self) -> None:
        batch = await self.sub.next_batch()
        assert batch, "the subscription ended"
        self.events.extend(batch)

    async def until(self, condition: Callable[[], bool]) -> None:
        with anyio.fail_after(10):
            while not condition():
                await self.pull()

    def of(self, correlation_id: str) -> list[Event]:
        return [event for event in self.events if event.correlation_id == correlation_id]

    def terminals(self, correlation_id: str) -> list[Event]:
        return [event for event in self.of(correlation_id) if event.state in TERMINAL_STATES]

    async def lifecycle(self, correlation_id: str) -> list[Event]:
        """Wait for the request's terminal event; return its lifecycle events so far."""
        await self.until(lambda: bool(self.terminals(correlation_id)))
        return self.of(correlation_id)

    async def terminal(self, correlation_id: str) -> Event:
        await self.lifecycle(correlation_id)
        return self.terminals(correlation_id)[0]


async def record(bus: MemoryBus, patterns: Iterable[str] = (">",)) -> Recorder:
    return Recorder(await bus.subscribe(list(patterns)))


async def send(bus: MemoryBus, event_type: str, payload: JSONObject | None = None, **metadata: str) -> Event:
    """Publish a request and return it as stored."""
    return (await bus.publish(Event.create(event_type, payload or {}, metadata=metadata))).event


def states(events: Iterable[Event]) -> list[str]:
    return [event.state for event in events]


async def settle_tasks(baseline: int) -> None:
    """Wait until the number of asyncio tasks is back to ``baseline``; fail if it never is."""
    for _ in range(5000):
        if len(asyncio.all_tasks()) <= baseline:
            break
        await asyncio.sleep(0.001)
    assert len(asyncio.all_tasks()) == baseline


async def turns(count: int = 50) -> None:
    """Let the event loop run ``count`` times."""
    for _ in range(count):
        await asyncio.sleep(0)


# --- handlers ---------------------------------------------------------------------------------------------------


class Countdown(StreamingEventHandler):
    event_type = "demo:stream_countdown"

    def __init__(self) -> None:
        self.calls = 0

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        self.calls += 1
        for i in range(int(event.payload["n"])):
            await stream.send({"i": i})


BAD_RESULTS: dict[str, object] = {"list": ["not", "a", "dict"], "text": "text", "number": 5, "nan": {"x": math.nan}}


class Echo(EventHandler):
    event_type = "demo:echo"

    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, event: Event) -> JSONObject | None:
        self.calls += 1
        if "result" in event.payload:
            return cast(JSONObject, BAD_RESULTS.get(str(event.payload["result"])))
        return {"echo": event.payload}


class Gated(StreamingEventHandler):
    """Sends one chunk, waits for the test to open the gate, sends another."""

    event_type = "demo:stream_gated"

    def __init__(self) -> None:
        self.gate = anyio.Event()

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"i": 0})
        await self.gate.wait()
        await stream.send({"i": 1})


class Raising(StreamingEventHandler):
    event_type = "demo:stream_raise"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"before": True})
        if event.payload.get("invalid"):
            raise InvalidPayload("field 'n' must be a number")
        raise ValueError("bad input 42")


class PlainRaising(EventHandler):
    event_type = "demo:plain_raise"

    async def handle(self, event: Event) -> JSONObject | None:
        if event.payload.get("invalid"):
            raise InvalidPayload("missing 'agent_id'")
        raise RuntimeError("exploded")


class Hang(StreamingEventHandler):
    event_type = "demo:stream_hang"
    stream_timeout = 0.2

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"i": 0})
        await anyio.sleep_forever()


class Stubborn(StreamingEventHandler):
    """Swallows its cancellation and returns normally, as if it had finished."""

    event_type = "demo:stream_stubborn"
    stream_timeout = 0.1

    def __init__(self) -> None:
        self.late_send_error: BaseException | None = None

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            try:
                await stream.send({"after": "timeout"})
            except BaseException as exc:
                self.late_send_error = exc


class PlainHang(EventHandler):
    event_type = "demo:plain_hang"
    stream_timeout = 0.1

    async def handle(self, event: Event) -> JSONObject | None:
        await anyio.sleep_forever()
        return None


class Waiter(StreamingEventHandler):
    """Signals that it started, then waits until cancelled."""

    event_type = "demo:stream_wait"

    def __init__(self, expected: int = 1) -> None:
        self.expected = expected
        self.count = 0
        self.all_started = anyio.Event()

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        self.count += 1
        if self.count >= self.expected:
            self.all_started.set()
        await anyio.sleep_forever()


class Keeper(StreamingEventHandler):
    """Keeps its Stream object so the test can use it after the stream ended."""

    event_type = "demo:stream_keep"

    def __init__(self) -> None:
        self.kept: list[Stream] = []

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        self.kept.append(stream)
        await stream.send({"i": 0})


# --- streaming lifecycle ----------------------------------------------------------------------------------------


async def test_streaming_lifecycle_order_and_payloads(bus: MemoryBus) -> None:
    """A streaming request yields started, each chunk in order, then success with the chunk count."""
    handler = Countdown()
    async with serving(bus, handler):
        recorder = await record(bus)
        request = await send(bus, "demo:stream_countdown:v1:requested", {"n": 5}, user_id="u1")
        events = await recorder.lifecycle(request.event_id)
    assert states(events) == ["started", "stream", "stream", "stream", "stream", "stream", "success"]
    assert {event.event_type.rsplit(":", 1)[0] for event in events} == {"demo:stream_countdown:v1"}
    assert [event.payload for event in events[1:-1]] == [{"i": i} for i in range(5)]
    assert events[-1].payload["stream_count"] == 5
    assert isinstance(events[-1].payload["duration_s"], float)
    assert events[-1].payload["duration_s"] >= 0
    offsets = [event.offset for event in events]
    assert offsets == sorted(offsets)
    assert offsets[0] > request.offset
    ids = {event.event_id for event in events}
    assert len(ids) == len(events)
    assert request.event_id not in ids
    for event in events:
        assert event.metadata == {"user_id": "u1", "correlation_id": request.event_id}
    stored_request = next(event for event in bus.history() if event.event_id == request.event_id)
    assert stored_request.metadata == {"user_id": "u1"}
    assert handler.calls == 1


async def test_heartbeats_while_stream_lives(bus: MemoryBus) -> None:
    """Heartbeats flow every interval while a stream lives, with offset 0, and stop at its end."""
    handler, other = Gated(), Waiter()
    settings = ProviderSettings(heartbeat_interval=0.05)
    async with serving(bus, handler, other, settings=settings) as provider:
        recorder = await record(bus)
        request = await send(bus, "demo:stream_gated:v1:requested")
        await recorder.until(lambda: states(recorder.of(request.event_id)).count("heartbeat") >= 2)
        handler.gate.set()
        events = await recorder.lifecycle(request.event_id)
        # A second stream living through several intervals shows no heartbeat of the first one follows its end.
        second = await send(bus, "demo:stream_wait:v1:requested")
        await recorder.until(lambda: states(recorder.of(second.event_id)).count("heartbeat") >= 3)
        await provider.cancel(second.event_id)
        await recorder.lifecycle(second.event_id)
    assert recorder.of(request.event_id) == events
    assert states(events)[:3] == ["started", "stream", "heartbeat"]
    assert states(events)[-2:] == ["stream", "success"]
    heartbeats = [event for event in events if event.state == "heartbeat"]
    assert len(heartbeats) >= 2
    assert {event.offset for event in heartbeats} == {0}
    for index, event in enumerate(events):
        if event.state == "heartbeat":
            assert event.payload["stream_count"] == states(events[:index]).count("stream")
            assert event.payload["elapsed_s"] > 0
            assert event.correlation_id == request.event_id
    elapsed = [event.payload["elapsed_s"] for event in heartbeats]
    assert elapsed == sorted(elapsed)
    assert all(event.event_id not in {h.event_id for h in heartbeats} for event in bus.history())
    assert events[-1].payload["stream_count"] == 2


# --- failures ---------------------------------------------------------------------------------------------------


async def test_handler_error_fails_and_server_keeps_serving(bus: MemoryBus) -> None:
    """A streaming handler that raises ends with failed/handler_error and the message; later requests still work."""
    async with serving(bus, Raising(), Countdown()):
        recorder = await record(bus)
        bad = await send(bus, "demo:stream_raise:v1:requested")
        events = await recorder.lifecycle(bad.event_id)
        good = await send(bus, "demo:stream_countdown:v1:requested", {"n": 1})
        assert states(await recorder.lifecycle(good.event_id)) == ["started", "stream", "success"]
    assert states(events) == ["started", "stream", "failed"]
    error = events[-1].payload["error"]
    assert error["type"] == "handler_error"
    assert "bad input 42" in error["message"]
    assert "ValueError" in error["message"]
    assert events[-1].payload["stream_count"] == 1


async def test_invalid_payload_error_type(bus: MemoryBus) -> None:
    """A handler raising nexus.InvalidPayload ends with failed/invalid_payload, streaming or plain."""
    async with serving(bus, Raising(), PlainRaising()):
        recorder = await record(bus)
        streaming = await send(bus, "demo:stream_raise:v1:requested", {"invalid": True})
        plain = await send(bus, "demo:plain_raise:v1:requested", {"invalid": True})
        streaming_end = await recorder.terminal(streaming.event_id)
        plain_end = await recorder.terminal(plain.event_id)
    assert streaming_end.state == plain_end.state == "failed"
    assert streaming_end.payload["error"]["type"] == "invalid_payload"
    assert "field 'n' must be a number" in streaming_end.payload["error"]["message"]
    assert plain_end.payload["error"]["type"] == "invalid_payload"
    assert "missing 'agent_id'" in plain_end.payload["error"]["message"]


async def test_plain_handler_error(bus: MemoryBus) -> None:
    """A plain handler that raises ends with failed/handler_error carrying the message, and nothing else."""
    async with serving(bus, PlainRaising()):
        recorder = await record(bus)
        request = await send(bus, "demo:plain_raise:v1:requested")
        events = await recorder.lifecycle(request.event_id)
    assert states(events) == ["failed"]
    assert events[0].payload == {"error": {"type": "handler_error", "message": "RuntimeError: exploded"}}


async def test_no_handler(bus: MemoryBus) -> None:
    """A requested event nobody handles gets failed/no_handler naming the type."""
    async with serving(bus, Echo()):
        recorder = await record(bus)
        request = await send(bus, "demo:missing:v1:requested", user_id="u2")
        events = await recorder.lifecycle(request.event_id)
    assert states(events) == ["failed"]
    assert events[0].event_type == "demo:missing:v1:failed"
    assert events[0].payload["error"]["type"] == "no_handler"
    assert "demo:missing:v1:requested" in events[0].payload["error"]["message"]
    assert events[0].metadata == {"user_id": "u2", "correlation_id": request.event_id}


async def test_pinned_version_routing(bus: MemoryBus) -> None:
    """A handler pinned to ``service:action:v2`` answers v2 requests only; v1 gets no_handler."""

    class PinnedEcho(Echo):
        event_type = "demo:echo:v2"

    async with serving(bus, PinnedEcho()):
        recorder = await record(bus)
        v2 = await send(bus, "demo:echo:v2:requested", {"a": 1})
        v1 = await send(bus, "demo:echo:v1:requested", {"a": 1})
        v2_end = await recorder.terminal(v2.event_id)
        v1_end = await recorder.terminal(v1.event_id)
    assert (v2_end.event_type, v2_end.payload) == ("demo:echo:v2:success", {"echo": {"a": 1}})
    assert v1_end.payload["error"]["type"] == "no_handler"


# --- timeouts and cancellation ----------------------------------------------------------------------------------


async def test_stream_timeout(bus: MemoryBus) -> None:
    """A stream that outlives its timeout ends with timeout (never success) and its chunks before it."""
    async with serving(bus, Hang(), Countdown()) as provider:
        recorder = await record(bus)
        request = await send(bus, "demo:stream_hang:v1:requested")
        events = await recorder.lifecycle(request.event_id)
        barrier = await send(bus, "demo:stream_countdown:v1:requested", {"n": 1})
        await recorder.lifecycle(barrier.event_id)
        assert provider.streams() == []
    assert states(recorder.of(request.event_id)) == ["started", "stream", "timeout"]
    assert events[-1].payload["timeout_s"] == 0.2
    assert events[-1].payload["stream_count"] == 1
    assert events[-1].payload["duration_s"] > 0


async def test_timeout_wins_over_a_handler_that_swallows_cancellation(bus: MemoryBus) -> None:
    """A handler that swallows its timeout and returns still ends with timeout, and cannot send any more."""
    handler = Stubborn()
    async with serving(bus, handler, Countdown()):
        recorder = await record(bus)
        request = await send(bus, "demo:stream_stubborn:v1:requested")
        await recorder.lifecycle(request.event_id)
        barrier = await send(bus, "demo:stream_countdown:v1:requested", {"n": 1})
        await recorder.lifecycle(barrier.event_id)
    assert states(recorder.of(request.event_id)) == ["started", "timeout"]
    assert handler.late_send_error is not None


async def test_plain_handler_timeout(bus: MemoryBus) -> None:
    """A plain handler that runs past its timeout ends with timeout."""
    async with serving(bus, PlainHang()):
        recorder = await record(bus)
        request = await send(bus, "demo:plain_hang:v1:requested")
        events = await recorder.lifecycle(request.event_id)
    assert states(events) == ["timeout"]
    assert events[0].payload["timeout_s"] == 0.1


async def test_cancel_ends_stream_and_its_tasks(bus: MemoryBus) -> None:
    """Cancelling a live stream publishes cancelled with the reason and leaves no task behind."""
    handler = Waiter()
    settings = ProviderSettings(heartbeat_interval=0.05)
    async with serving(bus, handler, settings=settings) as provider:
        recorder = await record(bus)
        baseline = len(asyncio.all_tasks())
        request = await send(bus, "demo:stream_wait:v1:requested")
        with anyio.fail_after(5):
            await handler.all_started.wait()
        assert len(asyncio.all_tasks()) > baseline
        assert [info["correlation_id"] for info in provider.streams()] == [request.event_id]
        assert await provider.cancel(request.event_id, "user left") is True
        events = await recorder.lifecycle(request.event_id)
        await settle_tasks(baseline)
        assert provider.streams() == []
        assert await provider.cancel(request.event_id) is False
    assert states(events)[0] == "started"
    assert states(events)[-1] == "cancelled"
    assert set(states(events)) <= {"started", "heartbeat", "cancelled"}
    assert events[-1].payload["reason"] == "user left"
    assert events[-1].payload["stream_count"] == 0


async def test_cancel_through_control_channel(bus: MemoryBus) -> None:
    """A cancel sent through the request queue (as from another node) cancels the stream with its reason."""
    handler = Waiter()
    async with serving(bus, handler) as provider:
        recorder = await record(bus)
        request = await send(bus, "demo:stream_wait:v1:requested")
        with anyio.fail_after(5):
            await handler.all_started.wait()
        await provider.queue.cancel(CancelRequest(request.event_id, "remote"))
        end = await recorder.terminal(request.event_id)
    assert (end.state, end.payload["reason"]) == ("cancelled", "remote")


async def test_stop_cancels_live_streams(bus: MemoryBus) -> None:
    """Stopping the provider ends every live stream with cancelled, reason server_shutdown."""
    handler = Waiter(expected=2)
    recorder = await record(bus)
    async with serving(bus, handler) as provider:
        first = await send(bus, "demo:stream_wait:v1:requested")
        second = await send(bus, "demo:stream_wait:v1:requested")
        with anyio.fail_after(5):
            await handler.all_started.wait()
        await provider.stop()
    for request in (first, second):
        end = await recorder.terminal(request.event_id)
        assert (end.state, end.payload["reason"]) == ("cancelled", "server_shutdown")
        assert len(recorder.terminals(request.event_id)) == 1


async def test_request_arriving_during_shutdown_still_ends(bus: MemoryBus) -> None:
    """A request that arrives while the provider is stopping still gets exactly one terminal event."""
    release = anyio.Event()
    slow_started = anyio.Event()

    class SlowToStop(StreamingEventHandler):
        event_type = "demo:stream_slowstop"

        async def handle_stream(self, event: Event, stream: Stream) -> None:
            slow_started.set()
            try:
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    await release.wait()

    waiter = Waiter()
    settings = ProviderSettings(heartbeat_interval=0, shutdown_grace_s=0.2)
    recorder = await record(bus)
    provider = Provider(bus, settings)
    provider.register(SlowToStop())
    provider.register(waiter)
    async with anyio.create_task_group() as task_group:
        await task_group.start(provider.run)
        try:
            first = await send(bus, "demo:stream_slowstop:v1:requested")
            with anyio.fail_after(5):
                await slow_started.wait()
            task_group.start_soon(provider.stop)
            await turns(5)
            late = await send(bus, "demo:stream_wait:v1:requested")
            await recorder.until(lambda: bool(recorder.terminals(late.event_id)))
        finally:
            release.set()
    await bus.close()
    async for batch in recorder.sub:
        recorder.events.extend(batch)
    first_end = recorder.terminals(first.event_id)
    assert [(end.state, end.payload["reason"]) for end in first_end] == [("cancelled", "server_shutdown")]
    late_end = recorder.terminals(late.event_id)
    assert [(end.state, end.payload["reason"]) for end in late_end] == [("cancelled", "server_shutdown")]


# --- re-triggering, plain handlers ------------------------------------------------------------------------------


async def test_handler_not_retriggered_by_its_own_events(bus: MemoryBus) -> None:
    """A handler runs once per request, never again for its own started, stream or success events."""
    stream_handler, plain_handler = Countdown(), Echo()
    async with serving(bus, stream_handler, plain_handler):
        recorder = await record(bus)
        for _ in range(2):
            stream_request = await send(bus, "demo:stream_countdown:v1:requested", {"n": 3})
            plain_request = await send(bus, "demo:echo:v1:requested")
            await recorder.lifecycle(stream_request.event_id)
            await recorder.lifecycle(plain_request.event_id)
        await bus.publish(Event.create("demo:stream_countdown:v1:stream", {"i": 9}))
        await bus.publish(Event.create("demo:echo:v1:success"))
        barrier = await send(bus, "demo:echo:v1:requested")
        await recorder.lifecycle(barrier.event_id)
    assert stream_handler.calls == 2
    assert plain_handler.calls == 3


async def test_plain_handler_success(bus: MemoryBus) -> None:
    """A plain handler's returned dict is the success payload; returning None gives an empty one."""
    async with serving(bus, Echo()):
        recorder = await record(bus)
        request = await send(bus, "demo:echo:v1:requested", {"msg": "hi"}, user_id="u")
        empty = await send(bus, "demo:echo:v1:requested", {"result": "none"})
        events = await recorder.lifecycle(request.event_id)
        empty_end = await recorder.terminal(empty.event_id)
    assert states(events) == ["success"]
    assert events[0].payload == {"echo": {"msg": "hi"}}
    assert events[0].metadata == {"user_id": "u", "correlation_id": request.event_id}
    assert (empty_end.state, empty_end.payload) == ("success", {})


@pytest.mark.parametrize("result", ["list", "text", "number", "nan"])
async def test_plain_handler_bad_result_fails(bus: MemoryBus, result: str) -> None:
    """A plain handler returning something that is not a JSON object ends with failed/handler_error."""
    async with serving(bus, Echo()):
        recorder = await record(bus)
        request = await send(bus, "demo:echo:v1:requested", {"result": result})
        events = await recorder.lifecycle(request.event_id)
    assert states(events) == ["failed"]
    assert events[0].payload["error"]["type"] == "handler_error"
    assert "invalid result" in events[0].payload["error"]["message"]


async def test_requests_start_in_offset_order(bus: MemoryBus) -> None:
    """Requests to one handler start in the order of their offsets."""
    started: list[int] = []

    class Recording(EventHandler):
        event_type = "demo:record"

        async def handle(self, event: Event) -> JSONObject | None:
            started.append(int(event.payload["i"]))
            return None

    async with serving(bus, Recording()):
        recorder = await record(bus)
        requests = [await send(bus, "demo:record:v1:requested", {"i": i}) for i in range(30)]
        await recorder.until(lambda: all(recorder.terminals(r.event_id) for r in requests))
    assert started == list(range(30))


# --- ordering keys ----------------------------------------------------------------------------------------------


class Ordered(EventHandler):
    event_type = "places:track"
    ordering_key = "agent_id"

    def __init__(self) -> None:
        self.log: list[tuple[str, str, int]] = []

    async def handle(self, event: Event) -> JSONObject | None:
        agent, i = str(event.payload["agent_id"]), int(event.payload["i"])
        self.log.append(("start", agent, i))
        for _ in range(5):
            await asyncio.sleep(0)
        self.log.append(("end", agent, i))
        return {"i": i}


async def test_same_key_runs_one_at_a_time_in_order(bus: MemoryBus) -> None:
    """Requests with the same ordering key run one at a time, in offset order."""
    handler = Ordered()
    async with serving(bus, handler):
        recorder = await record(bus)
        requests = [
            await send(bus, "places:track:v1:requested", {"agent_id": agent, "i": i})
            for i in range(6)
            for agent in ("a", "b")
        ]
        await recorder.until(lambda: all(recorder.terminals(r.event_id) for r in requests))
    for agent in ("a", "b"):
        own = [(what, i) for what, who, i in handler.log if who == agent]
        assert own == [(what, i) for i in range(6) for what in ("start", "end")]
    assert all(recorder.terminals(r.event_id)[0].state == "success" for r in requests)


async def test_numeric_keys_equal_as_doubles(bus: MemoryBus) -> None:
    """Ordering keys 7 and 7.0 (a Struct double) are the same key and run one at a time."""
    handler = Ordered()
    async with serving(bus, handler):
        recorder = await record(bus)
        requests = [
            await send(bus, "places:track:v1:requested", {"agent_id": key, "i": i})
            for i, key in enumerate([7, 7.0, 7, 7.0])
        ]
        await recorder.until(lambda: all(recorder.terminals(r.event_id) for r in requests))
    assert [(what, i) for what, _, i in handler.log] == [(what, i) for i in range(4) for what in ("start", "end")]


async def test_different_keys_overlap(bus: MemoryBus) -> None:
    """Requests with different ordering keys run concurrently."""
    started = {"x": anyio.Event(), "y": anyio.Event()}
    overlapped: dict[str, bool] = {}

    class Overlap(EventHandler):
        event_type = "places:overlap"
        ordering_key = "agent_id"

        async def handle(self, event: Event) -> JSONObject | None:
            agent = str(event.payload["agent_id"])
            other = "y" if agent == "x" else "x"
            started[agent].set()
            with anyio.move_on_after(2):
                await started[other].wait()
            overlapped[agent] = started[other].is_set()
            return None

    async with serving(bus, Overlap()):
        recorder = await record(bus)
        first = await send(bus, "places:overlap:v1:requested", {"agent_id": "x"})
        second = await send(bus, "places:overlap:v1:requested", {"agent_id": "y"})
        await recorder.lifecycle(first.event_id)
        await recorder.lifecycle(second.event_id)
    assert overlapped == {"x": True, "y": True}


async def test_cancel_queued_request(bus: MemoryBus) -> None:
    """A request queued behind its ordering key can be cancelled before it runs; the queue then moves on."""
    gate = anyio.Event()
    running = anyio.Event()
    ran: list[int] = []

    class Blocking(EventHandler):
        event_type = "places:blocking"
        ordering_key = "agent_id"

        async def handle(self, event: Event) -> JSONObject | None:
            ran.append(int(event.payload["i"]))
            running.set()
            await gate.wait()
            return None

    async with serving(bus, Blocking()) as provider:
        recorder = await record(bus)
        requests = [await send(bus, "places:blocking:v1:requested", {"agent_id": "a", "i": i}) for i in range(3)]
        with anyio.fail_after(5):
            await running.wait()
        assert ran == [0]
        assert await provider.cancel(requests[1].event_id, "changed my mind")
        cancelled = await recorder.terminal(requests[1].event_id)
        assert ran == [0]
        gate.set()
        ends = [await recorder.terminal(r.event_id) for r in requests]
    assert (cancelled.state, cancelled.payload["reason"]) == ("cancelled", "changed my mind")
    assert states(recorder.of(requests[1].event_id)) == ["cancelled"]
    assert [end.state for end in ends] == ["success", "cancelled", "success"]
    assert ran == [0, 2]


# --- buffers and the Stream object ------------------------------------------------------------------------------


async def test_thousand_chunks_through_a_small_buffer(bus: MemoryBus) -> None:
    """A handler sending 1,000 chunks through a buffer of 2 delivers all of them, in order, then success."""

    class Firehose(StreamingEventHandler):
        event_type = "demo:stream_fire"
        buffer_size = 2

        def __init__(self) -> None:
            self.final_count = -1

        async def handle_stream(self, event: Event, stream: Stream) -> None:
            for i in range(1000):
                await stream.send({"i": i})
            self.final_count = stream.stream_count

    handler = Firehose()
    async with serving(bus, handler):
        recorder = await record(bus)
        request = await send(bus, "demo:stream_fire:v1:requested")
        events = await recorder.lifecycle(request.event_id)
    assert states(events) == ["started", *["stream"] * 1000, "success"]
    assert [event.payload["i"] for event in events[1:-1]] == list(range(1000))
    assert events[-1].payload["stream_count"] == 1000
    assert handler.final_count == 1000


class GatedBus(MemoryBus):
    """A memory bus whose chunk publishing waits while its gate is closed."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def publish_many(self, events: Sequence[Event]) -> list[Published]:
        await self.gate.wait()
        return await super().publish_many(events)


async def test_send_waits_while_buffer_full() -> None:
    """While chunks cannot be published, send() stops accepting once the buffer is full, then resumes."""
    progress: list[int] = []

    class Producer(StreamingEventHandler):
        event_type = "demo:stream_produce"
        buffer_size = 2

        async def handle_stream(self, event: Event, stream: Stream) -> None:
            for i in range(20):
                await stream.send({"i": i})
                progress.append(i)

    bus = GatedBus()
    await bus.start()
    bus.gate.clear()
    async with serving(bus, Producer()):
        recorder = await record(bus)
        request = await send(bus, "demo:stream_produce:v1:requested")
        await turns(100)
        stalled_at = len(progress)
        assert 0 < stalled_at < 20
        await turns(100)
        assert len(progress) == stalled_at
        bus.gate.set()
        events = await recorder.lifecycle(request.event_id)
    await bus.close()
    assert len(progress) == 20
    assert [event.payload["i"] for event in events if event.state == "stream"] == list(range(20))
    assert events[-1].payload["stream_count"] == 20


async def test_send_after_end_raises_stream_closed(bus: MemoryBus) -> None:
    """A Stream kept past its end refuses send() with StreamClosed and publishes nothing more."""
    handler = Keeper()
    async with serving(bus, handler):
        recorder = await record(bus)
        request = await send(bus, "demo:stream_keep:v1:requested")
        await recorder.lifecycle(request.event_id)
        stream = handler.kept[0]
        assert stream.closed
        assert stream.stream_count == 1
        assert stream.correlation_id == request.event_id
        with pytest.raises(StreamClosed):
            await stream.send({"late": True})
        barrier = await send(bus, "demo:stream_keep:v1:requested")
        await recorder.lifecycle(barrier.event_id)
    assert states(recorder.of(request.event_id)) == ["started", "stream", "success"]


async def test_invalid_chunk_is_refused_stream_goes_on(bus: MemoryBus) -> None:
    """send() refuses a chunk that is not JSON with InvalidPayload; the handler may carry on."""
    refused: list[str] = []

    class Careful(StreamingEventHandler):
        event_type = "demo:stream_careful"

        async def handle_stream(self, event: Event, stream: Stream) -> None:
            try:
                await stream.send({"x": math.inf})
            except InvalidPayload as exc:
                refused.append(exc.message)
            await stream.send({"x": 1})

    async with serving(bus, Careful()):
        recorder = await record(bus)
        request = await send(bus, "demo:stream_careful:v1:requested")
        events = await recorder.lifecycle(request.event_id)
    assert len(refused) == 1
    assert "payload.x" in refused[0]
    assert [event.payload for event in events] == [{}, {"x": 1}, {"stream_count": 1, "duration_s": ANY_FLOAT}]


class _AnyFloat:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, float)

    def __hash__(self) -> int:
        return 0


ANY_FLOAT: Any = _AnyFloat()


# --- registration ------------------------------------------------------------------------------------------------


class WrongKindStreaming(StreamingEventHandler):
    event_type = "demo:echo"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        return None


class WrongKindPlain(EventHandler):
    event_type = "demo:stream_x"

    async def handle(self, event: Event) -> JSONObject | None:
        return None


class WrongKindTyping(EventHandler):
    event_type = "messaging:typing"

    async def handle(self, event: Event) -> JSONObject | None:
        return None


def _plain(event_type: str, **attributes: Any) -> EventHandler:
    async def handle(self: EventHandler, event: Event) -> JSONObject | None:
        return None

    cls = type("Dynamic", (EventHandler,), {"event_type": event_type, "handle": handle, **attributes})
    return cast(EventHandler, cls())


async def test_streaming_handler_on_plain_action_refused(bus: MemoryBus) -> None:
    """A StreamingEventHandler whose type is not streaming under the rules is refused, naming the rules."""
    provider = Provider(bus)
    with pytest.raises(HandlerConfigError, match="not a streaming event under the streaming rules") as info:
        provider.register(WrongKindStreaming(), name="wrong")
    assert str(info.value).startswith("wrong:")
    assert "stream_" in str(info.value)
    assert provider.registrations == {}


@pytest.mark.parametrize(
    ("handler_class", "rule"),
    [(WrongKindPlain, "action_prefix:stream_"), (WrongKindTyping, "contains::typing:")],
)
async def test_plain_handler_on_streaming_action_refused(
    bus: MemoryBus, handler_class: type[EventHandler], rule: str
) -> None:
    """A plain EventHandler on a streaming type is refused with an error naming the rule that applies."""
    with pytest.raises(HandlerConfigError, match=f"under the rule '{rule}'"):
        Provider(bus).register(handler_class())


@pytest.mark.parametrize(
    ("event_type", "message"),
    [
        ("Demo:echo", "service 'Demo'"),
        ("demo:Echo", "action 'Echo'"),
        ("demo", "must be 'service:action' or 'service:action:vN'"),
        ("demo:echo:v1:requested", "must be 'service:action' or 'service:action:vN'"),
        ("demo:echo:v0", "version 'v0'"),
        ("demo::v1", "action is empty"),
    ],
)
async def test_bad_event_type_refused(bus: MemoryBus, event_type: str, message: str) -> None:
    """A handler with a malformed event_type is refused with the problem named."""
    with pytest.raises(HandlerConfigError, match=message):
        Provider(bus).register(_plain(event_type))


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"stream_timeout": 0}, "stream_timeout"),
        ({"stream_timeout": -1.0}, "stream_timeout"),
        ({"stream_timeout": "5"}, "stream_timeout"),
        ({"stream_timeout": True}, "stream_timeout"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"buffer_size": 2.5}, "buffer_size"),
        ({"ordering_key": ""}, "ordering_key"),
        ({"ordering_key": 3}, "ordering_key"),
    ],
)
async def test_bad_options_refused(bus: MemoryBus, attributes: dict[str, Any], message: str) -> None:
    """Invalid stream_timeout, buffer_size or ordering_key values are refused at registration."""
    with pytest.raises(HandlerConfigError, match=message):
        Provider(bus).register(_plain("demo:opts", **attributes))


async def test_missing_event_type_and_non_handler_refused(bus: MemoryBus) -> None:
    """A handler without event_type, or an object that is no handler, is refused."""
    provider = Provider(bus)

    class NoType(EventHandler):
        async def handle(self, event: Event) -> JSONObject | None:
            return None

    with pytest.raises(HandlerConfigError, match="event_type"):
        provider.register(NoType())
    not_a_handler: Any = object()
    with pytest.raises(HandlerConfigError, match="not an EventHandler or StreamingEventHandler"):
        provider.register(not_a_handler)


async def test_duplicate_registration_refused(bus: MemoryBus) -> None:
    """Two handlers for one event type, or two with one name, are refused naming the first."""
    provider = Provider(bus)
    provider.register(Echo(), name="first")
    with pytest.raises(HandlerConfigError, match="'demo:echo' is already handled by first"):
        provider.register(Echo(), name="second")
    with pytest.raises(HandlerConfigError, match="already registered"):
        provider.register(Countdown(), name="first")
    assert list(provider.registrations) == ["first"]


async def test_register_after_start_refused(bus: MemoryBus) -> None:
    """Handlers cannot be registered once the provider runs."""
    async with serving(bus, Echo()) as provider:
        with pytest.raises(HandlerConfigError, match="before the provider starts"):
            provider.register(Countdown())


async def test_valid_registrations_accepted(bus: MemoryBus) -> None:
    """Handlers whose kind agrees with the rules register, with their options derived."""
    provider = Provider(bus, ProviderSettings(stream_timeout=30.0, buffer_size=7))

    class Typing(StreamingEventHandler):
        event_type = "messaging:typing"
        stream_timeout = None

        async def handle_stream(self, event: Event, stream: Stream) -> None:
            return None

    typing = provider.register(Typing())
    hang = provider.register(Hang())
    echo = provider.register(Echo(), name="echo")
    assert (typing.streaming, typing.stream_timeout, typing.buffer_size) == (True, None, 7)
    assert (hang.streaming, hang.stream_timeout) == (True, 0.2)
    assert (echo.streaming, echo.stream_timeout, echo.name) == (False, 30.0, "echo")
    assert typing.name == f"{Typing.__module__}:{Typing.__qualname__}"


# --- context, setup, teardown ------------------------------------------------------------------------------------


class Lifecycled(EventHandler):
    event_type = "demo:hooks"

    def __init__(self) -> None:
        self.setups = 0
        self.teardowns = 0
        self.seen_ctx: HandlerContext | None = None
        self.setup_event: Event | None = None
        self.side_events: list[Event] = []
        self.publish_error: BaseException | None = None

    async def setup(self, ctx: HandlerContext) -> None:
        self.setups += 1
        self.seen_ctx = ctx
        self.setup_event = await ctx.publish("demo:hooks:v1:ready", {"name": ctx.name})

    async def teardown(self) -> None:
        self.teardowns += 1

    async def handle(self, event: Event) -> JSONObject | None:
        side = await self.ctx.publish("demo:note:v1:created", {"for": event.event_id})
        self.side_events.append(side)
        try:
            await self.ctx.publish("Bad:type:v1:x")
        except InvalidEventType as exc:
            self.publish_error = exc
        return {"greeting": self.ctx.config.get("greeting")}


async def test_setup_teardown_and_context(bus: MemoryBus) -> None:
    """setup() and teardown() run once; the context carries the name and config; side events carry causation."""
    handler = Lifecycled()
    provider = Provider(bus, QUIET)
    provider.register(handler, name="hooks-plugin", config={"greeting": "hi"})
    recorder = await record(bus)
    async with anyio.create_task_group() as task_group:
        await task_group.start(provider.run)
        assert (handler.setups, handler.teardowns) == (1, 0)
        first = await send(bus, "demo:hooks:v1:requested", traceparent="00-trace-01")
        second = await send(bus, "demo:hooks:v1:requested")
        first_end = await recorder.terminal(first.event_id)
        await recorder.terminal(second.event_id)
        await provider.stop()
    assert (handler.setups, handler.teardowns) == (1, 1)
    assert handler.seen_ctx is handler.ctx
    assert handler.ctx.name == "hooks-plugin"
    assert handler.ctx.config == {"greeting": "hi"}
    assert handler.ctx.log is not None
    assert first_end.payload == {"greeting": "hi"}
    assert handler.setup_event is not None
    assert handler.setup_event.offset > 0
    assert "causation_id" not in handler.setup_event.metadata
    first_side, second_side = handler.side_events
    assert first_side.offset > 0
    assert first_side.metadata == {"causation_id": first.event_id, "traceparent": "00-trace-01"}
    assert second_side.metadata == {"causation_id": second.event_id}
    stored = [event for event in bus.history() if event.event_type == "demo:note:v1:created"]
    assert [event.metadata["causation_id"] for event in stored] == [first.event_id, second.event_id]
    assert isinstance(handler.publish_error, InvalidEventType)


async def test_streaming_side_events_carry_causation(bus: MemoryBus) -> None:
    """A streaming handler's side events carry causation_id = the request's event id."""

    class Notifier(StreamingEventHandler):
        event_type = "demo:stream_notify"

        async def handle_stream(self, event: Event, stream: Stream) -> None:
            await stream.send({"i": 0})
            await self.ctx.publish("demo:note:v1:created", {"n": 1}, metadata={"extra": "x"})

    async with serving(bus, Notifier()):
        recorder = await record(bus)
        request = await send(bus, "demo:stream_notify:v1:requested")
        await recorder.lifecycle(request.event_id)
    notes = [event for event in recorder.events if event.event_type == "demo:note:v1:created"]
    assert len(notes) == 1
    assert notes[0].metadata == {"extra": "x", "causation_id": request.event_id}


# --- many streams -------------------------------------------------------------------------------------------------


class LoadOk(StreamingEventHandler):
    event_type = "load:stream_ok"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"a": 1})
        await stream.send({"a": 2})


class LoadRaise(StreamingEventHandler):
    event_type = "load:stream_raise"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"a": 1})
        raise RuntimeError("load failure")


class LoadHang(StreamingEventHandler):
    event_type = "load:stream_hang"
    stream_timeout = 0.05

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await anyio.sleep_forever()


class LoadWait(Waiter):
    event_type = "load:stream_wait"


async def test_thousand_streams_leave_nothing_behind(bus: MemoryBus) -> None:
    """1,000 streams ending in success, failure, timeout and cancel leave no task behind; the server still answers."""
    waiter = LoadWait(expected=250)
    settings = ProviderSettings(heartbeat_interval=0.02)
    kinds = ["ok", "raise", "hang", "wait"]
    async with serving(bus, LoadOk(), LoadRaise(), LoadHang(), waiter, settings=settings) as provider:
        recorder = await record(bus, [f"load:*:v1:{state}" for state in TERMINAL_STATES])
        baseline = len(asyncio.all_tasks())
        requests: dict[str, str] = {}
        for i in range(1000):
            kind = kinds[i % 4]
            request = await send(bus, f"load:stream_{kind}:v1:requested")
            requests[request.event_id] = kind
        with anyio.fail_after(10):
            await waiter.all_started.wait()
        for correlation_id, kind in requests.items():
            if kind == "wait":
                assert await provider.cancel(correlation_id, "load test")
        await recorder.until(lambda: len(recorder.events) >= 1000)
        await settle_tasks(baseline)
        assert provider.streams() == []
        check = await send(bus, "load:stream_ok:v1:requested")
        await recorder.until(lambda: bool(recorder.terminals(check.event_id)))
        await settle_tasks(baseline)
    expected_state = {"ok": "success", "raise": "failed", "hang": "timeout", "wait": "cancelled"}
    assert len(recorder.events) == 1001
    for correlation_id, kind in requests.items():
        terminals = recorder.terminals(correlation_id)
        assert len(terminals) == 1
        assert terminals[0].state == expected_state[kind]
    assert recorder.terminals(check.event_id)[0].state == "success"
    assert recorder.terminals(check.event_id)[0].payload["stream_count"] == 2


class _Chatty(StreamingEventHandler):
    event_type = "demo:stream_chatty"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        self.ctx.log.info("handler_says_hello")
        await stream.send({"n": 1})


async def test_every_log_line_about_a_stream_names_it(bus: MemoryBus) -> None:
    """Log lines about a stream, the handler's own ctx.log lines included, carry event_type and correlation_id."""
    sub = await bus.subscribe(["demo:stream_chatty:v1:success"])
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with serving(bus, _Chatty()):
            request = (await bus.publish(Event.create("demo:stream_chatty:v1:requested", {}))).event
            await asyncio.wait_for(sub.next_batch(), 5)
    about_stream = [line for line in logs if line["event"] in ("stream_started", "handler_says_hello", "stream_ended")]
    assert [line["event"] for line in about_stream] == ["stream_started", "handler_says_hello", "stream_ended"]
    for line in about_stream:
        assert line["event_type"] == "demo:stream_chatty:v1:requested"
        assert line["correlation_id"] == request.event_id
    assert about_stream[-1]["stream_count"] == 1
    assert about_stream[-1]["duration_s"] >= 0
