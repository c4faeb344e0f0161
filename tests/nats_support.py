"""NATS for tests: the shared server (``NEXUS_TEST_NATS_URL``) and private ``nats-server`` processes.

Tests on the shared server isolate themselves with a unique stream name and subject prefix, and delete their
stream afterwards. Tests that restart, kill or cluster servers start their own processes on free ports with
their own store directories. Without NATS a test is skipped, or fails when ``CI`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.api
import nats.js.errors
import pytest
from ci_support import skip_or_fail

from nexus import Event, Stream, StreamingEventHandler
from nexus.bus import Bus, Subscription
from nexus.bus.nats import NatsBus
from nexus.config import Settings
from nexus.queue.nats import NatsRequestQueue
from nexus.testing import TestServer

NATS_URL = os.environ.get("NEXUS_TEST_NATS_URL", "").strip() or "nats://127.0.0.1:4222"
GUARD = 20.0
"""Seconds any awaited condition may take before a test fails (a guard, not a measurement)."""


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it in CI (CI must run every test; bash scripts/test starts a NATS server)."""
    skip_or_fail(reason)


def reachable(url: str) -> bool:
    """Whether something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=1.0):
            return True
    except OSError:
        return False


def shared_nats_url() -> str:
    """The shared NATS server's URL, or skip/fail when nothing answers there."""
    if not reachable(NATS_URL):
        unavailable(f"no NATS server answers at {NATS_URL} (set NEXUS_TEST_NATS_URL, or run bash scripts/test)")
    return NATS_URL


def nats_server_binary() -> str:
    """The ``nats-server`` executable, or skip/fail when it is not installed."""
    found = shutil.which("nats-server") or ("/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else "")
    if not found:
        unavailable("nats-server is not installed (apt-get install nats-server)")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def unique_names(tag: str = "") -> tuple[str, str]:
    """A stream name and a subject prefix no other test uses."""
    token = uuid.uuid4().hex[:10]
    return f"T{tag.upper()}_{token}", f"t{tag.lower()}{token}"


def nats_settings(url: str, stream: str, prefix: str, **overrides: Any) -> Settings:
    """Settings for a node of a test's bus: memory storage, fast node heartbeats."""
    fields: dict[str, Any] = {
        "bus": url,
        "nats_stream": stream,
        "nats_subject_prefix": prefix,
        "nats_storage": "memory",
        "nats_node_heartbeat_s": 0.25,
        "host": "127.0.0.1",
        "grpc_port": 0,
        "gateway": False,
        "load_entry_points": False,
    }
    fields.update(overrides)
    return Settings(**fields)


async def delete_stream(url: str, stream: str) -> None:
    """Remove a test's stream (and with it every consumer on it); ignore a stream or server that is gone."""
    with contextlib.suppress(Exception):
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(stream)
        finally:
            await nc.close()


async def _stream_cluster(url: str, stream: str) -> nats.js.api.ClusterInfo:
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
    try:
        info = await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
    assert info.cluster is not None, f"{stream} is not clustered"
    return info.cluster


async def stream_leader(url: str, stream: str) -> str:
    """The name of the NATS server leading ``stream``'s replicas."""
    cluster = await _stream_cluster(url, stream)
    assert cluster.leader, f"{stream} has no leader"
    return cluster.leader


async def stream_replicated(url: str, stream: str, replicas: int) -> bool:
    """Whether ``stream`` has a leader and ``replicas - 1`` followers that are current (hold every message)."""
    with contextlib.suppress(Exception):
        cluster = await _stream_cluster(url, stream)
        followers = cluster.replicas or []
        current = [peer for peer in followers if peer.current and not peer.offline and not peer.lag]
        return bool(cluster.leader) and len(current) == replicas - 1
    return False


async def stream_led_by_another(url: str, stream: str, old_leader: str) -> bool:
    """Whether a server other than ``old_leader`` now leads ``stream`` (False while none does)."""
    with contextlib.suppress(Exception):
        leader = (await _stream_cluster(url, stream)).leader
        return bool(leader) and leader != old_leader
    return False


async def until(what: str, condition: Callable[[], bool | Awaitable[bool]], timeout: float = GUARD) -> None:
    """Poll ``condition`` (plain or async) until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


async def take_until(sub: Subscription, last_offset: int, timeout: float = GUARD) -> list[Event]:
    """Take events until one with ``last_offset`` arrived (heartbeats included); fail if the subscription ends."""
    events: list[Event] = []
    async with asyncio.timeout(timeout):
        while not events or events[-1].offset < last_offset:
            batch = await sub.next_batch()
            assert batch, f"the subscription ended after {len(events)} events"
            events.extend(batch)
    return events


async def events_before_a_marker(publisher: Bus, sub: Subscription, marker: Event | None = None) -> list[Event]:
    """Store a marker ``sub`` matches and return what it receives before the marker.

    The marker is stored after everything stored so far, and delivery is in offset order: once it arrived, every
    earlier event ``sub`` was going to receive (a duplicate or a stray one included) arrived before it.
    """
    stored = (await publisher.publish(marker or Event.create("demo:marker:v1:made"))).event
    events = await take_until(sub, stored.offset)
    assert events[-1].event_id == stored.event_id
    return events[:-1]


async def stored_history(bus: Bus) -> list[Event]:
    """Every event ``bus``'s history holds now, read back through a replay from offset 0."""
    sub = await bus.subscribe([">"], since_offset=0, epoch=bus.epoch)
    try:
        return await events_before_a_marker(bus, sub)
    finally:
        sub.close()


def nats_bus_of(server: TestServer) -> NatsBus:
    """The NATS bus of a test server."""
    bus = server.bus
    assert isinstance(bus, NatsBus), f"{server.address} does not run on NATS"
    return bus


def nats_queue_of(server: TestServer) -> NatsRequestQueue:
    """The NATS request queue of a test server (for what only it has: its claims, outbox and membership)."""
    queue = server.server.queue
    assert isinstance(queue, NatsRequestQueue), f"{server.address} does not share requests over NATS"
    return queue


def peers(server: TestServer) -> int:
    """How many other nodes this node currently counts live."""
    return len(nats_queue_of(server).membership.others)


async def wait_for_jetstream(url: str, timeout: float = GUARD) -> None:
    """Wait until JetStream answers at ``url`` (a cluster has elected its meta leader)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if reachable(url):
            try:
                nc = await nats.connect(url, connect_timeout=1, max_reconnect_attempts=0, allow_reconnect=False)
                try:
                    await nc.jetstream().account_info()
                    return
                finally:
                    await nc.close()
            except Exception as exc:
                last = repr(exc)
        await asyncio.sleep(0.1)
    pytest.fail(f"JetStream did not come up at {url} within {timeout}s ({last})")


@dataclasses.dataclass
class NatsProcess:
    """A ``nats-server`` with JetStream that one test owns: start, stop, kill and restart it."""

    directory: Path
    name: str = "n1"
    port: int = dataclasses.field(default_factory=free_port)
    cluster_port: int | None = None
    routes: Sequence[int] = ()
    cluster_name: str = "nexus-test"
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    def command(self) -> list[str]:
        command = [
            nats_server_binary(),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-sd",
            str(self.directory / f"{self.name}-store"),
            "-n",
            self.name,
        ]
        if self.cluster_port is not None:
            routes = ",".join(f"nats://127.0.0.1:{port}" for port in self.routes if port != self.cluster_port)
            command += ["--cluster", f"nats://127.0.0.1:{self.cluster_port}", "--cluster_name", self.cluster_name]
            if routes:
                command += ["--routes", routes]
        return command

    def start(self) -> None:
        """Start the process (again, after a stop, on the same port and store)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)

    async def wait_listening(self, timeout: float = GUARD) -> None:
        """Wait until the client port accepts connections."""
        deadline = time.monotonic() + timeout
        while not reachable(self.url):
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"nats-server {self.name} exited: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"nats-server {self.name} did not listen on {self.url} within {timeout}s")
            await asyncio.sleep(0.05)

    async def freeze(self, timeout: float = GUARD) -> None:
        """SIGSTOP the process and wait until every one of its threads is stopped: ``kill`` returns before the
        signal has taken effect, and a thread still running could answer one more message."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not _all_threads_stopped(self.process.pid):
            if time.monotonic() > deadline:
                pytest.fail(f"nats-server {self.name} did not stop within {timeout}s of SIGSTOP")
            await asyncio.sleep(0.005)

    def thaw(self) -> None:
        """SIGCONT a frozen process."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process with ``sig`` (SIGKILL: no goodbye to clients or peers) and reap it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=GUARD)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (state T or t in ``/proc/PID/task/TID/stat``, after the name in
    parentheses); a thread gone meanwhile can answer nothing either."""
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.rindex(")") + 2] not in "Tt":
            return False
    return True


class Hold(StreamingEventHandler):
    """Sends one chunk, then runs until cancelled; remembers how it ended."""

    event_type = "nodes:stream_hold"
    stream_timeout = None

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"i": 0})
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(event.event_id)
            raise
