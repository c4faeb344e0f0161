"""OpenTelemetry metrics of one server: the instruments, their bounded attributes, and the Prometheus text.

One :class:`Telemetry` per :class:`~nexus.server.NexusServer` owns a ``MeterProvider`` and a Prometheus
``CollectorRegistry`` of its own (two servers in one process never share a metric), plus an OTLP reader when the
``otlp`` extra is installed and an ``OTEL_EXPORTER_OTLP_*`` endpoint is set.

Hot paths stay cheap: most counters are plain integers the bus and the transports already keep
(``BusStats``, ``GatewayStats``, the servicer's counts) read by observable instruments at scrape time; the
synchronous instruments (publishes, handler runs, delivery latency per batch) use attribute sets built once and
cached. Attribute values are bounded: the service token of a handled type (or ``other``), a handler name, a
transport, an error code; never a client-chosen event type or id.

Instruments (all with ``messaging.system = "nexus"``):

- ``messaging.client.sent.messages`` (observable counter): events accepted; ``messaging.destination.service``,
  ``nexus.transport``.
- ``messaging.client.consumed.messages`` (observable counter): events written to subscribers; ``nexus.transport``.
- ``messaging.client.operation.duration`` (histogram, s): publish latency; ``nexus.transport``. Sampled: the first
  :data:`MAX_SAMPLES` publishes between two collections (scrapes) are recorded, at collection time.
- ``messaging.process.duration`` (histogram, s): handler run time; ``nexus.handler``, ``nexus.outcome``.
- ``nexus.delivery.latency`` (histogram, s): event timestamp to a subscriber taking it (one sample per batch;
  sampled as the publish latency is).
- ``nexus.handler.failures`` (counter): ``nexus.handler``, ``error.type``.
- ``nexus.refused`` (counter): inputs refused (by the node, or a gateway error frame); ``error.type`` (the
  error code), ``nexus.transport``.
- ``nexus.streams.active`` (gauge): ``nexus.handler``.
- ``nexus.connections.active``, ``nexus.subscriptions.active`` (gauges): ``nexus.transport``.
- ``nexus.slow_consumer.disconnects`` (observable counter): ``nexus.transport`` (``bus``: a subscriber queue
  overflowed, any transport; ``websocket`` / ``sse``: a socket that could not keep up).
- ``nexus.workers.connected`` (gauge): workers serving a handler; ``nexus.handler``. ``nexus.workers.lost``
  (observable counter): workers that went away holding requests.
- ``nexus.history.events``, ``nexus.history.bytes`` (gauges); ``nexus.nats.consumer.lag``,
  ``nexus.nats.reconnects`` (NATS bus only).
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Protocol

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Histogram as _Histogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from nexus.metrics import percentile

SYSTEM: Final = "nexus"
OTHER: Final = "other"
MAX_SERVICES: Final = 64
"""Distinct service tokens labelled by name; any other service counts as ``other``."""
DURATION_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PROMETHEUS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
MAX_SAMPLES: Final = 2048
"""Latency samples (publish, delivery) kept between two collections; later ones are not sampled."""
HANDLER_WINDOW_S: Final = 60.0
HANDLER_SAMPLES: Final = 1024
_event_type: Final = operator.attrgetter("event_type")

Observe = Callable[[], Iterable[tuple[float, dict[str, str]]]]
"""A source of observations: ``(value, attributes)`` pairs, read at collection time."""


class HandlerWindow:
    """The recent runs of one handler, for the page: rate, failure rate and run-time percentiles."""

    def __init__(self) -> None:
        self.runs: deque[tuple[float, float, bool]] = deque(maxlen=HANDLER_SAMPLES)
        self.total = 0
        self.failures = 0

    def record(self, now: float, seconds: float, failed: bool) -> None:
        self.runs.append((now, seconds, failed))
        self.total += 1
        self.failures += failed

    def snapshot(self, now: float, window_s: float) -> dict[str, float]:
        recent = [run for run in self.runs if run[0] > now - window_s]
        durations = [run[1] for run in recent]
        failed = sum(1 for run in recent if run[2])
        return {
            "requests_per_s": round(len(recent) / window_s, 3),
            "failure_rate": round(failed / len(recent), 4) if recent else 0.0,
            "p50_ms": round(percentile(durations, 50) * 1000, 3),
            "p99_ms": round(percentile(durations, 99) * 1000, 3),
            "total": self.total,
            "failures": self.failures,
        }


def _otlp_reader() -> MetricReader | None:
    """A periodic OTLP reader when an ``OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT`` is set and the extra installed."""
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[import-not-found,unused-ignore]
            OTLPMetricExporter,
        )
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    except ImportError:
        return None
    return PeriodicExportingMetricReader(OTLPMetricExporter())


class Telemetry:
    """The metrics of one server. ``enabled=False`` keeps the same interface and records nothing."""

    def __init__(self, *, enabled: bool = True, otlp: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        readers: list[MetricReader] = []
        if enabled:
            readers.append(
                PrometheusMetricReader(registry=self.registry, disable_target_info=True, scope_info_enabled=False)
            )
            reader = _otlp_reader() if otlp else None
            if reader is not None:
                readers.append(reader)
        self.otlp = len(readers) > 1
        seconds = ExplicitBucketHistogramAggregation(DURATION_BUCKETS)
        self.provider = MeterProvider(
            metric_readers=readers,
            resource=Resource.create({"service.name": SYSTEM}),
            views=[View(instrument_type=_Histogram, aggregation=seconds)],
            shutdown_on_exit=False,  # stopped with its server; no atexit hook holding every test server's provider
        )
        meter = self.provider.get_meter("nexus")
        self.services: set[str] = set()
        self.handlers: dict[str, HandlerWindow] = {}
        self._attrs: dict[tuple[str, ...], dict[str, str]] = {}
        self._sources: dict[str, list[Observe]] = {}
        self._sent: dict[tuple[str, str], int] = {}
        self._service_cache: dict[str, str] = {}
        self._latency_samples: list[float] = []
        self._operation_samples: list[tuple[str, float]] = []
        meter.create_observable_counter(
            "messaging.client.sent.messages",
            [self._observe_sent],
            unit="{message}",
            description="Events accepted for publishing.",
        )
        self._operation = meter.create_histogram(
            "messaging.client.operation.duration", unit="s", description="Publish latency (until stored)."
        )
        self._process = meter.create_histogram(
            "messaging.process.duration", unit="s", description="Handler run time, by handler and outcome."
        )
        self._delivery = meter.create_histogram(
            "nexus.delivery.latency", unit="s", description="From an event's timestamp to a subscriber taking it."
        )
        self._failures = meter.create_counter(
            "nexus.handler.failures", unit="{failure}", description="Handler runs that failed or timed out."
        )
        self._refused = meter.create_counter(
            "nexus.refused", unit="{input}", description="Inputs refused, by error code and transport."
        )
        for name, kind, unit, description in (
            ("messaging.client.consumed.messages", "counter", "{message}", "Events written to subscribers."),
            ("nexus.slow_consumer.disconnects", "counter", "{disconnect}", "Subscribers cut off for being slow."),
            ("nexus.streams.active", "gauge", "{stream}", "Requests a handler is running now."),
            ("nexus.connections.active", "gauge", "{connection}", "Open client connections."),
            ("nexus.workers.connected", "gauge", "{worker}", "Workers connected, by the handler they serve."),
            ("nexus.workers.lost", "counter", "{worker}", "Workers that went away while holding requests."),
            ("nexus.subscriptions.active", "gauge", "{subscription}", "Open subscriptions."),
            ("nexus.history.events", "gauge", "{event}", "Events held in the replay history."),
            ("nexus.history.bytes", "gauge", "By", "Bytes held in the replay history."),
            ("nexus.nats.consumer.lag", "gauge", "{message}", "Stream messages not yet read by this node."),
            ("nexus.nats.reconnects", "counter", "{reconnect}", "Reconnections to NATS."),
        ):
            sources = self._sources.setdefault(name, [])
            callback = self._callback(sources)
            if kind == "counter":
                meter.create_observable_counter(name, [callback], unit=unit, description=description)
            else:
                meter.create_observable_gauge(name, [callback], unit=unit, description=description)

    # --- wiring ---------------------------------------------------------------------------------------------

    def observe(self, name: str, source: Observe) -> None:
        """Read ``source`` whenever the instrument ``name`` is collected."""
        self._sources[name].append(source)

    def _observe_sent(self, options: CallbackOptions) -> Iterable[Observation]:
        self.flush()  # collection time: the sampled latencies go into their histograms
        for (service, transport), count in list(self._sent.items()):
            yield Observation(
                count, self.attributes(messaging__destination__service=service, nexus__transport=transport)
            )

    def flush(self) -> None:
        """Record the latency samples kept since the last collection into their histograms."""
        latencies, self._latency_samples = self._latency_samples, []
        operations, self._operation_samples = self._operation_samples, []
        attrs = self.attributes()
        for seconds in latencies:
            self._delivery.record(seconds, attrs)
        for transport, seconds in operations:
            self._operation.record(seconds, self._transport_attrs(transport))

    def _callback(self, sources: list[Observe]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for source in sources:
                for value, attributes in source():
                    yield Observation(value, self.attributes(**attributes))

        return callback

    def attributes(self, **values: str) -> dict[str, str]:
        """The attribute set (with ``messaging.system``), built once per distinct value combination."""
        key = tuple(item for pair in sorted(values.items()) for item in pair)
        found = self._attrs.get(key)
        if found is None:
            found = {"messaging.system": SYSTEM}
            found.update({name.replace("__", "."): value for name, value in values.items()})
            self._attrs[key] = found
        return found

    def add_services(self, services: Iterable[str]) -> None:
        """Label these service tokens by name (the handlers' services); at most :data:`MAX_SERVICES`."""
        for service in services:
            if len(self.services) < MAX_SERVICES:
                self.services.add(service)

    def service_of(self, event_type: str) -> str:
        service = event_type.partition(":")[0]
        return service if service in self.services else OTHER

    # --- recording (hot paths) ------------------------------------------------------------------------------

    def published(self, events: Sequence[Any], transport: str, seconds: float) -> None:
        """``events`` were stored through ``transport`` in ``seconds``."""
        if not self.enabled:
            return
        if len(self._operation_samples) < MAX_SAMPLES:
            self._operation_samples.append((transport, seconds))
        cache = self._service_cache
        sent = self._sent
        # Counted per distinct type, not per event: a batch is mostly of one type.
        types = Counter(map(_event_type, events)) if len(events) > 1 else {events[0].event_type: 1} if events else {}
        for event_type, count in types.items():
            service = cache.get(event_type)
            if service is None:
                if len(cache) > 10_000:
                    cache.clear()
                service = cache[event_type] = self.service_of(event_type)
            key = (service, transport)
            sent[key] = sent.get(key, 0) + count

    def _transport_attrs(self, transport: str) -> dict[str, str]:
        return self.attributes(nexus__transport=transport)

    def refused(self, code: str, transport: str) -> None:
        if self.enabled:
            self._refused.add(1, self.attributes(error__type=code, nexus__transport=transport))

    def delivery_latency(self, seconds: float) -> None:
        if self.enabled and len(self._latency_samples) < MAX_SAMPLES:
            self._latency_samples.append(seconds)

    def handler_ended(self, handler: str, outcome: str, seconds: float, error_type: str | None) -> None:
        """One run of ``handler`` ended with ``outcome`` (``success``, ``failed``, ``timeout``, ``cancelled``)."""
        if not self.enabled:
            return
        self._process.record(seconds, self.attributes(nexus__handler=handler, nexus__outcome=outcome))
        failed = outcome in ("failed", "timeout")
        if failed:
            self._failures.add(1, self.attributes(nexus__handler=handler, error__type=error_type or outcome))
        window = self.handlers.get(handler)
        if window is None:
            window = self.handlers[handler] = HandlerWindow()
        window.record(time.monotonic(), seconds, failed)

    # --- reading --------------------------------------------------------------------------------------------

    def prometheus_text(self) -> bytes:
        """Every instrument in the Prometheus text format (collected now)."""
        self.flush()
        return generate_latest(self.registry)

    def handler_snapshot(self, window_s: float = HANDLER_WINDOW_S) -> dict[str, dict[str, float]]:
        now = time.monotonic()
        return {name: window.snapshot(now, window_s) for name, window in sorted(self.handlers.items())}

    def shutdown(self) -> None:
        """Stop the readers (the OTLP one flushes); the registry is released."""
        self.provider.shutdown()


class _Readiness(Protocol):
    @property
    def healthy(self) -> bool: ...

    @property
    def ready(self) -> bool: ...


class MetricsHttpServer:
    """``--metrics-port``: ``/metrics``, ``/healthz`` and ``/readyz`` on a port of their own (plain HTTP/1.1 GET).

    For a server without the gateway, or to keep scrapes off the public port; it answers without a token, so
    bind it where only the scraper reaches it.
    """

    def __init__(self, telemetry: Telemetry, node: _Readiness, host: str) -> None:
        self.telemetry = telemetry
        self.node = node
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for ``GET path``."""
        if path == "/metrics":
            if not self.telemetry.enabled:
                return 404, "text/plain", b"metrics are off\n"
            return 200, PROMETHEUS_CONTENT_TYPE, self.telemetry.prometheus_text()
        if path == "/healthz":
            return (200, "text/plain", b"ok\n") if self.node.healthy else (503, "text/plain", b"unavailable\n")
        if path == "/readyz":
            return (200, "text/plain", b"ready\n") if self.node.ready else (503, "text/plain", b"not ready\n")
        return 404, "text/plain", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else "/"
            status, content_type, body = self.answer(path)
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
