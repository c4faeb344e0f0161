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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, Final, TypeVar

import structlog

from nexus.events import Event, JSONObject
from nexus.kv.base import PluginKV
from nexus.schema import ConfigKey, EventSpec


class _ServerDefault(enum.Enum):
    SERVER_DEFAULT = "server default"


SERVER_DEFAULT: Final = _ServerDefault.SERVER_DEFAULT
"""``stream_timeout`` value meaning "the server's ``--stream-timeout``"."""

Timeout = float | None | _ServerDefault

T = TypeVar("T")

DEFAULT_FOLLOW_MAX_PENDING: Final = 10_000
"""Events a follower may have waiting before its subscription is dropped and resumed (see ``ctx.follow``)."""


class Follower(abc.ABC):
    """A running :meth:`HandlerContext.follow`: applies matching bus events in offset order until the server stops.

    Each event is applied once, in order. When its subscription ends while the server runs (it fell more than
    ``max_pending`` events behind, the bus hiccuped), the follower subscribes again after the last offset it
    applied, so the bus replays what it missed while its history still holds it; :attr:`recovered` says
    whether it did.
    """

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The name its log lines carry (``follow(..., name=...)``, by default the handler's name)."""

    @property
    @abc.abstractmethod
    def offset(self) -> int:
        """The bus offset applied up to: every matching event after the starting point and up to it was applied.

        A follower started live (no ``since_offset``) starts at the bus's head offset at that moment.
        """

    @property
    @abc.abstractmethod
    def recovered(self) -> bool | None:
        """Of its latest subscription: None when it started live, True when every matching event after the
        offset asked for was replayed, False when part of that gap was no longer in the bus's history (or the
        history is another one: its epoch changed) and the follower went on live from there."""

    @property
    @abc.abstractmethod
    def restarts(self) -> int:
        """How many times its subscription ended and it subscribed again."""

    @abc.abstractmethod
    async def reached(self, offset: int, timeout: float | None = None) -> bool:
        """Wait until the events up to ``offset`` are applied; False when ``timeout`` seconds pass first.

        Only matching events move the follower, so follow something that marks the spot: to wait for "the bus
        as it was when this request was published", include the handler's own ``requested`` events in the
        patterns and wait for ``event.offset``.
        """


class HandlerContext(abc.ABC):
    """What a handler gets in ``setup()`` (and as ``self.ctx``): its config, a logger, ``publish``, and what a
    plugin needs from the server: following the bus, state shared by its handlers, and background tasks."""

    name: str
    """The handler's registration name (its entry-point name, or ``module:Class``)."""
    plugin: str
    """The plugin the handler belongs to: its registration name up to the first ``.`` (``analytics`` for the
    entry point ``analytics.define_window``, ``my_plugin`` for ``--handler my_plugin.handlers:Countdown``). The
    handlers of one plugin read the same ``[handlers.<plugin>]`` config section and share :meth:`shared`."""
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
    async def follow(
        self,
        *patterns: str,
        on_event: Callable[[Event], Awaitable[None] | None],
        since_offset: int | None = None,
        max_pending: int = DEFAULT_FOLLOW_MAX_PENDING,
        name: str | None = None,
    ) -> Follower:
        """Apply every bus event matching ``patterns`` with ``on_event`` (a function or a coroutine function),
        one at a time in offset order, in the background until the server stops::

            async def setup(self, ctx: HandlerContext) -> None:
                self.baselines: dict[str, Any] = {}
                self.follower = await ctx.follow("demo:baseline:v1:set", on_event=self.apply, since_offset=0)

        Returns once the subscription is live: an event published after that is applied. ``since_offset`` None
        follows live from now; an offset first replays every stored matching event after it (0: the whole
        history, while the bus still holds it all). An exception from ``on_event`` is logged and the event
        skipped. When the subscription ends while the server runs (more than ``max_pending`` events waiting,
        a bus hiccup), the follower resubscribes after the last offset it applied (see :class:`Follower`).
        Raises :class:`~nexus.errors.InvalidPattern` for a bad pattern.
        """

    @abc.abstractmethod
    def shared(self, kind: type[T], factory: Callable[[], T] | None = None) -> T:
        """The one object of class ``kind`` that the handlers of this plugin share on this server.

        The first call makes it with ``factory()`` (``kind()`` when no factory is given); every later call by
        any handler of the same :attr:`plugin` returns that object. It lives as long as the server's provider:
        another server, in this process or elsewhere, has its own. When the provider stops, after every
        handler's ``teardown``, an object with an ``aclose()`` coroutine method is closed with it.
        """

    @property
    @abc.abstractmethod
    def kv(self) -> PluginKV:
        """The plugin's durable state: JSON values by key, kept across restarts, seen by this plugin only::

            async def setup(self, ctx: HandlerContext) -> None:
                entry = await ctx.kv.get("baseline.machine-7")      # a KVEntry (value, revision) or None
                revision = await ctx.kv.put("baseline.machine-7", {"mean": [0.1, 2.3]})
                await ctx.kv.put("baseline.machine-7", {...}, expect_revision=revision)  # or KVConflict
                names = await ctx.kv.keys("baseline.")             # sorted keys with that prefix
                await ctx.kv.delete("baseline.machine-7")

        Every handler of one :attr:`plugin` sees the same keys; other plugins never see them. With the memory
        bus they live in SQLite in the data directory (``--data-dir``); with the NATS bus in a JetStream
        key-value bucket that every node shares, so two nodes may write one key: ``expect_revision`` makes a
        read-modify-write safe (``0`` creates only a key that does not exist). Keys are dot-separated tokens of
        letters, digits, ``_ - = /`` (up to 256 characters); values are JSON up to the ``kv_max_value_bytes``
        setting; a plugin keeps up to ``kv_max_keys`` keys. The errors: see :class:`~nexus.kv.base.PluginKV`.
        """

    @abc.abstractmethod
    def start_soon(self, function: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> None:
        """Run ``await function(*args)`` in the background, in the provider's task group.

        Cancelled when the server stops, before ``teardown``. An exception it raises is logged (with ``name``)
        and ends only that task, never the server. Call it from ``setup`` or later.
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
    config_keys: ClassVar[Sequence[ConfigKey]] = ()
    """The settings this handler's plugin reads from its ``[handlers.<plugin>]`` section (``ctx.config``): once any
    handler of a plugin declares some, a key none of them declares is refused at start-up, as is a value of the
    wrong type. ``nexus handlers --config FILE`` shows the effective settings."""
    public_results: ClassVar[bool] = False
    """With authentication on, a request's lifecycle (its chunks and result) reaches its requester only (and
    admins); ``True`` lets every subscriber whose patterns match receive it."""

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


def plugin_name(name: str) -> str:
    """The plugin a handler registered as ``name`` belongs to: ``name`` up to its first ``.``.

    ``analytics`` for the entry point ``analytics.define_window``, ``my_plugin`` for ``--handler
    my_plugin.handlers:Countdown``. A plugin's handlers share its ``[handlers.<plugin>]`` config section and
    its ``ctx.shared`` objects.
    """
    return name.split(".", 1)[0]
