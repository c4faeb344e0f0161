"""Handlers the worker tests serve, in process (``nexus.testing.start_worker``) or from a ``nexus worker``
subprocess (``--handler worker_handlers:Countdown``, with ``tests/`` on ``PYTHONPATH``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nexus import Event, EventHandler, HandlerContext, InvalidPayload, Stream, StreamingEventHandler
from nexus.schema import EventSpec


class Countdown(StreamingEventHandler):
    """Sends ``n`` chunks ``{"i": 0}`` ... ``every`` seconds apart, then waits ``linger`` seconds."""

    event_type = "wdemo:stream_countdown"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        for i in range(int(event.payload.get("n", 3))):
            await stream.send({"i": i, "worker": self.ctx.stats().get("worker", "in-process")})
            await asyncio.sleep(float(event.payload.get("every", 0.0)))
        await asyncio.sleep(float(event.payload.get("linger", 0.0)))


class Flood(StreamingEventHandler):
    """Sends ``n`` chunks as fast as ``send`` lets it (a buffer of 4: mostly waiting for credit)."""

    event_type = "wdemo:stream_flood"
    buffer_size = 4

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        for i in range(int(event.payload["n"])):
            await stream.send({"i": i})


class Slow(StreamingEventHandler):
    """Outlives its 0.3 s timeout."""

    event_type = "wdemo:stream_slow"
    stream_timeout = 0.3

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"tick": 1})
        await asyncio.sleep(60)


class Echo(EventHandler):
    """Answers with the payload and the worker's name; raises or returns bad results on request."""

    event_type = "wdemo:echo"
    takes = EventSpec(
        "wdemo:echo:v1:requested",
        "Echoes.",
        {"type": "object", "properties": {"x": {"type": "integer"}, "mode": {"type": "string"}}},
        example={"x": 1},
    )

    async def handle(self, event: Event) -> dict[str, Any]:
        mode = event.payload.get("mode")
        if mode == "raise":
            raise RuntimeError("boom")
        if mode == "invalid":
            raise InvalidPayload("x is not welcome here")
        if mode == "not_json":
            return {"value": float("nan")}
        return {"echo": event.payload, "worker": self.ctx.stats().get("worker", "in-process")}


class Ordered(EventHandler):
    """Requests with one ``key`` run one at a time: answers with its ``key``, ``seq``, worker and when it ran."""

    event_type = "wdemo:ordered"
    ordering_key = "key"

    async def handle(self, event: Event) -> dict[str, Any]:
        began = time.monotonic()
        await asyncio.sleep(float(event.payload.get("sleep", 0.002)))
        return {
            "key": event.payload["key"],
            "seq": event.payload["seq"],
            "worker": self.ctx.stats().get("worker", "in-process"),
            "began": began,
            "ended": time.monotonic(),
        }


class Publisher(EventHandler):
    """Publishes a side event, keeps a counter in ``ctx.kv`` and reads ``ctx.config``."""

    event_type = "wdemo:publish"

    async def setup(self, ctx: HandlerContext) -> None:
        self.greeting = str(ctx.config.get("greeting", "hello"))
        self.seen: list[Event] = []
        self.follower = await ctx.follow("wdemo:note:v1:*", on_event=self.seen.append, since_offset=0)

    async def handle(self, event: Event) -> dict[str, Any]:
        side = await self.ctx.publish("wdemo:side:v1:happened", {"greeting": self.greeting})
        entry = await self.ctx.kv.get("count")
        count = (int(entry.value["n"]) if entry is not None else 0) + 1
        await self.ctx.kv.put("count", {"n": count})
        await self.follower.reached(int(event.payload.get("note_offset", 0)), timeout=5)
        return {"side_event_id": side.event_id, "count": count, "notes": [e.payload for e in self.seen]}
