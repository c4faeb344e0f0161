"""Publishers in a tight loop leave subscribers their turns: every subscriber that reads keeps up, one that stops
reading is still cut off as too slow, and the others are unaffected."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from nexus import Event, EventHandler
from nexus.bus.memory import MemoryBus
from nexus.errors import SlowConsumer
from nexus.testing import TestServer, run_server
from nexus.v1 import nexus_pb2, nexus_pb2_grpc

pytestmark = pytest.mark.timing

TOTAL = 20_000
QUEUE = 2_000
"""The servers' subscriber queue in the handler-burst tests; their bursts are 2.5 times as long, so without fair
turns every subscriber's queue would overflow, while a reader that writes one frame per event needs well under
the publishers' wait budget to keep up, even on a loaded machine."""
BURST = 5_000
GUARD = 120.0
"""Seconds a whole burst may take to arrive (a guard against hangs on a loaded machine, not a measurement)."""
ITEMS = "burst:item:>"
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
"""A tiny receive window: a client that does not read pushes back at once."""


class Burst(EventHandler):
    """Publishes ``n`` events in a loop, awaiting nothing but its own publishes."""

    event_type = "burst:run"

    async def handle(self, event: Event) -> dict[str, Any]:
        count = int(event.payload["n"])
        for i in range(count):
            await self.ctx.publish("burst:item:v1:made", {"i": i, "pad": "x" * 150})
        return {"published": count}


@contextlib.asynccontextmanager
async def stub_for(address: str, options: list[tuple[str, int]] | None = None) -> AsyncIterator[Any]:
    channel = grpc.aio.insecure_channel(address, options=options or [])
    try:
        yield nexus_pb2_grpc.NexusServiceStub(channel)
    finally:
        await channel.close()


async def read_offsets(call: Any, count: int) -> list[int]:
    """The offsets of the first ``count`` events of a SubscribeEvents or SubscribeEventBatches call."""
    offsets: list[int] = []
    async with asyncio.timeout(GUARD):
        while len(offsets) < count:
            message = await call.read()
            assert message is not grpc.aio.EOF, f"the stream ended after {len(offsets)} events"
            if isinstance(message, nexus_pb2.EventResponse):
                offsets.append(message.offset)
            else:
                offsets.extend(item.offset for item in message.events)
    return offsets


async def read_to_the_end(call: Any) -> None:
    async with asyncio.timeout(GUARD):
        while await call.read() is not grpc.aio.EOF:
            pass


async def open_subscribers(stub: Any) -> tuple[Any, Any]:
    """A batched and a one-event-per-frame subscriber of the burst's items, both live."""
    batched = stub.SubscribeEventBatches(nexus_pb2.SubscribeEventBatchesRequest(event_types=[ITEMS]))
    single = stub.SubscribeEvents(nexus_pb2.SubscribeRequest(event_types=[ITEMS]))
    async with asyncio.timeout(10):
        await batched.initial_metadata()
        await single.initial_metadata()
    return batched, single


async def read_websocket(nexus: TestServer, count: int, subscribed: asyncio.Event) -> list[int]:
    """Subscribe over the gateway and return the offsets of the first ``count`` events it sends."""
    offsets: list[int] = []
    async with connect(nexus.ws_url, subprotocols=[Subprotocol("nexus.v1")], max_size=None) as ws:
        await ws.recv()  # connection
        await ws.send(json.dumps({"type": "subscribe", "event_types": [ITEMS]}))
        async with asyncio.timeout(GUARD):
            while len(offsets) < count:
                frame = json.loads(await ws.recv())
                if frame["type"] == "subscribed":
                    subscribed.set()
                elif frame["type"] == "burst:item:v1:made":
                    offsets.append(frame["offset"])
                else:
                    pytest.fail(f"unexpected frame {frame}")
    return offsets


async def test_a_handler_publishing_in_a_tight_loop_reaches_every_subscriber() -> None:
    """A handler publishing a burst 2.5 times the subscriber queue in a loop: batched, per-event and WebSocket
    subscribers get all of it, in order."""
    async with run_server(Burst(), gateway=True, subscriber_queue=QUEUE) as nexus, stub_for(nexus.address) as stub:
        batched, single = await open_subscribers(stub)
        subscribed = asyncio.Event()
        websocket = asyncio.create_task(read_websocket(nexus, BURST, subscribed))
        async with asyncio.timeout(10):
            await subscribed.wait()
        readers = [asyncio.create_task(read_offsets(call, BURST)) for call in (batched, single)]

        async with asyncio.timeout(GUARD):
            done = await nexus.client.call("burst:run:v1:requested", {"n": BURST})
        assert done.payload == {"published": BURST}

        first = done.offset - BURST - 1  # the burst's items come right before its success event
        expected = list(range(first + 1, first + BURST + 1))
        assert await readers[0] == expected
        assert await readers[1] == expected
        assert await websocket == expected
        assert nexus.bus.stats().slow_consumers == 0


async def test_a_publish_events_stream_reaches_every_subscriber() -> None:
    """A PublishEvents stream of 20,000 events: a batched and a per-event subscriber get all of them, in order."""
    async with run_server() as nexus, stub_for(nexus.address) as stub:
        batched, single = await open_subscribers(stub)
        readers = [asyncio.create_task(read_offsets(call, TOTAL)) for call in (batched, single)]
        events = [Event(event_type="burst:item:v1:made", payload={"i": i, "pad": "x" * 150}) for i in range(TOTAL)]

        summary = await nexus.client.publish_many(events, timeout=GUARD)

        assert summary.stored == TOTAL
        expected = list(range(1, TOTAL + 1))
        assert await readers[0] == expected
        assert await readers[1] == expected
        assert nexus.bus.stats().slow_consumers == 0


async def test_a_subscriber_that_stops_reading_is_still_cut_off_and_the_others_get_everything() -> None:
    """Under a tight-loop publisher, a subscriber that never reads ends RESOURCE_EXHAUSTED; the readers get all."""
    async with (
        run_server(Burst(), subscriber_queue=QUEUE) as nexus,
        stub_for(nexus.address, SMALL_WINDOW) as stalled_stub,
        stub_for(nexus.address) as stub,
    ):
        stalled = stalled_stub.SubscribeEvents(nexus_pb2.SubscribeRequest(event_types=[ITEMS]))
        async with asyncio.timeout(10):
            await stalled.initial_metadata()
        batched, single = await open_subscribers(stub)
        readers = [asyncio.create_task(read_offsets(call, BURST)) for call in (batched, single)]

        async with asyncio.timeout(GUARD):
            done = await nexus.client.call("burst:run:v1:requested", {"n": BURST})

        expected = list(range(2, BURST + 2))  # after the request (offset 1), before its success
        assert done.offset == BURST + 2
        assert await readers[0] == expected
        assert await readers[1] == expected
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_to_the_end(stalled)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "resume from offset" in (caught.value.details() or "")
        assert nexus.bus.stats().slow_consumers == 1


# --- the bus alone ---------------------------------------------------------------------------------------------


async def test_a_subscriber_taking_one_event_per_turn_keeps_up_with_a_tight_publisher() -> None:
    """A reader that needs a turn of the loop per event still receives every event of a 20,000-event loop."""
    bus = MemoryBus()
    await bus.start()
    sub = await bus.subscribe([">"], max_pending=1_000)
    received: list[int] = []

    async def read() -> None:
        while len(received) < TOTAL:
            for event in await sub.next_batch():
                received.append(event.offset)
                await asyncio.sleep(0)  # one write per turn, as a per-event gRPC stream

    reader = asyncio.create_task(read())
    for i in range(TOTAL):
        await bus.publish(Event(event_type="burst:item:v1:made", payload={"i": i}))
    async with asyncio.timeout(GUARD):
        await reader
    assert received == list(range(1, TOTAL + 1))
    await bus.close()


async def test_a_subscriber_that_never_reads_is_cut_off_under_a_tight_publisher() -> None:
    """A subscription nobody reads is ended as too slow; the publisher is not held up for good."""
    bus = MemoryBus()
    await bus.start()
    stuck = await bus.subscribe([">"], max_pending=1_000)
    async with asyncio.timeout(GUARD):
        for i in range(TOTAL):
            await bus.publish(Event(event_type="burst:item:v1:made", payload={"i": i}))
    assert stuck.closed
    with pytest.raises(SlowConsumer):
        await stuck.next_batch()
    assert bus.stats().slow_consumers == 1
    await bus.close()


async def test_a_subscriber_reading_slowly_on_purpose_holds_publishers_up_only_for_its_wait_budget() -> None:
    """A client that keeps taking events, but far slower than the publisher, is waited for only while it has
    wait budget: once spent, the publisher goes on at its own pace (the subscriber is cut off when it overflows)."""
    from nexus.bus.turns import PublishTurns

    bus = MemoryBus()
    await bus.start()
    bus._turns = PublishTurns(bus._fanout, burst_s=0.1, share=0.05)  # a small budget, so the test is quick
    sub = await bus.subscribe(["slow:>"], max_pending=100_000)

    async def crawl() -> None:
        while not sub.closed:
            if not await sub.next_batch(1):
                return
            await asyncio.sleep(0.002)  # always making progress, far slower than the publisher

    reader = asyncio.create_task(crawl())
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(6_400):  # 100 turns: without a budget, 50 ms of waiting each (5 s)
        await bus.publish(Event("slow:item:v1:made", {"i": i}))
    elapsed = loop.time() - started
    reader.cancel()
    await bus.close()
    assert elapsed < 2.5, f"the publisher waited {elapsed:.2f} s for a subscriber that reads slowly on purpose"
