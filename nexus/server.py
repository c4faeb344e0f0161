"""The Nexus server: a :class:`~nexus.node_local.LocalNode` (a bus, a request queue and a provider) and the
transports that adapt it: the gRPC server (health and reflection included) and, when on, the WebSocket gateway.

:class:`NexusServer` is the one object ``nexus serve``, ``nexus.testing`` and embedding applications start::

    server = NexusServer(settings, handlers=[HandlerSpec("echo", Echo(), "--handler")])
    await server.start()          # binds; server.grpc_port is the real port (0 picks a free one)
    await server.wait_stopped()   # or: await server.stop()
"""

from __future__ import annotations

import asyncio
import errno
import gc
import importlib
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final, Protocol, TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nexus.api import AnyHandler
from nexus.auth import Authenticator
from nexus.bus.base import Bus
from nexus.bus.memory import MemoryBus
from nexus.config import Settings
from nexus.errors import ConfigurationError, HandlerConfigError
from nexus.grpc.servicer import NexusServicer, add_to_server
from nexus.grpc.workers import WorkerServicer, add_worker_service
from nexus.kv.base import KeyValueStore
from nexus.kv.sqlite import SqliteKeyValue
from nexus.node_local import LocalNode
from nexus.plugins import HandlerSpec, register_all
from nexus.provider import Provider
from nexus.queue.base import RequestQueue
from nexus.queue.memory import MemoryRequestQueue
from nexus.telemetry import MetricsHttpServer, Telemetry
from nexus.tls import ServerTls
from nexus.tracing import Tracing
from nexus.v1 import nexus_pb2

SERVICE_NAME = nexus_pb2.DESCRIPTOR.services_by_name["NexusService"].full_name
WORKER_SERVICE_NAME = nexus_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
GRPC_PORT_HINT: Final = "choose another with --grpc-port"
WS_PORT_HINT: Final = "choose another with --ws-port or turn the gateway off with --no-gateway"

log = structlog.get_logger("nexus.server")

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: str) -> LoopFactory:
    """The event loop factory ``settings.loop`` names: ``asyncio``, ``uvloop``, or ``auto`` (uvloop if installed).

    ``uvloop`` asked for and not installed is a :class:`~nexus.errors.ConfigurationError` (never a silent fall back
    to the standard loop).
    """
    if choice == "asyncio":
        return asyncio.new_event_loop
    if choice not in ("auto", "uvloop"):
        raise ConfigurationError(f"unknown event loop {choice!r}: use auto, asyncio or uvloop")
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError as exc:
        if choice == "auto":
            return asyncio.new_event_loop
        raise ConfigurationError(
            f"the uvloop event loop was asked for (--loop / NEXUS_LOOP / loop) but cannot be imported ({exc}); "
            "install it with: pip install 'nexus-bus[uvloop]', or choose --loop asyncio"
        ) from None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], *, loop: str = "auto") -> T:
    """Run ``main`` to completion on a new event loop of the kind ``loop`` names (see :func:`loop_factory`)."""
    try:
        factory = loop_factory(loop)
    except BaseException:
        main.close()  # never started: no "never awaited" warning on top of the error
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def freeze_start_up_heap() -> None:
    """Collect once, then leave every object alive after start-up (modules, plugins, settings) out of the garbage
    collector's walks: later full collections walk only what the server made since, which keeps their pauses
    short (the retained history is already held as data the collector never walks)."""
    gc.collect()
    gc.freeze()


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: the kind of event loop the caller runs on."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.partition(".")[0] == "uvloop" else "asyncio"


def make_bus(settings: Settings) -> Bus:
    """The bus ``settings.bus`` names: ``memory`` (default) or a ``nats://`` URL."""
    if settings.bus in ("", "memory"):
        return MemoryBus(
            history_size=settings.history_size,
            history_max_bytes=settings.history_max_bytes,
            dedupe_window_s=settings.dedupe_window_s,
        )
    if settings.bus.startswith(("nats://", "tls://")):
        from nexus.bus.nats import NatsBus  # imported here: a memory-bus node never loads nats-py

        return NatsBus(settings.nats_bus_settings())
    raise HandlerConfigError(f"unknown bus {settings.bus!r}: use 'memory' or a nats:// URL")


def make_request_queue(settings: Settings, bus: Bus) -> RequestQueue:
    """The request queue for ``bus``: this process's consumers on the memory bus, every node's on NATS."""
    if settings.bus in ("", "memory"):
        return MemoryRequestQueue(bus)
    from nexus.bus.nats import NatsBus
    from nexus.queue.nats import NatsRequestQueue

    if not isinstance(bus, NatsBus):
        raise HandlerConfigError(f"the bus {settings.bus!r} needs a NatsBus, got {type(bus).__name__}")
    return NatsRequestQueue(
        bus, node_heartbeat_s=settings.nats_node_heartbeat_s, streaming_rules=settings.streaming_rules
    )


def make_kv_store(settings: Settings, bus: Bus) -> KeyValueStore:
    """The plugins' key-value store (``ctx.kv``) for ``bus``: a JetStream bucket shared by every node with the
    NATS bus, else SQLite in the data directory."""
    nats_bus = sys.modules.get("nexus.bus.nats")  # loaded when the bus is a NatsBus
    if nats_bus is not None and isinstance(bus, nats_bus.NatsBus):
        from nexus.kv.nats import NatsKeyValue

        return NatsKeyValue(bus, settings.kv_bucket_name(), settings.kv_limits())
    return SqliteKeyValue(settings.data_path(), settings.kv_limits())


def ensure_port_free(host: str, port: int, *, what: str, hint: str) -> None:
    """Raise :class:`ConfigurationError` when something already listens on ``host:port``.

    Binds (and closes) a test socket with ``SO_REUSEADDR``, as the servers do, so a port only held by closed
    connections (``TIME_WAIT``) counts as free. Port 0 (any free port) and addresses that do not resolve are
    left to the real bind.
    """
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return
    for family, kind, proto, _, address in addresses:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:  # e.g. no IPv6 on this host
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigurationError(f"the {what} port {host}:{port} is already in use; {hint}") from None


class WebTransport(Protocol):
    """A transport served over HTTP beside gRPC (the WebSocket gateway): started and stopped with the server."""

    port: int

    @property
    def url(self) -> str: ...

    @property
    def http_url(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self, grace: float | None = None) -> None: ...


class NexusServer:
    """A running Nexus node."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        bus: Bus | None = None,
        queue: RequestQueue | None = None,
        handlers: Sequence[HandlerSpec | AnyHandler] = (),
        authenticator: Authenticator | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self._own_tracing = tracing is None
        self.tracing = tracing or (Tracing.create() if self.settings.tracing else Tracing.off())
        """This server's spans (its own tracer provider; tests pass one with an in-memory exporter)."""
        self.authenticator = authenticator if authenticator is not None else self.settings.authenticator()
        """Who clients are, on gRPC and the gateway alike (the settings' JWT verification, or everyone)."""
        self.bus = bus if bus is not None else make_bus(self.settings)
        self.queue = queue if queue is not None else make_request_queue(self.settings, self.bus)
        self.kv = make_kv_store(self.settings, self.bus)
        """The plugins' durable state (``ctx.kv``), opened after the bus and closed before it."""
        self.provider = Provider(
            self.bus, self.settings.provider_settings(), queue=self.queue, tracing=self.tracing, kv=self.kv
        )
        defaults = self.settings.plugin_defaults()
        specs = [h for h in handlers if isinstance(h, HandlerSpec)]
        register_all(self.provider, specs, self.settings.handler_config, defaults)
        for item in handlers:
            if not isinstance(item, HandlerSpec):
                self.provider.register(item, config=dict(defaults))
        self.node = LocalNode(
            self.bus,
            self.provider,
            queue=self.queue,
            kv=self.kv,
            shutdown_grace_s=self.settings.shutdown_grace_s,
            max_patterns_per_subscription=self.settings.max_patterns_per_subscription,
        )
        self.telemetry = Telemetry(enabled=self.settings.metrics)
        """This server's metrics (its own meter provider and Prometheus registry)."""
        self._wire_telemetry()
        self.servicer = NexusServicer(
            self.node,
            subscriber_queue=self.settings.subscriber_queue,
            limits=self.settings.event_limits(),
            client_limits=self.settings.client_limits(),
            authenticator=self.authenticator,
        )
        self.workers = WorkerServicer(
            self.node,
            self.servicer,
            ping_interval_s=self.settings.worker_ping_interval_s,
            worker_timeout_s=self.settings.worker_timeout_s,
        )
        self.metrics_server: MetricsHttpServer | None = None
        self.health = health.aio.HealthServicer()
        self.grpc_port = 0
        self.ws_port = 0
        self.gateway: WebTransport | None = None
        self._grpc: grpc.aio.Server | None = None
        self._tls: ServerTls | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._health_tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        """``host:port`` clients connect to."""
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.grpc_port}"

    async def start(self) -> None:
        """Start the node (the bus, then the provider: handlers' ``setup`` runs here) and the transports.

        A port already in use raises :class:`~nexus.errors.ConfigurationError` naming it and the option that
        changes it, before the node starts when it can be seen beforehand. Whatever fails, what was started is
        stopped again before the error propagates.
        """
        self.settings.check_exposure()  # protected mode: no anonymous server on the network by accident
        self._check_ports()
        self._tls = self.settings.server_tls()  # files that cannot be used: refused before anything starts
        try:
            await self.node.start()
            self._grpc = self._grpc_server()
            await self._grpc.start()
            if self.settings.gateway:
                await self._start_gateway()
            if self.settings.metrics_port is not None:
                self.metrics_server = MetricsHttpServer(self.telemetry, self.node, self.settings.host)
                await self.metrics_server.start(self.settings.metrics_port)
        except BaseException:
            await self._abort_start()
            raise
        self.node.on_health(self._on_node_health)
        await self._set_health(self.node.healthy)
        log.info(
            "server_started",
            grpc=f"{self.settings.host}:{self.grpc_port}",
            tls=self._tls is not None,
            auth=self.settings.auth_enabled,
            ws=f"{self.settings.host}:{self.ws_port}" if self.gateway is not None else None,
            epoch=self.bus.epoch,
            loop=running_loop_name(),
            handlers=sorted(self.provider.registrations),
            **{k: v for k, v in self.bus.describe().items() if k != "epoch"},
        )

    def _wire_telemetry(self) -> None:
        """Hand the telemetry to the node and the provider, and observe the counters they already keep."""
        telemetry = self.telemetry
        self.node.telemetry = telemetry
        self.provider.telemetry = telemetry
        if not telemetry.enabled:
            return
        telemetry.add_services(
            self.provider.registrations[name].service_action.partition(":")[0]
            for name in sorted(self.provider.registrations)
        )
        self.bus.metrics.on_latency = telemetry.delivery_latency
        telemetry.observe("nexus.streams.active", self._observe_streams)
        telemetry.observe("nexus.workers.connected", self._observe_workers)
        telemetry.observe("nexus.workers.lost", lambda: [(self.provider.workers_lost, {})])
        telemetry.observe(
            "nexus.slow_consumer.disconnects", lambda: [(self.bus.stats().slow_consumers, {"nexus__transport": "bus"})]
        )
        telemetry.observe(
            "nexus.subscriptions.active",
            lambda: [
                (self.servicer.subscriptions, {"nexus__transport": "grpc"}),
                (self.bus.stats().subscribers, {"nexus__transport": "bus"}),
            ],
        )
        telemetry.observe(
            "messaging.client.consumed.messages", lambda: [(self.servicer.events_sent, {"nexus__transport": "grpc"})]
        )
        telemetry.observe(
            "nexus.connections.active", lambda: [(self.servicer.connections, {"nexus__transport": "grpc"})]
        )
        telemetry.observe("nexus.history.events", self._observe_history)
        telemetry.observe("nexus.history.bytes", lambda: [(getattr(self.bus, "history_bytes", 0), {})])
        if hasattr(self.bus, "consumer_lag"):  # the NATS bus
            bus: Any = self.bus
            telemetry.observe("nexus.nats.consumer.lag", lambda: [(bus.consumer_lag, {})])
            telemetry.observe("nexus.nats.reconnects", lambda: [(bus.reconnects, {})])

    def _observe_streams(self) -> list[tuple[float, dict[str, str]]]:
        counts = dict.fromkeys(self.provider.registrations, 0)
        for stream in self.provider.streams():
            if stream.get("handler"):
                counts[str(stream["handler"])] = counts.get(str(stream["handler"]), 0) + 1
        return [(count, {"nexus__handler": name}) for name, count in sorted(counts.items())]

    def _observe_workers(self) -> list[tuple[float, dict[str, str]]]:
        return [
            (len(registration.pool.workers), {"nexus__handler": name})
            for name, registration in sorted(self.provider.registrations.items())
            if registration.pool is not None
        ]

    def _observe_history(self) -> list[tuple[float, dict[str, str]]]:
        stats = self.bus.stats()
        held = stats.head_offset - stats.first_offset + 1 if stats.head_offset and stats.first_offset else 0
        return [(max(held, 0), {})]

    def _observe_gateway(self, gateway: WebTransport) -> None:
        stats = getattr(gateway, "stats", None)
        sse = getattr(gateway, "sse", None)
        if stats is None or sse is None:
            return
        telemetry = self.telemetry
        telemetry.observe(
            "nexus.connections.active",
            lambda: [
                (stats.connections, {"nexus__transport": "websocket"}),
                (len(sse.streams), {"nexus__transport": "sse"}),
            ],
        )
        telemetry.observe(
            "nexus.subscriptions.active",
            lambda: [
                (len(sse.streams), {"nexus__transport": "sse"}),
            ],
        )
        telemetry.observe(
            "messaging.client.consumed.messages",
            lambda: [
                (stats.events_sent - stats.sse_events_sent, {"nexus__transport": "websocket"}),
                (stats.sse_events_sent, {"nexus__transport": "sse"}),
            ],
        )
        telemetry.observe(
            "nexus.slow_consumer.disconnects",
            lambda: [
                (stats.too_slow - stats.sse_too_slow, {"nexus__transport": "websocket"}),
                (stats.sse_too_slow, {"nexus__transport": "sse"}),
            ],
        )

    def _check_ports(self) -> None:
        """Refuse ports something already listens on, before anything starts (and logs)."""
        s = self.settings
        if s.gateway and s.grpc_port and s.grpc_port == s.ws_port:
            raise ConfigurationError(
                f"the gRPC and the WebSocket port are both {s.grpc_port}; give them different ports "
                "with --grpc-port and --ws-port"
            )
        ensure_port_free(s.host, s.grpc_port, what="gRPC", hint=GRPC_PORT_HINT)
        if s.gateway:
            ensure_port_free(s.host, s.ws_port, what="WebSocket", hint=WS_PORT_HINT)

    def _grpc_server(self) -> grpc.aio.Server:
        """The gRPC server with the Nexus, health and reflection services, bound to ``settings.grpc_port`` (over
        TLS only when a certificate is set)."""
        max_message = self.settings.max_event_bytes + 64 * 1024
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max(max_message, 4 * 1024 * 1024)),
                ("grpc.max_send_message_length", -1),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # No SO_REUSEPORT: with it a second server binds the same port and the kernel splits clients
                # at random between two unrelated buses.
                ("grpc.so_reuseport", 0),
            ]
        )
        add_to_server(self.servicer, server)
        add_worker_service(self.workers, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, WORKER_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        bind = f"{self.settings.host}:{self.settings.grpc_port}"
        try:
            if self._tls is not None:
                port = server.add_secure_port(bind, self._tls.grpc_credentials())
            else:
                port = server.add_insecure_port(bind)
        except RuntimeError:  # recent grpcio raises where older versions returned 0
            port = 0
        if port == 0:
            raise ConfigurationError(
                f"could not bind the gRPC port {bind} (in use, or not an address of this host); {GRPC_PORT_HINT}"
            )
        self.grpc_port = port
        return server

    async def _abort_start(self) -> None:
        """Stop what a failed :meth:`start` had started: the gateway, the gRPC server, the node."""
        self._stopping = True
        try:
            if self.gateway is not None:
                await self.gateway.stop(0)
            if self._grpc is not None:
                await self._grpc.stop(0)
            if self.metrics_server is not None:
                await self.metrics_server.stop()
            await self.node.close(0)
        except Exception as exc:  # the start-up error matters more than a second one while cleaning up
            log.warning("start_cleanup_failed", error=repr(exc))
        finally:
            self._stopped.set()

    async def _start_gateway(self) -> None:
        """The WebSocket gateway and its page on ``settings.ws_port``, over this server's node."""
        from nexus.gateway.server import GatewayServer, GatewaySettings

        gateway: WebTransport = GatewayServer(
            self.node, GatewaySettings.from_settings(self.settings), authenticator=self.authenticator
        )
        try:
            await gateway.start()
        except ConfigurationError as exc:
            raise ConfigurationError(f"{exc} or turn the gateway off with --no-gateway") from None
        except OSError as exc:
            bind = f"{self.settings.host}:{self.settings.ws_port}"
            raise ConfigurationError(
                f"could not bind the WebSocket port {bind} ({exc.strerror or exc}); {WS_PORT_HINT}"
            ) from None
        self.gateway = gateway
        self.ws_port = gateway.port
        if self.telemetry.enabled:
            self._observe_gateway(gateway)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _on_node_health(self, healthy: bool) -> None:
        """The bus lost or regained its backend (NATS): NOT_SERVING while it cannot store events."""
        task = asyncio.get_running_loop().create_task(self._apply_node_health())
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _apply_node_health(self) -> None:
        if not self._stopping:  # the node's state now, whatever order the callbacks' tasks run in
            await self._set_health(self.node.healthy)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: live streams end with ``cancelled``, subscribers get what is queued, then close."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_s if grace is None else grace
        log.info("server_stopping", live_streams=len(self.provider.streams()))
        try:
            for name in ("", SERVICE_NAME):
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            # Live streams end 'cancelled'; then closing the bus ends every subscription after its queued
            # events: subscribers drain, then the calls end with OK; new calls get UNAVAILABLE.
            await self.node.close(grace)
            if self.gateway is not None:
                # After the bus closed: each socket gets what was queued for it (the streams' `cancelled`
                # events included), then is closed with 1001.
                await self.gateway.stop(grace)
            if self._grpc is not None:
                await self._grpc.stop(grace)
            if self.metrics_server is not None:
                await self.metrics_server.stop()
        finally:
            self.telemetry.shutdown()
            if self._own_tracing:
                await asyncio.to_thread(self.tracing.shutdown)  # flushes an OTLP exporter
            self._stopped.set()
            log.info("server_stopped")

    async def wait_stopped(self) -> None:
        """Wait until :meth:`stop` has finished."""
        await self._stopped.wait()

    async def __aenter__(self) -> NexusServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
