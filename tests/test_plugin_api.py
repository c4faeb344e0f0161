"""Plugin API additions: declared request schemas, ctx.subscribe and ctx.stats, through a real server."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from nexus import Event, EventHandler, Stream, StreamingEventHandler
from nexus.errors import HandlerConfigError
from nexus.schema import EventSpec
from nexus.testing import run_server

GUARD = 10.0

TAKES = EventSpec(
    "demo:greet:v1:requested",
    "Greets someone.",
    {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1}, "times": {"type": "integer", "minimum": 1}},
    },
    example={"name": "Ada"},
)


class Greet(EventHandler):
    event_type = "demo:greet"
    takes = TAKES

    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, event: Event) -> dict[str, Any]:
        self.calls += 1
        return {"greeting": "hello " + event.payload["name"] * int(event.payload.get("times", 1))}


class Follow(StreamingEventHandler):
    """Streams every demo note published after it starts, until cancelled."""

    event_type = "demo:stream_notes"
    stream_timeout = None

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        async with self.ctx.subscribe("demo:note:v1:*") as events:
            await self.ctx.publish("demo:follower:v1:ready", {})
            async for note in events:
                await stream.send({"text": note.payload["text"], "offset": note.offset})


class Stats(EventHandler):
    event_type = "demo:stats"

    async def handle(self, event: Event) -> dict[str, Any]:
        return self.ctx.stats()


async def test_payload_that_does_not_fit_takes_fails_before_the_handler_runs() -> None:
    """A request whose payload breaks the declared schema ends failed/invalid_payload naming the field."""
    greet = Greet()
    async with run_server(greet) as nexus:
        bad = await asyncio.wait_for(nexus.client.call("demo:greet:v1:requested", {"times": 0}), GUARD)
        assert bad.state == "failed"
        assert bad.payload["error"] == {
            "type": "invalid_payload",
            "message": "demo:greet:v1:requested payload: 'name' is a required property",
        }
        good = await asyncio.wait_for(nexus.client.call("demo:greet:v1:requested", {"name": "Ada"}), GUARD)
        assert good.payload == {"greeting": "hello Ada"}
        assert greet.calls == 1


async def test_ctx_subscribe_streams_bus_events_to_a_handler() -> None:
    """A streaming handler following the bus with ctx.subscribe receives events published after it began."""
    async with run_server(Follow()) as nexus:
        ready = await nexus.record("demo:follower:v1:ready")
        stream = nexus.client.request("demo:stream_notes:v1:requested", {}, heartbeats=False)
        seen: list[Event] = []

        async def consume() -> None:
            async for event in stream:
                seen.append(event)
                if event.state == "stream" and len([e for e in seen if e.state == "stream"]) == 2:
                    await stream.cancel()

        task = asyncio.create_task(consume())
        await ready.wait_count(1)
        await nexus.client.emit("demo:note:v1:written", {"text": "one"})
        await nexus.client.emit("demo:other:v1:written", {"text": "skip"})
        await nexus.client.emit("demo:note:v1:written", {"text": "two"})
        await asyncio.wait_for(task, GUARD)
        await ready.stop()
        chunks = [e.payload["text"] for e in seen if e.state == "stream"]
        assert chunks == ["one", "two"]
        assert seen[-1].state == "cancelled"
        assert await nexus.client.streams() == []


async def test_ctx_stats_reports_live_rates_streams_and_latency() -> None:
    """ctx.stats() gives events/s by service, active streams, subscribers and delivery latency percentiles."""
    async with run_server(Stats(), Follow()) as nexus:
        recorder = await nexus.record(">")
        for i in range(20):
            await nexus.client.emit("places:ping:v1:happened", {"i": i})
        await recorder.wait_count(20)
        follow = nexus.client.request("demo:stream_notes:v1:requested", {})
        iterator = follow.__aiter__()
        first = await asyncio.wait_for(iterator.__anext__(), GUARD)
        assert first.state == "started"
        done = await asyncio.wait_for(nexus.client.call("demo:stats:v1:requested", {}), GUARD)
        stats = done.payload
        assert stats["events_per_s_by_service"]["places"] == pytest.approx(20 / stats["window_s"])
        assert stats["active_streams"] == 1  # the follower
        assert stats["active_requests"] == 2  # the follower and the stats request itself
        assert stats["subscribers"] >= 2
        assert stats["delivery_latency_ms"]["samples"] > 0
        assert stats["delivery_latency_ms"]["p99"] >= stats["delivery_latency_ms"]["p50"] >= 0
        assert stats["head_offset"] >= 21
        await follow.cancel()
        await recorder.stop()


def test_takes_must_describe_the_handlers_own_request() -> None:
    """A handler whose takes names another action, or whose example breaks its schema, is refused at start-up."""
    from nexus.bus.memory import MemoryBus
    from nexus.provider import Provider

    class Wrong(EventHandler):
        event_type = "demo:other"
        takes = TAKES

        async def handle(self, event: Event) -> None:
            return None

    class BadExample(EventHandler):
        event_type = "demo:greet"
        takes = EventSpec("demo:greet:v1:requested", "x", TAKES.schema, example={"times": 2})

        async def handle(self, event: Event) -> None:
            return None

    provider = Provider(MemoryBus())
    with pytest.raises(HandlerConfigError, match="takes describes 'demo:greet:v1:requested'"):
        provider.register(Wrong())
    with pytest.raises(HandlerConfigError, match="example of takes does not fit"):
        provider.register(BadExample())


async def test_request_put_on_the_bus_with_nan_fails_before_the_handler_runs() -> None:
    """A request that reached the bus without the ingress checks still cannot hand NaN to a handler."""
    greet = Greet()
    async with run_server(greet) as nexus:
        recorder = await nexus.record("demo:greet:v1:failed")
        await nexus.bus.publish(Event("demo:greet:v1:requested", {"name": "Ada", "times": math.nan}))
        [failed] = await recorder.wait_count(1)
        assert failed.payload["error"]["type"] == "invalid_payload"
        assert "NaN" in failed.payload["error"]["message"]
        assert greet.calls == 0
        await recorder.stop()
