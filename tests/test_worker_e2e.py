"""Workers end to end: clients on gRPC, WebSocket and SSE see a worker's streams as an in-process handler's; a
worker killed with SIGKILL loses only what it ran; 1,000 keyed requests over three workers keep per-key order
and spread evenly; a worker comes back after its server restarts; ``nexus worker``'s exit codes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nats_support import free_port
from test_cli import Background, cli_env, start_cli
from test_sse import sse
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol
from worker_handlers import Countdown, Ordered, Slow

from nexus import Event
from nexus.backoff import BackoffPolicy
from nexus.client import NexusClient
from nexus.events import TERMINAL_STATES
from nexus.testing import StreamFollower, TestServer, run_server

GUARD = 20.0
TESTS = Path(__file__).parent
COUNTDOWN = "wdemo:stream_countdown:v1:requested"
FAST_RECONNECT = BackoffPolicy(initial_delay=0.05, max_delay=0.3, healthy_after=1.0)


# --- the same lifecycle on every transport ----------------------------------------------------------------------


async def grpc_lifecycle(nexus: TestServer, event_type: str, payload: dict[str, Any], cancel: bool) -> list[str]:
    follower = StreamFollower(nexus.client.request(event_type, payload))
    if cancel:
        await follower.wait_for(lambda chunks: len(chunks) >= 1)
        await follower.cancel()
    await follower.ended(GUARD)
    return [event.state for event in follower.events]


async def ws_lifecycle(nexus: TestServer, event_type: str, payload: dict[str, Any], cancel: bool) -> list[str]:
    states: list[str] = []
    async with connect(nexus.ws_url, subprotocols=[Subprotocol("nexus.v1")]) as ws:
        assert json.loads(await ws.recv())["type"] == "connection"
        await ws.send(json.dumps({"type": event_type, "payload": payload}))
        async with asyncio.timeout(GUARD):
            published = json.loads(await ws.recv())
            assert published["type"] == "published", published
            while not states or states[-1] not in TERMINAL_STATES:
                frame = json.loads(await ws.recv())
                states.append(frame["type"].rsplit(":", 1)[1])
                if cancel and states[-1] == "stream" and states.count("stream") == 1:
                    await ws.send(json.dumps({"type": "cancel", "correlation_id": published["event_id"]}))
    return states


async def sse_lifecycle(nexus: TestServer, event_type: str, payload: dict[str, Any], cancel: bool) -> list[str]:
    gateway = nexus.server.gateway
    assert gateway is not None
    states: list[str] = []
    service = event_type.split(":", 1)[0]
    async with sse(gateway.port, f"/sse?patterns={service}:>") as client:
        request = await nexus.client.emit(event_type, payload)
        async with asyncio.timeout(GUARD):
            while not states or states[-1] not in TERMINAL_STATES:
                data = (await client.message()).json
                if data.get("metadata", {}).get("correlation_id") != request.event_id:
                    continue
                states.append(data["type"].rsplit(":", 1)[1])
                if cancel and states.count("stream") == 1 and states[-1] == "stream":
                    await nexus.client.cancel(request.event_id)
    return states


TRANSPORTS: dict[str, Callable[..., Any]] = {"grpc": grpc_lifecycle, "ws": ws_lifecycle, "sse": sse_lifecycle}


def shape(states: list[str], *, heartbeats: bool = True) -> list[str]:
    """The states without heartbeats, and (with ``heartbeats``) whether any heartbeat came."""
    shown = [state for state in states if state != "heartbeat"]
    return shown + (["(heartbeats)"] if heartbeats and "heartbeat" in states else [])


@contextlib.asynccontextmanager
async def serving(where: str) -> AsyncIterator[TestServer]:
    """A server with its gateway and 50 ms heartbeats, running the handlers in process or in a worker."""
    handlers = (Countdown(), Slow())
    if where == "in-process":
        async with run_server(*handlers, gateway=True, heartbeat_interval=0.05) as nexus:
            yield nexus
    else:
        async with run_server(gateway=True, heartbeat_interval=0.05) as nexus, nexus.start_worker(*handlers):
            yield nexus


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
async def test_clients_see_a_workers_lifecycles_as_an_in_process_handlers(transport: str) -> None:
    """Success, cancel and timeout reach gRPC, WebSocket and SSE clients with the same events in the same order,
    whether the handler runs in the server or in a worker."""
    run = TRANSPORTS[transport]
    seen: dict[str, list[list[str]]] = {}
    for where in ("in-process", "worker"):
        async with serving(where) as nexus:
            seen[where] = [
                shape(await run(nexus, COUNTDOWN, {"n": 3, "every": 0.06}, False)),
                # Whether a heartbeat comes before the cancel lands is timing: not compared.
                shape(await run(nexus, COUNTDOWN, {"n": 1, "linger": 60}, True), heartbeats=False),
                shape(await run(nexus, "wdemo:stream_slow:v1:requested", {}, False)),
            ]
    assert seen["worker"] == seen["in-process"]
    success, cancelled, timed_out = seen["worker"]
    assert success == ["started", "stream", "stream", "stream", "success", "(heartbeats)"]
    assert cancelled == ["started", "stream", "cancelled"]
    assert timed_out == ["started", "stream", "timeout", "(heartbeats)"]


# --- a worker killed mid-stream -----------------------------------------------------------------------------------


def start_worker_process(tmp_path: Path, address: str, *args: str) -> Background:
    return start_cli(
        tmp_path,
        cli_env(TESTS),
        "worker",
        "--server",
        address,
        "--log-format",
        "json",
        "--handler",
        "worker_handlers:Countdown",
        *args,
    )


async def wait_registered(client: NexusClient, worker: Background, workers: int = 1) -> None:
    """Until the server lists the countdown handler with ``workers`` workers."""
    async with asyncio.timeout(GUARD):
        while True:
            assert worker.process.poll() is None, worker.stderr()
            listed = {item["event_type"]: item for item in await client.handlers()}
            entry = listed.get("wdemo:stream_countdown")
            if entry is not None and entry.get("workers", 0) >= workers:
                return
            await asyncio.sleep(0.05)


def terminals_by_request(events: list[Event]) -> dict[str, list[str]]:
    ended: dict[str, list[str]] = collections.defaultdict(list)
    for event in events:
        if event.state in TERMINAL_STATES:
            ended[event.metadata["correlation_id"]].append(event.state)
    return ended


async def stored(nexus: TestServer, pattern: str) -> list[Event]:
    """Every stored event matching ``pattern``, replayed from the server's bus."""
    subscription = await nexus.bus.subscribe([pattern], since_offset=0, epoch=nexus.bus.epoch)
    events: list[Event] = []
    try:
        while batch := subscription.take_nowait():
            events.extend(batch)
    finally:
        subscription.close()
    return events


async def test_kill_9_fails_what_the_worker_ran_and_hands_on_what_waited(tmp_path: Path) -> None:
    """SIGKILL a worker mid-stream: its stream ends failed/worker_lost within the worker timeout, the requests
    waiting behind it run on the next worker, and the history holds exactly one terminal event per request."""
    async with run_server(worker_timeout_s=1.0, worker_ping_interval_s=0.2, worker_grace_s=30.0) as nexus:
        recorder = await nexus.record("wdemo:>")
        victim = start_worker_process(tmp_path, nexus.address, "--max-in-flight", "1", "--name", "victim")
        try:
            await wait_registered(nexus.client, victim)
            running = StreamFollower(nexus.client.request(COUNTDOWN, {"n": 1000, "every": 0.05}, heartbeats=False))
            await running.wait_for(lambda chunks: len(chunks) >= 2, GUARD)
            waiting = [await nexus.client.emit(COUNTDOWN, {"n": 2}) for _ in range(3)]
            victim.process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            lost = await running.ended(GUARD)
            assert time.monotonic() - killed_at < 1.0 + 1.5
            assert lost.state == "failed"
            assert lost.payload["error"]["type"] == "worker_lost"
            assert all(chunk["worker"] == "victim" for chunk in running.chunks)
        finally:
            victim.process.kill()
            victim.process.wait()
        async with nexus.start_worker(Countdown(), name="heir"):
            await recorder.wait_for(
                lambda events: all(terminals_by_request(events).get(w.event_id) for w in waiting), GUARD
            )
            await asyncio.sleep(0.3)  # a second terminal event would show up by now
        await recorder.stop()
        history = await stored(nexus, "wdemo:>")
        ended = terminals_by_request(history)
        assert ended[lost.metadata["correlation_id"]] == ["failed"]
        assert [ended[w.event_id] for w in waiting] == [["success"]] * 3
        assert all(len(states) == 1 for states in ended.values())
        heirs = {
            e.payload["worker"]
            for e in recorder.events
            if e.state == "stream" and e.correlation_id != lost.correlation_id
        }
        assert heirs == {"heir"}


# --- many keyed requests, three workers ---------------------------------------------------------------------------


async def test_1000_keyed_requests_over_three_workers_keep_order_and_balance() -> None:
    """1,000 requests with 50 ordering keys, published in order: per key they run one at a time in publishing
    order, and each of three workers runs within 20 % of a third of them."""
    async with (
        run_server() as nexus,
        nexus.start_worker(Ordered(), name="w1"),
        nexus.start_worker(Ordered(), name="w2"),
        nexus.start_worker(Ordered(), name="w3"),
    ):
        recorder = await nexus.record("wdemo:ordered:v1:success", "wdemo:ordered:v1:failed")
        requests = [
            Event("wdemo:ordered:v1:requested", {"key": f"k{n % 50}", "seq": n, "sleep": 0.005}) for n in range(1000)
        ]
        summary = await nexus.client.publish_many(requests)
        assert summary.stored == 1000
        done = await recorder.wait_count(1000, timeout=120)
        await recorder.stop()
    assert {event.state for event in done} == {"success"}
    assert len({event.correlation_id for event in done}) == 1000
    by_key: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for event in done:
        by_key[event.payload["key"]].append(event.payload)
    for runs in by_key.values():
        runs.sort(key=lambda run: run["began"])
        assert [run["seq"] for run in runs] == sorted(run["seq"] for run in runs)
        assert all(a["ended"] <= b["began"] for a, b in itertools.pairwise(runs))
    counts = collections.Counter(event.payload["worker"] for event in done)
    assert set(counts) == {"w1", "w2", "w3"}
    assert all(abs(count - 1000 / 3) <= 0.2 * 1000 / 3 for count in counts.values()), counts


# --- reconnection ---------------------------------------------------------------------------------------------


async def test_a_worker_comes_back_after_its_server_restarts() -> None:
    """The server stops and starts again on the same port: the worker registers again by itself and serves."""
    port = free_port()
    async with run_server(grpc_port=port) as first:
        worker_cm = first.start_worker(Countdown(), name="phoenix", backoff=FAST_RECONNECT)
        worker = await worker_cm.__aenter__()
        try:
            assert (await first.client.call(COUNTDOWN, {"n": 1}, heartbeats=False)).state == "success"
            assert worker.connects == 1
        except BaseException:
            await worker_cm.__aexit__(*sys.exc_info())
            raise
    try:
        async with run_server(grpc_port=port) as second:
            await worker.wait_registered(GUARD)
            assert worker.connects == 2
            done = await second.client.call(COUNTDOWN, {"n": 2}, heartbeats=False)
            assert done.state == "success"
    finally:
        await worker_cm.__aexit__(None, None, None)


# --- the command ------------------------------------------------------------------------------------------------


def finish(command: Background) -> int:
    try:
        return command.process.wait(GUARD)
    finally:
        if command.process.poll() is None:
            command.process.kill()
            command.process.wait()


async def test_nexus_worker_exits_0_on_sigterm_after_finishing_what_runs(tmp_path: Path) -> None:
    """SIGTERM mid-stream: the stream still ends success (within the grace), then the worker exits 0."""
    async with run_server() as nexus:
        worker = start_worker_process(tmp_path, nexus.address, "--shutdown-grace", "10")
        try:
            await wait_registered(nexus.client, worker)
            follower = StreamFollower(nexus.client.request(COUNTDOWN, {"n": 6, "every": 0.1}, heartbeats=False))
            await follower.wait_for(lambda chunks: len(chunks) >= 1, GUARD)
            worker.process.send_signal(signal.SIGTERM)
            assert (await follower.ended(GUARD)).state == "success"
            assert len(follower.chunks) == 6
        finally:
            code = await asyncio.to_thread(finish, worker)
        assert code == 0, worker.stderr()


async def test_nexus_worker_exits_1_when_the_server_refuses_it(tmp_path: Path) -> None:
    """A type the server serves in process: the registration is refused, `nexus worker` says why and exits 1."""
    async with run_server(Countdown()) as nexus:
        worker = start_worker_process(tmp_path, nexus.address)
        code = await asyncio.to_thread(finish, worker)
    assert code == 1
    assert "nexus: already_exists:" in worker.stderr()


def test_nexus_worker_exits_2_for_a_handler_that_does_not_load(tmp_path: Path) -> None:
    """A --handler that does not import is a start-up error: one line on stderr, exit code 2, no connection."""
    worker = start_cli(
        tmp_path, cli_env(TESTS), "worker", "--server", f"127.0.0.1:{free_port()}", "--handler", "nope:X"
    )
    assert finish(worker) == 2
    assert "nexus: error:" in worker.stderr()
    assert "nope" in worker.stderr()


def test_nexus_worker_checks_plugin_sections_as_nexus_serve_does(tmp_path: Path) -> None:
    """A misspelt `[handlers.<plugin>]` section in the worker's config file stops `nexus worker` before it connects:
    exit code 2, one line naming the section and the plugin probably meant."""
    config = tmp_path / "worker.toml"
    config.write_text("[handlers.worker_handler]\nn = 1\n")
    args = ["worker", "--server", f"127.0.0.1:{free_port()}", "--handler", "worker_handlers:Countdown"]
    worker = start_cli(tmp_path, cli_env(TESTS), *args, "--config", str(config))
    assert finish(worker) == 2
    assert "nexus: error: [handlers.worker_handler]: no plugin or handler is named" in worker.stderr()
    assert "did you mean 'worker_handlers:Countdown'?" in worker.stderr()
