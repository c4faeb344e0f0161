"""A real ``nexus serve`` process under attack, the clients that attack it, and the canaries that watch it.

- :class:`Served` runs ``nexus serve`` (memory bus or NATS) as a subprocess, so SIGTERM is a real signal and its
  exit is timed.
- :class:`ClientLoop` is an asyncio loop in a thread: synchronous tests (hypothesis draws its inputs up front)
  hand it coroutines that drive many inputs concurrently over a few long-lived connections.
- Canaries subscribe to ``>`` before an attack starts, on gRPC (``SubscribeEvents`` and
  ``SubscribeEventBatches``), WebSocket and SSE, and record every stored event's offset while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
import pytest
from nats_support import delete_stream, shared_nats_url, unique_names
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from nexus.v1 import nexus_pb2, nexus_pb2_grpc

T = TypeVar("T")
GUARD: Final = 30.0
"""Seconds an awaited condition may take before the test fails (a guard, not a measurement)."""
SERVICE: Final = "/nexus.v1.NexusService/"
CLEAN_STATUS: Final = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
"""What a gRPC call may end with, whatever it was sent: a success or a clean refusal (a forged lifecycle state of
a handled type, another client's event_id)."""
CLEAN_SSE_STATUS: Final = frozenset({200, 400, 401, 405})
MAX_MESSAGE: Final = 600
"""Longest error message (status details, error frame, SSE refusal) a client should ever get."""
STOP_WITHIN_S: Final = 2.0

HANDLER_MODULE: Final = "nexus_fuzz_handlers"
HANDLER_SOURCE: Final = textwrap.dedent(
    """
    from nexus import Event, EventHandler, Stream, StreamingEventHandler


    class Echo(EventHandler):
        event_type = "fuzz:echo"

        async def handle(self, event: Event) -> dict:
            return {"keys": len(event.payload)}


    class Short(StreamingEventHandler):
        event_type = "fuzz:stream_short"

        async def handle_stream(self, event: Event, stream: Stream) -> None:
            await stream.send({"i": 0})
            await stream.send({"i": 1})
    """
)
RAISED_LIMITS: Final = (
    "--publish-rate-per-s",
    "1000000",
    "--publish-burst",
    "1000000",
    "--max-requests-per-connection",
    "100000",
    "--max-subscriptions-per-connection",
    "100000",
    "--max-patterns-per-connection",
    "10000000",
    "--ws-max-frame-bytes",
    str(8 * 1024 * 1024),
)
"""Limits that would only throttle the fuzz (one connection sends thousands of inputs a second); the per-event and
per-subscription limits stay at their defaults."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


@dataclasses.dataclass
class Served:
    """A running ``nexus serve`` process."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    ws_port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @classmethod
    def start(cls, directory: Path, *args: str) -> Served:
        """Start ``nexus serve ARGS`` with the fuzz handlers and JSON logs; wait until both ports accept."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{HANDLER_MODULE}.py").write_text(HANDLER_SOURCE)
        env = {key: value for key, value in os.environ.items() if not key.startswith("NEXUS_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(directory), env.get("PYTHONPATH", "")) if p)
        grpc_port, ws_port = free_port(), free_port()
        log_path = directory / "serve.log"
        command = [
            sys.executable,
            "-m",
            "nexus.cli",
            "serve",
            "--grpc-port",
            str(grpc_port),
            "--ws-port",
            str(ws_port),
            "--no-entry-points",
            "--handler",
            f"{HANDLER_MODULE}:Echo",
            "--handler",
            f"{HANDLER_MODULE}:Short",
            "--log-format",
            "json",
            *args,
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=directory)
        served = cls(process, grpc_port, ws_port, log_path)
        deadline = time.monotonic() + GUARD
        while not (_listening(grpc_port) and _listening(ws_port)):
            if process.poll() is not None:
                pytest.fail(f"nexus serve exited with {process.returncode}: {log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                served.kill()
                pytest.fail(f"nexus serve did not listen within {GUARD}s: {log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        return served

    def sigterm(self) -> tuple[float, int]:
        """Send SIGTERM; return the seconds until the process exited and its exit code."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(GUARD)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"nexus serve did not exit within {GUARD}s of SIGTERM")
        return time.monotonic() - started, code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def bad_log_lines(self) -> list[str]:
        """Log lines at error level or above, tracebacks and lines that are not JSON (a crash's output)."""
        bad = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                bad.append(line)
                continue
            if (
                not isinstance(record, dict)
                or record.get("level") in ("error", "critical", "exception")
                or "exception" in record
                or "exc_info" in record
            ):
                bad.append(line)
        return bad


class ClientLoop:
    """An asyncio event loop in a daemon thread, for synchronous tests to run coroutines on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-clients", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_rest(), 10.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10.0)
        self.loop.close()


async def drive(items: Iterable[T], send: Callable[[T], Awaitable[str | None]], concurrency: int) -> list[str]:
    """``send`` every item, ``concurrency`` at a time; return the problems reported (None: a clean answer)."""
    iterator = iter(items)
    problems: list[str] = []

    async def worker() -> None:
        for item in iterator:
            problem = await send(item)
            if problem is not None:
                problems.append(problem)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return problems


def shown(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# --- canaries -----------------------------------------------------------------------------------------------------


class Canary:
    """A subscriber to ``>`` recording the offsets of the stored events it receives, and how it ended."""

    name = "canary"

    def __init__(self) -> None:
        self.offsets: list[int] = []
        self.ended: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def _got(self, offset: int) -> None:
        if offset:
            self.offsets.append(offset)
            self._changed.set()

    async def start(self) -> None:
        """Subscribe; return once the subscription is live."""
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._guarded(ready))
        await asyncio.wait_for(asyncio.shield(ready), GUARD)

    async def _guarded(self, ready: asyncio.Future[None]) -> None:
        try:
            await self.run(ready)
            self.ended = "the stream ended"
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.ended = f"{type(exc).__name__}: {shown(str(exc))}"
            if not ready.done():
                ready.set_exception(exc)
        finally:
            self._changed.set()

    async def run(self, ready: asyncio.Future[None]) -> None:
        raise NotImplementedError

    async def wait_for(self, offset: int, timeout: float = GUARD) -> None:
        """Wait until ``offset`` arrived; fail if the canary stopped first."""
        async with asyncio.timeout(timeout):
            while offset not in self.offsets[-200:] and offset not in self.offsets:
                if self.ended is not None:
                    raise AssertionError(f"{self.name} stopped before offset {offset}: {self.ended}")
                self._changed.clear()
                await self._changed.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class GrpcCanary(Canary):
    def __init__(self, address: str, *, batches: bool) -> None:
        super().__init__()
        self.address = address
        self.batches = batches
        self.name = "gRPC SubscribeEventBatches" if batches else "gRPC SubscribeEvents"

    async def run(self, ready: asyncio.Future[None]) -> None:
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        async with grpc.aio.insecure_channel(self.address, options=options) as channel:
            stub = nexus_pb2_grpc.NexusServiceStub(channel)
            if self.batches:
                call: Any = stub.SubscribeEventBatches(nexus_pb2.SubscribeEventBatchesRequest(event_types=[">"]))
            else:
                call = stub.SubscribeEvents(nexus_pb2.SubscribeRequest(event_types=[">"]))
            await call.initial_metadata()
            ready.set_result(None)
            async for reply in call:
                for event in reply.events if self.batches else [reply]:
                    self._got(event.offset)


class WsCanary(Canary):
    name = "WebSocket"

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.close_code: int | None = None

    async def run(self, ready: asyncio.Future[None]) -> None:
        url = f"ws://127.0.0.1:{self.port}/ws"
        async with connect(url, subprotocols=[Subprotocol("nexus.v1")], max_size=None) as ws:
            await ws.send(json.dumps({"type": "subscribe", "event_types": [">"]}))
            try:
                async for message in ws:
                    frame = json.loads(message)
                    if frame.get("type") == "subscribed":
                        ready.set_result(None)
                    elif isinstance(frame.get("offset"), int) and ":" in frame.get("type", ""):
                        self._got(frame["offset"])
            finally:
                self.close_code = ws.close_code


class SseCanary(Canary):
    name = "SSE"

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    async def run(self, ready: asyncio.Future[None]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=64 * 1024 * 1024)
        try:
            writer.write(f"GET /sse?patterns=%3E HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode())
            status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 200 "), status
            while await reader.readline() not in (b"\r\n", b""):
                pass
            while line := await reader.readline():
                if not line.startswith(b"data: "):
                    continue
                frame = json.loads(line[6:])
                if frame.get("type") == "subscribed":
                    ready.set_result(None)
                elif frame.get("type") == "error":
                    raise AssertionError(f"the SSE stream ended with {frame}")
                elif isinstance(frame.get("offset"), int):
                    self._got(frame["offset"])
        finally:
            writer.close()


async def start_canaries(served: Served) -> list[Canary]:
    canaries: list[Canary] = [
        GrpcCanary(served.address, batches=False),
        GrpcCanary(served.address, batches=True),
        WsCanary(served.ws_port),
        SseCanary(served.ws_port),
    ]
    for canary in canaries:
        await canary.start()
    return canaries


async def emit_markers(served: Served, count: int) -> list[int]:
    """Publish ``count`` valid events (gRPC EmitEvent, one at a time) after an attack; their offsets."""
    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = nexus_pb2_grpc.NexusServiceStub(channel)
        offsets = []
        for n in range(count):
            request = nexus_pb2.EventRequest(event_type="fuzz:marker:v1:made", event_id=f"marker-{time.time_ns()}-{n}")
            reply = await asyncio.wait_for(stub.EmitEvent(request), GUARD)
            offsets.append(reply.offset)
    return offsets


async def check_canaries(canaries: Sequence[Canary], markers: list[int]) -> None:
    """Every canary is still subscribed, received its events in offset order, and got every marker exactly, in
    order, with nothing else stored after the first."""
    for canary in canaries:
        await canary.wait_for(markers[-1])
    for canary in canaries:
        assert canary.ended is None, f"{canary.name} stopped: {canary.ended}"
        assert canary.offsets == sorted(set(canary.offsets)), f"{canary.name} received offsets out of order"
        tail = [offset for offset in canary.offsets if offset >= markers[0]]
        assert tail == markers, f"{canary.name} received {tail[:20]} after the attack, not {markers}"


@contextlib.asynccontextmanager
async def ws_client(port: int) -> Any:
    url = f"ws://127.0.0.1:{port}/ws"
    async with connect(url, subprotocols=[Subprotocol("nexus.v1")], max_size=None, ping_interval=None) as ws:
        yield ws


# --- the server under attack, with its canaries ---------------------------------------------------------------


@dataclasses.dataclass
class Target:
    bus: str
    served: Served
    clients: ClientLoop
    canaries: list[Canary]


@contextlib.contextmanager
def target_server(bus: str, directory: Path, *limits: str) -> Iterator[Target]:
    """``nexus serve`` on ``bus`` (``memory`` or ``nats``, on a stream of its own) with canaries subscribed."""
    args: list[str] = [*limits]
    url = stream = ""
    if bus == "nats":
        url = shared_nats_url()
        stream, prefix = unique_names("fuzz")
        args += ["--bus", url, "--nats-stream", stream, "--nats-subject-prefix", prefix, "--nats-storage", "memory"]
    served = Served.start(directory, *args)
    clients = ClientLoop()
    try:
        canaries = clients.run(start_canaries(served), GUARD)
        yield Target(bus, served, clients, canaries)
    finally:
        with contextlib.suppress(Exception):
            clients.run(stop_canaries(canaries), GUARD)
        clients.close()
        served.kill()
        if stream:
            asyncio.run(delete_stream(url, stream))


async def stop_canaries(canaries: list[Canary]) -> None:
    for canary in canaries:
        await canary.stop()


def finish(target: Target, markers: int = 20) -> None:
    """Canaries get every later event in order; no error was logged; SIGTERM stops the server within 2 s."""
    offsets = target.clients.run(emit_markers(target.served, markers))
    target.clients.run(check_canaries(target.canaries, offsets))
    bad = target.served.bad_log_lines()
    assert not bad, f"{len(bad)} log lines at error level or not JSON, for example:\n" + "\n".join(
        shown(line, 400) for line in bad[:5]
    )
    seconds, code = target.served.sigterm()
    assert code == 0
    assert seconds < STOP_WITHIN_S, f"nexus serve took {seconds:.2f}s to stop after SIGTERM"
