"""How the gateway reads credentials; who they belong to is decided in :mod:`nexus.auth`.

A WebSocket client presents its token in the ``token`` query parameter or as a ``Sec-WebSocket-Protocol`` entry
next to ``nexus.v1`` (browsers cannot set ``Authorization``); ``/sse`` and the JSON listings take the query
parameter or ``Authorization: Bearer <token>``. The gateway wraps it in :class:`~nexus.auth.Credentials` with the
connection's id and asks the :class:`~nexus.auth.Authenticator` it was given (the server's: JWT verification when
configured, else :func:`~nexus.auth.allow_all`). A refusal (``Unauthenticated`` / ``PermissionDenied``) gets a
WebSocket an ``error`` frame and close code 1008, an HTTP request a 401 / 403.

A custom authenticator is any coroutine function from credentials to a :class:`~nexus.identity.Principal`::

    async def check(credentials: Credentials) -> Principal:
        user = await my_tokens.lookup(credentials.token)
        if user is None:
            raise Unauthenticated("unknown or expired token")
        return Principal(credentials.connection_id, user.id, authenticated=True, publish=(), subscribe=())

    GatewayServer(node, settings, authenticator=check)
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit

from nexus.auth import Authenticator, Credentials, allow_all, bearer_token

from .protocol import SUBPROTOCOL

__all__ = ["Authenticator", "Credentials", "allow_all", "bearer_token", "token_from"]


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
