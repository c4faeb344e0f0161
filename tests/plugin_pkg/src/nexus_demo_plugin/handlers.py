"""Handlers that exercise every way a request can end: success, failed, timeout and cancelled."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio

from nexus import Event, EventHandler, Stream, StreamingEventHandler

RELEASED_EVENT_TYPE = "demo:stream_wait:v1:released"
"""Published by :class:`StreamWait` as its task unwinds, so a client can see the handler really ended."""


class StreamCount(StreamingEventHandler):
    """Sends ``{"i": 0}`` .. ``{"i": n - 1}``, then ends with ``success``."""

    event_type = "demo:stream_count"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        for i in range(int(event.payload.get("n", 3))):
            await stream.send({"i": i})


class StreamFail(StreamingEventHandler):
    """Sends one chunk, then raises: the stream ends with ``failed``."""

    event_type = "demo:stream_fail"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"step": 1})
        raise ValueError("boom")


class StreamHang(StreamingEventHandler):
    """Never returns: after ``stream_timeout`` seconds the stream ends with ``timeout``."""

    event_type = "demo:stream_hang"
    stream_timeout = 0.5

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await asyncio.Event().wait()


class StreamWait(StreamingEventHandler):
    """Waits with no time limit until its requester cancels it; says so on the bus as it unwinds."""

    event_type = "demo:stream_wait"
    stream_timeout = None

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            # Shielded: the handler's scope is cancelled, and a plain await would be cancelled again at once.
            with anyio.CancelScope(shield=True):
                await self.ctx.publish(RELEASED_EVENT_TYPE, {"correlation_id": stream.correlation_id})


class Echo(EventHandler):
    """Answers with the request's payload."""

    event_type = "demo:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"echo": event.payload}
