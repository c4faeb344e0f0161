"""History memory, garbage-collector pauses and publish → delivery tail latency with a full history.

    python benchmarks/bench_history.py                       # every part, full size
    python benchmarks/bench_history.py --part memory         # RSS per retained event, gc.collect() full vs empty
    python benchmarks/bench_history.py --part pauses --seconds 60   # collector pauses over a full history
    python benchmarks/bench_history.py --part latency --seconds 60  # through a server, over gRPC

1. ``memory`` (in a fresh process): RSS growth of a default :class:`~nexus.bus.memory.MemoryBus` (history and
   dedupe window) after storing ``--events`` events of a 200-byte payload, as the server stores them (validated
   at the edge, ``metadata.owner`` set), divided by the events held. Also the time of a full ``gc.collect()``
   (best of five, CPU time) with that history against the same process before it was filled: a ratio. And the
   CPU time of opening a subscription that replays the whole history (held events are decoded only then).
2. ``pauses`` (in a fresh process): the same bus with a full history, ``--rate`` events/s published for
   ``--seconds`` to one subscriber in the same process: the collector's pauses (CPU time, per generation, from
   ``gc.callbacks``) and publish → delivery latency. CPU time does not move with the machine's load; the latency
   here does, as in part 3.
3. ``latency``: a ``nexus serve`` process (memory bus), its history filled with ``--events`` events through
   ``PublishEvents``, then ``--rate`` events/s published with ``EmitEvent`` while a ``SubscribeEvents``
   subscriber measures publish → delivery (system-wide monotonic clock, stamped in the payload):
   p50 / p99 / p99.9 in ms, and the server's CPU per event from ``/proc``.

Targets (issue 12): memory ≤ 600 bytes per retained event; p99 ≤ 3 ms and p99.9 ≤ 6 ms at 1k events/s with
100,000 events in history. Prints one JSON object; ``--check`` exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PAYLOAD_TEXT = "x" * 162
"""With ``n`` and ``t`` the payload's compact JSON is about 200 bytes."""
MEMORY_TARGET_BYTES = 600
P99_TARGET_MS = 3.0
P999_TARGET_MS = 6.0


def payload(n: int) -> dict[str, Any]:
    return {"text": PAYLOAD_TEXT, "n": n, "t": time.monotonic_ns()}


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def collect_seconds() -> float:
    """The CPU time of a full collection, best of five."""
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        gc.collect()
        best = min(best, time.process_time() - start)
    return best


async def measure_memory(events: int) -> dict[str, Any]:
    from nexus.bus.memory import MemoryBus
    from nexus.events import Event

    bus = MemoryBus()
    await bus.start()
    warm = [Event.create("bench:fill:v1:stored", payload(n), metadata={"owner": "anonymous"}) for n in range(1000)]
    for event in warm:  # the allocator's and the interpreter's own start-up growth, not the history's
        await bus.publish(event)
    del warm
    gc.collect()
    empty_gc = collect_seconds()
    base = rss_bytes()
    held_before = len(bus.history())
    for n in range(events):
        await bus.publish(Event.create("bench:fill:v1:stored", payload(n), metadata={"owner": "anonymous"}))
        if n % 1000 == 0:
            await asyncio.sleep(0)
    gc.collect()
    grown = rss_bytes() - base
    held = len(bus.history()) - held_before
    full_gc = collect_seconds()
    sample = bus.history(bus.stats().head_offset - 1)[0]
    start = time.process_time()
    replay = await bus.subscribe([">"], since_offset=bus.first_offset - 1, epoch=bus.epoch, max_pending=events)
    replay_s = time.process_time() - start
    replayed = replay.pending
    replay.close()
    await bus.close()
    return {
        "events_held": held,
        "payload_json_bytes": len(json.dumps(sample.payload, separators=(",", ":"))),
        "event_size": sample.size(),
        "rss_growth_mib": round(grown / 2**20, 1),
        "rss_bytes_per_event": round(grown / held),
        "gc_collect_ms_empty": round(empty_gc * 1000, 2),
        "gc_collect_ms_full": round(full_gc * 1000, 2),
        "gc_collect_ratio": round(full_gc / max(empty_gc, 1e-6), 2),
        "replay_all_events": replayed,
        "replay_all_cpu_ms": round(replay_s * 1000, 1),
        "target_bytes_per_event": MEMORY_TARGET_BYTES,
    }


async def measure_pauses(events: int, rate: float, seconds: float) -> dict[str, Any]:
    from nexus.bus.memory import MemoryBus
    from nexus.events import Event

    bus = MemoryBus()
    await bus.start()
    for n in range(events):
        await bus.publish(Event.create("bench:fill:v1:stored", payload(n), metadata={"owner": "anonymous"}))
        if n % 1000 == 0:
            await asyncio.sleep(0)
    gc.collect()
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.thread_time()
        else:
            pauses[info["generation"]].append(time.thread_time() - started[0])

    subscription = await bus.subscribe(["bench:live:>"])
    latencies: list[float] = []
    total = int(rate * seconds)

    async def receive() -> None:
        while len(latencies) < total:
            for event in await subscription.next_batch():
                latencies.append((time.monotonic_ns() - int(event.payload["t"])) / 1e6)

    receiver = asyncio.create_task(receive())
    gc.callbacks.append(on_gc)
    cpu_start = time.process_time()
    start = time.monotonic()
    for n in range(total):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await bus.publish(Event.create("bench:live:v1:sent", payload(n), metadata={"owner": "anonymous"}))
    await asyncio.wait_for(receiver, 30)
    cpu = time.process_time() - cpu_start
    gc.callbacks.remove(on_gc)
    await bus.close()
    return {
        "history_events": events,
        "events": len(latencies),
        "cpu_us_per_event": round(cpu / total * 1e6, 1),
        "collections": {f"gen{gen}": len(times) for gen, times in pauses.items()},
        "max_pause_ms": {f"gen{gen}": round(max(times, default=0) * 1000, 2) for gen, times in pauses.items()},
        "gc_cpu_ms_total": round(sum(sum(times) for times in pauses.values()) * 1000, 1),
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "p999_ms": round(percentile(latencies, 0.999), 3),
        "max_ms": round(max(latencies), 3),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure_latency(events: int, rate: float, seconds: float) -> dict[str, Any]:
    from nexus.client import NexusClient
    from nexus.errors import NexusError
    from nexus.events import Event

    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nexus.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(port),
        "--no-gateway",
        "--log-level",
        "warning",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with NexusClient(f"127.0.0.1:{port}") as client:
            for _ in range(400):
                try:
                    await client.emit("bench:warm:v1:up")
                    break
                except NexusError:
                    await asyncio.sleep(0.05)
            fill_start = time.monotonic()
            chunk = 5000
            for first in range(0, events, chunk):
                batch = [Event.create("bench:fill:v1:stored", payload(n)) for n in range(first, first + chunk)]
                await client.publish_many(batch)
            fill_s = time.monotonic() - fill_start
            rss_full = rss_bytes(process.pid)
            latencies: list[float] = []
            total = int(rate * seconds)
            subscription = client.subscribe("bench:live:>")

            async def receive() -> None:
                async for event in subscription:
                    latencies.append((time.monotonic_ns() - int(event.payload["t"])) / 1e6)
                    if len(latencies) >= total:
                        return

            receiver = asyncio.create_task(receive())
            await asyncio.sleep(0.5)
            cpu_start = cpu_seconds(process.pid)
            start = time.monotonic()
            for n in range(total):
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await client.emit("bench:live:v1:sent", payload(n))
            await asyncio.wait_for(receiver, 30)
            cpu = cpu_seconds(process.pid) - cpu_start
            subscription.close()
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)
    return {
        "history_events": events,
        "fill_seconds": round(fill_s, 1),
        "server_rss_mib_full": round(rss_full / 2**20, 1),
        "rate": rate,
        "events": len(latencies),
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "p999_ms": round(percentile(latencies, 0.999), 3),
        "max_ms": round(max(latencies), 3),
        "server_cpu_us_per_event": round(cpu / max(1, len(latencies)) * 1e6, 1),
        "target_p99_ms": P99_TARGET_MS,
        "target_p999_ms": P999_TARGET_MS,
    }


def run_part(part: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one part in a fresh interpreter (so RSS and the collector see only that part)."""
    command = [sys.executable, __file__, "--part", part, "--inner", "--events", str(args.events)]
    command += ["--rate", str(args.rate), "--seconds", str(args.seconds)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(output)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["memory", "pauses", "latency", "all"], default="all")
    parser.add_argument("--events", type=int, default=100_000, help="events in the history (100000)")
    parser.add_argument("--rate", type=float, default=1000.0, help="live events per second (1000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of live publishing (60)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        if args.part == "memory":
            result = asyncio.run(measure_memory(args.events))
        elif args.part == "pauses":
            result = asyncio.run(measure_pauses(args.events, args.rate, args.seconds))
        else:
            result = asyncio.run(measure_latency(args.events, args.rate, args.seconds))
        print(json.dumps(result))
        return 0
    parts = ["memory", "pauses", "latency"] if args.part == "all" else [args.part]
    results = {part: run_part(part, args) for part in parts}
    print(json.dumps(results, indent=2))
    missed = []
    if "memory" in results and results["memory"]["rss_bytes_per_event"] > MEMORY_TARGET_BYTES:
        missed.append("memory")
    latency = results.get("latency")
    if latency and (latency["p99_ms"] > P99_TARGET_MS or latency["p999_ms"] > P999_TARGET_MS):
        missed.append("latency")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
