"""The WebSocket gateway end to end, with the `websockets` client against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from nexus.gateway.asyncapi import asyncapi_document
from nexus.gateway.server import GatewayServer, GatewaySettings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol
from worker_support import RawWorker
from worker_support import handler as worker_handler

from nexus import Event, EventHandler, EventSpec, Stream, StreamingEventHandler
from nexus.auth import Credentials
from nexus.errors import Unauthenticated
from nexus.identity import Principal
from nexus.node import Node
from nexus.node_remote import RemoteNode
from nexus.quota import ClientLimits
from nexus.testing import Recorder, TestServer, run_server

NEXUS_V1 = [Subprotocol("nexus.v1")]

GUARD = 15.0
"""Seconds any awaited condition may take before the test fails (a guard, not a measurement)."""

TERMINAL = {"success", "failed", "timeout", "cancelled"}


# --- handlers ---------------------------------------------------------------------------------------------------


class Countdown(StreamingEventHandler):
    """Sends ``n`` chunks ``{"i": i}``, pausing ``every`` seconds between them."""

    event_type = "demo:stream_countdown"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        every = float(event.payload.get("every", 0))
        for i in range(int(event.payload.get("n", 3))):
            await stream.send({"i": i})
            if every:
                await asyncio.sleep(every)


class Hold(StreamingEventHandler):
    """Runs until cancelled; records how each run ended."""

    event_type = "demo:stream_hold"
    stream_timeout = None

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled: list[str] = []

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"holding": True})
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(event.event_id)
            raise


class Echo(EventHandler):
    event_type = "demo:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"echo": event.payload}


@dataclasses.dataclass
class Handlers:
    countdown: Countdown
    hold: Hold
    echo: Echo


@pytest.fixture
def handlers() -> Handlers:
    """Fresh handler instances for one test."""
    return Handlers(Countdown(), Hold(), Echo())


@pytest.fixture
async def nexus(handlers: Handlers) -> AsyncIterator[TestServer]:
    """A server with the test handlers and its gateway on a free port (as `nexus serve` starts it)."""
    async with run_server(
        handlers.countdown, handlers.hold, handlers.echo, gateway=True, heartbeat_interval=0.05
    ) as server:
        yield server


@contextlib.asynccontextmanager
async def gateway_for(server: TestServer, *, node: Node | None = None, **settings: Any) -> AsyncIterator[GatewayServer]:
    """A gateway with custom settings over ``server`` (in process unless ``node`` is given); stopped after."""
    authenticator = settings.pop("authenticator", None)
    gateway_settings = GatewaySettings(host="127.0.0.1", port=0, **settings)
    node = node or server.server.node
    gateway = (
        GatewayServer(node, gateway_settings, authenticator=authenticator)
        if authenticator is not None
        else GatewayServer(node, gateway_settings)
    )
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop(grace=1.0)


# --- a test client ----------------------------------------------------------------------------------------------


class Peer:
    """A WebSocket client that reads frames as dicts."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        async with asyncio.timeout(GUARD):
            data = await self.ws.recv()
        frame: dict[str, Any] = json.loads(data)
        return frame

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Frames received up to and including the first one ``predicate`` accepts."""
        frames = []
        while True:
            frame = await self.recv()
            frames.append(frame)
            if predicate(frame):
                return frames

    async def barrier(self) -> list[dict[str, Any]]:
        """Everything that arrives before the answer to a ping sent now (the pong excluded)."""
        ref = f"barrier-{id(self)}-{asyncio.get_running_loop().time()}"
        await self.send(type="ping", ref=ref)
        frames = await self.until(lambda f: f["type"] == "pong" and f.get("ref") == ref)
        return frames[:-1]

    async def subscribe(self, *patterns: str, **extra: Any) -> dict[str, Any]:
        await self.send(type="subscribe", event_types=list(patterns), **extra)
        frames = await self.until(lambda f: f["type"] in ("subscribed", "error"))
        return frames[-1]

    async def closed_code(self) -> int:
        """Read until the server closes; the close code received."""
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(GUARD):
                while True:
                    await self.ws.recv()
        assert self.ws.close_code is not None
        return self.ws.close_code


@contextlib.asynccontextmanager
async def peer(url: str, **kwargs: Any) -> AsyncIterator[Peer]:
    """A connected Peer whose first frame (`connection`) was checked."""
    kwargs.setdefault("subprotocols", NEXUS_V1)
    async with connect(url, open_timeout=GUARD, **kwargs) as ws:
        client = Peer(ws)
        first = await client.recv()
        assert first["type"] == "connection"
        yield client


def states(frames: list[dict[str, Any]], *, heartbeats: bool = False) -> list[str]:
    """The states of the event frames among ``frames``."""
    return [
        f["type"].rsplit(":", 1)[1]
        for f in frames
        if ":" in f["type"] and (heartbeats or not f["type"].endswith(":heartbeat"))
    ]


def is_terminal(frame: dict[str, Any]) -> bool:
    return ":" in frame["type"] and frame["type"].rsplit(":", 1)[1] in TERMINAL


async def wait_until(condition: Callable[[], bool]) -> None:
    """Wait (yielding to the loop) until ``condition`` holds; fails after GUARD seconds."""
    async with asyncio.timeout(GUARD):
        while not condition():  # noqa: ASYNC110 - server-side state that offers no event to wait on
            await asyncio.sleep(0.01)


def gateway_tasks() -> list[asyncio.Task[Any]]:
    """Live tasks the gateway's connections run (pumps, writers, repeats, requests)."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("nexus-gateway") and not t.done()]


# --- connecting -------------------------------------------------------------------------------------------------


async def test_connection_frame_names_the_connection_and_epoch(nexus: TestServer) -> None:
    """The first frame is `connection` with an id and the bus epoch, and nexus.v1 is the selected subprotocol."""
    async with connect(nexus.ws_url, subprotocols=NEXUS_V1) as ws:
        first = json.loads(await ws.recv())
        assert first["type"] == "connection"
        assert first["status"] == "connected"
        assert first["connection_id"]
        assert first["epoch"] == nexus.bus.epoch
        assert ws.subprotocol == "nexus.v1"


async def test_a_client_offering_other_subprotocols_only_is_refused(nexus: TestServer) -> None:
    """A handshake offering subprotocols without nexus.v1 is refused (HTTP 400)."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(nexus.ws_url, subprotocols=[Subprotocol("chat")]):
            pass
    assert refused.value.response.status_code == 400


# --- subscribing ------------------------------------------------------------------------------------------------


async def test_subscribed_comes_before_replayed_events(nexus: TestServer) -> None:
    """A resume gets `subscribed` (recovered: true) first, then every matching stored event after the offset."""
    stored = [await nexus.client.emit("demo:tick:v1:happened", {"n": n}) for n in range(4)]
    await nexus.client.emit("other:tick:v1:happened")
    async with peer(nexus.ws_url) as client:
        subscribed = await client.subscribe("demo:>", since_offset=stored[0].offset, epoch=nexus.bus.epoch)
        assert subscribed["type"] == "subscribed"
        assert subscribed["recovered"] is True
        assert subscribed["event_types"] == ["demo:>"]
        assert subscribed["epoch"] == nexus.bus.epoch
        assert subscribed["head_offset"] == stored[-1].offset + 1
        replayed = await client.barrier()
        assert [f["offset"] for f in replayed] == [e.offset for e in stored[1:]]
        assert [f["payload"] for f in replayed] == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert all(f["event_id"] and f["timestamp"].endswith("Z") and f["epoch"] for f in replayed)


async def test_resume_that_cannot_replay_says_recovered_false_and_continues_live(nexus: TestServer) -> None:
    """Another epoch or an offset ahead of the head: recovered false, no replay, then live events."""
    await nexus.client.emit("demo:tick:v1:happened")
    async with peer(nexus.ws_url) as client:
        subscribed = await client.subscribe("demo:>", since_offset=1, epoch="another-epoch")
        assert subscribed["recovered"] is False
        assert await client.barrier() == []
        live = await nexus.client.emit("demo:tick:v1:happened", {"live": True})
        frame = await client.recv()
        assert frame["offset"] == live.offset
    async with peer(nexus.ws_url) as client:
        ahead = await client.subscribe(">", since_offset=10_000)
        assert ahead["recovered"] is False


async def test_a_live_subscribe_has_no_recovered_field(nexus: TestServer) -> None:
    """Without since_offset or epoch the subscription is live and `subscribed` carries no `recovered`."""
    async with peer(nexus.ws_url) as client:
        subscribed = await client.subscribe(">")
        assert "recovered" not in subscribed


async def test_overlapping_patterns_and_subscribe_frames_deliver_each_event_once(nexus: TestServer) -> None:
    """Several subscribe frames with overlapping patterns still deliver each event exactly once."""
    async with peer(nexus.ws_url) as client:
        await client.subscribe("demo:>")
        later = await client.subscribe("demo:*:v1:*", ">", "demo:tick:v1:happened")
        assert "recovered" not in later
        sent = [await nexus.client.emit("demo:tick:v1:happened", {"n": n}) for n in range(3)]
        received = await client.barrier()
        assert [f["offset"] for f in received] == [e.offset for e in sent]


async def test_a_later_subscribe_with_an_offset_is_told_recovered_false(nexus: TestServer) -> None:
    """Once a connection's stream has started, a subscribe frame with since_offset adds its patterns live and
    says recovered: false instead of replaying silently out of order."""
    await nexus.client.emit("b:tick:v1:happened")
    async with peer(nexus.ws_url) as client:
        await client.subscribe("a:>")
        later = await client.subscribe("b:>", since_offset=0, epoch=nexus.bus.epoch)
        assert later["recovered"] is False
        assert await client.barrier() == []
        event = await nexus.client.emit("b:tick:v1:happened")
        assert (await client.recv())["offset"] == event.offset


async def test_unsubscribe_stops_delivery(nexus: TestServer) -> None:
    """After `unsubscribed`, events of the removed pattern no longer arrive; the others still do."""
    async with peer(nexus.ws_url) as client:
        await client.subscribe("a:>", "b:>")
        await client.send(type="unsubscribe", event_types=["a:>"], ref="u1")
        answer = await client.recv()
        assert answer == {"type": "unsubscribed", "event_types": ["a:>"], "ref": "u1"}
        await nexus.client.emit("a:tick:v1:happened")
        kept = await nexus.client.emit("b:tick:v1:happened")
        assert [f["offset"] for f in await client.barrier()] == [kept.offset]


# --- publishing and requests ------------------------------------------------------------------------------------


async def test_publish_is_acknowledged_and_stored(nexus: TestServer) -> None:
    """A publish frame gets `published` with the stored id and offset; the event is on the bus."""
    recorder = await nexus.record("demo:>")
    try:
        async with peer(nexus.ws_url) as client:
            await client.send(type="demo:thing:v1:happened", payload={"a": 1}, event_id="thing-1")
            published = await client.recv()
            assert published["type"] == "published"
            assert published["event_id"] == "thing-1"
            assert isinstance(published["offset"], int)
            assert published["offset"] >= 1
            assert published["duplicate"] is False
            await client.send(type="demo:thing:v1:happened", event_id="thing-1")
            again = await client.recv()
            assert again["duplicate"] is True
            assert again["offset"] == published["offset"]
        events = await recorder.wait_count(1)
        assert events[0].payload == {"a": 1}
        assert events[0].offset == published["offset"]
    finally:
        await recorder.stop()


async def test_requester_receives_its_lifecycle_without_subscribing(nexus: TestServer) -> None:
    """A streaming request sent over the socket brings back `published`, then started, every chunk, success."""
    async with peer(nexus.ws_url) as client:
        await client.send(type="demo:stream_countdown:v1:requested", payload={"n": 3}, event_id="req-1")
        frames = await client.until(is_terminal)
        assert frames[0]["type"] == "published"
        assert frames[0]["event_id"] == "req-1"
        assert states(frames[1:]) == ["started", "stream", "stream", "stream", "success"]
        events = [f for f in frames[1:] if not f["type"].endswith(":heartbeat")]
        assert all(f["metadata"]["correlation_id"] == "req-1" for f in events)
        assert [f["payload"] for f in events if f["type"].endswith(":stream")] == [{"i": 0}, {"i": 1}, {"i": 2}]
        offsets = [f["offset"] for f in events]
        assert offsets == sorted(offsets)
        assert await client.barrier() == []


async def test_a_requester_also_subscribed_gets_each_lifecycle_event_once(nexus: TestServer) -> None:
    """Subscribed to `>` and sending a request, a connection sees its request and each lifecycle event once."""
    async with peer(nexus.ws_url) as client:
        await client.subscribe(">")
        await client.send(type="demo:echo:v1:requested", payload={"x": 1}, event_id="echo-1")
        frames = await client.until(is_terminal)
        frames += await client.barrier()
        kinds = [f["type"] for f in frames if f["type"] != "published"]
        assert kinds == ["demo:echo:v1:requested", "demo:echo:v1:success"]
        assert frames[-1]["payload"] == {"echo": {"x": 1}}


async def test_repeated_request_replays_the_original_lifecycle(nexus: TestServer) -> None:
    """Sending a request again with the same event_id answers `published` duplicate and replays its lifecycle; on
    another (anonymous) connection the id is another owner's: refused with duplicate_id, nothing replayed."""
    async with peer(nexus.ws_url) as client:
        await client.send(type="demo:stream_countdown:v1:requested", payload={"n": 2}, event_id="again-1")
        first = await client.until(is_terminal)
        await client.send(type="demo:stream_countdown:v1:requested", payload={"n": 2}, event_id="again-1")
        second = await client.until(is_terminal)
        assert second[0]["type"] == "published"
        assert second[0]["duplicate"] is True
        assert [f["event_id"] for f in second[1:] if f["offset"]] == [f["event_id"] for f in first[1:] if f["offset"]]
        assert await client.barrier() == []
    async with peer(nexus.ws_url) as other:
        await other.send(type="demo:stream_countdown:v1:requested", payload={"n": 2}, event_id="again-1")
        refused = await other.recv()
        assert (refused["type"], refused["code"], refused["ref"]) == ("error", "duplicate_id", "again-1")
        assert await other.barrier() == []


async def test_user_id_comes_from_authentication_not_from_the_client(nexus: TestServer) -> None:
    """An anonymous connection's metadata.user_id is only its claim, and the server says so (auth: none); the
    owner is set by the server, whatever the client wrote."""
    recorder = await nexus.record("demo:>")
    try:
        async with peer(nexus.ws_url) as client:
            await client.send(
                type="demo:thing:v1:happened", metadata={"user_id": "mallory", "k": "v", "owner": "user:bob"}
            )
            await client.recv()
        events = await recorder.wait_count(1)
        metadata = dict(events[0].metadata)
        assert metadata.pop("owner").startswith("connection:")
        assert metadata == {"user_id": "mallory", "k": "v", "auth": "none"}
    finally:
        await recorder.stop()


# --- cancelling -------------------------------------------------------------------------------------------------


async def test_cancel_ends_the_stream_with_cancelled(nexus: TestServer, handlers: Handlers) -> None:
    """A cancel frame for the connection's own stream ends it with `cancelled` and the reason given."""
    async with peer(nexus.ws_url) as client:
        await client.send(type="demo:stream_hold:v1:requested", event_id="hold-1")
        await client.until(lambda f: f["type"].endswith(":stream"))
        await client.send(type="cancel", correlation_id="hold-1", reason="enough")
        frames = await client.until(is_terminal)
        terminal = frames[-1]
        assert terminal["type"] == "demo:stream_hold:v1:cancelled"
        assert terminal["payload"]["reason"] == "enough"
        assert handlers.hold.cancelled == ["hold-1"]
        assert nexus.server.provider.streams() == []


async def test_cancel_of_a_stream_not_started_here_is_not_found(nexus: TestServer) -> None:
    """Cancelling a correlation id this connection did not start answers not_found with the id as ref."""
    async with peer(nexus.ws_url) as client:
        await client.send(type="cancel", correlation_id="someone-elses")
        error = await client.recv()
        assert (error["type"], error["code"], error["ref"]) == ("error", "not_found", "someone-elses")


async def test_closing_the_socket_cancels_its_streams_and_leaves_no_task(nexus: TestServer, handlers: Handlers) -> None:
    """When the socket closes, the streams it started end with `cancelled` and no gateway task is left."""
    recorder = await nexus.record("demo:stream_hold:v1:cancelled")
    try:
        async with peer(nexus.ws_url) as client:
            for n in range(3):
                await client.send(type="demo:stream_hold:v1:requested", event_id=f"leave-{n}")
            await wait_until(lambda: len(nexus.server.provider.streams()) == 3)
        events = await recorder.wait_count(3)
        assert sorted(e.correlation_id for e in events) == ["leave-0", "leave-1", "leave-2"]
        assert {e.payload["reason"] for e in events} == {"requester disconnected"}
        assert sorted(handlers.hold.cancelled) == ["leave-0", "leave-1", "leave-2"]
        gateway: GatewayServer = nexus.server.gateway
        await wait_until(lambda: not gateway.connections)
        assert gateway_tasks() == []
        assert nexus.server.provider.streams() == []
    finally:
        await recorder.stop()


# --- keepalive --------------------------------------------------------------------------------------------------


async def test_ping_is_answered_by_pong(nexus: TestServer) -> None:
    """An application ping gets a pong carrying its ref."""
    async with peer(nexus.ws_url) as client:
        await client.send(type="ping", ref="p-1")
        assert await client.recv() == {"type": "pong", "ref": "p-1"}
        await client.send(type="ping")
        assert await client.recv() == {"type": "pong"}


async def test_protocol_keepalive_drops_a_dead_peer(nexus: TestServer) -> None:
    """The server pings at the protocol level and closes a connection whose peer stopped answering."""
    settings: dict[str, Any] = {"ping_interval": 0.05, "ping_timeout": 0.2, "close_timeout": 0.2}
    async with gateway_for(nexus, **settings) as gateway, peer(gateway.url) as client:
        await wait_until(lambda: len(gateway.connections) == 1)
        client.ws.transport.pause_reading()  # the peer goes silent: no pong any more
        await wait_until(lambda: not gateway.connections)
        client.ws.transport.resume_reading()
        assert await client.closed_code() in (1006, 1011)


# --- bad input --------------------------------------------------------------------------------------------------


BAD_FRAMES = [
    ("not json at all", "invalid_json"),
    ('{"type":"demo:a:v1:x","payload":{"n":NaN}}', "invalid_json"),
    ("[1,2,3]", "not_an_object"),
    ("{}", "invalid_frame"),
    ('{"type":"subscribe","event_types":"demo:>"}', "invalid_frame"),
    ('{"type":"launch"}', "unknown_type"),
    ('{"type":"Demo:thing:v1:happened"}', "invalid_event_type"),
    ('{"type":"subscribe","event_types":["demo:>:v1"]}', "invalid_pattern"),
    ('{"type":"demo:thing:v1:happened","payload":[1]}', "invalid_payload"),
    ('{"type":"demo:thing:v1:happened","event_id":"big","payload":{"s":"' + "x" * 2000 + '"}}', "payload_too_large"),
]


async def test_bad_input_gets_error_frames_and_the_connection_stays_open(nexus: TestServer) -> None:
    """Every kind of bad frame is answered by an error frame with its code; the connection keeps working."""
    async with gateway_for(nexus, max_payload_bytes=1000) as gateway, peer(gateway.url) as client:
        for text, code in BAD_FRAMES:
            await client.ws.send(text)
            error = await client.recv()
            assert error["type"] == "error", text
            assert error["code"] == code, text
            assert error["message"]
        big = next(f for f in BAD_FRAMES if f[1] == "payload_too_large")
        await client.ws.send(big[0])
        assert (await client.recv())["ref"] == "big"
        subscribed = await client.subscribe(">")
        assert subscribed["type"] == "subscribed"
        assert gateway.stats.errors_sent == len(BAD_FRAMES) + 1


async def test_oversized_frame_closes_with_1009_and_others_are_unaffected(nexus: TestServer) -> None:
    """A frame over the size limit closes that connection with 1009; another connection keeps working."""
    async with (
        gateway_for(nexus, max_frame_bytes=4096) as gateway,
        peer(gateway.url) as bystander,
        peer(gateway.url) as client,
    ):
        await client.ws.send(json.dumps({"type": "demo:a:v1:x", "payload": {"s": "x" * 5000}}))
        assert await client.closed_code() == 1009
        await bystander.send(type="ping", ref="still-here")
        assert await bystander.recv() == {"type": "pong", "ref": "still-here"}
        await wait_until(lambda: gateway.stats.too_large == 1)


async def test_the_default_frame_limit_is_one_mebibyte(nexus: TestServer) -> None:
    """`nexus serve`'s gateway refuses frames over 1 MiB with 1009."""
    async with peer(nexus.ws_url, max_size=None) as client:
        await client.ws.send("x" * (1024 * 1024 + 1))
        assert await client.closed_code() == 1009


async def test_a_flood_from_one_client_does_not_starve_another(nexus: TestServer) -> None:
    """While one client floods pings (paced by the gateway), another's subscribe and publish are answered long
    before the flood is through."""
    async with (
        gateway_for(nexus, max_frames_per_s=2_000) as gateway,
        peer(gateway.url) as flooder,
        peer(gateway.url) as other,
    ):
        count = 4_000
        pongs = 0
        flowing = asyncio.Event()

        async def read_pongs() -> None:
            nonlocal pongs
            while pongs < count:
                if (await flooder.recv())["type"] == "pong":
                    pongs += 1
                    flowing.set()

        async def flood() -> None:
            for _ in range(count):
                await flooder.ws.send('{"type":"ping"}')

        reader = asyncio.create_task(read_pongs())
        sender = asyncio.create_task(flood())
        async with asyncio.timeout(GUARD):
            await flowing.wait()
        await other.subscribe("demo:>")
        await other.send(type="demo:thing:v1:happened", event_id="mine")
        published = await other.until(lambda f: f["type"] == "published")
        assert published[-1]["event_id"] == "mine"
        assert pongs < count
        async with asyncio.timeout(GUARD):
            await sender
            await reader
        assert pongs == count


# --- authentication ---------------------------------------------------------------------------------------------


async def refuse_all(credentials: Credentials) -> Principal:
    """An authenticator that refuses everyone."""
    raise Unauthenticated(f"token {credentials.token!r} is not valid")


async def user_from_token(credentials: Credentials) -> Principal:
    """An authenticator whose user id is the token itself, refusing connections without one."""
    if not credentials.token:
        raise Unauthenticated("a token is required")
    return Principal(credentials.connection_id, f"user-{credentials.token}", authenticated=True)


async def test_auth_hook_refusal_closes_with_1008(nexus: TestServer) -> None:
    """A refusing authenticator gets the client an `unauthenticated` error frame and close code 1008."""
    async with (
        gateway_for(nexus, authenticator=refuse_all) as gateway,
        connect(gateway.url + "?token=nope", subprotocols=NEXUS_V1) as ws,
    ):
        error = json.loads(await ws.recv())
        assert (error["type"], error["code"]) == ("error", "unauthenticated")
        assert "nope" in error["message"]
        client = Peer(ws)
        assert await client.closed_code() == 1008
        assert gateway.stats.auth_refused == 1


async def test_auth_hook_user_id_goes_into_published_events(nexus: TestServer) -> None:
    """The user id the hook returns (token from the query or a subprotocol entry) becomes metadata.user_id."""
    recorder = await nexus.record("demo:>")
    try:
        async with gateway_for(nexus, authenticator=user_from_token) as gateway:
            async with peer(gateway.url + "?token=alice") as client:
                await client.send(type="demo:thing:v1:happened", metadata={"user_id": "mallory"})
                await client.recv()
            async with peer(gateway.url, subprotocols=[*NEXUS_V1, Subprotocol("bob")]) as client:
                assert client.ws.subprotocol == "nexus.v1"
                await client.send(type="demo:echo:v1:requested", payload={})
                await client.until(is_terminal)
            async with connect(gateway.url, subprotocols=NEXUS_V1) as ws:
                assert json.loads(await ws.recv())["code"] == "unauthenticated"
        events = await recorder.wait_for(lambda events: len(events) >= 3)
        users = {e.event_type: e.metadata.get("user_id") for e in events}
        assert users["demo:thing:v1:happened"] == "user-alice"
        assert users["demo:echo:v1:requested"] == "user-bob"
        assert users["demo:echo:v1:success"] == "user-bob"  # lifecycle events inherit the request's metadata
    finally:
        await recorder.stop()


# --- slow clients and resuming ----------------------------------------------------------------------------------


async def test_stalled_client_is_closed_with_4008_while_100_others_receive_every_event(nexus: TestServer) -> None:
    """A client that reads nothing overflows its bounded queue and is closed with 4008; 100 others receive
    every event in order; the stalled one then reads what it was sent, the close, and resumes without loss."""
    total = 300
    payload = {"blob": "x" * 2048}
    limits: dict[str, Any] = {
        "queue_frames": 100,
        "queue_bytes": 128 * 1024,
        "write_limit": 16 * 1024,
        "send_buffer_bytes": 16 * 1024,
        "subscriber_queue": 100,
    }
    async with gateway_for(nexus, **limits) as gateway:
        # The stalled client: a tiny receive buffer and a one-frame queue, so it pushes back at once.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gateway.port))
        async with connect(
            gateway.url, sock=sock, subprotocols=NEXUS_V1, max_queue=1, ping_interval=None
        ) as stalled_ws:
            stalled = Peer(stalled_ws)
            assert (await stalled.recv())["type"] == "connection"
            assert (await stalled.subscribe("load:>"))["type"] == "subscribed"

            others: list[Peer] = []
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(100):
                    client = await stack.enter_async_context(peer(gateway.url, ping_interval=None))
                    await client.subscribe("load:>")
                    others.append(client)

                # The others read as fast as they can; the publisher keeps within a window of what they
                # have read (they share this process and its event loop), the stalled one reads nothing.
                progress = [0] * len(others)

                async def receive_all(index: int, client: Peer) -> list[int]:
                    offsets: list[int] = []
                    while len(offsets) < total:
                        offsets.append((await client.recv())["offset"])
                        progress[index] = len(offsets)
                    return offsets

                readers = [asyncio.create_task(receive_all(i, c)) for i, c in enumerate(others)]
                sent: list[int] = []
                for n in range(total):
                    stored = await nexus.bus.publish(Event("load:tick:v1:happened", dict(payload, n=n)))
                    sent.append(stored.event.offset)
                    if n % 25 == 24:
                        await wait_until(lambda: min(progress) >= len(sent) - 25)
                results = await asyncio.gather(*readers)
                assert all(offsets == sent for offsets in results)
                await wait_until(lambda: gateway.stats.too_slow == 1)

            # The stalled client reads what reached it, then the close frame 4008 naming its resume offset.
            received: list[int] = []
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(GUARD):
                    while True:
                        frame = json.loads(await stalled_ws.recv())
                        received.append(frame["offset"])
            assert stalled_ws.close_code == 4008
            assert received == sent[: len(received)]
            assert len(received) < total
            assert stalled_ws.close_reason == f"too slow: resume from offset {received[-1] if received else 0}"

        # It resumes from the last offset it received: every missed event, once, in order.
        async with peer(gateway.url) as resumed:
            last = received[-1] if received else 0
            answer = await resumed.subscribe("load:>", since_offset=last, epoch=nexus.bus.epoch)
            assert answer["recovered"] is True
            rest = [(await resumed.recv())["offset"] for _ in range(total - len(received))]
            assert received + rest == sent
            assert await resumed.barrier() == []


@pytest.mark.parametrize("write_limit", [64 * 1024, 256], ids=["one-write-per-batch", "tiny-write-buffer"])
async def test_a_burst_queued_between_wake_ups_arrives_complete_and_in_order(
    nexus: TestServer, write_limit: int
) -> None:
    """Thousands of events stored at once (one batch per wake-up of the connection, written together, or
    through the outbox a frame at a time when the write buffer is tiny) reach the client complete and in order,
    control frames after them, and a second client gets the same."""
    total = 3_000
    async with (
        gateway_for(nexus, write_limit=write_limit) as gateway,
        peer(gateway.url) as first,
        peer(gateway.url) as second,
    ):
        for client in (first, second):
            assert (await client.subscribe("burst:>"))["type"] == "subscribed"
        events = [Event("burst:tick:v1:happened", {"n": n, "text": f'é{n}\n"🚀' * (n % 7)}) for n in range(total)]
        stored = await nexus.server.node.publish_many(events)
        for client in (first, second):
            frames = [await client.recv() for _ in range(total)]
            assert [f["offset"] for f in frames] == [p.event.offset for p in stored]
            assert [f["payload"] for f in frames] == [e.payload for e in events]
            assert await client.barrier() == []


async def test_resume_after_reconnect_without_loss_or_duplicates(nexus: TestServer) -> None:
    """A client that reconnects with its last offset and epoch gets every event it missed once, then live."""
    async with peer(nexus.ws_url) as client:
        await client.subscribe("demo:>")
        first = [await nexus.client.emit("demo:tick:v1:happened", {"n": n}) for n in range(3)]
        seen = [(await client.recv())["offset"] for _ in first]
        epoch = nexus.bus.epoch
    missed = [await nexus.client.emit("demo:tick:v1:happened", {"n": n}) for n in range(3, 8)]
    async with peer(nexus.ws_url) as client:
        answer = await client.subscribe("demo:>", since_offset=seen[-1], epoch=epoch)
        assert answer["recovered"] is True
        replayed = [(await client.recv())["offset"] for _ in missed]
        live = await nexus.client.emit("demo:tick:v1:happened", {"n": 99})
        assert (await client.recv())["offset"] == live.offset
        assert seen + replayed == [e.offset for e in first + missed]
        assert await client.barrier() == []


async def test_resume_after_a_request_was_sent_first(nexus: TestServer) -> None:
    """A connection that sent a request before subscribing with an offset still gets the replay, and its
    request's lifecycle once."""
    await nexus.client.emit("demo:tick:v1:happened", {"older": True})
    before = await nexus.client.emit("demo:tick:v1:happened")
    async with peer(nexus.ws_url) as client:
        await client.send(type="demo:echo:v1:requested", payload={"x": 1}, event_id="first")
        frames = await client.until(is_terminal)
        assert states(frames[1:]) == ["success"]
        answer = await client.subscribe("demo:>", since_offset=before.offset - 1, epoch=nexus.bus.epoch)
        assert answer["recovered"] is True
        replayed = await client.barrier()
        assert [f["type"] for f in replayed] == [
            "demo:tick:v1:happened",
            "demo:echo:v1:requested",
            "demo:echo:v1:success",
        ]


# --- shutdown ---------------------------------------------------------------------------------------------------


async def test_shutdown_cancels_streams_then_closes_sockets_with_1001(handlers: Handlers) -> None:
    """Stopping the server ends live streams with `cancelled`, delivers that to the socket, then closes 1001."""
    async with run_server(handlers.hold, gateway=True) as server, peer(server.ws_url) as client:
        await client.send(type="demo:stream_hold:v1:requested", event_id="shut-1")
        await client.until(lambda f: f["type"].endswith(":stream"))
        stopping = asyncio.create_task(server.server.stop(grace=2.0))
        frames = await client.until(is_terminal)
        assert frames[-1]["payload"]["reason"] == "server_shutdown"
        assert await client.closed_code() == 1001
        await stopping
    assert gateway_tasks() == []


# --- the page and HTTP ------------------------------------------------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 GET: status, headers (lower-cased names) and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(GUARD):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


async def test_the_page_and_static_files_are_served_with_their_content_types(nexus: TestServer) -> None:
    """`/` is the page (text/html), its assets carry proper types, and unknown paths are 404."""
    port = nexus.server.ws_port
    status, headers, body = await http_get(port, "/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert b"nexus-client.js" in body
    assert "default-src 'self'" in headers["content-security-policy"]
    for path, content_type in [
        ("/static/nexus-client.js", "text/javascript; charset=utf-8"),
        ("/static/app.js", "text/javascript; charset=utf-8"),
        ("/static/style.css", "text/css; charset=utf-8"),
        ("/static/favicon.svg", "image/svg+xml"),
    ]:
        status, headers, body = await http_get(port, path)
        assert (status, headers["content-type"]) == (200, content_type), path
        assert int(headers["content-length"]) == len(body) > 0
    assert (await http_get(port, "/static/../server.py"))[0] == 404
    assert (await http_get(port, "/nowhere"))[0] == 404


async def test_health_and_listings(nexus: TestServer, handlers: Handlers) -> None:
    """/healthz says ok; /api/handlers and /api/streams list what the server drives."""
    port = nexus.server.ws_port
    status, _, body = await http_get(port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, headers, body = await http_get(port, "/api/handlers")
    assert headers["content-type"] == "application/json"
    assert {h["event_type"] for h in json.loads(body)} == {"demo:stream_countdown", "demo:stream_hold", "demo:echo"}
    async with peer(nexus.ws_url) as client:
        await client.send(type="demo:stream_hold:v1:requested", event_id="listed")
        await client.until(lambda f: f["type"].endswith(":stream"))
        _, _, body = await http_get(port, "/api/streams")
        assert [s["correlation_id"] for s in json.loads(body)] == ["listed"]


async def test_listings_go_through_the_authentication_hook(nexus: TestServer) -> None:
    """/api/* and /asyncapi.json answer 401 when the hook refuses, and serve a token it accepts."""
    async with gateway_for(nexus, authenticator=user_from_token) as gateway:
        for path in ("/api/handlers", "/api/head", "/asyncapi.json"):
            assert (await http_get(gateway.port, path))[0] == 401, path
            assert (await http_get(gateway.port, f"{path}?token=alice"))[0] == 200, path
        assert (await http_get(gateway.port, "/"))[0] == 200  # the page itself is public: it holds no data


class Greet(EventHandler):
    """Greets whoever is named."""

    event_type = "demo:greet"
    takes = EventSpec(
        "demo:greet:v1:requested",
        "Whom to greet.",
        {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        example={"name": "Ada"},
    )

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"text": f"hello {event.payload['name']}"}


async def test_the_page_reads_request_examples_the_head_and_the_event_catalogue() -> None:
    """/api/handlers gives each handler that declares its request the request's type and example; /api/head says
    where the history stands; /asyncapi.json is the AsyncAPI document of this gateway's handlers, for the host
    the request named."""
    async with run_server(Greet(), Echo(), gateway=True) as nexus:
        port = nexus.server.ws_port
        status, headers, body = await http_get(port, "/api/handlers")
        listed = {h["event_type"]: h for h in json.loads(body)}
        assert listed["demo:greet"]["takes"] == {"event_type": "demo:greet:v1:requested", "example": {"name": "Ada"}}
        assert "takes" not in listed["demo:echo"]

        assert json.loads((await http_get(port, "/api/head"))[2]) == {"epoch": nexus.bus.epoch, "head_offset": 0}
        stored = [await nexus.client.emit("demo:tick:v1:happened", {"n": n}) for n in range(3)]
        assert json.loads((await http_get(port, "/api/head"))[2])["head_offset"] == stored[-1].offset

        status, headers, body = await http_get(port, "/asyncapi.json")
        assert (status, headers["content-type"]) == (200, "application/json")
        document = json.loads(body)
        assert document == asyncapi_document([Greet, Echo], host=f"127.0.0.1:{port}")
        assert "demo.greet.v1.requested" in document["components"]["messages"]


async def test_a_handler_served_by_workers_is_listed_as_remote_without_an_example() -> None:
    """A handler that only remote workers serve is listed by /api/handlers with its location and worker count
    and no example (workers declare no schema), and the AsyncAPI document describes the in-process ones."""
    async with (
        run_server(Greet(), gateway=True) as nexus,
        RawWorker(nexus.address, worker_handler("demo:echo", streaming=False), name="w-a"),
    ):
        port = nexus.server.ws_port
        listed = {h["event_type"]: h for h in json.loads((await http_get(port, "/api/handlers"))[2])}
        assert (listed["demo:echo"]["location"], listed["demo:echo"]["workers"]) == ("remote", 1)
        assert "takes" not in listed["demo:echo"]
        assert (listed["demo:greet"]["location"], "takes" in listed["demo:greet"]) == ("in-process", True)
        document = json.loads((await http_get(port, "/asyncapi.json"))[2])
        assert document == asyncapi_document([Greet], host=f"127.0.0.1:{port}")


# --- the gateway apart from the core ------------------------------------------------------------------------------


async def test_remote_gateway_relays_a_server_over_grpc(nexus: TestServer, handlers: Handlers) -> None:
    """`nexus gateway` against a server over gRPC: resume into history from before it started, requests with
    their lifecycle, cancel, and the streams of a closed socket cancelled."""
    before = [await nexus.client.emit("demo:tick:v1:happened", {"n": n}) for n in range(3)]
    node = RemoteNode(nexus.address, history_size=100)
    await node.start()
    try:
        assert node.epoch == nexus.bus.epoch
        async with gateway_for(nexus, node=node) as gateway:
            async with peer(gateway.url) as client:
                answer = await client.subscribe("demo:tick:>", since_offset=before[0].offset, epoch=nexus.bus.epoch)
                assert answer["recovered"] is True
                assert [(await client.recv())["offset"] for _ in range(2)] == [e.offset for e in before[1:]]
                live = await nexus.client.emit("demo:tick:v1:happened", {"live": True})
                assert (await client.recv())["offset"] == live.offset

                await client.send(type="demo:stream_countdown:v1:requested", payload={"n": 3}, event_id="remote-1")
                frames = await client.until(is_terminal)
                assert frames[0]["type"] == "published"
                assert frames[0]["event_id"] == "remote-1"
                assert states(frames[1:]) == ["started", "stream", "stream", "stream", "success"]

                await client.send(type="demo:stream_hold:v1:requested", event_id="remote-hold")
                await client.until(lambda f: f["type"].endswith(":stream"))
                await client.send(type="cancel", correlation_id="remote-hold", reason="stop")
                cancelled = (await client.until(is_terminal))[-1]
                assert cancelled["payload"]["reason"] == "stop"
                assert await client.barrier() == []

            recorder = await nexus.record("demo:stream_hold:v1:cancelled")
            try:
                async with peer(gateway.url) as client:
                    await client.send(type="demo:stream_hold:v1:requested", event_id="remote-leave")
                    await client.until(lambda f: f["type"].endswith(":stream"))
                events = await recorder.wait_for(lambda evs: any(e.correlation_id == "remote-leave" for e in evs))
                assert [e.payload["reason"] for e in events if e.correlation_id == "remote-leave"] == [
                    "requester disconnected"
                ]
            finally:
                await recorder.stop()
            await wait_until(lambda: not gateway.connections)
    finally:
        await node.close()
    assert gateway_tasks() == []


async def test_remote_gateway_closes_with_1012_when_the_upstream_history_is_lost(handlers: Handlers) -> None:
    """When the upstream restarts (a new epoch), the relay cannot resume: its connections close with 1012 and a
    client that resumes is told recovered: false."""
    async with run_server(handlers.echo) as first:
        port = first.server.grpc_port
        node = RemoteNode(first.address, max_retry_delay=0.2)
        await node.start()
        old_epoch = node.epoch
    try:
        async with gateway_for(first, node=node) as gateway, peer(gateway.url) as client:
            await client.subscribe(">")
            async with run_server(handlers.echo, grpc_port=port) as second:
                assert await client.closed_code() == 1012
                await wait_until(lambda: node.epoch == second.bus.epoch)
                async with peer(gateway.url) as again:
                    answer = await again.subscribe(">", since_offset=1, epoch=old_epoch)
                    assert answer["recovered"] is False
                    event = await second.client.emit("demo:tick:v1:happened")
                    assert (await again.recv())["offset"] == event.offset
    finally:
        await node.close()


async def test_nexus_gateway_command_serves_a_remote_nexus(nexus: TestServer) -> None:
    """`nexus gateway --nexus HOST:PORT` starts a standalone gateway that relays the server."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nexus.cli",
        "gateway",
        "--nexus",
        nexus.address,
        "--ws-port",
        "0",
        "--log-format",
        "json",
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NEXUS_CONFIG": ""},
    )
    try:
        assert process.stderr is not None
        url = ""
        async with asyncio.timeout(GUARD):
            while not url:
                line = await process.stderr.readline()
                assert line, "the gateway exited before it started"
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == "gateway_started":
                        url = record["url"]
        async with peer(url) as client:
            await client.send(type="demo:echo:v1:requested", payload={"via": "cli"})
            frames = await client.until(is_terminal)
            assert frames[-1]["payload"] == {"echo": {"via": "cli"}}
    finally:
        process.terminate()
        async with asyncio.timeout(GUARD):
            assert await process.wait() == 0


def test_serve_flags_reach_the_settings() -> None:
    """`nexus serve --ws-port N --no-gateway --ws-max-frame-bytes B` set the gateway's settings."""
    from nexus.cli import SERVE_FIELDS, _overrides, build_parser
    from nexus.config import load_settings

    args = build_parser().parse_args(["serve", "--ws-port", "9001", "--no-gateway", "--ws-max-frame-bytes", "2048"])
    settings = load_settings(None, {}, _overrides(args, SERVE_FIELDS))
    assert (settings.ws_port, settings.gateway, settings.ws_max_frame_bytes) == (9001, False, 2048)
    defaults = load_settings(None, {}, _overrides(build_parser().parse_args(["serve"]), SERVE_FIELDS))
    assert (defaults.ws_port, defaults.gateway, defaults.ws_max_frame_bytes) == (8080, True, 1024 * 1024)


async def test_run_server_leaves_the_gateway_off_by_default(handlers: Handlers) -> None:
    """nexus.testing.run_server starts no gateway unless asked to."""
    async with run_server(handlers.echo) as server:
        assert server.server.gateway is None
        with pytest.raises(RuntimeError, match="gateway=True"):
            _ = server.ws_url


def recorder_types(recorder: Recorder) -> list[str]:
    """The event types a recorder holds."""
    return [e.event_type for e in recorder.events]


# --- limits of one connection -------------------------------------------------------------------------------------


async def test_a_connection_publishing_over_its_rate_gets_rate_limited_frames(nexus: TestServer) -> None:
    """Past its burst, a connection's publishes get `rate_limited` error frames; it stays open, and another
    connection publishes as usual."""
    limits = ClientLimits(publish_rate_per_s=0.5, publish_burst=3)
    async with gateway_for(nexus, client_limits=limits) as gateway, peer(gateway.url) as client:
        for n in range(5):
            await client.send(type="demo:tick:v1:happened", payload={"n": n}, event_id=f"rate-{n}")
        frames = [await client.recv() for _ in range(5)]
        assert [f["type"] for f in frames] == ["published"] * 3 + ["error"] * 2
        assert {f["code"] for f in frames[3:]} == {"rate_limited"}
        assert [f["ref"] for f in frames[3:]] == ["rate-3", "rate-4"]
        await client.send(type="ping")
        assert (await client.recv())["type"] == "pong"
        async with peer(gateway.url) as other:
            await other.send(type="demo:tick:v1:happened", payload={})
            assert (await other.recv())["type"] == "published"


async def test_a_connection_follows_a_bounded_number_of_patterns(nexus: TestServer) -> None:
    """One subscribe frame carries at most 256 patterns, a connection follows at most its limit in all; a refused
    frame leaves the connection and its patterns as they were."""
    limits = ClientLimits(max_patterns=300)
    async with gateway_for(nexus, client_limits=limits) as gateway, peer(gateway.url) as client:
        await client.send(type="subscribe", event_types=[f"demo:p{n}:*:*" for n in range(257)], ref="too-many")
        error = await client.recv()
        assert (error["type"], error["code"], error["ref"]) == ("error", "resource_exhausted", "too-many")
        assert "over the limit of 256" in error["message"]
        answer = await client.subscribe(*[f"demo:p{n}:*:*" for n in range(200)])
        assert answer["type"] == "subscribed"
        await client.send(type="subscribe", event_types=[f"demo:q{n}:*:*" for n in range(101)], ref="over")
        error = await client.recv()
        assert (error["code"], error["ref"]) == ("resource_exhausted", "over")
        assert "301 patterns on this connection, over the limit of 300" in error["message"]
        await client.subscribe(*[f"demo:p{n}:*:*" for n in range(200)], "demo:tick:*:*")  # repeats are free
        event = await nexus.client.emit("demo:tick:v1:happened")
        assert (await client.recv())["offset"] == event.offset


async def test_a_connection_runs_a_bounded_number_of_requests(nexus: TestServer, handlers: Handlers) -> None:
    """Past its limit of running requests a connection's next request is refused; when one ends, it may send again."""
    limits = ClientLimits(max_requests=2)
    async with gateway_for(nexus, client_limits=limits) as gateway, peer(gateway.url) as client:
        for n in range(2):
            await client.send(type="demo:stream_hold:v1:requested", event_id=f"run-{n}")
            await client.until(lambda f: f["type"] == "published")
        await client.send(type="demo:echo:v1:requested", event_id="third")
        error = await client.until(lambda f: f["type"] == "error")
        assert (error[-1]["code"], error[-1]["ref"]) == ("resource_exhausted", "third")
        await client.send(type="cancel", correlation_id="run-0")
        await client.until(lambda f: f["type"].endswith(":cancelled"))
        await client.send(type="demo:echo:v1:requested", event_id="fourth")
        done = await client.until(lambda f: f["type"] == "demo:echo:v1:success")
        assert done[-1]["metadata"]["correlation_id"] == "fourth"
