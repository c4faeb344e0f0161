"""The one interface every transport adapts: a :class:`Node` is a Nexus as its clients see it.

gRPC (``nexus.grpc``), the WebSocket gateway and its Server-Sent Events endpoint (``nexus.gateway``) take a
``Node`` and nothing else: they never import the provider or a bus implementation. What a node offers:

- ``publish`` / ``publish_many``: store events (a repeated ``event_id`` inside the dedupe window answers with the
  stored original, ``duplicate=True``);
- ``subscribe``: patterns, followed correlation ids, ``since_offset`` + ``epoch`` replay → a
  :class:`~nexus.bus.base.Subscription` (``recovered`` says whether the replay was exact);
- ``request``: publish a ``requested`` event on behalf of its requester → a
  :class:`~nexus.session.RequestSession`, the one place where a request is followed to its terminal event and
  cancelled when its requester leaves;
- ``cancel``, ``handlers``, ``streams``, ``healthy`` / ``on_health``, ``epoch``, ``head_offset``.

Implementations: :class:`~nexus.node_local.LocalNode` (a bus and a provider in this process, what ``nexus serve``
runs) and :class:`~nexus.node_remote.RemoteNode` (a remote Nexus mirrored over gRPC, what ``nexus gateway --nexus``
runs). Both pass one conformance suite (``tests/test_node_conformance.py``).

Exceptions: every error is a :class:`~nexus.errors.NexusError`; a request that is not a ``requested`` event, or
that repeats an ``event_id`` of another type or of a lifecycle no longer held, is
:class:`~nexus.errors.InvalidArgument`; a node that cannot store is :class:`~nexus.errors.Unavailable`.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Final

from nexus.bus.base import DEFAULT_MAX_PENDING, Published, Subscription
from nexus.events import Event, JSONObject
from nexus.patterns import DEFAULT_MAX_PATTERNS, check_pattern_count
from nexus.session import Lease, RequestSession, SessionState

HealthCallback = Callable[[bool], None]
DEFAULT_MAX_PATTERNS_PER_SUBSCRIPTION: Final = DEFAULT_MAX_PATTERNS


class LostReason(enum.StrEnum):
    """Why a node ended a subscription by itself (None from :meth:`Node.subscription_lost`: it is closing)."""

    HISTORY_RESET = "history_reset"
    """The history the subscription's offsets refer to is gone (a remote Nexus restarted on a memory bus):
    its client must resume, and will be told ``recovered: false``."""


class Node(abc.ABC):
    """A Nexus as a transport sees it. See the module docstring."""

    def __init__(self, *, max_patterns_per_subscription: int = DEFAULT_MAX_PATTERNS_PER_SUBSCRIPTION) -> None:
        self.max_patterns_per_subscription = max_patterns_per_subscription
        self._background: set[asyncio.Task[Any]] = set()
        self._health_callbacks: list[HealthCallback] = []

    # --- state ------------------------------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def epoch(self) -> str:
        """The epoch the node's offsets belong to."""

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """Whether events can be stored and delivered now."""

    def on_health(self, callback: HealthCallback) -> None:
        """Call ``callback(healthy)`` whenever :attr:`healthy` changes while the node runs."""
        self._health_callbacks.append(callback)

    def _health_changed(self, healthy: bool) -> None:
        for callback in list(self._health_callbacks):
            callback(healthy)

    def subscription_lost(self, sub: Subscription) -> LostReason | None:
        """Why the node ended ``sub`` by itself, or None (it ended because the node is closing)."""
        return None

    def describe(self) -> dict[str, Any]:
        """A short description for logs."""
        return {"node": type(self).__name__, "epoch": self.epoch}

    # --- lifetime ---------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None:
        """Start serving (connect, start handlers)."""

    async def close(self) -> None:
        """Stop; every subscription ends. Waits for the node's own background work (request cancels)."""
        await self._drain_background()

    async def _drain_background(self) -> None:
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def spawn(self, coroutine: Coroutine[Any, Any, Any], *, name: str | None = None) -> None:
        """Run ``coroutine`` in the background, owned by the node (awaited by :meth:`close`)."""
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- events -----------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def publish(self, event: Event) -> Published:
        """Store ``event``; a repeated ``event_id`` inside the dedupe window returns the stored original.

        Once it returns, :meth:`head_offset` includes the event (a later ``subscribe`` starts after it).
        """

    async def publish_many(self, events: Sequence[Event]) -> list[Published]:
        """Store several events in order."""
        return [await self.publish(event) for event in events]

    async def subscribe(
        self,
        patterns: Iterable[str] = (),
        *,
        since_offset: int = 0,
        epoch: str | None = None,
        correlation_ids: Iterable[str] = (),
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> Subscription:
        """Subscribe; with ``since_offset`` (and ``epoch``), first replay every matching stored event after it.

        At most ``max_patterns_per_subscription`` patterns (:class:`~nexus.errors.ResourceExhausted`, counted
        before any is parsed); patterns are validated before anything is registered.
        """
        patterns = list(patterns)
        self.check_pattern_count(len(patterns))
        return await self._subscribe(
            patterns,
            since_offset=since_offset,
            epoch=epoch,
            correlation_ids=correlation_ids,
            max_pending=max_pending,
        )

    def check_pattern_count(self, count: int) -> None:
        """Refuse a subscription of ``count`` patterns over this node's limit."""
        check_pattern_count(count, self.max_patterns_per_subscription)

    @abc.abstractmethod
    async def _subscribe(
        self,
        patterns: list[str],
        *,
        since_offset: int,
        epoch: str | None,
        correlation_ids: Iterable[str],
        max_pending: int,
    ) -> Subscription:
        """The node's own subscribe, once the limits are checked."""

    @abc.abstractmethod
    async def head_offset(self) -> int:
        """The offset of the newest stored event (0 when none)."""

    # --- requests ---------------------------------------------------------------------------------------------

    def open_request(self, event: Event, *, follow: Subscription | None = None) -> RequestSession:
        """A session for the ``requested`` event ``event``, not yet published (:meth:`RequestSession.start`).

        With ``follow``, that subscription (the requester's own) follows the request's correlation id from now
        on, so no lifecycle event can slip by between publishing and following.
        """
        return RequestSession(self, event, follow=follow)

    async def request(
        self, event: Event, *, follow: Subscription | None = None, max_pending: int = DEFAULT_MAX_PENDING
    ) -> RequestSession:
        """Publish the ``requested`` event ``event``; the session follows it to its terminal event."""
        session = self.open_request(event, follow=follow)
        await session.start(max_pending=max_pending)
        return session

    @abc.abstractmethod
    async def submit(self, event: Event) -> tuple[Published, Lease]:
        """Store a ``requested`` event and hold it on behalf of its requester (used by :class:`RequestSession`).

        Releasing the lease with ``cancel`` cancels the request's stream if it still runs.
        """

    @abc.abstractmethod
    async def cancel(self, correlation_id: str, reason: str = "cancelled by requester") -> bool:
        """Cancel a running request wherever it runs; returns whether it was found (on this node)."""

    @abc.abstractmethod
    async def handlers(self) -> list[JSONObject]:
        """The registered handlers: ``name``, ``event_type`` (``service:action``), ``streaming``, ``ordering_key``,
        ``stream_timeout_s``, ``class_path``."""

    @abc.abstractmethod
    async def streams(self) -> list[JSONObject]:
        """The running requests: ``correlation_id``, ``event_type``, ``handler``, ``stream_count``, ``age_s``,
        ``state``."""


__all__ = [
    "DEFAULT_MAX_PENDING",
    "HealthCallback",
    "Lease",
    "LostReason",
    "Node",
    "Published",
    "RequestSession",
    "SessionState",
    "Subscription",
]
