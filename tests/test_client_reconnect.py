"""Reconnection of the SDK's subscription and of the remote node against servers that are down, refuse a call, or
come back; a server whose start fails."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats_support import delete_stream, free_port, nats_settings, shared_nats_url, unique_names

from nexus import Event, EventHandler, HandlerContext
from nexus.backoff import BackoffPolicy
from nexus.client import NexusClient, Subscription
from nexus.config import Settings
from nexus.errors import ConfigurationError, InvalidArgument, InvalidPattern
from nexus.node_remote import RemoteNode
from nexus.server import NexusServer
from nexus.testing import run_server

GUARD = 20.0


async def wait_until(condition: Any, what: str) -> None:
    for _ in range(int(GUARD / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


async def drain(subscription: Subscription) -> None:
    async with asyncio.timeout(GUARD):
        async for _ in subscription:
            pass


async def test_subscription_to_a_closed_port_backs_off_then_connects_and_starts_over() -> None:
    """Against a closed port the failure count grows and nothing says connected; once the server is up the
    subscription connects, delivers, and its next failure waits the initial delay again."""
    port = free_port()
    connected: list[Subscription] = []
    policy = BackoffPolicy(initial_delay=0.02, max_delay=0.16, jitter=0.0)
    received: list[Event] = []
    async with NexusClient(f"127.0.0.1:{port}", backoff=policy) as client:
        subscription = client.subscribe("demo:>", on_connect=connected.append)

        async def consume() -> None:
            async for event in subscription:
                received.append(event)

        task = asyncio.create_task(consume())
        try:
            await wait_until(lambda: subscription.backoff.failures >= 5, "five failed attempts")
            assert connected == []
            assert subscription.connects == 0
            assert subscription.attempts == subscription.backoff.failures
            async with run_server(grpc_port=port) as nexus:
                await wait_until(lambda: subscription.connects == 1, "the subscription to connect")
                assert connected == [subscription]
                assert subscription.epoch == nexus.bus.epoch
                assert subscription.backoff.failures >= 5  # connecting alone does not start over
                await nexus.client.emit("demo:tick:v1:happened", {"n": 1})
                await wait_until(lambda: len(received) == 1, "the event")
                assert subscription.backoff.failures == 0
            await wait_until(lambda: subscription.backoff.failures >= 1, "the server's end to be noticed")
            assert subscription.backoff.failures == 1
        finally:
            subscription.close()
            await asyncio.wait_for(task, GUARD)


@pytest.mark.parametrize("pattern", ["demo:BAD:>", "a:b:v1:>:x"])
async def test_a_bad_pattern_ends_the_subscription_without_retrying(pattern: str) -> None:
    """INVALID_ARGUMENT cannot get better by retrying: the iteration raises after one attempt."""
    async with run_server() as nexus:
        subscription = nexus.client.subscribe(pattern)
        with pytest.raises((InvalidPattern, InvalidArgument)):
            await drain(subscription)
        assert subscription.attempts == 1


class Tracked(EventHandler):
    """Notes its setup and teardown."""

    event_type = "tracked:work"
    calls: list[str]

    def __init__(self) -> None:
        self.calls = []

    async def setup(self, ctx: HandlerContext) -> None:
        self.calls.append("setup")

    async def teardown(self) -> None:
        self.calls.append("teardown")

    async def handle(self, event: Event) -> dict[str, Any]:
        return {}


async def test_a_start_that_cannot_bind_stops_what_it_started() -> None:
    """A gRPC address the server cannot bind raises ConfigurationError naming the option, after the handlers it
    had set up were torn down; stop() afterwards returns at once."""
    handler = Tracked()
    server = NexusServer(
        Settings(host="192.0.2.1", grpc_port=0, gateway=False, load_entry_points=False, allow_anonymous=True),
        handlers=[handler],
    )
    with pytest.raises(ConfigurationError, match="--grpc-port"):
        await server.start()
    assert handler.calls == ["setup", "teardown"]
    await asyncio.wait_for(server.stop(), 1.0)


async def test_a_port_in_use_is_refused_before_the_node_starts() -> None:
    """A second server on a used gRPC port raises ConfigurationError naming it, and never sets up its handlers."""
    async with run_server() as first:
        handler = Tracked()
        second = NexusServer(
            Settings(host="127.0.0.1", grpc_port=first.server.grpc_port, gateway=False, load_entry_points=False),
            handlers=[handler],
        )
        with pytest.raises(ConfigurationError, match=f":{first.server.grpc_port} is already in use"):
            await second.start()
        assert handler.calls == []
        stored = await first.client.emit("demo:still:v1:here")
        assert stored.offset == 1


async def test_a_remote_node_keeps_its_history_and_backs_off_while_the_core_is_down() -> None:
    """A remote node (``nexus gateway``) whose core goes away keeps its epoch and history (no reset closing every
    client) and retries with growing waits instead of a hot loop."""
    async with run_server() as nexus:
        await nexus.client.emit("demo:before:v1:outage")
        node = RemoteNode(nexus.address)
        await node.start()
        epoch = node.epoch
        assert node.history.head == 1
    try:
        await wait_until(lambda: node.backoff.failures >= 3, "three failed reconnections")
        attempts = node.backoff.attempts
        await asyncio.sleep(1.0)
        # Waits of 0.05 s doubling: about 4 more attempts in a second; a hot loop makes dozens.
        assert node.backoff.attempts - attempts <= 5
        assert node.resets == 0
        assert node.epoch == epoch
        assert node.history.head == 1
    finally:
        await node.close()


async def test_a_live_subscription_cut_off_before_any_event_gets_what_was_stored_meanwhile() -> None:
    """An SDK subscription started live whose server goes away before it delivered anything resumes, once a server
    is back, after the head it went live at: every event stored while it was cut off arrives, and none from
    before it started. (Reconnecting live again would lose them silently.)"""
    url = shared_nats_url()
    stream, prefix = unique_names("resume")
    settings = nats_settings(url, stream, prefix)
    port = free_port()
    policy = BackoffPolicy(initial_delay=0.02, max_delay=0.2, jitter=0.0)
    received: list[Event] = []
    try:
        async with NexusClient(f"127.0.0.1:{port}", backoff=policy) as client:
            subscription = client.subscribe("demo:>")

            async def consume() -> None:
                async for event in subscription:
                    received.append(event)

            task: asyncio.Task[None] | None = None
            try:
                async with run_server(settings=settings, grpc_port=port) as first:
                    before = await first.client.emit("demo:before:v1:happened", {"n": 0})
                    task = asyncio.create_task(consume())
                    await wait_until(lambda: subscription.connects == 1, "the subscription to go live")
                    assert (subscription.last_offset, subscription.recovered) == (before.offset, None)
                # The server is gone; another node stores three events on the same stream meanwhile.
                async with run_server(settings=settings) as other:
                    stored = [await other.client.emit("demo:during:v1:happened", {"n": n}) for n in (1, 2, 3)]
                assert received == []
                async with run_server(settings=settings, grpc_port=port):
                    await wait_until(lambda: len(received) == 3, "the events stored while it was cut off")
                    assert [(e.offset, e.payload) for e in received] == [(e.offset, e.payload) for e in stored]
                    assert subscription.connects == 2
                    assert subscription.recovered is True
            finally:
                subscription.close()
                if task is not None:
                    await asyncio.wait_for(task, GUARD)
    finally:
        await delete_stream(url, stream)


async def test_offset_0_with_an_epoch_subscribes_to_everything_of_that_epoch() -> None:
    """``subscribe(since_offset=0, epoch=E)`` replays every stored event of epoch E, then goes on live."""
    async with run_server() as nexus:
        stored = [await nexus.client.emit("demo:old:v1:happened", {"n": n}) for n in (1, 2)]
        subscription = nexus.client.subscribe("demo:>", since_offset=0, epoch=nexus.bus.epoch)
        events = aiter(subscription)
        try:
            async with asyncio.timeout(GUARD):
                first = [await anext(events), await anext(events)]
            assert [e.offset for e in first] == [e.offset for e in stored]
            assert subscription.recovered is True
            live = await nexus.client.emit("demo:new:v1:happened", {"n": 3})
            async with asyncio.timeout(GUARD):
                assert (await anext(events)).offset == live.offset
        finally:
            subscription.close()


@contextlib.asynccontextmanager
async def slow_link(target_port: int, delay: float) -> AsyncIterator[int]:
    """A TCP relay on a free port of 127.0.0.1 to ``target_port`` that holds each new connection ``delay`` seconds
    before passing bytes (a far or congested link: the handshake takes that long); yields its port."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(delay)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_a_server_that_takes_a_second_to_answer_the_handshake_is_still_reached() -> None:
    """The SDK's quick reconnection waits do not shorten how long one connection attempt may take: over a link
    where the handshake takes a second, the first call still succeeds."""
    async with run_server() as nexus, slow_link(nexus.server.grpc_port, 1.0) as port:
        async with NexusClient(f"127.0.0.1:{port}") as client:
            stored = await asyncio.wait_for(client.emit("demo:far:v1:happened", {"n": 1}), GUARD)
        assert stored.offset == 1
