"""What the server holds stays bounded however large the events: a `nexus serve` process filled with 1 MiB
events keeps its memory under a bound set by ``history_max_bytes`` (docs/guarantees.md, "Bad input and limits");
and small events cost little each once retained (the exact figure is ``benchmarks/bench_history.py``'s).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

from nexus.client import NexusClient
from nexus.errors import NexusError

HISTORY_MAX_BYTES = 32 * 1024 * 1024
EVENTS = 300
EVENT_PAYLOAD = "x" * 999_000
"""About 1 MiB events: 300 of them is ten times what the history may keep."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc")


async def test_memory_stays_bounded_while_1_mib_events_fill_the_history() -> None:
    """With history_max_bytes = 32 MiB, storing 300 events of 1 MiB grows the server's RSS by less than three times
    that bound, and the second half of the run adds (almost) nothing: old events are let go."""
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
        "--history-max-bytes",
        str(HISTORY_MAX_BYTES),
        "--log-level",
        "warning",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with NexusClient(f"127.0.0.1:{port}") as client:
            for _ in range(200):
                try:
                    await client.emit("mem:warm:v1:up")
                    break
                except NexusError:
                    await asyncio.sleep(0.05)
            base = rss_mib(process.pid)
            halfway = 0.0
            for index in range(EVENTS):
                await client.emit("mem:fill:v1:stored", {"blob": EVENT_PAYLOAD})
                if index == EVENTS // 2:
                    halfway = rss_mib(process.pid)
            end = rss_mib(process.pid)
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)
    bound = 3 * HISTORY_MAX_BYTES / (1024 * 1024)
    assert end - base < bound, f"RSS grew {end - base:.0f} MiB (from {base:.0f}), over {bound:.0f} MiB"
    assert end - halfway < 16, f"RSS still grew {end - halfway:.0f} MiB in the second half"


RETAINED_EVENTS = 30_000
BYTES_PER_EVENT_BOUND = 1024
RETAIN_SCRIPT = f"""
import asyncio, gc, json
from pathlib import Path
from nexus.bus.memory import MemoryBus
from nexus.events import Event

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

async def main():
    bus = MemoryBus()
    await bus.start()
    def event(n):
        return Event.create("mem:fill:v1:stored", {{"text": "x" * 170, "n": n}}, metadata={{"owner": "anonymous"}})
    for n in range(1000):
        await bus.publish(event(n))
    await asyncio.sleep(0)
    gc.collect()
    base = rss()
    for n in range({RETAINED_EVENTS}):
        await bus.publish(event(n))
        if n % 1000 == 0:
            await asyncio.sleep(0)
    await asyncio.sleep(0)
    gc.collect()
    print(json.dumps({{"grown": rss() - base, "held": len(bus.history()), "size": bus.history(1)[0].size()}}))

asyncio.run(main())
"""


async def test_a_retained_small_event_costs_less_than_a_kilobyte() -> None:
    """A memory bus holding 30,000 more events of a 200-byte payload (history and dedupe window) grows its
    process's RSS by less than 1 KB per event."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RETAIN_SCRIPT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0
    result = json.loads(output)
    assert result["held"] == 1000 + RETAINED_EVENTS
    assert 250 < result["size"] < 300
    per_event = result["grown"] / RETAINED_EVENTS
    assert per_event < BYTES_PER_EVENT_BOUND, f"{per_event:.0f} bytes of RSS per retained event"
