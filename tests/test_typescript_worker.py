"""The TypeScript worker (``examples/typescript-worker/``) against a real server: built from ``protos/`` with
``tsc``, run with ``node``, it serves ``demo:stream_ticks`` and ``demo:shout`` over WorkerService, and clients on
gRPC, WebSocket and SSE see the lifecycle an in-process handler gives them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from node_support import REPO, node_with
from test_gateway import is_terminal, peer, states
from test_sse import Message, sse

from nexus import Event, Stream, StreamingEventHandler
from nexus.auth import mint_token
from nexus.client import NexusClient
from nexus.testing import StreamFollower, TestServer, run_server

EXAMPLE = REPO / "examples" / "typescript-worker"
NODE_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader", "typescript", "@types/node")
GUARD = 15.0
"""Seconds any awaited condition may take before the test fails (a guard, not a measurement)."""
TERMINAL = ("success", "failed", "timeout", "cancelled")

# Fast worker liveness for the tests: a silent worker is lost after a second.
WORKER_SETTINGS: dict[str, Any] = {
    "heartbeat_interval": 0.05,
    "worker_ping_interval_s": 0.2,
    "worker_timeout_s": 1.0,
    "worker_grace_s": 1.0,
}


class PyTicks(StreamingEventHandler):
    """In process, what demo:stream_ticks does in the worker: ``n`` chunks ``{"tick": i, "of": n}``."""

    event_type = "demo:stream_pyticks"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        n = int(event.payload.get("n", 5))
        every = float(event.payload.get("every_s", 0.1))
        for tick in range(n):
            if tick and every:
                await asyncio.sleep(every)
            await stream.send({"tick": tick, "of": n})


@pytest.fixture(scope="session")
def worker_command() -> list[str]:
    """``node main.js --protos protos/`` once the example compiled (as its README builds it)."""
    node = node_with(*NODE_PACKAGES)
    built = subprocess.run(
        [node, str(REPO / "node_modules" / "typescript" / "bin" / "tsc"), "-p", str(EXAMPLE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, f"tsc failed:\n{built.stdout}\n{built.stderr}"
    return [node, str(EXAMPLE / "build" / "main.js"), "--protos", str(REPO / "protos")]


class WorkerProcess:
    """A running TypeScript worker; its stderr log lines (JSON objects) are collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.logs: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = {"event": "text", "text": line}
            self.logs.append(record if isinstance(record, dict) else {"event": "text", "text": line})
            self._changed.set()
        self._changed.set()

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """The log records named ``event`` whose fields include ``fields``."""
        return [r for r in self.logs if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())]

    async def wait_log(self, event: str, count: int = 1, **fields: Any) -> list[dict[str, Any]]:
        """Wait until ``count`` records named ``event`` (with ``fields``) were logged."""
        async with asyncio.timeout(GUARD):
            while len(found := self.logged(event, **fields)) < count:
                if self._reader.done():
                    raise AssertionError(f"the worker exited before logging {event} {fields}: {self.text()}")
                self._changed.clear()
                await self._changed.wait()
        return found

    async def exit_code(self) -> int:
        async with asyncio.timeout(GUARD):
            code = await self.process.wait()
            await self._reader
        return code

    def text(self) -> str:
        return "\n".join(json.dumps(r) for r in self.logs[-30:])

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        await self._reader


@contextlib.asynccontextmanager
async def typescript_worker(
    command: list[str], address: str, *args: str, registered: bool = True, env: dict[str, str] | None = None
) -> AsyncIterator[WorkerProcess]:
    """The example worker serving the server at ``address`` (``env`` added to its environment); once
    ``registered`` (unless told not to wait)."""
    process = await asyncio.create_subprocess_exec(
        *command,
        "--server",
        address,
        *args,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    worker = WorkerProcess(process)
    try:
        if registered:
            await worker.wait_log("registered")
        yield worker
    finally:
        await worker.close()


@pytest.fixture
async def nexus() -> AsyncIterator[TestServer]:
    """A server with its gateway, 50 ms heartbeats, fast worker liveness and the in-process twin of the worker's
    stream."""
    async with run_server(PyTicks(), gateway=True, **WORKER_SETTINGS) as server:
        yield server


def lifecycle(events: list[Event]) -> list[str]:
    """The states of ``events`` without heartbeats."""
    return [e.state for e in events if e.state != "heartbeat"]


def terminals(events: list[Event], correlation_id: str) -> list[Event]:
    return [e for e in events if e.state in TERMINAL and e.metadata.get("correlation_id") == correlation_id]


async def wait_until(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + GUARD
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


# --- the same lifecycle as in process -------------------------------------------------------------------------


async def test_a_grpc_requester_sees_the_same_lifecycle_as_from_an_in_process_handler(
    nexus: TestServer, worker_command: list[str]
) -> None:
    """started, every chunk in order, heartbeats while it streams, then success with the chunk count: from the
    worker exactly as from the in-process twin, each lifecycle event tied to the request."""
    async with typescript_worker(worker_command, nexus.address):
        payload = {"n": 6, "every_s": 0.05}
        remote = nexus.client.request("demo:stream_ticks:v1:requested", payload)
        remote_events = [e async for e in remote]
        local = nexus.client.request("demo:stream_pyticks:v1:requested", payload)
        local_events = [e async for e in local]

    for stream, events in ((remote, remote_events), (local, local_events)):
        assert lifecycle(events) == ["started"] + ["stream"] * 6 + ["success"]
        assert [e.payload for e in events if e.state == "stream"] == [{"tick": i, "of": 6} for i in range(6)]
        assert all(e.metadata["correlation_id"] == stream.correlation_id for e in events)
        assert events[-1].payload["stream_count"] == 6
        assert any(e.state == "heartbeat" for e in events), "a 0.25 s stream gets heartbeats every 50 ms"
        stored = [e.offset for e in events if e.state != "heartbeat"]
        assert stored == sorted(stored)
        assert len(set(stored)) == len(stored)


async def test_a_websocket_requester_sees_the_same_lifecycle_as_from_an_in_process_handler(
    nexus: TestServer, worker_command: list[str]
) -> None:
    """Over the gateway a request to the worker brings back `published`, started, the chunks in order, heartbeats
    and success, as the in-process twin's does."""
    async with typescript_worker(worker_command, nexus.address), peer(nexus.ws_url) as client:
        seen: dict[str, list[dict[str, Any]]] = {}
        for event_type in ("demo:stream_ticks", "demo:stream_pyticks"):
            await client.send(type=f"{event_type}:v1:requested", payload={"n": 4, "every_s": 0.05}, event_id=event_type)
            seen[event_type] = await client.until(is_terminal)

    for event_id, frames in seen.items():
        assert frames[0]["type"] == "published"
        assert frames[0]["event_id"] == event_id
        assert states(frames[1:]) == ["started", "stream", "stream", "stream", "stream", "success"]
        assert "heartbeat" in states(frames[1:], heartbeats=True)
        events = [f for f in frames[1:] if not f["type"].endswith(":heartbeat")]
        assert all(f["metadata"]["correlation_id"] == event_id for f in events)
        assert [f["payload"] for f in events if f["type"].endswith(":stream")] == [
            {"tick": i, "of": 4} for i in range(4)
        ]


async def test_a_stream_far_longer_than_its_credit_arrives_whole_and_in_order(
    nexus: TestServer, worker_command: list[str]
) -> None:
    """2,000 chunks sent as fast as the worker may through a one-chunk buffer: it waits for credit before each
    (the server would fail a stream sent over it), so every chunk arrives, once, in order, and it ends success."""
    async with typescript_worker(worker_command, nexus.address, "--buffer-size", "1") as worker:
        done = [
            e
            async for e in nexus.client.request(
                "demo:stream_ticks:v1:requested", {"n": 2000, "every_s": 0}, heartbeats=False
            )
        ]
        assert not worker.logged("refused")
    assert [e.payload["tick"] for e in done if e.state == "stream"] == list(range(2000))
    assert (done[-1].state, done[-1].payload["stream_count"]) == ("success", 2000)


async def test_an_sse_subscriber_sees_the_same_lifecycle_as_from_an_in_process_handler(
    nexus: TestServer, worker_command: list[str]
) -> None:
    """An EventSource-style subscriber to demo:> sees the worker's request, started, chunks, heartbeats (without
    an id) and success, in the order the in-process twin's come."""
    gateway = nexus.server.gateway
    assert gateway is not None
    async with (
        typescript_worker(worker_command, nexus.address),
        sse(gateway.port, "/sse?patterns=demo:stream_ticks:>,demo:stream_pyticks:>") as client,
    ):
        await client.message()  # subscribed
        seen: dict[str, list[dict[str, Any]]] = {}
        for event_type in ("demo:stream_ticks", "demo:stream_pyticks"):
            await nexus.client.emit(f"{event_type}:v1:requested", {"n": 3, "every_s": 0.06})
            messages: list[Message] = []
            while not messages or messages[-1].json["type"] != f"{event_type}:v1:success":
                messages.append(await client.message())
            seen[event_type] = [m.json for m in messages]
            heartbeats = [m for m in messages if m.json["type"].endswith(":heartbeat")]
            assert heartbeats
            assert all(m.id is None for m in heartbeats)

    for event_type, frames in seen.items():
        assert states(frames) == ["requested", "started", "stream", "stream", "stream", "success"]
        request_id = frames[0]["event_id"]
        assert all(
            f["metadata"]["correlation_id"] == request_id for f in frames[1:] if not f["type"].endswith(":heartbeat")
        )
        assert [f["payload"] for f in frames if f["type"].endswith(":stream")] == [
            {"tick": i, "of": 3} for i in range(3)
        ], event_type


async def test_the_plain_handler_answers_success_with_its_result_or_fails_on_a_bad_payload(
    nexus: TestServer, worker_command: list[str]
) -> None:
    """demo:shout returns its result as the success payload; a payload it cannot use ends `failed` with
    error.type invalid_payload and the handler's message."""
    async with typescript_worker(worker_command, nexus.address):
        done = await nexus.client.call("demo:shout:v1:requested", {"text": "héllo"})
        assert (done.state, done.payload) == ("success", {"text": "HÉLLO", "length": 5})
        failed = await nexus.client.call("demo:shout:v1:requested", {"text": 3})
        assert failed.state == "failed"
        assert failed.payload["error"] == {"type": "invalid_payload", "message": "text must be a string"}


# --- timeouts, cancels, a killed worker ------------------------------------------------------------------------


async def test_a_stream_over_its_timeout_ends_timeout_and_the_worker_is_told(
    nexus: TestServer, worker_command: list[str]
) -> None:
    """With --stream-timeout 0.5 a long stream ends `timeout`; the worker gets the cancel for it and stops."""
    async with typescript_worker(worker_command, nexus.address, "--stream-timeout", "0.5") as worker:
        ticks = StreamFollower(nexus.client.request("demo:stream_ticks:v1:requested", {"n": 1000, "every_s": 0.05}))
        request = await ticks.started()
        terminal = await ticks.ended()
        assert terminal.state == "timeout"
        assert 0 < len(ticks.chunks) < 1000
        await worker.wait_log("cancel", correlation_id=request.metadata["correlation_id"])
        # The slot was freed: the next request runs at once.
        async with asyncio.timeout(GUARD):
            done = await nexus.client.call("demo:stream_ticks:v1:requested", {"n": 2, "every_s": 0})
        assert done.state == "success"


async def test_a_cancel_ends_cancelled_and_the_worker_sees_it_and_frees_the_slot(
    nexus: TestServer, worker_command: list[str]
) -> None:
    """A requester's cancel ends the stream `cancelled` once; the worker logs the cancel with its reason, stops
    sending, and (one slot) runs the next request."""
    recorder = await nexus.record("demo:stream_ticks:>")
    async with typescript_worker(worker_command, nexus.address, "--max-in-flight", "1") as worker:
        ticks = StreamFollower(nexus.client.request("demo:stream_ticks:v1:requested", {"n": 1000, "every_s": 0.05}))
        request = await ticks.started()
        await ticks.wait_for(lambda chunks: len(chunks) >= 2)
        terminal = await ticks.cancel("enough")
        assert (terminal.state, terminal.payload["reason"]) == ("cancelled", "enough")
        correlation_id = request.metadata["correlation_id"]
        [cancel] = await worker.wait_log("cancel", correlation_id=correlation_id)
        assert cancel["reason"] == "enough"
        async with asyncio.timeout(GUARD):
            done = await nexus.client.call("demo:stream_ticks:v1:requested", {"n": 2, "every_s": 0})
        assert done.state == "success"
    events = await recorder.wait_for(lambda events: len(terminals(events, done.metadata["correlation_id"])) == 1)
    await recorder.stop()
    assert [e.state for e in terminals(events, correlation_id)] == ["cancelled"]
    chunks_after = [
        e
        for e in events
        if e.state == "stream" and e.metadata.get("correlation_id") == correlation_id and e.offset > terminal.offset
    ]
    assert chunks_after == []


async def test_a_cancel_frame_over_the_gateway_reaches_the_worker(nexus: TestServer, worker_command: list[str]) -> None:
    """A WebSocket requester's cancel frame ends the worker's stream `cancelled` with its reason, and the worker
    gets the cancel."""
    async with typescript_worker(worker_command, nexus.address) as worker, peer(nexus.ws_url) as client:
        await client.send(type="demo:stream_ticks:v1:requested", payload={"n": 1000, "every_s": 0.05}, event_id="ws-1")
        await client.until(lambda f: f["type"].endswith(":stream"))
        await client.send(type="cancel", correlation_id="ws-1", reason="from the page")
        frames = await client.until(is_terminal)
        assert frames[-1]["type"] == "demo:stream_ticks:v1:cancelled"
        assert frames[-1]["payload"]["reason"] == "from the page"
        [cancel] = await worker.wait_log("cancel", correlation_id="ws-1")
        assert cancel["reason"] == "from the page"


async def test_a_worker_killed_mid_stream_fails_its_requests_worker_lost_once(
    nexus: TestServer, worker_command: list[str]
) -> None:
    """kill -9 of the node process: both of its running streams end `failed` with error.type worker_lost within
    the worker timeout, each exactly once, and the in-process stream beside them ends `success`."""
    recorder = await nexus.record("demo:>")
    async with typescript_worker(worker_command, nexus.address, "--max-in-flight", "2") as worker:
        remote = [
            StreamFollower(nexus.client.request("demo:stream_ticks:v1:requested", {"n": 1000, "every_s": 0.05}))
            for _ in range(2)
        ]
        local = StreamFollower(nexus.client.request("demo:stream_pyticks:v1:requested", {"n": 30, "every_s": 0.05}))
        for follower in remote:
            await follower.wait_for(lambda chunks: len(chunks) >= 2)
        worker.process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        ends = [await follower.ended() for follower in remote]
        waited = time.monotonic() - killed_at
        assert [e.state for e in ends] == ["failed", "failed"]
        assert all(e.payload["error"]["type"] == "worker_lost" for e in ends)
        assert waited < WORKER_SETTINGS["worker_timeout_s"] + 1.0
        assert (await local.ended()).state == "success"
        assert await worker.exit_code() == -signal.SIGKILL
    events = await recorder.wait_for(lambda events: sum(e.state in TERMINAL for e in events) == 3)
    await asyncio.sleep(0.5)  # anything that would end twice has had time to
    await recorder.stop()
    for follower in [*remote, local]:
        request_id = (await follower.started()).metadata["correlation_id"]
        assert len(terminals(events, request_id)) == 1


# --- the worker process ----------------------------------------------------------------------------------------


async def test_sigterm_drains_the_worker_lets_its_stream_finish_and_exits_0(
    nexus: TestServer, worker_command: list[str]
) -> None:
    """A SIGTERM mid-stream: the worker takes no new request (another worker serves the next one), its stream
    still ends `success` with every chunk, then it exits 0."""
    async with (
        typescript_worker(worker_command, nexus.address, "--max-in-flight", "4", "--name", "stopping") as stopping,
        typescript_worker(worker_command, nexus.address, "--name", "staying") as staying,
    ):
        ticks = StreamFollower(nexus.client.request("demo:stream_ticks:v1:requested", {"n": 40, "every_s": 0.05}))
        request = await ticks.started()
        await ticks.wait_for(lambda chunks: len(chunks) >= 2)
        # Requests go to the worker with the most free slots: the stream runs on the one about to stop.
        assert stopping.logged("request_started", correlation_id=request.metadata["correlation_id"])
        stopping.process.send_signal(signal.SIGTERM)
        await stopping.wait_log("worker_stopping")
        async with asyncio.timeout(GUARD):
            later = await nexus.client.call("demo:stream_ticks:v1:requested", {"n": 2, "every_s": 0})
        assert later.state == "success"
        assert not ticks.done, "the next request was served at once, not after the stopping worker let go"
        correlation_id = later.metadata["correlation_id"]
        assert staying.logged("ticks_sent", correlation_id=correlation_id)
        assert not stopping.logged("ticks_sent", correlation_id=correlation_id)
        terminal = await ticks.ended()
        assert terminal.state == "success"
        assert ticks.chunks == [{"tick": i, "of": 40} for i in range(40)]
        assert await stopping.exit_code() == 0
        assert stopping.logged("worker_stopped")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_the_worker_waits_for_the_server_and_reconnects_when_it_comes_back(worker_command: list[str]) -> None:
    """Started before any server, the worker registers once one listens; when that server goes away and another
    starts on the same port, it registers again by itself and serves it."""
    port = _free_port()
    async with typescript_worker(worker_command, f"127.0.0.1:{port}", registered=False) as worker:
        async with run_server(grpc_port=port, **WORKER_SETTINGS) as first:
            await worker.wait_log("registered")
            done = await first.client.call("demo:shout:v1:requested", {"text": "one"})
            assert done.payload == {"text": "ONE", "length": 3}
        await worker.wait_log("reconnecting", count=len(worker.logged("reconnecting")) + 1)
        async with run_server(grpc_port=port, **WORKER_SETTINGS) as second:
            await worker.wait_log("registered", count=2)
            done = await second.client.call("demo:shout:v1:requested", {"text": "back"})
            assert (done.state, done.payload) == ("success", {"text": "BACK", "length": 4})


async def test_a_refused_registration_exits_1_with_the_servers_reason(worker_command: list[str]) -> None:
    """A server whose in-process handler already serves demo:stream_ticks refuses the worker (ALREADY_EXISTS):
    the worker says so and exits 1 instead of retrying."""

    class Ticks(PyTicks):
        event_type = "demo:stream_ticks"

    async with (
        run_server(Ticks(), **WORKER_SETTINGS) as server,
        typescript_worker(worker_command, server.address, registered=False) as worker,
    ):
        assert await worker.exit_code() == 1
        [refused] = worker.logged("registration_refused")
        assert refused["code"] == "ALREADY_EXISTS"
        assert not worker.logged("reconnecting")


async def test_with_authentication_the_workers_token_must_allow_serving_each_type(worker_command: list[str]) -> None:
    """On a server with authentication, a worker without a token, or with one whose serve claim leaves out
    demo:shout, is refused and exits 1; with serve ["demo:>"] (from $NEXUS_TOKEN) it serves a client's request."""
    secret = "typescript-worker-test-secret-of-32-bytes"
    async with run_server(jwt_secret=secret, **WORKER_SETTINGS) as server:
        ticks_only = mint_token(secret, "ticks-only", serve=["demo:stream_ticks:>"])
        for token, code in (("", "UNAUTHENTICATED"), (ticks_only, "PERMISSION_DENIED")):
            async with typescript_worker(
                worker_command, server.address, registered=False, env={"NEXUS_TOKEN": token}
            ) as worker:
                assert await worker.exit_code() == 1
                [refused] = worker.logged("registration_refused")
                assert refused["code"] == code
        assert "demo:shout" in refused["details"]
        serving = mint_token(secret, "worker", serve=["demo:>"])
        requester = mint_token(secret, "alice", publish=["demo:>"], subscribe=["demo:>"])
        async with (
            typescript_worker(worker_command, server.address, env={"NEXUS_TOKEN": serving}),
            NexusClient(server.address, token=requester) as alice,
        ):
            async with asyncio.timeout(GUARD):
                done = await alice.call("demo:shout:v1:requested", {"text": "ok"})
            assert (done.state, done.payload) == ("success", {"text": "OK", "length": 2})


def test_bad_options_exit_2_with_a_message(worker_command: list[str]) -> None:
    """An option the worker cannot use is refused before it connects, naming the option."""
    for args, message in (
        (["--max-in-flight", "0"], "--max-in-flight must be a whole number from 1 to 10000"),
        (["--stream-timeout", "soon"], "--stream-timeout must be a number of seconds"),
        (["--server", "nowhere"], "--server must be HOST:PORT"),
        (["--protos", str(REPO)], "no nexus/v1/nexus.proto under"),
    ):
        result = subprocess.run(
            [*worker_command, *args], capture_output=True, text=True, timeout=30, check=False, env=dict(os.environ)
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
