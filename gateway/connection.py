"""One WebSocket connection: read frames, act on them, write what the bus delivers.

The hot path never awaits per client: the bus queues a batch on the connection's subscription, the link's pump
hands it to :meth:`GatewayConnection.deliver`, which takes each event's shared WebSocket frame (complete, header
included) from the :class:`~nexus.gateway.protocol.EventFrameCache` and writes the whole batch to the socket in
ONE write while the transport's write buffer is under ``write_limit``: one system call per batch, not per
frame. What does not fit waits in the :class:`~nexus.gateway.flow.Outbox` (bounded in frames and bytes); only
then does a drain task exist, which waits for the socket to drain and writes what waits in one write each time.
A client that does not keep up overflows its outbox and is closed with 4008; it never slows the others, and its
memory stays bounded (outbox + write buffer). An idle connection holds no task of its own, no queue and no
rate state: each is made when first needed.

Frames a client sends are handled in order, one at a time; a token bucket paces a client that floods frames
and the reader yields to the event loop regularly, so one client cannot starve the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Final

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

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
    frame_data,
    text_frame,
)

YIELD_EVERY: Final = 32
"""Frames read before a connection yields to the event loop."""
FLUSH_BEFORE_CLOSE_S: Final = 1.0
STALL_S: Final = 0.01
"""How long the drain task pauses when the socket took nothing although it said it had drained."""
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
    soft_frames: int = dataclasses.field(init=False, default=1)
    """Frames of events the outbox takes (half of it; the other half keeps room for control frames)."""
    soft_bytes: int = dataclasses.field(init=False, default=1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "soft_frames", max(1, self.queue_frames // 2))
        object.__setattr__(self, "soft_bytes", max(1, self.queue_bytes // 2))


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

    __slots__ = (
        "_close_task",
        "_drainer",
        "_ended",
        "_finished",
        "_frames",
        "_limiter",
        "_log",
        "_quota",
        "_room",
        "_stats",
        "_warnings",
        "closing",
        "last_offset",
        "limits",
        "link",
        "node",
        "outbox",
        "principal",
        "ws",
    )

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
        self.principal = principal
        """Who the connection acts as (the authenticator's answer at the handshake)."""
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
        # Made when first needed: an idle connection holds none of them.
        self._limiter: RateLimiter | None = None
        self._quota: ClientQuota | None = None
        self._log: structlog.stdlib.BoundLogger | None = None
        self._drainer: asyncio.Task[None] | None = None
        """Exists while frames wait in the outbox for the socket to drain."""
        self._room: asyncio.Event | None = None
        """Set when the outbox has room again (the pump waits on it while it is full)."""
        self._finished: asyncio.Future[None] | None = None
        self._ended = False
        self._close_task: asyncio.Task[None] | None = None
        self.closing: tuple[int, str] | None = None
        self.last_offset = 0
        """The offset of the last event written to the socket (what the client resumes from)."""

    @property
    def id(self) -> str:
        return self.principal.connection_id

    @property
    def user_id(self) -> str | None:
        return self.principal.user_id

    @property
    def quota(self) -> ClientQuota:
        """What this connection may hold and do (patterns, running requests, publish rate)."""
        quota = self._quota
        if quota is None:
            quota = self._quota = ClientQuota(self.limits.client_limits, now=asyncio.get_running_loop().time())
        return quota

    @property
    def log(self) -> structlog.stdlib.BoundLogger:
        """The gateway's logger bound to this connection's id."""
        bound = self._log
        if bound is None:
            bound = self._log = log.bind(connection_id=self.id)
        return bound

    # --- lifecycle --------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; cancels the streams it started and leaves no task behind."""
        self.enqueue(encode_connection(self.id, self.node.epoch))
        try:
            await self._read_loop()
        finally:
            await self._shutdown()
            self._ended = True
            if self._finished is not None and not self._finished.done():
                self._finished.set_result(None)

    async def _read_loop(self) -> None:
        count = 0
        try:
            async for message in self.ws:
                if self.closing is not None:
                    return
                limiter = self._limiter
                now = asyncio.get_running_loop().time()
                if limiter is None:
                    rate = self.limits.max_frames_per_s
                    limiter = self._limiter = RateLimiter(rate, max(rate, 1.0), now=now)
                delay = limiter.acquire(now)
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
        drainer = self._drainer
        if drainer is not None:
            drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drainer
        self.outbox.clear()
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
                    await self._wait_flushed()
        if self._drainer is not None:
            self._drainer.cancel()
        self.outbox.clear()
        await self.ws.close(code, reason)

    async def finish(self, code: int, reason: str, grace: float) -> None:
        """Close gracefully: write what the bus still delivers (bounded by ``grace``), then close with ``code``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                if not self.node.healthy:
                    await self.link.wait_delivered()
                await self._wait_flushed()
        self.close(code, reason)
        await self.wait_finished()

    async def wait_finished(self) -> None:
        """Wait until :meth:`run` has returned."""
        if self._ended:
            return
        if self._finished is None:
            self._finished = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._finished)

    async def _wait_flushed(self) -> None:
        """Wait until the outbox is empty (written to the socket, or dropped because the socket closed)."""
        while self.outbox and self._drainer is not None:
            await asyncio.wait((self._drainer,))

    # --- outgoing ---------------------------------------------------------------------------------------------

    def enqueue(self, frame: bytes, offset: int = 0) -> None:
        """Send a control frame (JSON): written at once when nothing waits before it, else queued; never
        awaits. An overflow closes the connection with 4008."""
        if self.closing is not None:
            return
        if not self.outbox.put(text_frame(frame), offset):
            self._too_slow()
            return
        self._flush()

    def deliver(self, events: Sequence[Event]) -> int:
        """The link's sink: write each event's shared frame, the whole batch in one write while the socket's
        buffer is under ``write_limit``; queue what does not fit, as many as the outbox has room for (at least
        one when it is empty). Synchronous; returns how many were taken."""
        if self.closing is not None:
            return len(events)
        encode = self._frames.encode
        outbox = self.outbox
        taken = 0
        if not outbox:
            # Nothing waits: straight to the socket, one write for the batch.
            ws = self.ws
            transport = ws.transport
            if ws.protocol.state is State.OPEN and not transport.is_closing():
                budget = self.limits.write_limit - transport.get_write_buffer_size()
                chunks: list[bytes] = []
                size = 0
                last = 0
                for event in events:
                    if size >= budget:
                        break
                    taken += 1
                    frame = encode(event)
                    if frame is None:  # an event no client could read: skipped, the connection keeps its place
                        continue
                    chunks.append(frame)
                    size += len(frame)
                    if event.offset:
                        last = event.offset
                if chunks:
                    self._write(chunks)
                    if last:
                        self.last_offset = last
        if taken < len(events):
            queued = self._queue(events, taken, encode)
            if queued < 0:
                return len(events)
            taken += queued
        self._stats.events_sent += taken
        if taken:
            self.node.delivered(events[:taken] if taken < len(events) else events, "websocket")
        return taken

    def _queue(self, events: Sequence[Event], start: int, encode: Callable[[Event], bytes | None]) -> int:
        """Queue ``events[start:]`` while the events' half of the outbox has room; how many were taken (-1: the
        connection is closing as too slow)."""
        outbox = self.outbox
        soft_frames, soft_bytes = self._soft_limits()
        taken = 0
        for event in events[start:] if start else events:
            if outbox and (len(outbox) >= soft_frames or outbox.bytes >= soft_bytes):
                self._no_room()
                break
            frame = encode(event)
            taken += 1
            if frame is None:
                continue
            if not outbox.put(frame, event.offset):
                self._too_slow()  # one event larger than the whole outbox
                return -1
        self._flush()
        return taken

    def _soft_limits(self) -> tuple[int, int]:
        # Events fill at most half the outbox; the other half keeps room for control frames (pong, published,
        # errors). The pump waits for the drain task below a quarter before it hands over more.
        limits = self.limits
        return limits.soft_frames, limits.soft_bytes

    def _write(self, frames: list[bytes]) -> None:
        """Write complete frames in one write (the socket is open and its buffer under the limit)."""
        ws = self.ws
        if ws.protocol.extensions:  # pragma: no cover - the gateway negotiates none (compression=None)
            protocol = ws.protocol
            for frame in frames:
                protocol.send_text(frame_data(frame))
            ws.transport.writelines(protocol.data_to_send())
            return
        ws.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def _flush(self) -> None:
        """Write what the outbox holds, in one write, while the socket's buffer is under ``write_limit``; start
        the drain task for what is left."""
        outbox = self.outbox
        if not outbox:
            return
        ws = self.ws
        transport = ws.transport
        if ws.protocol.state is not State.OPEN or transport.is_closing():
            outbox.clear()  # nothing more goes out on this socket
            self._room_again()
            return
        budget = self.limits.write_limit - transport.get_write_buffer_size()
        if budget > 0:
            frames, last = outbox.take_bytes(budget)
            self._write(frames)
            if last:
                self.last_offset = last
        if outbox and self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain(), name="nexus-gateway-drain")
        self._room_again()

    async def _drain(self) -> None:
        """Wait for the socket to drain and write what waits, until the outbox is empty."""
        ws = self.ws
        try:
            while self.outbox:
                await ws.drain()
                before = self.outbox.bytes
                self._flush_now()
                if self.outbox and self.outbox.bytes == before:
                    await asyncio.sleep(STALL_S)
        except (ConnectionError, ConnectionClosed):
            self.outbox.clear()
        finally:
            self._drainer = None
            self._room_again()

    def _flush_now(self) -> None:
        drainer, self._drainer = self._drainer, None
        try:
            self._flush()
        finally:
            if self._drainer is not None and self._drainer is not drainer:  # pragma: no cover - cannot happen
                self._drainer.cancel()
            self._drainer = drainer

    def _no_room(self) -> None:
        if self._room is None:
            self._room = asyncio.Event()
        self._room.clear()

    def _room_again(self) -> None:
        """Wake the pump once the outbox is below a quarter of its bounds (or empty)."""
        room = self._room
        if room is None or room.is_set():
            return
        outbox = self.outbox
        soft_frames, soft_bytes = self._soft_limits()
        if not outbox or (len(outbox) <= soft_frames // 2 and outbox.bytes <= soft_bytes // 2):
            room.set()

    def _free_room(self) -> int:
        """Frames the events' half of the outbox can take now (0 when it is full)."""
        outbox = self.outbox
        if not outbox:
            return self.limits.soft_frames
        if outbox.bytes >= self.limits.soft_bytes:
            return 0
        return max(0, self.limits.soft_frames - len(outbox))

    async def _wait_room(self) -> None:
        """Wait until the drain task has made room again."""
        if self._free_room() > 0:
            return
        if self._drainer is None:  # pragma: no cover - a full outbox always has its drain task
            await asyncio.sleep(STALL_S)
            return
        self._no_room()
        assert self._room is not None
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
