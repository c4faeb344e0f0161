"""The plugin API (contract): what handler authors subclass and receive.

.. code-block:: python

    from nexus import Event, EventHandler, HandlerContext, Stream, StreamingEventHandler

    class Countdown(StreamingEventHandler):
        event_type = "demo:stream_countdown"     # handles demo:stream_countdown:v<N>:requested
        async def handle_stream(self, event: Event, stream: Stream) -> None:
            for i in range(int(event.payload["n"])):
                await stream.send({"i": i})      # waits while the stream's buffer is full

    class Echo(EventHandler):
        event_type = "demo:echo"
        async def handle(self, event: Event) -> dict:
            return {"echo": event.payload}
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, Final

import structlog

from nexus.events import Event, JSONObject
from nexus.schema import EventSpec


class _ServerDefault(enum.Enum):
    SERVER_DEFAULT = "server default"


SERVER_DEFAULT: Final = _ServerDefault.SERVER_DEFAULT
"""``stream_timeout`` value meaning "the server's ``--stream-timeout``"."""

Timeout = float | None | _ServerDefault


class HandlerContext(abc.ABC):
    """What a handler gets in ``setup()`` (and as ``self.ctx``): its config, a logger, and ``publish``."""

    name: str
    """The handler's registration name (its entry-point name, or ``module:Class``)."""
    config: dict[str, Any]
    """The plugin's own configuration section (from the config file or flags)."""
    log: structlog.stdlib.BoundLogger
    """A structlog logger bound to the handler's name."""

    @abc.abstractmethod
    async def publish(
        self,
        event_type: str,
        payload: JSONObject | None = None,
        *,
        metadata: dict[str, str] | None = None,
        event_id: str | None = None,
    ) -> Event:
        """Publish a side event; returns it as stored.

        Inside a request, the event carries ``metadata.causation_id`` = the request's ``event_id``.
        Raises :class:`~nexus.errors.InvalidEventType` / :class:`~nexus.errors.InvalidPayload` for bad input.
        """

    @abc.abstractmethod
    def subscribe(self, *patterns: str, since_offset: int = 0) -> AbstractAsyncContextManager[AsyncIterator[Event]]:
        """Follow events on the bus matching ``patterns`` (``places:encounter:v1:*``)::

            async with self.ctx.subscribe("places:encounter:v1:*") as events:
                async for event in events:
                    ...

        Live from now, or replayed after ``since_offset`` first. The subscription ends with the block.
        """

    @abc.abstractmethod
    def stats(self) -> JSONObject:
        """Live statistics of this node: ``events_per_s`` (total and ``events_per_s_by_service``),
        ``active_streams``, ``subscribers``, ``delivery_latency_ms`` (p50/p95/p99), ``head_offset``."""


class Stream(abc.ABC):
    """The sending side of one stream, given to :meth:`StreamingEventHandler.handle_stream`."""

    @abc.abstractmethod
    async def send(self, chunk: JSONObject) -> None:
        """Publish one ``stream`` event carrying ``chunk`` (a JSON object), in order.

        Waits while the stream's buffer is full (backpressure). Raises :class:`~nexus.errors.StreamClosed`
        once the stream has ended, and :class:`~nexus.errors.InvalidPayload` for a chunk that is not JSON.
        """

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """Whether the stream has ended (``send`` would raise)."""

    @property
    @abc.abstractmethod
    def stream_count(self) -> int:
        """Chunks accepted so far."""

    @property
    @abc.abstractmethod
    def correlation_id(self) -> str:
        """The request's ``event_id``."""


class _BaseHandler(abc.ABC):
    event_type: ClassVar[str]
    """``service:action`` (any version) or ``service:action:vN`` (one version)."""
    stream_timeout: ClassVar[Timeout] = SERVER_DEFAULT
    """Seconds a request may run; ``None`` = until cancelled; default: the server's."""
    ordering_key: ClassVar[str | None] = None
    """A payload field: requests with the same value run one at a time, in offset order."""
    buffer_size: ClassVar[int | None] = None
    """Chunks a stream buffers before ``send`` waits; default: the server's (100)."""
    takes: ClassVar[EventSpec | None] = None
    """The request this handler takes, with its payload schema: payloads that do not fit it end with
    ``failed`` / ``invalid_payload`` before the handler runs. Also documents the request."""
    emits: ClassVar[Sequence[EventSpec]] = ()
    """Every event this handler publishes (its ``success`` or ``stream`` payload, side events), documented."""

    ctx: HandlerContext

    async def setup(self, ctx: HandlerContext) -> None:
        """Called once before the first request; ``self.ctx`` is already set."""

    async def teardown(self) -> None:
        """Called once when the server stops, after the last request ended."""


class EventHandler(_BaseHandler):
    """A plain handler: ``requested`` → one ``success`` with the returned payload, or ``failed``."""

    @abc.abstractmethod
    async def handle(self, event: Event) -> JSONObject | None:
        """Handle one request; the returned dict (or ``{}`` for None) is the ``success`` payload.

        Raise :class:`~nexus.errors.InvalidPayload` for a bad request (``failed`` with ``invalid_payload``);
        anything else raised gives ``failed`` with ``handler_error``.
        """


class StreamingEventHandler(_BaseHandler):
    """A streaming handler: ``started`` → ``stream``* (+ ``heartbeat``) → one terminal event."""

    @abc.abstractmethod
    async def handle_stream(self, event: Event, stream: Stream) -> None:
        """Send chunks with ``await stream.send({...})``; returning ends the stream with ``success``."""


AnyHandler = EventHandler | StreamingEventHandler
