"""In-process delivery costs that `nexus bench` does not cover, as ratios in the same run (machines here are noisy).

    python benchmarks/bench_delivery.py            # full size
    python benchmarks/bench_delivery.py --quick    # a few seconds, as the test suite runs it

Live gRPC, WebSocket, NATS, latency and memory, each beside its bare library, are measured by ``nexus bench``
(docs/performance.md). What stays here:

1. Bus fan-out: N events to S subscribers through ``MemoryBus`` (batched hand-off), against a baseline that
   does what the design forbids — an ``asyncio.Queue`` per subscriber with one ``await put()`` per event per
   subscriber. Target: the batched bus is faster, ratio > 1.
2. Metrics: deliveries/s through a server's node (publishes counted and timed, delivery latency recorded) with
   metrics on against the same server with ``metrics = false``; rounds interleaved, the median ratio reported.
   Target: on/off >= 0.9 (metrics cost at most 10%).
3. Tracing cost: events/s from a gRPC publisher to a batched gRPC subscriber, and plain requests/s, on a
   server with tracing on (no exporter) against one with tracing off.
   Target: at most 10% fewer events/s with tracing on.

Prints one JSON object; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

from nexus import EventHandler
from nexus.bus.memory import MemoryBus
from nexus.config import Settings
from nexus.events import Event
from nexus.logs import configure_logging
from nexus.server import NexusServer
from nexus.testing import run_server
from nexus.tracing import Tracing
from nexus.v1 import nexus_pb2

PAYLOAD = {"text": "x" * 160, "n": 1}


async def bus_fanout(events: int, subscribers: int) -> float:
    bus = MemoryBus(history_size=events + 10)
    await bus.start()
    subs = [await bus.subscribe([">"], max_pending=events + 10) for _ in range(subscribers)]
    received = 0

    async def drain(index: int) -> None:
        nonlocal received
        sub = subs[index]
        got = 0
        while got < events:
            got += len(await sub.next_batch())
        received += got

    start = time.perf_counter()
    readers = [asyncio.create_task(drain(i)) for i in range(subscribers)]
    for i in range(events):
        await bus.publish(Event("bench:tick:v1:happened", PAYLOAD, event_id=f"e{i}"))
        if i % 100 == 99:
            await asyncio.sleep(0)
    await asyncio.gather(*readers)
    elapsed = time.perf_counter() - start
    await bus.close()
    return received / elapsed


async def queue_fanout(events: int, subscribers: int) -> float:
    queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in range(subscribers)]
    received = 0

    async def drain(queue: asyncio.Queue[Event]) -> None:
        nonlocal received
        for _ in range(events):
            await queue.get()
            received += 1

    start = time.perf_counter()
    readers = [asyncio.create_task(drain(q)) for q in queues]
    for i in range(events):
        event = Event("bench:tick:v1:happened", PAYLOAD, event_id=f"e{i}")
        for queue in queues:
            await queue.put(event)
        if i % 100 == 99:
            await asyncio.sleep(0)
    await asyncio.gather(*readers)
    return received / (time.perf_counter() - start)


async def server_fanout(events: int, subscribers: int, *, metrics: bool) -> float:
    """Deliveries/s to ``subscribers`` of events published through a server's node, as a transport does."""
    settings = Settings(
        host="127.0.0.1",
        grpc_port=0,
        gateway=False,
        load_entry_points=False,
        metrics=metrics,
        history_size=events + 10,
        subscriber_queue=events + 10,
    )
    server = NexusServer(settings)
    await server.start()
    node = server.node
    subs = [await node.subscribe([">"], max_pending=events + 10) for _ in range(subscribers)]
    received = 0

    async def drain(index: int) -> None:
        nonlocal received
        got = 0
        while got < events:
            got += len(await subs[index].next_batch())
        received += got

    start = time.perf_counter()
    readers = [asyncio.create_task(drain(i)) for i in range(subscribers)]
    for i in range(events):
        await node.publish(Event("bench:tick:v1:happened", PAYLOAD, event_id=f"m{i}"), transport="grpc")
        if i % 100 == 99:
            await asyncio.sleep(0)
    await asyncio.gather(*readers)
    elapsed = time.perf_counter() - start
    if metrics:
        assert b"messaging_client_sent_messages_total" in server.telemetry.prometheus_text()
    await server.stop(0)
    return received / elapsed


async def metrics_on_off(events: int, subscribers: int, rounds: int) -> tuple[float, float, float]:
    """Median deliveries/s with metrics on and off, and the median of the per-round on/off ratios."""
    on: list[float] = []
    off: list[float] = []
    for index in range(rounds):
        order = (True, False) if index % 2 == 0 else (False, True)
        for metrics in order:
            (on if metrics else off).append(await server_fanout(events, subscribers, metrics=metrics))
    ratios = sorted(a / b for a, b in zip(on, off, strict=True))
    return statistics.median(on), statistics.median(off), ratios[len(ratios) // 2]


class Echo(EventHandler):
    event_type = "bench:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"n": event.payload.get("n", 0)}


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def traced_rates(events: int, requests: int, tracing: bool, traced: bool = False) -> tuple[float, float]:
    """Events/s from a gRPC publisher to a batched gRPC subscriber, and plain requests/s (16 at a time); with
    ``traced``, every event carries a ``traceparent`` (a publisher that traces: a deliver span per batch)."""
    metadata = {"traceparent": TRACEPARENT} if traced else {}
    async with run_server(
        Echo(),
        history_size=events * 3,
        subscriber_queue=events * 3,
        heartbeat_interval=0,
        tracing=Tracing.create() if tracing else Tracing.off(),
    ) as nexus:
        stub = nexus.client.stub
        call = stub.SubscribeEventBatches(
            nexus_pb2.SubscribeEventBatchesRequest(event_types=["bench:tick:>"], max_batch_size=500)
        )
        await call.initial_metadata()
        start = time.perf_counter()
        summary = nexus.client.publish_many(
            Event("bench:tick:v1:happened", PAYLOAD, event_id=f"t{i}", metadata=dict(metadata)) for i in range(events)
        )
        publishing = asyncio.ensure_future(summary)
        got = 0
        async for message in call:
            got += len(message.events)
            if got >= events:
                break
        await publishing
        event_rate = got / (time.perf_counter() - start)
        call.cancel()

        async def ask(worker: int) -> None:
            for n in range(requests // 16):
                async for _ in nexus.client.request("bench:echo:v1:requested", {"n": n}):
                    pass

        start = time.perf_counter()
        await asyncio.gather(*(ask(worker) for worker in range(16)))
        request_rate = (requests // 16 * 16) / (time.perf_counter() - start)
        return event_rate, request_rate


async def tracing_cost(events: int, requests: int, rounds: int) -> dict[str, Any]:
    """Best of ``rounds`` alternating runs each way (the machine is noisy; the best run is the least disturbed)."""
    on: list[tuple[float, float]] = []
    off: list[tuple[float, float]] = []
    for _ in range(rounds):
        off.append(await traced_rates(events, requests, tracing=False))
        on.append(await traced_rates(events, requests, tracing=True))
    events_off, events_on = max(r[0] for r in off), max(r[0] for r in on)
    requests_off, requests_on = max(r[1] for r in off), max(r[1] for r in on)
    return {
        "traced_events_per_s_tracing_off": round(events_off),
        "traced_events_per_s_tracing_on": round(events_on),
        "tracing_events_cost_pct": round(100 * (1 - events_on / events_off), 1),
        "requests_per_s_tracing_off": round(requests_off),
        "requests_per_s_tracing_on": round(requests_on),
        "tracing_requests_cost_pct": round(100 * (1 - requests_on / requests_off), 1),
    }


async def main(quick: bool) -> int:
    configure_logging("json", "warning")  # logs to stderr; stdout carries only the report
    events = 2_000 if quick else 20_000
    subscribers = 20 if quick else 100
    bus_rate = await bus_fanout(events, subscribers)
    queue_rate = await queue_fanout(events, subscribers)
    metrics_on, metrics_off, metrics_ratio = await metrics_on_off(events, subscribers, 3 if quick else 7)
    result: dict[str, Any] = {
        "events": events,
        "subscribers": subscribers,
        "bus_deliveries_per_s": round(bus_rate),
        "per_event_queue_deliveries_per_s": round(queue_rate),
        "bus_vs_queue_ratio": round(bus_rate / queue_rate, 2),
        "metrics_on_deliveries_per_s": round(metrics_on),
        "metrics_off_deliveries_per_s": round(metrics_off),
        "metrics_on_vs_off_ratio": round(metrics_ratio, 3),
    }
    result.update(await tracing_cost(events, 160 if quick else 1_600, 2 if quick else 3))
    result["targets_met"] = (
        result["bus_vs_queue_ratio"] > 1
        and result["metrics_on_vs_off_ratio"] >= 0.9
        and result["tracing_events_cost_pct"] <= 10
    )
    print(json.dumps(result, indent=2))
    return 0 if result["targets_met"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    sys.exit(asyncio.run(main(arguments.quick)))
