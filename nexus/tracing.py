"""Traces with W3C trace context: the spans a Nexus server records, and how ``traceparent`` flows.

One :class:`Tracing` per server (its own :class:`~opentelemetry.sdk.trace.TracerProvider`, never the global one,
so two servers in one process do not share spans). The node, the provider and the transports receive it; a
disabled one (:meth:`Tracing.off`) costs one attribute check per call.

Spans follow the OpenTelemetry messaging conventions (``messaging.system = "nexus"``), named after a bounded
destination (:meth:`nexus.node.Node.destination`: ``service:action`` of a handled type, else the service token):

- ``publish <destination>`` (PRODUCER, ``messaging.operation.type = "send"``): each publish or request at the
  node, a child of the event's own ``traceparent`` when it has one; that ``traceparent`` is then replaced by
  this span's context (the message's creation context). An event without one is stored unchanged (a root span).
- ``process <service:action>`` (CONSUMER, ``process``): each handler run, a child of the request's
  ``traceparent``. The request's lifecycle events (``started``, ``stream``, heartbeats, the terminal one) and
  the handler's side events carry this span's context as their ``traceparent``.
- ``deliver <destination>`` (PRODUCER, ``send``, ``nexus.transport``): one per batch handed to a gRPC, WebSocket
  or SSE subscriber, a child of the first event's context, linked to the others'; batches whose events carry
  no ``traceparent`` are not recorded (a plain publisher's events cost nothing on the way out).

Log lines written inside a publish or a handler run carry ``trace_id`` and ``span_id`` (structlog contextvars).
OTLP export is added when an ``OTEL_EXPORTER_OTLP_*`` endpoint variable is set and the ``otlp`` extra is
installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from nexus.events import Event

SYSTEM: Final = "nexus"
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
MAX_LINKS: Final = 16
"""Links a delivery span keeps to the contexts of the other events of its batch."""
_propagator: Final = TraceContextTextMapPropagator()


def traceparent_of(context: SpanContext) -> str:
    """The W3C ``traceparent`` header of ``context``."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def span_context(traceparent: str | None) -> SpanContext | None:
    """The remote span context a ``traceparent`` names, or None when it is absent or malformed (cheap: no regex)."""
    if traceparent is None or len(traceparent) != 55:
        return None
    version, trace_id, span_id, flags = traceparent.split("-") if traceparent.count("-") == 3 else ("", "", "", "")
    if version != "00" or len(trace_id) != 32 or len(span_id) != 16 or len(flags) != 2:
        return None
    try:
        tid, sid, fl = int(trace_id, 16), int(span_id, 16), int(flags, 16)
    except ValueError:
        return None
    if not tid or not sid:
        return None
    return SpanContext(tid, sid, is_remote=True, trace_flags=TraceFlags(fl))


def extract(metadata: dict[str, str]) -> Context:
    """The OpenTelemetry context an event's metadata carries (``traceparent`` / ``tracestate``)."""
    return _propagator.extract(metadata)


def inject(metadata: dict[str, str]) -> dict[str, str]:
    """``metadata`` with the current span's ``traceparent`` (and ``tracestate``) unless it has one already."""
    if TRACEPARENT in metadata:
        return metadata
    if not trace.get_current_span().get_span_context().is_valid:
        return metadata
    carrier = dict(metadata)
    _propagator.inject(carrier)
    return carrier


def _ids(context: SpanContext) -> dict[str, str]:
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def otlp_configured() -> bool:
    """Whether a standard ``OTEL_EXPORTER_OTLP_*`` endpoint variable asks for OTLP export of traces."""
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


class Tracing:
    """What a server records spans with. See the module docstring."""

    def __init__(self, provider: TracerProvider | None, *, recording: bool = True) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self.recording = self.enabled and recording
        """Spans go somewhere (an exporter): every publish gets one. Without, only traced events (a caller's
        ``traceparent``) do, so trace context flows and an untraced publish costs nothing."""
        self.tracer: trace.Tracer = provider.get_tracer("nexus") if provider is not None else trace.NoOpTracer()

    def wants(self, event: Event) -> bool:
        """Whether publishing ``event`` gets a span: always while spans are exported, else only inside a trace."""
        return self.recording or (self.enabled and TRACEPARENT in event.metadata)

    @classmethod
    def off(cls) -> Tracing:
        """Records nothing."""
        return cls(None)

    @classmethod
    def create(cls, *processors: SpanProcessor) -> Tracing:
        """A tracer provider of its own with ``processors`` (tests pass an in-memory exporter's), plus a batched
        OTLP exporter when :func:`otlp_configured` and the ``otlp`` extra is installed."""
        exporters = list(processors)
        if otlp_configured():
            if importlib.util.find_spec("opentelemetry.exporter.otlp") is not None:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                    OTLPSpanExporter,
                )
                from opentelemetry.sdk.trace.export import BatchSpanProcessor

                exporters.append(BatchSpanProcessor(OTLPSpanExporter()))
            else:
                structlog.get_logger("nexus.tracing").warning(
                    "otlp_unavailable", hint="install nexus-bus[otlp] to export traces over OTLP"
                )
        # With nothing to export spans to, a span is recorded only inside a trace a caller samples (its
        # traceparent says so); otherwise spans are non-recording: trace context still flows (traceparent on
        # lifecycle events, trace_id in logs) at the cost of ids, not of recording.
        sampler = ParentBased(root=ALWAYS_ON) if exporters else ParentBased(root=ALWAYS_OFF)
        # The server shuts it down: no atexit hook per server.
        provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
        for processor in exporters:
            provider.add_span_processor(processor)
        return cls(provider, recording=bool(exporters))

    def shutdown(self) -> None:
        """Flush and stop the exporters."""
        if self.provider is not None:
            self.provider.shutdown()

    # --- spans ------------------------------------------------------------------------------------------------

    def publishing(self, event: Event, destination: str) -> _Publishing:
        """A ``publish`` span around storing ``event`` (a context manager yielding the event to store, stamped
        with the span's ``traceparent`` when it came with one). Log lines inside carry the span's ``trace_id``
        and ``span_id``. Does nothing when disabled."""
        return _Publishing(self, event, destination)

    @contextlib.contextmanager
    def processing(self, request: Event, destination: str, handler: str) -> Iterator[Span | None]:
        """A ``process`` span, current for the handler run, a child of the request's ``traceparent``; binds its
        ``trace_id`` / ``span_id`` to the task's log context. Yields None when disabled."""
        if not self.enabled:
            yield None
            return
        with self.tracer.start_as_current_span(
            f"process {destination}",
            context=extract(request.metadata),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": destination,
                "messaging.message.id": request.event_id,
                "messaging.message.conversation_id": request.event_id,
                "nexus.handler": handler,
            },
        ) as span:
            structlog.contextvars.bind_contextvars(**_ids(span.get_span_context()))
            yield span

    def delivered(self, events: Sequence[Event], destination: str, transport: str) -> None:
        """Record one ``deliver`` span for a batch handed to a subscriber: a child of the first event's context,
        linked to the other contexts in the batch (at most :data:`MAX_LINKS`); none when no event of the batch
        carries a ``traceparent``."""
        if not self.enabled or not events:
            return
        parent: SpanContext | None = None
        links: list[Link] = []
        seen: set[int] = set()
        for event in events:
            context = span_context(event.metadata.get(TRACEPARENT))
            if context is None or context.span_id in seen:
                continue
            seen.add(context.span_id)
            if parent is None:
                parent = context
            elif len(links) < MAX_LINKS:
                links.append(Link(context))
        if parent is None:
            return  # no event of the batch belongs to a trace: nothing to link the delivery to, and it is cheap
        span = self.tracer.start_span(
            f"deliver {destination}",
            context=trace.set_span_in_context(NonRecordingSpan(parent)),
            kind=SpanKind.PRODUCER,
            links=links,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "send",
                "messaging.destination.name": destination,
                "messaging.message.id": events[0].event_id,
                "messaging.batch.message_count": len(events),
                "nexus.transport": transport,
            },
        )
        span.end()


class _Publishing:
    """The ``publish`` span of one event (a class, not a generator: it runs on every publish)."""

    __slots__ = ("_destination", "_event", "_span", "_tokens", "_tracing")

    def __init__(self, tracing: Tracing, event: Event, destination: str) -> None:
        self._tracing = tracing
        self._event = event
        self._destination = destination
        self._span: Span | None = None
        self._tokens: Mapping[str, Any] = {}

    def __enter__(self) -> Event:
        event = self._event
        if not self._tracing.enabled:
            return event
        metadata = event.metadata
        traced = TRACEPARENT in metadata
        if not traced and not self._tracing.recording:
            return event  # nothing would see its span, and no trace to continue
        if not traced:
            parent = Context()
        elif TRACESTATE in metadata:
            parent = extract(metadata)
        else:  # the common case, without the propagator's regular expressions
            remote = span_context(metadata[TRACEPARENT])
            parent = trace.set_span_in_context(NonRecordingSpan(remote)) if remote is not None else Context()
        span = self._span = self._tracing.tracer.start_span(
            f"publish {self._destination}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "send",
                "messaging.destination.name": self._destination,
                "messaging.message.id": event.event_id,
            },
        )
        context = span.get_span_context()
        self._tokens = structlog.contextvars.bind_contextvars(
            trace_id=f"{context.trace_id:032x}", span_id=f"{context.span_id:016x}"
        )
        # An event that came with a trace continues it from here; one without is stored as it came (its span is
        # a root: the event's metadata, and its size, stay the client's).
        return event.evolve(metadata={**metadata, TRACEPARENT: traceparent_of(context)}) if traced else event

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        span = self._span
        if span is None:
            return
        structlog.contextvars.reset_contextvars(**self._tokens)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            span.set_attribute("error.type", type(error).__name__)
        span.end()


def ended_with_error(span: Span | None, error: BaseException) -> None:
    """Mark a handler-run span as failed by ``error`` (recorded as an exception event)."""
    if span is None:
        return
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.set_attribute("error.type", type(error).__name__)


__all__ = [
    "Tracing",
    "ended_with_error",
    "extract",
    "inject",
    "span_context",
    "traceparent_of",
]
