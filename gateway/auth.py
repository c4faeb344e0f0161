"""Authentication hooks: who a WebSocket connection belongs to.

The gateway reads a token from the ``token`` query parameter or from a ``Sec-WebSocket-Protocol`` entry next to
``nexus.v1`` (browsers cannot set ``Authorization``), then asks an :class:`Authenticator`. It returns the user
id (or None for an anonymous connection), or refuses by raising :class:`~nexus.errors.Unauthenticated` or
:class:`~nexus.errors.PermissionDenied`: the connection then gets an ``error`` frame and is closed with 1008.
The user id is written into ``metadata.user_id`` of every event the connection publishes.

The default, :func:`allow_all`, accepts everyone as anonymous; checking tokens comes with the security work::

    async def check(credentials: Credentials) -> str | None:
        user = await my_tokens.lookup(credentials.token)
        if user is None:
            raise Unauthenticated("unknown or expired token")
        return user.id

    GatewayServer(backend, settings, authenticator=check)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from .protocol import SUBPROTOCOL


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    """What a connecting client presented."""

    token: str | None
    path: str
    remote_address: str
    headers: Mapping[str, str]
    subprotocols: Sequence[str] = ()


class Authenticator(Protocol):
    """Returns the connection's user id (None: anonymous), or raises ``Unauthenticated``/``PermissionDenied``."""

    async def __call__(self, credentials: Credentials) -> str | None: ...


async def allow_all(credentials: Credentials) -> str | None:
    """The default hook: everyone is accepted, anonymously."""
    return None


def token_from(path: str, subprotocols: Sequence[str]) -> str | None:
    """The token of a handshake: the ``token`` query parameter, else the first subprotocol besides ``nexus.v1``."""
    query = parse_qs(urlsplit(path).query)
    values = query.get("token")
    if values and values[0]:
        return values[0]
    for entry in subprotocols:
        if entry != SUBPROTOCOL and entry:
            return entry
    return None
