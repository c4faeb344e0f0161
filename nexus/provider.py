"""Drives handlers through the request lifecycle: tasks, buffers, heartbeats, timeouts and cancels.

Structured concurrency: :meth:`Provider.run` owns one task group that lives as long as the server. Each request
runs in its own task; a streaming request owns a nested task group (its handler, its chunk pump and its
heartbeats) so nothing of a stream outlives it. The lifecycle itself is the pure
:class:`~nexus.lifecycle.Lifecycle`; this module only feeds it time and publishes what it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, NoReturn, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from nexus.api import (
    SERVER_DEFAULT,
    AnyHandler,
    EventHandler,
    Stream,
    StreamingEventHandler,
)
from nexus.bus.base import Bus, Subscription
from nexus.detect import DEFAULT_RULES, StreamingDetector
from nexus.errors import (
    AlreadyExists,
    BusUnavailable,
    HandlerConfigError,
    InvalidArgument,
    InvalidEventType,
    InvalidPayload,
    NexusError,
    ResourceExhausted,
    SlowConsumer,
    StreamClosed,
    StreamErrorType,
    Unavailable,
)
from nexus.events import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    REQUESTED,
    Event,
    EventType,
    JSONObject,
    check_name_token,
    check_version_token,
    validate_payload,
)
from nexus.identity import PUBLIC
from nexus.kv.base import KeyValueStore
from nexus.lifecycle import Lifecycle
from nexus.plugin_runtime import CountedStream, PluginContext, PluginRuntime
from nexus.queue.base import AbandonRequest, CancelRequest, ControlMessage, RequestQueue, RequestRoute
from nexus.queue.memory import MemoryRequestQueue
from nexus.schema import EventSpec
from nexus.telemetry import Telemetry
from nexus.tracing import TRACEPARENT, Tracing, ended_with_error, traceparent_of
from nexus.workers import (
    DEFAULT_LOCAL_IN_FLIGHT,
    DEFAULT_MAX_WORKERS,
    DEFAULT_WORKER_GRACE,
    DEFAULT_WORKER_PING_INTERVAL,
    DEFAULT_WORKER_TIMEOUT,
    MAX_HANDLERS_PER_WORKER,
    MAX_IN_FLIGHT,
    MAX_NAME_LENGTH,
    Assignment,
    Chunks,
    Declaration,
    Failure,
    LocalMember,
    Lost,
    Member,
    RemoteFailure,
    Result,
    Started,
    Worker,
    WorkerLost,
    WorkerPool,
    WorkerUnavailable,
)

DEFAULT_HEARTBEAT_INTERVAL: Final = 1.0
DEFAULT_STREAM_TIMEOUT: Final = 1800.0
DEFAULT_BUFFER_SIZE: Final = 100
REQUEST_QUEUE: Final = 1_000_000
MAX_CHUNKS_PER_PUBLISH: Final = 256

T = TypeVar("T")

_current_request: contextvars.ContextVar[Event | None] = contextvars.ContextVar("nexus_current_request", default=None)


@dataclasses.dataclass(frozen=True, slots=True)
class ProviderSettings:
    """How the provider drives streams."""

    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT
    buffer_size: int = DEFAULT_BUFFER_SIZE
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    streaming_rules: tuple[str, ...] = DEFAULT_RULES
    shutdown_grace_s: float = 5.0
    worker_ping_interval: float = DEFAULT_WORKER_PING_INTERVAL
    """Seconds between the pings the provider sends each worker."""
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT
    """A worker that sends nothing for this long is lost."""
    worker_grace: float = DEFAULT_WORKER_GRACE
    """How long a handler's requests wait for a worker when none is connected."""
    worker_pools: tuple[str, ...] = ()
    """Handlers (``service:action[:vN]``) whose in-process handler shares requests with remote workers."""
    worker_local_in_flight: int = DEFAULT_LOCAL_IN_FLIGHT
    """Requests the in-process member of such a pool runs at once."""
    max_workers: int = DEFAULT_MAX_WORKERS


IN_PROCESS: Final = "in-process"
REMOTE: Final = "remote"
POOL: Final = "pool"


@dataclasses.dataclass(slots=True)
class Registration:
    """One registered handler and what the provider derived from it.

    ``handler`` is the in-process instance (None for a handler only workers serve); ``pool`` holds the workers
    of a remote handler, or of an in-process one configured to share its requests with workers.
    """

    name: str
    handler: AnyHandler | None
    service_action: str
    streaming: bool
    ordering_key: str | None
    stream_timeout: float | None
    buffer_size: int
    config: dict[str, Any]
    pool: WorkerPool | None = None

    @property
    def class_path(self) -> str:
        if self.handler is None:
            return ""
        cls = type(self.handler)
        return f"{cls.__module__}:{cls.__qualname__}"

    @property
    def location(self) -> str:
        """Where its requests run: ``in-process``, ``remote`` (workers) or ``pool`` (both)."""
        if self.pool is None:
            return IN_PROCESS
        return REMOTE if self.handler is None else POOL

    @property
    def public_results(self) -> bool:
        return self.handler is not None and self.handler.public_results

    @property
    def takes(self) -> EventSpec | None:
        return self.handler.takes if self.handler is not None else None

    def describe(self) -> JSONObject:
        """A JSON-ready description, as ``nexus handlers`` prints it."""
        return {
            "name": self.name,
            "event_type": self.service_action,
            "streaming": self.streaming,
            "ordering_key": self.ordering_key or "",
            "stream_timeout_s": self.stream_timeout,
            "class_path": self.class_path,
            "location": self.location,
            "workers": len(self.pool.workers) if self.pool is not None else 0,
        }


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` of an exception, unwrapping single-exception groups.

    An ``InvalidPayload`` a handler raised is the request's own fault: its message stands alone, as the schema
    check's messages do.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, (InvalidPayload, RemoteFailure)):
        return exc.message
    if isinstance(exc, (WorkerLost, WorkerUnavailable)):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def error_type_of(exc: BaseException) -> StreamErrorType:
    """``error.type`` of a request whose handler raised ``exc``: ``invalid_payload`` for
    :class:`~nexus.errors.InvalidPayload`, a remote handler's own type, ``worker_lost``, else ``handler_error``."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, RemoteFailure):
        return exc.error_type
    if isinstance(exc, (WorkerLost, WorkerUnavailable)):
        return StreamErrorType.WORKER_LOST
    return StreamErrorType.INVALID_PAYLOAD if isinstance(exc, InvalidPayload) else StreamErrorType.HANDLER_ERROR


def side_event_metadata(request: Event | None, metadata: dict[str, str] | None) -> dict[str, str] | None:
    """The metadata of a side event a handler publishes while it handles ``request`` (None: outside a request).

    It carries ``causation_id`` = the request's ``event_id`` and continues the request's trace (``traceparent``,
    ``tracestate``); what the handler passes in ``metadata`` wins.
    """
    if request is None:
        return metadata
    inherited = {"causation_id": request.event_id}
    for key in ("traceparent", "tracestate"):
        if key in request.metadata:
            inherited[key] = request.metadata[key]
    return {**inherited, **(metadata or {})}


class _Context(PluginContext):
    def __init__(self, provider: Provider, registration: Registration) -> None:
        log = structlog.get_logger("nexus.handler").bind(handler=registration.name)
        super().__init__(provider.plugins, registration.name, registration.config, log)
        self._provider = provider

    async def publish(
        self,
        event_type: str,
        payload: JSONObject | None = None,
        *,
        metadata: dict[str, str] | None = None,
        event_id: str | None = None,
    ) -> Event:
        metadata = side_event_metadata(_current_request.get(), metadata)
        event = Event.create(
            event_type,
            payload,
            event_id=event_id,
            metadata=metadata,
            max_payload_bytes=self._provider.settings.max_payload_bytes,
        )
        return (await self._provider.bus.publish(event)).event

    @contextlib.asynccontextmanager
    async def subscribe(self, *patterns: str, since_offset: int = 0) -> AsyncIterator[AsyncIterator[Event]]:
        subscription = await self._provider.bus.subscribe(patterns, since_offset=since_offset)
        try:
            yield subscription.events()
        finally:
            subscription.close()

    def stats(self) -> JSONObject:
        return self._provider.stats()


class _Run:
    """The live state of one request: its lifecycle, scopes and cancel reason."""

    def __init__(self, registration: Registration | None, request: Event, key: Any, *, streaming: bool) -> None:
        self.registration = registration
        self.request = request
        self.key = key
        if registration is not None and registration.public_results:
            # Its lifecycle events inherit the request's metadata: marked public, every subscriber may see them.
            request = request.evolve(metadata={**request.metadata, PUBLIC: "true"})
        self.lifecycle = Lifecycle(request, streaming=streaming, now=time.monotonic())
        timeout = registration.stream_timeout if registration is not None else None
        self.timeout = timeout
        self.handler_scope = anyio.CancelScope()
        self.wait_scope = anyio.CancelScope()
        """While it waits for a worker (a remote handler's request): a cancel ends the wait."""
        self.cancel_reason: str | None = None
        self.pump_error: BaseException | None = None
        self.started = False
        self.abandoned = False
        """Another node already published this request's terminal event (it declared this node lost)."""
        self.stream: _StreamImpl | None = None
        self.span: Any = None
        """The handler run's span, when traced."""
        self.member: Member | None = None
        """The pool member running it (a remote handler's request), once one took it."""
        self.on_taken: Callable[[int], None] | None = None
        """Called with the number of chunks the pump took from the buffer (a worker's credit)."""

    @property
    def correlation_id(self) -> str:
        return self.request.event_id

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.wait_scope.cancel()
        self.handler_scope.cancel()


class _StreamImpl(CountedStream):
    def __init__(self, run: _Run, sender: MemoryObjectSendStream[JSONObject], max_payload_bytes: int) -> None:
        super().__init__(run.correlation_id)
        self._sender = sender
        self._max_payload_bytes = max_payload_bytes

    async def send(self, chunk: JSONObject) -> None:
        self._check_open()
        payload = validate_payload(chunk, max_bytes=self._max_payload_bytes)
        try:
            await self._sender.send(payload)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise StreamClosed(f"stream {self.correlation_id} has ended; send() is no longer possible") from None
        self._accepted += 1

    def close(self) -> None:
        self._closed = True
        self._sender.close()


class Provider:
    """Routes ``requested`` events to handlers and drives each request's lifecycle.

    It takes its requests from ``queue`` (by default a :class:`~nexus.queue.memory.MemoryRequestQueue` over
    ``bus``: the requests of this process) and publishes everything else on ``bus``.
    """

    def __init__(
        self,
        bus: Bus,
        settings: ProviderSettings | None = None,
        *,
        queue: RequestQueue | None = None,
        tracing: Tracing | None = None,
        kv: KeyValueStore | None = None,
    ) -> None:
        self.bus = bus
        self.tracing = tracing if tracing is not None else Tracing.off()
        """A ``process`` span per handler run (:mod:`nexus.tracing`); off unless given."""
        self.queue = queue if queue is not None else MemoryRequestQueue(bus)
        self.settings = settings or ProviderSettings()
        self.detector = StreamingDetector(self.settings.streaming_rules)
        self.log = structlog.get_logger("nexus.provider")
        self.registrations: dict[str, Registration] = {}
        self.plugins = PluginRuntime(bus, kv)
        """The handlers' background tasks, followers, shared objects and key-value state (``ctx.start_soon``,
        ...); ``kv`` is the store the caller opens and closes (None: an in-memory one the provider keeps)."""
        self._routes: dict[str, Registration] = {}
        self.actions: set[str] = set()
        """The ``service:action`` of every registered handler (whatever its version)."""
        self._runs: dict[str, _Run] = {}
        self._workers: dict[str, Worker] = {}
        self.workers_lost = 0
        """Workers that went away while they held requests."""
        self._routes_lock = anyio.Lock()
        self._key_queues: dict[tuple[str, Any], deque[_Run]] = {}
        self._task_group: TaskGroup | None = None
        self._requests: Subscription | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._started = False
        self.completed = 0
        self.telemetry = Telemetry(enabled=False)
        """Handler run times and failures (the server sets its own)."""

    @property
    def started(self) -> bool:
        """Whether every handler's ``setup`` ran and requests are taken."""
        return self._started and not self._stopping

    # --- registration ---------------------------------------------------------------------------------------

    def register(
        self, handler: AnyHandler, *, name: str | None = None, config: dict[str, Any] | None = None
    ) -> Registration:
        """Register a handler instance; raises :class:`HandlerConfigError` naming what is wrong."""
        if self._started:
            raise HandlerConfigError("handlers must be registered before the provider starts")
        cls = type(handler)
        label = name or f"{cls.__module__}:{cls.__qualname__}"
        if not isinstance(handler, (EventHandler, StreamingEventHandler)):
            raise HandlerConfigError(f"{label}: not an EventHandler or StreamingEventHandler")
        streaming = isinstance(handler, StreamingEventHandler)
        check_handle_is_async(label, handler)
        service_action = getattr(cls, "event_type", None)
        if not isinstance(service_action, str):
            raise HandlerConfigError(f"{label}: set the class attribute event_type = 'service:action'")
        kind = f"{cls.__name__} is a StreamingEventHandler" if streaming else f"{cls.__name__} is a plain EventHandler"
        fix = "make it an EventHandler" if streaming else "make it a StreamingEventHandler"
        timeout = cls.stream_timeout
        declared = self._check_declaration(
            label,
            service_action,
            streaming=streaming,
            kind=kind,
            fix=fix,
            ordering_key=cls.ordering_key,
            stream_timeout=self.settings.stream_timeout if timeout is SERVER_DEFAULT else timeout,
            buffer_size=cls.buffer_size,
        )
        if declared.event_type in self._routes:
            other = self._routes[declared.event_type]
            raise HandlerConfigError(f"{label}: {declared.event_type!r} is already handled by {other.name}")
        if label in self.registrations:
            raise HandlerConfigError(f"{label}: a handler with this name is already registered")
        _check_specs(label, cls, declared.event_type)
        pool = None
        if declared.event_type in self.settings.worker_pools:
            pool = WorkerPool(declared.event_type, declared, LocalMember(self.settings.worker_local_in_flight))
        return self._add(label, handler, declared, config=dict(config or {}), pool=pool)

    def _check_declaration(
        self,
        label: str,
        service_action: str,
        *,
        streaming: bool,
        kind: str,
        fix: str,
        ordering_key: object,
        stream_timeout: object,
        buffer_size: object,
        max_in_flight: int = 1,
    ) -> Declaration:
        """What a handler (a class here, or a worker's declaration) says of itself, checked against the rules."""
        service_action = check_service_action(label, service_action)
        rule = self.detector.check_requested(service_action)
        if streaming and rule is None:
            raise HandlerConfigError(
                f"{label}: {kind}, but {service_action!r} is not a "
                "streaming event under the streaming rules (an action starting with 'stream_', or a type "
                "containing ':stream:', ':typing:', ':presence:', ':chunks:', ':live:' or ':realtime:'); "
                f"rename the action or {fix}"
            )
        if not streaming and rule is not None:
            raise HandlerConfigError(
                f"{label}: {kind}, but {service_action!r} is a streaming "
                f"event under the rule {str(rule)!r}; {fix} or rename the action"
            )
        timeout: float | None
        if stream_timeout is None:
            timeout = None
        elif isinstance(stream_timeout, (int, float)) and not isinstance(stream_timeout, bool) and stream_timeout > 0:
            timeout = float(stream_timeout)
        else:
            raise HandlerConfigError(f"{label}: stream_timeout must be a positive number of seconds or None")
        if ordering_key is not None and (not isinstance(ordering_key, str) or not ordering_key):
            raise HandlerConfigError(f"{label}: ordering_key must be a payload field name or None")
        size = buffer_size if buffer_size is not None else self.settings.buffer_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise HandlerConfigError(f"{label}: buffer_size must be a positive integer")
        return Declaration(
            event_type=service_action,
            streaming=streaming,
            ordering_key=ordering_key,
            stream_timeout=timeout,
            buffer_size=size,
            max_in_flight=max_in_flight,
            name=label,
        )

    def _add(
        self,
        label: str,
        handler: AnyHandler | None,
        declared: Declaration,
        *,
        config: dict[str, Any],
        pool: WorkerPool | None,
    ) -> Registration:
        assert declared.buffer_size is not None
        assert not isinstance(declared.stream_timeout, str)
        registration = Registration(
            name=label,
            handler=handler,
            service_action=declared.event_type,
            streaming=declared.streaming,
            ordering_key=declared.ordering_key,
            stream_timeout=declared.stream_timeout,
            buffer_size=declared.buffer_size,
            config=config,
            pool=pool,
        )
        self.registrations[label] = registration
        self._routes[declared.event_type] = registration
        self.actions.add(":".join(declared.event_type.split(":")[:2]))
        return registration

    def _remove(self, registration: Registration) -> None:
        self.registrations.pop(registration.name, None)
        self._routes.pop(registration.service_action, None)
        self.actions = {":".join(r.service_action.split(":")[:2]) for r in self.registrations.values()}

    # --- workers (handlers in other processes) --------------------------------------------------------------

    @property
    def workers(self) -> list[Worker]:
        """The workers connected now."""
        return list(self._workers.values())

    def connect_worker(self, name: str, declarations: Sequence[Declaration], *, owner: str = "") -> Worker:
        """Admit a worker serving ``declarations`` (checked here, all or nothing) into each handler's pool.

        Raises :class:`HandlerConfigError` (INVALID_ARGUMENT) for a declaration against the rules,
        :class:`AlreadyExists` when an in-process handler serves a type that is not a configured pool, or the
        pool's workers declared it otherwise, :class:`Unavailable` while the provider is not running and
        :class:`ResourceExhausted` past ``max_workers``.
        """
        if not self.started:
            raise Unavailable("the server is not taking workers now (starting or stopping); connect again")
        if len(self._workers) >= self.settings.max_workers:
            raise ResourceExhausted(f"{self.settings.max_workers} workers are connected, the most allowed")
        name = name[:MAX_NAME_LENGTH]
        if not declarations:
            raise InvalidArgument("register names no handler")
        if len(declarations) > MAX_HANDLERS_PER_WORKER:
            raise InvalidArgument(f"register names {len(declarations)} handlers, more than {MAX_HANDLERS_PER_WORKER}")
        checked: list[Declaration] = []
        for index, declaration in enumerate(declarations):
            label = (declaration.name or declaration.event_type)[:MAX_NAME_LENGTH]
            where = f"handler {index} ({label})"
            if not 1 <= declaration.max_in_flight <= MAX_IN_FLIGHT:
                raise InvalidArgument(f"{where}: max_in_flight must be 1 to {MAX_IN_FLIGHT}")
            timeout = declaration.stream_timeout
            resolved = self._check_declaration(
                where,
                declaration.event_type,
                streaming=declaration.streaming,
                kind="it is declared streaming" if declaration.streaming else "it is declared plain (not streaming)",
                fix="declare it plain" if declaration.streaming else "declare it streaming",
                ordering_key=declaration.ordering_key,
                stream_timeout=self.settings.stream_timeout if timeout == "default" else timeout,
                buffer_size=declaration.buffer_size,
                max_in_flight=declaration.max_in_flight,
            )
            resolved = dataclasses.replace(resolved, name=label)
            if any(other.event_type == resolved.event_type for other in checked):
                raise InvalidArgument(f"{where}: {resolved.event_type!r} is declared twice")
            existing = self._routes.get(resolved.event_type)
            if existing is not None and existing.pool is None:
                raise AlreadyExists(
                    f"{where}: {resolved.event_type!r} is served in-process by {existing.name}; add it to the "
                    "worker_pools setting to share its requests with workers"
                )
            if existing is not None and existing.pool is not None:
                problem = existing.pool.declaration.differs(resolved)
                if problem is not None:
                    raise AlreadyExists(f"{where}: {resolved.event_type!r} is declared with {problem}")
            checked.append(resolved)
        worker = Worker(name, tuple(checked), owner=owner)
        added = False
        for declared in checked:
            registration = self._routes.get(declared.event_type)
            if registration is None:
                registration = self._add(
                    declared.name, None, declared, config={}, pool=WorkerPool(declared.event_type, declared)
                )
                added = True
            assert registration.pool is not None
            registration.pool.join(worker)
        self._workers[worker.worker_id] = worker
        self.log.info(
            "worker_connected",
            worker=worker.name,
            worker_id=worker.worker_id,
            handlers=[d.event_type for d in checked],
            max_in_flight=[d.max_in_flight for d in checked],
        )
        if added:
            self._routes_changed()
        return worker

    def disconnect_worker(self, worker: Worker, reason: str) -> None:
        """The worker is gone (its connection ended, or it stopped answering): its started requests fail with
        ``worker_lost``, the ones it had not started go to another member of their pool."""
        if self._workers.pop(worker.worker_id, None) is None:
            return
        running = len(worker.assignments)
        if running:
            self.workers_lost += 1
        worker.lose(reason)
        for pool in worker.pools.values():
            pool.leave(worker)
        log_method = self.log.info if running == 0 else self.log.warning
        log_method(
            "worker_disconnected", worker=worker.name, worker_id=worker.worker_id, reason=reason, requests=running
        )

    async def _watch_workers(self) -> None:
        """Ping every worker, drop the silent ones, and close the pools no worker came back to in time."""
        interval = self.settings.worker_ping_interval
        while True:
            await anyio.sleep(interval)
            now = time.monotonic()
            for worker in list(self._workers.values()):
                silent = now - worker.last_heard
                if silent > self.settings.worker_timeout:
                    self.disconnect_worker(worker, f"sent nothing for {silent:.1f} s")
                else:
                    worker.ping()
            for registration in list(self.registrations.values()):
                pool = registration.pool
                if pool is None or pool.empty_since is None or now - pool.empty_since < self.settings.worker_grace:
                    continue
                reason = f"no worker of {registration.service_action} connected within {self.settings.worker_grace:g} s"
                self.log.warning("handler_unavailable", handler=registration.name, reason=reason, waiting=pool.waiting)
                pool.close(reason)
                self._remove(registration)
                self._routes_changed()

    def capacity(self, service_action: str) -> int | None:
        """How many requests of ``service_action`` this node can run at once: the slots of its workers (and of the
        in-process member of a pool); None for an in-process handler (no bound)."""
        registration = self._routes.get(service_action)
        if registration is None or registration.pool is None:
            return None
        return sum(member.capacity(service_action) for member in registration.pool.members)

    def _routes_changed(self) -> None:
        """Tell the request queue which handlers this node serves now (in the background, latest wins)."""
        if self._task_group is not None:
            self._task_group.start_soon(self._update_routes)

    async def _update_routes(self) -> None:
        async with self._routes_lock:
            try:
                await self.queue.update_routes(self.request_routes())
            except NexusError as exc:
                self.log.error("request_routes_update_failed", error=exc.message)

    def route(self, event_type: str | EventType) -> Registration | None:
        """The handler for a ``requested`` event type: pinned ``svc:act:vN`` first, then ``svc:act``."""
        parsed = event_type if isinstance(event_type, EventType) else EventType.parse(event_type)
        return self._routes.get(parsed.base) or self._routes.get(f"{parsed.service}:{parsed.action}")

    # --- running --------------------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Set up handlers, then route requests until :meth:`stop`. Handlers are torn down at the end.

        The handlers' background tasks and followers (:attr:`plugins`) run from the first ``setup`` until the
        requests are over, and are cancelled before the first ``teardown``; shared objects are closed last.
        """
        self._started = True
        set_up: list[Registration] = []
        background = contextlib.AsyncExitStack()
        try:
            await background.enter_async_context(self.plugins.running())
            for registration in self.registrations.values():
                if registration.handler is None:
                    continue
                context = _Context(self, registration)
                registration.handler.ctx = context
                await registration.handler.setup(context)
                set_up.append(registration)
            routes = self.request_routes()
            self.queue.capacity = self.capacity
            self._requests = await self.queue.consume(routes, max_pending=REQUEST_QUEUE)
            self.queue.on_control(self._on_control)
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                self.log.info(
                    "provider_started",
                    handlers=[r.name for r in self.registrations.values()],
                    heartbeat_interval=self.settings.heartbeat_interval,
                    stream_timeout=self.settings.stream_timeout,
                )
                task_group.start_soon(self._watch_workers)
                task_status.started()
                while True:
                    try:
                        batch = await self._requests.next_batch()
                    except SlowConsumer as exc:
                        # Requests are dispatched without awaiting, so this needs a starved event loop; say so
                        # loudly and keep consuming rather than stop handling requests altogether.
                        self.log.error("request_queue_overflow", limit=exc.limit, last_offset=exc.last_offset)
                        self._requests = await self.queue.consume(routes, max_pending=REQUEST_QUEUE)
                        continue
                    if not batch:
                        break
                    for event in batch:
                        self._dispatch(event)
                await self._wait_idle(self.settings.shutdown_grace_s)
                task_group.cancel_scope.cancel()
        finally:
            self._task_group = None
            await background.aclose()  # the handlers' background tasks and followers end before any teardown
            for registration in reversed(set_up):
                assert registration.handler is not None
                try:
                    await registration.handler.teardown()
                except Exception as exc:
                    self.log.error("handler_teardown_failed", handler=registration.name, error=describe_exception(exc))
            await self.plugins.close(self.log)
            self.log.info("provider_stopped", completed=self.completed)

    async def stop(self, reason: str = "server_shutdown") -> None:
        """Cancel every request with ``reason``, wait for their terminal events, then end :meth:`run`."""
        if self._stopping:
            return
        self._stopping = True
        for key in list(self._key_queues):
            queue = self._key_queues[key]
            while queue:
                queued = queue.popleft()
                queued.cancel(reason)
                self._runs.pop(queued.correlation_id, None)
                await self._finish_unstarted(queued, reason)
        for run in list(self._runs.values()):
            run.cancel(reason)
        await self._wait_idle(self.settings.shutdown_grace_s)
        if self._requests is not None:
            self._requests.close()

    async def _wait_idle(self, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await self._idle.wait()

    def request_routes(self) -> list[RequestRoute]:
        """The handlers this provider serves, as the request queue sees them."""
        return [RequestRoute(r.service_action, ordered=r.ordering_key is not None) for r in self.registrations.values()]

    def _on_control(self, message: ControlMessage) -> None:
        if isinstance(message, AbandonRequest):
            self.abandon_local(message.correlation_id, message.reason)
        else:
            self.cancel_local(message.correlation_id, message.reason, owner=message.owner)

    def abandon_local(self, correlation_id: str, reason: str) -> bool:
        """Stop a request whose terminal event another node already published, publishing nothing more for it.

        A node cut off from the bus longer than its peers wait is declared lost, and they end its requests with
        ``failed``/``node_lost``; when it comes back, its request queue tells the provider to let them go.
        """
        run = self._runs.get(correlation_id)
        if run is None:
            return False
        run.abandoned = True
        self.log.warning("request_abandoned", correlation_id=correlation_id, reason=reason)
        return self.cancel_local(correlation_id, reason)

    def cancel_local(
        self, correlation_id: str, reason: str = "cancelled by requester", *, owner: str | None = None
    ) -> bool:
        """Cancel a request this node drives or holds in a queue; return whether it was found.

        With ``owner``, only a request that owner sent (``metadata.owner``); another's is left alone, as if absent.
        """
        run = self._runs.get(correlation_id)
        if run is None:
            return False
        if owner is not None and run.request.metadata.get("owner") != owner:
            return False
        run.cancel(reason)
        if not run.started and self._task_group is not None:
            # Queued behind its ordering key: remove it and publish its 'cancelled' now.
            for queue in self._key_queues.values():
                if run in queue:
                    queue.remove(run)
                    self._runs.pop(correlation_id, None)
                    self._task_group.start_soon(self._finish_unstarted, run, reason)
                    break
        return True

    async def cancel(
        self, correlation_id: str, reason: str = "cancelled by requester", *, owner: str | None = None
    ) -> bool:
        """Cancel a request wherever it runs: here, or on another node through the request queue (``owner``: only
        if that owner sent it).

        Returns whether it was found on this node.
        """
        if self.cancel_local(correlation_id, reason, owner=owner):
            return True
        with contextlib.suppress(BusUnavailable):
            await self.queue.cancel(CancelRequest(correlation_id, reason, owner=owner))
        return False

    def stats(self) -> JSONObject:
        """Live statistics of this node: bus rates and latency, streams, subscribers."""
        bus_stats = self.bus.stats()
        snapshot = self.bus.metrics.snapshot()
        snapshot["active_streams"] = sum(1 for run in self._runs.values() if run.started and run.lifecycle.streaming)
        snapshot["active_requests"] = sum(1 for run in self._runs.values() if run.started)
        snapshot["queued_requests"] = sum(1 for run in self._runs.values() if not run.started)
        snapshot["subscribers"] = bus_stats.subscribers
        snapshot["head_offset"] = bus_stats.head_offset
        snapshot["epoch"] = bus_stats.epoch
        snapshot["quarantined"] = bus_stats.quarantined
        return snapshot

    def streams(self) -> list[JSONObject]:
        """The requests this node drives or holds now, oldest first."""
        now = time.monotonic()
        result = []
        for run in self._runs.values():
            info = run.lifecycle.stats(now)
            info["handler"] = run.registration.name if run.registration else ""
            info["worker"] = _worker_label(run)
            info["age_s"] = round(now - run.lifecycle.requested_at, 6)
            info["owner"] = run.request.metadata.get("owner", "")
            result.append(info)
        return result

    # --- dispatch -------------------------------------------------------------------------------------------

    def _dispatch(self, request: Event) -> None:
        assert self._task_group is not None
        try:
            parsed = request.type  # parsed once: the route and the lifecycle read the same parse
        except InvalidEventType:
            return
        if parsed.state != REQUESTED:
            return
        if request.event_id in self._runs:
            return  # already running: a redelivery
        registration = self.route(parsed)
        streaming = self.detector.is_streaming(request.event_type)
        if registration is None:
            run = _Run(None, request, None, streaming=streaming)
            self._task_group.start_soon(self._no_handler, run)
            return
        key: Any = None
        if registration.ordering_key is not None:
            key = _ordering_value(request.payload.get(registration.ordering_key))
        run = _Run(registration, request, key, streaming=registration.streaming)
        if self._stopping:
            run.cancel("server_shutdown")  # arrived while stopping: it ends with 'cancelled' at once
        self._runs[run.correlation_id] = run
        self._idle.clear()
        if registration.ordering_key is not None:
            queue_key = (registration.name, key)
            queue = self._key_queues.get(queue_key)
            if queue is not None:
                queue.append(run)
                return
            self._key_queues[queue_key] = deque()
        self._task_group.start_soon(self._drive, run)

    async def _no_handler(self, run: _Run) -> None:
        event = run.lifecycle.fail(
            time.monotonic(),
            StreamErrorType.NO_HANDLER,
            f"no handler is registered for {run.request.event_type!r}",
        )
        await self._publish_terminal(run, event)

    async def _finish_unstarted(self, run: _Run, reason: str) -> None:
        await self._publish_terminal(run, run.lifecycle.cancel(time.monotonic(), reason))
        self._after_run(run, launch_next=False)

    async def _drive(self, run: _Run) -> None:
        registration = run.registration
        assert registration is not None
        # Every log line of this request's task and its children (pump, heartbeats, the handler's own ctx.log
        # calls) carries the request's event_type and correlation_id (and, traced, its trace_id and span_id).
        structlog.contextvars.bind_contextvars(
            event_type=run.request.event_type, correlation_id=run.correlation_id, handler=registration.name
        )
        with self.tracing.processing(run.request, registration.service_action, registration.name) as span:
            if span is not None:
                # The lifecycle and side events continue the request's trace from the handler run.
                _continue_trace(run, traceparent_of(span.get_span_context()))
            run.span = span
            await self._drive_run(run, registration)

    async def _drive_run(self, run: _Run, registration: Registration) -> None:
        token = _current_request.set(run.lifecycle.request)
        try:
            problem = payload_problem(registration.takes, run.request)
            if run.cancel_reason is not None:
                await self._publish_terminal(run, run.lifecycle.cancel(time.monotonic(), run.cancel_reason))
            elif problem is not None:
                event = run.lifecycle.fail(time.monotonic(), StreamErrorType.INVALID_PAYLOAD, problem)
                await self._publish_terminal(run, event)
            elif registration.pool is not None:
                await self._drive_pooled(run, registration, registration.pool)
            else:
                await self._drive_local(run, registration)
        except Exception as exc:
            # Never let one request take the provider down: report it and end the request.
            self.log.exception(
                "provider_internal_error",
                event_type=run.request.event_type,
                correlation_id=run.correlation_id,
                error=describe_exception(exc),
            )
            if not run.lifecycle.terminal:
                event = run.lifecycle.fail(time.monotonic(), StreamErrorType.HANDLER_ERROR, describe_exception(exc))
                await self._publish_terminal(run, event)
        finally:
            _current_request.reset(token)
            self._after_run(run, launch_next=True)

    def _after_run(self, run: _Run, *, launch_next: bool) -> None:
        self._runs.pop(run.correlation_id, None)
        self.completed += 1
        if run.registration is not None and run.registration.ordering_key is not None:
            queue_key = (run.registration.name, run.key)
            queue = self._key_queues.get(queue_key)
            if queue is not None and launch_next:
                if queue:
                    following = queue.popleft()
                    assert self._task_group is not None
                    self._task_group.start_soon(self._drive, following)
                else:
                    del self._key_queues[queue_key]
        if not self._runs:
            self._idle.set()

    def _deadline(self, run: _Run) -> float:
        return math.inf if run.timeout is None else anyio.current_time() + run.timeout

    async def _drive_local(self, run: _Run, registration: Registration) -> None:
        """Run the request in this process, with the in-process handler."""
        handler = registration.handler
        if isinstance(handler, StreamingEventHandler):
            await self._drive_stream(run, registration, handler.handle_stream)
        else:
            assert isinstance(handler, EventHandler)
            await self._drive_plain(run, registration, handler.handle)

    async def _drive_pooled(self, run: _Run, registration: Registration, pool: WorkerPool) -> None:
        """Run the request on a member of the handler's pool: a worker, or the in-process handler.

        It waits (in offset order) for a member with a free slot, then gives it the request. A worker lost before
        it started the request hands it back here, and it goes to another member.
        """
        while True:
            if run.cancel_reason is not None:
                await self._publish_terminal(run, run.lifecycle.cancel(time.monotonic(), run.cancel_reason))
                return
            run.wait_scope = anyio.CancelScope()
            member: Member | None = None
            assignment: Assignment | None = None
            first: Started | Chunks | Result | Failure | Lost | None = None
            try:
                with run.wait_scope:
                    member = await pool.acquire()
                    if isinstance(member, LocalMember):
                        break
                    assert isinstance(member, Worker)
                    run.member = member
                    assignment = member.assign(
                        pool.service_action,
                        run.lifecycle.request,
                        credit=registration.buffer_size if registration.streaming else 0,
                        timeout_s=run.timeout,
                    )
                    first = await assignment.next()
            except WorkerUnavailable as exc:
                event = run.lifecycle.fail(time.monotonic(), StreamErrorType.WORKER_LOST, str(exc))
                await self._publish_terminal(run, event)
                return
            if first is None or assignment is None:
                # Cancelled while it waited: a worker that has it stops (and frees its slot when it says so).
                if assignment is not None:
                    assignment.cancel(run.cancel_reason or "cancelled")
                run.member = None
                continue
            if isinstance(first, Lost):
                run.member = None
                self.log.warning(
                    "request_reassigned",
                    event_type=run.request.event_type,
                    correlation_id=run.correlation_id,
                    worker=assignment.worker.label,
                    reason=first.reason,
                )
                continue
            await self._drive_remote(run, registration, assignment, first)
            return
        assert member is not None
        run.member = member
        try:
            await self._drive_local(run, registration)
        finally:
            pool.release(member)

    async def _drive_remote(
        self, run: _Run, registration: Registration, assignment: Assignment, first: Started | Chunks | Result | Failure
    ) -> None:
        """Drive a request a worker took: its messages feed the same lifecycle an in-process handler's calls do."""
        pending: list[Started | Chunks | Result | Failure | Lost] = [first]

        async def next_message() -> Started | Chunks | Result | Failure | Lost:
            return pending.pop() if pending else await assignment.next()

        async def stream_body(request: Event, stream: Stream) -> None:
            run.on_taken = assignment.grant
            try:
                while True:
                    message = await next_message()
                    if isinstance(message, Chunks):
                        for chunk in message.payloads:
                            await stream.send(chunk)
                    elif isinstance(message, Result):
                        return  # a stream's success: the lifecycle counts its chunks
                    elif not isinstance(message, Started):
                        _remote_end(message, assignment)
            finally:
                assignment.cancel(_stop_reason(run))

        async def plain_body(request: Event) -> JSONObject:
            try:
                while True:
                    message = await next_message()
                    if isinstance(message, Result):
                        return message.payload
                    if isinstance(message, (Failure, Lost)):
                        _remote_end(message, assignment)
                    # 'started' goes on; chunks never come (a plain request has no credit: the worker refuses them)
            finally:
                assignment.cancel(_stop_reason(run))

        if registration.streaming:
            await self._drive_stream(run, registration, stream_body)
        else:
            await self._drive_plain(run, registration, plain_body)

    async def _drive_plain(
        self, run: _Run, registration: Registration, handle: Callable[[Event], Awaitable[Any]]
    ) -> None:
        lifecycle = run.lifecycle
        log = self.log.bind(event_type=run.request.event_type, correlation_id=run.correlation_id)
        run.started = True
        run.handler_scope.deadline = self._deadline(run)
        result: Any = None
        error: BaseException | None = None
        with run.handler_scope:
            try:
                result = await handle(run.request)
            except Exception as exc:
                error = exc
        now = time.monotonic()
        if run.cancel_reason is not None:
            event = lifecycle.cancel(now, run.cancel_reason)
        elif run.handler_scope.cancel_called:
            event = lifecycle.time_out(now, run.timeout or 0.0)
        elif error is not None:
            _handler_failed(log, run, registration, error)
            event = lifecycle.fail(now, error_type_of(error), describe_exception(error))
        else:
            try:
                payload = validate_payload(result, max_bytes=self.settings.max_payload_bytes)
            except NexusError as exc:
                event = lifecycle.fail(
                    now, StreamErrorType.HANDLER_ERROR, f"handler returned an invalid result: {exc.message}"
                )
            else:
                event = lifecycle.succeed(now, payload)
        await self._publish_terminal(run, event)

    async def _drive_stream(
        self, run: _Run, registration: Registration, handle_stream: Callable[[Event, Stream], Awaitable[None]]
    ) -> None:
        lifecycle = run.lifecycle
        log = self.log.bind(event_type=run.request.event_type, correlation_id=run.correlation_id)
        try:
            await self.bus.publish(lifecycle.start(time.monotonic()))
        except NexusError as exc:
            log.error("stream_start_failed", error=exc.message)
            await self._publish_terminal(
                run, lifecycle.fail(time.monotonic(), StreamErrorType.HANDLER_ERROR, exc.message)
            )
            return
        run.started = True
        log.info("stream_started", handler=registration.name, timeout_s=run.timeout)
        sender, receiver = anyio.create_memory_object_stream[JSONObject](registration.buffer_size)
        stream = _StreamImpl(run, sender, self.settings.max_payload_bytes)
        run.stream = stream
        error: BaseException | None = None
        heartbeat_scope = anyio.CancelScope()
        run.handler_scope.deadline = self._deadline(run)
        async with anyio.create_task_group() as stream_group:
            stream_group.start_soon(self._pump, run, receiver)
            stream_group.start_soon(self._heartbeats, run, heartbeat_scope)
            with run.handler_scope:
                try:
                    await handle_stream(run.request, stream)
                except Exception as exc:
                    error = exc
            stream.close()
            heartbeat_scope.cancel()
        now = time.monotonic()
        if run.cancel_reason is not None:
            event = lifecycle.cancel(now, run.cancel_reason)
        elif run.pump_error is not None:
            event = lifecycle.fail(
                now,
                StreamErrorType.HANDLER_ERROR,
                f"could not publish a chunk: {describe_exception(run.pump_error)}",
            )
        elif run.handler_scope.cancel_called:
            event = lifecycle.time_out(now, run.timeout or 0.0)
        elif error is not None:
            _handler_failed(log, run, registration, error)
            event = lifecycle.fail(now, error_type_of(error), describe_exception(error))
        else:
            event = lifecycle.succeed(now)
        await self._publish_terminal(run, event)

    async def _pump(self, run: _Run, receiver: MemoryObjectReceiveStream[JSONObject]) -> None:
        """Publish accepted chunks in order, several per bus call when they queue up."""
        async with receiver:
            while True:
                try:
                    chunks = [await receiver.receive()]
                except anyio.EndOfStream:
                    return
                while len(chunks) < MAX_CHUNKS_PER_PUBLISH:
                    try:
                        chunks.append(receiver.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                if run.abandoned:
                    return
                if run.on_taken is not None:
                    run.on_taken(len(chunks))
                events = [run.lifecycle.chunk(chunk) for chunk in chunks]
                try:
                    await self.bus.publish_many(events)
                except Exception as exc:
                    run.pump_error = exc
                    run.handler_scope.cancel()
                    return

    async def _heartbeats(self, run: _Run, scope: anyio.CancelScope) -> None:
        interval = self.settings.heartbeat_interval
        if interval <= 0:
            return
        with scope:
            while True:
                await anyio.sleep(interval)
                if run.lifecycle.terminal or run.abandoned:
                    return
                try:
                    await self.bus.publish_live(run.lifecycle.heartbeat(time.monotonic()))
                except NexusError as exc:
                    self.log.warning(
                        "heartbeat_failed",
                        event_type=run.request.event_type,
                        correlation_id=run.correlation_id,
                        error=exc.message,
                    )

    async def _publish_terminal(self, run: _Run, event: Event) -> None:
        # A client that sees the terminal event must not find the stream still listed as live.
        self._runs.pop(run.correlation_id, None)
        lifecycle = run.lifecycle
        now = time.monotonic()
        fields: dict[str, Any] = {
            "event_type": run.request.event_type,
            "correlation_id": run.correlation_id,
            "outcome": lifecycle.state.value,
            "stream_count": lifecycle.stream_count,
            "duration_s": lifecycle.duration(now),
        }
        if run.registration is not None:
            fields["handler"] = run.registration.name
        if lifecycle.state.value == "failed":
            fields["error"] = event.payload.get("error")
        if run.registration is not None and run.started:
            error = event.payload.get("error")
            self.telemetry.handler_ended(
                run.registration.name,
                lifecycle.state.value,
                fields["duration_s"],
                str(error.get("type")) if isinstance(error, dict) else None,
            )
        if run.abandoned:
            self.log.info("request_released", **fields)
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.queue.publish_terminal(event)
            except NexusError as exc:
                self.log.error("terminal_publish_failed", error=exc.message, **fields)
                return
        log_method = self.log.info if lifecycle.state.value in ("success", "cancelled") else self.log.warning
        log_method("stream_ended" if lifecycle.streaming else "request_ended", **fields)


def _continue_trace(run: _Run, traceparent: str) -> None:
    """Stamp the handler run's context on what the run publishes: its lifecycle and side events."""
    request = run.lifecycle.request
    metadata = {**request.metadata, TRACEPARENT: traceparent}
    run.lifecycle.request = request.evolve(metadata=metadata)


def _handler_failed(log: Any, run: _Run, registration: Registration, error: BaseException) -> None:
    """Log a handler's exception with its traceback (plugin authors must see the failing line); a worker's
    failure with the worker's name (its traceback is in the worker's own log)."""
    ended_with_error(run.span, error)
    if isinstance(error, (RemoteFailure, WorkerLost, WorkerUnavailable)):
        worker = run.member.label if run.member is not None else ""
        log.warning("handler_failed", handler=registration.name, error=describe_exception(error), worker=worker)
        return
    log.warning("handler_failed", handler=registration.name, error=describe_exception(error), exc_info=error)


def _worker_label(run: _Run) -> str:
    """Who drives a request: ``in-process``, a worker's name, or nothing while it waits for one."""
    if run.registration is None:
        return ""
    if run.member is not None:
        return run.member.label
    return IN_PROCESS if run.registration.pool is None else ""


def _remote_end(message: Failure | Lost, assignment: Assignment) -> NoReturn:
    """Raise what a worker's failure or loss means for its request."""
    if isinstance(message, Failure):
        raise RemoteFailure(message.type, message.message)
    raise WorkerLost(f"worker {assignment.worker.label} was lost: {message.reason}")


def _stop_reason(run: _Run) -> str:
    """What to tell a worker whose request the server ended first."""
    return run.cancel_reason or ("timeout" if run.handler_scope.cancel_called else "ended")


def payload_problem(takes: EventSpec | None, request: Event) -> str | None:
    """Why the request's payload does not fit a handler's declared ``takes`` schema, or None."""
    try:
        # Events built by clients are checked on the way in; this also covers one put on the bus directly.
        validate_payload(request.payload)
        spec = takes
        if spec is not None:
            spec.validate(request.payload)
    except InvalidPayload as exc:
        return exc.message
    return None


def _ordering_value(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return repr(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def check_handle_is_async(label: str, handler: AnyHandler) -> None:
    """``handle`` / ``handle_stream`` must be a coroutine function, awaited on the event loop (in process or in a
    worker); raises :class:`HandlerConfigError` saying what it is instead and what to write."""
    cls = type(handler)
    method = "handle_stream" if isinstance(handler, StreamingEventHandler) else "handle"
    function = inspect.unwrap(getattr(cls, method))
    if inspect.iscoroutinefunction(function):
        return
    if inspect.isasyncgenfunction(function):
        reason = "an async generator (it yields); send each chunk with 'await stream.send(chunk)' instead"
    else:
        reason = "a plain function; write 'async def', and run blocking work with anyio.to_thread.run_sync"
    raise HandlerConfigError(f"{label}: {cls.__name__}.{method} must be 'async def', but it is {reason}")


def _check_specs(label: str, cls: type, service_action: str) -> None:
    """``takes`` must describe this handler's own request; ``emits`` must hold EventSpecs."""
    takes = getattr(cls, "takes", None)
    if takes is not None:
        if not isinstance(takes, EventSpec):
            raise HandlerConfigError(f"{label}: takes must be an EventSpec or None")
        parsed = EventType.parse(takes.event_type)
        own = service_action.split(":")
        if parsed.state != REQUESTED or [parsed.service, parsed.action] != own[:2]:
            raise HandlerConfigError(
                f"{label}: takes describes {takes.event_type!r}, not a '{service_action}:...:requested' event"
            )
        if len(own) == 3 and parsed.base != service_action:
            raise HandlerConfigError(f"{label}: takes describes {takes.event_type!r}, not version {own[2]}")
        problems = takes.example_errors()
        if problems:
            raise HandlerConfigError(f"{label}: the example of takes does not fit its schema: {problems[0]}")
    emits = getattr(cls, "emits", ())
    for spec in emits:
        if not isinstance(spec, EventSpec):
            raise HandlerConfigError(f"{label}: emits must hold EventSpecs, not {type(spec).__name__}")
        problems = spec.example_errors()
        if problems:
            raise HandlerConfigError(f"{label}: the example of {spec.event_type} does not fit: {problems[0]}")


def check_service_action(label: str, text: str) -> str:
    tokens = text.split(":")
    if len(tokens) not in (2, 3):
        raise HandlerConfigError(
            f"{label}: event_type {text!r} must be 'service:action' or 'service:action:vN' "
            "(the state 'requested' is implied)"
        )
    problems = [check_name_token(tokens[0], "service"), check_name_token(tokens[1], "action")]
    if len(tokens) == 3:
        problems.append(check_version_token(tokens[2]))
    for problem in problems:
        if problem is not None:
            raise HandlerConfigError(f"{label}: event_type {text!r}: {problem}")
    return text


def registrations_table(registrations: Iterable[Registration]) -> Sequence[JSONObject]:
    """Descriptions of registrations, sorted by event type."""
    return sorted((r.describe() for r in registrations), key=lambda item: str(item["event_type"]))
