"""What a provider keeps for its plugins: their background tasks, their shared objects and their bus followers.

The provider owns one :class:`PluginRuntime`; each handler's context reaches it through ``ctx.start_soon``,
``ctx.shared``, ``ctx.follow`` and ``ctx.kv`` (the public API in :mod:`nexus.api`). Lifetime, in :meth:`Provider.run
<nexus.provider.Provider.run>`::

    running() entered ─ handlers' setup ─ requests ... stop ─ running() left ─ handlers' teardown ─ close()
                        └──────── background tasks and followers run ────────┘ (cancelled)

So a task or follower never outlives the provider, teardown never races one, and shared objects (one per
plugin and class, never per process) are dropped with the provider that made them.

``ctx.kv`` is the plugin's scope of the key-value store the server made with its bus (and closes after the
bus's last user). A provider made without one (embedded, in tests) keeps its plugins' state in memory: an
in-memory SQLite store it closes itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Final, Protocol, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup

from nexus.api import DEFAULT_FOLLOW_MAX_PENDING, Follower, HandlerContext, Stream, plugin_name
from nexus.bus.base import DEFAULT_MAX_PENDING, Subscription
from nexus.errors import StreamClosed
from nexus.events import Event
from nexus.kv.base import KeyValueStore, PluginKV, ScopedKV
from nexus.kv.sqlite import IN_MEMORY, SqliteKeyValue

T = TypeVar("T")

RETRY_FIRST_S: Final = 0.05
RETRY_MAX_S: Final = 5.0


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class EventSource(Protocol):
    """Where followers subscribe: the server's :class:`~nexus.bus.base.Bus`, or a worker's connection to a
    server (:mod:`nexus.worker`)."""

    @property
    def epoch(self) -> str:
        """The history offsets belong to (as far as known)."""

    async def subscribe(
        self,
        patterns: Iterable[str] = (),
        *,
        since_offset: int = 0,
        epoch: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> Subscription:
        """A subscription to ``patterns``, replaying what follows ``since_offset`` (in ``epoch``) first."""


class PluginRuntime:
    """Background tasks, shared objects and bus followers of one provider's handlers (or a worker's).

    ``bus`` is where followers subscribe.
    """

    def __init__(self, bus: EventSource, kv: KeyValueStore | None = None) -> None:
        self.bus = bus
        self._group: TaskGroup | None = None
        self._shared: dict[tuple[str, type[Any]], Any] = {}
        self._kv_store = kv
        self._owns_kv = kv is None
        self._kv: dict[str, ScopedKV] = {}

    def kv(self, plugin: str) -> ScopedKV:
        """``plugin``'s keys of the store (an in-memory one, made on first use, when none was given)."""
        scoped = self._kv.get(plugin)
        if scoped is None:
            if self._kv_store is None:
                self._kv_store = SqliteKeyValue(IN_MEMORY)
            scoped = self._kv[plugin] = self._kv_store.scoped(plugin)
        return scoped

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Background tasks may start inside this block; every one still running is cancelled as it ends.

        An exception from the block leaves it as it was raised (not wrapped in an exception group), so a
        handler's failing ``setup`` reaches the server unchanged.
        """
        failure: Exception | None = None
        async with anyio.create_task_group() as group:
            self._group = group
            try:
                yield
            except Exception as exc:
                failure = exc
            finally:
                self._group = None
                group.cancel_scope.cancel()
        if failure is not None:
            raise failure

    def start_soon(
        self,
        log: structlog.stdlib.BoundLogger,
        function: Callable[..., Awaitable[Any]],
        *args: Any,
        name: str | None = None,
    ) -> None:
        """Run ``await function(*args)`` until it returns or the provider stops; log what it raises."""
        if self._group is None:
            raise RuntimeError("background tasks start while the server runs: from setup() on, until it stops")
        label: str = name or getattr(function, "__qualname__", None) or repr(function)
        self._group.start_soon(self._guarded, log, label, function, args, name=label)

    @staticmethod
    async def _guarded(
        log: structlog.stdlib.BoundLogger, label: str, function: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
    ) -> None:
        try:
            await function(*args)
        except Exception as exc:  # one plugin's task must never take the server down
            log.exception("background_task_failed", task=label, error=_describe(exc))

    def shared(self, plugin: str, kind: type[T], factory: Callable[[], T] | None = None) -> T:
        """The one object of class ``kind`` of ``plugin``, made by ``factory()`` (or ``kind()``) on first use."""
        key: tuple[str, type[Any]] = (plugin, kind)
        if key in self._shared:
            found = self._shared[key]
            assert isinstance(found, kind)
            return found
        made = factory() if factory is not None else kind()
        if not isinstance(made, kind):
            raise TypeError(f"the factory of the shared {kind.__qualname__} returned a {type(made).__qualname__}")
        self._shared[key] = made
        return made

    async def close(self, log: structlog.stdlib.BoundLogger) -> None:
        """Forget every shared object, newest first, awaiting ``aclose()`` of those that have one; close the
        in-memory key-value store when the provider made it."""
        shared, self._shared = self._shared, {}
        self._kv = {}
        if self._owns_kv and self._kv_store is not None:
            store, self._kv_store = self._kv_store, None
            await store.close()
        for (plugin, kind), value in reversed(shared.items()):
            aclose = getattr(value, "aclose", None)
            if aclose is None or not inspect.iscoroutinefunction(aclose):
                continue
            try:
                await aclose()
            except Exception as exc:
                log.error("shared_close_failed", plugin=plugin, kind=kind.__qualname__, error=_describe(exc))

    async def follow(
        self,
        log: structlog.stdlib.BoundLogger,
        patterns: tuple[str, ...],
        on_event: Callable[[Event], Awaitable[None] | None],
        *,
        since_offset: int | None,
        max_pending: int,
        name: str,
    ) -> Follower:
        """Subscribe now (a bad pattern raises here), then apply events in a background task."""
        if max_pending < 1:
            raise ValueError(f"follow(): max_pending must be at least 1, got {max_pending}")
        follower = _BusFollower(self.bus, patterns, on_event, log.bind(follower=name), name, max_pending)
        subscription = await follower.subscribe_first(since_offset)
        try:
            self.start_soon(follower.log, follower.run, subscription, name=f"{name}-follower")
        except BaseException:
            subscription.close()
            raise
        return follower


class CountedStream(Stream):
    """What every :class:`~nexus.api.Stream` does besides sending (the server's and a worker's): it knows its
    request, counts the chunks it accepted, and refuses chunks once closed."""

    def __init__(self, correlation_id: str) -> None:
        self._correlation_id = correlation_id
        self._closed = False
        self._accepted = 0

    def _check_open(self) -> None:
        if self._closed:
            raise StreamClosed(f"stream {self._correlation_id} has ended; send() is no longer possible")

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stream_count(self) -> int:
        return self._accepted

    @property
    def correlation_id(self) -> str:
        return self._correlation_id


class PluginContext(HandlerContext):
    """The part of a handler's context its :class:`PluginRuntime` serves: ``follow``, ``shared``, ``kv`` and
    ``start_soon``. The server's provider and a worker add ``publish``, ``subscribe`` and ``stats``."""

    def __init__(
        self, runtime: PluginRuntime, name: str, config: dict[str, Any], log: structlog.stdlib.BoundLogger
    ) -> None:
        self._runtime = runtime
        self.name = name
        self.plugin = plugin_name(name)
        self.config = config
        self.log = log

    async def follow(
        self,
        *patterns: str,
        on_event: Callable[[Event], Awaitable[None] | None],
        since_offset: int | None = None,
        max_pending: int = DEFAULT_FOLLOW_MAX_PENDING,
        name: str | None = None,
    ) -> Follower:
        return await self._runtime.follow(
            self.log, patterns, on_event, since_offset=since_offset, max_pending=max_pending, name=name or self.name
        )

    def shared(self, kind: type[T], factory: Callable[[], T] | None = None) -> T:
        return self._runtime.shared(self.plugin, kind, factory)

    @property
    def kv(self) -> PluginKV:
        return self._runtime.kv(self.plugin)

    def start_soon(self, function: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> None:
        self._runtime.start_soon(self.log, function, *args, name=name)


class _BusFollower(Follower):
    def __init__(
        self,
        bus: EventSource,
        patterns: tuple[str, ...],
        on_event: Callable[[Event], Awaitable[None] | None],
        log: structlog.stdlib.BoundLogger,
        name: str,
        max_pending: int,
    ) -> None:
        self._bus = bus
        self._patterns = patterns
        self._on_event = on_event
        self.log = log
        self._name = name
        self._max_pending = max_pending
        self._offset = 0
        self._epoch: str | None = None
        self._recovered: bool | None = None
        self._restarts = 0
        self._advanced = asyncio.Event()

    @property
    def name(self) -> str:
        return self._name

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def recovered(self) -> bool | None:
        return self._recovered

    @property
    def restarts(self) -> int:
        return self._restarts

    async def subscribe_first(self, since_offset: int | None) -> Subscription:
        if since_offset is None:
            subscription = await self._bus.subscribe(self._patterns, max_pending=self._max_pending)
            self._offset = subscription.start_after
        else:
            since = max(since_offset, 0)
            # Offset 0 with the bus's epoch asks for the whole history (0 alone would mean "live").
            epoch = self._bus.epoch if since == 0 else None
            subscription = await self._bus.subscribe(
                self._patterns, since_offset=since, epoch=epoch, max_pending=self._max_pending
            )
            # Without the replay (recovered False) it goes on live from the bus's head.
            self._offset = since if subscription.recovered else max(since, subscription.start_after)
        self._epoch = subscription.epoch
        self._recovered = subscription.recovered
        return subscription

    async def _resubscribe(self) -> Subscription:
        """After the last offset applied, in the history the follower started in."""
        subscription = await self._bus.subscribe(
            self._patterns, since_offset=self._offset, epoch=self._epoch, max_pending=self._max_pending
        )
        self._restarts += 1
        self._recovered = subscription.recovered
        if subscription.recovered is False:
            self.log.warning("follower_gap", after_offset=self._offset, epoch=subscription.epoch)
            self._epoch = subscription.epoch
            self._offset = max(self._offset, subscription.start_after)
        else:
            self.log.info("follower_resumed", after_offset=self._offset)
        return subscription

    async def run(self, subscription: Subscription) -> None:
        delay = RETRY_FIRST_S
        while True:
            try:
                try:
                    while batch := await subscription.next_batch():
                        for event in batch:
                            await self._apply(event)
                        delay = RETRY_FIRST_S
                finally:
                    subscription.close()
                reason = "the subscription ended"
            except Exception as exc:  # fell behind (SlowConsumer), the bus went away: resume below
                reason = _describe(exc)
            self.log.warning("follower_resubscribing", reason=reason, after_offset=self._offset)
            while True:
                await anyio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                try:
                    subscription = await self._resubscribe()
                    break
                except Exception as exc:
                    self.log.warning("follower_resubscribe_failed", error=_describe(exc), after_offset=self._offset)

    async def _apply(self, event: Event) -> None:
        if event.offset and event.offset <= self._offset:
            return  # applied already (a replay that overlaps what the previous subscription delivered)
        try:
            result = self._on_event(event)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # one event the plugin cannot apply must not stop the follower
            self.log.exception(
                "follower_event_failed", event_type=event.event_type, offset=event.offset, error=_describe(exc)
            )
        if event.offset > self._offset:
            self._offset = event.offset
            advanced, self._advanced = self._advanced, asyncio.Event()
            advanced.set()

    async def reached(self, offset: int, timeout: float | None = None) -> bool:
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            while self._offset < offset:
                await self._advanced.wait()
            return True
        return False
