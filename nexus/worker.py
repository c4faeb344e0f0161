"""The Python worker runtime: the same handler classes as ``nexus serve`` runs, in a process of their own.

A :class:`Worker` connects to a Nexus server over ``nexus.v1.WorkerService/HandleEvents`` (docs/workers.md),
registers its handlers and answers the requests the server gives it; the server drives their lifecycle exactly
as an in-process handler's::

    worker = Worker("127.0.0.1:50051", [HandlerSpec("countdown:Countdown", Countdown(), "--handler")])
    await worker.run()            # until worker.stop() (nexus worker: SIGTERM / SIGINT)

What it does, in order:

    setup(ctx) of every handler ─ connect ─ register ─ requests ... ─ stop ─ drain ─ teardown()
                                     ▲                     │
                                     └── backoff ◀─ lost ──┘  (the server went away or restarted)

- One call per connection. Messages out (``started``, ``chunk``, ``result``, ``error``, ``cancelled``,
  ``pong``) go through one :class:`_Outbox`, in order; consecutive chunks of one stream share a message.
- ``Stream.send`` spends the stream's credit and waits for more when it has none (the server's buffer is full).
- A ``cancel`` cancels the handler's task and is answered ``cancelled``. A handler's exception becomes
  ``error`` (``invalid_payload`` for :class:`~nexus.errors.InvalidPayload`, else ``handler_error``); a payload
  that does not fit the handler's ``takes`` schema is answered ``invalid_payload`` before the handler runs.
- When the connection drops (or the server stays silent past its worker timeout), what ran on it is cancelled
  here without an answer: the server has already failed it (``worker_lost``). The worker reconnects, backing
  off (:class:`~nexus.backoff.Backoff`), and registers again. A refusal that retrying cannot mend (a bad
  declaration, a token that may not serve a type) ends :meth:`Worker.run` with its
  :class:`~nexus.errors.NexusError`.
- :meth:`Worker.stop`: the worker sends ``drain`` (the server gives it no more requests); requests already on
  their way are left unstarted (the server gives them to another worker once this one is gone), running ones may
  finish within ``shutdown_grace_s``, the rest are cancelled; then the connection closes and every handler's
  ``teardown`` runs.

The context a handler gets out of process (:class:`_WorkerContext`): ``config`` (its sections of the config
file, as ``nexus serve`` reads them), ``log``, ``publish`` (``EmitEvent``, with ``causation_id`` and the trace
of the request being handled), ``subscribe`` and ``follow`` (``SubscribeEventBatches``), ``kv`` (SQLite in the
worker's data directory), ``shared`` and ``start_soon`` (:class:`~nexus.plugin_runtime.PluginRuntime`), and
``stats`` (this worker's counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
import structlog

from nexus.api import (
    SERVER_DEFAULT,
    AnyHandler,
    EventHandler,
    StreamingEventHandler,
)
from nexus.backoff import Backoff, BackoffPolicy
from nexus.bus.base import DEFAULT_MAX_PENDING, Fanout, Subscription
from nexus.client import NexusClient, error_from_rpc
from nexus.errors import (
    ErrorCode,
    HandlerConfigError,
    NexusError,
    StreamErrorType,
    Unavailable,
    error_for_code,
)
from nexus.events import Event, JSONObject, encode_json, validate_payload
from nexus.grpc.convert import CODE_FOR_STATUS, event_from_response
from nexus.kv.base import KeyValueStore, KVLimits
from nexus.kv.sqlite import SqliteKeyValue
from nexus.patterns import parse_pattern
from nexus.plugin_runtime import CountedStream, PluginContext, PluginRuntime
from nexus.plugins import HandlerSpec, config_for
from nexus.provider import (
    check_handle_is_async,
    describe_exception,
    error_type_of,
    payload_problem,
    side_event_metadata,
)
from nexus.resume import Answer
from nexus.v1 import nexus_pb2, nexus_pb2_grpc

T = TypeVar("T")

DEFAULT_MAX_IN_FLIGHT: Final = 16
"""Requests of one handler a worker runs at once, unless told otherwise (``--max-in-flight``)."""
DEFAULT_SHUTDOWN_GRACE_S: Final = 5.0
REGISTER_TIMEOUT_S: Final = 10.0
"""Seconds the server has to answer ``register`` before the worker tries again."""
WORKER_DATA_DIR: Final = "worker"
"""The worker's subdirectory of the data directory: its plugins' ``kv.sqlite3``."""
FATAL_CODES: Final = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
"""Status codes that end :meth:`Worker.run`: registering again would be refused the same way."""
DEFAULT_BACKOFF: Final = BackoffPolicy(initial_delay=0.1, max_delay=5.0, healthy_after=5.0)

_current_request: contextvars.ContextVar[Event | None] = contextvars.ContextVar("nexus_worker_request", default=None)


def default_worker_name() -> str:
    """``host:pid``: how a worker shows in the server's logs and listings unless named (``--name``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def declaration(handler: AnyHandler, *, name: str, max_in_flight: int) -> nexus_pb2.WorkerHandler:
    """What the worker tells the server about ``handler``: its class attributes as a ``WorkerHandler``.

    ``stream_timeout`` ``SERVER_DEFAULT`` is sent as 0 (the server's default) and ``None`` as -1 (no limit);
    ``buffer_size`` None as 0 (the server's default). Raises :class:`HandlerConfigError` naming the handler and
    the attribute for values no server would take; the server checks the rest (the event type, the streaming
    rules) and refuses the registration with the reason.
    """
    cls = type(handler)
    if not isinstance(handler, (EventHandler, StreamingEventHandler)):
        raise HandlerConfigError(f"{name}: not an EventHandler or StreamingEventHandler")
    check_handle_is_async(name, handler)
    event_type = getattr(cls, "event_type", None)
    if not isinstance(event_type, str) or not event_type:
        raise HandlerConfigError(f"{name}: set the class attribute event_type = 'service:action'")
    timeout = cls.stream_timeout
    if timeout is SERVER_DEFAULT:
        timeout_s = 0.0
    elif timeout is None:
        timeout_s = -1.0
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        timeout_s = float(timeout)
    else:
        raise HandlerConfigError(f"{name}: stream_timeout must be a positive number of seconds or None")
    ordering_key = cls.ordering_key
    if ordering_key is not None and (not isinstance(ordering_key, str) or not ordering_key):
        raise HandlerConfigError(f"{name}: ordering_key must be a payload field name or None")
    buffer_size = cls.buffer_size
    if buffer_size is not None and (isinstance(buffer_size, bool) or not isinstance(buffer_size, int)):
        raise HandlerConfigError(f"{name}: buffer_size must be a whole number of chunks or None")
    if buffer_size is not None and buffer_size < 1:
        raise HandlerConfigError(f"{name}: buffer_size must be at least 1")
    if max_in_flight < 1:
        raise HandlerConfigError(f"max_in_flight must be at least 1, got {max_in_flight}")
    return nexus_pb2.WorkerHandler(
        event_type=event_type,
        streaming=isinstance(handler, StreamingEventHandler),
        ordering_key=ordering_key or "",
        stream_timeout_s=timeout_s,
        buffer_size=buffer_size or 0,
        max_in_flight=max_in_flight,
        name=name,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How a :class:`Worker` serves (``nexus worker``'s options)."""

    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    """Requests of each handler run at once."""
    name: str = dataclasses.field(default_factory=default_worker_name)
    """How the server names this worker in logs, ``nexus handlers`` and ``nexus streams``."""
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    """Seconds running requests may take to finish once the worker stops; then they are cancelled."""
    backoff: BackoffPolicy = DEFAULT_BACKOFF
    """Waits between reconnection attempts."""
    data_dir: str | None = None
    """The directory of the plugins' ``ctx.kv`` (``<data_dir>/kv.sqlite3``); None: an in-memory store."""
    kv_limits: KVLimits | None = None
    """What one plugin may keep in ``ctx.kv`` (the ``kv_max_*`` settings); None: the defaults."""


class _Outbox:
    """The messages a connection sends, in order; the request iterator of its ``HandleEvents`` call.

    Synchronous to fill (never awaits); a chunk joins the chunk message waiting last in line when it is of the
    same stream, so a fast stream sends few large messages.
    """

    def __init__(self) -> None:
        self._items: deque[nexus_pb2.HandleEventsRequest] = deque()
        self._wake = asyncio.Event()
        self._closed = False

    def put(self, message: nexus_pb2.HandleEventsRequest) -> None:
        if self._closed:
            return
        self._items.append(message)
        self._wake.set()

    def chunk(self, correlation_id: str, payload_json: bytes) -> None:
        last = self._items[-1] if self._items else None
        if last is not None and last.WhichOneof("body") == "chunk" and last.chunk.correlation_id == correlation_id:
            last.chunk.payloads_json.append(payload_json)
            return
        self.put(
            nexus_pb2.HandleEventsRequest(
                chunk=nexus_pb2.WorkerChunk(correlation_id=correlation_id, payloads_json=[payload_json])
            )
        )

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def __aiter__(self) -> AsyncIterator[nexus_pb2.HandleEventsRequest]:
        while True:
            while self._items:
                yield self._items.popleft()
            if self._closed:
                return
            self._wake.clear()
            await self._wake.wait()


class _Entry:
    """One handler the worker serves."""

    def __init__(self, spec: HandlerSpec, config: dict[str, Any], max_in_flight: int) -> None:
        self.name = spec.name
        self.handler = spec.handler
        self.declaration = declaration(spec.handler, name=spec.name, max_in_flight=max_in_flight)
        self.service_action = self.declaration.event_type
        self.config = config

    def serves(self, event: Event) -> bool:
        parsed = event.type
        return self.service_action in (f"{parsed.service}:{parsed.action}", parsed.base)


class _Run:
    """One request this worker was given: its task, its stream's credit and how it ended."""

    def __init__(self, entry: _Entry, request: Event, credit: int) -> None:
        self.entry = entry
        self.request = request
        self.credit = credit
        self.credit_arrived = asyncio.Event()
        self.cancel_reason: str | None = None
        """Set when the server sent ``cancel``: answered ``cancelled``."""
        self.dropped = False
        """Set when the connection went away or the worker gave up on it: answered nothing."""
        self.task: asyncio.Task[None] | None = None

    @property
    def correlation_id(self) -> str:
        return self.request.event_id

    def stop(self, *, reason: str | None = None) -> None:
        if reason is None:
            self.dropped = True
        elif self.cancel_reason is None:
            self.cancel_reason = reason
        if self.task is not None:
            self.task.cancel()

    def add_credit(self, chunks: int) -> None:
        self.credit += chunks
        self.credit_arrived.set()


class _RemoteStream(CountedStream):
    def __init__(self, run: _Run, outbox: _Outbox) -> None:
        super().__init__(run.correlation_id)
        self._run = run
        self._outbox = outbox

    async def send(self, chunk: JSONObject) -> None:
        self._check_open()
        payload = validate_payload(chunk)
        run = self._run
        while run.credit <= 0:
            run.credit_arrived.clear()
            await run.credit_arrived.wait()
            self._check_open()
        run.credit -= 1
        self._accepted += 1
        self._outbox.chunk(run.correlation_id, encode_json(payload, "chunk"))

    def close(self) -> None:
        self._closed = True
        self._run.credit_arrived.set()


class _CallSubscription(Subscription):
    """A :class:`~nexus.bus.base.Subscription` fed by one ``SubscribeEventBatches`` call; closing it ends the call."""

    def __init__(self, call: Any, **kwargs: Any) -> None:
        super().__init__(Fanout(), **kwargs)
        self._call = call

    def close(self) -> None:
        self._call.cancel()
        super().close()


class RemoteEvents:
    """Subscriptions over a server's ``SubscribeEventBatches``: where a worker's ``ctx.follow`` subscribes
    (the :class:`~nexus.plugin_runtime.EventSource` of its :class:`~nexus.plugin_runtime.PluginRuntime`).

    A subscription ends when its call does (the follower then resubscribes after the last offset it applied).
    """

    def __init__(self, client: NexusClient) -> None:
        self._client = client
        self.epoch = ""
        """The server's epoch, as its last subscription reported it ("" until one did)."""

    async def subscribe(
        self,
        patterns: Iterable[str] = (),
        *,
        since_offset: int = 0,
        epoch: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> Subscription:
        patterns = list(patterns)
        for pattern in patterns:
            parse_pattern(pattern)
        if since_offset == 0 and epoch == "":
            # The whole history was asked for (offset 0 with the source's epoch) before any call told this
            # worker the server's epoch: learn it, so offset 0 asks for a replay rather than "live".
            probe = await self._open(patterns, 0, "", max_pending)
            epoch = probe.epoch
            probe.close()
        return await self._open(patterns, since_offset, epoch or "", max_pending)

    async def _open(self, patterns: list[str], since_offset: int, epoch: str, max_pending: int) -> Subscription:
        request = nexus_pb2.SubscribeEventBatchesRequest(
            event_types=patterns,
            since_offset=since_offset,
            epoch=epoch,
            payload_encoding=nexus_pb2.PAYLOAD_ENCODING_JSON,
        )
        call = self._client.stub.SubscribeEventBatches(request, metadata=self._client.metadata)
        answer: Answer | None = None
        try:
            answer = Answer.read(await call.initial_metadata())
            if answer is None:  # the call ended before the server answered: say why
                code = await call.code()
                details = await call.details() or f"the subscription ended before it started ({code.name})"
                raise error_for_code(CODE_FOR_STATUS.get(code, ErrorCode.UNAVAILABLE), details)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        finally:
            if answer is None:
                call.cancel()
        self.epoch = answer.epoch
        subscription = _CallSubscription(
            call,
            patterns=patterns,
            max_pending=max_pending,
            start_after=answer.head_offset,
            epoch=answer.epoch,
            recovered=answer.recovered,
        )
        subscription.reader = asyncio.get_running_loop().create_task(self._feed(call, subscription))
        return subscription

    @staticmethod
    async def _feed(call: Any, subscription: Subscription) -> None:
        try:
            async for message in call:
                subscription.push([event_from_response(item) for item in message.events])
                if subscription.closed:
                    return
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            subscription.close()


class _WorkerContext(PluginContext):
    def __init__(self, worker: Worker, entry: _Entry) -> None:
        log = structlog.get_logger("nexus.handler").bind(handler=entry.name, worker=worker.settings.name)
        super().__init__(worker.plugins, entry.name, entry.config, log)
        self._worker = worker

    async def publish(
        self,
        event_type: str,
        payload: JSONObject | None = None,
        *,
        metadata: dict[str, str] | None = None,
        event_id: str | None = None,
    ) -> Event:
        metadata = side_event_metadata(_current_request.get(), metadata)
        event = Event.create(event_type, payload, event_id=event_id, metadata=metadata)  # bad input raises here
        return await self._worker.client.emit(
            event.event_type, event.payload, event_id=event.event_id, metadata=event.metadata
        )

    @contextlib.asynccontextmanager
    async def subscribe(self, *patterns: str, since_offset: int = 0) -> AsyncIterator[AsyncIterator[Event]]:
        for pattern in patterns:
            parse_pattern(pattern)
        subscription = self._worker.client.subscribe(*patterns, since_offset=since_offset)
        try:
            yield aiter(subscription)
        finally:
            subscription.close()

    def stats(self) -> JSONObject:
        return self._worker.stats()


class _Lost(Unavailable):
    """The connection is unusable (the server went silent, or answered out of turn); reconnect."""


class Worker:
    """Serves ``specs`` (handler instances with their registration names, as :func:`nexus.plugins.discover`
    builds them) for the Nexus server at ``target`` until :meth:`stop`.

    ``handler_config`` and ``defaults`` make each handler's ``ctx.config`` as ``nexus serve`` does
    (:func:`nexus.plugins.config_for`). ``tls``, ``ca_file`` and ``token`` connect as :class:`NexusClient` does;
    publishing, subscribing and following use the same connection's channel.
    """

    def __init__(
        self,
        target: str,
        specs: Sequence[HandlerSpec],
        settings: WorkerSettings | None = None,
        *,
        handler_config: Mapping[str, Mapping[str, Any]] | None = None,
        defaults: Mapping[str, Any] | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        token: str | None = None,
        kv: KeyValueStore | None = None,
    ) -> None:
        if not specs:
            raise HandlerConfigError("a worker needs at least one handler to serve")
        self.settings = settings or WorkerSettings()
        self.log = structlog.get_logger("nexus.worker").bind(worker=self.settings.name)
        names: set[str] = set()
        self._entries: list[_Entry] = []
        for spec in specs:
            if spec.name in names:
                raise HandlerConfigError(f"two handlers are named {spec.name!r}")
            names.add(spec.name)
            config = config_for(spec.name, handler_config or {}, defaults)
            self._entries.append(_Entry(spec, config, self.settings.max_in_flight))
        self.client = NexusClient(target, backoff=self.settings.backoff, tls=tls, ca_file=ca_file, token=token)
        self._stub = nexus_pb2_grpc.WorkerServiceStub(self.client.channel)
        if kv is None and self.settings.data_dir is not None:
            kv = SqliteKeyValue(Path(self.settings.data_dir), self.settings.kv_limits)
            self._owns_kv = True
        else:
            self._owns_kv = False
        self._kv = kv
        self.plugins = PluginRuntime(RemoteEvents(self.client), kv)
        """The handlers' background tasks, followers, shared objects and ``ctx.kv``."""
        self.backoff = Backoff(self.settings.backoff)
        self._stop = asyncio.Event()
        self._registered = asyncio.Event()
        self.worker_id = ""
        """The id the server gave this worker's current connection ("" while not registered)."""
        self.connects = 0
        """Registrations the server accepted (1 + reconnections)."""
        self.handled = 0
        """Requests that ended here (answered or dropped)."""
        self._runs: dict[str, _Run] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._started_at = time.monotonic()

    @property
    def registered(self) -> bool:
        """Whether the server accepted this worker's registration on the current connection."""
        return self._registered.is_set()

    async def wait_registered(self, timeout: float = 10.0) -> None:
        """Wait until the server accepted the registration (TimeoutError after ``timeout`` seconds)."""
        await asyncio.wait_for(self._registered.wait(), timeout)

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no request runs here (TimeoutError after ``timeout`` seconds)."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    def stop(self) -> None:
        """Stop serving: :meth:`run` drains what runs (within ``shutdown_grace_s``), tears down and returns."""
        self._stop.set()

    def stats(self) -> JSONObject:
        """This worker's counters: what a handler's ``ctx.stats()`` returns out of process."""
        return {
            "worker": self.settings.name,
            "worker_id": self.worker_id,
            "registered": self.registered,
            "connects": self.connects,
            "active_requests": len(self._runs),
            "handled": self.handled,
            "uptime_s": round(time.monotonic() - self._started_at, 3),
        }

    # --- lifetime ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Set the handlers up, serve until :meth:`stop`, then tear them down.

        Raises the :class:`~nexus.errors.NexusError` of a refusal that reconnecting cannot mend (the
        registration is invalid, the token may not serve a type), and what a handler's ``setup`` raises.
        """
        set_up: list[_Entry] = []
        try:
            async with self.plugins.running():
                for entry in self._entries:
                    context = _WorkerContext(self, entry)
                    entry.handler.ctx = context
                    await entry.handler.setup(context)
                    set_up.append(entry)
                await self._serve_until_stopped()
        finally:
            for entry in reversed(set_up):
                try:
                    await entry.handler.teardown()
                except Exception as exc:
                    self.log.exception("teardown_failed", handler=entry.name, error=describe_exception(exc))
            await self.plugins.close(self.log)
            if self._owns_kv and self._kv is not None:
                await self._kv.close()
            await self.client.close()

    async def _serve_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            self.backoff.call_opened(loop.time())
            try:
                await self._connection()
                reason = "the server ended the call"
            except grpc.aio.AioRpcError as error:
                if error.code() in FATAL_CODES:
                    raise error_from_rpc(error) from None
                reason = f"{error.code().name}: {error.details() or ''}".rstrip(": ")
            except (_Lost, TimeoutError) as exc:
                reason = str(exc) or "the server did not answer"
            finally:
                self._registered.clear()
                self.worker_id = ""
            if self._stop.is_set():
                return
            delay = self.backoff.call_failed(loop.time())
            self.log.warning(
                "worker_reconnecting", reason=reason, attempt=self.backoff.attempts, delay_s=round(delay, 3)
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _connection(self) -> None:
        """One ``HandleEvents`` call: register, then serve until it ends or the worker stops."""
        outbox = _Outbox()
        register = nexus_pb2.WorkerRegister(
            worker_name=self.settings.name, handlers=[entry.declaration for entry in self._entries]
        )
        outbox.put(nexus_pb2.HandleEventsRequest(register=register))
        call = self._stub.HandleEvents(aiter(outbox), metadata=self.client.metadata)
        reader: asyncio.Task[None] | None = None
        try:
            first = await asyncio.wait_for(call.read(), REGISTER_TIMEOUT_S)
            if first is grpc.aio.EOF:  # a refusal raises (AioRpcError): this call ended without one
                raise _Lost("the server ended the call before answering register")
            if first.WhichOneof("body") != "registered":
                raise _Lost(f"the server answered register with {first.WhichOneof('body')}")
            registered = first.registered
            self.worker_id = registered.worker_id
            self.connects += 1
            self.backoff.connected(asyncio.get_running_loop().time())
            self._registered.set()
            self.log.info(
                "worker_registered",
                worker_id=registered.worker_id,
                handlers=[entry.service_action for entry in self._entries],
                ping_interval_s=registered.ping_interval_s,
            )
            silence = registered.worker_timeout_s + registered.ping_interval_s
            reader = asyncio.create_task(self._read(call, outbox, silence if registered.ping_interval_s > 0 else 0))
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if reader.done():
                reader.result()
                return
            # No more requests for this worker; those already on their way are left unstarted (handed back).
            outbox.put(nexus_pb2.HandleEventsRequest(drain=nexus_pb2.WorkerDrain()))
            await self._drain()
        finally:
            for run in list(self._runs.values()):
                run.stop()
            await self._wait_runs(None)
            outbox.close()
            call.cancel()
            if reader is not None and not reader.done():
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader

    async def _drain(self) -> None:
        """The worker stops: let running requests finish within the grace, then give up on the rest."""
        if self._runs:
            self.log.info("worker_draining", running=len(self._runs), grace_s=self.settings.shutdown_grace_s)
        await self._wait_runs(self.settings.shutdown_grace_s)
        if self._runs:
            self.log.warning("worker_drain_cut", cancelled=len(self._runs))

    async def _wait_runs(self, timeout: float | None) -> None:
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def _read(self, call: Any, outbox: _Outbox, silence: float) -> None:
        while True:
            try:
                message = await (asyncio.wait_for(call.read(), silence) if silence > 0 else call.read())
            except TimeoutError:
                raise _Lost(f"the server sent nothing for {silence:g}s") from None
            if message is grpc.aio.EOF:  # the server ended the call (an error would have raised)
                return
            body = message.WhichOneof("body")
            if body == "request":
                self._start(message.request, outbox)
            elif body == "cancel":
                run = self._runs.get(message.cancel.correlation_id)
                if run is not None:
                    run.stop(reason=message.cancel.reason or "cancelled")
            elif body == "credit":
                run = self._runs.get(message.credit.correlation_id)
                if run is not None:
                    run.add_credit(message.credit.chunks)
            elif body == "ping":
                outbox.put(nexus_pb2.HandleEventsRequest(pong=nexus_pb2.WorkerPong(nonce=message.ping.nonce)))
            elif body == "refused":
                self._refused(message.refused, outbox)
            else:
                self.log.warning("worker_unexpected_message", body=body)

    def _refused(self, refused: nexus_pb2.WorkerRefused, outbox: _Outbox) -> None:
        """The server did not accept a message. For a request still running here (a chunk it refused), the
        handler is stopped and the request ended with ``error`` (the server ignores it if the request already
        ended there)."""
        self.log.warning(
            "worker_message_refused",
            correlation_id=refused.correlation_id,
            code=refused.code,
            message=refused.message,
        )
        run = self._runs.get(refused.correlation_id)
        if run is None or refused.code == "unknown_request":
            if run is not None:
                run.stop()
            return
        run.stop()
        outbox.put(_error(refused.correlation_id, "handler_error", f"the server refused a message: {refused.message}"))

    def _start(self, request: nexus_pb2.WorkerRequest, outbox: _Outbox) -> None:
        if self._stop.is_set():
            return  # left unstarted: the server gives it to another worker once this one is gone
        self.backoff.delivered()  # the connection works: a later failure starts the backoff over
        event = event_from_response(request.event)
        entry = next((entry for entry in self._entries if entry.serves(event)), None)
        if entry is None:
            outbox.put(_error(event.event_id, "handler_error", f"this worker serves no handler for {event.event_type}"))
            return
        run = _Run(entry, event, request.credit)
        self._runs[run.correlation_id] = run
        self._idle.clear()
        run.task = asyncio.get_running_loop().create_task(self._handle(run, outbox), name=f"nexus-worker-{entry.name}")

    async def _handle(self, run: _Run, outbox: _Outbox) -> None:
        token = _current_request.set(run.request)
        cid = run.correlation_id
        log = self.log.bind(event_type=run.request.event_type, correlation_id=cid, handler=run.entry.name)
        stream = _RemoteStream(run, outbox)
        answer: nexus_pb2.HandleEventsRequest | None = None
        try:
            outbox.put(nexus_pb2.HandleEventsRequest(started=nexus_pb2.WorkerStarted(correlation_id=cid)))
            answer = await self._answer(run, stream, log)
        except asyncio.CancelledError:
            if not (run.dropped or run.cancel_reason is not None):
                raise
        finally:
            stream.close()
            _current_request.reset(token)
            self._runs.pop(cid, None)
            if not self._runs:
                self._idle.set()
            self.handled += 1
            if run.dropped:
                pass  # the server already ended it (the connection went away, or it refused the request)
            elif run.cancel_reason is not None:
                outbox.put(nexus_pb2.HandleEventsRequest(cancelled=nexus_pb2.WorkerCancelled(correlation_id=cid)))
            elif answer is not None:
                outbox.put(answer)

    async def _answer(self, run: _Run, stream: _RemoteStream, log: Any) -> nexus_pb2.HandleEventsRequest:
        handler = run.entry.handler
        cid = run.correlation_id
        problem = payload_problem(handler.takes, run.request)
        if problem is not None:
            return _error(cid, StreamErrorType.INVALID_PAYLOAD, problem)
        try:
            if isinstance(handler, StreamingEventHandler):
                await handler.handle_stream(run.request, stream)
                return nexus_pb2.HandleEventsRequest(result=nexus_pb2.WorkerResult(correlation_id=cid))
            result = await handler.handle(run.request)
        except Exception as exc:
            log.warning("handler_failed", error=describe_exception(exc), exc_info=exc)
            return _error(cid, error_type_of(exc), describe_exception(exc))
        try:
            payload = validate_payload(result)
        except NexusError as exc:
            return _error(cid, StreamErrorType.HANDLER_ERROR, f"handler returned an invalid result: {exc.message}")
        return nexus_pb2.HandleEventsRequest(
            result=nexus_pb2.WorkerResult(correlation_id=cid, payload_json=encode_json(payload, "result"))
        )


def _error(correlation_id: str, error_type: str, message: str) -> nexus_pb2.HandleEventsRequest:
    return nexus_pb2.HandleEventsRequest(
        error=nexus_pb2.WorkerError(correlation_id=correlation_id, type=str(error_type), message=message)
    )
