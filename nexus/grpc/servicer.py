"""The gRPC servicer: a thin adapter that feeds requests to a :class:`~nexus.node.Node` and writes what it returns.

Subscriber streams write pre-serialized bytes (each event serialized once for all subscribers); register the
servicer with :func:`add_to_server`, which lets bytes through the response serializers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, NoReturn

import grpc
import structlog

from nexus.auth import Authenticator, Credentials, allow_all, bearer_token
from nexus.bus.base import Published
from nexus.errors import InvalidArgument, NexusError, SlowConsumer, Unauthenticated
from nexus.events import DEFAULT_LIMITS, Event, EventLimits
from nexus.grpc.convert import (
    DUPLICATE,
    STATUS_FOR_CODE,
    STORED,
    EncodeCache,
    Undecodable,
    encode_response,
    event_from_request,
    guarded_deserializer,
    passthrough_serializer,
    request_event_response,
)
from nexus.identity import Principal
from nexus.logs import LogLimiter
from nexus.node import Node, Subscription
from nexus.quota import ClientLimits, ClientQuota, ClientQuotas
from nexus.resume import Answer
from nexus.v1 import nexus_pb2, nexus_pb2_grpc

PUBLISH_CHUNK: Final = 256
"""Events of a ``PublishEvents`` stream stored together at most (and read ahead while they are stored)."""
SINGLE_TAKE: Final = 64
"""Events a ``SubscribeEvents`` call takes from its queue at a time (it writes them one frame each)."""
DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 10_000

log = structlog.get_logger("nexus.grpc")


MAX_STATUS_MESSAGE: Final = 512
MAX_CANCEL_REASON: Final = 256


def status_message(message: str) -> str:
    """``message`` as a status detail: valid UTF-8 (anything else escaped) and short enough for any client."""
    if len(message) > MAX_STATUS_MESSAGE:
        message = message[: MAX_STATUS_MESSAGE - 3] + "..."
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: NexusError) -> NoReturn:
    """End the call with the status code the error table gives ``error``."""
    await context.abort(STATUS_FOR_CODE[error.code], status_message(error.message))
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


def _peer(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    try:
        return str(context.peer())
    except Exception:  # pragma: no cover - peer() is best effort
        return ""


Behaviour = Callable[..., Any]


class _Registrar:
    """Stands in for the server in the generated ``add_..._to_server`` to patch each method handler.

    Response serializers let pre-serialized bytes through. Request deserializers never raise: bytes that are not
    a valid message become an :class:`~nexus.grpc.convert.Undecodable`, which the wrapped behaviours answer with
    ``INVALID_ARGUMENT`` (grpcio would answer ``UNKNOWN`` and log a traceback at error level).
    """

    def __init__(self, server: grpc.aio.Server, servicer: NexusServicer) -> None:
        self._server = server
        self._servicer = servicer

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: :meth:`add_registered_method_handlers` registers the patched handlers both ways."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        patched = {name: self._patch(f"/{service}/{name}", handler) for name, handler in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, patched),))
        self._server.add_registered_method_handlers(service, patched)

    def _patch(self, method: str, handler: Any) -> Any:
        changes: dict[str, Any] = {
            "response_serializer": passthrough_serializer(handler.response_serializer),
            "request_deserializer": guarded_deserializer(handler.request_deserializer),
        }
        refuse = self._servicer.refuse_undecodable
        for kind in ("unary_unary", "unary_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                changes[kind] = _guard_unary(behaviour, method, refuse)
        for kind in ("stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                changes[kind] = _guard_stream(behaviour, method, refuse)
        return handler._replace(**changes)


Refuse = Callable[[grpc.aio.ServicerContext[Any, Any], str, Undecodable, int], Awaitable[NoReturn]]


def _guard_unary(behaviour: Behaviour, method: str, refuse: Refuse) -> Behaviour:
    """``behaviour`` answering an undecodable request with ``INVALID_ARGUMENT`` (grpcio tells a coroutine
    handler from an async generator handler by its function, so the wrapper is of the same kind)."""
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await refuse(context, method, request, 0)
            async with contextlib.aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await refuse(context, method, request, 0)
        return await behaviour(request, context)

    return call


def _guard_stream(behaviour: Behaviour, method: str, refuse: Refuse) -> Behaviour:
    """``behaviour`` whose request stream ends the call with ``INVALID_ARGUMENT`` at an undecodable message."""

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        index = 0
        async for request in requests:
            if isinstance(request, Undecodable):
                await refuse(context, method, request, index)
            yield request
            index += 1

    if inspect.isasyncgenfunction(behaviour):

        async def stream(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async with contextlib.aclosing(behaviour(checked(requests, context), context)) as responses:
                async for response in responses:
                    yield response

        return stream

    async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await behaviour(checked(requests, context), context)

    return call


def add_to_server(servicer: NexusServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` on ``server`` (the generated registration, with bytes-aware serializers and request
    deserializers that turn undecodable bytes into ``INVALID_ARGUMENT``)."""
    nexus_pb2_grpc.add_NexusServiceServicer_to_server(servicer, _Registrar(server, servicer))


class NexusServicer(nexus_pb2_grpc.NexusServiceServicer):
    """Implements ``nexus.v1.NexusService`` over a :class:`~nexus.node.Node`."""

    def __init__(
        self,
        node: Node,
        *,
        subscriber_queue: int = 10_000,
        limits: EventLimits = DEFAULT_LIMITS,
        client_limits: ClientLimits | None = None,
        authenticator: Authenticator = allow_all,
    ) -> None:
        self.node = node
        self.authenticator = authenticator
        self.auth_refused = 0
        """Calls refused for their credentials."""
        self.subscriber_queue = subscriber_queue
        self.limits = limits
        self._quotas = ClientQuotas(client_limits or ClientLimits())
        self._salt = os.urandom(16)
        self.bad_input = LogLimiter()
        """Rate-limits the warnings about what clients get wrong (and events that cannot be sent)."""
        self._encode = EncodeCache(warnings=self.bad_input)
        self._encode_json = EncodeCache(warnings=self.bad_input, json_payload=True)
        """The same, for subscribers that asked for ``PAYLOAD_ENCODING_JSON``."""
        self.undecodable = 0
        """Requests refused because their bytes were not a valid message."""
        self.subscriptions = 0
        self._open_calls: dict[str, int] = {}
        """Subscription calls open now."""
        self.events_sent = 0
        """Events written to subscription calls."""

    async def _refuse(self, context: grpc.aio.ServicerContext[Any, Any], error: NexusError) -> NoReturn:
        """End the call with ``error`` (:func:`abort`), counted as a refused input by its code."""
        self.node.telemetry.refused(error.code.value, "grpc")
        await abort(context, error)

    @property
    def events_skipped(self) -> int:
        """Events no subscriber was sent because they could not be encoded (each counted once)."""
        return self._encode.skipped + self._encode_json.skipped

    async def _encoder(self, encoding: int, context: grpc.aio.ServicerContext[Any, Any]) -> EncodeCache:
        """The encoder of the payload encoding a call asked for (an unknown value ends it with INVALID_ARGUMENT)."""
        if encoding == nexus_pb2.PAYLOAD_ENCODING_JSON:
            return self._encode_json
        if encoding not in (nexus_pb2.PAYLOAD_ENCODING_UNSPECIFIED, nexus_pb2.PAYLOAD_ENCODING_STRUCT):
            await self._refuse(
                context,
                InvalidArgument(
                    f"payload_encoding {encoding} is not a PayloadEncoding: use 0 (unspecified), 1 (STRUCT) or 2 (JSON)"
                ),
            )
        return self._encode

    async def refuse_undecodable(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, request: Undecodable, index: int
    ) -> NoReturn:
        """End a call whose request (message ``index`` of a request stream) could not be decoded."""
        self.undecodable += 1
        self.bad_input.warning(
            log, "grpc_undecodable_request", method=method, peer=_peer(context), index=index, error=request.reason
        )
        message = request.message if index == 0 else f"message {index} of the stream: {request.message}"
        await self._refuse(context, InvalidArgument(message))

    # --- the client's quota ---------------------------------------------------------------------------------

    async def _principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:  # noqa: RET503 - abort raises
        """Who a call acts as: its ``authorization: Bearer <token>`` metadata checked by the authenticator, on its
        connection (a keyed hash of the peer address, which events never show). A call the authenticator refuses
        ends with ``UNAUTHENTICATED`` (or ``PERMISSION_DENIED``) before it does anything."""
        peer = _peer(context)
        connection = hashlib.blake2b(peer.encode(), key=self._salt, digest_size=8).hexdigest()
        authorization = next(
            (str(value) for key, value in context.invocation_metadata() or () if key == "authorization"), None
        )
        credentials = Credentials(bearer_token(authorization), connection_id=f"grpc-{connection}", remote_address=peer)
        try:
            return await self.authenticator(credentials)
        except NexusError as exc:
            error = exc
        except Exception as exc:
            log.exception("grpc_authenticator_failed", error=repr(exc))
            error = Unauthenticated("the credentials could not be checked")
        self.auth_refused += 1
        self.bad_input.warning(log, "grpc_auth_refused", peer=peer, code=error.code.value, reason=error.message)
        await self._refuse(context, error)

    @property
    def connections(self) -> int:
        """Clients (peers) with a long-lived call open: a subscription or a request's stream."""
        return len(self._open_calls)

    def _call_opened(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """Count a long-lived call of the client; returns its peer, for :meth:`_call_closed` (which must not ask
        the context again: once the call is over, grpc's context may no longer answer)."""
        peer = _peer(context)
        self._open_calls[peer] = self._open_calls.get(peer, 0) + 1
        return peer

    def _call_closed(self, peer: str) -> None:
        left = self._open_calls.get(peer, 1) - 1
        if left > 0:
            self._open_calls[peer] = left
        else:
            self._open_calls.pop(peer, None)

    def _quota(self, context: grpc.aio.ServicerContext[Any, Any]) -> ClientQuota:
        """The quota of the connection this call came on (its peer address)."""
        return self._quotas.get(_peer(context), asyncio.get_running_loop().time())

    # --- publishing ---------------------------------------------------------------------------------------

    async def EmitEvent(  # type: ignore[override]  # replies with pre-serialized bytes
        self, request: nexus_pb2.EventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        principal = await self._principal(context)
        try:
            self._quota(context).publish(asyncio.get_running_loop().time())
            event = event_from_request(request, limits=self.limits)
            published = await self.node.publish(event, principal=principal, transport="grpc")
        except NexusError as error:
            await self._refuse(context, error)
        # A payload sent as JSON comes back as JSON.
        return encode_response(
            published.event,
            message=DUPLICATE if published.duplicate else STORED,
            json_payload=bool(request.payload_json),
        )

    async def PublishEvents(
        self,
        request_iterator: AsyncIterator[nexus_pb2.PublishEventsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> nexus_pb2.PublishEventsResponse:
        """Store a client stream of events in order.

        Events are read and checked one by one while those before them are being stored: whatever has arrived
        meanwhile (at most :data:`PUBLISH_CHUNK`) is stored as one ``publish_many``, so a bus whose stores wait
        for acknowledgements (NATS) keeps many in flight. The first refused event ends the call with its index;
        every event before it is stored.
        """
        principal = await self._principal(context)
        quota = self._quota(context)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | tuple[int, NexusError] | None] = asyncio.Queue(PUBLISH_CHUNK)

        async def read() -> None:
            index = 0
            try:
                async for item in request_iterator:
                    try:
                        quota.publish(loop.time())
                        event = event_from_request(item.event, limits=self.limits)
                    except NexusError as error:
                        await queue.put((index, error))
                        return
                    await queue.put(event)
                    index += 1
            finally:
                await queue.put(None)

        reader = asyncio.create_task(read())
        stored = duplicates = last_offset = 0
        try:
            while True:
                first = await queue.get()
                chunk: list[Event] = []
                refusal: tuple[int, NexusError] | None = None
                item = first
                while True:
                    if item is None or isinstance(item, tuple):
                        refusal = item
                        break
                    chunk.append(item)
                    if len(chunk) >= PUBLISH_CHUNK or queue.empty():
                        break
                    item = queue.get_nowait()
                results = await self._publish_chunk(chunk, principal, context, stored + duplicates, stored)
                for published in results:
                    if published.duplicate:
                        duplicates += 1
                    else:
                        stored += 1
                        last_offset = published.event.offset
                if refusal is not None:
                    index, error = refusal
                    error.message = f"event {index} (after {stored} stored): {error.message}"
                    await self._refuse(context, error)
                if item is None:
                    break
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        return nexus_pb2.PublishEventsResponse(
            stored=stored, duplicates=duplicates, last_offset=last_offset, epoch=self.node.epoch
        )

    async def _publish_chunk(
        self,
        chunk: list[Event],
        principal: Principal,
        context: grpc.aio.ServicerContext[Any, Any],
        index: int,
        stored: int,
    ) -> list[Published]:
        """Store ``chunk`` (its first event is the call's ``index``-th; ``stored`` were stored before it) in order;
        a refusal names the refused event's index (the chunk is then stored one by one, to find it)."""
        if not chunk:
            return []
        try:
            return await self.node.publish_many(chunk, principal=principal, transport="grpc")
        except NexusError:
            pass  # find which event is refused: those before it are stored (again: duplicates of themselves)
        results: list[Published] = []
        for event in chunk:
            try:
                results.append(await self.node.publish(event, principal=principal, transport="grpc"))
            except NexusError as error:
                stored += sum(1 for published in results if not published.duplicate)
                error.message = f"event {index + len(results)} (after {stored} stored): {error.message}"
                await self._refuse(context, error)
        return results

    # --- subscribing --------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _subscription(
        self,
        patterns: list[str],
        since_offset: int,
        epoch: str,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[Subscription]:
        """A subscription for one subscribe call, counted against its connection's quota; the initial metadata
        is sent once it is live. A slow subscriber's call ends with RESOURCE_EXHAUSTED naming its last offset."""
        principal = await self._principal(context)
        quota = self._quota(context)
        try:
            if not patterns:
                raise InvalidArgument("subscribe needs at least one pattern in event_types, such as '>'")
            self.node.check_pattern_count(len(patterns))  # before anything is held or parsed
            quota.open_subscription()
            try:
                quota.add_patterns(len(patterns))
            except NexusError:
                quota.close_subscription()
                raise
        except NexusError as error:
            await self._refuse(context, error)
        try:
            try:
                # The node validates every pattern before it registers anything.
                sub = await self.node.subscribe(
                    patterns,
                    since_offset=since_offset,
                    epoch=epoch or None,
                    max_pending=self.subscriber_queue,
                    principal=principal,
                )
            except NexusError as error:
                await self._refuse(context, error)
            try:
                answer = Answer(epoch=sub.epoch, head_offset=sub.head_offset, recovered=sub.recovered)
                await context.send_initial_metadata(answer.metadata())
                log.debug(
                    "subscriber_joined",
                    peer=_peer(context),
                    patterns=len(patterns),
                    since_offset=since_offset,
                    recovered=sub.recovered,
                )
                self.subscriptions += 1
                peer = self._call_opened(context)
                try:
                    yield sub
                finally:
                    self.subscriptions -= 1
                    self._call_closed(peer)
            except SlowConsumer as error:
                log.warning("subscriber_too_slow", peer=_peer(context), last_offset=error.last_offset)
                await abort(context, error)  # counted as a slow-consumer disconnect, not a refusal
            finally:
                sub.close()
        finally:
            quota.remove_patterns(len(patterns))
            quota.close_subscription()

    async def SubscribeEvents(  # type: ignore[override]  # streams with context.write()
        self, request: nexus_pb2.SubscribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        encode = (await self._encoder(request.payload_encoding, context)).encode
        async with self._subscription(list(request.event_types), request.since_offset, request.epoch, context) as sub:
            # A few at a time: the rest stays queued where publishers see how far this subscriber is behind.
            while batch := await sub.next_batch(SINGLE_TAKE):
                self.events_sent += len(batch)
                self.node.delivered(batch, "grpc")
                for event in batch:
                    data = encode(event)  # pre-serialized bytes; None for an event no client could read
                    if data is not None:
                        await context.write(data)

    async def SubscribeEventBatches(  # type: ignore[override]  # streams with context.write()
        self, request: nexus_pb2.SubscribeEventBatchesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        size = min(request.max_batch_size or DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE)
        encode_batch = (await self._encoder(request.payload_encoding, context)).encode_batch
        async with self._subscription(list(request.event_types), request.since_offset, request.epoch, context) as sub:
            while batch := await sub.next_batch(size):
                self.events_sent += len(batch)
                self.node.delivered(batch, "grpc")
                data = encode_batch(batch)  # pre-serialized bytes, without events no client could read
                if data:
                    await context.write(data)

    # --- requests -----------------------------------------------------------------------------------------

    async def RequestEvent(
        self, request: nexus_pb2.RequestEventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[nexus_pb2.RequestEventResponse]:
        principal = await self._principal(context)
        encoder = await self._encoder(request.payload_encoding, context)
        quota = self._quota(context)
        try:
            quota.publish(asyncio.get_running_loop().time())
            event = event_from_request(request.event, limits=self.limits)
            session = self.node.open_request(event, principal=principal, transport="grpc")
            quota.start_request()
        except NexusError as error:
            await self._refuse(context, error)
        peer = self._call_opened(context)
        try:
            try:
                published = await session.start(max_pending=self.subscriber_queue)
            except NexusError as error:
                await self._refuse(context, error)
            message = DUPLICATE if published.duplicate else STORED
            first = encode_response(published.event, message=message, json_payload=encoder.json_payload)
            yield request_event_response(first)  # type: ignore[misc]  # pre-serialized bytes
            while batch := await session.next_batch():
                self.node.delivered(batch, "grpc")
                for item in batch:
                    data = encoder.encode_request_event(item)
                    if data is not None:
                        yield data  # type: ignore[misc]  # pre-serialized bytes
        except SlowConsumer as error:
            await abort(context, error)  # a slow consumer, not a refused input
        finally:
            # The requester left before the end (cancelled call, failed send, too slow): its stream goes too.
            # close() never awaits, so it runs on every exit path, a generator closed by GeneratorExit included.
            session.close()
            quota.end_request()
            self._call_closed(peer)

    async def CancelStream(
        self, request: nexus_pb2.CancelStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nexus_pb2.CancelStreamResponse:
        principal = await self._principal(context)
        if not request.correlation_id:
            await self._refuse(context, InvalidArgument("correlation_id is required"))
        # The reason is stored in the cancelled event's payload: a client never writes more than a line of it.
        reason = request.reason[:MAX_CANCEL_REASON] or "cancelled by requester"
        found = await self.node.cancel(request.correlation_id, reason, principal=principal)
        return nexus_pb2.CancelStreamResponse(cancelled=found)

    # --- listings -----------------------------------------------------------------------------------------

    async def ListHandlers(
        self, request: nexus_pb2.ListHandlersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nexus_pb2.ListHandlersResponse:
        await self._principal(context)  # anyone authenticated may see what the server handles
        handlers = [
            nexus_pb2.HandlerInfo(
                name=str(info["name"]),
                event_type=str(info["event_type"]),
                streaming=bool(info["streaming"]),
                ordering_key=str(info["ordering_key"] or ""),
                stream_timeout_s=float(info["stream_timeout_s"] or 0.0),
                class_path=str(info["class_path"]),
                location=str(info.get("location", "")),
                workers=int(info.get("workers", 0)),
            )
            for info in await self.node.handlers()
        ]
        return nexus_pb2.ListHandlersResponse(handlers=handlers)

    async def ListStreams(
        self, request: nexus_pb2.ListStreamsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nexus_pb2.ListStreamsResponse:
        principal = await self._principal(context)
        streams = [
            nexus_pb2.StreamInfo(
                correlation_id=str(info["correlation_id"]),
                event_type=str(info["event_type"]),
                handler=str(info["handler"]),
                stream_count=int(info["stream_count"]),
                age_s=float(info["age_s"]),
                state=str(info["state"]),
                worker=str(info.get("worker", "")),
            )
            for info in await self.node.streams(principal=principal)
        ]
        return nexus_pb2.ListStreamsResponse(streams=streams)
