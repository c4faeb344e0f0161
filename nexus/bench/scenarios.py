"""The scenarios of ``nexus bench``: each measures one path of Nexus (``run_nexus``) and the same work done by
the bare library it is built on (``run_bare``), one sample per call, in fresh processes.

A sample holds what the scenario measures: ``events_per_s`` (events, calls or deliveries a second, as the
client saw them), ``cpu_us`` (server CPU microseconds per event, call or delivery, from ``/proc``),
``latency_ms`` / ``jitter_ms`` (p50, p99, p99.9) and ``rss_kb`` (resident memory per connection, stream or
retained event).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import time
import urllib.parse
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any, ClassVar

from nexus.bench.procs import Worker, WorkerError, worker

Sample = dict[str, Any]
Summary = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and where NATS is: ``quick`` makes every scenario small (seconds each)."""

    quick: bool = False
    nats_url: str = "nats://127.0.0.1:4222"

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


class Scenario:
    """One row of the report. Subclasses set the class attributes and the two ``run_*`` methods."""

    name: ClassVar[str]
    title: ClassVar[str]
    baseline: ClassVar[str]
    unit: ClassVar[str] = "event"
    target: ClassVar[str] = ""
    timeout: ClassVar[float] = 300.0

    def __init__(self, config: Config) -> None:
        self.config = config

    async def unavailable(self) -> str | None:
        """Why this scenario cannot run here (skipped with that reason), or ``None``."""
        return None

    async def run_nexus(self) -> Sample:
        raise NotImplementedError

    async def run_bare(self) -> Sample:
        raise NotImplementedError

    def met(self, summary: Summary) -> bool | None:
        """Whether the target holds for the medians and ratios in ``summary`` (``None``: no target)."""
        return None


def _le(value: Any, limit: float) -> bool:
    return value is not None and value <= limit


def _ge(value: Any, limit: float) -> bool:
    return value is not None and value >= limit


SERVER_DEFAULTS: dict[str, Any] = {"subscriber_queue": 1_000_000, "history_size": 100_000}


def nexus_server(config: Config, loop: str = "asyncio", **settings: Any) -> tuple[str, dict[str, Any]]:
    """The worker spec of a Nexus server: ``settings`` overrides, ``_extra`` more worker args (``preload``,
    ``nonmatching``)."""
    extra = settings.pop("_extra", {})
    return "nexus-server", {"settings": dict(SERVER_DEFAULTS, **settings), "loop": loop, **extra}


async def _deliveries(
    server: Worker, clients: list[Worker], count: int, per_client: int, **publish: Any
) -> tuple[float, float, list[dict[str, Any]]]:
    """Publish ``count`` events in ``server`` while ``clients`` collect them: (seconds, server CPU seconds,
    the clients' answers). Raises :class:`WorkerError` when a client did not get them all."""
    cpu = server.cpu()
    started = time.perf_counter()
    timeout = max(60.0, count * per_client / 2_000)
    replies = await asyncio.gather(
        server.call(op="publish", count=count, **publish),
        *(client.call(op="collect", count=count, timeout=timeout) for client in clients),
    )
    elapsed = time.perf_counter() - started
    used = server.cpu() - cpu
    answers = replies[1:]
    for answer in answers:
        if answer.get("timed_out"):
            raise WorkerError(f"a client got {answer['received']} of {count * per_client} events {answer['errors']}")
    return elapsed, used, answers


class Batched(Scenario):
    name = "batched"
    title = "gRPC SubscribeEventBatches, live publish → delivery, 1 subscriber"
    baseline = "bare grpcio stream of pre-serialized frames of 100 events"
    target = "≤ 5 µs server CPU per event and ≥ 150,000 events/s"
    subscribers = 1
    loop = "asyncio"

    def count(self) -> int:
        return self.config.size(100_000, 50_000)

    async def _run(self, server_spec: tuple[str, dict[str, Any]], kind: str, **publish: Any) -> Sample:
        count = self.count()
        async with AsyncExitStack() as stack:
            server = await stack.enter_async_context(worker(*server_spec))
            client = await stack.enter_async_context(
                worker(
                    "grpc-subscribers",
                    {"address": server.info["grpc"], "kind": kind, "subscribers": self.subscribers},
                )
            )
            await _deliveries(server, [client], min(1_000, count), self.subscribers, **publish)  # warm-up
            elapsed, cpu, _ = await _deliveries(server, [client], count, self.subscribers, **publish)
        deliveries = count * self.subscribers
        return {"events_per_s": deliveries / elapsed, "cpu_us": cpu * 1e6 / deliveries}

    async def run_nexus(self) -> Sample:
        return await self._run(nexus_server(self.config, self.loop), "batches")

    async def run_bare(self) -> Sample:
        return await self._run(("bare-grpc", {"loop": self.loop}), "bare-batches", per_frame=100)

    def met(self, summary: Summary) -> bool | None:
        return _le(summary["nexus"].get("cpu_us"), 5.0) and _ge(summary["nexus"].get("events_per_s"), 150_000)


class Batched10(Batched):
    name = "batched_10"
    title = "gRPC SubscribeEventBatches, 10 subscribers (per delivery)"
    unit = "delivery"
    target = ""
    subscribers = 10

    def count(self) -> int:
        return self.config.size(20_000, 3_000)

    def met(self, summary: Summary) -> bool | None:
        return None


class Batched100(Batched10):
    name = "batched_100"
    title = "gRPC SubscribeEventBatches, 100 subscribers (per delivery)"
    subscribers = 100

    def count(self) -> int:
        return self.config.size(3_000, 500)


class BatchedJson(Batched):
    name = "batched_json"
    title = "gRPC SubscribeEventBatches, 1 subscriber asking for JSON payloads (payload_json)"

    async def run_nexus(self) -> Sample:
        return await self._run(nexus_server(self.config, self.loop), "batches-json")


class BatchedUvloop(Batched):
    name = "batched_uvloop"
    title = "gRPC SubscribeEventBatches, 1 subscriber, both servers on uvloop"
    baseline = "bare grpcio stream of frames of 100 events, on uvloop"
    loop = "uvloop"

    async def unavailable(self) -> str | None:
        if importlib.util.find_spec("uvloop") is None:
            return "uvloop is not installed (pip install uvloop)"
        return None


class Single(Batched):
    name = "single"
    title = "gRPC SubscribeEvents, one event per frame"
    baseline = "bare grpcio stream, one message per frame"
    target = "≤ 1.25x the bare CPU per event"

    def count(self) -> int:
        return self.config.size(20_000, 1_000)

    async def run_nexus(self) -> Sample:
        return await self._run(nexus_server(self.config), "single")

    async def run_bare(self) -> Sample:
        return await self._run(("bare-grpc", {}), "bare-single", per_frame=1)

    def met(self, summary: Summary) -> bool | None:
        return _le(summary["ratios"].get("cpu_us"), 1.25)


async def _publisher_run(
    server_spec: tuple[str, dict[str, Any]], kind: str, count: int, **run: Any
) -> tuple[float, float]:
    """A publisher process sends ``count`` events to a server: (client-side seconds, server CPU seconds)."""
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(worker(*server_spec))
        client = await stack.enter_async_context(
            worker("grpc-publisher", {"address": server.info["grpc"], "kind": kind})
        )
        await client.call(op="run", count=max(10, count // 10), **run)  # warm-up
        cpu = server.cpu()
        answer = await client.call(op="run", count=count, **run)
        return float(answer["elapsed"]), server.cpu() - cpu


class EmitSequential(Scenario):
    name = "emit_sequential"
    title = "EmitEvent, one call at a time"
    baseline = "bare grpcio unary echo server storing into a list"
    unit = "call"
    target = "≤ 1.25x the bare CPU per call"
    concurrency = 1

    def count(self) -> int:
        return self.config.size(5_000, 300)

    async def _sample(self, spec: tuple[str, dict[str, Any]], kind: str) -> Sample:
        count = self.count()
        elapsed, cpu = await _publisher_run(spec, kind, count, concurrency=self.concurrency)
        return {"events_per_s": count / elapsed, "cpu_us": cpu * 1e6 / count}

    async def run_nexus(self) -> Sample:
        return await self._sample(nexus_server(self.config), "nexus")

    async def run_bare(self) -> Sample:
        return await self._sample(("bare-grpc", {}), "bare")

    def met(self, summary: Summary) -> bool | None:
        return _le(summary["ratios"].get("cpu_us"), 1.25)


class Emit50(EmitSequential):
    name = "emit_50"
    title = "EmitEvent, 50 calls in flight"
    concurrency = 50

    def count(self) -> int:
        return self.config.size(10_000, 500)


class PublishStream(EmitSequential):
    name = "publish_stream"
    title = "PublishEvents client stream"
    baseline = "bare grpcio client-streaming server storing into a list"
    unit = "event"
    target = "≤ 1.3x the bare CPU per event"

    def count(self) -> int:
        return self.config.size(20_000, 1_000)

    async def _sample(self, spec: tuple[str, dict[str, Any]], kind: str) -> Sample:
        count = self.count()
        elapsed, cpu = await _publisher_run(spec, kind, count, stream=True)
        return {"events_per_s": count / elapsed, "cpu_us": cpu * 1e6 / count}

    def met(self, summary: Summary) -> bool | None:
        return _le(summary["ratios"].get("cpu_us"), 1.3)


class Latency(Scenario):
    name = "latency"
    title = "publish → delivery latency at 1k events/s, 100,000 events in history"
    baseline = "bare grpcio relay: publish RPC → fan-out queue → stream"
    target = "p99 ≤ 3 ms and p99.9 ≤ 6 ms"
    rate = 1_000.0

    async def _sample(self, spec: tuple[str, dict[str, Any]], sub_kind: str, pub_kind: str) -> Sample:
        count = self.config.size(10_000, 1_000)
        async with AsyncExitStack() as stack:
            server = await stack.enter_async_context(worker(*spec, timeout=600))
            address = server.info["grpc"]
            sub = await stack.enter_async_context(
                worker("grpc-subscribers", {"address": address, "kind": sub_kind, "latency": True})
            )
            pub = await stack.enter_async_context(worker("grpc-publisher", {"address": address, "kind": pub_kind}))
            warm = max(50, count // 20)
            await asyncio.gather(
                pub.call(op="run", count=warm, rate=self.rate), sub.call(op="collect", count=warm, timeout=60)
            )
            cpu = server.cpu()
            answers = await asyncio.gather(
                pub.call(op="run", count=count, rate=self.rate),
                sub.call(op="collect", count=count, timeout=count / self.rate + 60),
            )
            answer = answers[1]
            used = server.cpu() - cpu
        if answer.get("timed_out"):
            raise WorkerError(f"the subscriber got {answer['received']} of {count} events")
        return {"latency_ms": answer["latency_ms"], "cpu_us": used * 1e6 / count}

    async def run_nexus(self) -> Sample:
        preload = self.config.size(100_000, 5_000)
        spec = nexus_server(self.config, history_size=max(100_000, preload), _extra={"preload": preload})
        return await self._sample(spec, "batches", "nexus")

    async def run_bare(self) -> Sample:
        return await self._sample(("bare-grpc", {}), "relay", "bare-relay")

    def met(self, summary: Summary) -> bool | None:
        latency = summary["nexus"].get("latency_ms") or {}
        return _le(latency.get("p99"), 3.0) and _le(latency.get("p999"), 6.0)


class NatsScenario(Scenario):
    async def unavailable(self) -> str | None:
        try:
            import nats

            address = urllib.parse.urlsplit(self.config.nats_url)
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(address.hostname or "127.0.0.1", address.port or 4222), 3
            )
            writer.close()
            connection = await asyncio.wait_for(
                nats.connect(self.config.nats_url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0),
                5,
            )
        except Exception as exc:
            return f"no NATS at {self.config.nats_url} ({type(exc).__name__}; use --nats URL)"
        try:
            await connection.jetstream().account_info()
        except Exception as exc:
            return f"NATS at {self.config.nats_url} has no JetStream ({type(exc).__name__})"
        finally:
            await connection.close()
        return None

    def names(self) -> tuple[str, str]:
        token = uuid.uuid4().hex[:10]
        return f"BENCH_{token}", f"bench_{token}"

    def nexus_spec(self) -> tuple[str, dict[str, Any]]:
        stream, prefix = self.names()
        return nexus_server(
            self.config, bus=self.config.nats_url, nats_stream=stream, nats_subject_prefix=prefix, history_size=10_000
        )

    async def bare_publish(self, count: int, mode: str) -> Sample:
        stream, prefix = self.names()
        async with worker("bare-nats", {"url": self.config.nats_url}) as bare:
            await bare.call(op="prepare", stream=stream, prefix=prefix)
            await bare.call(op="publish", count=max(10, count // 10), mode=mode)  # warm-up
            cpu = bare.cpu()
            started = time.perf_counter()
            await bare.call(op="publish", count=count, mode=mode)
            elapsed = time.perf_counter() - started
            used = bare.cpu() - cpu
            await bare.call(op="cleanup")
        return {"events_per_s": count / elapsed, "cpu_us": used * 1e6 / count}


class NatsStream(NatsScenario):
    name = "nats_stream"
    title = "NATS bus: publish_many in the server (100 at a time) → gRPC batched subscriber"
    baseline = "bare nats-py JetStream async publish"
    target = "≥ 0.7x the bare events/s"
    many = 100

    def count(self) -> int:
        return self.config.size(20_000, 2_000)

    async def run_nexus(self) -> Sample:
        count = self.count()
        async with AsyncExitStack() as stack:
            server = await stack.enter_async_context(worker(*self.nexus_spec()))
            client = await stack.enter_async_context(
                worker("grpc-subscribers", {"address": server.info["grpc"], "kind": "batches"})
            )
            await _deliveries(server, [client], max(100, count // 10), 1, many=self.many)  # warm-up
            elapsed, cpu, _ = await _deliveries(server, [client], count, 1, many=self.many)
        return {"events_per_s": count / elapsed, "cpu_us": cpu * 1e6 / count}

    async def run_bare(self) -> Sample:
        return await self.bare_publish(self.count(), "async")

    def met(self, summary: Summary) -> bool | None:
        return _ge(summary["ratios"].get("events_per_s"), 0.7)


class NatsSequential(NatsStream):
    name = "nats_sequential"
    title = "NATS bus: the server publishes one event at a time (each awaited) → gRPC batched subscriber"
    baseline = "bare nats-py sequential JetStream publish"
    target = "≥ 0.8x the bare events/s"
    many = 0

    def count(self) -> int:
        return self.config.size(5_000, 500)

    async def run_bare(self) -> Sample:
        return await self.bare_publish(self.count(), "sequential")

    def met(self, summary: Summary) -> bool | None:
        return _ge(summary["ratios"].get("events_per_s"), 0.8)


class Gateway(Scenario):
    name = "gateway"
    title = "WebSocket gateway → 100 clients (per delivery)"
    baseline = "websockets broadcast() on a bare server"
    unit = "delivery"
    target = "≤ 0.8x the bare CPU per delivery"

    async def _sample(self, spec: tuple[str, dict[str, Any]], bare: bool) -> Sample:
        connections = self.config.size(100, 20)
        count = self.config.size(2_000, 200)
        async with AsyncExitStack() as stack:
            server = await stack.enter_async_context(worker(*spec))
            args = {"url": server.info["ws"], "connections": connections, "mode": "subscribe", "bare": bare}
            clients = await stack.enter_async_context(worker("ws-clients", args))
            await _deliveries(server, [clients], min(100, count), connections)
            elapsed, cpu, _ = await _deliveries(server, [clients], count, connections)
        deliveries = count * connections
        return {"events_per_s": deliveries / elapsed, "cpu_us": cpu * 1e6 / deliveries}

    async def run_nexus(self) -> Sample:
        return await self._sample(nexus_server(self.config, gateway=True), bare=False)

    async def run_bare(self) -> Sample:
        return await self._sample(("bare-ws", {}), bare=True)

    def met(self, summary: Summary) -> bool | None:
        return _le(summary["ratios"].get("cpu_us"), 0.8)


class Subscriptions(Batched):
    name = "subscriptions"
    title = "10,000 non-matching subscriptions, batched gRPC subscriber (CPU 10k / 10)"
    baseline = "the same server with 10 non-matching subscriptions"
    target = "flat: ≤ 1.2x the CPU per event with 10"

    def count(self) -> int:
        return self.config.size(50_000, 3_000)

    async def run_nexus(self) -> Sample:
        many = self.config.size(10_000, 1_000)
        return await self._run(nexus_server(self.config, _extra={"nonmatching": many}), "batches")

    async def run_bare(self) -> Sample:
        return await self._run(nexus_server(self.config, _extra={"nonmatching": 10}), "batches")

    def met(self, summary: Summary) -> bool | None:
        return _le(summary["ratios"].get("cpu_us"), 1.2)


async def _rss_per_item(
    spec: tuple[str, dict[str, Any]], client: tuple[str, Callable[[Worker], dict[str, Any]]], items: int
) -> float:
    """Resident KB the server grows by per connection or stream a client process opens."""
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(worker(*spec))
        await asyncio.sleep(0.5)
        before = server.rss()
        await stack.enter_async_context(worker(client[0], client[1](server), timeout=300))
        await asyncio.sleep(1.0)
        return (server.rss() - before) / 1024 / items


class IdleWebSockets(Scenario):
    name = "rss_idle_websockets"
    title = "RSS per idle WebSocket (1,000 connections)"
    baseline = "bare websockets server"
    unit = "connection"
    target = "≤ 15 KB per idle WebSocket"

    def items(self) -> int:
        return self.config.size(1_000, 100)

    async def _sample(self, spec: tuple[str, dict[str, Any]], bare: bool, mode: str = "idle") -> Sample:
        items = self.items()

        def args(server: Worker) -> dict[str, Any]:
            return {"url": server.info["ws"], "connections": items, "mode": mode, "bare": bare}

        return {"rss_kb": await _rss_per_item(spec, ("ws-clients", args), items)}

    async def run_nexus(self) -> Sample:
        return await self._sample(nexus_server(self.config, gateway=True), bare=False)

    async def run_bare(self) -> Sample:
        return await self._sample(("bare-ws", {}), bare=True)

    def met(self, summary: Summary) -> bool | None:
        return _le(summary["nexus"].get("rss_kb"), 15.0)


class ActiveStreams(IdleWebSockets):
    name = "rss_active_streams"
    title = "RSS per active stream (500 WebSockets, each with a streaming request)"
    baseline = "bare websockets server, a heartbeat task per connection"
    unit = "stream"
    target = "≤ 25 KB per active stream"

    def items(self) -> int:
        return self.config.size(500, 50)

    async def run_nexus(self) -> Sample:
        return await self._sample(nexus_server(self.config, gateway=True), bare=False, mode="stream")

    async def run_bare(self) -> Sample:
        return await self._sample(("bare-ws", {"streams": True}), bare=True)

    def met(self, summary: Summary) -> bool | None:
        return _le(summary["nexus"].get("rss_kb"), 25.0)


class HeartbeatJitter(Scenario):
    name = "heartbeat_jitter"
    title = "heartbeat jitter with 1,000 gRPC streams"
    baseline = "bare grpcio streams, each a sleep-and-send loop"
    unit = "stream"
    target = "p99 ≤ 5 ms"

    async def _sample(self, spec: tuple[str, dict[str, Any]], bare: bool, interval: float) -> Sample:
        streams = self.config.size(1_000, 100)
        seconds = self.config.size(6, 2)
        async with AsyncExitStack() as stack:
            server = await stack.enter_async_context(worker(*spec))
            args = {"address": server.info["grpc"], "streams": streams, "bare": bare}
            clients = await stack.enter_async_context(worker("heartbeat-clients", args, timeout=300))
            await asyncio.sleep(interval)
            answer = await clients.call(op="jitter", seconds=seconds, interval=interval)
        if not answer["intervals"]:
            raise WorkerError(f"no heartbeats arrived {answer['errors']}")
        return {"jitter_ms": answer["jitter_ms"]}

    def interval(self) -> float:
        return 1.0 if not self.config.quick else 0.25

    async def run_nexus(self) -> Sample:
        spec = nexus_server(self.config, heartbeat_interval=self.interval())
        return await self._sample(spec, False, self.interval())

    async def run_bare(self) -> Sample:
        return await self._sample(("bare-grpc", {"interval": self.interval()}), True, self.interval())

    def met(self, summary: Summary) -> bool | None:
        return _le((summary["nexus"].get("jitter_ms") or {}).get("p99"), 5.0)


class HistoryMemory(Scenario):
    name = "rss_history"
    title = "RSS per retained event (history full, 200-byte payload)"
    baseline = "each event's compact JSON as bytes in a deque"
    unit = "retained event"
    target = "≤ 600 bytes (0.59 KB) per retained event"

    async def _sample(self, spec: tuple[str, dict[str, Any]]) -> Sample:
        count = self.config.size(100_000, 10_000)
        async with worker(*spec) as server:
            before = server.rss()
            await server.call(op="fill", count=count)
            return {"rss_kb": (server.rss() - before) / 1024 / count}

    async def run_nexus(self) -> Sample:
        count = self.config.size(100_000, 10_000)
        return await self._sample(nexus_server(self.config, history_size=count, history_max_bytes=1 << 40))

    async def run_bare(self) -> Sample:
        return await self._sample(("bare-history", {"size": self.config.size(100_000, 10_000)}))

    def met(self, summary: Summary) -> bool | None:
        return _le(summary["nexus"].get("rss_kb"), 600 / 1024)


class RemoteHandler(Scenario):
    name = "remote_handler"
    title = "a streaming handler in a worker process (WorkerService): request → 1,000 chunks → success"
    baseline = "the same handler in the server's own process"
    unit = "chunk"
    target = "≤ twice the in-process server CPU per chunk"

    async def _sample(self, remote: bool) -> Sample:
        requests = self.config.size(40, 8)
        chunks = 1_000
        concurrency = 8
        spec = nexus_server(self.config, _extra={"chunks_in_process": not remote})
        async with AsyncExitStack() as stack:
            server = await stack.enter_async_context(worker(*spec))
            address = server.info["grpc"]
            if remote:
                await stack.enter_async_context(
                    worker("handler-worker", {"address": address, "max_in_flight": concurrency})
                )
            clients = await stack.enter_async_context(worker("grpc-requesters", {"address": address}))
            await clients.call(op="run", count=concurrency, chunks=100, concurrency=concurrency)  # warm up
            cpu = server.cpu()
            answer = await clients.call(op="run", count=requests, chunks=chunks, concurrency=concurrency)
            used = server.cpu() - cpu
        expected = requests * chunks
        if answer.get("error") or answer["received"] != expected or answer["outcomes"] != {"success": requests}:
            raise WorkerError(f"expected {expected} chunks and {requests} successes, got {answer}")
        return {"events_per_s": expected / answer["elapsed"], "cpu_us": used * 1e6 / expected}

    async def run_nexus(self) -> Sample:
        return await self._sample(remote=True)

    async def run_bare(self) -> Sample:
        return await self._sample(remote=False)

    def met(self, summary: Summary) -> bool | None:
        return _le(summary["ratios"].get("cpu_us"), 2.0)


SCENARIOS: list[type[Scenario]] = [
    Batched,
    BatchedJson,
    Batched10,
    Batched100,
    BatchedUvloop,
    Single,
    EmitSequential,
    Emit50,
    PublishStream,
    Latency,
    NatsStream,
    NatsSequential,
    Gateway,
    Subscriptions,
    IdleWebSockets,
    ActiveStreams,
    HeartbeatJitter,
    HistoryMemory,
    RemoteHandler,
]
"""Every scenario, in report order."""

BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
