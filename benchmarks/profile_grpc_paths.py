"""Server CPU per event on the gRPC paths, for profiling (``py-spy record --pid`` on the server process).

    python benchmarks/profile_grpc_paths.py batched [--events 200000]   # live publish -> one SubscribeEventBatches
    python benchmarks/profile_grpc_paths.py frames  [--events 30000]    # live publish -> one SubscribeEvents
    python benchmarks/profile_grpc_paths.py emit    [--events 5000]     # sequential EmitEvent from another process

The server runs in this process; the client in a child process. Events are created and published in the server
process the way a handler would (``Event.create`` + ``node.publish_many``, 100 at a time). Prints the server's
CPU (user + system, all threads, from ``time.process_time``) per event, and events/s. Rounds repeat
(``--rounds``) so a profiler can attach; the median is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from nexus.events import Event
from nexus.logs import configure_logging
from nexus.testing import run_server
from nexus.v1 import nexus_pb2, nexus_pb2_grpc

PAYLOAD: dict[str, Any] = {"text": "x" * 160, "n": 1, "ok": True}  # ~200 bytes as compact JSON
CHUNK = 100


async def client_main(mode: str, address: str, events: int, encoding: int) -> None:
    import grpc

    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = nexus_pb2_grpc.NexusServiceStub(channel)
        if mode == "emit":
            print("ready", flush=True)
            sys.stdin.readline()
            request = nexus_pb2.EventRequest(event_type="bench:tick:v1:happened", metadata={"k": "v"})
            request.payload.update(PAYLOAD)
            for _ in range(events):
                await stub.EmitEvent(request)
            print("done", flush=True)
            return
        if mode == "batched":
            call = stub.SubscribeEventBatches(
                nexus_pb2.SubscribeEventBatchesRequest(event_types=["bench:>"], payload_encoding=encoding)  # type: ignore[arg-type]
            )
        else:
            call = stub.SubscribeEvents(
                nexus_pb2.SubscribeRequest(event_types=["bench:>"], payload_encoding=encoding)  # type: ignore[arg-type]
            )
        await call.initial_metadata()
        print("ready", flush=True)
        got = 0
        async for message in call:
            got += len(message.events) if mode == "batched" else 1
            if got >= events:
                break
        print("done", flush=True)


async def one_round(mode: str, events: int, extra: list[str]) -> tuple[float, float]:
    async with run_server() as nexus:
        node = nexus.server.node
        servicer = nexus.server.servicer
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            mode,
            nexus.address,
            "--events",
            str(events),
            *extra,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None
        assert child.stdin is not None
        assert (await child.stdout.readline()).strip() == b"ready"
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if mode == "emit":
            child.stdin.write(b"go\n")
            await child.stdin.drain()
        else:
            published = 0
            while published < events:
                batch = [
                    Event.create("bench:tick:v1:happened", PAYLOAD, metadata={"k": "v"})
                    for _ in range(min(CHUNK, events - published))
                ]
                await node.publish_many(batch)
                published += len(batch)
                await asyncio.sleep(0)
                # Keep inside the subscriber's queue (the delivered count is another task's progress).
                while published - servicer.events_sent > 5_000:  # noqa: ASYNC110
                    await asyncio.sleep(0.0005)
        assert (await child.stdout.readline()).strip() == b"done"
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        await child.wait()
    return cpu / events * 1e6, events / wall


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["batched", "frames", "emit"])
    parser.add_argument("address", nargs="?")
    parser.add_argument("--client", action="store_true")
    parser.add_argument("--events", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="subscribe with PAYLOAD_ENCODING_JSON")
    parser.add_argument("--no-gc", action="store_true", help="collect no garbage while measuring (its share)")
    args = parser.parse_args()
    events = args.events or {"batched": 200_000, "frames": 30_000, "emit": 5_000}[args.mode]
    if args.client:
        await client_main(args.mode, args.address, events, nexus_pb2.PAYLOAD_ENCODING_JSON if args.json else 0)
        return
    configure_logging("console", "warning")
    if args.no_gc:
        gc.disable()
    extra = ["--json"] if args.json else []
    results = [await one_round(args.mode, events, extra) for _ in range(args.rounds)]
    print(
        json.dumps(
            {
                "mode": args.mode,
                "pid": os.getpid(),
                "cpu_us_per_event": round(statistics.median(r[0] for r in results), 2),
                "events_per_s": round(statistics.median(r[1] for r in results)),
                "rounds": [[round(a, 2), round(b)] for a, b in results],
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
