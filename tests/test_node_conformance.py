"""One conformance suite for every Node: what a transport relies on holds in process on the memory bus, in
process on the NATS bus, and through a RemoteNode that mirrors a server over gRPC.

Each test gets a started node and a second way to publish into the same history (``harness.other``: the
server's own node), so "published elsewhere, seen here" is the same test for all three.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
from nats_support import delete_stream, nats_settings, shared_nats_url, unique_names, until

from nexus import Event, EventHandler, Stream, StreamingEventHandler
from nexus.errors import InvalidArgument, InvalidPattern, NexusError, ResourceExhausted
from nexus.events import TERMINAL_STATES
from nexus.node import Node, RequestSession, SessionState, Subscription
from nexus.node_remote import RemoteNode
from nexus.testing import run_server

GUARD = 10.0


class Echo(EventHandler):
    event_type = "conf:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"echo": event.payload}


class Countdown(StreamingEventHandler):
    event_type = "conf:stream_countdown"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        for i in range(int(event.payload.get("n", 3))):
            await stream.send({"i": i})


class Hold(StreamingEventHandler):
    """Streams one chunk, then waits until it is cancelled."""

    event_type = "conf:stream_hold"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"held": True})
        await asyncio.Event().wait()


@dataclasses.dataclass
class Harness:
    """The node under test and the server behind it."""

    kind: str
    node: Node
    other: Node
    """The server's own node: publishes into the same history from elsewhere."""


@pytest.fixture(params=["local-memory", pytest.param("local-nats", marks=pytest.mark.nats), "remote"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    kind = str(request.param)
    handlers = (Echo(), Countdown(), Hold())
    async with AsyncExitStack() as stack:
        if kind == "local-nats":
            url = shared_nats_url()
            stream, prefix = unique_names("node")
            stack.push_async_callback(delete_stream, url, stream)
            settings = nats_settings(url, stream, prefix)
            server = await stack.enter_async_context(run_server(*handlers, settings=settings, heartbeat_interval=0.05))
        else:
            server = await stack.enter_async_context(run_server(*handlers, heartbeat_interval=0.05))
        local = server.server.node
        node: Node = local
        if kind == "remote":
            remote = RemoteNode(server.address, history_size=1_000)
            await remote.start()
            stack.push_async_callback(remote.close)
            node = remote
        yield Harness(kind, node, local)


async def take(sub: Subscription, count: int) -> list[Event]:
    """The next ``count`` events of ``sub`` (heartbeats skipped)."""
    got: list[Event] = []

    async def collect() -> None:
        while len(got) < count:
            batch = await sub.next_batch()
            assert batch, f"the subscription ended after {got}"
            got.extend(event for event in batch if event.state != "heartbeat")

    await asyncio.wait_for(collect(), GUARD)
    return got


async def lifecycle(session: RequestSession) -> list[Event]:
    """Every lifecycle event of a session with its own subscription, heartbeats skipped."""

    async def collect() -> list[Event]:
        return [event async for event in session.events() if event.state != "heartbeat"]

    return await asyncio.wait_for(collect(), GUARD)


def states(events: list[Event]) -> list[str]:
    return [event.state for event in events]


# --- publishing and subscribing ------------------------------------------------------------------------------


async def test_publish_stores_with_offset_and_epoch(harness: Harness) -> None:
    """A publish returns the stored event: an offset past the head, the node's epoch, the payload as sent."""
    node = harness.node
    head = await node.head_offset()
    published = await node.publish(Event.create("conf:thing:v1:made", {"n": 1}))
    assert not published.duplicate
    assert published.event.offset > head
    assert published.event.epoch == node.epoch != ""
    assert published.event.payload == {"n": 1}
    await until("the head to reach the new offset", lambda: _at_least(node, published.event.offset))


async def _at_least(node: Node, offset: int) -> bool:
    return await node.head_offset() >= offset


async def test_a_repeated_event_id_answers_with_the_stored_original(harness: Harness) -> None:
    """Publishing an event_id again inside the dedupe window stores nothing and returns the original."""
    first = await harness.node.publish(Event.create("conf:thing:v1:made", {"n": 1}, event_id="conf-dup"))
    again = await harness.node.publish(Event.create("conf:thing:v1:made", {"n": 2}, event_id="conf-dup"))
    assert again.duplicate
    assert again.event.offset == first.event.offset
    assert again.event.payload == {"n": 1}


async def test_subscribers_get_matching_events_in_offset_order(harness: Harness) -> None:
    """A subscription gets what its patterns match, published anywhere, in offset order, and nothing else."""
    sub = await harness.node.subscribe(["conf:thing:*:made"])
    try:
        sent = []
        for n in range(5):
            sent.append((await harness.other.publish(Event.create("conf:thing:v1:made", {"n": n}))).event)
            await harness.other.publish(Event.create("conf:other:v1:made", {"n": n}))
        got = await take(sub, 5)
        assert [e.offset for e in got] == [e.offset for e in sent]
        assert [e.payload["n"] for e in got] == list(range(5))
        assert sub.take_nowait() == []
    finally:
        sub.close()


async def test_resume_replays_every_missed_event_once_then_goes_live(harness: Harness) -> None:
    """since_offset + epoch replays every matching event after it, then continues live: no gap, no duplicate."""
    node = harness.node
    first = (await harness.other.publish(Event.create("conf:thing:v1:made", {"n": 0}))).event
    missed = [(await harness.other.publish(Event.create("conf:thing:v1:made", {"n": n}))).event for n in (1, 2)]
    await until("the node to hold the missed events", lambda: _at_least(node, missed[-1].offset))
    sub = await node.subscribe(["conf:thing:>"], since_offset=first.offset, epoch=first.epoch)
    try:
        assert sub.recovered is True
        assert sub.epoch == first.epoch
        live = (await harness.other.publish(Event.create("conf:thing:v1:made", {"n": 3}))).event
        got = await take(sub, 3)
        assert [e.offset for e in got] == [missed[0].offset, missed[1].offset, live.offset]
    finally:
        sub.close()


async def test_resume_from_another_epoch_is_not_recovered(harness: Harness) -> None:
    """An offset of a history that is not this node's is never replayed silently: recovered is False."""
    await harness.node.publish(Event.create("conf:thing:v1:made"))
    sub = await harness.node.subscribe([">"], since_offset=1, epoch="another-history")
    try:
        assert sub.recovered is False
        live = (await harness.other.publish(Event.create("conf:thing:v1:made", {"live": True}))).event
        got = await take(sub, 1)
        assert got[0].offset == live.offset
    finally:
        sub.close()


async def test_invalid_patterns_are_refused(harness: Harness) -> None:
    """A bad pattern raises InvalidPattern and registers nothing."""
    with pytest.raises(InvalidPattern):
        await harness.node.subscribe(["conf:thing"])
    with pytest.raises(InvalidPattern):
        await harness.node.subscribe([">", "Bad:*"])


# --- requests -------------------------------------------------------------------------------------------------


async def test_a_plain_request_ends_with_success(harness: Harness) -> None:
    """request() stores the request and its session yields the lifecycle through the terminal event."""
    session = await harness.node.request(Event.create("conf:echo:v1:requested", {"x": 1}))
    assert session.stored.offset > 0
    assert not session.duplicate
    events = await lifecycle(session)
    assert states(events) == ["success"]
    assert events[-1].payload == {"echo": {"x": 1}}
    assert events[-1].correlation_id == session.correlation_id
    assert session.finished
    assert session.state is SessionState.FINISHED
    session.close()


async def test_a_streaming_request_yields_its_whole_lifecycle(harness: Harness) -> None:
    """started, every chunk in order, then success; nothing after the terminal event."""
    session = await harness.node.request(Event.create("conf:stream_countdown:v1:requested", {"n": 3}))
    events = await lifecycle(session)
    assert states(events) == ["started", "stream", "stream", "stream", "success"]
    assert [e.payload["i"] for e in events if e.state == "stream"] == [0, 1, 2]
    assert await session.next_batch() == []


async def test_a_request_with_no_handler_fails_with_no_handler(harness: Harness) -> None:
    """A request nobody handles ends failed with error.type no_handler."""
    session = await harness.node.request(Event.create("conf:nobody:v1:requested"))
    events = await lifecycle(session)
    assert states(events) == ["failed"]
    assert events[-1].payload["error"]["type"] == "no_handler"


async def test_a_request_follows_the_requesters_own_subscription(harness: Harness) -> None:
    """With follow=, the lifecycle reaches the requester's subscription (followed before the publish)."""
    sub = await harness.node.subscribe([])
    try:
        session = await harness.node.request(Event.create("conf:stream_countdown:v1:requested", {"n": 2}), follow=sub)
        assert session.subscription is None
        got = await take(sub, 4)
        for event in got:
            session.observe(event)
        assert states(got) == ["started", "stream", "stream", "success"]
        assert session.state is SessionState.FINISHED
        assert session.correlation_id not in sub.correlation_ids  # let go once it ended
    finally:
        sub.close()


async def test_closing_a_session_early_cancels_its_stream(harness: Harness) -> None:
    """A requester that leaves before the end cancels its stream: cancelled, reason 'requester disconnected'."""
    watcher = await harness.other.subscribe(["conf:stream_hold:v1:*"])
    try:
        session = await harness.node.request(Event.create("conf:stream_hold:v1:requested"))
        assert states(await take(session.subscription or watcher, 2)) == ["started", "stream"]
        session.close()
        events = [e for e in await take(watcher, 4) if e.correlation_id == session.correlation_id]
        assert events[-1].state == "cancelled"
        assert events[-1].payload["reason"] == "requester disconnected"
    finally:
        watcher.close()


async def test_a_repeated_request_replays_the_original_and_leaving_it_cancels_nothing(harness: Harness) -> None:
    """Sending a request's event_id again replays the original's lifecycle; the repeat does not own it."""
    original = await harness.node.request(Event.create("conf:stream_hold:v1:requested", event_id="conf-rep"))
    assert original.subscription is not None
    assert states(await take(original.subscription, 2)) == ["started", "stream"]

    repeat = await harness.node.request(Event.create("conf:stream_hold:v1:requested", event_id="conf-rep"))
    assert repeat.duplicate
    assert repeat.stored.offset == original.stored.offset
    assert repeat.subscription is not None
    assert states(await take(repeat.subscription, 2)) == ["started", "stream"]
    repeat.close()
    await asyncio.sleep(0.2)
    assert [s["correlation_id"] for s in await harness.other.streams()] == ["conf-rep"]

    assert await harness.node.cancel("conf-rep", "done here") in (True, False)
    terminal = [e for e in await take(original.subscription, 1) if e.state in TERMINAL_STATES]
    assert terminal[0].state == "cancelled"
    assert terminal[0].payload["reason"] == "done here"


async def test_requests_are_refused_for_the_wrong_event_type(harness: Harness) -> None:
    """Only a ...:requested event is a request; an event_id already naming another type is refused."""
    with pytest.raises(InvalidArgument, match="requested"):
        await harness.node.request(Event.create("conf:echo:v1:success"))
    await harness.node.request(Event.create("conf:echo:v1:requested", event_id="conf-kind"))
    with pytest.raises(InvalidArgument, match="already names"):
        await harness.node.request(Event.create("conf:stream_countdown:v1:requested", event_id="conf-kind"))


async def test_listings_show_handlers_and_live_streams(harness: Harness) -> None:
    """handlers() lists every handler with its kind; streams() lists a running stream until it ends."""
    handlers = {h["event_type"]: h for h in await harness.node.handlers()}
    assert set(handlers) == {"conf:echo", "conf:stream_countdown", "conf:stream_hold"}
    assert handlers["conf:stream_hold"]["streaming"] is True
    assert handlers["conf:echo"]["streaming"] is False
    session = await harness.node.request(Event.create("conf:stream_hold:v1:requested"))
    assert session.subscription is not None
    await take(session.subscription, 2)
    streams = await harness.node.streams()
    assert [s["correlation_id"] for s in streams] == [session.correlation_id]
    assert streams[0]["event_type"] == "conf:stream_hold:v1:requested"
    session.close()
    await until("the stream to end", lambda: _no_streams(harness.node))


async def _no_streams(node: Node) -> bool:
    return await node.streams() == []


async def test_a_node_is_healthy_and_named_by_its_epoch(harness: Harness) -> None:
    """A started node reports healthy, and its epoch is the server's."""
    assert harness.node.healthy
    assert harness.node.epoch == harness.other.epoch
    assert isinstance(harness.node.describe(), dict)


async def test_errors_are_nexus_errors(harness: Harness) -> None:
    """Whatever a node refuses, it refuses with a NexusError (a code every transport maps)."""
    with pytest.raises(NexusError):
        await harness.node.subscribe(["a:b:c"])
    with pytest.raises(NexusError):
        await harness.node.request(Event.create("conf:echo:v1:started"))


async def test_a_subscription_follows_at_most_256_patterns(harness: Harness) -> None:
    """256 patterns are fine; more are refused with ResourceExhausted before any is parsed or indexed."""
    sub = await harness.node.subscribe([f"conf:p{n}:*:*" for n in range(256)])
    sub.close()
    with pytest.raises(ResourceExhausted, match="257 patterns in one subscription, over the limit of 256"):
        await harness.node.subscribe([f"conf:p{n}:*:*" for n in range(257)])
    with pytest.raises(ResourceExhausted):
        await harness.node.subscribe(["not a pattern"] * 100_000)
