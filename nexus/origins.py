"""Which web pages may use the gateway: the ``Origin`` check against cross-site WebSocket hijacking.

A browser lets any page open a WebSocket to any address and sends the cookies and network position of the person
browsing; the only thing telling the server which site's script is talking is the ``Origin`` header. The gateway
checks it on the WebSocket handshake, on ``/sse`` and on the JSON listings, before anything else:

- **no ``Origin``**: allowed. Browsers always send it on WebSocket handshakes and cross-origin requests; programs
  (the ``websockets`` client, ``curl``) do not, and they are not acting for a visitor.
- **the gateway's own origin**: allowed (its page). That is ``scheme://<Host header>``, the address as the client
  reached the gateway, ``https`` when it serves TLS.
- **an allowed origin**: an entry of ``ws_allowed_origins``: ``https://app.example.com`` (one origin; the port
  defaults by scheme), ``http://localhost:*`` (any port) or ``*`` (any origin at all, ``null`` included: the
  check is off). By default the localhost origins, :data:`DEFAULT_ALLOWED_ORIGINS`.
- **anything else** (another site, ``Origin: null`` from sandboxed frames and ``file://`` pages, an Origin that
  does not parse, two Origin headers): refused with ``403 Forbidden``.

:class:`OriginPolicy` does no I/O; the gateway feeds it the request's headers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Final
from urllib.parse import urlsplit

ANY_ORIGIN: Final = "*"
ANY_PORT: Final = "*"
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
DEFAULT_ALLOWED_ORIGINS: Final = tuple(
    f"{scheme}://{host}:{ANY_PORT}" for scheme in ("http", "https") for host in ("localhost", "127.0.0.1", "[::1]")
)
"""Pages served from this machine, on any port."""


@dataclasses.dataclass(frozen=True, slots=True)
class Origin:
    """A web origin: scheme, host (lowercase; an IPv6 address without brackets) and port (None: any)."""

    scheme: str
    host: str
    port: int | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{ANY_PORT if self.port is None else self.port}"


def parse_origin(text: str, *, any_port: bool = False) -> Origin:
    """``scheme://host[:port]`` (http or https, no path, query or user) as an :class:`Origin`; ``any_port``
    also takes ``:*``. Raises ``ValueError`` naming what is wrong."""
    text = text.strip()
    wildcard = any_port and text.endswith(":" + ANY_PORT)
    try:
        url = urlsplit(text.removesuffix(":" + ANY_PORT) if wildcard else text)
        port = url.port
    except ValueError:
        raise ValueError(f"{text!r} is not an origin (bad host or port)") from None
    scheme = url.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"{text!r} is not an origin: it must start with http:// or https://")
    if not url.hostname or url.username is not None or url.password is not None:
        raise ValueError(f"{text!r} is not an origin: it names no host, or a user")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError(f"{text!r} is not an origin: an origin has no path, query or fragment")
    if wildcard:
        if port is not None:
            raise ValueError(f"{text!r} is not an origin (two ports)")
        return Origin(scheme, url.hostname, None)
    return Origin(scheme, url.hostname, DEFAULT_PORTS[scheme] if port is None else port)


def check_allowed_origin(entry: str) -> None:
    """Raise ``ValueError`` unless ``entry`` can stand in ``ws_allowed_origins``."""
    if entry.strip() != ANY_ORIGIN:
        parse_origin(entry, any_port=True)


class OriginPolicy:
    """Decides whether a request's ``Origin`` may use the gateway (see the module's docstring)."""

    def __init__(self, allowed: Iterable[str] = DEFAULT_ALLOWED_ORIGINS, *, scheme: str = "http") -> None:
        entries = [entry.strip() for entry in allowed if entry.strip()]
        self.any = ANY_ORIGIN in entries
        self.allowed = frozenset(parse_origin(entry, any_port=True) for entry in entries if entry != ANY_ORIGIN)
        self.scheme = scheme
        """The gateway's own scheme: ``https`` when it serves TLS."""

    def refusal(self, origins: Sequence[str], host: str | None) -> str | None:
        """None when a request with these ``Origin`` header values (and this ``Host``) may go on, else why not."""
        if not origins:
            return None  # not a browser
        if self.any:
            return None
        if len(origins) > 1:
            return "more than one Origin header"
        text = origins[0].strip()
        if text.lower() == "null":
            return "an opaque origin (null) may not use this gateway"
        try:
            origin = parse_origin(text)
        except ValueError:
            return "the Origin header does not parse"
        if origin in self.allowed or dataclasses.replace(origin, port=None) in self.allowed:
            return None
        if host and origin == self._own(host):
            return None
        return "this origin is not allowed (ws_allowed_origins)"

    def _own(self, host: str) -> Origin | None:
        try:
            return parse_origin(f"{self.scheme}://{host.strip()}")
        except ValueError:
            return None
