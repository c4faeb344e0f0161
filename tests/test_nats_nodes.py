"""Several Nexus nodes on one NATS JetStream bus (issue 5's acceptance list), against real nats-server processes.

Nodes run in this process (``NexusServer`` with ``--bus nats://...``), or as ``python -m nexus.cli serve``
subprocesses when a test must SIGKILL one. Tests on the shared NATS server use their own stream and subject
prefix; the ones that restart, kill or cluster NATS servers start their own on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats_support import (
    GUARD,
    Hold,
    NatsProcess,
    delete_stream,
    free_port,
    nats_server_binary,
    nats_settings,
    peers,
    shared_nats_url,
    stored_history,
    stream_leader,
    stream_led_by_another,
    stream_replicated,
    unique_names,
    until,
    wait_for_jetstream,
)

from nexus import Event, EventHandler, Stream, StreamingEventHandler
from nexus.client import NexusClient
from nexus.config import Settings
from nexus.errors import Unavailable
from nexus.events import TERMINAL_STATES
from nexus.testing import Recorder, TestServer, run_server

pytestmark = pytest.mark.nats

HANDLER_MODULE = "nexus_nats_node_handlers"
HANDLER_SOURCE = textwrap.dedent(
    """
    import asyncio

    from nexus import Event, EventHandler, Stream, StreamingEventHandler


    class Ticker(StreamingEventHandler):
        event_type = "nodes:stream_ticks"
        stream_timeout = None

        async def handle_stream(self, event: Event, stream: Stream) -> None:
            n = 0
            while True:
                await stream.send({"i": n})
                n += 1
                await asyncio.sleep(0.05)


    class Echo(EventHandler):
        event_type = "nodes:echo"

        async def handle(self, event: Event) -> dict:
            return {"echo": event.payload, "node": "subprocess"}
    """
)


# --- handlers for nodes in this process ---------------------------------------------------------------------


class Countdown(StreamingEventHandler):
    """Sends ``n`` chunks; remembers which requests this node drove."""

    event_type = "nodes:stream_countdown"

    def __init__(self) -> None:
        self.driven: list[str] = []

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        self.driven.append(event.event_id)
        for i in range(int(event.payload["n"])):
            await stream.send({"i": i})
            await asyncio.sleep(0.01)


class Echo(EventHandler):
    event_type = "nodes:echo"

    def __init__(self, name: str = "") -> None:
        self.name = name

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"echo": event.payload, "node": self.name}


@dataclasses.dataclass
class Run:
    key: str
    n: int
    offset: int
    node: str
    start: int
    end: int = 0


class Keyed(EventHandler):
    """An ordered handler: records when each request ran, on a clock shared by every node of the test."""

    event_type = "nodes:keyed"
    ordering_key = "agent_id"

    def __init__(self, node: str, runs: list[Run], clock: list[int]) -> None:
        self.node = node
        self.runs = runs
        self.clock = clock

    def _tick(self) -> int:
        self.clock[0] += 1
        return self.clock[0]

    async def handle(self, event: Event) -> dict[str, Any]:
        run = Run(str(event.payload["agent_id"]), int(event.payload["n"]), event.offset, self.node, self._tick())
        self.runs.append(run)
        await asyncio.sleep(0.005 * (run.n % 3))
        run.end = self._tick()
        return {}


# --- helpers ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Cluster:
    """The NATS side of a test: where the nodes connect, and the stream they share."""

    url: str
    stream: str
    prefix: str

    def settings(self, **overrides: Any) -> Settings:
        return nats_settings(self.url, self.stream, self.prefix, heartbeat_interval=0.1, **overrides)


@pytest.fixture
async def shared() -> AsyncIterator[Cluster]:
    """A stream of its own on the shared NATS server, deleted afterwards."""
    url = shared_nats_url()
    stream, prefix = unique_names("nodes")
    try:
        yield Cluster(url, stream, prefix)
    finally:
        await delete_stream(url, stream)


@asynccontextmanager
async def node(cluster: Cluster, *handlers: Any, **overrides: Any) -> AsyncIterator[TestServer]:
    """A Nexus node in this process on the cluster's bus."""
    async with run_server(*handlers, settings=cluster.settings(**overrides)) as server:
        yield server


@dataclasses.dataclass
class NodeProcess:
    """A ``nexus serve`` subprocess: a node this test can SIGKILL."""

    process: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(GUARD)

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:]


@contextlib.contextmanager
def node_process(directory: Path, cluster: Cluster, *handlers: str) -> Iterator[NodeProcess]:
    """Run ``python -m nexus.cli serve --bus ...`` with handlers from the test module; kill it afterwards."""
    (directory / f"{HANDLER_MODULE}.py").write_text(HANDLER_SOURCE)
    env = {key: value for key, value in os.environ.items() if not key.startswith("NEXUS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(directory), env.get("PYTHONPATH", "")) if p)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "nexus.cli",
        "serve",
        "--bus",
        cluster.url,
        "--grpc-port",
        str(port),
        "--no-gateway",
        "--no-entry-points",
        "--nats-stream",
        cluster.stream,
        "--nats-subject-prefix",
        cluster.prefix,
        "--nats-storage",
        "memory",
        "--nats-node-heartbeat-s",
        "0.25",
        "--heartbeat-interval",
        "0.1",
        "--log-format",
        "json",
    ]
    for handler in handlers:
        command += ["--handler", f"{HANDLER_MODULE}:{handler}"]
    log_path = directory / f"node-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=directory)
    served = NodeProcess(process, f"127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + GUARD
        while not _serving(served.address):
            if process.poll() is not None:
                pytest.fail(f"nexus serve exited with {process.returncode}: {served.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"nexus serve did not come up: {served.log_tail()}")
            time.sleep(0.05)
        yield served
    finally:
        served.kill()


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def health(address: str) -> int:
    """The node's gRPC health status (UNKNOWN when it does not answer)."""
    channel = grpc.aio.insecure_channel(address)
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        return int(reply.status)
    except grpc.aio.AioRpcError:
        return int(health_pb2.HealthCheckResponse.UNKNOWN)
    finally:
        await channel.close()


async def call(client: NexusClient, event_type: str, payload: dict[str, Any]) -> Event:
    """Send a request and return its terminal event (failing after the guard rather than hanging)."""
    async with asyncio.timeout(GUARD):
        return await client.call(event_type, payload)


async def lifecycle(client: NexusClient, event_type: str, payload: dict[str, Any]) -> list[Event]:
    """Send a request and collect its lifecycle (without heartbeats) to the terminal event."""
    async with asyncio.timeout(GUARD):
        return [event async for event in client.request(event_type, payload, heartbeats=False)]


def strictly_increasing(offsets: Sequence[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(offsets))


# --- two nodes on one NATS ----------------------------------------------------------------------------------


async def test_a_subscriber_on_node_b_receives_every_event_published_on_node_a_in_order_once(
    shared: Cluster,
) -> None:
    """Every event stored through node A reaches a subscriber on node B, in offset order, exactly once."""
    async with node(shared) as a, node(shared) as b:
        assert a.bus.epoch == b.bus.epoch
        recorder = await b.record("nodes:>")
        stored = [await a.client.emit("nodes:thing:v1:made", {"n": n}) for n in range(150)]
        summary = await a.client.publish_many(
            [Event.create("nodes:thing:v1:made", {"n": n}) for n in range(150, 300)], timeout=GUARD
        )
        assert summary.stored == 150
        events = await recorder.wait_count(300, timeout=GUARD)
        offsets = [event.offset for event in events]
        assert offsets[:150] == [event.offset for event in stored]
        assert offsets == list(range(1, 301))
        assert [event.payload["n"] for event in events] == list(range(300))
        # Nothing more (no duplicate): a marker stored after them arrives right after the 300.
        marker = await a.client.emit("nodes:marker:v1:made", {})
        events = await recorder.wait_for(lambda seen: seen[-1].event_id == marker.event_id, timeout=GUARD)
        assert len(events) == 301
        await recorder.stop()


async def test_a_subscription_on_node_b_is_live_when_its_initial_metadata_arrives(shared: Cluster) -> None:
    """Once node B's initial metadata reached the SDK (on_connect), an event stored through node A right after
    reaches B's subscriber, and nothing at or below the head offset B announced is delivered live."""
    async with node(shared) as a, node(shared) as b:
        for n in range(5):
            await a.client.emit("nodes:thing:v1:made", {"n": n})
        connected = asyncio.Event()
        subscription = b.client.subscribe("nodes:>", on_connect=lambda _: connected.set())
        events = aiter(subscription)
        first = asyncio.ensure_future(anext(events))
        async with asyncio.timeout(GUARD):
            await connected.wait()
        head = subscription.head_offset
        assert subscription.epoch == a.bus.epoch
        marker = await a.client.emit("nodes:marker:v1:made", {})
        received = [await first]
        async with asyncio.timeout(GUARD):
            while received[-1].offset < marker.offset:
                received.append(await anext(events))
        assert received[-1].event_id == marker.event_id
        assert all(event.offset > head for event in received)
        assert [event.offset for event in received] == list(range(head + 1, marker.offset + 1))
        subscription.close()
        await events.aclose()  # type: ignore[attr-defined]


async def test_requests_to_one_handler_start_in_offset_order_on_each_node(shared: Cluster) -> None:
    """Requests stored together reach the handler of the node serving them in offset order, and so do the shares
    of two nodes serving one handler."""
    starts: dict[str, list[int]] = {"a": [], "b": []}
    payloads: dict[int, int] = {}

    class Recording(EventHandler):
        event_type = "nodes:record"

        def __init__(self, name: str) -> None:
            self.name = name

        async def handle(self, event: Event) -> dict[str, Any]:
            starts[self.name].append(event.offset)
            payloads[event.offset] = int(event.payload["i"])
            return {}

    async with node(shared, Recording("a")) as a:
        summary = await a.client.publish_many(
            [Event.create("nodes:record:v1:requested", {"i": i}) for i in range(40)], timeout=GUARD
        )
        assert summary.stored == 40
        await until("node A started every request", lambda: len(starts["a"]) == 40)
        assert starts["a"] == sorted(starts["a"])
        assert [payloads[offset] for offset in starts["a"]] == list(range(40))
        async with node(shared, Recording("b")) as b:
            await until("the nodes know each other", lambda: peers(a) == 1 and peers(b) == 1)
            starts["a"].clear()
            await a.client.publish_many(
                [Event.create("nodes:record:v1:requested", {"i": i}) for i in range(200)], timeout=GUARD
            )
            await until("every request started", lambda: len(starts["a"]) + len(starts["b"]) == 200)
    assert starts["a"], "node A takes a share"
    assert starts["b"], "node B takes a share"
    assert all(share == sorted(share) for share in starts.values())


async def test_a_streaming_request_is_driven_by_exactly_one_node_and_its_lifecycle_reaches_the_requester(
    shared: Cluster,
) -> None:
    """Streaming requests sent to node A each run on exactly one of two nodes; the requester gets every event."""
    first, second = Countdown(), Countdown()
    async with node(shared, first) as a, node(shared, second):
        results = await asyncio.gather(
            *(lifecycle(a.client, "nodes:stream_countdown:v1:requested", {"n": 5}) for _ in range(12))
        )
    driven = first.driven + second.driven
    assert len(driven) == len(set(driven)) == 12
    for events in results:
        assert [event.state for event in events] == ["started", *["stream"] * 5, "success"]
        assert [event.payload.get("i") for event in events[1:6]] == [0, 1, 2, 3, 4]
        assert events[-1].payload["stream_count"] == 5
        assert strictly_increasing([event.offset for event in events])
        assert len({event.correlation_id for event in events}) == 1
        assert events[0].correlation_id in driven


async def test_a_request_reaches_the_node_with_the_handler_and_no_handler_only_when_no_live_node_has_one(
    shared: Cluster,
) -> None:
    """A node without the handler forwards to one that has it; no_handler only when no live node has it."""
    async with node(shared) as bare:
        async with node(shared, Echo("a")):
            await until("the nodes know each other", lambda: peers(bare) == 1)
            done = await call(bare.client, "nodes:echo:v1:requested", {"x": 1})
            assert (done.state, done.payload) == ("success", {"echo": {"x": 1}, "node": "a"})
            missing = await call(bare.client, "nodes:absent:v1:requested", {})
            assert missing.state == "failed"
            assert missing.payload["error"]["type"] == "no_handler"
        # Node A left: nobody serves nodes:echo any more.
        gone = await call(bare.client, "nodes:echo:v1:requested", {"x": 2})
        assert gone.state == "failed"
        assert gone.payload["error"]["type"] == "no_handler"


async def test_a_cancel_reaches_the_handler_on_another_node(shared: Cluster) -> None:
    """Cancelling, on node B, a stream that node A drives ends it with cancelled at the requester."""
    hold = Hold()
    async with node(shared, hold) as a, node(shared) as b:
        await until("the nodes know each other", lambda: peers(b) == 1)
        stream = b.client.request("nodes:stream_hold:v1:requested", {}, heartbeats=False)
        events: list[Event] = []
        async with asyncio.timeout(GUARD):
            async for event in stream:
                events.append(event)
                if event.state == "stream":
                    assert await b.client.cancel(stream.correlation_id, "changed my mind") is False
        assert [event.state for event in events] == ["started", "stream", "cancelled"]
        assert events[-1].payload["reason"] == "changed my mind"
        assert hold.cancelled == [stream.correlation_id]
        assert a.server.provider.streams() == []


async def test_ordering_key_order_holds_across_two_nodes(shared: Cluster) -> None:
    """Requests with one ordering-key value run one at a time in offset order, whichever node they are sent to."""
    runs: list[Run] = []
    clock = [0]
    # The default node heartbeat (1 s; lost after 3 s of silence): with the suite's fast 0.25 s one, an event loop
    # that a loaded machine stalls for 0.75 s gets its node counted lost, which is another test's fault.
    beat = {"nats_node_heartbeat_s": 1.0}
    async with (
        node(shared, Keyed("a", runs, clock), **beat) as a,
        node(shared, Keyed("b", runs, clock), **beat) as b,
    ):
        await until("the nodes know each other", lambda: peers(b) == 1)
        clients = [a.client, b.client]
        calls = [
            clients[n % 2].call("nodes:keyed:v1:requested", {"agent_id": f"agent-{n % 3}", "n": n}) for n in range(45)
        ]
        async with asyncio.timeout(GUARD):
            results = await asyncio.gather(*calls)
        assert {result.state for result in results} == {"success"}
        assert len(runs) == 45
        for key in ("agent-0", "agent-1", "agent-2"):
            mine = [run for run in runs if run.key == key]
            assert [run.offset for run in mine] == sorted(run.offset for run in mine), key
            for earlier, later in itertools.pairwise(mine):
                assert earlier.end < later.start, f"{key}: {earlier} overlaps {later}"
        assert len({run.node for run in runs}) == 1, "one active node takes an ordered handler's requests"
        active = runs[0].node
    # The active node leaves: the other one takes over.
    survivor_runs: list[Run] = []
    async with node(shared, Keyed("c", survivor_runs, clock), **beat) as c:
        done = await call(c.client, "nodes:keyed:v1:requested", {"agent_id": "agent-0", "n": 99})
        assert done.state == "success"
        assert [run.node for run in survivor_runs] == ["c"]
    assert active in ("a", "b")


# --- a node dies --------------------------------------------------------------------------------------------


async def test_kill_9_a_node_while_events_flow_loses_no_acknowledged_event(shared: Cluster, tmp_path: Path) -> None:
    """SIGKILL a node mid-flow: survivors' subscribers get every acknowledged event, and a moving one the rest."""
    async with node(shared) as b:
        with node_process(tmp_path, shared) as a:
            async with NexusClient(a.address) as client_a:
                on_b = await b.record(">")
                on_a = await Recorder(client_a.subscribe(">")).start()
                acknowledged: list[int] = []
                killed = asyncio.Event()

                async def publish_until_it_fails() -> None:
                    for n in range(100_000):
                        try:
                            stored = await client_a.emit("nodes:flow:v1:made", {"n": n}, timeout=5)
                        except Exception:
                            assert killed.is_set()
                            return
                        acknowledged.append(stored.offset)

                publishing = asyncio.create_task(publish_until_it_fails())
                await until("100 events are acknowledged", lambda: len(acknowledged) >= 100)
                await on_a.wait_count(50, timeout=GUARD)
                killed.set()
                a.kill()
                async with asyncio.timeout(GUARD):
                    await publishing
                last_seen_on_a = on_a.events[-1].offset if on_a.events else 0
                await on_a.stop()
            # The rest arrives through the survivor.
            later = [await b.client.emit("nodes:flow:v1:made", {"n": -n}) for n in range(1, 21)]
            acknowledged += [event.offset for event in later]
            received = await on_b.wait_for(lambda events: bool(events) and events[-1].offset >= later[-1].offset)
            offsets = [event.offset for event in received]
            assert strictly_increasing(offsets)
            assert set(acknowledged) <= set(offsets)
            # A subscriber of the dead node moves to the survivor with the last offset it saw.
            moved = await b.record(">", since_offset=last_seen_on_a, epoch=b.bus.epoch)
            rest = await moved.wait_for(lambda events: bool(events) and events[-1].offset >= later[-1].offset)
            assert moved.subscription.recovered is True
            assert [event.offset for event in rest] == [offset for offset in offsets if offset > last_seen_on_a]
            await moved.stop()
            await on_b.stop()


async def test_a_stream_whose_node_is_killed_ends_with_node_lost_once(shared: Cluster, tmp_path: Path) -> None:
    """SIGKILL the node driving a stream: its requester on another node gets failed/node_lost, stored once."""
    async with node(shared) as b, node(shared) as c:
        with node_process(tmp_path, shared, "Ticker") as a:
            await until("the nodes know node A", lambda: peers(b) == 2)
            watcher = await c.record("nodes:stream_ticks:>")
            stream = b.client.request("nodes:stream_ticks:v1:requested", {}, heartbeats=False)
            events: list[Event] = []
            async with asyncio.timeout(GUARD):
                async for event in stream:
                    events.append(event)
                    if len([e for e in events if e.state == "stream"]) == 3:
                        a.kill()
        terminal = events[-1]
        assert [event.state for event in events[:4]] == ["started", "stream", "stream", "stream"]
        assert terminal.state == "failed"
        assert terminal.payload["error"]["type"] == "node_lost"
        assert terminal.payload["stream_count"] >= 3
        assert terminal.correlation_id == stream.correlation_id
        # Both survivors noticed; one failed event was stored.
        await watcher.wait_for(lambda seen: any(e.state == "failed" for e in seen))
        await until("both survivors count node A lost", lambda: peers(b) == 1 and peers(c) == 1)
        stored = [e for e in await stored_history(c.bus) if e.correlation_id == stream.correlation_id]
        assert [e.state for e in stored if e.state in TERMINAL_STATES] == ["failed"]
        terminals = [e for e in watcher.events if e.state in TERMINAL_STATES]
        assert [(e.state, e.correlation_id) for e in terminals] == [("failed", stream.correlation_id)]
        await watcher.stop()


# --- NATS servers restart and fail --------------------------------------------------------------------------


async def test_nodes_recover_by_themselves_when_the_nats_server_restarts(tmp_path: Path) -> None:
    """NATS restarts mid-run: publishes in the outage fail with UNAVAILABLE, then nodes resume with no gap."""
    nats_server_binary()
    server = NatsProcess(tmp_path / "nats")
    server.start()
    await server.wait_listening()
    await wait_for_jetstream(server.url)
    stream, prefix = unique_names("restart")
    cluster = Cluster(server.url, stream, prefix)
    try:
        with structlog.testing.capture_logs() as logs:
            async with node(cluster, Echo("a"), nats_storage="file") as a, node(cluster, nats_storage="file") as b:
                recorder = await b.record("nodes:>")
                before = [await a.client.emit("nodes:thing:v1:made", {"n": n}) for n in range(20)]
                await recorder.wait_count(20)

                server.stop()
                await until("node A reports NOT_SERVING", lambda: _is(a.address, "NOT_SERVING"))
                with pytest.raises(Unavailable, match="NATS"):
                    await a.client.emit("nodes:thing:v1:made", {"n": -1})
                with pytest.raises(Unavailable):
                    await b.client.emit("nodes:thing:v1:made", {"n": -2})

                server.start()
                await until("both nodes serve again", lambda: _both_serving(a.address, b.address))
                after = [await a.client.emit("nodes:thing:v1:made", {"n": n}) for n in range(20, 40)]
                events = await recorder.wait_count(40)
                assert [event.offset for event in events] == [event.offset for event in before + after]
                assert [event.offset for event in events] == list(range(1, 41))
                assert {event.epoch for event in events} == {a.bus.epoch}
                done = await call(b.client, "nodes:echo:v1:requested", {"after": "restart"})
                assert done.state == "success"
                await recorder.stop()
        names = [entry["event"] for entry in logs]
        assert "nats_disconnected" in names
        assert "nats_reconnected" in names
        assert "nats_recovered" in names
    finally:
        server.stop()


async def _is(address: str, status: str) -> bool:
    return await health(address) == int(health_pb2.HealthCheckResponse.ServingStatus.Value(status))


async def _both_serving(*addresses: str) -> bool:
    return all([await _is(address, "SERVING") for address in addresses])


@pytest.mark.slow
async def test_a_three_server_nats_cluster_survives_losing_one_server(tmp_path: Path) -> None:
    """With replicas 3, killing one of three NATS servers loses no acknowledged event."""
    nats_server_binary()
    cluster_ports = [free_port() for _ in range(3)]
    servers = [
        NatsProcess(tmp_path / f"s{index}", name=f"s{index}", cluster_port=port, routes=cluster_ports)
        for index, port in enumerate(cluster_ports)
    ]
    for server in servers:
        server.start()
    try:
        for server in servers:
            await server.wait_listening()
        await wait_for_jetstream(servers[0].url)
        stream, prefix = unique_names("cluster")
        urls = [server.url for server in servers]
        first = Cluster(",".join(urls), stream, prefix)
        second = Cluster(",".join(reversed(urls)), stream, prefix)
        async with (
            node(first, nats_replicas=3, nats_storage="file", nats_ack_timeout_s=1.0) as a,
            node(second, nats_replicas=3, nats_storage="file", nats_ack_timeout_s=1.0) as b,
        ):
            recorder = await b.record("nodes:>")
            acknowledged: list[int] = []

            async def publish(n: int) -> None:
                """Publish one event, retrying with the same id until JetStream acknowledges it."""
                event_id = f"cluster-{n}"
                async with asyncio.timeout(GUARD):
                    while True:
                        try:
                            stored = await a.client.emit("nodes:thing:v1:made", {"n": n}, event_id=event_id)
                        except Unavailable:
                            await asyncio.sleep(0.1)
                            continue
                        acknowledged.append(stored.offset)
                        return

            for n in range(30):
                await publish(n)
            # Kill the server leading the stream once both followers hold every acknowledged event (the fault
            # is one server lost, not a second one still catching up); its replicas elect another leader.
            await until("both followers hold the 30 events", lambda: stream_replicated(servers[0].url, stream, 3))
            leader = await stream_leader(servers[0].url, stream)
            victim = next(server for server in servers if server.name == leader)
            victim.stop(signal.SIGKILL)
            survivor = next(server for server in servers if server is not victim)
            await until(
                "the survivors elect a leader",
                lambda: stream_led_by_another(survivor.url, stream, leader),
                timeout=3 * GUARD,
            )
            for n in range(30, 60):
                await publish(n)
            events = await recorder.wait_for(lambda seen: len(seen) >= 60, timeout=GUARD)
            assert [event.payload["n"] for event in events] == list(range(60))
            assert [event.offset for event in events] == acknowledged
            await until("node B is healthy again", lambda: b.bus.healthy)
            assert await b.bus.head_offset() == 60
            assert await stream_leader(survivor.url, stream) != leader
            await recorder.stop()
    finally:
        for server in servers:
            server.stop(signal.SIGKILL)
