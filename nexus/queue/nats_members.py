"""Which Nexus nodes share a NATS bus, what each serves and which requests each holds. Pure: the clock is given.

Every node announces itself every ``interval`` seconds (a *node heartbeat* on a control subject outside the
stream): its id, when it joined, its handler routes and the requests it holds (claimed, queued or running).
A node not heard from for ``misses`` intervals is lost; the survivors then end the requests it held with
``failed``/``node_lost``. :class:`Membership` keeps that table; the NATS request queue feeds it messages and time.

Ordered handlers (with an ``ordering_key``) have one *active* node at a time. A node that takes a handler's
requests says so in its heartbeats, and stays active until it leaves or is lost; newcomers defer to it. When no
live node is active, every node picks the same one from the same announcements: the one that joined first
(ties broken by node id). So per-key order holds across nodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any, Final

from nexus.events import JSONObject, check_name_token, check_version_token
from nexus.queue.base import RequestRoute

DEFAULT_MISSES: Final = 3
MAX_CLAIMS_PER_ANNOUNCEMENT: Final = 2_000


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """A request a node took from the bus and has not ended yet."""

    correlation_id: str
    offset: int
    streaming: bool

    def as_list(self) -> list[Any]:
        return [self.correlation_id, self.offset, self.streaming]

    @classmethod
    def from_list(cls, item: Any) -> Claim | None:
        if (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and isinstance(item[1], int)
            and isinstance(item[2], bool)
        ):
            return cls(item[0], item[1], item[2])
        return None


@dataclasses.dataclass(slots=True)
class Member:
    """One node as the others see it."""

    node: str
    since: float
    """When the node joined (its own clock): the older node is active for an ordered handler."""
    routes: tuple[RequestRoute, ...] = ()
    active: frozenset[str] = frozenset()
    """The ordered ``service:action``s whose requests this node takes now."""
    claims: dict[str, Claim] = dataclasses.field(default_factory=dict)
    last_seen: float = 0.0

    def serves(self, event_type: str) -> bool:
        return any(route.matches(event_type) for route in self.routes)

    def serves_action(self, service_action: str) -> bool:
        return any(route.service_action == service_action for route in self.routes)

    def orders(self, service_action: str) -> bool:
        return any(route.ordered and route.service_action == service_action for route in self.routes)

    @property
    def rank(self) -> tuple[float, str]:
        return (self.since, self.node)


def presence_message(
    member: Member, claims: Iterable[Claim], *, leaving: bool = False, hello: bool = False
) -> tuple[JSONObject, list[JSONObject]]:
    """A node heartbeat for ``member``, and the claim announcements that did not fit in it.

    The heartbeat lists every claim when they fit (the receivers then replace what they knew); otherwise
    ``claims_total`` tells them the list is partial and the rest follows as announcements.
    """
    items = [claim.as_list() for claim in claims]
    head, rest = items[:MAX_CLAIMS_PER_ANNOUNCEMENT], items[MAX_CLAIMS_PER_ANNOUNCEMENT:]
    message: JSONObject = {
        "node": member.node,
        "since": member.since,
        "routes": [[route.route, route.ordered] for route in member.routes],
        "active": sorted(member.active),
        "claims": head,
        "claims_total": len(items),
        "leaving": leaving,
        "hello": hello,
    }
    extra = [
        {"node": member.node, "claims": rest[start : start + MAX_CLAIMS_PER_ANNOUNCEMENT]}
        for start in range(0, len(rest), MAX_CLAIMS_PER_ANNOUNCEMENT)
    ]
    return message, extra


def _claims_of(value: Any) -> list[Claim]:
    if not isinstance(value, list):
        return []
    return [claim for claim in map(Claim.from_list, value) if claim is not None]


def _valid_route(text: str) -> bool:
    tokens = text.split(":")
    if len(tokens) not in (2, 3):
        return False
    problems = [check_name_token(tokens[0], "service"), check_name_token(tokens[1], "action")]
    if len(tokens) == 3:
        problems.append(check_version_token(tokens[2]))
    return all(problem is None for problem in problems)


def _routes_of(value: Any) -> tuple[RequestRoute, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(
        RequestRoute(item[0], ordered=item[1])
        for item in value
        if isinstance(item, list)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], bool)
        and _valid_route(item[0])
    )


class Membership:
    """The live nodes of one bus, seen from node ``node``."""

    def __init__(self, node: str, *, since: float, interval: float, misses: int = DEFAULT_MISSES) -> None:
        self.node = node
        self.interval = interval
        self.misses = misses
        self.own = Member(node, since)
        self._others: dict[str, Member] = {}
        self._owner: dict[str, str] = {}

    @property
    def timeout(self) -> float:
        """Seconds of silence after which a node is lost."""
        return self.interval * self.misses

    # --- feeding ------------------------------------------------------------------------------------------

    def observe(self, message: JSONObject, now: float) -> Member | None:
        """Take in a node heartbeat; returns the member when it announced that it is leaving."""
        node = message.get("node")
        since = message.get("since")
        if not isinstance(node, str) or node == self.node or not isinstance(since, (int, float)):
            return None
        member = self._others.get(node)
        if member is None or member.since != since:
            if member is not None:
                self._drop_claims(member)
            member = Member(node, float(since))
            self._others[node] = member
        member.routes = _routes_of(message.get("routes"))
        active = message.get("active")
        member.active = frozenset(a for a in active if isinstance(a, str)) if isinstance(active, list) else frozenset()
        member.last_seen = now
        claims = _claims_of(message.get("claims"))
        total = message.get("claims_total")
        if isinstance(total, int) and total <= len(claims):
            self._drop_claims(member)
        self._add(member, claims)
        if message.get("leaving") is True:
            return self._remove(node)
        return None

    def add_claims(self, message: JSONObject, now: float) -> None:
        """Take in a claim announcement (a node took requests since its last heartbeat)."""
        node = message.get("node")
        if not isinstance(node, str) or node == self.node:
            return
        member = self._others.get(node)
        if member is None:
            return  # its next heartbeat lists them
        self._add(member, _claims_of(message.get("claims")))

    def _add(self, member: Member, claims: Iterable[Claim]) -> None:
        for claim in claims:
            member.claims[claim.correlation_id] = claim
            self._owner[claim.correlation_id] = member.node

    def _drop_claims(self, member: Member) -> None:
        for correlation_id in member.claims:
            if self._owner.get(correlation_id) == member.node:
                del self._owner[correlation_id]
        member.claims.clear()

    def ended(self, correlation_id: str) -> None:
        """A request's terminal event was stored: no node holds it any more."""
        node = self._owner.pop(correlation_id, None)
        if node is not None:
            member = self._others.get(node)
            if member is not None:
                member.claims.pop(correlation_id, None)

    def holder(self, correlation_id: str) -> str | None:
        """The other node holding a request, if any is known."""
        return self._owner.get(correlation_id)

    def _remove(self, node: str) -> Member | None:
        member = self._others.pop(node, None)
        if member is not None:
            for correlation_id in member.claims:
                if self._owner.get(correlation_id) == node:
                    del self._owner[correlation_id]
        return member

    def expire(self, now: float) -> list[Member]:
        """Remove and return the nodes not heard from for :attr:`timeout` seconds."""
        lost = [member for member in self._others.values() if now - member.last_seen > self.timeout]
        return [member for member in (self._remove(m.node) for m in lost) if member is not None]

    def forget_silence(self, now: float) -> None:
        """Count every node as just heard from (this node itself could not listen for a while)."""
        for member in self._others.values():
            member.last_seen = now

    # --- questions ----------------------------------------------------------------------------------------

    def members(self) -> Iterator[Member]:
        """Every live node, this one included."""
        yield self.own
        yield from self._others.values()

    @property
    def others(self) -> list[Member]:
        return list(self._others.values())

    def serves(self, event_type: str) -> bool:
        """Whether a live node has a handler for a ``requested`` event of ``event_type``."""
        return any(member.serves(event_type) for member in self.members())

    def serves_action(self, service_action: str) -> bool:
        """Whether a live node has a handler for some version of ``service:action``."""
        return any(member.serves_action(service_action) for member in self.members())

    def exclusive(self, service_action: str) -> bool:
        """Whether some live node declares ``service:action`` ordered (one active node at a time)."""
        return any(member.orders(service_action) for member in self.members())

    def active(self, service_action: str) -> str | None:
        """The node that takes ordered ``service:action``'s requests: the one already doing so (the oldest, if
        several say they are), else the oldest live node serving it."""
        serving = [member for member in self.members() if member.serves_action(service_action)]
        claimants = [member for member in serving if service_action in member.active]
        candidates = claimants or serving
        if not candidates:
            return None
        return min(candidates, key=lambda member: member.rank).node
