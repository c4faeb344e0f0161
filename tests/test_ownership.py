"""Who may do what without authentication: a request belongs to the connection that sent it, and the lifecycle of
a handled type is published by its handler only. Over gRPC and WebSocket, on the memory and the NATS bus."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from nats_support import delete_stream, nats_settings, shared_nats_url, unique_names
from websockets.asyncio.client import ClientConnection, connect

from nexus import Event, EventHandler, Stream, StreamingEventHandler
from nexus.client import NexusClient
from nexus.errors import AlreadyExists, InvalidArgument, PermissionDenied
from nexus.testing import StreamFollower, TestServer, run_server
from nexus.v1 import nexus_pb2

GUARD = 10.0


class Hold(StreamingEventHandler):
    """Streams one chunk, then waits until it is cancelled."""

    event_type = "own:stream_hold"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"held": True})
        await asyncio.Event().wait()


class Echo(EventHandler):
    event_type = "own:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"echo": event.payload}


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
async def nexus(request: pytest.FixtureRequest) -> AsyncIterator[TestServer]:
    async with contextlib.AsyncExitStack() as stack:
        overrides: dict[str, Any] = {"gateway": True, "heartbeat_interval": 0.05}
        if request.param == "nats":
            url = shared_nats_url()
            stream, prefix = unique_names("own")
            stack.push_async_callback(delete_stream, url, stream)
            overrides["settings"] = nats_settings(url, stream, prefix)
        yield await stack.enter_async_context(run_server(Hold(), Echo(), **overrides))


@contextlib.asynccontextmanager
async def ws(server: TestServer) -> AsyncIterator[ClientConnection]:
    async with connect(server.ws_url, subprotocols=["nexus.v1"], open_timeout=GUARD) as socket:  # type: ignore[list-item]
        assert json.loads(await socket.recv())["type"] == "connection"
        yield socket


async def frame(socket: ClientConnection, **fields: Any) -> dict[str, Any]:
    """Send a frame; return the first answer that is not an event."""
    await socket.send(json.dumps(fields))
    while True:
        answer: dict[str, Any] = json.loads(await asyncio.wait_for(socket.recv(), GUARD))
        if answer["type"] in ("error", "published", "pong"):
            return answer


async def test_a_forged_lifecycle_is_refused_and_the_requester_ends_on_the_real_terminal(nexus: TestServer) -> None:
    """B's `stream` and `success` for A's request are refused (PERMISSION_DENIED, error frame reserved_state); A
    sees only its handler's events and ends on the real terminal event."""
    alice = StreamFollower(nexus.client.request("own:stream_hold:v1:requested", {}, heartbeats=False))
    await alice.started()
    await alice.wait_for(lambda chunks: len(chunks) == 1)
    victim = alice.stream.correlation_id
    async with NexusClient(nexus.address) as bob:
        for state in ("stream", "success"):
            with pytest.raises(PermissionDenied, match="only the handler"):
                await bob.emit(f"own:stream_hold:v1:{state}", {"fake": True}, metadata={"correlation_id": victim})
    async with ws(nexus) as mallory:
        answer = await frame(
            mallory, type="own:stream_hold:v1:success", payload={"fake": True}, metadata={"correlation_id": victim}
        )
        assert (answer["type"], answer["code"]) == ("error", "reserved_state")
        # A type no handler serves is a plain name: any state goes.
        assert (await frame(mallory, type="free:talk:v1:success", payload={}))["type"] == "published"
    ended = await alice.cancel()
    assert ended.state == "cancelled"
    assert [event.state for event in alice.events] == ["started", "stream", "cancelled"]
    assert all(not event.payload.get("fake") for event in alice.events)


async def test_a_state_outside_the_lifecycle_of_a_handled_type_is_refused_with_a_suggestion(
    nexus: TestServer,
) -> None:
    """`own:echo:v1:request` (a typo of `requested`) is refused with INVALID_ARGUMENT suggesting `requested`, on
    gRPC EmitEvent and PublishEvents and as a WebSocket error frame with a code; nothing is stored. Domain states
    stay open on an action of the same service that no handler serves."""
    head = await nexus.bus.head_offset()
    with pytest.raises(InvalidArgument, match=r"'request' is not a state .* did you mean 'requested'\?"):
        await nexus.client.emit("own:echo:v1:request", {"x": 1})
    with pytest.raises(InvalidArgument, match=r"did you mean 'success'\?"):
        await nexus.client.publish_many([Event.create("own:echo:v1:sucess", {})])
    async with ws(nexus) as socket:
        answer = await frame(socket, type="own:stream_hold:v1:strem", payload={}, event_id="typo-1")
        assert (answer["type"], answer["code"], answer["ref"]) == ("error", "invalid_argument", "typo-1")
        assert "did you mean 'stream'?" in answer["message"]
        assert (await frame(socket, type="own:encounter:v1:started", payload={}))["type"] == "published"
    assert await nexus.bus.head_offset() == head + 1  # only the domain event


async def test_another_client_cannot_cancel_list_or_join_a_request(nexus: TestServer) -> None:
    """B's cancel of A's stream finds nothing and leaves it running; B's listing does not show it; B reusing its
    event_id is refused (ALREADY_EXISTS, duplicate_id) and never receives its lifecycle."""
    alice = StreamFollower(
        nexus.client.request("own:stream_hold:v1:requested", {"secret": "a"}, event_id="alice-1", heartbeats=False)
    )
    await alice.wait_for(lambda chunks: len(chunks) == 1)
    assert [s["correlation_id"] for s in await nexus.client.streams()] == ["alice-1"]
    async with NexusClient(nexus.address) as bob:
        assert await bob.cancel("alice-1", "mine now") is False
        assert await bob.streams() == []
        with pytest.raises(AlreadyExists):
            await bob.emit("own:stream_hold:v1:requested", {}, event_id="alice-1")
        call = bob.stub.RequestEvent(
            nexus_pb2.RequestEventRequest(
                event=nexus_pb2.EventRequest(event_type="own:stream_hold:v1:requested", event_id="alice-1")
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), GUARD)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    async with ws(nexus) as mallory:
        refused = await frame(mallory, type="own:stream_hold:v1:requested", event_id="alice-1")
        assert (refused["type"], refused["code"]) == ("error", "duplicate_id")
        refused = await frame(mallory, type="cancel", correlation_id="alice-1")
        assert (refused["type"], refused["code"]) == ("error", "not_found")
        assert (await frame(mallory, type="ping"))["type"] == "pong"  # nothing of alice's arrived meanwhile
    assert [s["correlation_id"] for s in await nexus.server.node.streams()] == ["alice-1"]
    ended = await alice.cancel()
    assert ended.state == "cancelled"


async def test_the_owner_repeats_and_cancels_its_own_request(nexus: TestServer) -> None:
    """The connection that sent a request may repeat its event_id (a replay of its lifecycle) and cancel it."""
    first = await nexus.client.call("own:echo:v1:requested", {"n": 1}, event_id="mine-1")
    again = await nexus.client.call("own:echo:v1:requested", {"n": 1}, event_id="mine-1")
    assert again.event_id == first.event_id
    assert again.payload == {"echo": {"n": 1}}
    held = StreamFollower(nexus.client.request("own:stream_hold:v1:requested", {}, event_id="mine-2", heartbeats=False))
    await held.wait_for(lambda chunks: len(chunks) == 1)
    assert await nexus.client.cancel("mine-2", "done") is True
    assert (await held.ended()).payload["reason"] == "done"
