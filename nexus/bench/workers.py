"""The processes of ``nexus bench``: servers (Nexus and the bare libraries) and the clients that load them.

Each runs as ``python -m nexus.bench.workers ROLE ARGS_JSON``, prints one JSON line once it is ready (with its
pid and the addresses it listens on), then answers JSON commands read one a line from stdin, one JSON line each,
and exits on ``{"op": "stop"}`` or when stdin closes (the parent went away). Keeping every server in its own
process is what lets the parent read that server's CPU from ``/proc`` alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from nexus.bench.stats import latency_summary
from nexus.v1 import nexus_pb2, nexus_pb2_grpc

EVENT_TYPE = "bench:tick:v1:happened"
HOLD_TYPE = "bench:stream_hold:v1:requested"
CHUNKS_TYPE = "bench:stream_chunks:v1:requested"
TEXT = "x" * 160  # with "t" and "n" the payload's JSON is about 200 bytes
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
BARE_SERVICE = "bare.Bare"


def payload(n: int) -> dict[str, Any]:
    """The benchmark payload: ~200 bytes of JSON; ``t`` is the sender's monotonic clock (shared by processes)."""
    return {"t": time.monotonic(), "n": n, "text": TEXT}


def struct_of(data: dict[str, Any]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(data)
    return value


def bare_event(n: int, offset: int = 0) -> nexus_pb2.EventResponse:
    """An event as a bare server sends it: the same fields and size as a Nexus delivery."""
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return nexus_pb2.EventResponse(
        success=True,
        event_type=EVENT_TYPE,
        event_id=f"{n:032x}",
        payload=struct_of(payload(n)),
        offset=offset,
        epoch="e" * 16,
        timestamp=stamp,
    )


class Role:
    """One worker: ``start`` returns what the ready line reports; ``handle`` answers one command."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args

    async def start(self) -> dict[str, Any]:
        return {}

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        raise ValueError(f"unknown command {command.get('op')!r}")

    async def stop(self) -> None:
        return None


async def _publish_loop(publish: Any, count: int, chunk: int = 100) -> None:
    for n in range(count):
        await publish(n)
        if n % chunk == chunk - 1:
            await asyncio.sleep(0)


# --- servers ------------------------------------------------------------------------------------------------


def chunks_handler() -> Any:
    """A streaming handler (``bench:stream_chunks``) that sends ``chunks`` benchmark payloads as fast as its
    stream takes them: the same class in the server's process or in a worker's."""
    from nexus.api import Stream, StreamingEventHandler
    from nexus.events import Event

    class Chunks(StreamingEventHandler):
        event_type = "bench:stream_chunks"
        stream_timeout = None

        async def handle_stream(self, event: Event, stream: Stream) -> None:
            for n in range(int(event.payload["chunks"])):
                await stream.send(payload(n))

    return Chunks()


class NexusServerRole(Role):
    """A Nexus server (memory or NATS bus, gateway optional) with a streaming handler that holds its streams.

    ``publish``: events published live in this process, as a handler does (``Event.create`` + node publish,
    the loop given a turn every 100 events; with ``many``, that many at a time through ``publish_many``).
    ``fill``: the same, then a full garbage collection, for RSS.
    """

    async def start(self) -> dict[str, Any]:
        from nexus.api import Stream, StreamingEventHandler
        from nexus.config import Settings
        from nexus.events import Event
        from nexus.logs import configure_logging
        from nexus.server import NexusServer, freeze_start_up_heap

        configure_logging("json", "error")

        class Hold(StreamingEventHandler):
            event_type = "bench:stream_hold"

            async def handle_stream(self, event: Event, stream: Stream) -> None:
                await asyncio.Event().wait()

        fields: dict[str, Any] = {
            "host": "127.0.0.1",
            "grpc_port": 0,
            "ws_port": 0,
            "gateway": False,
            "load_entry_points": False,
            "publish_rate_per_s": 1e9,
            "publish_burst": 1_000_000_000,
            "stream_timeout": None,
            "max_requests_per_connection": 100_000,
            "max_subscriptions_per_connection": 100_000,
            "ws_max_frames_per_s": 1e9,
        }
        fields.update(self.args.get("settings", {}))
        self.settings = Settings(**fields)
        handlers: list[Any] = [Hold()]
        if self.args.get("chunks_in_process"):
            handlers.append(chunks_handler())
        self.server = NexusServer(self.settings, handlers=handlers)
        await self.server.start()
        freeze_start_up_heap()  # as `nexus serve` does
        self.event = Event
        self.held: list[Any] = []
        for index in range(int(self.args.get("nonmatching", 0))):
            self.held.append(await self.server.node.subscribe([f"other{index}:x:v1:*"]))
        await self._publish(int(self.args.get("preload", 0)))
        gc.collect()
        ready: dict[str, Any] = {"grpc": self.server.address}
        if self.server.gateway is not None:
            ready["ws"] = str(self.server.gateway.url)
        return ready

    async def _publish(self, count: int, many: int = 0) -> None:
        """Publish ``count`` events one at a time, or ``many`` at a time through ``publish_many``."""
        node = self.server.node
        create = self.event.create
        if many > 0:
            for start in range(0, count, many):
                await node.publish_many(
                    [create(EVENT_TYPE, payload(n)) for n in range(start, min(count, start + many))]
                )
                await asyncio.sleep(0)
            return

        async def one(n: int) -> None:
            await node.publish(create(EVENT_TYPE, payload(n)))

        await _publish_loop(one, count)

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        if command["op"] in ("publish", "fill"):
            await self._publish(int(command["count"]), int(command.get("many", 0)))
            if command["op"] == "fill":
                gc.collect()
            return {"published": command["count"]}
        return await super().handle(command)

    async def stop(self) -> None:
        for sub in self.held:
            sub.close()
        await self.server.stop(0.5)
        if self.settings.bus.startswith("nats://"):
            await delete_stream(self.settings.bus, self.settings.nats_stream)


async def delete_stream(url: str, name: str) -> None:
    """Delete a JetStream stream the benchmark made (quietly: it may never have been created)."""
    import nats

    connection = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        with contextlib.suppress(Exception):
            await connection.jetstream().delete_stream(name)
    finally:
        await connection.close()


class BareGrpcRole(Role):
    """A bare grpcio asyncio server: pre-serialized frames, a unary echo that stores, a client-streaming store,
    a ~15-line relay (publish → fan-out queue → stream) and streams of heartbeats."""

    async def start(self) -> dict[str, Any]:
        self.queues: list[asyncio.Queue[bytes]] = []
        self.relays: list[asyncio.Queue[bytes]] = []
        self.stored: list[Any] = []
        self.interval = float(self.args.get("interval", 1.0))
        raw = {"request_deserializer": None, "response_serializer": None}
        handlers = {
            "Frames": grpc.unary_stream_rpc_method_handler(self.frames, **raw),
            "Relay": grpc.unary_unary_rpc_method_handler(self.relay, **raw),
            "RelaySub": grpc.unary_stream_rpc_method_handler(self.relay_sub, **raw),
            "Hold": grpc.unary_stream_rpc_method_handler(self.hold, **raw),
            "Emit": grpc.unary_unary_rpc_method_handler(
                self.emit,
                request_deserializer=nexus_pb2.EventRequest.FromString,
                response_serializer=nexus_pb2.EventResponse.SerializeToString,
            ),
            "Publish": grpc.stream_unary_rpc_method_handler(
                self.publish,
                request_deserializer=nexus_pb2.PublishEventsRequest.FromString,
                response_serializer=nexus_pb2.PublishEventsResponse.SerializeToString,
            ),
        }
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(BARE_SERVICE, handlers),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return {"grpc": f"127.0.0.1:{port}"}

    async def frames(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.queues.append(queue)
        await context.send_initial_metadata(())
        try:
            while True:
                yield await queue.get()
        finally:
            self.queues.remove(queue)

    async def relay(self, request: bytes, context: Any) -> bytes:
        for queue in self.relays:
            queue.put_nowait(request)
        return b""

    async def relay_sub(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.relays.append(queue)
        await context.send_initial_metadata(())
        try:
            while True:
                yield await queue.get()
        finally:
            self.relays.remove(queue)

    async def hold(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        beat = bare_event(0).SerializeToString()
        await context.send_initial_metadata(())
        while True:
            await asyncio.sleep(self.interval)
            yield beat

    async def emit(self, request: nexus_pb2.EventRequest, context: Any) -> nexus_pb2.EventResponse:
        self.stored.append(request)
        return nexus_pb2.EventResponse(
            success=True, event_type=request.event_type, payload=request.payload, offset=len(self.stored)
        )

    async def publish(self, requests: Any, context: Any) -> nexus_pb2.PublishEventsResponse:
        count = 0
        async for request in requests:
            self.stored.append(request)
            count += 1
        return nexus_pb2.PublishEventsResponse(stored=count, last_offset=len(self.stored))

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        if command["op"] == "publish":
            per_frame = int(command.get("per_frame", 100))
            count = int(command["count"])
            if per_frame > 1:
                frame = nexus_pb2.SubscribeEventBatchesResponse(
                    events=[bare_event(n, n + 1) for n in range(per_frame)]
                ).SerializeToString()
                frames = [frame] * (count // per_frame)
            else:
                single = bare_event(0, 1).SerializeToString()
                frames = [single] * count
            for index, frame in enumerate(frames):
                for queue in self.queues:
                    queue.put_nowait(frame)
                if per_frame > 1 or index % 100 == 99:
                    await asyncio.sleep(0)
            return {"published": count}
        if command["op"] == "clear":
            self.stored.clear()
            return {}
        return await super().handle(command)

    async def stop(self) -> None:
        await self.server.stop(0)


class BareWebSocketRole(Role):
    """A bare ``websockets`` server: ``broadcast()`` of each event's JSON to every connection, or (``streams``)
    a task per connection sending a heartbeat every ``interval``."""

    async def start(self) -> dict[str, Any]:
        from websockets.asyncio.server import serve

        self.connections: set[Any] = set()
        self.streams = bool(self.args.get("streams", False))
        self.interval = float(self.args.get("interval", 1.0))
        # No per-message compression, as the Nexus gateway: it would compress each frame once per connection.
        self.server = await serve(self.connection, "127.0.0.1", 0, max_queue=None, compression=None)
        port = next(iter(self.server.sockets)).getsockname()[1]
        return {"ws": f"ws://127.0.0.1:{port}/ws"}

    async def connection(self, websocket: Any) -> None:
        self.connections.add(websocket)
        try:
            if self.streams:
                beat = json.dumps({"type": "bench:stream_hold:v1:heartbeat", "payload": {}})
                while True:
                    await asyncio.sleep(self.interval)
                    await websocket.send(beat)
            await websocket.wait_closed()
        finally:
            self.connections.discard(websocket)

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        from websockets.asyncio.server import broadcast

        if command["op"] == "publish":
            count = int(command["count"])
            for n in range(count):
                event = {
                    "type": EVENT_TYPE,
                    "event_id": f"{n:032x}",
                    "payload": payload(n),
                    "metadata": {},
                    "offset": n + 1,
                    "epoch": "e" * 16,
                    "timestamp": "2026-01-01T00:00:00.000000Z",
                }
                broadcast(self.connections, json.dumps(event, separators=(",", ":")))
                if n % 100 == 99:
                    await asyncio.sleep(0)
            return {"published": count}
        return await super().handle(command)

    async def stop(self) -> None:
        self.server.close()


class BareNatsRole(Role):
    """A bare nats-py JetStream publisher on a fresh stream (``prepare``), deleted again by ``cleanup``."""

    async def start(self) -> dict[str, Any]:
        import nats

        self.connection = await nats.connect(self.args["url"], connect_timeout=5, allow_reconnect=False)
        self.js = self.connection.jetstream()
        self.stream = ""
        return {}

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "prepare":
            self.stream = command["stream"]
            self.subject = f"{command['prefix']}.bench"
            await self.js.add_stream(name=self.stream, subjects=[f"{command['prefix']}.>"])
            return {}
        if op == "publish":
            count = int(command["count"])
            body = json.dumps(payload(0)).encode()
            if command.get("mode") == "async":
                futures = [await self.js.publish_async(self.subject, body) for _ in range(count)]
                await asyncio.gather(*futures)
            else:
                for _ in range(count):
                    await self.js.publish(self.subject, body)
            return {"published": count}
        if op == "cleanup":
            with contextlib.suppress(Exception):
                await self.js.delete_stream(self.stream)
            return {}
        return await super().handle(command)

    async def stop(self) -> None:
        if self.stream:
            with contextlib.suppress(Exception):
                await self.js.delete_stream(self.stream)
        await self.connection.close()


class BareHistoryRole(Role):
    """The bare data of a history: each event's compact JSON as bytes in a bounded deque."""

    async def start(self) -> dict[str, Any]:
        self.items: collections.deque[bytes] = collections.deque(maxlen=int(self.args.get("size", 100_000)))
        gc.collect()
        return {}

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        if command["op"] == "fill":
            for n in range(int(command["count"])):
                event = {"event_type": EVENT_TYPE, "event_id": f"{n:032x}", "payload": payload(n), "offset": n}
                self.items.append(json.dumps(event, separators=(",", ":")).encode())
            gc.collect()
            return {"published": command["count"]}
        return await super().handle(command)


# --- clients ------------------------------------------------------------------------------------------------


class GrpcSubscribersRole(Role):
    """``subscribers`` gRPC streams on one channel: Nexus ``SubscribeEventBatches`` / ``SubscribeEvents`` or
    the bare ``Frames`` / ``RelaySub``. ``collect`` waits until each got ``count`` events; with ``latency`` it
    returns each event's delay since the ``t`` in its payload."""

    async def start(self) -> dict[str, Any]:
        self.kind = self.args["kind"]
        self.latency = bool(self.args.get("latency", False))
        self.channel = grpc.aio.insecure_channel(self.args["address"], options=GRPC_OPTIONS)
        count = int(self.args.get("subscribers", 1))
        self.counts = [0] * count
        self.latencies: list[float] = []
        self.target = 0
        self.done = 0
        self.finished = asyncio.Event()
        calls = [self._call() for _ in range(count)]
        await asyncio.gather(*(call.initial_metadata() for call in calls))
        self.tasks = [asyncio.create_task(self._read(index, call)) for index, call in enumerate(calls)]
        return {}

    def _call(self) -> Any:
        stub = nexus_pb2_grpc.NexusServiceStub(self.channel)
        pattern = self.args.get("pattern", "bench:tick:>")
        if self.kind == "batches":
            return stub.SubscribeEventBatches(nexus_pb2.SubscribeEventBatchesRequest(event_types=[pattern]))
        if self.kind == "batches-json":
            return stub.SubscribeEventBatches(
                nexus_pb2.SubscribeEventBatchesRequest(
                    event_types=[pattern], payload_encoding=nexus_pb2.PAYLOAD_ENCODING_JSON
                )
            )
        if self.kind == "single":
            return stub.SubscribeEvents(nexus_pb2.SubscribeRequest(event_types=[pattern]))
        method = "Frames" if self.kind in ("bare-batches", "bare-single") else "RelaySub"
        decode = (
            nexus_pb2.SubscribeEventBatchesResponse.FromString
            if self.kind == "bare-batches"
            else nexus_pb2.EventResponse.FromString
        )
        call = self.channel.unary_stream(f"/{BARE_SERVICE}/{method}", response_deserializer=decode)
        return call(b"")

    async def _read(self, index: int, call: Any) -> None:
        batched = self.kind in ("batches", "batches-json", "bare-batches")
        async for message in call:
            events = message.events if batched else (message,)
            if self.latency:
                now = time.monotonic()
                self.latencies.extend((now - e.payload.fields["t"].number_value) * 1000 for e in events)
            before = self.counts[index]
            self.counts[index] = before + len(events)
            if before < self.target <= self.counts[index]:
                self.done += 1
                if self.done == len(self.counts):
                    self.finished.set()

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        if command["op"] != "collect":
            return await super().handle(command)
        self.target = int(command["count"])
        self.done = sum(1 for c in self.counts if c >= self.target)
        if self.done == len(self.counts):
            self.finished.set()
        timed_out = False
        try:
            await asyncio.wait_for(self.finished.wait(), float(command.get("timeout", 60)))
        except TimeoutError:
            timed_out = True
        failed = [repr(t.exception()) for t in self.tasks if t.done() and t.exception() is not None]
        reply: dict[str, Any] = {"received": sum(self.counts), "timed_out": timed_out, "errors": failed[:3]}
        if self.latency:
            reply["latency_ms"] = latency_summary(self.latencies)
            reply["latency_samples"] = len(self.latencies)
        self.counts = [0] * len(self.counts)
        self.latencies = []
        self.target = 0
        self.done = 0
        self.finished.clear()
        return reply

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.channel.close()


class GrpcPublisherRole(Role):
    """Publishes ``count`` events: Nexus ``EmitEvent`` (``concurrency`` in flight) or ``PublishEvents``, or the
    bare ``Emit`` / ``Publish`` / ``Relay``; with ``rate``, paced at that many a second (for latency)."""

    async def start(self) -> dict[str, Any]:
        self.kind = self.args["kind"]
        self.channel = grpc.aio.insecure_channel(self.args["address"], options=GRPC_OPTIONS)
        await self.channel.channel_ready()
        stub = nexus_pb2_grpc.NexusServiceStub(self.channel)
        self.emit: Any = stub.EmitEvent
        self.publish_stream: Any = stub.PublishEvents
        if self.kind.startswith("bare"):
            self.emit = self.channel.unary_unary(
                f"/{BARE_SERVICE}/Emit",
                request_serializer=nexus_pb2.EventRequest.SerializeToString,
                response_deserializer=nexus_pb2.EventResponse.FromString,
            )
            self.publish_stream = self.channel.stream_unary(
                f"/{BARE_SERVICE}/Publish",
                request_serializer=nexus_pb2.PublishEventsRequest.SerializeToString,
                response_deserializer=nexus_pb2.PublishEventsResponse.FromString,
            )
        self.relay = self.channel.unary_unary(f"/{BARE_SERVICE}/Relay", request_serializer=None)
        return {}

    def _request(self, n: int) -> nexus_pb2.EventRequest:
        return nexus_pb2.EventRequest(event_type=EVENT_TYPE, payload=struct_of(payload(n)))

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        if command["op"] != "run":
            return await super().handle(command)
        count = int(command["count"])
        started = time.perf_counter()
        if command.get("rate"):
            await self._paced(count, float(command["rate"]))
        elif command.get("stream"):
            item = nexus_pb2.PublishEventsRequest(event=self._request(0))

            async def requests() -> AsyncIterator[nexus_pb2.PublishEventsRequest]:
                for _ in range(count):
                    yield item

            await self.publish_stream(requests(), timeout=300)
        else:
            request = self._request(0)
            remaining = count

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await self.emit(request, timeout=60)

            await asyncio.gather(*(worker() for _ in range(int(command.get("concurrency", 1)))))
        return {"elapsed": time.perf_counter() - started}

    async def _paced(self, count: int, rate: float) -> None:
        pending: set[asyncio.Task[Any]] = set()
        start = time.monotonic()
        relay = self.kind == "bare-relay"
        for n in range(count):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if relay:
                body = bare_event(n, n + 1).SerializeToString()
                task = asyncio.ensure_future(self.relay(body, timeout=60))
            else:
                task = asyncio.ensure_future(self.emit(self._request(n), timeout=60))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)

    async def stop(self) -> None:
        await self.channel.close()


class HandlerWorkerRole(Role):
    """A worker process (:class:`nexus.worker.Worker`) serving :func:`chunks_handler` for the server at
    ``address``, ``max_in_flight`` requests at once; ready once the server accepted it."""

    async def start(self) -> dict[str, Any]:
        from nexus.logs import configure_logging
        from nexus.plugins import HandlerSpec
        from nexus.worker import Worker, WorkerSettings

        configure_logging("json", "error")
        spec = HandlerSpec("bench.chunks", chunks_handler(), "nexus bench")
        settings = WorkerSettings(max_in_flight=int(self.args.get("max_in_flight", 16)), name="bench")
        self.worker = Worker(self.args["address"], [spec], settings)
        self.task = asyncio.create_task(self.worker.run())
        registered = asyncio.create_task(self.worker.wait_registered(60))
        await asyncio.wait({self.task, registered}, return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            self.task.result()
        await registered
        return {}

    async def stop(self) -> None:
        self.worker.stop()
        await self.task


class GrpcRequestersRole(Role):
    """``run``: ``count`` streaming requests of ``chunks`` chunks each through ``RequestEvent``, ``concurrency``
    at a time; answers the seconds it took and the chunks that arrived."""

    async def start(self) -> dict[str, Any]:
        from nexus.client import NexusClient

        self.client = NexusClient(self.args["address"])
        await self.client.wait_ready()
        return {}

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        if command["op"] != "run":
            return await super().handle(command)
        remaining = int(command["count"])
        chunks = int(command["chunks"])
        received = 0
        outcomes: collections.Counter[str] = collections.Counter()

        async def requester() -> None:
            nonlocal remaining, received
            while remaining > 0:
                remaining -= 1
                async for event in self.client.request(CHUNKS_TYPE, {"chunks": chunks}, heartbeats=False):
                    if event.state == "stream":
                        received += 1
                    elif event.state != "started":
                        outcomes[event.state] += 1

        started = time.perf_counter()
        await asyncio.gather(*(requester() for _ in range(int(command.get("concurrency", 1)))))
        return {"elapsed": time.perf_counter() - started, "received": received, "outcomes": dict(outcomes)}

    async def stop(self) -> None:
        await self.client.close()


class HeartbeatClientsRole(Role):
    """``streams`` long-running gRPC streams (Nexus ``RequestEvent`` of a handler that holds them open, or the
    bare ``Hold``), spread over 10 channels; ``jitter`` measures how far heartbeat intervals stray."""

    async def start(self) -> dict[str, Any]:
        self.bare = bool(self.args.get("bare", False))
        self.arrivals: list[list[float]] = []
        self.channels = [grpc.aio.insecure_channel(self.args["address"], options=GRPC_OPTIONS) for _ in range(10)]
        count = int(self.args["streams"])
        started = [asyncio.get_running_loop().create_future() for _ in range(count)]
        self.tasks = [asyncio.create_task(self._follow(index, started[index])) for index in range(count)]
        await asyncio.wait_for(asyncio.gather(*started), 120)
        return {}

    async def _follow(self, index: int, started: asyncio.Future[None]) -> None:
        channel = self.channels[index % len(self.channels)]
        arrivals: list[float] = []
        self.arrivals.append(arrivals)
        if self.bare:
            call = channel.unary_stream(f"/{BARE_SERVICE}/Hold", response_deserializer=None)(b"")
            await call.initial_metadata()
            started.set_result(None)
            async for _ in call:
                arrivals.append(time.monotonic())
            return
        stub = nexus_pb2_grpc.NexusServiceStub(channel)
        request = nexus_pb2.RequestEventRequest(event=nexus_pb2.EventRequest(event_type=HOLD_TYPE))
        async for message in stub.RequestEvent(request):
            if not started.done():
                started.set_result(None)
            if message.event.event_type.endswith(":heartbeat"):
                arrivals.append(time.monotonic())

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        if command["op"] != "jitter":
            return await super().handle(command)
        interval = float(command["interval"])
        for arrivals in self.arrivals:
            arrivals.clear()
        await asyncio.sleep(float(command["seconds"]))
        deviations = [
            abs(later - earlier - interval) * 1000
            for arrivals in self.arrivals
            for earlier, later in itertools.pairwise(arrivals)
        ]
        failed = [repr(t.exception()) for t in self.tasks if t.done() and t.exception() is not None]
        return {"jitter_ms": latency_summary(deviations), "intervals": len(deviations), "errors": failed[:3]}

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for channel in self.channels:
            await channel.close()


class WebSocketClientsRole(Role):
    """``connections`` WebSockets to the Nexus gateway or a bare server: ``subscribe`` (count events with
    ``collect``), ``stream`` (each starts a streaming request that stays open) or ``idle``."""

    async def start(self) -> dict[str, Any]:
        from websockets.asyncio.client import connect

        self.connect = connect
        self.bare = bool(self.args.get("bare", False))
        self.mode = self.args.get("mode", "idle")
        count = int(self.args["connections"])
        self.counts = [0] * count
        self.sockets: list[Any] = []
        self.tasks: list[asyncio.Task[None]] = []
        gate = asyncio.Semaphore(50)
        opened = await asyncio.gather(*(self._open(index, gate) for index in range(count)))
        self.sockets = list(opened)
        self.tasks = [asyncio.create_task(self._read(i, ws)) for i, ws in enumerate(self.sockets)]
        return {}

    async def _open(self, index: int, gate: asyncio.Semaphore) -> Any:
        async with gate:
            ws = await self.connect(self.args["url"], max_size=None, max_queue=None, open_timeout=60, compression=None)
            if self.bare:
                return ws
            json.loads(await ws.recv())  # the "connection" frame
            if self.mode == "subscribe":
                await ws.send(json.dumps({"type": "subscribe", "event_types": ["bench:tick:>"]}))
                while json.loads(await ws.recv()).get("type") != "subscribed":
                    pass
            elif self.mode == "stream":
                await ws.send(json.dumps({"type": HOLD_TYPE, "payload": {}}))
                while not str(json.loads(await ws.recv()).get("type", "")).endswith(":started"):
                    pass
            return ws

    async def _read(self, index: int, ws: Any) -> None:
        async for message in ws:
            if "bench:tick" in message:
                self.counts[index] += 1

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        if command["op"] != "collect":
            return await super().handle(command)
        target = int(command["count"])
        deadline = time.monotonic() + float(command.get("timeout", 60))
        while min(self.counts) < target and time.monotonic() < deadline:  # noqa: ASYNC110 (polled: no per-frame event)
            await asyncio.sleep(0.005)
        failed = [repr(t.exception()) for t in self.tasks if t.done() and t.exception() is not None]
        reply = {"received": sum(self.counts), "timed_out": min(self.counts) < target, "errors": failed[:3]}
        self.counts = [0] * len(self.counts)
        return reply

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)


ROLES: dict[str, type[Role]] = {
    "nexus-server": NexusServerRole,
    "bare-grpc": BareGrpcRole,
    "bare-ws": BareWebSocketRole,
    "bare-nats": BareNatsRole,
    "bare-history": BareHistoryRole,
    "grpc-subscribers": GrpcSubscribersRole,
    "grpc-publisher": GrpcPublisherRole,
    "heartbeat-clients": HeartbeatClientsRole,
    "handler-worker": HandlerWorkerRole,
    "grpc-requesters": GrpcRequestersRole,
    "ws-clients": WebSocketClientsRole,
}


def _write(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def serve(role: Role) -> None:
    """Start ``role``, report ready, then answer commands from stdin until ``stop`` or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        info = await role.start()
    except Exception as exc:
        _write({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    _write({"ready": True, "pid": os.getpid(), **info})
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command.get("op") == "stop":
                break
            try:
                reply = await role.handle(command)
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            _write(reply)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(role.stop(), 10)
        _write({"stopped": True})


def main(argv: list[str]) -> None:
    role = ROLES[argv[0]](json.loads(argv[1]) if len(argv) > 1 else {})
    if role.args.get("loop") == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(role))
    else:
        asyncio.run(serve(role))


if __name__ == "__main__":
    main(sys.argv[1:])
