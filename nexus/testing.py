"""Test helpers for plugin authors: an in-process server on a free port, a client, a recorder of subscribed
events, a follower of streaming requests and a worker serving handlers for a server (:func:`start_worker`).

::

    from nexus.testing import StreamFollower, run_server

    async def test_echo() -> None:
        async with run_server(Echo(), Ticks()) as nexus:
            done = await nexus.client.call("demo:echo:v1:requested", {"x": 1})
            assert done.payload == {"echo": {"x": 1}}

            ticks = StreamFollower(nexus.client.request("demo:ticks:v1:requested", {}, heartbeats=False))
            await ticks.started()
            chunks = await ticks.wait_for(lambda chunks: len(chunks) >= 2)
            assert (await ticks.cancel()).state == "cancelled"

A handler served by a worker, as it would run out of process (docs/workers.md)::

    async with run_server() as nexus, nexus.start_worker(Echo()) as worker:
        done = await nexus.client.call("demo:echo:v1:requested", {"x": 1})

Installing Nexus registers its pytest plugin (:mod:`nexus.pytest_plugin`): async tests run with no
configuration, and the ``nexus_server`` fixture starts servers that stop when the test ends. Works with
pytest-asyncio (auto mode) or anyio's pytest plugin (asyncio backend) too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from nexus.api import AnyHandler
from nexus.bus.base import Bus
from nexus.client import NexusClient, RequestStream, Subscription
from nexus.config import Settings
from nexus.errors import InvalidState
from nexus.events import STARTED, STREAM, Event, JSONObject
from nexus.plugins import HandlerSpec
from nexus.queue.base import RequestQueue
from nexus.server import NexusServer
from nexus.tracing import Tracing
from nexus.worker import Worker, WorkerSettings


class Recorder:
    """Collects the events of a subscription in the background; wait for what you expect."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Recorder:
        """Start collecting; returns once the subscription is live on the server."""
        connected = asyncio.Event()
        previous = self.subscription.on_connect

        def on_connect(sub: Subscription) -> None:
            connected.set()
            if previous is not None:
                previous(sub)

        self.subscription.on_connect = on_connect
        self._task = asyncio.create_task(self._collect())
        waiter = asyncio.ensure_future(connected.wait())
        await asyncio.wait({waiter, self._task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._task.done():
            self._task.result()
        return self

    async def _collect(self) -> None:
        try:
            async for event in self.subscription:
                self.events.append(event)
                self._changed.set()
        except BaseException as exc:
            self.error = exc
            self._changed.set()
            raise

    def of_type(self, *states: str) -> list[Event]:
        """Recorded events whose state is one of ``states`` (all when none given)."""
        return [e for e in self.events if not states or e.state in states]

    async def wait_for(self, predicate: Callable[[list[Event]], bool], timeout: float = 10.0) -> list[Event]:
        """Wait until ``predicate(events)`` holds; raises TimeoutError with what arrived."""
        deadline = time.monotonic() + timeout
        while not predicate(self.events):
            if self.error is not None:
                raise self.error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [e.event_type for e in self.events[-20:]]
                raise TimeoutError(f"condition not met after {timeout}s; last events: {kinds}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue
        return self.events

    async def wait_count(self, count: int, timeout: float = 10.0) -> list[Event]:
        """Wait until at least ``count`` events arrived."""
        return await self.wait_for(lambda events: len(events) >= count, timeout)

    async def stop(self) -> None:
        """Stop collecting."""
        self.subscription.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


class StreamEnded(InvalidState, AssertionError):
    """A followed stream ended (or its connection failed) before what the test waited for happened."""


class StreamFollower:
    """Consumes a streaming request in the background; wait for the chunks you expect with :meth:`wait_for`.

    Made from a :class:`~nexus.client.RequestStream` (``client.request(...)``; pass ``heartbeats=False`` unless
    the test wants them) inside a running event loop, it starts iterating the request at once. ``events`` holds
    the lifecycle events so far (``started``, ``stream``..., then the terminal one) and ``chunks`` the payloads of
    the ``stream`` events. Every wait takes a ``timeout`` in seconds (TimeoutError, naming the last events) and
    raises :class:`StreamEnded` when the stream is over first; an error of the stream itself (the connection
    went away) is kept in ``error`` and is the StreamEnded's cause. End a stream a test leaves running with
    :meth:`cancel` (the server cancels it) or :meth:`stop` (the client lets go of it).
    """

    def __init__(self, stream: RequestStream) -> None:
        self.stream = stream
        self.events: list[Event] = []
        self.error: Exception | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        try:
            async for event in self.stream:
                self.events.append(event)
                self._changed.set()
        except Exception as exc:  # kept for the waiters, so the task never fails unobserved
            self.error = exc
        finally:
            self._changed.set()

    @property
    def chunks(self) -> list[JSONObject]:
        """The payloads of the ``stream`` events so far, in order."""
        return [e.payload for e in self.events if e.state == STREAM]

    @property
    def done(self) -> bool:
        """Whether the stream is over (its terminal event arrived, it failed, or it was stopped)."""
        return self._task.done()

    async def wait_for(self, predicate: Callable[[list[JSONObject]], bool], timeout: float = 10.0) -> list[JSONObject]:
        """Wait until ``predicate(chunks)`` holds; returns the chunks."""
        await self._until(lambda: predicate(self.chunks), "the condition", timeout)
        return self.chunks

    async def started(self, timeout: float = 10.0) -> Event:
        """Wait for the first event and return it; raises :class:`StreamEnded` unless it is ``started``."""
        await self._until(lambda: bool(self.events), "its first event", timeout)
        first = self.events[0]
        if first.state != STARTED:
            raise StreamEnded(f"the stream did not start: its first event is {first.event_type} {first.payload}")
        return first

    async def ended(self, timeout: float = 10.0) -> Event:
        """Wait for the terminal event (``success``, ``failed``, ``timeout`` or ``cancelled``) and return it."""
        await self._until(lambda: self.stream.terminal is not None, "its terminal event", timeout)
        assert self.stream.terminal is not None
        return self.stream.terminal

    async def cancel(self, reason: str = "cancelled by requester", timeout: float = 10.0) -> Event:
        """Ask the server to cancel the request (wherever it runs) and return the terminal event it ends with.

        ``await follower.stream.cancel()`` answers whether the server it was sent to runs the stream itself.
        """
        await self.stream.cancel(reason)
        return await self.ended(timeout)

    async def stop(self) -> None:
        """Stop consuming: the client drops the request's call (the server sees its requester go away)."""
        self._task.cancel()
        await asyncio.wait({self._task})

    async def _until(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        async def wait() -> None:
            while not condition():
                if self._task.done():
                    raise StreamEnded(
                        f"the stream ended while waiting for {what}: {self._last_events()}"
                    ) from self.error
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"waited {timeout}s for {what}; last events: {self._last_events()}") from None

    def _last_events(self) -> str:
        shown = [f"{e.event_type} {e.payload}" if e.state != STREAM else e.event_type for e in self.events[-5:]]
        error = f"; error: {self.error!r}" if self.error is not None else ""
        return f"{shown}{error}"


@dataclasses.dataclass
class TestServer:
    """A running in-process server and a client connected to it."""

    __test__ = False  # not a pytest test class

    server: NexusServer
    client: NexusClient

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def bus(self) -> Bus:
        return self.server.bus

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:<port>/ws`` of the gateway (started with ``run_server(..., gateway=True)``)."""
        if self.server.gateway is None:
            raise RuntimeError("the gateway is off: start the server with run_server(..., gateway=True)")
        return str(self.server.gateway.url)

    async def record(self, *patterns: str, since_offset: int = 0, epoch: str | None = None) -> Recorder:
        """Subscribe through the client and record what arrives (live once this returns)."""
        return await Recorder(self.client.subscribe(*patterns, since_offset=since_offset, epoch=epoch)).start()

    async def client_for(self) -> NexusClient:
        """Another client to the same server (close it yourself)."""
        return NexusClient(self.address)

    def start_worker(self, *handlers: AnyHandler | HandlerSpec, **options: Any) -> AbstractAsyncContextManager[Worker]:
        """:func:`start_worker` for this server."""
        return start_worker(self.address, *handlers, **options)


def _spec(handler: AnyHandler | HandlerSpec) -> HandlerSpec:
    if isinstance(handler, HandlerSpec):
        return handler
    cls = type(handler)
    return HandlerSpec(f"{cls.__module__}:{cls.__qualname__}", handler, "nexus.testing")


@asynccontextmanager
async def start_worker(
    address: str,
    *handlers: AnyHandler | HandlerSpec,
    handler_config: dict[str, dict[str, Any]] | None = None,
    token: str | None = None,
    timeout: float = 10.0,
    **options: Any,
) -> AsyncIterator[Worker]:
    """Run a :class:`~nexus.worker.Worker` serving ``handlers`` for the server at ``address``, in this process;
    returns once the server accepted its registration, and stops it (draining, teardown) afterwards.

    ``options`` set :class:`~nexus.worker.WorkerSettings` fields (``max_in_flight=4``, ``name="w1"``, ...);
    ``handler_config`` holds ``[handlers.<name>]`` sections, by registration name. A refused registration
    raises its :class:`~nexus.errors.NexusError` here.
    """
    worker = Worker(
        address, [_spec(h) for h in handlers], WorkerSettings(**options), handler_config=handler_config, token=token
    )
    task = asyncio.create_task(worker.run(), name="nexus-test-worker")
    registered = asyncio.create_task(worker.wait_registered(timeout))
    try:
        await asyncio.wait({task, registered}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises why it ended
            raise RuntimeError("the worker ended before it registered")
        registered.result()
        yield worker
    finally:
        registered.cancel()
        worker.stop()
        await asyncio.wait({task})
    task.result()  # what the worker raised while the block ran (not when the block raised itself)


@asynccontextmanager
async def run_server(
    *handlers: AnyHandler | HandlerSpec,
    settings: Settings | None = None,
    bus: Bus | None = None,
    queue: RequestQueue | None = None,
    tracing: Tracing | None = None,
    **overrides: Any,
) -> AsyncIterator[TestServer]:
    """Start a server on 127.0.0.1 and a free port with ``handlers``; stop it afterwards.

    ``bus`` and ``queue`` put the server on a given bus and request queue (two servers sharing a memory bus share
    its queue too, so each request runs once). ``tracing`` records the server's spans where a test wants them
    (``Tracing.create(SimpleSpanProcessor(InMemorySpanExporter()))``).

    ``overrides`` set :class:`~nexus.config.Settings` fields (``heartbeat_interval=0.05``, ...). Entry points
    are not loaded: a test names its handlers. The WebSocket gateway is off unless ``gateway=True`` (it then
    listens on a free port too: ``nexus.server.ws_port``, ``nexus.ws_url``).
    """
    base = settings or Settings()
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "grpc_port": 0,
        "ws_port": 0,
        "gateway": False,
        "load_entry_points": False,
    }
    fields.update(overrides)
    server = NexusServer(
        dataclasses.replace(base, **fields), bus=bus, queue=queue, handlers=list(handlers), tracing=tracing
    )
    await server.start()
    client = NexusClient(server.address)
    try:
        yield TestServer(server, client)
    finally:
        await client.close()
        await server.stop(grace=1.0)
