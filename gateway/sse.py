"""Server-Sent Events: ``GET /sse?patterns=…`` on the gateway's port, one more adapter over the :class:`Node`.

A browser's plain ``EventSource`` (or ``curl -N``) follows patterns and resumes by itself after a cut::

    GET /sse?patterns=demo:>,places:*:v1:*     (repeated or comma-separated; ?token= or Authorization: Bearer)
    HTTP/1.1 200 OK                            text/event-stream, Cache-Control: no-cache, Connection: close
    retry: 2000                                the reconnection delay, in a block of its own

    id: <epoch>:<head>                         only when no replay follows (see below)
    data: {"type":"subscribed","event_types":[…],"recovered"?:…,"epoch":…,"head_offset":…}

    id: <epoch>:<offset>
    data: {"type":"demo:tick:v1:happened","event_id":…,"payload":…,"offset":42,"epoch":…,…}

    data: {"type":"demo:stream_x:v1:heartbeat",…,"offset":0,…}     offset 0 (heartbeats): no id

    : keep-alive                               a comment every ``keepalive_s`` while nothing else is written

    data: {"type":"error","code":"too_slow","message":"too slow: resume from offset 57"}   then the stream ends

- **Every message is a plain ``message``** (no ``event:`` field), so ``EventSource.onmessage`` receives all of
  them; ``data`` is the WebSocket protocol's JSON object (its ``type`` tells them apart), taken from the
  gateway's :class:`~nexus.gateway.protocol.EventFrameCache`: each event is encoded once for every connection,
  and its SSE message is built once for every SSE response.
- **Resume.** The ``id`` is ``<epoch>:<offset>``: ``EventSource`` sends back only ``Last-Event-ID`` when it
  reconnects, so the epoch travels in it, and a history that was lost (a new epoch) is answered
  ``recovered: false`` instead of replaying offsets of another history. ``Last-Event-ID`` (also a bare
  ``<offset>``) wins over ``?since_offset=`` / ``?epoch=``, which a client that keeps its own position passes.
  The ``subscribed`` message carries ``id: <epoch>:<offset live delivery starts after>`` unless a replay follows,
  so a client cut off before its first event still resumes without a gap.
- **Errors.** A bad query, ``Last-Event-ID`` or pattern is a ``400`` and a refused token ``401``/``403`` (JSON
  ``{"error","message"}``), on which ``EventSource`` stops for good. Once the request is valid the answer is a
  ``200`` stream; whatever ends it later (shutdown, a client too slow, a lost history, an unavailable bus) is
  told in a last ``error`` message, and ``EventSource`` reconnects after ``retry`` milliseconds.
- **Limits, as for WebSocket.** The response's outbox is the socket's write buffer, bounded by ``write_limit``
  (events are written while it is under the limit, in one write per batch); events that pile up behind a client
  that does not read overflow its subscription's ``max_pending`` (``subscriber_queue``) and the stream ends
  with ``too_slow`` naming the last offset written. At most the node's ``max_patterns_per_subscription`` patterns.

**Sharing the port with websockets.** ``websockets`` answers an HTTP request only with a complete
``Response`` from ``process_request``, bounds the whole opening handshake with ``open_timeout`` and aborts the
transport of a connection that is not OPEN after it. The gateway therefore serves with ``open_timeout=None`` and
``create_connection=``:class:`HandoffConnection`, which applies the timeout itself around its handshake and,
for ``/sse``, lets ``process_request`` stop that timeout and take the transport over with its own asyncio
protocol (``transport.set_protocol``): websockets then neither parses nor writes anything on it. The stream runs
inside ``process_request``; when it ends the transport is closed and the loss is passed on to websockets'
``connection_lost``, so the handshake finds the connection CLOSED and sends nothing. The response is
close-delimited (HTTP/1.1 without ``Content-Length``, ``Connection: close``): the connection carries this one
response anyway, chunk framing would only add bytes per write, and a cut and an end mean the same to a client
that resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http
import json
import re
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from nexus.errors import ErrorCode, InvalidArgument, InvalidPattern, NexusError, ResourceExhausted
from nexus.events import Event
from nexus.identity import Principal
from nexus.node import Node
from nexus.patterns import check_pattern_count, parse_pattern

from .connection import GatewayStats
from .link import Link, SubscribeResult
from .protocol import (
    MAX_PATTERNS_PER_FRAME,
    EventFrameCache,
    GatewayCode,
    code_for_exception,
    encode_error,
    encode_subscribed,
    error_spec,
    frame_data,
)

SSE_PATH: Final = "/sse"
MAX_QUERY_FIELDS: Final = 2 * MAX_PATTERNS_PER_FRAME
MAX_OFFSET: Final = 2**63 - 1
ROOM: Final = 1024
"""Events the pump may take at once while the socket's write buffer is under its limit."""
KEEPALIVE: Final = b": keep-alive\n\n"
HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Connection: close\r\n"
    b"X-Accel-Buffering: no\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"\r\n"
)
_EPOCH: Final = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces: safe on an SSE `id:` line
_OFFSET: Final = re.compile(r"[0-9]{1,19}")

log = structlog.get_logger("nexus.gateway")

Authorize = Callable[[ServerConnection, Request], Awaitable[Principal | Response]]
"""The gateway's HTTP auth check: who the request acts as, or the 401/403 response."""


# --- the request and the messages (pure) -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SseQuery:
    """What an ``/sse`` request asks for."""

    patterns: tuple[str, ...]
    since_offset: int = 0
    epoch: str | None = None


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidArgument(f"{name} is given {len(values)} times; give it once")
    return values[0] or None


def _offset(text: str, what: str) -> int:
    if not _OFFSET.fullmatch(text) or int(text) > MAX_OFFSET:
        raise InvalidArgument(f"{what} must be a whole number of at most 19 digits, not {text[:40]!r}")
    return int(text)


def _epoch(text: str, what: str) -> str:
    if not _EPOCH.fullmatch(text):
        raise InvalidArgument(f"{what} must be 1 to 128 printable characters without spaces")
    return text


def parse_request(
    target: str, last_event_ids: Sequence[str] = (), *, max_patterns: int = MAX_PATTERNS_PER_FRAME
) -> SseQuery:
    """The query of ``GET /sse?…`` and its ``Last-Event-ID`` headers, validated; raises
    :class:`InvalidArgument`, :class:`InvalidPattern` or (over ``max_patterns``) ``ResourceExhausted`` with a
    message for the client."""
    try:
        query = parse_qs(urlsplit(target).query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise InvalidArgument(f"too many query parameters (at most {MAX_QUERY_FIELDS})") from None
    patterns = [p.strip() for value in query.get("patterns", ()) for p in value.split(",") if p.strip()]
    if not patterns:
        raise InvalidArgument("give at least one pattern: /sse?patterns=demo:> (repeated or comma-separated)")
    check_pattern_count(len(patterns), max_patterns)
    for pattern in patterns:
        parse_pattern(pattern)
    since = _one(query, "since_offset")
    since_offset = _offset(since, "since_offset") if since is not None else 0
    epoch_text = _one(query, "epoch")
    epoch = _epoch(epoch_text, "epoch") if epoch_text is not None else None
    if len(last_event_ids) > 1:
        raise InvalidArgument("Last-Event-ID is given more than once")
    last = last_event_ids[0].strip() if last_event_ids else ""
    if last:  # where the client got to: wins over where its URL started
        last_epoch, colon, offset = last.rpartition(":")
        since_offset = _offset(offset, "Last-Event-ID's offset")
        if colon:
            epoch = _epoch(last_epoch, "Last-Event-ID's epoch")
    return SseQuery(tuple(dict.fromkeys(patterns)), since_offset, epoch)


def resume_id(epoch: str, offset: int) -> str | None:
    """The SSE ``id`` of a position: ``<epoch>:<offset>`` (a bare offset for an epoch unfit for the line)."""
    if not offset and not epoch:
        return None
    return f"{epoch}:{offset}" if _EPOCH.fullmatch(epoch) else str(offset)


def sse_message(data: bytes, *, event_id: str | None = None) -> bytes:
    """One SSE message: an ``id`` line and ``data`` lines (one per line of ``data``), then a blank line."""
    lines: list[bytes] = []
    if event_id:
        lines.append(b"id: " + event_id.encode())
    lines.extend(b"data: " + line for line in data.splitlines() or [b""])
    return b"\n".join(lines) + b"\n\n"


def event_message(event: Event, frame: bytes) -> bytes:
    """The SSE message of a stored event (``frame``: its JSON); offset 0 has no ``id``, so it never moves the
    resume point."""
    return sse_message(frame, event_id=resume_id(event.epoch, event.offset) if event.offset else None)


def _frame(frames: EventFrameCache, event: Event) -> bytes:
    """The event's JSON from the WebSocket frame cache (the frame's data); raises for one that cannot be encoded
    (the cache skips it and says so once)."""
    frame = frames.encode(event)
    if frame is None:
        raise ValueError(f"event {event.offset} cannot be encoded")
    return frame_data(frame)


def refusal(status: http.HTTPStatus, error: NexusError) -> Response:
    """A short JSON error response (``{"error","message"}``)."""
    body = json.dumps({"error": code_for_exception(error), "message": error.message}, separators=(",", ":")).encode()
    headers = Headers()
    headers["Content-Type"] = "application/json"
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-cache"
    headers["X-Content-Type-Options"] = "nosniff"
    return Response(status.value, status.phrase, headers, body)


# --- the hand-off from websockets ----------------------------------------------------------------------------------


class HandoffConnection(ServerConnection):
    """A websockets server connection whose opening handshake may turn into a streaming HTTP response.

    Serve with ``open_timeout=None``: this class bounds the handshake by ``handshake_timeout`` itself (see
    :func:`handoff_connection`), and :meth:`take_over` lifts that bound for a response that streams.
    """

    handshake_timeout: float | None = 10.0
    _nexus_timer: asyncio.Timeout | None = None

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        async with asyncio.timeout(self.handshake_timeout) as timer:
            self._nexus_timer = timer
            try:
                await super().handshake(*args, **kwargs)
            finally:
                self._nexus_timer = None

    def take_over(self, protocol: asyncio.Protocol) -> asyncio.Transport:
        """Stop the handshake's timeout and hand the transport to ``protocol``, which must pass its
        ``connection_lost`` on to this connection's (websockets then finds it CLOSED and sends nothing)."""
        if self._nexus_timer is not None:
            self._nexus_timer.reschedule(None)
        transport = self.transport
        transport.set_protocol(protocol)
        return transport


def handoff_connection(open_timeout: float | None) -> type[HandoffConnection]:
    """The ``create_connection`` class for ``serve(..., open_timeout=None)``, bounding handshakes by
    ``open_timeout`` seconds."""

    class GatewayServerConnection(HandoffConnection):
        handshake_timeout = open_timeout

    return GatewayServerConnection


# --- one response ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SseLimits:
    """Per-response settings (from :class:`~nexus.gateway.server.GatewaySettings`)."""

    subscriber_queue: int
    write_limit: int
    send_buffer_bytes: int | None
    keepalive_s: float
    retry_ms: int
    close_timeout: float


class EventStream(asyncio.Protocol):
    """One ``/sse`` response: the asyncio protocol of its transport and the sink of its :class:`Link`."""

    def __init__(
        self,
        ws: HandoffConnection,
        node: Node,
        messages: EventFrameCache,
        limits: SseLimits,
        stats: GatewayStats,
        principal: Principal | None = None,
    ) -> None:
        self._ws = ws
        self._node = node
        self._messages = messages
        self._limits = limits
        self._stats = stats
        self.link = Link(
            node,
            self._deliver,
            self._room,
            self._wait_room,
            self._on_link_end,
            max_pending=limits.subscriber_queue,
            principal=principal or Principal(connection_id=f"sse-{uuid.uuid4().hex[:16]}"),
        )
        self._transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._ended = asyncio.Event()
        self._lost = asyncio.Event()
        self._written = 0
        self.end_code: str | None = None
        self._final = b""
        self.last_offset = 0
        """The offset of the last event written (what the client resumes from)."""

    # --- asyncio protocol (set by take_over; connection_made is not called again) ------------------------------

    def data_received(self, data: bytes) -> None:
        """An SSE client sends nothing after its request: whatever comes is dropped."""

    def eof_received(self) -> bool:
        self.finish(None)  # the client closed its side: it is gone
        return False

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.set()
        self._writable.set()
        self.finish(None)
        self._ws.connection_lost(exc)

    # --- the stream --------------------------------------------------------------------------------------------

    async def run(self, query: SseQuery, *, refuse: str | None = None) -> None:
        """Take the connection over, stream until something ends it, then close it (bounded by close_timeout).
        ``refuse``: end at once with that error code (the gateway is shutting down)."""
        transport = self._transport = self._ws.take_over(self)
        if transport.is_closing():  # the client left while the request was checked: its loss may be told already
            self._lost.set()
            self.finish(None)
        sock = transport.get_extra_info("socket")
        if self._limits.send_buffer_bytes is not None and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._limits.send_buffer_bytes)
        self._write(HEAD + b"retry: %d\n\n" % self._limits.retry_ms)  # before anything that may end the stream
        try:
            if refuse is not None:
                self.finish(refuse)
            else:
                await self.link.subscribe(
                    query.patterns, since_offset=query.since_offset, epoch=query.epoch, announce=self._subscribed
                )
            await self._keep_alive()
        except NexusError as exc:
            self.finish(code_for_exception(exc), exc.message)
        except Exception as exc:
            log.exception("sse_failed", error=repr(exc))
            self.finish(ErrorCode.INTERNAL, "the server failed to stream the events")
        finally:
            await self._close()

    def _subscribed(self, result: SubscribeResult) -> None:
        frame = encode_subscribed(
            result.patterns, epoch=result.epoch, head_offset=result.head_offset, recovered=result.recovered
        )
        # Without a replay, live delivery starts after start_after: the resume point until the first event.
        event_id = None if result.recovered else resume_id(result.epoch, result.start_after)
        self._write(sse_message(frame, event_id=event_id))

    async def _keep_alive(self) -> None:
        """Wait for the end; write a comment every ``keepalive_s`` in which nothing else was written."""
        while not self._ended.is_set():
            written = self._written
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), self._limits.keepalive_s)
            if written == self._written and self._writable.is_set() and not self._ended.is_set():
                self._write(KEEPALIVE)

    def finish(self, code: str | None, message: str | None = None) -> None:
        """End the stream; a ``code`` is told in a last ``error`` message (None: the client is gone)."""
        if self._ended.is_set():
            return
        if code is not None:
            self.end_code = code
            self._final = sse_message(encode_error(code, message or error_spec(code).description))
        self._ended.set()

    async def _close(self) -> None:
        self._ended.set()
        await self.link.close()
        transport = self._transport
        assert transport is not None
        if self.end_code is not None:
            self._write(self._final)
        transport.close()  # writes what is buffered first
        try:
            async with asyncio.timeout(self._limits.close_timeout):
                await self._lost.wait()
        except TimeoutError:
            transport.abort()  # a client that reads nothing: its loss is told at the next turn of the loop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._lost.wait()
            self._lost.set()

    async def wait_closed(self) -> None:
        await self._lost.wait()

    # --- the link's sink ---------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            self._written += 1

    def _deliver(self, events: Sequence[Event]) -> int:
        """Write events (one write) while the write buffer is under ``write_limit``: at least one."""
        if self._ended.is_set() or self._transport is None:
            return len(events)
        budget = self._limits.write_limit - self._transport.get_write_buffer_size()
        encode = self._messages.encode
        chunks: list[bytes] = []
        size = 0
        last = self.last_offset
        taken = 0
        for event in events:
            taken += 1
            if event.offset:
                last = event.offset
            message = encode(event)
            if message is None:
                continue  # no client could read it: skipped (and counted, once) by the frame cache
            chunks.append(message)
            size += len(message)
            if size >= budget:
                break
        if chunks:
            self._write(b"".join(chunks))
        self.last_offset = last
        self._stats.events_sent += len(chunks)
        self._stats.sse_events_sent += len(chunks)
        if chunks:
            self._node.delivered(events[:taken], "sse")
        return taken

    def _room(self) -> int:
        # 0 exactly while _wait_room would wait (the link polls the two together); once the stream has ended,
        # _deliver drops what it is given.
        return ROOM if self._writable.is_set() else 0

    async def _wait_room(self) -> None:
        await self._writable.wait()

    def _on_link_end(self, code: str | None) -> None:
        if code == GatewayCode.TOO_SLOW:
            self._stats.too_slow += 1
            self._stats.sse_too_slow += 1
            log.warning("sse_client_too_slow", last_offset=self.last_offset)
            self.finish(code, f"too slow: resume from offset {self.last_offset}")
        else:
            self.finish(code or GatewayCode.GOING_AWAY)


# --- the endpoint ---------------------------------------------------------------------------------------------------


class SseEndpoint:
    """``GET /sse`` of one gateway: validates, authorizes and runs each :class:`EventStream`."""

    def __init__(
        self,
        node: Node,
        frames: EventFrameCache,
        limits: SseLimits,
        *,
        authorize: Authorize,
        stats: GatewayStats,
    ) -> None:
        self.node = node
        self.limits = limits
        self._authorize = authorize
        self._stats = stats
        self.messages = EventFrameCache(encoder=lambda event: event_message(event, _frame(frames, event)))
        self.streams: set[EventStream] = set()
        self._closing = False

    async def handle(self, connection: ServerConnection, request: Request) -> Response:
        """Answer ``request``: a 4xx response, or (after streaming) a placeholder websockets never sends."""
        if getattr(request, "method", "GET") != "GET":  # websockets before 16 parses GET requests only
            response = refusal(http.HTTPStatus.METHOD_NOT_ALLOWED, InvalidArgument(f"{SSE_PATH} answers GET only"))
            response.headers["Allow"] = "GET"
            return response
        try:
            query = parse_request(
                request.path,
                request.headers.get_all("Last-Event-ID"),
                max_patterns=self.node.max_patterns_per_subscription,
            )
        except (InvalidArgument, InvalidPattern, ResourceExhausted) as exc:
            self.node.telemetry.refused(code_for_exception(exc), "sse")
            return refusal(http.HTTPStatus.BAD_REQUEST, exc)
        principal = await self._authorize(connection, request)
        if isinstance(principal, Response):
            self._stats.auth_refused += 1
            code = "unauthenticated" if principal.status_code == 401 else "permission_denied"
            self.node.telemetry.refused(code, "sse")
            return principal
        try:
            # Out-of-scope patterns are a 403 before the stream starts: EventSource does not retry a 403.
            self.node.check_subscribe(query.patterns, principal)
        except NexusError as exc:
            self.node.telemetry.refused(code_for_exception(exc), "sse")
            return refusal(http.HTTPStatus.FORBIDDEN, exc)
        if not isinstance(connection, HandoffConnection):  # pragma: no cover - the gateway always serves with it
            return refusal(http.HTTPStatus.NOT_IMPLEMENTED, InvalidArgument("this server cannot stream responses"))
        stream = EventStream(connection, self.node, self.messages, self.limits, self._stats, principal)
        self.streams.add(stream)
        try:
            await stream.run(query, refuse=GatewayCode.GOING_AWAY if self._closing else None)
        finally:
            self.streams.discard(stream)
            log.debug("sse_ended", code=stream.end_code, last_offset=stream.last_offset)
        return Response(http.HTTPStatus.OK.value, "OK", Headers(), b"")

    async def close(self) -> None:
        """End every response (a last ``going_away`` message) and wait until their connections are closed."""
        self._closing = True
        streams = list(self.streams)
        for stream in streams:
            stream.finish(GatewayCode.GOING_AWAY)
        await asyncio.gather(*(stream.wait_closed() for stream in streams))
