"""A worker speaking ``nexus.v1.WorkerService`` frame by frame, for tests of the protocol itself.

It sends exactly what a test tells it to (so a test can misbehave on purpose) and records every frame the
server sends; nothing is automatic but answering pings, which a test can switch off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import grpc

from nexus.v1 import nexus_pb2, nexus_pb2_grpc


def handler(
    event_type: str,
    *,
    streaming: bool,
    ordering_key: str = "",
    stream_timeout_s: float = 0.0,
    buffer_size: int = 0,
    max_in_flight: int = 1,
    name: str = "",
) -> nexus_pb2.WorkerHandler:
    return nexus_pb2.WorkerHandler(
        event_type=event_type,
        streaming=streaming,
        ordering_key=ordering_key,
        stream_timeout_s=stream_timeout_s,
        buffer_size=buffer_size,
        max_in_flight=max_in_flight,
        name=name,
    )


class RawWorker:
    """One ``HandleEvents`` call: :meth:`send` frames, :meth:`next` / :meth:`expect` what the server sent."""

    def __init__(self, address: str, *handlers: nexus_pb2.WorkerHandler, name: str = "raw", token: str = "") -> None:
        self.address = address
        self.handlers = handlers
        self.name = name
        self.token = token
        self.answer_pings = True
        self.received: asyncio.Queue[nexus_pb2.HandleEventsResponse] = asyncio.Queue()
        self._outgoing: asyncio.Queue[nexus_pb2.HandleEventsRequest | None] = asyncio.Queue()
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.status: grpc.StatusCode | None = None
        self.details = ""
        self.registered: nexus_pb2.WorkerRegistered | None = None
        self.credit: dict[str, int] = {}
        """Credit frames :meth:`expect` passed over, by correlation id."""

    async def __aenter__(self) -> RawWorker:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> nexus_pb2.WorkerRegistered | None:
        """Register; returns ``registered``, or None when the server ended the call (see :attr:`status`)."""
        self._channel = grpc.aio.insecure_channel(self.address)
        stub = nexus_pb2_grpc.WorkerServiceStub(self._channel)
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else None
        self._call = stub.HandleEvents(self._requests(), metadata=metadata)
        self.send(register=nexus_pb2.WorkerRegister(worker_name=self.name, handlers=list(self.handlers)))
        self._reader = asyncio.create_task(self._read())
        first = await self.next(timeout=10.0)
        if first is None:
            return None
        assert first.WhichOneof("body") == "registered", first
        self.registered = first.registered
        return first.registered

    async def _requests(self) -> Any:
        while True:
            item = await self._outgoing.get()
            if item is None:
                return
            yield item

    async def _read(self) -> None:
        try:
            async for frame in self._call:
                if frame.WhichOneof("body") == "ping":
                    if self.answer_pings:
                        self.send(pong=nexus_pb2.WorkerPong(nonce=frame.ping.nonce))
                    continue
                await self.received.put(frame)
        except grpc.aio.AioRpcError as exc:
            self.status, self.details = exc.code(), exc.details() or ""
        else:
            self.status = grpc.StatusCode.OK
        finally:
            await self.received.put(nexus_pb2.HandleEventsResponse())  # the end

    def send(self, **body: Any) -> None:
        self._outgoing.put_nowait(nexus_pb2.HandleEventsRequest(**body))

    async def next(self, timeout: float = 10.0) -> nexus_pb2.HandleEventsResponse | None:
        """The next frame (pings aside); None once the call ended."""
        frame = await asyncio.wait_for(self.received.get(), timeout)
        if frame.WhichOneof("body") is None:
            await self.received.put(frame)
            return None
        return frame

    async def expect(self, kind: str, timeout: float = 10.0) -> Any:
        """The next frame, which must be ``kind``; returns its body. Credit frames in between are counted in
        :attr:`credit` unless ``kind`` is ``credit``."""
        frame = await self.next(timeout)
        while frame is not None and kind != "credit" and frame.WhichOneof("body") == "credit":
            self.credit[frame.credit.correlation_id] = (
                self.credit.get(frame.credit.correlation_id, 0) + frame.credit.chunks
            )
            frame = await self.next(timeout)
        assert frame is not None, f"the call ended ({self.status}: {self.details}) while {kind} was expected"
        assert frame.WhichOneof("body") == kind, f"expected {kind}, got {frame}"
        return getattr(frame, kind)

    async def request(self, timeout: float = 10.0) -> nexus_pb2.WorkerRequest:
        return await self.expect("request", timeout)  # type: ignore[no-any-return]

    def started(self, correlation_id: str) -> None:
        self.send(started=nexus_pb2.WorkerStarted(correlation_id=correlation_id))

    def chunks(self, correlation_id: str, *payloads: dict[str, Any]) -> None:
        data = [json.dumps(p).encode() for p in payloads]
        self.send(chunk=nexus_pb2.WorkerChunk(correlation_id=correlation_id, payloads_json=data))

    def result(self, correlation_id: str, payload: dict[str, Any] | None = None) -> None:
        data = json.dumps(payload).encode() if payload is not None else b""
        self.send(result=nexus_pb2.WorkerResult(correlation_id=correlation_id, payload_json=data))

    def error(self, correlation_id: str, message: str, type: str = "") -> None:
        self.send(error=nexus_pb2.WorkerError(correlation_id=correlation_id, type=type, message=message))

    def cancelled(self, correlation_id: str) -> None:
        self.send(cancelled=nexus_pb2.WorkerCancelled(correlation_id=correlation_id))

    async def ended(self, timeout: float = 10.0) -> grpc.StatusCode | None:
        """Wait for the call to end; returns its status."""
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.status

    async def close(self) -> None:
        """Half-close the stream (a clean goodbye) and drop the channel."""
        self._outgoing.put_nowait(None)
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
            self._reader.cancel()
        if self._channel is not None:
            await self._channel.close()

    async def drop(self) -> None:
        """Vanish without a goodbye (as a killed process): the connection closes under the call."""
        if self._channel is not None:
            await self._channel.close(grace=None)
        if self._reader is not None:
            self._reader.cancel()


def payload(request: nexus_pb2.WorkerRequest) -> dict[str, Any]:
    return json.loads(request.event.payload_json) if request.event.payload_json else {}
