"""One WebSocket connection's view of the bus: its subscription and its requests.

A connection has ONE subscription on the node, created by its first ``subscribe`` (or its first request):
its patterns and the correlation ids of the requests it sent (``Subscription.follow``) share one ordered queue,
so every event reaches the connection once, in offset order, whatever the overlap of its patterns, its
subscribe frames and its requests' lifecycles. A task (the pump) moves each batch the bus queued to the
connection's ``deliver`` callback, which never awaits.

- The first ``subscribe`` with ``since_offset``/``epoch`` replays what came after it (``recovered``); later
  ``subscribe`` frames add patterns live (a ``since_offset`` on them is answered ``recovered: false``: the
  connection's stream has already started; resume by reconnecting with one frame holding every pattern).
- Each request is a :class:`~nexus.session.RequestSession` following the connection's subscription: the
  correlation id is followed *before* the request is published, so no lifecycle event can slip by; events that
  arrive while its publish is under way are held back, so ``published`` comes first.
- A repeated request (an ``event_id`` the bus already stored) replays the original's lifecycle from its own
  offset through its session's own subscription, as gRPC ``RequestEvent`` does.
- :meth:`Link.close` closes the sessions: requests whose lifecycle has not ended are cancelled
  (``reason: requester disconnected``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import structlog

from nexus.errors import InvalidArgument, NotFound, SlowConsumer
from nexus.events import Event, quote
from nexus.identity import Principal
from nexus.node import DEFAULT_MAX_PENDING, LostReason, Node, Published, RequestSession, SessionState, Subscription

from .protocol import GatewayCode

MAX_BATCH: Final = 1024
ROOM_CHECK_S: Final = 0.1
RECENT_REPEATS: Final = 1024

log = structlog.get_logger("nexus.gateway")

Deliver = Callable[[Sequence[Event]], int]
"""Takes events in order without awaiting; returns how many it took (fewer when the outgoing queue is full)."""
Room = Callable[[], int]
"""How many frames the outgoing queue has room for now (0: full)."""
WaitRoom = Callable[[], Awaitable[None]]
"""Waits until the outgoing queue has room again."""
OnEnd = Callable[[str | None], None]

LOST_CODES: Final[dict[LostReason, str]] = {LostReason.HISTORY_RESET: GatewayCode.HISTORY_RESET}
"""The gateway error a subscription the node ended by itself closes its connection with."""


@dataclasses.dataclass(frozen=True, slots=True)
class SubscribeResult:
    """What the ``subscribed`` frame reports, and ``start_after``: without a replay, every matching event after
    that offset reaches the subscription live (with one, the replay covers what came before it)."""

    patterns: tuple[str, ...]
    recovered: bool | None
    epoch: str
    head_offset: int
    start_after: int


class Link:
    """The bus side of one connection. ``deliver`` takes events in order (as many as its outgoing queue has room
    for; ``wait_room`` waits for more room, so a replay of any length flows through a bounded queue, while live
    events that pile up overflow the subscription's ``max_pending`` instead); ``on_end`` hears that the
    subscription ended by itself, with the error code to close the connection with (``too_slow``, or the code
    for what :meth:`Node.subscription_lost` says), or None when the node is shutting down."""

    __slots__ = (
        "_closed",
        "_deliver",
        "_free",
        "_holding",
        "_leftover",
        "_on_end",
        "_pump",
        "_released",
        "_repeats",
        "_repeats_done",
        "_requests",
        "_skip_through",
        "_sub",
        "_wait_room",
        "max_pending",
        "node",
        "principal",
    )

    def __init__(
        self,
        node: Node,
        deliver: Deliver,
        room: Room,
        wait_room: WaitRoom,
        on_end: OnEnd,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        principal: Principal,
    ) -> None:
        self.node = node
        self.principal = principal
        """Who the connection acts as: every publish, subscription, request and cancel is checked for it."""
        self._deliver = deliver
        self._free = room
        self._wait_room = wait_room
        self._on_end = on_end
        self.max_pending = max_pending
        self._sub: Subscription | None = None
        self._pump: asyncio.Task[None] | None = None
        self._requests: dict[str, RequestSession] = {}
        self._repeats: dict[str, tuple[RequestSession, asyncio.Task[None]]] = {}
        self._repeats_done: dict[str, None] = {}  # the most recent last (evicted oldest first)
        self._skip_through: dict[str, int] = {}
        self._holding = 0
        self._released: asyncio.Event | None = None  # made by the first request; clear while one is published
        self._leftover: list[Event] = []  # filtered, not yet taken by deliver (the outgoing queue was full)
        self._closed = False

    # --- state ------------------------------------------------------------------------------------------------

    @property
    def running_requests(self) -> int:
        """Requests this connection sent whose lifecycle has not ended (repeats being replayed included)."""
        return len(self._requests) + len(self._repeats)

    @property
    def patterns(self) -> list[str]:
        """The patterns this connection follows."""
        return list(self._sub.patterns) if self._sub is not None else []

    # --- subscribing ------------------------------------------------------------------------------------------

    async def subscribe(
        self,
        patterns: Sequence[str],
        *,
        since_offset: int = 0,
        epoch: str | None = None,
        announce: Callable[[SubscribeResult], None],
    ) -> None:
        """Follow ``patterns``; ``announce`` is called before any event of a replay is delivered."""
        self._check_open()
        resume = since_offset > 0 or bool(epoch)
        sub = self._sub
        if sub is None:
            sub = await self.node.subscribe(
                patterns, since_offset=since_offset, epoch=epoch, max_pending=self.max_pending, principal=self.principal
            )
            self._attach(sub)
            announce(SubscribeResult(tuple(patterns), sub.recovered, sub.epoch, sub.head_offset, sub.start_after))
            self._start_pump(sub)
            return
        if resume and not sub.patterns:
            await self._resubscribe(sub, patterns, since_offset, epoch, announce)
            return
        self.node.check_subscribe(patterns, self.principal)
        sub.add_patterns(patterns)
        head = await self.node.head_offset()
        announce(SubscribeResult(tuple(patterns), False if resume else None, sub.epoch, head, head))

    async def _resubscribe(
        self,
        old: Subscription,
        patterns: Sequence[str],
        since_offset: int,
        epoch: str | None,
        announce: Callable[[SubscribeResult], None],
    ) -> None:
        """The first patterns of a connection that already follows requests: a new subscription with replay.

        Lifecycle events the old subscription delivered are not delivered again (per request, its lifecycle is
        a prefix in offset order, so remembering the last offset delivered is enough).
        """
        await self._stop_pump()
        new = await self.node.subscribe(
            patterns,
            since_offset=since_offset,
            epoch=epoch,
            correlation_ids=list(old.correlation_ids),
            max_pending=self.max_pending,
            principal=self.principal,
        )
        # Let events stored before the new subscription but not yet handed out reach the old one, then take
        # what it holds: without a replay (recovered false) the new one would skip them.
        await asyncio.sleep(0)
        try:
            leftover = old.take_nowait()
        except SlowConsumer:
            leftover = []
        old.close()
        pending, self._leftover = self._leftover, []
        await self._push([*pending, *self._filter(leftover)], new)
        for correlation_id, request in self._requests.items():
            self._skip_through[correlation_id] = request.last_offset
            request.follow = new
        self._attach(new)
        announce(SubscribeResult(tuple(patterns), new.recovered, new.epoch, new.head_offset, new.start_after))
        self._start_pump(new)

    async def unsubscribe(self, patterns: Sequence[str]) -> None:
        """Stop following ``patterns``."""
        self._check_open()
        if self._sub is not None:
            self._sub.remove_patterns(patterns)

    def _attach(self, sub: Subscription) -> None:
        self._sub = sub

    async def _ensure_subscription(self) -> Subscription:
        if self._sub is None:
            sub = await self.node.subscribe((), max_pending=self.max_pending)
            self._attach(sub)
            self._start_pump(sub)
            return sub
        return self._sub

    # --- the pump ---------------------------------------------------------------------------------------------

    def _start_pump(self, sub: Subscription) -> None:
        self._pump = asyncio.get_running_loop().create_task(self._run_pump(sub), name="nexus-gateway-pump")

    async def _stop_pump(self) -> None:
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _run_pump(self, sub: Subscription) -> None:
        try:
            if self._leftover:
                pending, self._leftover = self._leftover, []
                await self._push(pending, sub)
            free = self._free
            deliver = self._deliver
            while True:
                # Take no more than the outgoing queue has room for: what waits beyond that stays in the
                # subscription, whose bound (max_pending live events) cuts off a client that does not read.
                room = free()
                if room <= 0:
                    room = await self._room(sub)
                batch = await sub.next_batch(min(MAX_BATCH, room))
                if not batch:
                    break
                # While a request is being published, its lifecycle waits here, so `published` comes first.
                if self._released is not None:
                    await self._released.wait()
                events = self._filter(batch)
                if events:
                    taken = deliver(events)
                    if taken < len(events):  # the outgoing queue is full: wait for room (rare)
                        await self._push(events[taken:], sub)
        except SlowConsumer:
            if not self._closed:
                self._on_end(GatewayCode.TOO_SLOW)
            return
        if not self._closed and self._sub is sub:
            reason = self.node.subscription_lost(sub)
            self._on_end(LOST_CODES[reason] if reason is not None else None)

    async def _room(self, sub: Subscription) -> int:
        """Room in the outgoing queue, waiting for it if there is none. The subscription cannot tell when it
        overflows while nobody reads it, so a pump kept waiting looks at it now and then; an overflow then
        surfaces as SlowConsumer."""
        while True:
            free = self._free()
            if free > 0:
                return free
            try:
                await asyncio.wait_for(self._wait_room(), ROOM_CHECK_S)
            except TimeoutError:
                if sub.closed:
                    sub.take_nowait()  # raises SlowConsumer if that is why it closed
                    return 1  # closed by the backend: next_batch returns what is left, then []

    async def _push(self, events: list[Event], sub: Subscription) -> None:
        """Hand ``events`` to ``deliver``, waiting for room in the outgoing queue as often as needed."""
        while events:
            taken = self._deliver(events)
            if taken >= len(events):
                return
            events = events[taken:]
            main = sub is self._sub
            if main:
                self._leftover = events  # kept if the pump is stopped while it waits
            await self._room(sub)
            if main:
                self._leftover = []

    def _filter(self, batch: Sequence[Event]) -> list[Event]:
        """Drop what another path delivers; note the progress and end of this connection's requests."""
        requests = self._requests
        watched = bool(requests or self._repeats or self._repeats_done or self._skip_through)
        if not watched:
            return batch if isinstance(batch, list) else list(batch)
        out: list[Event] = []
        for event in batch:
            correlation_id = event.metadata.get("correlation_id")
            if correlation_id:
                if correlation_id in self._repeats or correlation_id in self._repeats_done:
                    continue  # a repeated request: its lifecycle comes from its own replay
                skip = self._skip_through.get(correlation_id)
                if skip is not None and 0 < event.offset <= skip:
                    continue
                request = requests.get(correlation_id)
                if request is not None and request.observe(event) and request.state is SessionState.FINISHED:
                    self._finish(request)
            out.append(event)
        return out

    def _finish(self, request: RequestSession) -> None:
        """The lifecycle ended (the session has let go of it): forget it."""
        self._requests.pop(request.correlation_id, None)
        self._skip_through.pop(request.correlation_id, None)

    # --- publishing -------------------------------------------------------------------------------------------

    async def publish(self, event: Event) -> Published:
        """Store an event that is not a request."""
        self._check_open()
        return await self.node.publish(event, principal=self.principal, transport="websocket")

    async def request(self, event: Event, *, announce: Callable[[Published], None]) -> None:
        """Publish a ``requested`` event; its lifecycle follows ``announce`` (the ``published`` frame)."""
        self._check_open()
        correlation_id = event.event_id
        if correlation_id in self._requests or correlation_id in self._repeats:
            raise InvalidArgument(f"a request with event_id {correlation_id!r} is already live on this connection")
        sub = await self._ensure_subscription()
        # Follows before publishing: nothing slips by.
        request = self.node.open_request(event, follow=sub, principal=self.principal, transport="websocket")
        self._requests[correlation_id] = request
        self._hold()
        try:
            try:
                published = await request.start(max_pending=self.max_pending)
            except BaseException:
                self._requests.pop(correlation_id, None)
                raise
            if published.duplicate:
                self._repeat(request, published, announce)
                return
            announce(published)
        finally:
            self._unhold()
        if request.finished and self._requests.get(correlation_id) is request:
            self._finish(request)

    def _hold(self) -> None:
        self._holding += 1
        if self._released is None:
            self._released = asyncio.Event()
        self._released.clear()

    def _unhold(self) -> None:
        self._holding -= 1
        if not self._holding and self._released is not None:
            self._released.set()

    def _repeat(self, request: RequestSession, published: Published, announce: Callable[[Published], None]) -> None:
        """A repeated request: its session replays the original's lifecycle from its offset, once."""
        correlation_id = request.correlation_id
        self._requests.pop(correlation_id, None)
        # Lifecycle events delivered before the publish answered are not replayed; those the pump holds back
        # are dropped by it (the correlation id is a repeat now): the replay carries them, in order.
        skip_through = request.last_offset
        announce(published)
        task = asyncio.get_running_loop().create_task(
            self._run_repeat(request, skip_through), name="nexus-gateway-repeat"
        )
        self._repeats[correlation_id] = (request, task)

    async def _run_repeat(self, request: RequestSession, skip: int) -> None:
        replay = request.subscription
        assert replay is not None
        try:
            while True:
                room = await self._room(replay)
                batch = await request.next_batch(min(MAX_BATCH, room))
                if not batch:
                    return
                await self._push([event for event in batch if not 0 < event.offset <= skip], replay)
        except SlowConsumer:
            if not self._closed:
                self._on_end(GatewayCode.TOO_SLOW)
        finally:
            request.close()
            self._repeats.pop(request.correlation_id, None)
            self._repeats_done[request.correlation_id] = None
            done = self._repeats_done
            while len(done) > RECENT_REPEATS:
                del done[next(iter(done))]

    async def cancel(self, correlation_id: str, reason: str) -> bool:
        """Cancel a stream this connection started; raises :class:`NotFound` for any other."""
        self._check_open()
        request = self._requests.get(correlation_id)
        if request is None or request.finished:
            raise NotFound(f"no live stream started by this connection has correlation_id {quote(correlation_id, 60)}")
        return await self.node.cancel(correlation_id, reason, principal=self.principal)

    async def wait_delivered(self) -> None:
        """Wait until the subscription has ended (the backend closed it) and everything it held was delivered."""
        pump = self._pump
        if pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(pump)

    # --- closing ----------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument("the connection is closing")

    async def close(self) -> None:
        """Stop delivering; cancel the streams of requests whose lifecycle has not ended; leave no task."""
        if self._closed:
            return
        self._closed = True
        await self._stop_pump()
        if self._sub is not None:
            self._sub.close()
        repeats = [task for _, task in self._repeats.values()]
        for request, task in list(self._repeats.values()):
            request.close()
            task.cancel()
        for request in list(self._requests.values()):
            request.close()  # cancels the streams whose lifecycle has not ended
        self._requests.clear()
        await asyncio.gather(*repeats, return_exceptions=True)
