"""One WebSocket connection: read frames, act on them, write what the bus delivers.

The hot path never awaits per client: the bus queues a batch on the connection's subscription, the link's pump
hands it to :meth:`GatewayConnection.deliver`, which takes each event's shared frame from the
:class:`~nexus.gateway.protocol.EventFrameCache` and appends it to the :class:`~nexus.gateway.flow.Outbox`
(bounded in frames and bytes) without awaiting. A writer task per connection empties the outbox with
synchronous ``broadcast()`` writes while the transport's write buffer is under ``write_limit``, and waits for the
socket to drain when it is over. A client that does not keep up overflows its outbox and is closed with 4008;
it never slows the others, and its memory stays bounded (outbox + write buffer).

Frames a client sends are handled in order, one at a time; a token bucket paces a client that floods frames
and the reader yields to the event loop regularly, so one client cannot starve the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Final

import structlog
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed

from nexus.errors import NexusError
from nexus.events import DEFAULT_LIMITS, REQUESTED, Event, EventLimits, shorten
from nexus.identity import Principal
from nexus.logs import LogLimiter
from nexus.node import Node, Published
from nexus.quota import DEFAULT_CLIENT_LIMITS, ClientLimits, ClientQuota

from .flow import Outbox, RateLimiter
from .link import Link, SubscribeResult
from .protocol import (
    Cancel,
    CloseCode,
    EventFrameCache,
    GatewayCode,
    Ping,
    ProtocolError,
    Publish,
    Subscribe,
    Unsubscribe,
    close_reason,
    decode_frame,
    encode_connection,
    encode_error,
    encode_pong,
    encode_protocol_error,
    encode_published,
    encode_subscribed,
    encode_unsubscribed,
    error_spec,
)

YIELD_EVERY: Final = 32
"""Frames read (or 256 written) before a connection yields to the event loop."""
WRITE_YIELD_EVERY: Final = 256
FLUSH_BEFORE_CLOSE_S: Final = 1.0
"""How long a fatal error frame may take to be written before the connection is closed."""

log = structlog.get_logger("nexus.gateway")


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per-connection limits (from :class:`~nexus.gateway.server.GatewaySettings`)."""

    queue_frames: int
    queue_bytes: int
    write_limit: int
    max_payload_bytes: int
    subscriber_queue: int
    max_frames_per_s: float
    event_limits: EventLimits = DEFAULT_LIMITS
    client_limits: ClientLimits = DEFAULT_CLIENT_LIMITS


@dataclasses.dataclass(slots=True)
class GatewayStats:
    """Counters of one gateway."""

    connections: int = 0
    connections_total: int = 0
    frames_received: int = 0
    events_sent: int = 0
    errors_sent: int = 0
    too_slow: int = 0
    too_large: int = 0
    auth_refused: int = 0
    origin_refused: int = 0
    """Handshakes and HTTP requests refused with 403 for their Origin."""
    bad_frames: int = 0
    """Client frames refused as undecodable or malformed (answered with an error frame)."""
    events_skipped: int = 0
    """Events that could not be encoded for any connection (skipped; each counted once)."""
    sse_events_sent: int = 0
    """Of ``events_sent``, those written to ``/sse`` responses."""
    sse_too_slow: int = 0
    """Of ``too_slow``, ``/sse`` responses."""


class GatewayConnection:
    """The gateway side of one WebSocket."""

    def __init__(
        self,
        ws: ServerConnection,
        node: Node,
        *,
        principal: Principal,
        limits: ConnectionLimits,
        frames: EventFrameCache,
        stats: GatewayStats,
        warnings: LogLimiter | None = None,
    ) -> None:
        self.ws = ws
        self.node = node
        self.id = principal.connection_id
        self.principal = principal
        """Who the connection acts as (the authenticator's answer at the handshake)."""
        self.user_id = principal.user_id
        self.limits = limits
        self._frames = frames
        self._stats = stats
        self._warnings = warnings or LogLimiter()
        self.outbox = Outbox(limits.queue_frames, limits.queue_bytes)
        self.link = Link(
            node,
            self.deliver,
            self._free_room,
            self._wait_room,
            self._on_link_end,
            max_pending=limits.subscriber_queue,
            principal=principal,
        )
        # Events fill at most half the outbox; the other half keeps room for control frames (pong, published,
        # errors). The pump waits for the writer below a quarter before it hands over more.
        self._soft_frames = max(1, limits.queue_frames // 2)
        self._soft_bytes = max(1, limits.queue_bytes // 2)
        self._room = asyncio.Event()
        self._room.set()
        loop = asyncio.get_running_loop()
        self._limiter = RateLimiter(limits.max_frames_per_s, max(limits.max_frames_per_s, 1.0), now=loop.time())
        self.quota = ClientQuota(limits.client_limits, now=loop.time())
        """What this connection may hold and do (patterns, running requests, publish rate)."""
        self._wakeup = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._writer: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self.closing: tuple[int, str] | None = None
        self.last_offset = 0
        """The offset of the last event written to the socket (what the client resumes from)."""
        self.log = log.bind(connection_id=self.id)

    # --- lifecycle --------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; cancels the streams it started and leaves no task behind."""
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="nexus-gateway-writer")
        self.enqueue(encode_connection(self.id, self.node.epoch))
        try:
            await self._read_loop()
        finally:
            await self._shutdown()
            self._finished.set()

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        count = 0
        try:
            async for message in self.ws:
                if self.closing is not None:
                    return
                delay = self._limiter.acquire(loop.time())
                if delay > 0:
                    await asyncio.sleep(delay)
                self._stats.frames_received += 1
                await self._handle(message)
                count += 1
                if count % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
        except ConnectionClosed as closed:
            if closed.sent is not None and closed.sent.code == CloseCode.MESSAGE_TOO_BIG:
                self._stats.too_large += 1
                self.log.info("gateway_frame_too_large", reason=closed.sent.reason)

    async def _shutdown(self) -> None:
        if self.closing is None:
            self.closing = (CloseCode.NORMAL, "")
        await self.link.close()
        writer = self._writer
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        if self._close_task is not None:
            with contextlib.suppress(Exception):
                await self._close_task

    def close(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Start closing with ``code``; with ``flush``, what is queued (an error frame) is written first."""
        if self._close_task is not None:
            return
        reason = close_reason(reason)
        if self.closing is None:
            self.closing = (code, reason)
        if not flush:
            self.outbox.clear()
        self._close_task = asyncio.get_running_loop().create_task(self._close(code, reason, flush))

    async def _close(self, code: int, reason: str, flush: bool) -> None:
        # Leave the bus at once (a peer that does not answer the close may hold the socket for close_timeout).
        await self.link.close()
        if flush:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_BEFORE_CLOSE_S):
                    await self._flushed.wait()
        if self._writer is not None:
            self._writer.cancel()
        await self.ws.close(code, reason)

    async def finish(self, code: int, reason: str, grace: float) -> None:
        """Close gracefully: write what the bus still delivers (bounded by ``grace``), then close with ``code``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                if not self.node.healthy:
                    await self.link.wait_delivered()
                await self._flushed.wait()
        self.close(code, reason)
        await self._finished.wait()

    async def wait_finished(self) -> None:
        """Wait until :meth:`run` has returned."""
        await self._finished.wait()

    # --- outgoing ---------------------------------------------------------------------------------------------

    def enqueue(self, frame: bytes, offset: int = 0) -> None:
        """Queue a frame for the writer; never awaits. An overflow closes the connection with 4008."""
        if self.closing is not None:
            return
        if not self.outbox.put(frame, offset):
            self._too_slow()
            return
        self._flushed.clear()
        self._wakeup.set()

    def deliver(self, events: Sequence[Event]) -> int:
        """The link's sink: queue each event's shared frame, as many as the outbox has room for (at least one
        when it is empty). Synchronous; returns how many were taken."""
        if self.closing is not None:
            return len(events)
        encode = self._frames.encode
        outbox = self.outbox
        taken = 0
        for event in events:
            if outbox and (len(outbox) >= self._soft_frames or outbox.bytes >= self._soft_bytes):
                self._room.clear()
                break
            frame = encode(event)
            if frame is None:  # an event no client could read: skipped, the connection keeps its place
                taken += 1
                continue
            if not outbox.put(frame, event.offset):
                self._too_slow()  # one event larger than the whole outbox
                return len(events)
            taken += 1
        self._stats.events_sent += taken
        if taken:
            self.node.delivered(events[:taken], "websocket")
            self._flushed.clear()
            self._wakeup.set()
        return taken

    def _free_room(self) -> int:
        """Frames the events' half of the outbox can take now (0 when it is full)."""
        if self.outbox.bytes >= self._soft_bytes:
            return 0
        return max(0, self._soft_frames - len(self.outbox))

    async def _wait_room(self) -> None:
        """Wait until the writer has made room again."""
        if self._free_room() == 0:
            self._room.clear()
        await self._room.wait()

    def _too_slow(self) -> None:
        self._stats.too_slow += 1
        reason = f"too slow: resume from offset {self.last_offset}"
        self.log.warning(
            "gateway_client_too_slow",
            last_offset=self.last_offset,
            queue_frames=self.outbox.max_frames,
            queue_bytes=self.outbox.max_bytes,
        )
        self.close(CloseCode.TOO_SLOW, reason)

    def _on_link_end(self, code: str | None) -> None:
        if code == GatewayCode.TOO_SLOW:
            self._too_slow()
        elif code is not None:
            spec = error_spec(code)
            self.enqueue(encode_error(code, spec.description))
            self.close(spec.close_code or CloseCode.INTERNAL_ERROR, spec.description, flush=True)

    async def _write_loop(self) -> None:
        ws = self.ws
        transport = ws.transport
        limit = self.limits.write_limit
        outbox = self.outbox
        written = 0
        try:
            low_frames, low_bytes = self._soft_frames // 2, self._soft_bytes // 2
            while True:
                if not outbox:
                    self._flushed.set()
                    self._room.set()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                frame, offset = outbox.pop()
                if not self._room.is_set() and len(outbox) <= low_frames and outbox.bytes <= low_bytes:
                    self._room.set()
                if transport.get_write_buffer_size() < limit:
                    broadcast((ws,), frame, text=True)  # synchronous: no await on the hot path
                    if offset:
                        self.last_offset = offset
                else:
                    # Over the limit: write, then wait for the socket to drain (the frame is written before the
                    # wait, so it counts as sent even if the connection is closed while waiting).
                    if offset:
                        self.last_offset = offset
                    await ws.send(frame, text=True)
                written += 1
                if written % WRITE_YIELD_EVERY == 0:
                    await asyncio.sleep(0)
        except ConnectionClosed:
            return

    # --- incoming ---------------------------------------------------------------------------------------------

    def _error(self, error: ProtocolError) -> None:
        self._stats.errors_sent += 1
        self.node.telemetry.refused(error.code, "websocket")
        self.enqueue(encode_protocol_error(error))
        close_code = error.spec.close_code
        if close_code is not None:
            self.close(close_code, error.message, flush=True)

    async def _handle(self, message: str | bytes) -> None:
        try:
            command = decode_frame(
                message,
                max_payload_bytes=self.limits.max_payload_bytes,
                limits=self.limits.event_limits,
                max_patterns=self.node.max_patterns_per_subscription,
            )
        except ProtocolError as error:
            self._stats.bad_frames += 1
            self._warnings.warning(
                self.log,
                "gateway_bad_frame",
                kind=f"gateway_bad_frame:{error.code}",
                code=error.code,
                message=shorten(error.message),
            )
            self._error(error)
            return
        try:
            if isinstance(command, Publish):
                await self._publish(command)
            elif isinstance(command, Subscribe):
                self.quota.check_patterns(len(set(self.link.patterns) | set(command.patterns)))
                await self.link.subscribe(
                    command.patterns,
                    since_offset=command.since_offset,
                    epoch=command.epoch,
                    announce=lambda result: self._subscribed(result, command.ref),
                )
            elif isinstance(command, Unsubscribe):
                await self.link.unsubscribe(command.patterns)
                self.enqueue(encode_unsubscribed(command.patterns, ref=command.ref))
            elif isinstance(command, Cancel):
                await self.link.cancel(command.correlation_id, command.reason)
            elif isinstance(command, Ping):
                self.enqueue(encode_pong(command.ref))
        except NexusError as error:
            self._error(ProtocolError.from_error(error, command.ref))
        except Exception as exc:
            self.log.exception("gateway_frame_failed", error=repr(exc))
            self._error(ProtocolError("internal", f"the server failed to handle the frame: {exc!r}", command.ref))

    def _subscribed(self, result: SubscribeResult, ref: str | None) -> None:
        self.enqueue(
            encode_subscribed(
                result.patterns,
                epoch=result.epoch,
                head_offset=result.head_offset,
                recovered=result.recovered,
                ref=ref,
            )
        )

    def _published(self, published: Published) -> None:
        self.enqueue(encode_published(published.event, duplicate=published.duplicate))

    async def _publish(self, command: Publish) -> None:
        event = command.event  # the node stamps who sent it (metadata.owner, user_id, auth)
        self.quota.publish(asyncio.get_running_loop().time())
        if event.state == REQUESTED:
            self.quota.check_requests(self.link.running_requests)
            await self.link.request(event, announce=self._published)
        else:
            self._published(await self.link.publish(event))


__all__ = ["ConnectionLimits", "GatewayCode", "GatewayConnection", "GatewayStats"]
