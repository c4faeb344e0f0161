"""The WebSocket gateway against bare ``websockets``, each server in its own process, clients in another.

    python benchmarks/bench_gateway.py cpu      [--clients 100] [--events 3000] [--pairs 3]
    python benchmarks/bench_gateway.py memory   [--clients 1000] [--mode idle|subscribed|stream] [--pairs 1]

- ``cpu``: server CPU (utime + stime from ``/proc/<pid>/stat``) per delivery while the server publishes
  ``--events`` events (200-byte payload, ``--per-tick`` of them every ``--tick-ms``) to ``--clients`` WebSocket
  clients that follow them all. The Nexus server publishes through its node (the publish cost is included);
  the bare server encodes each event once and calls ``websockets.broadcast()``. Runs alternate, Nexus then bare,
  ``--pairs`` times; the report gives the medians and their ratio.
- ``memory``: server RSS (``/proc/<pid>/status``) per connection once ``--clients`` clients are connected:
  ``idle`` (connected, nothing asked), ``subscribed`` (a live subscription to ``bench:>`` receiving an event a
  second) or ``stream`` (one streaming request each, kept open by a handler that sends nothing: its heartbeats
  arrive every second). The bare server holds the same connections, forwarding one message a second to the
  subscribed ones.

The clients are raw sockets speaking just enough WebSocket (handshake, one masked frame, counting the frames
received) so that they cost little next to the servers. Prints one JSON object.

Functions to call from elsewhere: :func:`measure_delivery_cpu`, :func:`measure_connection_memory` (one run each)
and :func:`compare_delivery_cpu`, :func:`compare_connection_memory` (interleaved pairs, medians, ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

PAYLOAD: Final = {"text": "x" * 176, "n": 1}
"""A 200-byte payload (compact JSON)."""
EVENT_TYPE: Final = "bench:tick:v1:happened"
MARKER: Final = b'"offset":'
"""Each event frame holds it once (Nexus' and the bare server's alike)."""
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
PAGE: Final = os.sysconf("SC_PAGE_SIZE")
HERE: Final = os.path.abspath(__file__)


# --- /proc ----------------------------------------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_rss_bytes(pid: int) -> int:
    """Resident memory of the process ``pid``."""
    with open(f"/proc/{pid}/statm") as file:
        return int(file.read().split()[1]) * PAGE


# --- servers (run in their own process: `bench_gateway.py serve nexus|bare MODE`) ---------------------------------


def _bare_frame(offset: int) -> bytes:
    """The bare server's frame: the same JSON object shape as the gateway's event frame."""
    return json.dumps(
        {
            "type": EVENT_TYPE,
            "event_id": f"{offset:032x}",
            "payload": PAYLOAD,
            "metadata": {},
            "offset": offset,
            "epoch": "e" * 16,
            "timestamp": "2026-01-01T00:00:00.000000Z",
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


async def _serve_nexus(commands: asyncio.Queue[str]) -> None:
    from nexus import Event, Stream, StreamingEventHandler
    from nexus.testing import run_server

    class Hold(StreamingEventHandler):
        """Holds each stream open until it is cancelled (its heartbeats keep it alive)."""

        event_type = "bench:stream_hold"
        stream_timeout = None

        async def handle_stream(self, event: Event, stream: Stream) -> None:
            await asyncio.Event().wait()

    async with run_server(Hold(), gateway=True, heartbeat_interval=1.0) as test:
        node = test.server.node
        print(f"ready {test.server.ws_port}", flush=True)
        ticker: asyncio.Task[None] | None = None

        async def tick() -> None:
            while True:
                await asyncio.sleep(1.0)
                await node.publish(Event.create(EVENT_TYPE, PAYLOAD))

        while True:
            command = (await commands.get()).split()
            if command[0] == "publish":
                count, per_tick, tick_s = int(command[1]), int(command[2]), float(command[3])
                for start in range(0, count, per_tick):
                    for _ in range(min(per_tick, count - start)):
                        await node.publish(Event.create(EVENT_TYPE, PAYLOAD))
                    await asyncio.sleep(tick_s)
                print("published", flush=True)
            elif command[0] == "tick":
                ticker = ticker or asyncio.get_running_loop().create_task(tick())
                print("ticking", flush=True)
            elif command[0] == "snap":
                _snapshot()
            elif command[0] == "quit":
                if ticker is not None:
                    ticker.cancel()
                return


async def _serve_bare(commands: asyncio.Queue[str]) -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve
    from websockets.exceptions import ConnectionClosed

    followers: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        try:
            async for _ in ws:  # the first frame (subscribe, or a request) makes it a follower
                followers.add(ws)
        except ConnectionClosed:
            pass
        finally:
            followers.discard(ws)

    offset = 0

    def send_one() -> None:
        nonlocal offset
        offset += 1
        broadcast(followers, _bare_frame(offset), text=True)

    async def tick() -> None:
        while True:
            await asyncio.sleep(1.0)
            send_one()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
        ticker: asyncio.Task[None] | None = None
        while True:
            command = (await commands.get()).split()
            if command[0] == "publish":
                count, per_tick, tick_s = int(command[1]), int(command[2]), float(command[3])
                for start in range(0, count, per_tick):
                    for _ in range(min(per_tick, count - start)):
                        send_one()
                    await asyncio.sleep(tick_s)
                print("published", flush=True)
            elif command[0] == "tick":
                ticker = ticker or asyncio.get_running_loop().create_task(tick())
                print("ticking", flush=True)
            elif command[0] == "snap":
                _snapshot()
            elif command[0] == "quit":
                if ticker is not None:
                    ticker.cancel()
                return


_snapshots: list[Any] = []


def _snapshot() -> None:
    """With NEXUS_BENCH_TRACEMALLOC=1: the first call takes a snapshot, the next prints the top growth (stderr),
    by line (NEXUS_BENCH_GROUP=filename: by file)."""
    import gc
    import tracemalloc

    gc.collect()
    if not tracemalloc.is_tracing():
        print("snapped", flush=True)
        return
    snapshot = tracemalloc.take_snapshot()
    if _snapshots:
        group = os.environ.get("NEXUS_BENCH_GROUP", "lineno")
        for stat in snapshot.compare_to(_snapshots[0], group)[:40]:
            print(stat, file=sys.stderr)
    _snapshots.append(snapshot)
    print("snapped", flush=True)


async def _server_main(kind: str) -> None:
    from nexus.logs import configure_logging

    configure_logging("console", "warning")  # to stderr: stdout answers the parent
    if os.environ.get("NEXUS_BENCH_TRACEMALLOC") == "1":
        import tracemalloc

        tracemalloc.start(int(os.environ.get("NEXUS_BENCH_FRAMES", "1")))
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def read() -> None:
        while line := await reader.readline():
            commands.put_nowait(line.decode())
        commands.put_nowait("quit")

    reading = loop.create_task(read())
    try:
        await (_serve_nexus(commands) if kind == "nexus" else _serve_bare(commands))
    finally:
        reading.cancel()


# --- clients (run in their own process: `bench_gateway.py clients PORT N MODE`) ----------------------------------


class _Client(asyncio.Protocol):
    """A raw WebSocket client: handshake, optionally one frame, then counts the event frames it receives."""

    def __init__(self, first_frame: bytes | None, connected: asyncio.Future[None]) -> None:
        self.first_frame = first_frame
        self.connected = connected
        self.transport: asyncio.Transport | None = None
        self.handshaken = False
        self.buffer = b""
        self.tail = b""
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.handshaken:
            self.buffer += data
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(head.decode(errors="replace"))
            self.handshaken = True
            self.buffer = b""
            if self.first_frame is not None and self.transport is not None:
                self.transport.write(_masked_text(self.first_frame))
            if not self.connected.done():
                self.connected.set_result(None)
            data = rest
        chunk = self.tail + data
        self.received += chunk.count(MARKER)
        self.tail = chunk[-(len(MARKER) - 1) :]
        if self.tail.endswith(MARKER):  # pragma: no cover - cannot: the tail is shorter than the marker
            self.tail = b""


def _masked_text(data: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert len(data) < 126
    return bytes([0x81, 0x80 | len(data)]) + mask + masked


async def _clients_main(port: int, count: int, mode: str) -> None:
    loop = asyncio.get_running_loop()
    first = {
        "idle": None,
        "subscribed": b'{"type":"subscribe","event_types":["bench:>"]}',
        "stream": b'{"type":"bench:stream_hold:v1:requested","payload":{}}',
    }[mode]
    key = base64.b64encode(os.urandom(16))
    request = (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (port, key)
    )
    clients: list[_Client] = []
    for start in range(0, count, 50):
        waits = []
        for _ in range(min(50, count - start)):
            connected: asyncio.Future[None] = loop.create_future()
            client = _Client(first, connected)
            transport, _ = await loop.create_connection(lambda c=client: c, "127.0.0.1", port)  # type: ignore[misc]
            transport.write(request)
            clients.append(client)
            waits.append(connected)
        await asyncio.wait_for(asyncio.gather(*waits), 60)
    print(f"connected {len(clients)}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        if line[0] == "wait":  # wait until every client received at least N event frames
            expected = int(line[1])
            deadline = time.monotonic() + 120
            while min(c.received for c in clients) < expected and time.monotonic() < deadline:  # noqa: ASYNC110 - counters without an event
                await asyncio.sleep(0.02)
            print(f"received {sum(c.received for c in clients)}", flush=True)
        elif line[0] == "quit":
            break
    for client in clients:
        if client.transport is not None:
            client.transport.close()


# --- the parent ---------------------------------------------------------------------------------------------------


class _Child:
    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, HERE, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def ask(self, command: str | None, answer: str) -> str:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the child {self.process.args!r} ended before answering {answer!r}")
            if line.startswith(answer):
                return line.strip()

    def stop(self) -> None:
        with _suppress():
            assert self.process.stdin is not None
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def measure_delivery_cpu(
    kind: str, *, clients: int = 100, events: int = 3_000, per_tick: int = 10, tick_s: float = 0.01
) -> dict[str, float]:
    """One run: server CPU µs per delivery (``kind``: ``nexus`` or ``bare``) publishing ``events`` to ``clients``."""
    server = _Child("serve", kind)
    try:
        port = int(server.ask(None, "ready").split()[1])
        followers = _Child("clients", str(port), str(clients), "subscribed")
        try:
            followers.ask(None, "connected")
            time.sleep(0.5)
            cpu0, wall0 = process_cpu_s(server.pid), time.perf_counter()
            server.ask(f"publish {events} {per_tick} {tick_s}", "published")
            received = int(followers.ask(f"wait {events}", "received").split()[1])
            cpu, wall = process_cpu_s(server.pid) - cpu0, time.perf_counter() - wall0
        finally:
            followers.stop()
    finally:
        server.stop()
    deliveries = events * clients
    return {
        "cpu_us_per_delivery": cpu / deliveries * 1e6,
        "deliveries_per_s": received / wall,
        "received_ratio": received / deliveries,
    }


def measure_connection_memory(kind: str, *, clients: int = 1_000, mode: str = "idle") -> dict[str, float]:
    """One run: server RSS bytes per connection (``kind``: ``nexus`` or ``bare``; ``mode``: ``idle``,
    ``subscribed`` or ``stream``) once ``clients`` connections are open and (not idle) have received events."""
    server = _Child("serve", kind)
    try:
        port = int(server.ask(None, "ready").split()[1])
        server.ask("snap", "snapped")
        time.sleep(0.5)
        rss0 = process_rss_bytes(server.pid)
        followers = _Child("clients", str(port), str(clients), mode)
        try:
            followers.ask(None, "connected")
            if mode != "idle":
                server.ask("tick", "ticking")
                followers.ask("wait 2", "received")
            else:
                time.sleep(2.0)
            server.ask("snap", "snapped")
            rss = process_rss_bytes(server.pid) - rss0
        finally:
            followers.stop()
    finally:
        server.stop()
    return {"rss_bytes_per_connection": rss / clients}


def _pairs(run: Any, pairs: int) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {"nexus": [], "bare": []}
    for _ in range(pairs):
        for kind in ("nexus", "bare"):
            results[kind].append(run(kind))
    return results


def _median(runs: Sequence[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def compare_delivery_cpu(*, pairs: int = 3, **options: Any) -> dict[str, Any]:
    """Interleaved runs (Nexus, bare) x ``pairs``: median CPU µs per delivery of each and their ratio."""
    runs = _pairs(lambda kind: measure_delivery_cpu(kind, **options), pairs)
    nexus, bare = _median(runs["nexus"], "cpu_us_per_delivery"), _median(runs["bare"], "cpu_us_per_delivery")
    return {
        "nexus_cpu_us_per_delivery": nexus,
        "bare_cpu_us_per_delivery": bare,
        "ratio": nexus / bare,
        "runs": runs,
    }


def compare_connection_memory(*, pairs: int = 1, **options: Any) -> dict[str, Any]:
    """Interleaved runs (Nexus, bare) x ``pairs``: median RSS KB per connection of each and their ratio."""
    runs = _pairs(lambda kind: measure_connection_memory(kind, **options), pairs)
    nexus, bare = _median(runs["nexus"], "rss_bytes_per_connection"), _median(runs["bare"], "rss_bytes_per_connection")
    return {"nexus_kb": nexus / 1024, "bare_kb": bare / 1024, "ratio": nexus / bare, "runs": runs}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cpu = sub.add_parser("cpu")
    cpu.add_argument("--clients", type=int, default=100)
    cpu.add_argument("--events", type=int, default=3_000)
    cpu.add_argument("--per-tick", type=int, default=10)
    cpu.add_argument("--tick-ms", type=float, default=10.0)
    cpu.add_argument("--pairs", type=int, default=3)
    memory = sub.add_parser("memory")
    memory.add_argument("--clients", type=int, default=1_000)
    memory.add_argument("--mode", choices=("idle", "subscribed", "stream"), default="idle")
    memory.add_argument("--pairs", type=int, default=1)
    serve = sub.add_parser("serve")
    serve.add_argument("kind", choices=("nexus", "bare"))
    clients = sub.add_parser("clients")
    clients.add_argument("port", type=int)
    clients.add_argument("count", type=int)
    clients.add_argument("mode", choices=("idle", "subscribed", "stream"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(_server_main(args.kind))
    elif args.command == "clients":
        asyncio.run(_clients_main(args.port, args.count, args.mode))
    elif args.command == "cpu":
        report = compare_delivery_cpu(
            pairs=args.pairs,
            clients=args.clients,
            events=args.events,
            per_tick=args.per_tick,
            tick_s=args.tick_ms / 1000,
        )
        print(json.dumps(report, indent=1))
    else:
        report = compare_connection_memory(pairs=args.pairs, clients=args.clients, mode=args.mode)
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
