"""The ``nexus`` command: serve, emit, subscribe, request, cancel, handlers, streams, worker, gateway, token, docs,
bench.

Output contract of the client commands: stdout carries only the command's data, one JSON object per line;
every log line (``subscription_reconnecting``, ...) and every status line (``nexus: subscribed {...}``,
``nexus: duplicate: ...``, ``nexus: no live streams``) goes to stderr. Exit codes: :data:`EXIT_CODES`, shown by
``nexus --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from nexus import __version__
from nexus.backoff import BackoffPolicy
from nexus.errors import ConfigurationError, NexusError
from nexus.events import Event

if TYPE_CHECKING:
    from nexus.client import NexusClient
    from nexus.cloudevents import CloudEventsView
    from nexus.config import Settings

DEFAULT_SERVER = "127.0.0.1:50051"
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "done (a request ended in success; cancel found and cancelled the stream)"),
    (
        1,
        "the server refused (nexus: <code>: <message> on stderr); a request ended in failed, timeout or "
        "cancelled; cancel found no such stream; docs --check found the file out of date",
    ),
    (2, "a usage or start-up error, in one line: nexus: error: <message>"),
    (130, "interrupted (Ctrl-C)"),
)
"""Every exit code of every ``nexus`` command, with what it means."""


def exit_codes_text(width: int = 100) -> str:
    """The exit codes as ``nexus --help`` ends with them (and the README shows them)."""
    lines = ["exit codes:"]
    for code, meaning in EXIT_CODES:
        lines += textwrap.wrap(meaning, width, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
    return "\n".join(lines)


DEFAULT_BACKOFF = BackoffPolicy()


class CliError(ConfigurationError):
    """A usage problem reported as ``nexus: error: ...`` with exit code 2."""


def _json_line(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n")
    out.flush()


def _parse_payload(text: str | None) -> dict[str, Any]:
    if text is None or text == "":
        return {}
    if text == "-":
        text = sys.stdin.read()

    def reject_constant(name: str) -> Any:
        raise CliError(f"--payload holds {name}, which is not valid JSON")

    try:
        value = json.loads(text, parse_constant=reject_constant)
    except json.JSONDecodeError as exc:
        raise CliError(f"--payload is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CliError(f"--payload must be a JSON object, not {type(value).__name__}")
    return value


def _parse_metadata(items: Sequence[str] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--metadata {item!r} must be KEY=VALUE")
        result[key] = value
    return result


def _float_or_none(text: str) -> float | None:
    if text.lower() in ("none", "0", "0.0", "inf", "infinite"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


class _RecordGiven(argparse.Action):
    """Stores the value and notes that the option was given (its value may legitimately be None)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def _add_exposure_options(parser: argparse.ArgumentParser) -> None:
    """``--ws-allowed-origin`` and ``--tls-cert`` / ``--tls-key``, for ``serve`` and ``gateway``."""
    group = parser.add_argument_group("origins and TLS (docs/security.md)")
    group.add_argument(
        "--ws-allowed-origin",
        action="append",
        dest="ws_allowed_origins",
        metavar="ORIGIN",
        help="a web origin whose pages may use the gateway besides its own: https://app.example.com, "
        "http://localhost:* (any port) or * (any page: no check); repeated or comma-separated; replaces the "
        "default, the localhost origins",
    )
    group.add_argument("--tls-cert", dest="tls_cert_file", metavar="FILE", help="PEM certificate (chain): serve TLS")
    group.add_argument("--tls-key", dest="tls_key_file", metavar="FILE", help="PEM private key of --tls-cert")


def _add_auth_options(parser: argparse.ArgumentParser) -> None:
    """JWT verification and protected mode, for ``serve`` and ``gateway``."""
    group = parser.add_argument_group("authentication (docs/security.md)")
    group.add_argument(
        "--jwt-secret",
        metavar="SECRET",
        help="HS256 secret (32+ bytes): clients need a token signed with it (better: $NEXUS_JWT_SECRET, "
        "which ps does not show)",
    )
    group.add_argument(
        "--jwt-public-key",
        dest="jwt_public_key_file",
        metavar="FILE",
        help="RS256/ES256 public key (PEM) or a JWKS JSON file: clients need a token signed by it",
    )
    group.add_argument("--jwt-audience", metavar="AUD", help="a token's aud must name this")
    group.add_argument("--jwt-issuer", metavar="ISS", help="a token's iss must be this")
    group.add_argument("--jwt-leeway-s", metavar="SECONDS", help="clock difference forgiven around exp/nbf (10)")
    group.add_argument(
        "--allow-anonymous",
        action="store_true",
        default=None,
        help="serve on an address other than loopback without authentication (protected mode off)",
    )


def _duration(text: str) -> float:
    """Seconds of ``90``, ``90s``, ``15m``, ``1h`` or ``7d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    word = text.strip().lower()
    factor = units.get(word[-1:], 0)
    number = word[:-1] if factor else word
    try:
        value = float(number) * (factor or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 1h or 7d") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive duration")
    return value


def _add_client_tls_options(parser: argparse.ArgumentParser, prefix: str = "", what: str = "the server") -> None:
    parser.add_argument(
        f"--{prefix}tls", action="store_true", help=f"connect to {what} over TLS (verified against the system's roots)"
    )
    parser.add_argument(
        f"--{prefix}ca-file",
        metavar="FILE",
        help=f"PEM CA certificates to verify {what} with (implies --{prefix}tls)",
    )
    parser.add_argument(
        f"--{prefix}token",
        default=os.environ.get("NEXUS_TOKEN") or None,
        metavar="JWT",
        help=f"the token to present to {what} when it requires one (default $NEXUS_TOKEN)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``nexus`` command."""
    parser = argparse.ArgumentParser(
        prog="nexus",
        description="Nexus: a real-time event bus.",
        epilog=exit_codes_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nexus {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run a Nexus server")
    serve.add_argument("--config", help="TOML config file (default: $NEXUS_CONFIG)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    serve.add_argument("--ws-port", type=int, help="WebSocket gateway and page port (default 8080; 0: a free one)")
    serve.add_argument(
        "--no-gateway", action="store_false", dest="gateway", default=None, help="do not start the WebSocket gateway"
    )
    serve.add_argument(
        "--metrics-port", type=int, help="serve /metrics, /healthz and /readyz on this port too (0: a free one)"
    )
    serve.add_argument(
        "--no-metrics", action="store_false", dest="metrics", default=None, help="keep no metrics (no /metrics)"
    )
    serve.add_argument(
        "--no-tracing", action="store_false", dest="tracing", default=None, help="record no OpenTelemetry spans"
    )
    serve.add_argument("--ws-max-frame-bytes", type=int, help="largest WebSocket frame a client may send (1 MiB)")
    serve.add_argument("--ws-max-frames-per-s", type=float, help="frames per second one WebSocket may send (2000)")
    serve.add_argument("--bus", help="'memory' (default) or a nats:// URL")
    serve.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        help="event loop: uvloop (the nexus-bus[uvloop] extra), asyncio, or auto: uvloop when installed (auto)",
    )
    serve.add_argument("--heartbeat-interval", type=_positive_float, help="seconds between heartbeats (1.0)")
    serve.add_argument(
        "--stream-timeout",
        type=_float_or_none,
        action=_RecordGiven,
        help="seconds a stream may live (1800; 'none' for no limit)",
    )
    serve.add_argument("--buffer-size", type=int, help="chunks a stream buffers before send() waits (100)")
    serve.add_argument(
        "--history-size", type=int, help="events kept for replay: the memory ring, the NATS stream's max (100000)"
    )
    serve.add_argument("--history-max-bytes", type=int, help="bytes of events kept for replay (268435456: 256 MiB)")
    serve.add_argument("--max-patterns-per-subscription", type=int, help="patterns one subscription may follow (256)")
    limits = serve.add_argument_group("limits of one client connection (a WebSocket, an SSE stream, a gRPC peer)")
    limits.add_argument("--max-patterns-per-connection", type=int, help="patterns over its subscriptions (1024)")
    limits.add_argument("--max-subscriptions-per-connection", type=int, help="subscriptions open at once (64)")
    limits.add_argument("--max-requests-per-connection", type=int, help="requests still running (256)")
    limits.add_argument("--publish-rate-per-s", type=float, help="publishes per second on average (10000)")
    limits.add_argument("--publish-burst", type=int, help="publishes in one burst (20000)")
    serve.add_argument("--subscriber-queue", type=int, help="events queued per subscriber before it is cut off")
    serve.add_argument("--max-payload-bytes", help="largest event payload, on every bus (1000000)")
    serve.add_argument("--max-event-bytes", help="largest event: type, id, payload and metadata (1048576)")
    serve.add_argument("--max-payload-depth", help="objects and arrays nested in a payload (32)")
    serve.add_argument("--max-metadata-entries", help="metadata entries of one event (64)")
    nats_options = serve.add_argument_group("NATS bus (--bus nats://...)")
    nats_options.add_argument("--nats-stream", metavar="NAME", help="the JetStream stream all nodes share (NEXUS)")
    nats_options.add_argument("--nats-subject-prefix", metavar="PREFIX", help="events go to PREFIX.<type> (nexus)")
    nats_options.add_argument("--nats-replicas", metavar="N", help="stream copies in a NATS cluster, 1 to 5 (1)")
    nats_options.add_argument("--nats-retention", metavar="POLICY", help="limits or interest (limits)")
    nats_options.add_argument("--nats-storage", metavar="KIND", help="file or memory (file)")
    nats_options.add_argument("--nats-max-age-s", metavar="SECONDS", help="drop events older than this (0: never)")
    nats_options.add_argument(
        "--nats-ack-timeout-s", metavar="SECONDS", help="a publish fails if JetStream has not acknowledged it (2)"
    )
    nats_options.add_argument(
        "--nats-node-heartbeat-s", metavar="SECONDS", help="node heartbeat; 3 missed ones = node lost (1)"
    )
    serve.add_argument(
        "--handler", action="append", dest="handlers", metavar="MODULE:CLASS", help="load a handler class"
    )
    serve.add_argument(
        "--no-entry-points",
        action="store_false",
        dest="load_entry_points",
        default=None,
        help="do not load the 'nexus.handlers' entry points",
    )
    serve.add_argument(
        "--exclude", action="append", dest="exclude_handlers", metavar="NAME", help="skip an entry point"
    )
    serve.add_argument("--log-format", choices=("auto", "json", "console"), help="log format (auto)")
    serve.add_argument("--log-level", help="log level (info)")
    serve.add_argument(
        "--log-dir", metavar="DIR", help="the directory whose log files anomalies:stream_log may follow (none)"
    )
    serve.add_argument(
        "--data-dir",
        metavar="DIR",
        help="everything this node keeps: the plugins' state with the memory bus, the messaging database "
        "($XDG_DATA_HOME/nexus/node-<grpc port>)",
    )
    _add_exposure_options(serve)
    _add_auth_options(serve)

    def client_command(name: str, help_text: str, **details: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, **details)
        sub.add_argument(
            "--server",
            default=os.environ.get("NEXUS_SERVER", DEFAULT_SERVER),
            help=f"server address (default $NEXUS_SERVER or {DEFAULT_SERVER})",
        )
        sub.add_argument(
            "--log-format", choices=("auto", "json", "console"), help="format of the log lines on stderr (auto)"
        )
        sub.add_argument("--log-level", help="log level of the lines on stderr (info)")
        _add_client_tls_options(sub)
        return sub

    emit = client_command("emit", "publish one event and print it as stored")
    emit.add_argument("event_type", metavar="TYPE")
    emit.add_argument("--payload", help="a JSON object ('-' reads stdin)")
    emit.add_argument("--event-id", help="an id of your choosing (deduplicated)")
    emit.add_argument("--metadata", action="append", metavar="KEY=VALUE")

    subscribe = client_command("subscribe", "print matching events as JSON lines")
    subscribe.add_argument("patterns", nargs="+", metavar="PATTERN")
    subscribe.add_argument("--since-offset", type=int, default=0, help="replay events after this offset")
    subscribe.add_argument("--epoch", help="the epoch --since-offset belongs to")
    subscribe.add_argument("--count", type=int, help="exit after this many events")
    subscribe.add_argument("--no-heartbeats", action="store_true", help="leave out heartbeat events")
    subscribe.add_argument(
        "--format",
        choices=("json", "cloudevents"),
        default="json",
        help="json: each event as Nexus sends it (default); cloudevents: as a CloudEvent 1.0 in the JSON format "
        "(docs/cloudevents.md)",
    )
    subscribe.add_argument(
        "--reconnect-initial-delay",
        type=_positive_float,
        default=DEFAULT_BACKOFF.initial_delay,
        metavar="SECONDS",
        help=f"wait before the first reconnection; doubles per failed attempt ({DEFAULT_BACKOFF.initial_delay})",
    )
    subscribe.add_argument(
        "--reconnect-max-delay",
        type=_positive_float,
        default=DEFAULT_BACKOFF.max_delay,
        metavar="SECONDS",
        help=f"longest wait between reconnection attempts ({DEFAULT_BACKOFF.max_delay})",
    )

    request = client_command("request", "send a request and print its lifecycle as JSON lines")
    request.add_argument("event_type", metavar="TYPE")
    request.add_argument("--payload", help="a JSON object ('-' reads stdin)")
    request.add_argument("--event-id")
    request.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    request.add_argument("--no-heartbeats", action="store_true", help="leave out heartbeat events")

    cancel = client_command("cancel", "cancel a stream by its request's event_id")
    cancel.add_argument("correlation_id")
    cancel.add_argument("--reason", default="cancelled by requester")

    handlers = commands.add_parser(
        "handlers",
        help="list handlers: those 'nexus serve' would load here (with their effective settings), or a running "
        "server's",
    )
    handlers.add_argument("--server", help="ask this running server instead")
    _add_client_tls_options(handlers)
    handlers.add_argument("--config", help="TOML config file (default: $NEXUS_CONFIG)")
    handlers.add_argument("--handler", action="append", dest="handlers", metavar="MODULE:CLASS")
    handlers.add_argument("--no-entry-points", action="store_false", dest="load_entry_points", default=None)
    handlers.add_argument(
        "--exclude", action="append", dest="exclude_handlers", metavar="NAME", help="skip an entry point"
    )

    client_command("streams", "list the streams a server drives now")

    worker = client_command(
        "worker",
        "serve handlers for a running server, in this process (docs/workers.md)",
        description="Connect to a Nexus server and serve the requests of these handlers for it, reconnecting "
        "(with backoff) whenever the server goes away, until SIGTERM or SIGINT: requests still arriving then "
        "are left to other workers, running ones get --shutdown-grace seconds to finish, then every "
        "handler's teardown runs.",
        epilog="exit codes: 0 stopped by SIGTERM or SIGINT; 1 the server refused the registration "
        "('nexus: <code>: <message>': a declaration it does not accept, a type already served differently, a "
        "token that may not serve a type); 2 a usage or start-up error (a handler that does not load, a bad "
        "config value: 'nexus: error: <message>')",
    )
    worker.add_argument("--config", help="TOML config file: [handlers.<name>] sections (default: $NEXUS_CONFIG)")
    worker.add_argument(
        "--handler", action="append", dest="handlers", metavar="MODULE:CLASS", help="serve a handler class"
    )
    worker.add_argument(
        "--entry-points",
        action="store_true",
        help="also serve every 'nexus.handlers' entry point installed here (but --exclude)",
    )
    worker.add_argument(
        "--exclude", action="append", dest="exclude_handlers", metavar="NAME", help="skip an entry point"
    )
    worker.add_argument(
        "--max-in-flight",
        type=_positive_int,
        metavar="N",
        help="requests of each handler run at once (16)",
    )
    worker.add_argument("--name", help="this worker's name in the server's logs and listings (host:pid)")
    worker.add_argument(
        "--shutdown-grace",
        type=_positive_float,
        metavar="SECONDS",
        help="time running requests get to finish once stopped (5)",
    )
    worker.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where the handlers' ctx.kv lives: DIR/worker/kv.sqlite3 ($XDG_DATA_HOME/nexus)",
    )

    gateway = commands.add_parser("gateway", help="run a WebSocket gateway (and its page) for a remote Nexus")
    gateway.add_argument(
        "--nexus",
        default=os.environ.get("NEXUS_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help=f"the Nexus gRPC address (default $NEXUS_SERVER or {DEFAULT_SERVER})",
    )
    _add_client_tls_options(gateway, "nexus-", "the Nexus server")
    gateway.add_argument("--config", help="TOML config file (default: $NEXUS_CONFIG)")
    gateway.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        help="event loop: uvloop (the nexus-bus[uvloop] extra), asyncio, or auto: uvloop when installed (auto)",
    )
    gateway.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    gateway.add_argument("--ws-port", type=int, help="port of the WebSocket gateway and page (default 8080)")
    gateway.add_argument("--ws-max-frame-bytes", type=int, help="largest WebSocket frame a client may send (1 MiB)")
    gateway.add_argument("--ws-max-frames-per-s", type=float, help="frames per second one WebSocket may send (2000)")
    gateway.add_argument("--history-size", type=int, help="events kept for clients that resume (10000)")
    gateway.add_argument("--log-format", choices=("auto", "json", "console"), help="log format (auto)")
    gateway.add_argument("--log-level", help="log level (info)")
    _add_exposure_options(gateway)
    _add_auth_options(gateway)

    token = commands.add_parser("token", help="mint an HS256 token with the configured secret (development, tests)")
    token.add_argument("--sub", required=True, help="the user id")
    token.add_argument(
        "--publish", action="append", default=[], metavar="PATTERN", help="a pattern the user may publish to"
    )
    token.add_argument(
        "--subscribe", action="append", default=[], metavar="PATTERN", help="a pattern the user may subscribe to"
    )
    token.add_argument(
        "--serve", action="append", default=[], metavar="PATTERN", help="requests a worker may handle (demo:>)"
    )
    token.add_argument("--admin", action="store_true", help="may do and see everything")
    token.add_argument("--ttl", type=_duration, default=3600.0, help="lifetime: 90s, 15m, 1h, 7d (1h)")
    token.add_argument("--config", help="TOML config file (default: $NEXUS_CONFIG)")
    token.add_argument("--jwt-secret", metavar="SECRET", help="the secret (default $NEXUS_JWT_SECRET or the config)")
    token.add_argument("--jwt-audience", metavar="AUD", help="the aud claim (default the configured audience)")
    token.add_argument("--jwt-issuer", metavar="ISS", help="the iss claim (default the configured issuer)")

    docs = commands.add_parser("docs", help="generate documentation from what plugins declare")
    docs.add_argument(
        "topic",
        choices=("events", "asyncapi"),
        help="events: every event the loaded plugins take and emit (Markdown); asyncapi: the same and the "
        "WebSocket protocol as an AsyncAPI 3.0 document (JSON), as the gateway serves it at /asyncapi.json",
    )
    docs.add_argument("--output", "-o", help="write to this file instead of stdout")
    docs.add_argument("--check", action="store_true", help="exit 1 when --output differs from what would be written")
    docs.add_argument("--handler", action="append", dest="handlers", metavar="MODULE:CLASS")
    docs.add_argument("--no-entry-points", action="store_false", dest="load_entry_points", default=None)
    bench = commands.add_parser(
        "bench", help="measure Nexus against the bare libraries it is built on (docs/performance.md)"
    )
    bench.add_argument("--quick", action="store_true", help="every scenario small: seconds each")
    bench.add_argument("--pairs", type=_pairs, default=3, metavar="N", help="interleaved runs of each side (3)")
    bench.add_argument("--only", metavar="NAME,...", help="run only these scenarios (--list names them)")
    bench.add_argument("--list", action="store_true", help="list the scenarios and exit")
    bench.add_argument("--json", metavar="PATH", help="write the report (medians, ratios, raw samples) as JSON")
    bench.add_argument("--png", metavar="PATH", help="write a chart of the ratios (needs the bench extra)")
    bench.add_argument("--markdown", metavar="PATH", help="write the results table as Markdown")
    bench.add_argument("--nats", metavar="URL", default="nats://127.0.0.1:4222", help="NATS for the NATS scenarios")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _pairs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError("must be between 1 and 100")
    return value


# --- serve ------------------------------------------------------------------------------------------

AUTH_FIELDS = ("jwt_secret", "jwt_public_key_file", "jwt_audience", "jwt_issuer", "jwt_leeway_s", "allow_anonymous")

SERVE_FIELDS = (
    "host",
    "grpc_port",
    "ws_port",
    "gateway",
    "loop",
    "metrics",
    "metrics_port",
    "tracing",
    "ws_max_frame_bytes",
    "ws_max_frames_per_s",
    "bus",
    "heartbeat_interval",
    "buffer_size",
    "history_size",
    "history_max_bytes",
    "subscriber_queue",
    "max_patterns_per_subscription",
    "max_patterns_per_connection",
    "max_subscriptions_per_connection",
    "max_requests_per_connection",
    "publish_rate_per_s",
    "publish_burst",
    "max_payload_bytes",
    "max_event_bytes",
    "max_payload_depth",
    "max_metadata_entries",
    "nats_stream",
    "nats_subject_prefix",
    "nats_replicas",
    "nats_retention",
    "nats_storage",
    "nats_max_age_s",
    "nats_ack_timeout_s",
    "nats_node_heartbeat_s",
    "handlers",
    "load_entry_points",
    "exclude_handlers",
    "log_format",
    "log_level",
    "log_dir",
    "data_dir",
    "ws_allowed_origins",
    "tls_cert_file",
    "tls_key_file",
    *AUTH_FIELDS,
)


def _overrides(args: argparse.Namespace, fields: Sequence[str]) -> dict[str, Any]:
    overrides = {name: getattr(args, name, None) for name in fields}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    # '--stream-timeout none' parses to None, which must still override: it is passed on as 0 (no limit).
    if getattr(args, "stream_timeout_given", False):
        overrides["stream_timeout"] = args.stream_timeout if args.stream_timeout is not None else 0
    return overrides


def _allow_local_modules(specs: Sequence[str]) -> None:
    """Let ``--handler mymodule:Class`` find ``mymodule.py`` in the current directory, as ``python -m`` would."""
    if specs and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def _run_serve(args: argparse.Namespace) -> int:
    """``nexus serve``: the settings first, as they choose the event loop the server then runs on."""
    from nexus.config import load_settings
    from nexus.server import run

    settings = load_settings(args.config, os.environ, _overrides(args, SERVE_FIELDS))
    return run(_serve(args, settings), loop=settings.loop)


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from nexus.logs import configure_logging
    from nexus.plugins import discover
    from nexus.server import NexusServer, freeze_start_up_heap

    configure_logging(settings.log_format, settings.log_level)
    _allow_local_modules(settings.handlers)
    specs = discover(settings.load_entry_points, settings.handlers, settings.exclude_handlers)
    server = NexusServer(settings, handlers=specs)
    await server.start()
    freeze_start_up_heap()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    if sys.stderr.isatty():
        print(f"nexus: serving gRPC on {settings.host}:{server.grpc_port} (Ctrl-C to stop)", file=sys.stderr)
        if server.gateway is not None:
            print(f"nexus: page on {server.gateway.http_url}, WebSocket on {server.gateway.url}", file=sys.stderr)
        print(f"nexus: data in {settings.data_path()} (--data-dir)", file=sys.stderr)
    await stop.wait()
    await server.stop()
    return 0


GATEWAY_FIELDS = (
    "loop",
    "host",
    "ws_port",
    "ws_max_frame_bytes",
    "ws_max_frames_per_s",
    "log_format",
    "log_level",
    "ws_allowed_origins",
    "tls_cert_file",
    "tls_key_file",
    *AUTH_FIELDS,
)


def _run_gateway(args: argparse.Namespace) -> int:
    """``nexus gateway``: the settings first, as they choose the event loop the gateway then runs on."""
    from nexus.config import load_settings
    from nexus.server import run

    settings = load_settings(args.config, os.environ, _overrides(args, GATEWAY_FIELDS))
    return run(_gateway(args, settings), loop=settings.loop)


async def _gateway(args: argparse.Namespace, settings: Settings) -> int:
    from nexus.gateway.server import GatewayServer, GatewaySettings
    from nexus.logs import configure_logging
    from nexus.node_remote import DEFAULT_HISTORY_SIZE, RemoteNode
    from nexus.server import freeze_start_up_heap

    configure_logging(settings.log_format, settings.log_level)
    if args.history_size is not None and args.history_size < 1:
        raise CliError("--history-size must be at least 1")
    settings.check_exposure("nexus gateway")
    gateway_settings = GatewaySettings.from_settings(settings)  # unusable TLS files: refused before connecting
    authenticator = settings.authenticator()  # unusable keys too
    node = RemoteNode(
        args.nexus,
        history_size=args.history_size or DEFAULT_HISTORY_SIZE,
        tls=args.nexus_tls,
        ca_file=args.nexus_ca_file,
        token=args.nexus_token,
    )
    await node.start()
    gateway = GatewayServer(node, gateway_settings, authenticator=authenticator)
    try:
        await gateway.start()
    except BaseException:
        await node.close()
        raise
    freeze_start_up_heap()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    if sys.stderr.isatty():
        print(
            f"nexus: gateway for {args.nexus}: page on {gateway.http_url}, WebSocket on {gateway.url} (Ctrl-C to stop)",
            file=sys.stderr,
        )
    await stop.wait()
    # The node first: every subscription ends after what it holds, then sockets close with 1001.
    await node.close()
    await gateway.stop()
    return 0


# --- client commands --------------------------------------------------------------------------------


def _tls(args: argparse.Namespace) -> dict[str, Any]:
    """The ``NexusClient`` arguments of ``--tls`` / ``--ca-file`` and ``--token``."""
    return {
        "tls": bool(getattr(args, "tls", False)),
        "ca_file": getattr(args, "ca_file", None),
        "token": getattr(args, "token", None),
    }


async def _emit(args: argparse.Namespace) -> int:
    from nexus.client import NexusClient

    payload = _parse_payload(args.payload)
    metadata = _parse_metadata(args.metadata)
    async with NexusClient(args.server, **_tls(args)) as client:
        stored = await client.store(args.event_type, payload, event_id=args.event_id, metadata=metadata)
    if stored.duplicate:
        _say_duplicate(stored.event)
    _json_line(stored.event.to_dict(), sys.stdout)
    return 0


def _say_duplicate(event: Event) -> None:
    """Tell stderr that the server already held ``event``'s id: what stdout shows is the stored original."""
    print(
        f"nexus: duplicate: event_id {event.event_id} was already stored (offset {event.offset}); "
        "nothing new was stored, the original is shown",
        file=sys.stderr,
        flush=True,
    )


async def _subscribe(args: argparse.Namespace) -> int:
    from nexus.client import NexusClient

    if args.reconnect_max_delay < args.reconnect_initial_delay:
        raise CliError("--reconnect-max-delay must be at least --reconnect-initial-delay")
    backoff = BackoffPolicy(initial_delay=args.reconnect_initial_delay, max_delay=args.reconnect_max_delay)
    seen = 0

    def on_connect(sub: Any) -> None:
        # Called once the server's initial metadata arrived: never for an attempt that did not connect.
        info: dict[str, Any] = {"epoch": sub.epoch, "head_offset": sub.head_offset}
        if sub.recovered is not None:
            info["recovered"] = sub.recovered
        print("nexus: subscribed " + json.dumps(info), file=sys.stderr, flush=True)

    async with NexusClient(args.server, backoff=backoff, **_tls(args)) as client:
        view = await _cloudevents_view(client) if args.format == "cloudevents" else None
        subscription = client.subscribe(
            *args.patterns, since_offset=args.since_offset, epoch=args.epoch, on_connect=on_connect
        )
        async for event in subscription:
            if args.no_heartbeats and event.state == "heartbeat":
                continue
            _json_line(event.to_dict() if view is None else view.convert(event), sys.stdout)
            seen += 1
            if args.count is not None and seen >= args.count:
                subscription.close()
                break
    return 0


async def _cloudevents_view(client: NexusClient) -> CloudEventsView:
    """A CloudEvents view knowing the server's handlers' ordering keys (for ``partitionkey``), when it can ask."""
    import structlog

    from nexus.cloudevents import CloudEventsView

    try:
        handlers = await client.handlers()
    except NexusError as exc:  # the subscription itself reports an unreachable or refusing server
        structlog.get_logger("nexus.cli").info("cloudevents_ordering_keys_unknown", reason=str(exc))
        handlers = []
    keys = {str(h["event_type"]): str(h["ordering_key"]) for h in handlers if h.get("ordering_key")}
    return CloudEventsView(keys)


async def _request(args: argparse.Namespace) -> int:
    from nexus.client import NexusClient

    payload = _parse_payload(args.payload)
    metadata = _parse_metadata(args.metadata)
    last: Event | None = None
    async with NexusClient(args.server, **_tls(args)) as client:
        stream = client.request(
            args.event_type,
            payload,
            event_id=args.event_id,
            metadata=metadata,
            heartbeats=not args.no_heartbeats,
        )
        async for event in stream:
            if stream.request is not None and last is None:
                if stream.duplicate:
                    _say_duplicate(stream.request)
                _json_line(stream.request.to_dict(), sys.stdout)
            last = event
            _json_line(event.to_dict(), sys.stdout)
    return 0 if last is not None and last.state == "success" else 1


async def _cancel(args: argparse.Namespace) -> int:
    from nexus.client import NexusClient

    async with NexusClient(args.server, **_tls(args)) as client:
        found = await client.cancel(args.correlation_id, args.reason)
    _json_line({"correlation_id": args.correlation_id, "cancelled": found}, sys.stdout)
    return 0 if found else 1


async def _handlers(args: argparse.Namespace) -> int:
    if args.server:
        from nexus.client import NexusClient

        async with NexusClient(args.server, **_tls(args)) as client:
            for item in await client.handlers():
                _json_line(item, sys.stdout)
        return 0
    from nexus.bus.memory import MemoryBus
    from nexus.config import load_settings
    from nexus.plugins import discover, effective_config, register_all
    from nexus.provider import Provider, registrations_table

    fields = ("handlers", "load_entry_points", "exclude_handlers")
    settings = load_settings(args.config, os.environ, _overrides(args, fields))
    _allow_local_modules(settings.handlers)
    specs = discover(settings.load_entry_points, settings.handlers, settings.exclude_handlers)
    provider = Provider(MemoryBus(), settings.provider_settings())
    register_all(provider, specs, settings.handler_config, settings.plugin_defaults())
    sources = {spec.name: spec.source for spec in specs}
    for item in registrations_table(provider.registrations.values()):
        name = str(item["name"])
        item["source"] = sources.get(name, "")
        # The settings it would run with; TOML dates and times are shown as text.
        item["config"] = json.loads(json.dumps(effective_config(provider.registrations[name]), default=str))
        _json_line(item, sys.stdout)
    return 0


async def _streams(args: argparse.Namespace) -> int:
    from nexus.client import NexusClient

    async with NexusClient(args.server, **_tls(args)) as client:
        streams = await client.streams()
    for item in streams:
        _json_line(item, sys.stdout)
    if not streams:
        print("nexus: no live streams", file=sys.stderr, flush=True)
    return 0


async def _worker(args: argparse.Namespace) -> int:
    from nexus.config import load_settings
    from nexus.datadir import default_data_dir
    from nexus.plugins import check_handler_config, discover, installed_names
    from nexus.worker import WORKER_DATA_DIR, Worker, WorkerSettings

    fields = ("handlers", "exclude_handlers", "data_dir")
    settings = load_settings(args.config, os.environ, _overrides(args, fields))
    _allow_local_modules(settings.handlers)
    specs = discover(args.entry_points, settings.handlers, settings.exclude_handlers)
    if not specs:
        raise CliError("no handler to serve: name one with --handler MODULE:CLASS (or --entry-points)")
    check_handler_config(settings.handler_config, specs, installed_names())  # as nexus serve checks its own
    given = {"max_in_flight": args.max_in_flight, "shutdown_grace_s": args.shutdown_grace, "name": args.name}
    options = WorkerSettings(
        # Not a node's directory (it serves no port): DIR/worker, DIR the shared base unless --data-dir says.
        data_dir=str(Path(settings.data_dir or default_data_dir()) / WORKER_DATA_DIR),
        kv_limits=settings.kv_limits(),
        **{field: value for field, value in given.items() if value is not None},
    )
    worker = Worker(
        args.server,
        specs,
        options,
        handler_config=settings.handler_config,
        defaults={**settings.plugin_defaults(), "data_dir": options.data_dir},  # its plugins' files beside its kv
        **_tls(args),
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, worker.stop)
    await worker.run()
    return 0


async def _token(args: argparse.Namespace) -> int:
    from nexus.auth import mint_token
    from nexus.config import load_settings

    overrides = {"jwt_secret": args.jwt_secret, "jwt_audience": args.jwt_audience, "jwt_issuer": args.jwt_issuer}
    settings = load_settings(args.config, os.environ, overrides)
    if settings.jwt_secret is None:
        raise CliError("no JWT secret: pass --jwt-secret, set NEXUS_JWT_SECRET or jwt_secret in the config file")
    token = mint_token(
        settings.jwt_secret,
        args.sub,
        publish=args.publish,
        subscribe=args.subscribe,
        serve=args.serve,
        admin=args.admin,
        ttl_s=args.ttl,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
    )
    sys.stdout.write(token + "\n")
    return 0


async def _docs(args: argparse.Namespace) -> int:
    from nexus.config import load_settings
    from nexus.eventdocs import render_events
    from nexus.plugins import discover

    settings = load_settings(None, os.environ, _overrides(args, ("handlers", "load_entry_points")))
    _allow_local_modules(settings.handlers)
    specs = discover(settings.load_entry_points, settings.handlers, settings.exclude_handlers)
    classes = [type(spec.handler) for spec in specs]
    if args.topic == "asyncapi":
        from nexus.gateway.asyncapi import render_asyncapi
        from nexus.gateway.server import client_host

        host = f"{client_host(settings.host)}:{settings.ws_port}"
        text = render_asyncapi(classes, host=host, tls=settings.tls_cert_file is not None)
    else:
        text = render_events(classes)
    if not args.output:
        sys.stdout.write(text)
        return 0
    return _write_or_check(Path(args.output), text, check=args.check, command=f"nexus docs {args.topic}")


async def _bench(args: argparse.Namespace) -> int:
    from nexus.bench import SCENARIOS, Config, run
    from nexus.bench.report import check_chart, text_table

    if args.list:
        for scenario in SCENARIOS:
            print(f"{scenario.name:22} {scenario.title}")
        return 0
    chosen = list(SCENARIOS)
    if args.only:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        known = {scenario.name: scenario for scenario in SCENARIOS}
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise CliError(f"unknown scenario {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
        chosen = [known[name] for name in names]
    if args.png:
        check_chart()  # ChartUnavailable (a usage error) before anything runs

    def progress(line: str) -> None:
        print(f"nexus bench: {line}", file=sys.stderr, flush=True)

    report = await run(chosen, Config(quick=args.quick, nats_url=args.nats), args.pairs, progress)
    sys.stdout.write(text_table(report))
    _write_bench_files(args, report)
    return 0


def _write_bench_files(args: argparse.Namespace, report: dict[str, Any]) -> None:
    from nexus.bench.report import markdown_table, write_chart

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(report))
    if args.png:
        write_chart(report, Path(args.png))


def _write_or_check(path: Path, text: str, *, check: bool, command: str) -> int:
    if check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            print(f"nexus: {path} is out of date; run '{command} -o {path}'", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


CLIENT_COMMANDS = ("emit", "subscribe", "request", "cancel", "handlers", "streams", "docs", "token", "worker")
"""Commands whose stdout is data: their log lines must go to stderr (``serve`` and ``gateway`` set up their own)."""


def _configure_client_logging(args: argparse.Namespace) -> None:
    """Structured logs of a client command on stderr, never among the JSON lines of stdout.

    Unconfigured, structlog prints to stdout; this sends Nexus's and the libraries' records through one stderr
    handler instead. Format and level come from ``--log-format`` / ``--log-level``, else ``$NEXUS_LOG_FORMAT`` /
    ``$NEXUS_LOG_LEVEL``, else ``auto`` (console on a terminal, JSON otherwise) and ``info``.
    """
    from nexus.logs import configure_logging

    fmt = getattr(args, "log_format", None) or os.environ.get("NEXUS_LOG_FORMAT") or "auto"
    level = getattr(args, "log_level", None) or os.environ.get("NEXUS_LOG_LEVEL") or "info"
    configure_logging(fmt, level)


COMMANDS = {
    "emit": _emit,
    "subscribe": _subscribe,
    "request": _request,
    "cancel": _cancel,
    "handlers": _handlers,
    "streams": _streams,
    "worker": _worker,
    "docs": _docs,
    "token": _token,
    "bench": _bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nexus`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _run_serve(args)
        if args.command == "gateway":
            return _run_gateway(args)
        if args.command in CLIENT_COMMANDS:
            _configure_client_logging(args)
        return asyncio.run(COMMANDS[args.command](args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except ValueError as exc:  # ConfigurationError (CliError, ConfigError, HandlerConfigError, ...) included
        print(f"nexus: error: {exc}", file=sys.stderr)
        return 2
    except NexusError as exc:
        print(f"nexus: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
