"""The WebSocket gateway server: ``ws://HOST:PORT/ws``, Server-Sent Events at ``/sse`` and the operator page at
``/`` on the same port.

Built on ``websockets.asyncio.server``. HTTP requests that are not a WebSocket upgrade of ``/ws`` are answered
by ``process_request``: the page (``/``), its static files (``/static/...``, with their Content-Type), a health
check (``/healthz``), small JSON listings the page reads (``/api/streams``, ``/api/handlers``, ``/api/head``),
the AsyncAPI document of the gateway and its handlers' events (``/asyncapi.json``) and the Server-Sent Events
stream ``/sse``, which takes its connection over from websockets (``gateway/sse.py``).

Before any of them, ``/ws``, ``/sse``, the listings and ``/asyncapi.json`` check the request's ``Origin``
(``nexus.origins``): a page of another site gets ``403`` (cross-site WebSocket hijacking). With
``GatewaySettings.ssl_context`` the port speaks TLS only (``wss://``, ``https://``); the SSE hand-off works on the
TLS transport the same way.

::

    gateway = GatewayServer(server.node, GatewaySettings(port=0))
    await gateway.start()        # gateway.port is the bound port
    ...
    await gateway.stop()         # writes what is queued, then closes every socket with 1001
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import http
import json
import socket
import ssl
import uuid
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final
from urllib.parse import urlsplit

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from nexus.config import Settings
from nexus.errors import ConfigurationError, NexusError, Unauthenticated
from nexus.events import DEFAULT_LIMITS, DEFAULT_MAX_PAYLOAD_BYTES, Event, EventLimits, JSONObject, shorten
from nexus.identity import LOCAL, Principal
from nexus.logs import LogLimiter
from nexus.node import Node
from nexus.origins import DEFAULT_ALLOWED_ORIGINS, OriginPolicy
from nexus.quota import DEFAULT_CLIENT_LIMITS, ClientLimits
from nexus.telemetry import PROMETHEUS_CONTENT_TYPE

from .asyncapi import asyncapi_document
from .auth import Authenticator, Credentials, allow_all, bearer_token, token_from
from .connection import ConnectionLimits, GatewayConnection, GatewayStats
from .protocol import SUBPROTOCOL, EventFrameCache, ProtocolError, close_reason, encode_protocol_error, error_spec
from .sse import SSE_PATH, SseEndpoint, SseLimits, handoff_connection

WS_PATH: Final = "/ws"
ASYNCAPI_PATH: Final = "/asyncapi.json"
LISTINGS: Final = ("/api/streams", "/api/handlers", "/api/head")
"""The JSON listings the page reads (origin-checked, and authenticated like ``/sse``)."""
DEFAULT_MAX_FRAME_BYTES: Final = 1024 * 1024

CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

log = structlog.get_logger("nexus.gateway")


@dataclasses.dataclass(frozen=True, slots=True)
class GatewaySettings:
    """How the gateway listens and how much it holds per connection."""

    host: str = "127.0.0.1"
    port: int = 8080
    """0 picks a free port (``GatewayServer.port`` tells which)."""
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    """Largest frame a client may send; a larger one closes the connection with 1009."""
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    queue_frames: int = 10_000
    """Frames queued for one connection before it is closed with 4008 (too slow)."""
    queue_bytes: int = 16 * 1024 * 1024
    """Bytes queued for one connection before it is closed with 4008."""
    write_limit: int = 64 * 1024
    """Bytes in a socket's write buffer above which its writer waits for it to drain."""
    send_buffer_bytes: int | None = None
    """The kernel send buffer of each connection (SO_SNDBUF); None leaves the system's autotuning, which lets
    a stalled client hold a few MiB of kernel memory before its outgoing queue starts to fill."""
    subscriber_queue: int = 10_000
    event_limits: EventLimits = DEFAULT_LIMITS
    """What one published event may hold (size, depth, metadata entries)."""
    client_limits: ClientLimits = DEFAULT_CLIENT_LIMITS
    """What one connection may hold and do: patterns, running requests, publishes per second."""
    max_frames_per_s: float = 2_000.0
    """Frames per second one connection may send on average (bursts of as many); faster ones are paced."""
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    close_timeout: float = 10.0
    shutdown_grace_s: float = 5.0
    open_timeout: float | None = 10.0
    """Seconds a connection may take to send its HTTP request and finish the WebSocket handshake."""
    sse_keepalive_s: float = 15.0
    """Seconds of silence after which an ``/sse`` response writes a keep-alive comment."""
    sse_retry_ms: int = 2_000
    """The ``retry`` hint of ``/sse`` responses: how long ``EventSource`` waits before it reconnects."""
    allowed_origins: tuple[str, ...] = DEFAULT_ALLOWED_ORIGINS
    """Origins whose pages may use the gateway besides its own (``nexus.origins``); ``*`` allows any."""
    ssl_context: ssl.SSLContext | None = None
    """Serve ``wss://`` and ``https://`` only (None: plain ``ws://`` and ``http://``)."""
    metrics_admin_only: bool = False
    """``/metrics`` and ``/api/metrics`` need an admin token (authentication on and ``metrics_public`` off)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewaySettings:
        """The gateway part of the server's settings (``nexus serve`` and ``nexus gateway`` alike); loads the TLS
        certificate and key when set (:class:`ConfigurationError` if they cannot be used)."""
        tls = settings.server_tls()
        return cls(
            host=settings.host,
            port=settings.ws_port,
            max_frame_bytes=settings.ws_max_frame_bytes,
            max_payload_bytes=settings.max_payload_bytes,
            subscriber_queue=settings.subscriber_queue,
            event_limits=settings.event_limits(),
            client_limits=settings.client_limits(),
            max_frames_per_s=settings.ws_max_frames_per_s,
            shutdown_grace_s=settings.shutdown_grace_s,
            sse_keepalive_s=settings.sse_keepalive_s,
            sse_retry_ms=settings.sse_retry_ms,
            allowed_origins=tuple(settings.ws_allowed_origins),
            ssl_context=tls.ssl_context() if tls is not None else None,
            metrics_admin_only=settings.auth_enabled and not settings.metrics_public,
        )


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The page and its assets, read once: name -> (body, Content-Type)."""
    files: dict[str, tuple[bytes, str]] = {}
    root = resources.files(__package__ or "nexus.gateway").joinpath("static")
    for entry in root.iterdir():
        if not entry.is_file():
            continue
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        content_type = CONTENT_TYPES.get(suffix)
        if content_type is not None:
            files[entry.name] = (entry.read_bytes(), content_type)
    return files


def _response(status: http.HTTPStatus, body: bytes, content_type: str, **extra: str) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-cache"
    headers["X-Content-Type-Options"] = "nosniff"
    for name, value in extra.items():
        headers[name.replace("_", "-")] = value
    return Response(status.value, status.phrase, headers, body)


def _json_response(data: Any, status: http.HTTPStatus = http.HTTPStatus.OK) -> Response:
    body = json.dumps(data, separators=(",", ":"), allow_nan=False, default=str).encode()
    return _response(status, body, "application/json")


def _text_response(status: http.HTTPStatus, text: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8")


def _address(connection: ServerConnection) -> str:
    remote = connection.remote_address
    return f"{remote[0]}:{remote[1]}" if isinstance(remote, tuple) and len(remote) >= 2 else ""


def listing_principal(principal: Principal) -> Principal:
    """Whose streams ``/api/streams`` shows a caller: its own (an admin's: all). An anonymous caller that may
    subscribe to everything (authentication off) is shown every stream: it could follow each one's lifecycle
    with a ``>`` subscription anyway, and the listing is the operator page's."""
    if not principal.authenticated and principal.subscribe is None:
        return LOCAL
    return principal


def _count_by_handler(streams: Sequence[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for stream in streams:
        handler = str(stream.get("handler", ""))
        counts[handler] = counts.get(handler, 0) + 1
    return counts


def client_host(host: str) -> str:
    """The address a client on this machine reaches a server bound to ``host`` at (``127.0.0.1`` for every
    interface; an IPv6 address in brackets), for URLs."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def select_subprotocol(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Select ``nexus.v1`` when offered (Chromium aborts a handshake whose offer is not answered); a client that
    offers subprotocols without it is refused; one that offers none proceeds without."""
    if SUBPROTOCOL in offered:
        return Subprotocol(SUBPROTOCOL)
    if offered:
        raise NegotiationError(f"offer the {SUBPROTOCOL} subprotocol (a token may follow it)")
    return None


class GatewayServer:
    """Serves the WebSocket protocol (README, "The WebSocket gateway and the live page") and the operator page."""

    def __init__(
        self,
        node: Node,
        settings: GatewaySettings | None = None,
        *,
        authenticator: Authenticator = allow_all,
    ) -> None:
        self.node = node
        self.settings = settings or GatewaySettings()
        self.authenticator = authenticator
        self.stats = GatewayStats()
        self.bad_input = LogLimiter()
        """Rate-limits the warnings about bad client frames and events that cannot be sent."""
        self.frames = EventFrameCache(on_skip=self._event_skipped)
        self.origins = OriginPolicy(self.settings.allowed_origins, scheme="https" if self.tls else "http")
        self.refusals = LogLimiter()
        """Rate-limits the warnings about refused origins."""
        self.connections: dict[str, GatewayConnection] = {}
        self.port = 0
        self._server: Server | None = None
        self._static = _static_files()
        self._stopping = False
        s = self.settings
        self._limits = ConnectionLimits(
            queue_frames=s.queue_frames,
            queue_bytes=s.queue_bytes,
            write_limit=s.write_limit,
            max_payload_bytes=s.max_payload_bytes,
            subscriber_queue=s.subscriber_queue,
            max_frames_per_s=s.max_frames_per_s,
            event_limits=s.event_limits,
            client_limits=s.client_limits,
        )
        sse_limits = SseLimits(
            s.subscriber_queue, s.write_limit, s.send_buffer_bytes, s.sse_keepalive_s, s.sse_retry_ms, s.close_timeout
        )
        self.sse = SseEndpoint(node, self.frames, sse_limits, authorize=self._authorize_http, stats=self.stats)

    @property
    def tls(self) -> bool:
        """Whether the gateway serves ``wss://`` and ``https://``."""
        return self.settings.ssl_context is not None

    @property
    def url(self) -> str:
        """``ws://host:port/ws`` (``wss://`` with TLS) clients connect to."""
        return f"{'wss' if self.tls else 'ws'}://{self._client_host}:{self.port}{WS_PATH}"

    @property
    def http_url(self) -> str:
        """``http://host:port/`` (``https://`` with TLS), the page."""
        return f"{'https' if self.tls else 'http'}://{self._client_host}:{self.port}/"

    @property
    def _client_host(self) -> str:
        return client_host(self.settings.host)

    async def start(self) -> None:
        """Bind and serve; ``port`` is the bound port.

        A port that cannot be bound (already in use, say) raises :class:`~nexus.errors.ConfigurationError` naming
        it and ``--ws-port``.
        """
        s = self.settings
        try:
            self._server = await self._serve()
        except OSError as exc:
            bind = f"{s.host}:{s.port}"
            reason = (
                "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror or exc})"
            )
            raise ConfigurationError(f"the WebSocket port {bind} {reason}; choose another with --ws-port") from None
        sockets = self._server.sockets
        self.port = int(sockets[0].getsockname()[1]) if sockets else s.port
        log.info("gateway_started", url=self.url, page=self.http_url, **self.node.describe())

    async def _serve(self) -> Server:
        s = self.settings
        return await serve(
            self._handle,
            s.host,
            s.port,
            ssl=s.ssl_context,
            process_request=self._process_request,
            select_subprotocol=select_subprotocol,
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            # Per-message compression would compress every frame once per connection, undoing the single
            # encoding of each event; frames go out as they are.
            compression=None,
            max_size=s.max_frame_bytes,
            write_limit=s.write_limit,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            close_timeout=s.close_timeout,
            server_header=None,
            # /sse responses stream from process_request: the handshake timeout is applied by the connection
            # class, which lifts it for them (see gateway/sse.py).
            open_timeout=None,
            create_connection=handoff_connection(s.open_timeout),
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting; write what each connection still has to get (bounded by ``grace``), close every
        socket with 1001 (going away), and wait until every connection's tasks have ended."""
        if self._stopping or self._server is None:
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_s if grace is None else grace
        server = self._server
        server.close(close_connections=False)
        spec = error_spec("going_away")
        code = spec.close_code or 1001
        await asyncio.gather(
            *(c.finish(code, "server shutting down", grace) for c in list(self.connections.values())),
            self.sse.close(),
            return_exceptions=True,
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace + self.settings.close_timeout):
                await server.wait_closed()
        log.info("gateway_stopped", **dataclasses.asdict(self.stats))

    def _event_skipped(self, event: Event, error: Exception) -> None:
        """An event no connection can be sent (each event once, however many connections it was for)."""
        self.stats.events_skipped += 1
        self.bad_input.warning(
            log,
            "gateway_event_skipped",
            offset=event.offset,
            event_type=shorten(event.event_type),
            event_id=shorten(event.event_id),
            error=f"{type(error).__name__}: {shorten(str(error))}",
        )

    # --- HTTP -------------------------------------------------------------------------------------------------

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in (WS_PATH, SSE_PATH, ASYNCAPI_PATH, *LISTINGS, "/api/metrics"):
            refused = self._check_origin(connection, request, path)
            if refused is not None:
                return refused
        if path == WS_PATH:
            if self._stopping:
                return _text_response(http.HTTPStatus.SERVICE_UNAVAILABLE, "the gateway is shutting down\n")
            return None  # the WebSocket handshake goes on
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return _text_response(http.HTTPStatus.NOT_FOUND, f"WebSocket connections go to {WS_PATH}\n")
        if path == SSE_PATH:
            return await self.sse.handle(connection, request)
        if path in ("/", "/index.html"):
            return self._static_response("index.html")
        if path.startswith("/static/"):
            return self._static_response(path.removeprefix("/static/"))
        if path == "/healthz":
            if self.node.healthy and not self._stopping:
                return _text_response(http.HTTPStatus.OK, "ok\n")
            return _text_response(http.HTTPStatus.SERVICE_UNAVAILABLE, "unavailable\n")
        if path == "/readyz":
            if self.node.ready and not self._stopping:
                return _text_response(http.HTTPStatus.OK, "ready\n")
            return _text_response(http.HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")
        if path in ("/metrics", "/api/metrics"):
            return await self._metrics(connection, request, path)
        if path in LISTINGS or path == ASYNCAPI_PATH:
            principal = await self._authorize_http(connection, request)
            if isinstance(principal, Response):
                return principal
            if path == ASYNCAPI_PATH:
                return self._asyncapi(request)
            if path == "/api/handlers":
                return await self._api(self._handlers)
            if path == "/api/head":
                return await self._api(self._head)
            return await self._api(lambda: self.node.streams(principal=listing_principal(principal)))
        return _text_response(http.HTTPStatus.NOT_FOUND, "not found\n")

    async def _handlers(self) -> list[JSONObject]:
        """``/api/handlers``: the node's handlers; each whose class runs here and declares the request it takes
        gets ``takes``: ``{"event_type", "example"}`` (the page fills its request form with it)."""
        handlers = await self.node.handlers()
        classes = self.node.handler_classes()
        for info in handlers:
            cls = classes.get(str(info.get("name")))
            if cls is not None and cls.takes is not None:
                info["takes"] = {"event_type": cls.takes.event_type, "example": dict(cls.takes.example)}
        return handlers

    async def _head(self) -> JSONObject:
        """``/api/head``: where the history stands, so a page can replay its last events (``since_offset``)."""
        return {"epoch": self.node.epoch, "head_offset": await self.node.head_offset()}

    def _asyncapi(self, request: Request) -> Response:
        """``/asyncapi.json``: the AsyncAPI document of this gateway and the handlers of its node, for the host the
        request was sent to."""
        host = request.headers.get("Host") or f"{self._client_host}:{self.port}"
        document = asyncapi_document(self.node.handler_classes().values(), host=host, tls=self.tls)
        return _json_response(document)

    async def _metrics(self, connection: ServerConnection, request: Request, path: str) -> Response:
        """``/metrics`` (Prometheus text) or ``/api/metrics`` (the page's handlers view); admins only when
        ``metrics_admin_only``."""
        if self.settings.metrics_admin_only:
            principal = await self._authorize_http(connection, request)
            if isinstance(principal, Response):
                return principal
            if not principal.admin:
                return _json_response(
                    {"error": "permission_denied", "message": "metrics need an admin token"}, http.HTTPStatus.FORBIDDEN
                )
        telemetry = self.node.telemetry
        if not telemetry.enabled:
            return _text_response(http.HTTPStatus.NOT_FOUND, "metrics are off (settings: metrics = false)\n")
        if path == "/metrics":
            return _response(http.HTTPStatus.OK, telemetry.prometheus_text(), PROMETHEUS_CONTENT_TYPE)
        return _json_response(
            {
                "handlers": telemetry.handler_snapshot(),
                "streams_by_handler": _count_by_handler(await self.node.streams(principal=LOCAL)),
                "slow_consumer_disconnects": self.stats.too_slow,
            }
        )

    def _check_origin(self, connection: ServerConnection, request: Request, path: str) -> Response | None:
        """A 403 for a page on an origin that may not use the gateway (cross-site WebSocket hijacking), before
        the upgrade, the stream or the listing; None to go on."""
        origins = request.headers.get_all("Origin")
        reason = self.origins.refusal(origins, request.headers.get("Host"))
        if reason is None:
            return None
        self.stats.origin_refused += 1
        self.refusals.warning(
            log,
            "gateway_origin_refused",
            origin=shorten(", ".join(origins)),
            path=path,
            remote=_address(connection),
            reason=reason,
        )
        return _text_response(http.HTTPStatus.FORBIDDEN, f"forbidden: {reason}\n")

    async def _authorize_http(self, connection: ServerConnection, request: Request) -> Principal | Response:
        """Who an HTTP request (``/sse``, the listings) acts as, through the same authenticator as WebSockets (token:
        ``?token=`` or ``Authorization: Bearer``); or the 401 / 403 response refusing it."""
        token = token_from(request.path, ())
        if token is None:
            token = bearer_token(request.headers.get("Authorization"))
        credentials = Credentials(
            token,
            connection_id=f"http-{uuid.uuid4().hex[:16]}",
            path=request.path,
            remote_address=_address(connection),
            headers=dict(request.headers.raw_items()),
        )
        try:
            return await self.authenticator(credentials)
        except NexusError as exc:
            error = exc
        except Exception as exc:
            log.exception("gateway_authenticator_failed", error=repr(exc))
            error = Unauthenticated("the credentials could not be checked")
        denied = error.code.value == "permission_denied"
        status = http.HTTPStatus.FORBIDDEN if denied else http.HTTPStatus.UNAUTHORIZED
        response = _json_response({"error": error.code.value, "message": error.message}, status)
        if not denied:
            response.headers["WWW-Authenticate"] = 'Bearer realm="nexus"'
        return response

    def _static_response(self, name: str) -> Response:
        entry = self._static.get(name)
        if entry is None:
            return _text_response(http.HTTPStatus.NOT_FOUND, "not found\n")
        body, content_type = entry
        extra = {"Content_Security_Policy": CONTENT_SECURITY_POLICY} if content_type.startswith("text/html") else {}
        return _response(http.HTTPStatus.OK, body, content_type, **extra)

    async def _api(self, fetch: Any) -> Response:
        try:
            data = await fetch()
        except NexusError as exc:
            return _json_response({"error": exc.code.value, "message": exc.message}, http.HTTPStatus.BAD_GATEWAY)
        return _json_response(data)

    # --- WebSocket ---------------------------------------------------------------------------------------------

    async def _authenticate(self, ws: ServerConnection, connection_id: str) -> Principal | None:
        request = ws.request
        assert request is not None
        offered = [
            entry.strip()
            for header in request.headers.get_all("Sec-WebSocket-Protocol")
            for entry in header.split(",")
            if entry.strip()
        ]
        credentials = Credentials(
            token=token_from(request.path, offered),
            connection_id=connection_id,
            path=request.path,
            remote_address=_address(ws),
            headers=dict(request.headers.raw_items()),
            subprotocols=tuple(offered),
        )
        try:
            return await self.authenticator(credentials)
        except NexusError as exc:
            error = ProtocolError.from_error(exc)
        except Exception as exc:
            log.exception("gateway_authenticator_failed", error=repr(exc))
            error = ProtocolError("unauthenticated", "the credentials could not be checked")
        if not error.spec.fatal:
            error = ProtocolError("unauthenticated", error.message)
        self.stats.auth_refused += 1
        log.info("gateway_auth_refused", code=error.code, remote=credentials.remote_address)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(encode_protocol_error(error), text=True)
            await ws.close(error.spec.close_code or 1008, close_reason(error.message))
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        if self.settings.send_buffer_bytes is not None:
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.send_buffer_bytes)
        connection_id = uuid.uuid4().hex[:16]
        principal = await self._authenticate(ws, connection_id)
        if principal is None:
            return
        connection = GatewayConnection(
            ws,
            self.node,
            principal=principal,
            limits=self._limits,
            frames=self.frames,
            stats=self.stats,
            warnings=self.bad_input,
        )
        self.connections[connection_id] = connection
        self.stats.connections += 1
        self.stats.connections_total += 1
        log.debug("gateway_connected", connection_id=connection_id, user_id=principal.user_id)
        forget_handshake(ws)
        try:
            await connection.run()
        finally:
            del self.connections[connection_id]
            self.stats.connections -= 1
            log.debug(
                "gateway_disconnected",
                connection_id=connection_id,
                close=connection.closing,
                last_offset=connection.last_offset,
            )


def forget_handshake(ws: ServerConnection) -> None:
    """Drop what the opening handshake left on ``ws`` once the gateway has read it (the request's headers were
    authenticated, the response was sent): websockets keeps both for the connection's lifetime, about 2 KB of
    header objects per connection. The request keeps its path."""
    request = ws.request
    if request is not None:
        ws.request = Request(request.path, Headers())
    ws.response = None
