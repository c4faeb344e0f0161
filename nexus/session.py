"""One request followed on behalf of its requester, from its publish to its terminal event.

Every transport that lets a client send a request (gRPC ``RequestEvent``, a WebSocket's request frames) uses a
:class:`RequestSession`; nothing else follows or cancels a request for a requester. Its states::

    NEW --start()--> PUBLISHING --stored--> FOLLOWING --observe(terminal)--> FINISHED
                         |                    |
                         +-------close()------+--> RELEASED   (cancels the request's stream, unless a repeat)

- ``start`` publishes the request through the node (:meth:`Requester.submit`). When a ``follow`` subscription
  (the requester's own) was given, it follows the correlation id *before* the publish, so no lifecycle event can
  slip by; otherwise, and always for a repeated request (an ``event_id`` the bus already stored), the session
  opens its own subscription that replays the lifecycle from the request's offset: a repeat sees the
  original's lifecycle, once.
- ``observe`` notes each lifecycle event in offset order (the requester's subscription delivered it, or
  :meth:`RequestSession.next_batch` did); the terminal event of the request's own type ends the session.
- ``close`` is synchronous, so it can run on every exit path (a cancelled task, a closed generator): a session
  that started the request and has not seen its end lets go of it with ``cancel``, and the stream ends
  ``cancelled`` with ``reason: requester disconnected``. A repeated request belongs to whoever sent the
  original: leaving it cancels nothing.

The state logic is synchronous (``observe``, ``finished``, what ``close`` must do); only ``start`` and
``next_batch`` await.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from typing import Any, Final, Protocol

from nexus.bus.base import DEFAULT_MAX_PENDING, Published, Subscription, each_event
from nexus.errors import AlreadyExists, InvalidArgument, InvalidState
from nexus.events import REQUESTED, TERMINAL_STATES, Event, quote
from nexus.identity import LOCAL, Principal

DISCONNECTED = "requester disconnected"
OWNER: Final = "owner"
"""Metadata key of who sent an event (set by the node, see :meth:`nexus.node.Node.admit`)."""


class Lease(abc.ABC):
    """A requester's hold on one stored request."""

    @abc.abstractmethod
    async def release(self, *, cancel: bool) -> None:
        """Let go of the request; with ``cancel`` (the requester left before its end), cancel its stream."""


class Requester(Protocol):
    """What a session needs from its node (:class:`~nexus.node.Node` implements it)."""

    async def submit(self, event: Event) -> tuple[Published, Lease]: ...

    async def subscribe(
        self,
        patterns: Iterable[str] = (),
        *,
        since_offset: int = 0,
        epoch: str | None = None,
        correlation_ids: Iterable[str] = (),
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> Subscription: ...

    def spawn(self, coroutine: Coroutine[Any, Any, Any], *, name: str | None = None) -> None: ...

    def owner_of(self, stored: Event) -> str | None: ...

    def count_request(self, event: Event, transport: str, seconds: float) -> None: ...


class SessionState(enum.StrEnum):
    NEW = "new"
    PUBLISHING = "publishing"
    FOLLOWING = "following"
    FINISHED = "finished"
    RELEASED = "released"


def require_request(event: Event) -> None:
    """Refuse an event that is not a ``...:requested`` one: only those are requests."""
    if event.state != REQUESTED:
        raise InvalidArgument(f"a request needs a '...:requested' event type, not {quote(event.event_type, 80)}")


def request_base(event_type: str) -> str:
    """``service:action:vN`` of an event type: what a request's lifecycle events share."""
    return event_type.rsplit(":", 1)[0]


class RequestSession:
    """One request and its requester. See the module docstring."""

    def __init__(
        self,
        node: Requester,
        event: Event,
        *,
        follow: Subscription | None = None,
        principal: Principal = LOCAL,
        transport: str = "local",
    ) -> None:
        require_request(event)
        self._node = node
        self.transport = transport
        """How the requester reached the node (``grpc``, ``websocket``, ...), for the metrics."""
        self.principal = principal
        """Who sent the request: a repeat of another owner's ``event_id`` is refused, never joined."""
        self.event = event
        self.correlation_id = event.event_id
        self.base = request_base(event.event_type)
        self.state = SessionState.NEW
        self.follow = follow
        self.stored: Event = event
        self.duplicate = False
        self.last_offset = 0
        """The offset of the newest lifecycle event observed."""
        self.subscription: Subscription | None = None
        """The session's own subscription (no ``follow`` given, or a repeated request)."""
        self._lease: Lease | None = None
        self._ended = False
        if follow is not None:
            follow.follow(self.correlation_id)

    # --- state (synchronous) ----------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Whether the request's terminal event was observed."""
        return self._ended

    def observe(self, event: Event) -> bool:
        """Note one event of this request's lifecycle (in offset order); True when it is the terminal one."""
        if event.offset:
            self.last_offset = max(self.last_offset, event.offset)
        if event.state in TERMINAL_STATES and request_base(event.event_type) == self.base:
            self._ended = True
            if self.state is SessionState.FOLLOWING:  # while publishing, start() finishes it once stored
                self.state = SessionState.FINISHED
                self._let_go(cancel=False)
            return True
        return False

    def _let_go(self, *, cancel: bool) -> None:
        if self.follow is not None:
            self.follow.unfollow(self.correlation_id)
        if self.subscription is not None:
            self.subscription.close()
        lease, self._lease = self._lease, None
        if lease is not None:
            self._node.spawn(lease.release(cancel=cancel), name="nexus-request-release")

    def close(self) -> None:
        """The requester is done with the request. Cancels its stream if this session started it and it has
        not ended; never awaits (the cancel runs in the node's background)."""
        if self.state is SessionState.RELEASED:
            return
        self.state = SessionState.RELEASED
        self._let_go(cancel=not self._ended and not self.duplicate)

    # --- I/O --------------------------------------------------------------------------------------------------

    async def start(self, *, max_pending: int = DEFAULT_MAX_PENDING) -> Published:
        """Publish the request; returns what the bus stored (the original, for a repeated ``event_id``).

        Raises :class:`~nexus.errors.InvalidArgument` for an ``event_id`` that names another type of event, or a
        repeat whose lifecycle is no longer held; any error leaves nothing followed.
        """
        if self.state is not SessionState.NEW:
            raise InvalidState(f"request {self.correlation_id!r} was already started")
        self.state = SessionState.PUBLISHING
        started = time.perf_counter()
        try:
            published, lease = await self._node.submit(self.event)
        except BaseException:
            self.state = SessionState.RELEASED
            self._let_go(cancel=False)
            raise
        self._node.count_request(self.event, self.transport, time.perf_counter() - started)
        self._lease = lease
        self.stored = stored = published.event
        self.duplicate = published.duplicate
        if self.state is SessionState.RELEASED:  # the requester left while it was being published
            self._let_go(cancel=not self._ended and not published.duplicate)
            return published
        self.state = SessionState.FOLLOWING
        try:
            owner = self._node.owner_of(stored)
            if published.duplicate and owner is not None and not self.principal.owns(owner):
                raise AlreadyExists(
                    f"event_id {quote(stored.event_id, 80)} was already used by another client; "
                    "use a fresh event_id for a new request"
                )
            if published.duplicate and stored.event_type != self.event.event_type:
                raise InvalidArgument(
                    f"event_id {stored.event_id!r} already names a {stored.event_type} event; "
                    "use a fresh event_id for a new request"
                )
            if published.duplicate or self.follow is None:
                if self.follow is not None:
                    # A repeat: its lifecycle comes from its own replay, not the requester's subscription.
                    self.follow.unfollow(self.correlation_id)
                    self.follow = None
                # From the request's own offset: nothing of its lifecycle can slip between publish and subscribe.
                self.subscription = await self._node.subscribe(
                    correlation_ids=[self.correlation_id],
                    since_offset=stored.offset,
                    epoch=stored.epoch or None,
                    max_pending=max_pending,
                )
                if published.duplicate and self.subscription.recovered is False:
                    raise InvalidArgument(
                        f"event_id {stored.event_id!r} repeats a request whose lifecycle is no longer in the "
                        "history; use a fresh event_id for a new request"
                    )
            elif self._ended:  # its terminal event was observed while it was being published
                self.state = SessionState.FINISHED
                self._let_go(cancel=False)
        except BaseException:
            self.state = SessionState.RELEASED
            self._let_go(cancel=not published.duplicate)
            raise
        return published

    async def next_batch(self, max_events: int | None = None) -> list[Event]:
        """The next lifecycle events from the session's own subscription, up to the terminal one; ``[]`` after it
        (or when the subscription ended). Raises :class:`~nexus.errors.SlowConsumer` if it overflowed."""
        sub = self.subscription
        if sub is None:
            raise InvalidState("this session's lifecycle reaches its requester's own subscription")
        if self.state is not SessionState.FOLLOWING:
            return []
        batch = await sub.next_batch(max_events)
        for index, event in enumerate(batch):
            if self.observe(event):
                return batch[: index + 1]
        return batch

    def events(self) -> AsyncIterator[Event]:
        """Every lifecycle event, one at a time, through the terminal one."""
        return each_event(self.next_batch)
