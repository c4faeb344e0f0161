"""The request queue interface: who handles each ``requested`` event, and the messages about requests.

A bus stores and delivers events; a :class:`RequestQueue` on top of it gives each ``requested`` event to exactly
one consumer (one provider), wherever it runs. On one process that is a turn among the local consumers
(:mod:`nexus.queue.memory`); on a NATS bus shared by several nodes it also means claims, node heartbeats, failing
the requests of a lost node with ``node_lost`` and storing one terminal event per request
(:mod:`nexus.queue.nats`).

Control messages between a queue and its consumers are frozen dataclasses: a :class:`CancelRequest` goes to every
consumer's node (the one driving the request cancels it), an :class:`AbandonRequest` tells a consumer to let a
request go silently (another node already ended it).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Final

from nexus.bus.base import DEFAULT_MAX_PENDING, Published, Subscription
from nexus.events import Event, EventType

REQUESTS_PATTERN: Final = "*:*:*:requested"
"""The pattern of every ``requested`` event."""
DEFAULT_CANCEL_REASON: Final = "cancelled by requester"


@dataclasses.dataclass(frozen=True, slots=True)
class RequestRoute:
    """A handler a consumer serves: ``service:action`` (any version) or ``service:action:vN``.

    ``ordered`` says the handler has an ``ordering_key``; a queue shared by several nodes then lets one node at a
    time take that handler's requests, so per-key order holds across nodes.
    """

    route: str
    ordered: bool = False

    @property
    def service_action(self) -> str:
        """``service:action``, the part shared by every version."""
        service, action = self.route.split(":")[:2]
        return f"{service}:{action}"

    def matches(self, event_type: str) -> bool:
        """Whether a ``requested`` event of ``event_type`` is for this handler (a pinned version or any)."""
        parsed = EventType.parse(event_type)
        return self.route in (parsed.base, f"{parsed.service}:{parsed.action}")


@dataclasses.dataclass(frozen=True, slots=True)
class CancelRequest:
    """Cancel the request ``correlation_id`` (the ``event_id`` of its ``requested`` event) wherever it runs."""

    correlation_id: str
    reason: str = DEFAULT_CANCEL_REASON
    owner: str | None = None
    """Cancel it only if this owner sent it (``metadata.owner``); None: whoever did."""


@dataclasses.dataclass(frozen=True, slots=True)
class AbandonRequest:
    """Stop the request ``correlation_id`` and publish nothing more for it: another node already ended it."""

    correlation_id: str
    reason: str


ControlMessage = CancelRequest | AbandonRequest
ControlCallback = Callable[[ControlMessage], None]
Capacity = Callable[[str], "int | None"]
"""How many requests of a handler (``service:action``) this node can run at once; None: no bound."""


class RequestQueue(abc.ABC):
    """Gives each ``requested`` event of a bus to exactly one consumer, and carries messages about requests."""

    capacity: Capacity = staticmethod(lambda service_action: None)
    """Set by the provider: a queue shared by several nodes holds no more requests of a handler at once than this
    node can run (a handler served by workers: their slots), so the other nodes take the rest."""

    async def start(self) -> None:
        """Join (after the bus has started): a queue shared by several nodes announces this one."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Leave (before the bus closes): consumers end; a shared queue tells the others this node is gone."""

    @abc.abstractmethod
    async def consume(
        self, routes: Sequence[RequestRoute] = (), *, max_pending: int = DEFAULT_MAX_PENDING
    ) -> Subscription:
        """Receive ``requested`` events stored from now on; each goes to exactly one consumer.

        ``routes`` are the handlers this consumer serves. A queue shared by several nodes gives a consumer the
        requests for its routes, and the requests no live node serves (so it can answer ``no_handler``); a
        single-process queue gives its consumers every request, in turn.
        """

    async def update_routes(self, routes: Sequence[RequestRoute]) -> None:
        """The handlers this node's consumer serves changed (workers came or went).

        A single-process queue gives its consumers every request whatever they serve, so only a shared queue needs
        to know: it takes the requests of the new routes from now on, and leaves the others to the nodes that serve
        them (or answers them ``no_handler`` when none does).
        """

    @abc.abstractmethod
    async def publish_terminal(self, event: Event) -> Published:
        """Store the terminal event of a request a consumer took; the request is then done.

        A shared queue stores at most one terminal event per request, whichever node sends it. Raises
        :class:`~nexus.errors.BusUnavailable` when it cannot be stored now (a shared queue keeps it and stores it
        once the bus is back).
        """

    @abc.abstractmethod
    async def cancel(self, message: CancelRequest) -> None:
        """Send a cancel to every consumer's node, outside the event stream (the one driving it acts)."""

    def serves(self, request_type: str) -> bool:
        """Whether a consumer on another node serves ``request_type`` (a ``...:requested`` type): what this queue
        knows of other nodes' handlers (a single-process queue knows none)."""
        return False

    @abc.abstractmethod
    def on_control(self, callback: ControlCallback) -> None:
        """Call ``callback`` with every control message for this node's consumers (soon, never inline)."""
