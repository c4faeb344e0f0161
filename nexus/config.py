"""Server settings, from four sources: flags > environment > config file > defaults.

- **Flags**: the ``overrides`` mapping the CLI builds, keyed by field name; ``None`` means "not given".
- **Environment**: ``NEXUS_<FIELD>`` (``NEXUS_GRPC_PORT=50052``); lists are comma-separated
  (``NEXUS_HANDLERS=pkg.a:A,pkg.b:B``), booleans ``true/false``, ``1/0``, ``yes/no`` or ``on/off``,
  ``NEXUS_HANDLER_CONFIG`` a JSON object of sections. An empty variable counts as unset.
- **Config file** (TOML), named by the ``config_path`` argument or ``NEXUS_CONFIG``::

      [nexus]
      grpc_port = 50051
      bus = "nats://127.0.0.1:4222"
      stream_timeout = "none"          # or 0: no timeout
      handlers = ["pkg.module:Class"]

      [handlers.countdown]             # ctx.config of the handler registered as "countdown"
      max_n = 100

``[handlers.<name>]`` sections merge key by key across sources. Every value is checked where it is read; a
bad one raises :class:`ConfigError` naming the field and its source.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from nexus.auth import (
    DEFAULT_LEEWAY_S,
    MIN_SECRET_BYTES,
    Authenticator,
    JwtAuthenticator,
    JwtSettings,
    allow_all,
    load_public_keys,
)
from nexus.bus.base import DEFAULT_MAX_PENDING
from nexus.bus.memory import DEFAULT_DEDUPE_WINDOW_S, DEFAULT_HISTORY_MAX_BYTES, DEFAULT_HISTORY_SIZE
from nexus.bus.nats_codec import DEFAULT_STREAM as DEFAULT_NATS_STREAM
from nexus.bus.nats_codec import DEFAULT_SUBJECT_PREFIX as DEFAULT_NATS_SUBJECT_PREFIX
from nexus.bus.nats_codec import check_stream_name, check_subject_prefix
from nexus.bus.nats_settings import DEFAULT_ACK_TIMEOUT_S, DEFAULT_PUBLISH_WINDOW, NatsBusSettings
from nexus.datadir import default_data_dir
from nexus.detect import DEFAULT_RULES, Rule
from nexus.errors import ConfigurationError, HandlerConfigError, InvalidArgument
from nexus.events import (
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_MAX_METADATA_ENTRIES,
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_MAX_PAYLOAD_DEPTH,
    EventLimits,
)
from nexus.kv.base import DEFAULT_KV_MAX_KEYS, DEFAULT_KV_MAX_VALUE_BYTES, KVLimits
from nexus.logs import LOG_FORMATS, LOG_LEVELS
from nexus.node import DEFAULT_MAX_PATTERNS_PER_SUBSCRIPTION
from nexus.origins import DEFAULT_ALLOWED_ORIGINS, check_allowed_origin
from nexus.plugins import split_spec
from nexus.provider import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_STREAM_TIMEOUT,
    ProviderSettings,
    check_service_action,
)
from nexus.quota import (
    DEFAULT_MAX_PATTERNS_PER_CONNECTION,
    DEFAULT_MAX_REQUESTS_PER_CONNECTION,
    DEFAULT_MAX_SUBSCRIPTIONS_PER_CONNECTION,
    DEFAULT_PUBLISH_BURST,
    DEFAULT_PUBLISH_RATE_PER_S,
    ClientLimits,
)
from nexus.tls import ServerTls, load_server_tls
from nexus.workers import (
    DEFAULT_LOCAL_IN_FLIGHT,
    DEFAULT_MAX_WORKERS,
    DEFAULT_WORKER_GRACE,
    DEFAULT_WORKER_PING_INTERVAL,
    DEFAULT_WORKER_TIMEOUT,
)

ENV_PREFIX: Final = "NEXUS_"
LOOPS: Final = ("auto", "asyncio", "uvloop")
"""The event loops ``nexus serve`` can run on (:attr:`Settings.loop`)."""
CONFIG_ENV: Final = "NEXUS_CONFIG"
FILE_SECTION: Final = "nexus"
HANDLERS_SECTION: Final = "handlers"
BUS_SCHEMES: Final = ("nats", "tls")
PLUGIN_DEFAULT_FIELDS: Final = ("log_dir",)
"""Settings handed to every plugin as a default ``ctx.config`` key of the same name."""


class ConfigError(ConfigurationError):
    """A setting that cannot be used; ``field`` and ``source`` say which one and where it came from."""

    def __init__(self, problem: str, *, field: str | None = None, source: str) -> None:
        message = f"{field} (from {source}): {problem}" if field else f"{source}: {problem}"
        super().__init__(message)
        self.problem = problem
        self.field = field
        self.source = source


@dataclasses.dataclass(slots=True)
class Settings:
    """Everything ``nexus serve`` can be told; the defaults run a single node with no dependencies."""

    host: str = "127.0.0.1"
    grpc_port: int = 50051
    ws_port: int = 8080
    gateway: bool = True
    loop: str = "auto"
    """The event loop ``nexus serve`` runs on: ``uvloop`` (the ``nexus-bus[uvloop]`` extra; an error when it is
    not installed), ``asyncio`` (the standard loop), or ``auto``: uvloop when it is installed."""
    tracing: bool = True
    """Record OpenTelemetry spans (:mod:`nexus.tracing`); exported over OTLP when ``OTEL_EXPORTER_OTLP_*`` is set."""
    ws_max_frame_bytes: int = 1024 * 1024
    ws_max_frames_per_s: float = 2_000.0
    """Frames per second one WebSocket connection may send on average (bursts of as many); reading a faster one
    is paused, so TCP pushes back on it."""
    """Largest WebSocket frame a client may send; a larger one closes the connection with 1009."""
    ws_allowed_origins: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_ALLOWED_ORIGINS))
    """Web origins whose pages may use the gateway (WebSocket, ``/sse``, the listings) besides its own:
    ``https://app.example.com``, ``http://localhost:*`` (any port), or ``*`` (any page at all). Requests without
    an ``Origin`` (programs, not browsers) are always allowed; ``Origin: null`` only with ``*``."""
    tls_cert_file: str | None = None
    """PEM certificate (chain) served by gRPC and the gateway; with ``tls_key_file``, both speak TLS only."""
    tls_key_file: str | None = None
    """PEM private key of ``tls_cert_file`` (unencrypted)."""
    jwt_secret: str | None = dataclasses.field(default=None, repr=False)
    """HS256 shared secret (32 bytes or more): authentication is on, every client needs a token signed with it."""
    jwt_public_key_file: str | None = None
    """A PEM public key (RS256 / ES256) or a JWKS JSON file (keys picked by ``kid``): authentication is on."""
    jwt_audience: str | None = None
    """When set, a token's ``aud`` must name it (and a token with an ``aud`` is refused when it is not set)."""
    jwt_issuer: str | None = None
    """When set, a token's ``iss`` must be it."""
    jwt_leeway_s: float = DEFAULT_LEEWAY_S
    """Seconds of clock difference forgiven when checking a token's ``exp`` and ``nbf``."""
    allow_anonymous: bool = False
    """Serve on an address other than loopback without authentication (protected mode is off)."""
    bus: str = "memory"
    """``memory``, or a ``nats://`` URL (several, comma-separated, for a cluster)."""
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT
    """Seconds a stream may run; ``None`` = no timeout (``0`` or ``none`` in the file, environment or flags)."""
    buffer_size: int = DEFAULT_BUFFER_SIZE
    history_size: int = DEFAULT_HISTORY_SIZE
    history_max_bytes: int = DEFAULT_HISTORY_MAX_BYTES
    """Bytes of events (type, id, payload, metadata) the history keeps: the memory ring, the NATS stream's
    max_bytes."""
    dedupe_window_s: float = DEFAULT_DEDUPE_WINDOW_S
    """Seconds a repeated ``event_id`` is recognised; ``0`` turns deduplication off."""
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    """The whole event a client may send: type, id, payload and metadata as compact UTF-8 JSON."""
    max_payload_depth: int = DEFAULT_MAX_PAYLOAD_DEPTH
    """Objects and arrays nested in a payload (the payload object itself is level 1)."""
    max_metadata_entries: int = DEFAULT_MAX_METADATA_ENTRIES
    subscriber_queue: int = DEFAULT_MAX_PENDING
    max_patterns_per_subscription: int = DEFAULT_MAX_PATTERNS_PER_SUBSCRIPTION
    """Patterns one subscription may follow (a gRPC subscribe, an SSE stream, a WebSocket's subscription)."""
    max_patterns_per_connection: int = DEFAULT_MAX_PATTERNS_PER_CONNECTION
    """Patterns over all the subscriptions of one client connection (a WebSocket, a gRPC peer)."""
    max_subscriptions_per_connection: int = DEFAULT_MAX_SUBSCRIPTIONS_PER_CONNECTION
    max_requests_per_connection: int = DEFAULT_MAX_REQUESTS_PER_CONNECTION
    """Requests of one connection whose lifecycle has not ended (its live streams among them)."""
    publish_rate_per_s: float = DEFAULT_PUBLISH_RATE_PER_S
    """Publishes (requests included) one connection may make per second on average..."""
    publish_burst: int = DEFAULT_PUBLISH_BURST
    """...and in one burst; over it a publish is refused (RESOURCE_EXHAUSTED, error frame ``rate_limited``)."""
    nats_stream: str = DEFAULT_NATS_STREAM
    """The JetStream stream every node shares (created or updated at start-up)."""
    nats_subject_prefix: str = DEFAULT_NATS_SUBJECT_PREFIX
    """Events are stored on ``<prefix>.<service>.<action>.v<N>.<state>``."""
    nats_retention: str = "limits"
    """``limits`` (keep ``history_size`` events and ``nats_max_age_s``) or ``interest``; never ``workqueue``."""
    nats_replicas: int = 1
    """Copies of the stream in a NATS cluster (1 to 5; 3 survives losing one server)."""
    nats_storage: str = "file"
    nats_max_age_s: float = 0.0
    """Seconds the stream keeps an event; ``0`` keeps it until ``history_size`` newer ones push it out."""
    nats_ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S
    """Seconds a publish waits for JetStream's acknowledgement before it fails with UNAVAILABLE."""
    nats_publish_window: int = DEFAULT_PUBLISH_WINDOW
    """Publishes a node has sent to JetStream without their acknowledgement yet, at most; more wait, in order."""
    nats_node_heartbeat_s: float = 1.0
    """Seconds between node heartbeats; a node silent for three of them is lost and its requests fail."""
    handlers: list[str] = dataclasses.field(default_factory=list)
    """``module:Class`` specs loaded besides the entry points."""
    load_entry_points: bool = True
    exclude_handlers: list[str] = dataclasses.field(default_factory=list)
    """Entry-point names not to load."""
    log_format: str = "auto"
    log_level: str = "info"
    streaming_rules: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_RULES))
    shutdown_grace_s: float = 5.0
    worker_ping_interval_s: float = DEFAULT_WORKER_PING_INTERVAL
    """Seconds between the pings the server sends each worker (``nexus.v1.WorkerService``)."""
    worker_timeout_s: float = DEFAULT_WORKER_TIMEOUT
    """A worker that sends nothing for this long is lost: its started requests fail with ``worker_lost``."""
    worker_grace_s: float = DEFAULT_WORKER_GRACE
    """How long a handler's requests wait for a worker when none is connected; then they fail ``worker_lost``."""
    worker_pools: list[str] = dataclasses.field(default_factory=list)
    """Handlers (``service:action``) whose in-process handler shares its requests with remote workers."""
    worker_local_in_flight: int = DEFAULT_LOCAL_IN_FLIGHT
    """Requests the in-process member of a worker pool runs at once."""
    max_workers: int = DEFAULT_MAX_WORKERS
    """Workers connected at once, at most."""
    sse_keepalive_s: float = 15.0
    """Seconds of silence after which a gateway ``/sse`` response writes a keep-alive comment."""
    sse_retry_ms: int = 2_000
    """The ``retry`` hint of ``/sse`` responses: milliseconds ``EventSource`` waits before reconnecting."""
    log_dir: str | None = None
    """The directory plugins may read log files from (``anomalies:stream_log``); None: none may."""
    data_dir: str | None = None
    """The directory of the server's own files (created when missing): the plugins' key-value state with the
    memory bus (``kv.sqlite3``). None: ``$XDG_DATA_HOME/nexus``, else ``~/.local/share/nexus``."""
    kv_bucket: str | None = None
    """The JetStream key-value bucket of the plugins' state with the NATS bus; None: ``<nats_stream>_KV``."""
    kv_max_value_bytes: int = DEFAULT_KV_MAX_VALUE_BYTES
    """Largest value (compact UTF-8 JSON) a plugin may store under one key (``ctx.kv``)."""
    kv_max_keys: int = DEFAULT_KV_MAX_KEYS
    """Keys one plugin may keep in the key-value store."""
    handler_config: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Per-handler sections, by registration name: a handler's ``ctx.config``."""
    metrics: bool = True
    """OpenTelemetry metrics (``/metrics`` on the gateway port, ``/api/metrics`` for the page); off: none kept."""
    metrics_port: int | None = None
    """A port of its own serving ``/metrics`` (and ``/healthz``, ``/readyz``), e.g. when the gateway is off."""
    metrics_public: bool = False
    """With authentication on, ``/metrics`` needs an admin token unless this is true (scrapers without tokens)."""

    def plugin_defaults(self) -> dict[str, Any]:
        """Server settings every handler's ``ctx.config`` starts from; its own sections override them.

        The fields named in :data:`PLUGIN_DEFAULT_FIELDS`, when set.
        """
        defaults = {name: getattr(self, name) for name in PLUGIN_DEFAULT_FIELDS}
        return {name: value for name, value in defaults.items() if value is not None}

    def server_tls(self) -> ServerTls | None:
        """The certificate and key both transports serve, loaded and checked; None without TLS. Raises
        :class:`ConfigurationError` for one file without the other, or files that cannot be used."""
        return load_server_tls(self.tls_cert_file, self.tls_key_file)

    @property
    def auth_enabled(self) -> bool:
        """Whether clients need a token: a JWT secret or public key is configured."""
        return self.jwt_secret is not None or self.jwt_public_key_file is not None

    def authenticator(self) -> Authenticator:
        """Who clients are, for every transport: a :class:`~nexus.auth.JwtAuthenticator` when a secret or public key
        is set (keys loaded and checked now: :class:`ConfigurationError`), else :func:`~nexus.auth.allow_all`."""
        if not self.auth_enabled:
            return allow_all
        keys = load_public_keys(self.jwt_public_key_file) if self.jwt_public_key_file is not None else ()
        return JwtAuthenticator(
            JwtSettings(
                secret=self.jwt_secret,
                public_keys=keys,
                audience=self.jwt_audience,
                issuer=self.jwt_issuer,
                leeway_s=self.jwt_leeway_s,
            )
        )

    def check_exposure(self, command: str = "nexus serve") -> None:
        """Protected mode: refuse to serve on an address other than loopback without authentication, unless
        ``allow_anonymous``. Raises :class:`ConfigurationError` saying why and what to do (one line)."""
        if self.auth_enabled or self.allow_anonymous or is_loopback(self.host):
            return
        raise ConfigurationError(
            f"{command} on {self.host} (not loopback) without authentication would let anyone on the network "
            "publish and read every event; configure a JWT secret or public key (--jwt-secret, NEXUS_JWT_SECRET, "
            "--jwt-public-key) or pass --allow-anonymous"
        )

    def client_limits(self) -> ClientLimits:
        """What one client connection may hold and do, on every transport."""
        return ClientLimits(
            max_patterns=self.max_patterns_per_connection,
            max_subscriptions=self.max_subscriptions_per_connection,
            max_requests=self.max_requests_per_connection,
            publish_rate_per_s=self.publish_rate_per_s,
            publish_burst=self.publish_burst,
        )

    def event_limits(self) -> EventLimits:
        """What one event may hold, checked where events enter Nexus."""
        return EventLimits(
            max_event_bytes=self.max_event_bytes,
            max_payload_bytes=self.max_payload_bytes,
            max_payload_depth=self.max_payload_depth,
            max_metadata_entries=self.max_metadata_entries,
        )

    def data_path(self) -> Path:
        """``data_dir``, or the default data directory."""
        return Path(self.data_dir) if self.data_dir is not None else default_data_dir()

    def kv_limits(self) -> KVLimits:
        return KVLimits(
            max_value_bytes=self.kv_max_value_bytes, max_keys=self.kv_max_keys, max_depth=self.max_payload_depth
        )

    def kv_bucket_name(self) -> str:
        """``kv_bucket``, or the bucket named from the stream."""
        return self.kv_bucket if self.kv_bucket is not None else f"{self.nats_stream}_KV"

    def provider_settings(self) -> ProviderSettings:
        """The part of these settings that drives handlers."""
        return ProviderSettings(
            heartbeat_interval=self.heartbeat_interval,
            stream_timeout=self.stream_timeout,
            buffer_size=self.buffer_size,
            max_payload_bytes=self.max_payload_bytes,
            streaming_rules=tuple(self.streaming_rules),
            shutdown_grace_s=self.shutdown_grace_s,
            worker_ping_interval=self.worker_ping_interval_s,
            worker_timeout=self.worker_timeout_s,
            worker_grace=self.worker_grace_s,
            worker_pools=tuple(self.worker_pools),
            worker_local_in_flight=self.worker_local_in_flight,
            max_workers=self.max_workers,
        )

    def nats_bus_settings(self) -> NatsBusSettings:
        """The part of these settings the NATS bus reads (``bus`` holds its comma-separated server URLs)."""
        return NatsBusSettings(
            servers=tuple(part.strip() for part in self.bus.split(",") if part.strip()),
            stream=self.nats_stream,
            subject_prefix=self.nats_subject_prefix,
            retention=self.nats_retention,
            storage=self.nats_storage,
            replicas=self.nats_replicas,
            max_age_s=self.nats_max_age_s,
            history_size=self.history_size,
            history_max_bytes=self.history_max_bytes,
            dedupe_window_s=self.dedupe_window_s,
            ack_timeout_s=self.nats_ack_timeout_s,
            publish_window=self.nats_publish_window,
            max_payload_bytes=self.max_payload_bytes,
            limits=self.event_limits(),
        )


# --- converters: (value, from_text) -> checked value; raise _Invalid with the problem -------------------------


class _Invalid(ConfigurationError):
    pass


_Convert = Callable[[Any, bool], Any]


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _integer(low: int, high: int | None = None) -> _Convert:
    def convert(value: Any, text: bool) -> int:
        if text and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise _Invalid(f"must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"must be an integer, got {_shown(value)}")
        if high is not None and not low <= value <= high:
            raise _Invalid(f"must be from {low} to {high}, got {value}")
        if value < low:
            raise _Invalid(f"must be at least {low}, got {value}")
        return value

    return convert


def _to_float(value: Any, text: bool) -> float:
    if text and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Invalid(f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"must be a number, got {_shown(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise _Invalid(f"must be a finite number, got {value!r}")
    return number


def _positive_number(value: Any, text: bool) -> float:
    number = _to_float(value, text)
    if number <= 0:
        raise _Invalid(f"must be a positive number, got {number:g}")
    return number


def _seconds(*, allow_zero: bool) -> _Convert:
    def convert(value: Any, text: bool) -> float:
        number = _to_float(value, text)
        if allow_zero and number < 0:
            raise _Invalid(f"must be 0 or more seconds, got {number:g}")
        if not allow_zero and number <= 0:
            raise _Invalid(f"must be a positive number of seconds, got {number:g}")
        return number

    return convert


def _timeout(value: Any, text: bool) -> float | None:
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    try:
        number = _to_float(value, text)
    except _Invalid:
        raise _Invalid(
            f"must be a positive number of seconds, or 0 or 'none' for no timeout, got {_shown(value)}"
        ) from None
    if number < 0:
        raise _Invalid(f"must be a positive number of seconds, or 0 or 'none' for no timeout, got {number:g}")
    return None if number == 0 else number


_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})


def _boolean(value: Any, text: bool) -> bool:
    if text and isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise _Invalid(f"must be true or false (or 1/0, yes/no, on/off), got {value!r}")
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_shown(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_shown(value)}")
    return value.strip()


def _host(value: Any, text: bool) -> str:
    host = _string(value)
    if not host or any(ch.isspace() for ch in host):
        raise _Invalid(f"must be a host name or address, got {value!r}")
    return host


def _choice(choices: tuple[str, ...]) -> _Convert:
    def convert(value: Any, text: bool) -> str:
        word = _string(value).lower()
        if word not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}, got {value!r}")
        return word

    return convert


def _bus(value: Any, text: bool) -> str:
    bus = _string(value)
    if bus == "memory":
        return bus
    expected = "must be 'memory' or a nats:// URL (comma-separated for several servers)"
    for part in bus.split(","):
        url = urlsplit(part.strip())
        if url.scheme not in BUS_SCHEMES:
            scheme = f"scheme {url.scheme!r}" if url.scheme else "no scheme"
            raise _Invalid(f"{expected}, got {value!r} ({scheme})")
        try:
            url.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        except ValueError:
            raise _Invalid(f"{expected}, got {value!r} (bad port)") from None
        if not url.hostname:
            raise _Invalid(f"{expected}, got {value!r} (no host)")
    return bus


def _nats_name(check: Callable[[str], str | None]) -> _Convert:
    def convert(value: Any, text: bool) -> str:
        name = _string(value)
        problem = check(name)
        if problem is not None:
            raise _Invalid(problem)
        return name

    return convert


def _retention(value: Any, text: bool) -> str:
    word = _string(value).lower()
    if word == "workqueue":
        raise _Invalid(
            "must be limits or interest, got 'workqueue': a work-queue stream allows no overlapping consumers, "
            "so nodes could neither replay history nor each deliver every event"
        )
    checked: str = _choice(("limits", "interest"))(word, text)
    return checked


def _directory(value: Any, text: bool) -> str:
    path = _string(value)
    if not path:
        raise _Invalid("must be a directory path, got an empty string")
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(full):
        raise _Invalid(f"must be an existing directory, got {path!r}")
    return full


def _path(value: Any, text: bool) -> str:
    path = _string(value)
    if not path:
        raise _Invalid("must be a directory path, got an empty string")
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(full) and not os.path.isdir(full):
        raise _Invalid(f"must be a directory (created when missing), got the file {path!r}")
    return full


def _check_bucket(name: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9_-]{1,200}", name) is None:
        return f"must be 1 to 200 letters, digits, '_' or '-', got {name!r}"
    return None


def _file(value: Any, text: bool) -> str:
    path = _string(value)
    if not path:
        raise _Invalid("must be a file path, got an empty string")
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise _Invalid(f"must be an existing file, got {path!r}")
    return full


def _secret(value: Any, text: bool) -> str:
    """A JWT secret: never shown in a message."""
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got a {type(value).__name__}")
    size = len(value.encode())
    if size < MIN_SECRET_BYTES:
        raise _Invalid(
            f"must be {MIN_SECRET_BYTES} bytes or more, got {size}; make one with "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return value


def _optional_text(value: Any, text: bool) -> str:
    word = _string(value)
    if not word:
        raise _Invalid("must not be empty")
    return word


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost`` (only this machine can connect)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another name: it may resolve to any interface


def _origins(value: Any, text: bool) -> list[str]:
    """Origins, each item possibly comma-separated (a repeated flag may carry lists too)."""
    items: list[str] = _string_list(lambda item: None)(value, text)
    origins = [part.strip() for item in items for part in item.split(",") if part.strip()]
    for origin in origins:
        try:
            check_allowed_origin(origin)
        except ValueError as exc:
            raise _Invalid(f"{exc}; write scheme://host[:port], scheme://host:* or *") from None
    return origins


def _handler_spec(item: str) -> None:
    try:
        split_spec(item)
    except HandlerConfigError as exc:
        raise _Invalid(str(exc)) from None


def _name(item: str) -> None:
    if not item:
        raise _Invalid("names must not be empty")


def _service_action(item: str) -> None:
    try:
        check_service_action("worker_pools", item)
    except HandlerConfigError as exc:
        raise _Invalid(exc.message) from None


def _rule(item: str) -> None:
    try:
        Rule.parse(item)
    except InvalidArgument as exc:
        raise _Invalid(exc.message) from None


def _string_list(check: Callable[[str], None]) -> _Convert:
    def convert(value: Any, text: bool) -> list[str]:
        if text and isinstance(value, str):
            items = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise _Invalid(f"must be a list of strings, got {_shown(value)}")
        for index, item in enumerate(items):
            if not isinstance(item, str):
                raise _Invalid(f"item {index} must be a string, got {_shown(item)}")
            check(item)
        return items

    return convert


def _sections(value: Any, text: bool) -> dict[str, dict[str, Any]]:
    if text and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise _Invalid(f"must be a JSON object of per-handler objects ({exc})") from None
    if not isinstance(value, Mapping):
        raise _Invalid(f"must map handler names to sections, got {_shown(value)}")
    sections: dict[str, dict[str, Any]] = {}
    for name, section in value.items():
        if not isinstance(name, str) or not isinstance(section, Mapping):
            raise _Invalid(f"the section for {name!r} must be a table of settings, got {_shown(section)}")
        sections[name] = dict(section)
    return sections


_PORT: Final = _integer(0, 65535)
_POSITIVE: Final = _integer(1)

_FIELDS: Final[dict[str, _Convert]] = {
    "host": _host,
    "grpc_port": _PORT,
    "ws_port": _PORT,
    "gateway": _boolean,
    "loop": _choice(LOOPS),
    "tracing": _boolean,
    "ws_max_frame_bytes": _POSITIVE,
    "ws_max_frames_per_s": _positive_number,
    "ws_allowed_origins": _origins,
    "tls_cert_file": _file,
    "tls_key_file": _file,
    "jwt_secret": _secret,
    "jwt_public_key_file": _file,
    "jwt_audience": _optional_text,
    "jwt_issuer": _optional_text,
    "jwt_leeway_s": _seconds(allow_zero=True),
    "allow_anonymous": _boolean,
    "bus": _bus,
    "heartbeat_interval": _seconds(allow_zero=False),
    "stream_timeout": _timeout,
    "buffer_size": _POSITIVE,
    "history_size": _POSITIVE,
    "history_max_bytes": _POSITIVE,
    "dedupe_window_s": _seconds(allow_zero=True),
    "max_payload_bytes": _POSITIVE,
    "max_event_bytes": _POSITIVE,
    "max_payload_depth": _integer(1, 1000),
    "max_metadata_entries": _integer(0, 100_000),
    "subscriber_queue": _POSITIVE,
    "max_patterns_per_subscription": _POSITIVE,
    "max_patterns_per_connection": _POSITIVE,
    "max_subscriptions_per_connection": _POSITIVE,
    "max_requests_per_connection": _POSITIVE,
    "publish_rate_per_s": _positive_number,
    "publish_burst": _POSITIVE,
    "nats_stream": _nats_name(check_stream_name),
    "nats_subject_prefix": _nats_name(check_subject_prefix),
    "nats_retention": _retention,
    "nats_replicas": _integer(1, 5),
    "nats_storage": _choice(("file", "memory")),
    "nats_max_age_s": _seconds(allow_zero=True),
    "nats_ack_timeout_s": _seconds(allow_zero=False),
    "nats_publish_window": _integer(1, 100_000),
    "nats_node_heartbeat_s": _seconds(allow_zero=False),
    "handlers": _string_list(_handler_spec),
    "load_entry_points": _boolean,
    "exclude_handlers": _string_list(_name),
    "log_format": _choice(LOG_FORMATS),
    "log_level": _choice(LOG_LEVELS),
    "streaming_rules": _string_list(_rule),
    "shutdown_grace_s": _seconds(allow_zero=True),
    "worker_ping_interval_s": _seconds(allow_zero=False),
    "worker_timeout_s": _seconds(allow_zero=False),
    "worker_grace_s": _seconds(allow_zero=True),
    "worker_pools": _string_list(_service_action),
    "worker_local_in_flight": _integer(1, 100_000),
    "max_workers": _POSITIVE,
    "sse_keepalive_s": _seconds(allow_zero=False),
    "sse_retry_ms": _POSITIVE,
    "log_dir": _directory,
    "data_dir": _path,
    "kv_bucket": _nats_name(_check_bucket),
    "kv_max_value_bytes": _integer(1, 64 * 1024 * 1024),
    "kv_max_keys": _POSITIVE,
    "handler_config": _sections,
    "metrics": _boolean,
    "metrics_port": _PORT,
    "metrics_public": _boolean,
}


# --- sources ----------------------------------------------------------------------------------------------------


def env_var(field: str) -> str:
    """The environment variable that sets ``field``: ``NEXUS_<FIELD>``."""
    return ENV_PREFIX + field.upper()


_FLAGS: Final = {
    "ws_allowed_origins": "--ws-allowed-origin",
    "tls_cert_file": "--tls-cert",
    "tls_key_file": "--tls-key",
    "jwt_public_key_file": "--jwt-public-key",
}
"""Fields whose flag is not their name with dashes."""


def flag_name(field: str) -> str:
    """The command-line flag named in errors about ``field``: ``--grpc-port``."""
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def _convert(field: str, value: Any, *, text: bool, source: str) -> Any:
    try:
        return _FIELDS[field](value, text)
    except _Invalid as exc:
        raise ConfigError(str(exc), field=field, source=source) from None


def _unknown(field: str, source: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(field, [f for f in _FIELDS if f != "handler_config"], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown setting {where}{hint}", field=field, source=source)


def _read_file(path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    source = f"config file {path}"
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError("no such file", source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot be read ({exc.strerror or exc})", source=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"is not valid TOML ({exc})", source=source) from None

    for key in data:
        if key not in (FILE_SECTION, HANDLERS_SECTION):
            raise ConfigError(
                f"unknown top-level key; expected a [{FILE_SECTION}] table and [{HANDLERS_SECTION}.<name>] tables",
                field=key,
                source=source,
            )
    values: dict[str, Any] = {}
    table = data.get(FILE_SECTION, {})
    if not isinstance(table, dict):
        raise ConfigError(f"must be a table, got {_shown(table)}", field=FILE_SECTION, source=source)
    for field, value in table.items():
        if field == "handler_config":
            raise ConfigError(
                f"write handler sections as [{HANDLERS_SECTION}.<name>] tables", field=field, source=source
            )
        if field not in _FIELDS:
            raise _unknown(field, source, f"in [{FILE_SECTION}]")
        values[field] = _convert(field, value, text=False, source=source)

    sections = data.get(HANDLERS_SECTION, {})
    try:
        handler_config = _sections(sections, False)
    except _Invalid as exc:
        raise ConfigError(str(exc), field=HANDLERS_SECTION, source=source) from None
    return values, handler_config


def _merge_sections(into: dict[str, dict[str, Any]], sections: Mapping[str, Mapping[str, Any]]) -> None:
    for name, section in sections.items():
        into.setdefault(name, {}).update(section)


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from flags (``overrides``) > ``env`` (default ``os.environ``) > the config file > defaults.

    The config file is ``config_path``, else ``$NEXUS_CONFIG``, else none. Raises :class:`ConfigError` naming
    the field and its source for an unknown key, a wrong type or a value out of range.
    """
    env = os.environ if env is None else env
    overrides = overrides or {}
    values: dict[str, Any] = {}
    handler_config: dict[str, dict[str, Any]] = {}

    path = os.fspath(config_path) if config_path is not None else env.get(CONFIG_ENV, "").strip()
    if path:
        file_values, file_sections = _read_file(path)
        values.update(file_values)
        _merge_sections(handler_config, file_sections)

    for field in _FIELDS:
        name = env_var(field)
        text = env.get(name, "")
        if not text.strip():
            continue
        value = _convert(field, text, text=True, source=f"environment variable {name}")
        if field == "handler_config":
            _merge_sections(handler_config, value)
        else:
            values[field] = value

    for field, given in overrides.items():
        if given is None:
            continue
        source = f"flag {flag_name(field)}"
        if field not in _FIELDS:
            raise _unknown(field, source, "given as a flag")
        value = _convert(field, given, text=isinstance(given, str), source=source)
        if field == "handler_config":
            _merge_sections(handler_config, value)
        else:
            values[field] = value

    return Settings(**values, handler_config=handler_config)
