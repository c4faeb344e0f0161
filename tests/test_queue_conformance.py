"""One conformance suite for every request queue: the memory queue and the NATS queue behave the same.

Each test gets a :class:`Harness` for one history. ``await harness.node()`` is a bus and its request queue on
that history: on memory always the same pair (one process), on NATS a new node on the test's own stream. So
"two nodes share the requests" is the same test for both.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
from nats_support import delete_stream, nats_settings, shared_nats_url, unique_names

from nexus import Event
from nexus.bus import Bus, MemoryBus, Subscription
from nexus.errors import BusUnavailable
from nexus.queue import CancelRequest, ControlMessage, MemoryRequestQueue, RequestQueue, RequestRoute

GUARD = 10.0


@dataclasses.dataclass(frozen=True)
class Node:
    """A bus and the request queue over it."""

    bus: Bus
    queue: RequestQueue


@dataclasses.dataclass
class Harness:
    """The nodes of one test, on one history."""

    kind: str
    url: str = ""
    stream: str = ""
    prefix: str = ""
    nodes: list[Node] = dataclasses.field(default_factory=list)

    async def node(self) -> Node:
        """A started bus and queue on this test's history (memory: always the same pair)."""
        if self.kind == "memory":
            if not self.nodes:
                bus = MemoryBus()
                await bus.start()
                self.nodes.append(Node(bus, MemoryRequestQueue(bus)))
            return self.nodes[0]
        from nexus.bus.nats import NatsBus
        from nexus.queue.nats import NatsRequestQueue

        settings = nats_settings(self.url, self.stream, self.prefix)
        nats_bus = NatsBus(settings.nats_bus_settings())
        await nats_bus.start()
        queue = NatsRequestQueue(nats_bus, node_heartbeat_s=settings.nats_node_heartbeat_s)
        await queue.start()
        node = Node(nats_bus, queue)
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        for node in self.nodes:
            await node.queue.close()
            await node.bus.close()
        if self.kind == "nats":
            await delete_stream(self.url, self.stream)


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """A harness for the queue named by the parameter; NATS tests get their own stream and subject prefix."""
    kind = str(request.param)
    if kind == "nats":
        stream, prefix = unique_names("queue")
        instance = Harness(kind, url=shared_nats_url(), stream=stream, prefix=prefix)
    else:
        instance = Harness(kind)
    try:
        yield instance
    finally:
        await instance.close()


def _event(event_type: str, **payload: int) -> Event:
    return Event.create(event_type, payload)


async def _gather(consumers: list[Subscription], count: int) -> list[list[Event]]:
    """Take from every consumer until ``count`` requests arrived in all, then whatever else comes shortly."""
    got: list[list[Event]] = [[] for _ in consumers]
    with anyio.fail_after(GUARD):
        while sum(map(len, got)) < count:
            await asyncio.sleep(0.01)
            for index, consumer in enumerate(consumers):
                got[index] += consumer.take_nowait()
    await asyncio.sleep(0.1)
    for index, consumer in enumerate(consumers):
        got[index] += consumer.take_nowait()
    return got


async def test_each_request_goes_to_exactly_one_consumer(harness: Harness) -> None:
    """Every requested event reaches exactly one consumer, consumers share them, and nothing else reaches them."""
    first, second = await harness.node(), await harness.node()
    routes = [RequestRoute("demo:work")]
    consumers = [await first.queue.consume(routes), await second.queue.consume(routes)]
    requests = []
    for n in range(60):
        publisher = first if n % 2 else second
        requests.append((await publisher.bus.publish(_event("demo:work:v1:requested", n=n))).event.event_id)
        await publisher.bus.publish(_event("demo:work:v1:started", n=n))
    got = await _gather(consumers, len(requests))
    ids = [[event.event_id for event in events] for events in got]
    assert all(ids), "both consumers take a share"
    assert sorted(ids[0] + ids[1]) == sorted(requests)
    assert all(event.state == "requested" for events in got for event in events)
    for events in got:
        assert [event.offset for event in events] == sorted(event.offset for event in events)


async def test_requests_stored_before_a_consumer_joined_are_not_its_own(harness: Harness) -> None:
    """A consumer receives the requests stored after it joined, not the ones before."""
    node = await harness.node()
    await node.bus.publish(_event("demo:work:v1:requested", n=0))
    consumer = await node.queue.consume([RequestRoute("demo:work")])
    later = (await node.bus.publish(_event("demo:work:v1:requested", n=1))).event
    got = await _gather([consumer], 1)
    assert [event.event_id for event in got[0]] == [later.event_id]


async def test_the_terminal_event_of_a_taken_request_is_stored(harness: Harness) -> None:
    """publish_terminal stores a consumed request's terminal event, where every subscriber sees it."""
    node = await harness.node()
    consumer = await node.queue.consume([RequestRoute("demo:work")])
    watcher = await node.bus.subscribe(["demo:work:v1:success"])
    request = (await node.bus.publish(_event("demo:work:v1:requested", n=1))).event
    assert [event.event_id for event in (await _gather([consumer], 1))[0]] == [request.event_id]
    done = Event.create("demo:work:v1:success", {}, metadata={"correlation_id": request.event_id})
    published = await node.queue.publish_terminal(done)
    assert not published.duplicate
    assert published.event.offset > request.offset
    with anyio.fail_after(GUARD):
        assert [event.event_id for event in await watcher.next_batch()] == [done.event_id]


async def test_cancels_reach_every_node(harness: Harness) -> None:
    """A cancel sent through one node's queue is handed, as a CancelRequest, to the callbacks of every node."""
    first, second = await harness.node(), await harness.node()
    nodes = [first] if second is first else [first, second]
    seen: list[list[ControlMessage]] = [[] for _ in nodes]
    arrived = asyncio.Event()

    def receiver(index: int) -> Callable[[ControlMessage], None]:
        def receive(message: ControlMessage) -> None:
            seen[index].append(message)
            arrived.set()

        return receive

    for index, node in enumerate(nodes):
        node.queue.on_control(receiver(index))
    message = CancelRequest("c", "test")
    await second.queue.cancel(message)
    with anyio.fail_after(GUARD):
        while not all(seen):
            arrived.clear()
            await arrived.wait()
    assert seen == [[message] for _ in nodes]


async def test_closing_the_queue_ends_its_consumers(harness: Harness) -> None:
    """After the queue closes, its consumers end and it takes no new consumer."""
    node = await harness.node()
    consumer = await node.queue.consume()
    await node.queue.close()
    with anyio.fail_after(GUARD):
        assert await consumer.next_batch() == []
    with pytest.raises(BusUnavailable):
        await node.queue.consume()


# --- the memory queue ---------------------------------------------------------------------------------------


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    memory = MemoryBus()
    await memory.start()
    yield memory
    await memory.close()


async def test_two_memory_queues_on_one_bus_each_get_every_request(bus: MemoryBus) -> None:
    """Queues are independent: each gives every request to one of its own consumers."""
    first, second = MemoryRequestQueue(bus), MemoryRequestQueue(bus)
    consumers = [await first.consume(), await second.consume()]
    for n in range(5):
        await bus.publish(_event("demo:a:v1:requested", n=n))
    got = await _gather(consumers, 10)
    assert [[event.offset for event in events] for events in got] == [[1, 2, 3, 4, 5]] * 2


async def test_a_consumer_leaving_hands_over(bus: MemoryBus) -> None:
    """After a consumer closes, the remaining one gets every request."""
    queue = MemoryRequestQueue(bus)
    leaving = await queue.consume()
    staying = await queue.consume()
    leaving.close()
    for n in range(4):
        await bus.publish(_event("demo:a:v1:requested", n=n))
    got = await _gather([staying], 4)
    assert [event.offset for event in got[0]] == [1, 2, 3, 4]


async def test_closing_the_bus_ends_the_consumers(bus: MemoryBus) -> None:
    """The consumers of a memory queue end when its bus closes."""
    consumer = await MemoryRequestQueue(bus).consume()
    await bus.close()
    with anyio.fail_after(GUARD):
        assert await consumer.next_batch() == []
