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
import contextlib
import enum
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Final

from nexus.api import AnyHandler
from nexus.bus.base import DEFAULT_MAX_PENDING, Published, Subscription, Visible
from nexus.errors import (
    AlreadyExists,
    InvalidArgument,
    InvalidState,
    PermissionDenied,
    ReservedState,
    did_you_mean,
)
from nexus.events import LIFECYCLE_STATES, REQUESTED, Event, JSONObject, quote
from nexus.identity import LOCAL, Principal
from nexus.patterns import DEFAULT_MAX_PATTERNS, check_pattern_count, parse_pattern
from nexus.session import OWNER, Lease, RequestSession, SessionState, request_base, require_request
from nexus.telemetry import Telemetry
from nexus.tracing import TRACEPARENT, Tracing
from nexus.workers import Declaration, Worker

HealthCallback = Callable[[bool], None]
DEFAULT_MAX_PATTERNS_PER_SUBSCRIPTION: Final = DEFAULT_MAX_PATTERNS
RESERVED_STATES: Final = LIFECYCLE_STATES - {REQUESTED}
"""States only the provider publishes for a type a handler serves."""
ADMIN: Final = "admin"
"""Metadata key: ``true`` on an event an admin token published as itself (set by the node only)."""
SERVER_METADATA: Final = frozenset({OWNER, "auth", ADMIN})
MAX_DESTINATIONS: Final = 1024
"""Metadata keys only the server writes (a client's values are dropped)."""


class LostReason(enum.StrEnum):
    """Why a node ended a subscription by itself (None from :meth:`Node.subscription_lost`: it is closing)."""

    HISTORY_RESET = "history_reset"
    """The history the subscription's offsets refer to is gone (a remote Nexus restarted on a memory bus):
    its client must resume, and will be told ``recovered: false``."""


class Node(abc.ABC):
    """A Nexus as a transport sees it. See the module docstring."""

    def __init__(
        self,
        *,
        max_patterns_per_subscription: int = DEFAULT_MAX_PATTERNS_PER_SUBSCRIPTION,
        tracing: Tracing | None = None,
    ) -> None:
        self.max_patterns_per_subscription = max_patterns_per_subscription
        self.tracing = tracing if tracing is not None else Tracing.off()
        """Spans of publishes and deliveries (:mod:`nexus.tracing`); off unless given."""
        self._destinations: dict[str, str] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._health_callbacks: list[HealthCallback] = []
        self.telemetry = Telemetry(enabled=False)
        """The server's metrics (a :class:`~nexus.server.NexusServer` sets its own; off otherwise)."""

    # --- state ------------------------------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def epoch(self) -> str:
        """The epoch the node's offsets belong to."""

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """Whether events can be stored and delivered now."""

    @property
    def ready(self) -> bool:
        """Whether the node serves: healthy, and its handlers started (``/readyz``)."""
        return self.healthy

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

    async def publish(self, event: Event, *, principal: Principal = LOCAL, transport: str = "local") -> Published:
        """Store ``event`` on behalf of ``principal``; a repeated ``event_id`` inside the dedupe window returns the
        stored original (refused with :class:`~nexus.errors.AlreadyExists` when another owner sent it).

        Once it returns, :meth:`head_offset` includes the event (a later ``subscribe`` starts after it).
        """
        start = time.perf_counter()
        admitted = self.admit(event, principal)
        if self.tracing.wants(admitted):
            with self.tracing.publishing(admitted, self.destination(admitted.event_type)) as stamped:
                published = await self._publish(stamped)
        else:
            published = await self._publish(admitted)
        self._check_owner(published, principal)
        self.telemetry.published((event,), transport, time.perf_counter() - start)
        return published

    async def publish_many(
        self, events: Sequence[Event], *, principal: Principal = LOCAL, transport: str = "local"
    ) -> list[Published]:
        """Store several events in order (each checked as :meth:`publish` checks one)."""
        start = time.perf_counter()
        admitted = [self.admit(event, principal) for event in events]
        if any(self.tracing.wants(event) for event in admitted):
            with contextlib.ExitStack() as spans:
                stamped = [
                    spans.enter_context(self.tracing.publishing(event, self.destination(event.event_type)))
                    for event in admitted
                ]
                results = await self._publish_many(stamped)
        else:
            results = await self._publish_many(admitted)
        for published in results:
            self._check_owner(published, principal)
        self.telemetry.published(events, transport, time.perf_counter() - start)
        return results

    @abc.abstractmethod
    async def _publish(self, event: Event) -> Published:
        """The node's own publish, once the event is admitted."""

    async def _publish_many(self, events: Sequence[Event]) -> list[Published]:
        return [await self._publish(event) for event in events]

    def serves(self, event_type: str) -> bool:
        """Whether a handler serves requests of ``event_type``'s ``service:action:vN`` (anywhere the node knows of)."""
        return False

    def destination(self, event_type: str) -> str:
        """A bounded name for spans: ``service:action`` of a type a handler serves, else the service token.

        Remembered per type (at most :data:`MAX_DESTINATIONS`), so a publish does not parse its type again."""
        known = self._destinations.get(event_type)
        if known is not None:
            return known
        service, _, rest = event_type.partition(":")
        action = rest.partition(":")[0]
        service_action = f"{service}:{action}"
        known = service_action if action and self.handles(service_action, event_type) else service
        if len(self._destinations) >= MAX_DESTINATIONS:
            self._destinations.clear()
        self._destinations[event_type] = known
        return known

    def handles(self, service_action: str, event_type: str) -> bool:
        """Whether a handler serves ``service_action`` (``event_type`` is one of its types)."""
        return self.serves(event_type)

    def delivered(self, events: Sequence[Event], transport: str) -> None:
        """Record the delivery of a batch to one subscriber of ``transport`` (one span, when tracing is on)."""
        if self.tracing.enabled and events and any(TRACEPARENT in event.metadata for event in events):
            self.tracing.delivered(events, self.destination(events[0].event_type), transport)

    def admit(self, event: Event, principal: Principal) -> Event:
        """``event`` as ``principal`` may publish it, or a refusal; the one place every transport's publishes pass.

        - Out of its publish patterns: :class:`~nexus.errors.PermissionDenied`, except a request to a handled type
          (a ``requested`` event of a type a handler serves), which any principal may send.
        - The lifecycle of a handled type (``started``, ``stream``, ``heartbeat``, terminal states) is published by
          the provider driving the request only: anyone else gets :class:`~nexus.errors.ReservedState`.
        - A handled type takes only lifecycle states: another state (``demo:echo:v1:request``, a typo of
          ``requested``) is :class:`~nexus.errors.InvalidArgument` with the closest lifecycle state suggested.
          Domain states stay open on actions no handler serves (``places:encounter:v1:started``).
        - Identity is the server's: ``metadata.owner`` is the principal's; with a verified token,
          ``metadata.user_id`` is its user (an admin's own ``user_id`` claim stays: it relays for others, as
          ``nexus gateway`` does); without one, the client's own ``user_id`` claim (if any) stays and
          ``metadata.auth`` says ``none``.
        """
        if principal is LOCAL:
            return event
        # Deny by default has one opening: asking a handler for something. Publish patterns scope the plain events
        # a client writes; a request to a type a handler serves is the handler's to judge (it reads the requester
        # from metadata.user_id), so a token without patterns can still use the server's handlers.
        handled_request = event.state == REQUESTED and self.serves(event.event_type)
        if not handled_request and not principal.may_publish(event.event_type):
            raise PermissionDenied(f"{quote(event.event_type, 80)} is outside the patterns you may publish to")
        if event.state not in LIFECYCLE_STATES and self._serves_type_of(event):
            raise InvalidArgument(
                f"{quote(event.event_type, 80)}: {quote(event.state, 40)} is not a state of a request's lifecycle, "
                f"and a handler serves {quote(request_base(event.event_type), 80)}"
                f"{did_you_mean(event.state, LIFECYCLE_STATES)} (publish '...:requested' to ask the handler; "
                "other domain events need an action no handler serves)"
            )
        if event.state in RESERVED_STATES and self.serves(event.event_type):
            raise ReservedState(
                f"{quote(event.event_type, 80)}: only the handler serving a request publishes its "
                f"{event.state} events; publish a '...:requested' event to ask for one"
            )
        metadata = {key: value for key, value in event.metadata.items() if key not in SERVER_METADATA}
        metadata[OWNER] = principal.owner
        if principal.authenticated and principal.user_id:
            if not (principal.admin and metadata.get("user_id")):
                # An admin relaying its users (a gateway's upstream token) keeps their user id; its own events say
                # that they come from an admin, which handlers may trust (the key is the server's alone).
                metadata["user_id"] = principal.user_id
                if principal.admin:
                    metadata[ADMIN] = "true"
        else:
            metadata["auth"] = "none"
        return event.evolve(metadata=metadata)

    def _serves_type_of(self, event: Event) -> bool:
        """:meth:`serves` for a domain event a client publishes, asked only when the cheap :meth:`handles` (a set
        lookup of ``service:action`` on a local node) says a handler may serve its action: most such events are of
        actions no handler serves, and their publish path stays as short as it was."""
        service_action = event.event_type.rsplit(":", 2)[0]
        return self.handles(service_action, event.event_type) and self.serves(event.event_type)

    def count_request(self, event: Event, transport: str, seconds: float) -> None:
        """A request was stored through ``transport`` in ``seconds`` (it counts as a sent message)."""
        self.telemetry.published((event,), transport, seconds)

    def owner_of(self, stored: Event) -> str | None:
        """Who sent the stored event ``stored`` (``metadata.owner``), None when nobody is known to."""
        return stored.metadata.get(OWNER)

    def _check_owner(self, published: Published, principal: Principal) -> None:
        if not published.duplicate or principal is LOCAL:
            return
        owner = self.owner_of(published.event)
        if owner is not None and not principal.owns(owner):
            raise AlreadyExists(
                f"event_id {quote(published.event.event_id, 80)} was already used by another client; "
                "choose a fresh event_id"
            )

    async def subscribe(
        self,
        patterns: Iterable[str] = (),
        *,
        since_offset: int = 0,
        epoch: str | None = None,
        correlation_ids: Iterable[str] = (),
        max_pending: int = DEFAULT_MAX_PENDING,
        principal: Principal = LOCAL,
    ) -> Subscription:
        """Subscribe; with ``since_offset`` (and ``epoch``), first replay every matching stored event after it.

        At most ``max_patterns_per_subscription`` patterns (:class:`~nexus.errors.ResourceExhausted`, counted
        before any is parsed); patterns are validated before anything is registered, and patterns outside the
        principal's subscribe patterns are refused (:class:`~nexus.errors.PermissionDenied`), never emptied.
        """
        patterns = list(patterns)
        self.check_pattern_count(len(patterns))
        self.check_subscribe(patterns, principal)
        return await self._subscribe(
            patterns,
            since_offset=since_offset,
            epoch=epoch,
            correlation_ids=correlation_ids,
            max_pending=max_pending,
            visible=principal.can_see if principal.filters_delivery else None,
        )

    @staticmethod
    def check_subscribe(patterns: Iterable[str], principal: Principal) -> None:
        """Refuse patterns ``principal`` may not subscribe to (validated first)."""
        patterns = list(patterns)
        for pattern in patterns:
            parse_pattern(pattern)
        refused = principal.out_of_scope(patterns)
        if refused:
            shown = ", ".join(quote(pattern, 60) for pattern in refused[:5])
            raise PermissionDenied(f"outside the patterns you may subscribe to: {shown}")

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
        visible: Visible | None,
    ) -> Subscription:
        """The node's own subscribe, once the limits are checked; ``visible`` hides what the subscriber may not
        see, live and in replay."""

    @abc.abstractmethod
    async def head_offset(self) -> int:
        """The offset of the newest stored event (0 when none)."""

    # --- requests ---------------------------------------------------------------------------------------------

    def open_request(
        self,
        event: Event,
        *,
        follow: Subscription | None = None,
        principal: Principal = LOCAL,
        transport: str = "local",
    ) -> RequestSession:
        """A session for the ``requested`` event ``event``, not yet published (:meth:`RequestSession.start`).

        With ``follow``, that subscription (the requester's own) follows the request's correlation id from now
        on, so no lifecycle event can slip by between publishing and following.
        """
        require_request(event)  # what it is comes before who may send it
        return RequestSession(
            self, self.admit(event, principal), follow=follow, principal=principal, transport=transport
        )

    async def request(
        self,
        event: Event,
        *,
        follow: Subscription | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        principal: Principal = LOCAL,
    ) -> RequestSession:
        """Publish the ``requested`` event ``event``; the session follows it to its terminal event."""
        session = self.open_request(event, follow=follow, principal=principal)
        await session.start(max_pending=max_pending)
        return session

    @abc.abstractmethod
    async def submit(self, event: Event) -> tuple[Published, Lease]:
        """Store a ``requested`` event and hold it on behalf of its requester (used by :class:`RequestSession`).

        Releasing the lease with ``cancel`` cancels the request's stream if it still runs.
        """

    async def cancel(
        self, correlation_id: str, reason: str = "cancelled by requester", *, principal: Principal = LOCAL
    ) -> bool:
        """Cancel a running request of ``principal``'s (any, for an admin) wherever it runs; returns whether it was
        found on this node. Another owner's request is left alone, as if it did not exist."""
        return await self._cancel(correlation_id, reason, owner=None if principal.admin else principal.owner)

    @abc.abstractmethod
    async def _cancel(self, correlation_id: str, reason: str, *, owner: str | None) -> bool:
        """Cancel the request if it belongs to ``owner`` (None: whoever owns it)."""

    def connect_worker(self, name: str, declarations: Sequence[Declaration], *, principal: Principal = LOCAL) -> Worker:
        """Admit a worker serving ``declarations`` for ``principal``, whose token must allow it to serve each type
        (:class:`~nexus.errors.PermissionDenied` names the first it may not)."""
        for declaration in declarations:
            if not principal.may_serve(declaration.event_type):
                raise PermissionDenied(f"this token may not serve {declaration.event_type!r} (its nexus.serve claim)")
        return self._connect_worker(name, declarations, owner=principal.owner)

    def _connect_worker(self, name: str, declarations: Sequence[Declaration], *, owner: str) -> Worker:
        raise InvalidState("this node runs no handlers of its own: connect workers to a nexus serve node")

    def disconnect_worker(self, worker: Worker, reason: str) -> None:
        """The worker's connection ended (``reason``)."""

    @abc.abstractmethod
    async def handlers(self) -> list[JSONObject]:
        """The registered handlers: ``name``, ``event_type`` (``service:action``), ``streaming``, ``ordering_key``,
        ``stream_timeout_s``, ``class_path``."""

    def handler_classes(self) -> dict[str, type[AnyHandler]]:
        """The classes of the handlers that run in this process, by registration name: what they declare
        (``takes``, ``emits``) makes the event catalogue. Empty when the handlers run elsewhere."""
        return {}

    async def streams(self, *, principal: Principal = LOCAL) -> list[JSONObject]:
        """The running requests of ``principal`` (all, for an admin): ``correlation_id``, ``event_type``,
        ``handler``, ``stream_count``, ``age_s``, ``state``, ``owner``."""
        streams = await self._streams()
        if principal.admin:
            return streams
        return [info for info in streams if info.get("owner") == principal.owner]

    @abc.abstractmethod
    async def _streams(self) -> list[JSONObject]:
        """Every running request the node knows of."""


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
