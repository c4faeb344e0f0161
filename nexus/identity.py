"""Who a client acts as. Pure: no I/O.

A :class:`Principal` is made by the server from what a client presented when it connected (a token, or nothing:
anonymous), never from what the client writes in an event. Every transport hands the principal of the connection
to the :class:`~nexus.node.Node` with each operation, and the node enforces the rules once for all of them:

- ``owner`` owns the requests it publishes: only it (or an admin) may cancel them, list them, or reuse their
  ``event_id``. An anonymous client owns what its connection sent.
- ``publish`` / ``subscribe`` are the patterns it may publish to and subscribe to (``None``: anything, which is
  what anonymous clients get while authentication is off). Out of scope is refused, never silently emptied.
- ``serve``: the requests it may handle as a worker (``service:action:*:requested`` must be covered).
- ``admin`` may do everything and see everything.
- With authentication on, what a user receives is filtered (:meth:`Principal.can_see`): an event naming its
  ``audience`` reaches those users, a request's lifecycle its requester, unless the handler made it public.

:data:`LOCAL` is the server's own principal (plugins, the provider, code embedding a node in its process).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Final

from nexus.events import LIFECYCLE_STATES, Event
from nexus.patterns import REST, STAR, parse_pattern

AUDIENCE: Final = "audience"
"""Metadata key: the user ids (comma-separated) who may receive the event; set by its publisher."""
PUBLIC: Final = "public"
"""Metadata key: ``true`` makes a request's lifecycle visible to every subscriber (handlers with public results)."""


def covers(outer: str, inner: str) -> bool:
    """Whether pattern ``outer`` matches every event type pattern ``inner`` can match (an event type is a pattern
    that matches only itself)."""
    a = parse_pattern(outer)
    b = parse_pattern(inner)
    for index, token in enumerate(a):
        if token == REST:
            return len(b) > index  # '>' needs at least one token left, which every longer pattern has
        if index >= len(b):
            return False
        other = b[index]
        if other == REST:
            return False  # inner matches any tail here, outer only one token
        if token != STAR and (other == STAR or other != token):
            return False
    return len(a) == len(b)


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """Who a client connection acts as (see the module docstring)."""

    connection_id: str
    user_id: str | None = None
    authenticated: bool = False
    """The user id comes from a verified token (else it is the client's own claim, or none)."""
    publish: tuple[str, ...] | None = None
    """Patterns it may publish to; None: anything."""
    subscribe: tuple[str, ...] | None = None
    """Patterns it may subscribe to; None: anything."""
    serve: tuple[str, ...] | None = None
    """Patterns of the requests it may handle as a worker; None: any."""
    admin: bool = False

    @property
    def owner(self) -> str:
        """Whose requests are whose: the user, or the connection of an anonymous client."""
        return f"user:{self.user_id}" if self.user_id else f"connection:{self.connection_id}"

    def may_publish(self, event_type: str) -> bool:
        """Whether this principal may publish ``event_type``."""
        if self.admin or self.publish is None:
            return True
        return any(covers(pattern, event_type) for pattern in self.publish)

    def may_subscribe(self, pattern: str) -> bool:
        """Whether every event ``pattern`` can match is inside this principal's subscribe patterns."""
        if self.admin or self.subscribe is None:
            return True
        return any(covers(allowed, pattern) for allowed in self.subscribe)

    def may_serve(self, service_action: str) -> bool:
        """Whether this principal may handle, as a worker, the requests of ``service:action`` (every version) or
        ``service:action:vN``."""
        if self.admin or self.serve is None:
            return True
        tokens = service_action.split(":")
        requests = ":".join([*tokens[:2], tokens[2] if len(tokens) > 2 else "*", "requested"])
        return any(covers(pattern, requests) for pattern in self.serve)

    def out_of_scope(self, patterns: Iterable[str]) -> list[str]:
        """The ``patterns`` this principal may not subscribe to."""
        return [pattern for pattern in patterns if not self.may_subscribe(pattern)]

    def owns(self, owner: str) -> bool:
        """Whether this principal acts for ``owner`` (its own, or any when admin)."""
        return self.admin or owner == self.owner

    def can_see(self, event: Event) -> bool:
        """Whether this principal may receive ``event``: an admin sees everything; an event that names its
        ``audience`` (comma-separated user ids) is seen by those users only; a request's lifecycle (every
        ``LIFECYCLE_STATES`` event carrying its ``owner``) by its owner only, unless it is marked ``public``."""
        if self.admin:
            return True
        metadata = event.metadata
        audience = metadata.get(AUDIENCE)
        if audience is not None:
            return self.user_id is not None and self.user_id in audience_of(audience)
        owner = metadata.get("owner")
        if owner is None or owner == self.owner or metadata.get(PUBLIC) == "true":
            return True
        return event.state not in LIFECYCLE_STATES

    @property
    def filters_delivery(self) -> bool:
        """Whether what this principal receives is filtered by :meth:`can_see`: for authenticated users; an admin,
        or anyone while authentication is off, receives every event it subscribes to."""
        return self.authenticated and not self.admin


def audience_of(text: str) -> frozenset[str]:
    """The user ids of an ``audience`` metadata value (comma-separated)."""
    return frozenset(part.strip() for part in text.split(",") if part.strip())


LOCAL: Final = Principal(connection_id="local", admin=True)
"""The server's own principal: the provider, plugins, and code that embeds a node in its process."""
