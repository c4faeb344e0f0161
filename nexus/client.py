"""The async Python client SDK.

::

    async with NexusClient("127.0.0.1:50051") as client:
        stored = await client.emit("demo:ping:v1:happened", {"n": 1})

        async for event in client.subscribe("demo:>"):          # reconnects and resumes by itself
            ...                                                  # (jittered backoff: BackoffPolicy)

        async for event in client.request("demo:stream_countdown:v1:requested", {"n": 3}):
            print(event.state, event.payload)                    # started, stream..., success

Events convert to CloudEvents 1.0 (JSON format) with :func:`to_cloudevent` or, with ``partitionkey`` from the
handlers' ordering keys, a :class:`CloudEventsView` (docs/cloudevents.md).

Errors the server reports are raised as :class:`~nexus.errors.NexusError` subclasses (``InvalidArgument``,
``ResourceExhausted``, ``Unavailable``, ...), so callers catch meaning, not gRPC status codes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Final, Literal, TypedDict, Unpack

import grpc
import structlog

from nexus.backoff import Backoff, BackoffPolicy
from nexus.bus.base import Published
from nexus.cloudevents import CloudEventsView as CloudEventsView
from nexus.cloudevents import to_cloudevent as to_cloudevent
from nexus.errors import ErrorCode, NexusError, error_for_code
from nexus.events import TERMINAL_STATES, Event, JSONObject, encode_json, validate_metadata, validate_payload
from nexus.grpc.convert import CODE_FOR_STATUS, DUPLICATE, event_from_response, event_to_request, payload_to_struct
from nexus.resume import Answer, ResumePoint
from nexus.tls import channel_credentials
from nexus.tracing import inject
from nexus.v1 import nexus_pb2, nexus_pb2_grpc

log = structlog.get_logger("nexus.client")

PayloadEncoding = Literal["struct", "json"]
"""How payloads travel between a client and the server: ``struct`` (``google.protobuf.Struct``, the default) or
``json`` (compact UTF-8 JSON bytes: ``payload_json``, ``PAYLOAD_ENCODING_JSON``)."""
_WIRE_ENCODING: Final = {
    "struct": nexus_pb2.PAYLOAD_ENCODING_UNSPECIFIED,
    "json": nexus_pb2.PAYLOAD_ENCODING_JSON,
}

RETRYABLE: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def error_from_rpc(error: grpc.aio.AioRpcError) -> NexusError:
    """The :class:`NexusError` for a failed call."""
    code = CODE_FOR_STATUS.get(error.code(), ErrorCode.INTERNAL)
    details = error.details() or error.code().name
    return error_for_code(code, details)


@dataclasses.dataclass(frozen=True, slots=True)
class PublishSummary:
    """What :meth:`NexusClient.publish_many` stored."""

    stored: int
    duplicates: int
    last_offset: int
    epoch: str


class EmitOptions(TypedDict, total=False):
    """The keyword arguments of :meth:`NexusClient.emit` (those of :meth:`NexusClient.store`)."""

    event_id: str | None
    metadata: dict[str, str] | None
    timeout: float | None


class Subscription:
    """An async iterator over events matching patterns; reconnects and resumes from its last offset.

    A subscription started live resumes after the head the server reported when it went live, so what was stored
    while it was cut off is replayed even when it had received nothing; ``since_offset=0`` with an ``epoch`` asks
    for everything of that epoch the server still holds (:mod:`nexus.resume` has the rules).

    ``recovered`` tells how the latest (re)connection went: True when the server replayed every event missed,
    False when it could not (another epoch, or history no longer holds the gap), None when nothing was asked.
    ``on_connect`` (optional) is called after every (re)connection with this subscription, once the server's
    initial metadata (``nexus-epoch``, ``nexus-head-offset``) has arrived: never for an attempt that did not reach
    a Nexus server.

    Reconnection waits follow ``backoff`` (a :class:`~nexus.backoff.BackoffPolicy`: from 0.1 s, doubling, up to
    10 s, with jitter by default). The wait grows with each failed attempt and starts again from the beginning
    only after a call delivered an event or stayed connected for ``backoff.healthy_after`` seconds, so a server
    that fails every call is not retried in a hot loop. Errors that retrying cannot mend (``INVALID_ARGUMENT``
    for a bad pattern, ``UNAUTHENTICATED``, ``PERMISSION_DENIED``, ...) end the iteration with their
    :class:`~nexus.errors.NexusError`. ``attempts`` counts the calls opened, ``connects`` those the server
    answered.
    """

    def __init__(
        self,
        client: NexusClient,
        patterns: Sequence[str],
        *,
        since_offset: int = 0,
        epoch: str | None = None,
        reconnect: bool = True,
        max_batch_size: int = 0,
        on_connect: Callable[[Subscription], None] | None = None,
        max_retry_delay: float | None = None,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        self._client = client
        self.patterns = list(patterns)
        self._point = ResumePoint(since_offset, epoch)
        self.reconnect = reconnect
        self.max_batch_size = max_batch_size
        self.on_connect = on_connect
        policy = backoff or client.backoff
        if max_retry_delay is not None:  # the older spelling of backoff.max_delay
            policy = dataclasses.replace(
                policy, max_delay=max_retry_delay, initial_delay=min(policy.initial_delay, max_retry_delay)
            )
        self.backoff = Backoff(policy)
        self.connects = 0
        self._call: Any = None
        self._closed = False

    @property
    def attempts(self) -> int:
        """Calls opened so far (the first one included)."""
        return self.backoff.attempts

    @property
    def last_offset(self) -> int:
        """The offset the next (re)connection resumes after: the last stored event delivered, or the head the
        server reported when the subscription went live (heartbeats, offset 0, never move it)."""
        return self._point.last_offset

    @property
    def epoch(self) -> str:
        """The epoch :attr:`last_offset` belongs to ("" until a server answered, when none was given)."""
        return self._point.epoch

    @property
    def head_offset(self) -> int:
        """The server's newest stored offset when the latest (re)connection went live."""
        return self._point.head_offset

    @property
    def recovered(self) -> bool | None:
        """How the latest (re)connection went (see the class docstring)."""
        return self._point.recovered

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    def _connected(self, answer: Answer) -> None:
        self._point.answered(answer)
        self.connects += 1
        if self.on_connect is not None:
            self.on_connect(self)

    async def _iterate(self) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        backoff = self.backoff
        point = self._point
        while not self._closed:
            since_offset, epoch = point.ask()
            request = nexus_pb2.SubscribeEventBatchesRequest(
                event_types=self.patterns,
                since_offset=since_offset,
                epoch=epoch,
                max_batch_size=self.max_batch_size,
                payload_encoding=_WIRE_ENCODING[self._client.payload_encoding],
            )
            backoff.call_opened(loop.time())
            call = self._client.stub.SubscribeEventBatches(request, metadata=self._client.metadata)
            self._call = call
            ended = "OK"
            try:
                # A call that fails before the server answers (a closed port) still "returns" empty initial
                # metadata: only the server's own keys mean the subscription is live.
                answer = Answer.read(await call.initial_metadata())
                if answer is not None:
                    backoff.connected(loop.time())
                    self._connected(answer)
                async for message in call:
                    if message.events:
                        backoff.delivered()
                    for item in message.events:
                        event = event_from_response(item)
                        point.delivered(event.offset)
                        yield event
            except grpc.aio.AioRpcError as error:
                if self._closed:
                    return
                if not self.reconnect or error.code() not in RETRYABLE:
                    raise error_from_rpc(error) from None
                ended = error.code().name
            finally:
                call.cancel()
                self._call = None
            if not self.reconnect or self._closed:
                return
            delay = backoff.call_failed(loop.time())
            log.info(
                "subscription_reconnecting",
                code=ended,
                attempt=backoff.attempts,
                failures=backoff.failures,
                delay_s=round(delay, 3),
                last_offset=self.last_offset,
            )
            await asyncio.sleep(delay)

    def close(self) -> None:
        """Stop the subscription; the iterator ends."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()


class RequestStream:
    """The lifecycle of one request, as an async iterator that ends after the terminal event.

    ``request`` is the stored ``requested`` event once iteration has begun; ``terminal`` the last event.
    """

    def __init__(self, client: NexusClient, event: Event, *, heartbeats: bool = True) -> None:
        self._client = client
        self._event = event
        self.heartbeats = heartbeats
        self.request: Event | None = None
        self.terminal: Event | None = None
        self.duplicate = False
        self._call: Any = None

    @property
    def correlation_id(self) -> str:
        """The request's ``event_id``: the ``correlation_id`` of every lifecycle event."""
        return self._event.event_id

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        json_payload = self._client.payload_encoding == "json"
        request = nexus_pb2.RequestEventRequest(
            event=event_to_request(self._event, json_payload=json_payload),
            payload_encoding=_WIRE_ENCODING[self._client.payload_encoding],
        )
        call = self._client.stub.RequestEvent(request, metadata=self._client.metadata)
        self._call = call
        try:
            async for message in call:
                event = event_from_response(message.event)
                if self.request is None:
                    self.request = event
                    self.duplicate = message.event.message == DUPLICATE
                    continue
                if event.state == "heartbeat" and not self.heartbeats:
                    continue
                yield event
                if event.state in TERMINAL_STATES:
                    self.terminal = event
                    return
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        finally:
            call.cancel()

    async def result(self) -> Event:
        """Iterate to the end and return the terminal event."""
        async for _ in self:
            pass
        if self.terminal is None:
            raise NexusError("the request's lifecycle ended without a terminal event")
        return self.terminal

    async def cancel(self, reason: str = "cancelled by requester") -> bool:
        """Ask the server to cancel this request's stream."""
        return await self._client.cancel(self.correlation_id, reason)


class NexusClient:
    """A connection to a Nexus server.

    ``tls=True`` connects over TLS (a server started with ``--tls-cert`` / ``--tls-key``), verifying the server's
    certificate against the CA certificates (PEM) in ``ca_file``, else against the system's roots; ``ca_file``
    alone implies ``tls``. A plaintext client cannot talk to a TLS server, nor the other way round: calls fail
    with :class:`~nexus.errors.Unavailable`.

    ``token`` (a JWT, for a server with authentication on) is sent with every call as ``authorization: Bearer
    <token>``; a server that refuses it answers with :class:`~nexus.errors.Unauthenticated`. Over a plaintext
    channel the token travels in clear: use TLS beyond loopback.

    ``payload_encoding="json"`` sends and receives payloads as compact JSON bytes rather than as a
    ``google.protobuf.Struct`` (less work on both sides for large payloads; integers beyond 2**53 stay exact).
    Events read the same either way: whole numbers come back as ``int``.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        metadata: Iterable[tuple[str, str]] = (),
        channel: grpc.aio.Channel | None = None,
        backoff: BackoffPolicy | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        token: str | None = None,
        payload_encoding: PayloadEncoding = "struct",
    ) -> None:
        if payload_encoding not in _WIRE_ENCODING:
            raise ValueError(f"payload_encoding must be 'struct' or 'json', not {payload_encoding!r}")
        self.payload_encoding: PayloadEncoding = payload_encoding
        self.target = target
        self.metadata = tuple(metadata)
        if token:
            self.metadata = (
                *(item for item in self.metadata if item[0] != "authorization"),
                ("authorization", f"Bearer {token}"),
            )
        self.backoff = backoff or BackoffPolicy()
        """The reconnection policy of this client's subscriptions (each may override it)."""
        self.tls = tls or ca_file is not None
        self._own_channel = channel is None
        self.channel = channel or self._channel(ca_file)
        self.stub = nexus_pb2_grpc.NexusServiceStub(self.channel)

    def _channel(self, ca_file: str | None) -> grpc.aio.Channel:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.enable_retries", 1),
            # One client, one connection: the server's per-connection limits then apply per client.
            ("grpc.use_local_subchannel_pool", 1),
            # The channel's own reconnection backoff (1 s to 120 s by default) within the subscriptions'
            # bounds, so a server that comes back is found by the next attempt. Not grpc.min_reconnect_backoff_ms:
            # gRPC takes it as the time one connection attempt may last (20 s by default), and a short one
            # fails every attempt over a link whose handshake is slower (a far server, TLS, a loaded machine).
            ("grpc.initial_reconnect_backoff_ms", max(1, int(self.backoff.initial_delay * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(self.backoff.max_delay * 1000))),
        ]
        if self.tls:
            return grpc.aio.secure_channel(self.target, channel_credentials(ca_file), options=options)
        return grpc.aio.insecure_channel(self.target, options=options)

    async def __aenter__(self) -> NexusClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (when this client opened it)."""
        if self._own_channel:
            await self.channel.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel is connected."""
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    async def emit(self, event_type: str, payload: JSONObject | None = None, **options: Unpack[EmitOptions]) -> Event:
        """Publish one event; returns it as stored (``offset``, ``epoch``). ``options``: ``event_id`` (yours to
        choose; deduplicated), ``metadata`` (a string map), ``timeout`` (seconds, 30 by default).

        A repeated ``event_id`` inside the dedupe window returns the stored original (:meth:`store` says which).
        """
        return (await self.store(event_type, payload, **options)).event

    async def store(
        self,
        event_type: str,
        payload: JSONObject | None = None,
        *,
        event_id: str | None = None,
        metadata: dict[str, str] | None = None,
        timeout: float | None = 30.0,
    ) -> Published:
        """Publish one event as :meth:`emit` does; returns it as stored and whether the server already held it.

        ``duplicate`` is True when the ``event_id`` was stored before inside the dedupe window: the event is then
        the stored original, and nothing new was stored.
        """
        checked = validate_payload(payload)
        request = nexus_pb2.EventRequest(
            event_type=event_type, event_id=event_id or "", metadata=inject(validate_metadata(metadata))
        )
        if self.payload_encoding == "json":
            request.payload_json = encode_json(checked, "payload")
        else:
            request.payload.CopyFrom(payload_to_struct(checked))
        try:
            response = await self.stub.EmitEvent(request, metadata=self.metadata, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        return Published(event_from_response(response), duplicate=response.message == DUPLICATE)

    async def publish_many(self, events: Iterable[Event], *, timeout: float | None = None) -> PublishSummary:
        """Publish events in order over one client stream."""

        json_payload = self.payload_encoding == "json"

        async def requests() -> AsyncIterator[nexus_pb2.PublishEventsRequest]:
            for event in events:
                metadata = inject(event.metadata)
                if metadata is not event.metadata:
                    event = event.evolve(metadata=metadata)
                yield nexus_pb2.PublishEventsRequest(event=event_to_request(event, json_payload=json_payload))

        try:
            response = await self.stub.PublishEvents(requests(), metadata=self.metadata, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        return PublishSummary(response.stored, response.duplicates, response.last_offset, response.epoch)

    def subscribe(
        self,
        *patterns: str,
        since_offset: int = 0,
        epoch: str | None = None,
        reconnect: bool = True,
        max_batch_size: int = 0,
        on_connect: Callable[[Subscription], None] | None = None,
        backoff: BackoffPolicy | None = None,
    ) -> Subscription:
        """Follow events matching ``patterns``; iterate the result with ``async for``.

        It reconnects by itself and resumes after the last offset it delivered, waiting between attempts as
        ``backoff`` says (default: the client's); see :class:`Subscription`.
        """
        return Subscription(
            self,
            patterns,
            since_offset=since_offset,
            epoch=epoch,
            reconnect=reconnect,
            max_batch_size=max_batch_size,
            on_connect=on_connect,
            backoff=backoff,
        )

    def request(
        self,
        event_type: str,
        payload: JSONObject | None = None,
        *,
        event_id: str | None = None,
        metadata: dict[str, str] | None = None,
        heartbeats: bool = True,
    ) -> RequestStream:
        """Publish a ``requested`` event and iterate its lifecycle until the terminal event."""
        event = Event(
            event_type=event_type, payload=validate_payload(payload), metadata=inject(validate_metadata(metadata))
        )
        if event_id:
            event = event.evolve(event_id=event_id)
        return RequestStream(self, event, heartbeats=heartbeats)

    async def call(self, event_type: str, payload: JSONObject | None = None, **kwargs: Any) -> Event:
        """Send a request and return its terminal event (``success``, ``failed``, ...)."""
        return await self.request(event_type, payload, **kwargs).result()

    async def cancel(self, correlation_id: str, reason: str = "cancelled by requester") -> bool:
        """Cancel a stream by its request's ``event_id``; returns whether this server found it."""
        try:
            response = await self.stub.CancelStream(
                nexus_pb2.CancelStreamRequest(correlation_id=correlation_id, reason=reason),
                metadata=self.metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        return bool(response.cancelled)

    async def handlers(self) -> list[JSONObject]:
        """The handlers the server drives."""
        try:
            response = await self.stub.ListHandlers(nexus_pb2.ListHandlersRequest(), metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        return [
            {
                "name": h.name,
                "event_type": h.event_type,
                "streaming": h.streaming,
                "ordering_key": h.ordering_key,
                "stream_timeout_s": h.stream_timeout_s or None,
                "class_path": h.class_path,
                "location": h.location or "in-process",
                "workers": h.workers,
            }
            for h in response.handlers
        ]

    async def streams(self) -> list[JSONObject]:
        """The streams the server drives now."""
        try:
            response = await self.stub.ListStreams(nexus_pb2.ListStreamsRequest(), metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        return [
            {
                "correlation_id": s.correlation_id,
                "event_type": s.event_type,
                "handler": s.handler,
                "stream_count": s.stream_count,
                "age_s": s.age_s,
                "state": s.state,
                "worker": s.worker,
            }
            for s in response.streams
        ]
