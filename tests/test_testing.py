"""nexus.testing's StreamFollower: waits for chunks, cancels, and says clearly when a stream ends first."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nexus import Event, Stream, StreamingEventHandler
from nexus.schema import EventSpec
from nexus.testing import StreamEnded, StreamFollower, run_server

COUNT = "demo:stream_count:v1:requested"


class Count(StreamingEventHandler):
    """Sends ``{"n": 1}`` ... ``{"n": upto}``, then waits ``linger`` seconds before it ends with success."""

    event_type = "demo:stream_count"
    stream_timeout = None
    takes = EventSpec(
        COUNT,
        "Counts.",
        {
            "type": "object",
            "required": ["upto"],
            "properties": {"upto": {"type": "integer", "minimum": 0}, "linger": {"type": "number", "minimum": 0}},
        },
        example={"upto": 2},
    )

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        for n in range(1, event.payload["upto"] + 1):
            await stream.send({"n": n})
        await asyncio.sleep(event.payload.get("linger", 0))


def count(client: Any, payload: dict[str, Any]) -> StreamFollower:
    return StreamFollower(client.request(COUNT, payload, heartbeats=False))


async def test_wait_for_returns_the_chunks_and_cancel_the_terminal_event() -> None:
    """wait_for returns the chunks once the predicate holds, and cancel ends the stream with cancelled."""
    async with run_server(Count()) as nexus:
        follower = count(nexus.client, {"upto": 3, "linger": 60})
        assert (await follower.started()).state == "started"
        assert await follower.wait_for(lambda chunks: len(chunks) == 3) == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert not follower.done
        ended = await follower.cancel()
        assert ended.state == "cancelled"
        assert follower.events[-1] is ended
        assert follower.done


async def test_ended_returns_the_terminal_event_of_a_stream_that_finishes() -> None:
    """ended waits for a stream that finishes by itself and returns its success event."""
    async with run_server(Count()) as nexus:
        follower = count(nexus.client, {"upto": 2})
        ended = await follower.ended()
        assert ended.state == "success"
        assert follower.chunks == [{"n": 1}, {"n": 2}]


async def test_a_stream_that_ends_before_the_condition_raises_stream_ended() -> None:
    """wait_for raises StreamEnded, naming the terminal event, when the stream ends before the predicate holds."""
    async with run_server(Count()) as nexus:
        follower = count(nexus.client, {"upto": 2})
        with pytest.raises(
            StreamEnded, match=r"the stream ended while waiting for the condition: .*demo:stream_count:v1:success"
        ):
            await follower.wait_for(lambda chunks: len(chunks) == 3, timeout=5)


async def test_a_request_that_fails_before_it_starts_raises_stream_ended() -> None:
    """started raises StreamEnded with the failure when the request is refused before its handler runs."""
    async with run_server(Count()) as nexus:
        follower = count(nexus.client, {"upto": -1})
        with pytest.raises(StreamEnded, match=r"did not start: .*demo:stream_count:v1:failed.*invalid_payload"):
            await follower.started()


async def test_wait_for_times_out_naming_the_last_events() -> None:
    """wait_for raises TimeoutError naming what arrived when the predicate does not hold in time."""
    async with run_server(Count()) as nexus:
        follower = count(nexus.client, {"upto": 1, "linger": 60})
        with pytest.raises(TimeoutError, match=r"waited 0\.2s for the condition; last events: .*started"):
            await follower.wait_for(lambda chunks: len(chunks) == 2, timeout=0.2)
        await follower.cancel()


async def test_stop_lets_go_of_the_stream_and_the_server_ends_it() -> None:
    """stop drops the call, after which waits raise StreamEnded and the server no longer runs the stream."""
    async with run_server(Count()) as nexus:
        follower = count(nexus.client, {"upto": 1, "linger": 60})
        await follower.wait_for(lambda chunks: len(chunks) == 1)
        await follower.stop()
        assert follower.done
        with pytest.raises(StreamEnded, match="while waiting for its terminal event"):
            await follower.ended()
        for _ in range(100):
            if not nexus.server.provider.streams():
                break
            await asyncio.sleep(0.05)
        assert nexus.server.provider.streams() == []
