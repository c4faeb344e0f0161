"""``nexus.v1.WorkerService``: the gRPC adapter of workers (handlers in other processes, any language).

A thin adapter over :mod:`nexus.workers`: the first message of a ``HandleEvents`` call (``register``) becomes the
worker's :class:`~nexus.workers.Declaration` list, admitted by the node (the token's ``serve`` claim, the
provider's rules); then each frame from the worker becomes one message for :meth:`Worker.receive`, and
:meth:`Worker.outgoing` is written back. The call ends when the worker closes its side, is lost (silent past the
worker timeout), or the server stops; the provider then fails what the worker had started (``worker_lost``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import grpc
import structlog

from nexus.errors import InvalidArgument, InvalidPayload, NexusError
from nexus.events import EventLimits
from nexus.grpc.convert import encode_response, length_delimited, payload_from_json
from nexus.grpc.servicer import NexusServicer, _Registrar
from nexus.node import Node
from nexus.v1 import nexus_pb2, nexus_pb2_grpc
from nexus.workers import (
    MAX_NAME_LENGTH,
    Assign,
    CancelAck,
    Chunks,
    Credit,
    Declaration,
    Drain,
    Failure,
    FromWorker,
    Ping,
    Pong,
    Refusal,
    Result,
    Started,
    ToWorker,
    Worker,
    failure_type,
)

REGISTER_TIMEOUT_S: Final = 10.0
"""How long a new call may take to send its ``register``."""
MAX_ERROR_MESSAGE: Final = 4_096
"""Characters of a worker's error message kept in the ``failed`` event."""
MAX_CHUNKS_PER_MESSAGE: Final = 10_000

log = structlog.get_logger("nexus.grpc.workers")


def declarations_from_register(register: nexus_pb2.WorkerRegister) -> list[Declaration]:
    """The handlers a ``register`` message declares (fields checked for range; the rules are the provider's)."""
    declarations = []
    for index, handler in enumerate(register.handlers):
        timeout: float | str | None
        if handler.stream_timeout_s == 0:
            timeout = "default"
        elif handler.stream_timeout_s < 0:
            timeout = None
        elif handler.stream_timeout_s != handler.stream_timeout_s or handler.stream_timeout_s == float("inf"):
            raise InvalidArgument(f"handler {index}: stream_timeout_s must be a finite number of seconds")
        else:
            timeout = handler.stream_timeout_s
        declarations.append(
            Declaration(
                event_type=handler.event_type,
                streaming=handler.streaming,
                ordering_key=handler.ordering_key or None,
                stream_timeout=timeout,
                buffer_size=handler.buffer_size or None,
                max_in_flight=handler.max_in_flight or 1,
                name=handler.name[:MAX_NAME_LENGTH],
            )
        )
    return declarations


def message_from_worker(request: nexus_pb2.HandleEventsRequest, limits: EventLimits) -> FromWorker | Refusal:
    """The :mod:`nexus.workers` message a frame carries, or the refusal of a frame that cannot be read."""
    kind = request.WhichOneof("body")
    if kind == "started":
        return Started(request.started.correlation_id)
    if kind == "chunk":
        chunk = request.chunk
        if len(chunk.payloads_json) > MAX_CHUNKS_PER_MESSAGE:
            return Refusal(chunk.correlation_id, "protocol", f"more than {MAX_CHUNKS_PER_MESSAGE} chunks in a message")
        try:
            payloads = tuple(payload_from_json(data, limits) for data in chunk.payloads_json)
        except InvalidPayload as exc:
            return Refusal(chunk.correlation_id, "invalid_payload", exc.message)
        return Chunks(chunk.correlation_id, payloads)
    if kind == "result":
        result = request.result
        try:
            payload = payload_from_json(result.payload_json, limits) if result.payload_json else {}
        except InvalidPayload as exc:
            return Refusal(result.correlation_id, "invalid_payload", exc.message)
        return Result(result.correlation_id, payload)
    if kind == "error":
        error = request.error
        try:
            error_type = failure_type(error.type)
        except InvalidArgument as exc:
            return Refusal(error.correlation_id, "protocol", exc.message)
        message = error.message[:MAX_ERROR_MESSAGE] or "the worker's handler failed"
        return Failure(error.correlation_id, error_type, message)
    if kind == "cancelled":
        return CancelAck(request.cancelled.correlation_id)
    if kind == "pong":
        return Pong(request.pong.nonce)
    if kind == "drain":
        return Drain()
    if kind == "register":
        return Refusal("", "protocol", "register is the first message only")
    return Refusal("", "protocol", "an empty message (no body set)")


def frame_to_worker(message: ToWorker) -> bytes:
    """One server frame, serialized (a request carries its event as pre-assembled bytes, payload as JSON)."""
    if isinstance(message, Assign):
        event = encode_response(message.request, json_payload=True)
        request = nexus_pb2.WorkerRequest(credit=message.credit, timeout_s=message.timeout_s or 0.0)
        # WorkerRequest.event = 1 (length-delimited), then the other fields as protobuf serializes them.
        body = length_delimited(1, event) + request.SerializeToString()
        return length_delimited(2, body)
    response = nexus_pb2.HandleEventsResponse()
    if isinstance(message, Refusal):
        response.refused.correlation_id = message.correlation_id
        response.refused.code = message.code
        response.refused.message = message.message
    elif isinstance(message, Ping):
        response.ping.nonce = message.nonce
    elif isinstance(message, Credit):
        response.credit.correlation_id = message.correlation_id
        response.credit.chunks = message.chunks
    else:
        response.cancel.correlation_id = message.correlation_id
        response.cancel.reason = message.reason
    return response.SerializeToString()


class WorkerServicer(nexus_pb2_grpc.WorkerServiceServicer):
    """Implements ``nexus.v1.WorkerService`` over a :class:`~nexus.node.Node`, with the Nexus servicer's
    authentication, limits and error table."""

    def __init__(self, node: Node, nexus: NexusServicer, *, ping_interval_s: float, worker_timeout_s: float) -> None:
        self.node = node
        self.nexus = nexus
        self.ping_interval_s = ping_interval_s
        self.worker_timeout_s = worker_timeout_s
        self.connected = 0

    async def HandleEvents(  # type: ignore[override]  # writes pre-serialized bytes
        self,
        request_iterator: AsyncIterator[nexus_pb2.HandleEventsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        principal = await self.nexus._principal(context)
        requests = aiter(request_iterator)
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT_S):
                first = await anext(requests)
        except (TimeoutError, StopAsyncIteration):
            await self.nexus._refuse(context, InvalidArgument("a worker's first message must be register"))
        if first.WhichOneof("body") != "register":
            await self.nexus._refuse(context, InvalidArgument("a worker's first message must be register"))
        try:
            declarations = declarations_from_register(first.register)
            worker = self.node.connect_worker(first.register.worker_name, declarations, principal=principal)
        except NexusError as error:
            await self.nexus._refuse(context, error)
        self.connected += 1
        reason = "the worker closed its stream"
        tasks: list[asyncio.Task[Any]] = []
        try:
            registered = nexus_pb2.HandleEventsResponse(
                registered=nexus_pb2.WorkerRegistered(
                    worker_id=worker.worker_id,
                    ping_interval_s=self.ping_interval_s,
                    worker_timeout_s=self.worker_timeout_s,
                )
            )
            await context.write(registered)
            reader = asyncio.create_task(self._read(worker, requests), name=f"nexus-worker-read-{worker.worker_id}")
            writer = asyncio.create_task(self._write(worker, context), name=f"nexus-worker-write-{worker.worker_id}")
            lost = asyncio.create_task(worker.closed.wait(), name=f"nexus-worker-lost-{worker.worker_id}")
            tasks = [reader, writer, lost]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if lost.done():
                reason = worker.lost or "lost"
            elif reader.done() and reader.exception() is not None:
                reason = f"its stream failed ({type(reader.exception()).__name__})"
            elif writer.done() and writer.exception() is not None:
                reason = f"could not write to it ({type(writer.exception()).__name__})"
        except asyncio.CancelledError:
            reason = "the connection ended"
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.connected -= 1
            silent = worker.lost is not None
            self.node.disconnect_worker(worker, reason)
        if silent:
            # It stopped answering: end its call so that, if it still runs, it connects again.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"this worker was dropped: it {reason}")

    async def _read(self, worker: Worker, requests: AsyncIterator[nexus_pb2.HandleEventsRequest]) -> None:
        limits = self.nexus.limits
        async for request in requests:
            message = message_from_worker(request, limits)
            worker.last_heard = time.monotonic()
            refusal = message if isinstance(message, Refusal) else worker.receive(message)
            if refusal is not None:
                self.nexus.bad_input.warning(
                    log,
                    "worker_message_refused",
                    worker=worker.name,
                    correlation_id=refusal.correlation_id,
                    code=refusal.code,
                    reason=refusal.message,
                )
                worker.send(refusal)

    async def _write(self, worker: Worker, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        while True:
            messages = await worker.outgoing()
            if not messages:
                return
            for message in messages:
                await context.write(frame_to_worker(message))


def add_worker_service(servicer: WorkerServicer, server: grpc.aio.Server) -> None:
    """Register the worker service (bytes-aware serializers, undecodable frames refused as the Nexus service's)."""
    nexus_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, _Registrar(server, servicer.nexus))
