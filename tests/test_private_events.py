"""With authentication on, every transport delivers an event only to whom it is for: an event naming its
audience to those users, a request's lifecycle to its requester (unless its handler made results public); an
admin sees everything. Live and in replay, on the memory and the NATS bus. (Principals are made here as the
transports make them from verified tokens.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats_support import delete_stream, nats_settings, shared_nats_url, unique_names

from nexus import Event, EventHandler, Stream, StreamingEventHandler
from nexus.identity import Principal
from nexus.node import Node, Subscription
from nexus.testing import run_server

GUARD = 10.0
ALICE = Principal("c-alice", "alice", authenticated=True)
BOB = Principal("c-bob", "bob", authenticated=True)
CAROL = Principal("c-carol", "carol", authenticated=True)
ADMIN = Principal("c-admin", "root", authenticated=True, admin=True)


class Countdown(StreamingEventHandler):
    event_type = "priv:stream_countdown"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        for i in range(int(event.payload.get("n", 2))):
            await stream.send({"i": i, "secret": "for the requester"})


class Weather(EventHandler):
    event_type = "priv:weather"
    public_results = True

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"sky": "clear"}


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
async def node(request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    async with contextlib.AsyncExitStack() as stack:
        overrides: dict[str, Any] = {"heartbeat_interval": 0}
        if request.param == "nats":
            url = shared_nats_url()
            stream, prefix = unique_names("priv")
            stack.push_async_callback(delete_stream, url, stream)
            overrides["settings"] = nats_settings(url, stream, prefix)
        server = await stack.enter_async_context(run_server(Countdown(), Weather(), **overrides))
        yield server.server.node


async def drain(sub: Subscription, until_offset: int) -> list[Event]:
    """What ``sub`` receives up to ``until_offset`` (a marker everyone may see)."""
    got: list[Event] = []

    async def collect() -> None:
        while not got or got[-1].offset < until_offset:
            batch = await sub.next_batch()
            assert batch, f"the subscription ended after {got}"
            got.extend(batch)

    await asyncio.wait_for(collect(), GUARD)
    return got


async def marker(node: Node) -> int:
    return (await node.publish(Event.create("priv:marker:v1:set"), principal=ADMIN)).event.offset


async def test_an_event_naming_its_audience_reaches_only_those_users(node: Node) -> None:
    """audience "alice,carol": alice and carol receive it, bob does not, the admin does; in replay too."""
    subs = {p.user_id: await node.subscribe([">"], principal=p) for p in (ALICE, BOB, CAROL, ADMIN)}
    note = await node.publish(
        Event.create("priv:note:v1:sent", {"text": "hi"}, metadata={"audience": "alice, carol"}), principal=ALICE
    )
    end = await marker(node)
    seen = {user: [e.offset for e in await drain(sub, end)] for user, sub in subs.items()}
    assert note.event.offset in seen["alice"]
    assert note.event.offset in seen["carol"]
    assert note.event.offset in seen["root"]
    assert note.event.offset not in seen["bob"]
    replay = await node.subscribe([">"], since_offset=note.event.offset - 1, epoch=node.epoch, principal=BOB)
    assert note.event.offset not in [e.offset for e in await drain(replay, end)]
    for sub in [*subs.values(), replay]:
        sub.close()


async def test_a_requests_lifecycle_reaches_its_requester_only(node: Node) -> None:
    """bob, subscribed to everything, receives nothing of alice's request: not the request, its chunks nor its
    result, live or in replay; alice's own session gets all of it; the admin sees it."""
    bob = await node.subscribe([">"], principal=BOB)
    admin = await node.subscribe([">"], principal=ADMIN)
    session = await node.request(Event.create("priv:stream_countdown:v1:requested", {"n": 2}), principal=ALICE)
    mine = [event async for event in session.events()]
    assert [e.state for e in mine] == ["started", "stream", "stream", "success"]
    end = await marker(node)
    assert [e.correlation_id for e in await drain(bob, end) if e.correlation_id] == []
    assert [e.state for e in await drain(admin, end) if e.correlation_id == session.correlation_id] == [
        "started",
        "stream",
        "stream",
        "success",
    ]
    replay = await node.subscribe([">"], since_offset=session.stored.offset - 1, epoch=node.epoch, principal=BOB)
    assert [e.offset for e in await drain(replay, end)] == [end]
    for sub in (bob, admin, replay):
        sub.close()


async def test_a_handler_with_public_results_is_seen_by_every_subscriber(node: Node) -> None:
    """public_results = True: bob receives the result of alice's request (the request itself stays hers)."""
    bob = await node.subscribe(["priv:weather:>"], principal=BOB)
    session = await node.request(Event.create("priv:weather:v1:requested"), principal=ALICE)
    result = [event async for event in session.events()][-1]
    got = await drain(bob, result.offset)
    assert [e.state for e in got] == ["success"]
    assert got[-1].payload == {"sky": "clear"}
    bob.close()
