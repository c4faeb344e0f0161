"""NATS JetStream publishing through the Nexus NATS bus, against bare nats-py on the same server, interleaved.

    python benchmarks/nats_publish.py                        # 127.0.0.1:4222, 3 pairs per scenario
    python benchmarks/nats_publish.py --url nats://... --events 20000 --pairs 5

Scenarios (each as A B A B ..., a fresh memory stream per round, 200-byte payloads):

- ``async``: bare ``js.publish_async`` of N messages then every ack awaited, against the bus's
  ``publish_many`` of the same N events in chunks of 100 (a PublishEvents stream), and against N concurrent
  ``publish`` calls (many EmitEvents in flight); the bus rounds end when a subscriber of the node received
  every event (publish → delivery, not only the ack). Also measured: bare nats-py with N concurrent
  ``js.publish`` calls (the library's own way to have many publishes in flight).
- ``sequential``: bare ``js.publish`` awaited one at a time, against ``bus.publish`` awaited one at a time
  (also until delivered).

Reported per scenario: median events/s and CPU µs per event of this process (``time.process_time``: client
and node share it, so the bus's figure includes its tail and delivery), and the ratios bus / bare.
The functions (:func:`bare_async`, :func:`bus_many`, ...) return a :class:`Round` each, for other runners.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import nats
import nats.js.errors

from nexus.bus.nats import NatsBus
from nexus.bus.nats_settings import NatsBusSettings
from nexus.events import Event
from nexus.logs import configure_logging

PAYLOAD = {"text": "x" * 180, "n": 1}
BODY = json.dumps(PAYLOAD, separators=(",", ":")).encode()
CHUNK = 100


@dataclasses.dataclass(frozen=True, slots=True)
class Round:
    events: int
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.events / self.wall_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.events * 1e6


async def _timed(events: int, work: Callable[[], Awaitable[None]]) -> Round:
    wall, cpu = time.perf_counter(), time.process_time()
    await work()
    return Round(events, time.perf_counter() - wall, time.process_time() - cpu)


def _names() -> tuple[str, str]:
    token = uuid.uuid4().hex[:10]
    return f"BENCH_{token}", f"bench{token}"


async def _bare(url: str, events: int, sequential: bool, concurrent: bool = False) -> Round:
    stream, prefix = _names()
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{prefix}.>"], storage="memory")
    subject = f"{prefix}.bench.load.v1.made"
    try:

        async def work() -> None:
            if sequential:
                for i in range(events):
                    await js.publish(subject, BODY, stream=stream, headers={"Nats-Msg-Id": f"e:{i}"})
            elif concurrent:
                await asyncio.gather(
                    *(
                        js.publish(subject, BODY, stream=stream, headers={"Nats-Msg-Id": f"e:{i}"})
                        for i in range(events)
                    )
                )
            else:
                futures = [
                    await js.publish_async(subject, BODY, stream=stream, headers={"Nats-Msg-Id": f"e:{i}"})
                    for i in range(events)
                ]
                await asyncio.gather(*futures)

        return await _timed(events, work)
    finally:
        await js.delete_stream(stream)
        await nc.close()


async def bare_async(url: str, events: int) -> Round:
    """Bare nats-py: ``publish_async`` every message, then await every ack."""
    return await _bare(url, events, sequential=False)


async def bare_concurrent(url: str, events: int) -> Round:
    """Bare nats-py: every message's ``publish`` (send, then await its ack) concurrently."""
    return await _bare(url, events, sequential=False, concurrent=True)


async def bare_sequential(url: str, events: int) -> Round:
    """Bare nats-py: ``publish`` one message at a time, each ack awaited."""
    return await _bare(url, events, sequential=True)


async def _bus(url: str, events: int, mode: str) -> Round:
    stream, prefix = _names()
    bus = NatsBus(NatsBusSettings(servers=(url,), stream=stream, subject_prefix=prefix, storage="memory"))
    await bus.start()
    batch = [Event.create("bench:load:v1:made", PAYLOAD) for _ in range(events)]
    try:
        sub = await bus.subscribe([">"], max_pending=events + 10)

        async def work() -> None:
            if mode == "many":
                for start in range(0, events, CHUNK):
                    await bus.publish_many(batch[start : start + CHUNK])
            elif mode == "concurrent":
                await asyncio.gather(*(bus.publish(event) for event in batch))
            else:
                for event in batch:
                    await bus.publish(event)
            received = 0
            while received < events:
                received += len(await sub.next_batch())

        return await _timed(events, work)
    finally:
        await bus.close()
        nc = await nats.connect(url)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(stream)
        await nc.close()


async def bus_many(url: str, events: int) -> Round:
    """The bus: ``publish_many`` in chunks of 100, until a subscriber received every event."""
    return await _bus(url, events, "many")


async def bus_concurrent(url: str, events: int) -> Round:
    """The bus: every event's ``publish`` concurrently, until a subscriber received every event."""
    return await _bus(url, events, "concurrent")


async def bus_sequential(url: str, events: int) -> Round:
    """The bus: ``publish`` one event at a time, until a subscriber received every event."""
    return await _bus(url, events, "sequential")


SCENARIOS: dict[str, tuple[Callable[[str, int], Awaitable[Round]], list[Callable[[str, int], Awaitable[Round]]]]] = {
    "async": (bare_async, [bus_many, bus_concurrent, bare_concurrent]),
    "sequential": (bare_sequential, [bus_sequential]),
}


async def run(url: str, events: int, pairs: int, sequential_events: int) -> dict[str, object]:
    report: dict[str, object] = {}
    for name, (bare, candidates) in SCENARIOS.items():
        count = sequential_events if name == "sequential" else events
        rounds: dict[str, list[Round]] = {function.__name__: [] for function in (bare, *candidates)}
        for _ in range(pairs):
            for function in (bare, *candidates):
                rounds[function.__name__].append(await function(url, count))
        summary: dict[str, dict[str, float]] = {}
        for key, values in rounds.items():
            summary[key] = {
                "events_per_s": round(statistics.median(r.rate for r in values)),
                "cpu_us_per_event": round(statistics.median(r.cpu_us for r in values), 1),
            }
        base = summary[bare.__name__]
        for candidate in candidates:
            entry = summary[candidate.__name__]
            entry["rate_ratio"] = round(entry["events_per_s"] / base["events_per_s"], 2)
            entry["cpu_ratio"] = round(entry["cpu_us_per_event"] / base["cpu_us_per_event"], 2)
        report[name] = summary
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--sequential-events", type=int, default=2_000)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    configure_logging(level="warning")
    print(json.dumps(asyncio.run(run(args.url, args.events, args.pairs, args.sequential_events)), indent=2))


if __name__ == "__main__":
    main()
