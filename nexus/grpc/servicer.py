"""The gRPC servicer: a thin adapter that feeds requests to the bus and provider and writes what they return.

Subscriber streams write pre-serialized bytes (each event serialized once for all subscribers); register the
servicer with :func:`add_to_server`, which lets bytes through the response serializers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import structlog

from nexus.bus.base import Bus, Subscription
from nexus.errors import InvalidArgument, NexusError, SlowConsumer
from nexus.events import REQUESTED, TERMINAL_STATES, Event
from nexus.grpc.convert import (
    STATUS_FOR_CODE,
    EncodeCache,
    event_from_request,
    event_to_response,
    passthrough_serializer,
)
from nexus.provider import Provider
from nexus.v1 import nexus_pb2, nexus_pb2_grpc

DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 10_000

log = structlog.get_logger("nexus.grpc")


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: NexusError) -> NoReturn:
    """End the call with the status code the error table gives ``error``."""
    await context.abort(STATUS_FOR_CODE[error.code], error.message)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


def _peer(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    try:
        return str(context.peer())
    except Exception:  # pragma: no cover - peer() is best effort
        return ""


class _Registrar:
    """Stands in for the server in the generated ``add_..._to_server`` to patch the response serializers."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: :meth:`add_registered_method_handlers` registers the patched handlers both ways."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        patched = {
            name: handler._replace(response_serializer=passthrough_serializer(handler.response_serializer))
            for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, patched),))
        self._server.add_registered_method_handlers(service, patched)


def add_to_server(servicer: NexusServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` on ``server`` (the generated registration, with bytes-aware serializers)."""
    nexus_pb2_grpc.add_NexusServiceServicer_to_server(servicer, _Registrar(server))


class NexusServicer(nexus_pb2_grpc.NexusServiceServicer):
    """Implements ``nexus.v1.NexusService`` over a :class:`Bus` and a :class:`Provider`."""

    def __init__(
        self,
        bus: Bus,
        provider: Provider,
        *,
        subscriber_queue: int = 10_000,
        max_payload_bytes: int = 1024 * 1024,
    ) -> None:
        self.bus = bus
        self.provider = provider
        self.subscriber_queue = subscriber_queue
        self.max_payload_bytes = max_payload_bytes
        self._encode = EncodeCache()
        self._background: set[asyncio.Task[bool]] = set()

    # --- publishing ---------------------------------------------------------------------------------------

    async def EmitEvent(
        self, request: nexus_pb2.EventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nexus_pb2.EventResponse:
        try:
            event = event_from_request(request, max_payload_bytes=self.max_payload_bytes)
            published = await self.bus.publish(event)
        except NexusError as error:
            await abort(context, error)
        return event_to_response(published.event, message="duplicate" if published.duplicate else "stored")

    async def PublishEvents(
        self,
        request_iterator: AsyncIterator[nexus_pb2.PublishEventsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> nexus_pb2.PublishEventsResponse:
        stored = duplicates = last_offset = 0
        index = 0
        async for item in request_iterator:
            try:
                event = event_from_request(item.event, max_payload_bytes=self.max_payload_bytes)
                published = await self.bus.publish(event)
            except NexusError as error:
                error.message = f"event {index} (after {stored} stored): {error.message}"
                await abort(context, error)
            index += 1
            if published.duplicate:
                duplicates += 1
            else:
                stored += 1
                last_offset = published.event.offset
        return nexus_pb2.PublishEventsResponse(
            stored=stored, duplicates=duplicates, last_offset=last_offset, epoch=self.bus.epoch
        )

    # --- subscribing --------------------------------------------------------------------------------------

    async def _open(
        self,
        patterns: list[str],
        since_offset: int,
        epoch: str,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> Subscription:
        try:
            if not patterns:
                raise InvalidArgument("subscribe needs at least one pattern in event_types, such as '>'")
            # The bus validates every pattern before it registers anything.
            sub = await self.bus.subscribe(
                patterns, since_offset=since_offset, epoch=epoch or None, max_pending=self.subscriber_queue
            )
        except NexusError as error:
            await abort(context, error)
        metadata = [("nexus-epoch", sub.epoch), ("nexus-head-offset", str(sub.head_offset))]
        if sub.recovered is not None:
            metadata.append(("nexus-recovered", "true" if sub.recovered else "false"))
        await context.send_initial_metadata(tuple(metadata))
        log.debug(
            "subscriber_joined",
            peer=_peer(context),
            patterns=patterns,
            since_offset=since_offset,
            recovered=sub.recovered,
        )
        return sub

    async def SubscribeEvents(  # type: ignore[override]  # streams with context.write()
        self, request: nexus_pb2.SubscribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        sub = await self._open(list(request.event_types), request.since_offset, request.epoch, context)
        encode = self._encode.encode
        try:
            while True:
                batch = await sub.next_batch()
                if not batch:
                    return
                for event in batch:
                    await context.write(encode(event))  # pre-serialized bytes
        except SlowConsumer as error:
            log.warning("subscriber_too_slow", peer=_peer(context), last_offset=error.last_offset)
            await abort(context, error)
        finally:
            sub.close()

    async def SubscribeEventBatches(  # type: ignore[override]  # streams with context.write()
        self, request: nexus_pb2.SubscribeEventBatchesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        sub = await self._open(list(request.event_types), request.since_offset, request.epoch, context)
        size = min(request.max_batch_size or DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE)
        encode_batch = self._encode.encode_batch
        try:
            while True:
                batch = await sub.next_batch(size)
                if not batch:
                    return
                await context.write(encode_batch(batch))  # pre-serialized bytes
        except SlowConsumer as error:
            log.warning("subscriber_too_slow", peer=_peer(context), last_offset=error.last_offset)
            await abort(context, error)
        finally:
            sub.close()

    # --- requests -----------------------------------------------------------------------------------------

    async def RequestEvent(
        self, request: nexus_pb2.RequestEventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[nexus_pb2.RequestEventResponse]:
        try:
            event = event_from_request(request.event, max_payload_bytes=self.max_payload_bytes)
            if event.state != REQUESTED:
                raise InvalidArgument(f"RequestEvent needs a '...:requested' event type, not {event.event_type!r}")
            published = await self.bus.publish(event)
            stored: Event = published.event
            if published.duplicate and stored.event_type != event.event_type:
                raise InvalidArgument(
                    f"event_id {stored.event_id!r} already names a {stored.event_type} event; "
                    "use a fresh event_id for a new request"
                )
            # Replay from the request's own offset: nothing of its lifecycle can slip between publish and
            # subscribe, and a repeated request sees the lifecycle of the original.
            sub = await self.bus.subscribe(
                correlation_ids=[stored.event_id],
                since_offset=stored.offset,
                epoch=stored.epoch or None,
                max_pending=self.subscriber_queue,
            )
            if published.duplicate and sub.recovered is False:
                sub.close()
                raise InvalidArgument(
                    f"event_id {stored.event_id!r} repeats a request whose lifecycle is no longer in the "
                    "history; use a fresh event_id for a new request"
                )
        except NexusError as error:
            await abort(context, error)
        message = "duplicate" if published.duplicate else "stored"
        finished = False
        try:
            yield nexus_pb2.RequestEventResponse(event=event_to_response(stored, message=message))
            while not finished:
                batch = await sub.next_batch()
                if not batch:
                    return
                for item in batch:
                    yield nexus_pb2.RequestEventResponse(event=event_to_response(item))
                    if item.state in TERMINAL_STATES:
                        finished = True
                        break
        except SlowConsumer as error:
            await abort(context, error)
        finally:
            sub.close()
            if not finished and not published.duplicate:
                # The requester left before the end (cancelled call, failed send, too slow): its stream goes
                # too. This runs on every exit path, including a generator closed by GeneratorExit.
                self._cancel_soon(stored.event_id, "requester disconnected")

    def _cancel_soon(self, correlation_id: str, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self.provider.cancel(correlation_id, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def CancelStream(
        self, request: nexus_pb2.CancelStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nexus_pb2.CancelStreamResponse:
        if not request.correlation_id:
            await abort(context, InvalidArgument("correlation_id is required"))
        found = await self.provider.cancel(request.correlation_id, request.reason or "cancelled by requester")
        return nexus_pb2.CancelStreamResponse(cancelled=found)

    # --- listings -----------------------------------------------------------------------------------------

    async def ListHandlers(
        self, request: nexus_pb2.ListHandlersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nexus_pb2.ListHandlersResponse:
        handlers = [
            nexus_pb2.HandlerInfo(
                name=r.name,
                event_type=r.service_action,
                streaming=r.streaming,
                ordering_key=r.ordering_key or "",
                stream_timeout_s=r.stream_timeout or 0.0,
                class_path=r.class_path,
            )
            for r in sorted(self.provider.registrations.values(), key=lambda r: r.service_action)
        ]
        return nexus_pb2.ListHandlersResponse(handlers=handlers)

    async def ListStreams(
        self, request: nexus_pb2.ListStreamsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nexus_pb2.ListStreamsResponse:
        streams = [
            nexus_pb2.StreamInfo(
                correlation_id=str(info["correlation_id"]),
                event_type=str(info["event_type"]),
                handler=str(info["handler"]),
                stream_count=int(info["stream_count"]),
                age_s=float(info["age_s"]),
                state=str(info["state"]),
            )
            for info in self.provider.streams()
        ]
        return nexus_pb2.ListStreamsResponse(streams=streams)
