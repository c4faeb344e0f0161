"""Traces and logs: a request's spans continue its caller's trace, its events carry it, its log lines name it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from nexus import Event, Stream, StreamingEventHandler
from nexus.events import Event as EventT
from nexus.logs import configure_logging
from nexus.testing import TestServer, run_server
from nexus.tracing import Tracing, span_context, traceparent_of

GUARD = 15.0
CHUNKS_TYPE = "demo:stream_chunks:v1:requested"
TERMINAL = {"success", "failed", "timeout", "cancelled"}


class Chunks(StreamingEventHandler):
    """Sends ``n`` chunks; with ``fail`` raises after them."""

    event_type = "demo:stream_chunks"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        for i in range(int(event.payload["n"])):
            await stream.send({"i": i})
        if event.payload.get("fail"):
            raise RuntimeError("kaboom")  # FAILING LINE


FAILING_LINE = next(
    number
    for number, line in enumerate(open(__file__, encoding="utf-8").read().splitlines(), start=1)  # noqa: SIM115
    if line.rstrip().endswith("# FAILING LINE") and "raise" in line
)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def nexus(exporter: InMemorySpanExporter) -> AsyncIterator[TestServer]:
    tracing = Tracing.create(SimpleSpanProcessor(exporter))
    async with run_server(Chunks(), gateway=True, heartbeat_interval=0, tracing=tracing) as server:
        yield server


@pytest.fixture
def caller() -> Iterator[Any]:
    """The caller's own tracer (its own provider, as an application instrumented with OpenTelemetry has)."""
    provider = TracerProvider()
    yield provider.get_tracer("caller")
    provider.shutdown()


async def spans_until(
    exporter: InMemorySpanExporter, condition: Callable[[list[ReadableSpan]], bool]
) -> list[ReadableSpan]:
    """The finished spans once ``condition`` holds (a span is exported when it ends, after its events flow)."""
    async with asyncio.timeout(GUARD):
        while not condition(spans := list(exporter.get_finished_spans())):  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.01)
    return spans


def named(spans: list[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name.startswith(prefix)]


async def check_linked_trace(
    exporter: InMemorySpanExporter, trace_id: int, caller_span_id: int, events: list[EventT], transport: str
) -> None:
    """publish (child of the caller) → process (child of publish) → deliver (children of process), one trace;
    started, stream and terminal events carry the handler run's context."""
    spans = await spans_until(exporter, lambda spans: bool(named(spans, "process ")) and bool(named(spans, "deliver ")))
    ours = [span for span in spans if span.context is not None and span.context.trace_id == trace_id]
    [publish] = named(ours, "publish ")
    [process] = named(ours, "process ")
    delivers = named(ours, "deliver ")
    assert publish.name == "publish demo:stream_chunks"
    assert publish.kind is SpanKind.PRODUCER
    assert publish.parent is not None
    assert publish.parent.span_id == caller_span_id
    assert publish.attributes is not None
    assert publish.attributes["messaging.system"] == "nexus"
    assert publish.attributes["messaging.destination.name"] == "demo:stream_chunks"
    assert publish.attributes["messaging.operation.type"] == "send"
    assert publish.attributes["messaging.message.id"] == events[0].correlation_id

    assert process.name == "process demo:stream_chunks"
    assert process.kind is SpanKind.CONSUMER
    assert process.parent is not None
    assert process.context is not None
    assert publish.context is not None
    assert process.parent.span_id == publish.context.span_id
    assert process.attributes is not None
    assert process.attributes["messaging.operation.type"] == "process"

    assert delivers, "no deliver span"
    for deliver in delivers:
        assert deliver.parent is not None
        assert deliver.parent.span_id == process.context.span_id
        assert deliver.attributes is not None
        assert deliver.attributes["nexus.transport"] == transport
        assert deliver.attributes["messaging.destination.name"] == "demo:stream_chunks"
    assert sum(int(str(d.attributes["messaging.batch.message_count"])) for d in delivers if d.attributes) >= len(events)

    assert [event.state for event in events] == ["started", "stream", "stream", "success"]
    for event in events:
        context = span_context(event.metadata.get("traceparent"))
        assert context is not None, f"{event.event_type} carries no traceparent"
        assert context.trace_id == trace_id
        assert context.span_id == process.context.span_id


async def test_a_streaming_request_over_grpc_yields_linked_spans_under_the_callers_trace(
    nexus: TestServer, exporter: InMemorySpanExporter, caller: Any
) -> None:
    """The SDK sends its current span; publish → handler run → deliveries, and the lifecycle carries the trace."""
    with caller.start_as_current_span("caller") as root:
        events = [event async for event in nexus.client.request(CHUNKS_TYPE, {"n": 2})]
    context = root.get_span_context()
    await check_linked_trace(exporter, context.trace_id, context.span_id, events, "grpc")


async def test_a_streaming_request_over_websocket_yields_linked_spans_under_the_callers_trace(
    nexus: TestServer, exporter: InMemorySpanExporter, caller: Any
) -> None:
    """A WebSocket request with a traceparent (as the JavaScript client's option sends it) continues that trace."""
    with caller.start_as_current_span("browser") as root:
        traceparent = traceparent_of(root.get_span_context())
    async with connect(nexus.ws_url, subprotocols=[Subprotocol("nexus.v1")], open_timeout=GUARD) as ws:
        assert json.loads(await ws.recv())["type"] == "connection"
        frame = {
            "type": CHUNKS_TYPE,
            "event_id": "req-ws-1",
            "payload": {"n": 2},
            "metadata": {"traceparent": traceparent},
        }
        await ws.send(json.dumps(frame))
        events: list[EventT] = []
        async with asyncio.timeout(GUARD):
            while not events or events[-1].state not in TERMINAL:
                message = json.loads(await ws.recv())
                if ":" in message["type"] and not message["type"].endswith(":requested"):
                    events.append(
                        EventT(event_type=message["type"], event_id=message["event_id"], metadata=message["metadata"])
                    )
    context = root.get_span_context()
    await check_linked_trace(exporter, context.trace_id, context.span_id, events, "websocket")


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


async def test_a_failing_handler_is_logged_with_its_traceback_and_every_line_carries_the_trace(
    nexus: TestServer, caller: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """handler_failed shows the line that raised; every line of the request names its trace and its event."""
    configure_logging("json", "info")
    with caller.start_as_current_span("caller") as root:
        events = [event async for event in nexus.client.request(CHUNKS_TYPE, {"n": 1, "fail": True})]
    assert events[-1].state == "failed"
    trace_id = f"{root.get_span_context().trace_id:032x}"
    correlation_id = events[-1].correlation_id

    lines: list[dict[str, Any]] = []
    async with asyncio.timeout(GUARD):
        while True:
            lines += json_lines(capsys.readouterr().err)
            if any(line.get("event") == "stream_ended" for line in lines):
                break
            await asyncio.sleep(0.01)
    ours = [line for line in lines if line.get("correlation_id") == correlation_id]
    assert {"stream_started", "handler_failed", "stream_ended"} <= {line["event"] for line in ours}
    for line in ours:
        assert line["trace_id"] == trace_id, line
        assert len(line["span_id"]) == 16
        assert line["event_type"] == CHUNKS_TYPE

    [failed] = [line for line in ours if line["event"] == "handler_failed"]
    assert failed["error"] == "RuntimeError: kaboom"
    frames = [frame for exc in failed["exception"] for frame in exc["frames"]]
    assert any(
        frame["filename"] == __file__ and frame["lineno"] == FAILING_LINE and frame["name"] == "handle_stream"
        for frame in frames
    ), frames

    [ended] = [line for line in ours if line["event"] == "stream_ended"]
    assert ended["outcome"] == "failed"
    assert ended["stream_count"] == 1
    assert "duration_s" in ended


async def test_tracing_off_records_nothing_and_leaves_traceparent_alone(caller: Any) -> None:
    """With tracing off, the request's own traceparent passes through to its lifecycle unchanged."""
    async with run_server(Chunks(), heartbeat_interval=0, tracing=Tracing.off()) as nexus:
        with caller.start_as_current_span("caller") as root:
            events = [event async for event in nexus.client.request(CHUNKS_TYPE, {"n": 1})]
    sent = traceparent_of(root.get_span_context())
    assert {event.metadata["traceparent"] for event in events} == {sent}


async def test_without_an_exporter_trace_context_still_flows_and_untraced_publishes_are_left_alone(
    caller: Any,
) -> None:
    """Tracing on with nothing to export to: an untraced publish is stored exactly as sent (no span, no cost), and a
    caller's trace still continues through the handler run into the lifecycle events' traceparent."""
    async with run_server(Chunks(), heartbeat_interval=0, tracing=Tracing.create()) as nexus:
        plain = await nexus.client.emit("demo:note:v1:made", {})
        assert "traceparent" not in plain.metadata
        with caller.start_as_current_span("caller") as span:
            trace_id = span.get_span_context().trace_id
            events = [event async for event in nexus.client.request("demo:stream_chunks:v1:requested", {"n": 2})]
    lifecycle = [e for e in events if e.state in ("started", "stream", "success")]
    assert [e.state for e in lifecycle] == ["started", "stream", "stream", "success"]
    for event in lifecycle:
        context = span_context(event.metadata["traceparent"])
        assert context is not None
        assert context.trace_id == trace_id
