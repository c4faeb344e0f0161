"""A PublishEvents stream is stored in order with many events in flight (read ahead while earlier ones are
stored), and a refused event still ends the call naming its index, with every event before it stored."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from nats_support import delete_stream, nats_settings, shared_nats_url, unique_names

from nexus import Event, EventHandler
from nexus.testing import TestServer, run_server
from nexus.v1 import nexus_pb2, nexus_pb2_grpc

GUARD = 120.0


class Items(EventHandler):
    """Serves ``stream:item`` requests: the lifecycle states of that type are the provider's alone (the events
    these tests publish are of ``stream:note``, an action no handler serves)."""

    event_type = "stream:item"

    async def handle(self, event: Event) -> dict[str, int]:
        return {}


@contextlib.asynccontextmanager
async def served(kind: str) -> AsyncIterator[TestServer]:
    if kind == "memory":
        async with run_server(Items()) as nexus:
            yield nexus
        return
    url = shared_nats_url()
    stream, prefix = unique_names("pubstream")
    try:
        async with run_server(Items(), settings=nats_settings(url, stream, prefix)) as nexus:
            yield nexus
    finally:
        await delete_stream(url, stream)


def request(i: int, event_type: str = "stream:note:v1:made") -> nexus_pb2.PublishEventsRequest:
    event = nexus_pb2.EventRequest(event_type=event_type, event_id=f"item-{i}")
    event.payload.update({"i": i})
    return nexus_pb2.PublishEventsRequest(event=event)


async def collect(call: object, count: int) -> list[int]:
    seen: list[int] = []
    async with asyncio.timeout(GUARD):
        while len(seen) < count:
            message = await call.read()  # type: ignore[attr-defined]
            assert message is not grpc.aio.EOF
            seen.extend(int(event.payload["i"]) for event in message.events)
    return seen


@pytest.mark.parametrize("kind", ["memory", "nats"])
async def test_a_publish_stream_is_stored_in_order_and_every_subscriber_sees_it(kind: str) -> None:
    total = 3_000
    async with served(kind) as nexus, grpc.aio.insecure_channel(nexus.address) as channel:
        stub = nexus_pb2_grpc.NexusServiceStub(channel)
        sub = stub.SubscribeEventBatches(nexus_pb2.SubscribeEventBatchesRequest(event_types=["stream:>"]))
        await sub.initial_metadata()
        head = await nexus.bus.head_offset()

        async def requests() -> AsyncIterator[nexus_pb2.PublishEventsRequest]:
            for i in range(total):
                yield request(i)

        reply = await asyncio.wait_for(stub.PublishEvents(requests()), GUARD)
        assert (reply.stored, reply.duplicates, reply.last_offset) == (total, 0, head + total)
        assert await collect(sub, total) == list(range(total))
        sub.cancel()


@pytest.mark.parametrize("kind", ["memory", "nats"])
@pytest.mark.parametrize(
    ("bad", "code", "why"),
    [
        (request(0, "Not:A:Type"), grpc.StatusCode.INVALID_ARGUMENT, "invalid event type"),
        (request(0, "stream:item:v1:success"), grpc.StatusCode.PERMISSION_DENIED, "success"),
        (request(0, "stream:item:v1:sucess"), grpc.StatusCode.INVALID_ARGUMENT, "did you mean 'success'?"),
    ],
    ids=["invalid", "reserved", "not-a-lifecycle-state"],
)
async def test_a_refused_event_ends_the_stream_with_its_index_after_storing_every_event_before_it(
    kind: str, bad: nexus_pb2.PublishEventsRequest, code: grpc.StatusCode, why: str
) -> None:
    """The refusal names the event's index; exactly the events before it are stored, in order (a refusal found
    by the node, like a reserved lifecycle state, comes from inside a chunk being stored)."""
    refused_at = 700
    async with served(kind) as nexus, grpc.aio.insecure_channel(nexus.address) as channel:
        stub = nexus_pb2_grpc.NexusServiceStub(channel)
        head = await nexus.bus.head_offset()

        async def requests() -> AsyncIterator[nexus_pb2.PublishEventsRequest]:
            for i in range(refused_at):
                yield request(i)
            yield bad
            for i in range(refused_at + 1, refused_at + 300):
                yield request(i)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(stub.PublishEvents(requests()), GUARD)
        details = caught.value.details() or ""
        assert caught.value.code() == code, details
        assert details.startswith(f"event {refused_at} (after {refused_at} stored)"), details
        assert why in details
        assert await nexus.bus.head_offset() == head + refused_at
