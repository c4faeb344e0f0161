"""The analytics plugin's handlers: window definitions, metric values, and the bus's own live statistics.

Entry points (``[project.entry-points."nexus.handlers"]``): ``analytics.define_window``,
``analytics.record_metric``, ``analytics.stream_metrics``. The windowing algorithm is the pure
:mod:`.windows`; this module reads payloads and config, keeps the clock and publishes what the engine returns.

State. The window definitions and their open windows live in memory, in one :class:`~.windows.Engine` per node
that ``define_window`` and ``record_metric`` share (a node being one bus history, named by its epoch). Windows
defined with ``define_window`` do **not** persist: their open windows would be lost with the process anyway,
and a restart should not resurrect definitions nobody can list. Definitions that must always exist go in the
config file (``windows``, below) and are defined again at every start. On a cluster each node keeps its own
definitions and windows: send a metric's values to one node (or define the window on every node and accept
per-node aggregates).

Clocks. Event times come from ``timestamp`` (RFC 3339 or epoch seconds; the node's wall clock when absent).
Session windows also close when their metric falls silent: a timer in ``record_metric`` calls
:meth:`~.windows.Engine.tick` every ``session_check_s`` with ``time.monotonic()``, the same clock every value's
arrival is read from, so a silent session closes within ``session_check_s`` after ``gap_s + grace_s``.

Configuration (``[handlers.analytics]``, shared by the three handlers; engine-wide keys are read by the first
handler set up on a node):

- ``default_grace_s`` (0): ``grace_s`` of a definition that gives none;
- ``max_definitions`` (1000), ``max_open_windows`` (1000 per definition), ``max_windows_per_value`` (100:
  ``size_s / slide_s`` of a sliding window), ``max_samples`` (10000 values per ``p95`` window): see
  :mod:`.windows`;
- ``max_future_s`` (300): a ``timestamp`` further ahead of the node's clock is refused, so one bad clock
  cannot push the watermark past every window;
- ``session_check_s`` (0.5): how often silent session windows are looked for;
- ``windows`` ([]): definitions (``define_window`` payloads) made at start-up;
- ``metrics_interval_s`` (1.0), ``min_interval_s`` (0.1), ``max_interval_s`` (3600): ``stream_metrics``'s
  default interval and the range a request may ask for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Mapping
from typing import Any, Final

from nexus import (
    Event,
    EventHandler,
    EventSpec,
    HandlerContext,
    InvalidPayload,
    Stream,
    StreamingEventHandler,
    parse_time,
    read_int,
    read_number,
)

from .windows import AGGREGATES, KINDS, ClosedWindow, Engine, InvalidInput, Limits, WindowSpec, check_tags, rfc3339

WINDOW_CLOSED: Final = "analytics:window:v1:closed"
THRESHOLD_CROSSED: Final = "analytics:threshold:v1:crossed"


# --- configuration ------------------------------------------------------------------------------------------


def _config_number(config: Mapping[str, Any], key: str, default: float, *, minimum: float = 0.0) -> float:
    must_be = f"a number of at least {minimum:g}"
    return read_number(config, key, default, plugin="analytics", table=True, minimum=minimum, must_be=must_be)


def _config_int(config: Mapping[str, Any], key: str, default: int) -> int:
    return read_int(config, key, default, plugin="analytics", table=True, minimum=1, must_be="a positive integer")


def _limits(config: Mapping[str, Any]) -> Limits:
    defaults = Limits()
    return Limits(
        max_definitions=_config_int(config, "max_definitions", defaults.max_definitions),
        max_open_windows=_config_int(config, "max_open_windows", defaults.max_open_windows),
        max_windows_per_value=_config_int(config, "max_windows_per_value", defaults.max_windows_per_value),
        max_samples=_config_int(config, "max_samples", defaults.max_samples),
    )


# --- the engine shared by the handlers of one node -----------------------------------------------------------


@dataclasses.dataclass
class _Shared:
    engine: Engine
    default_grace_s: float
    users: int = 0


_ENGINES: dict[str, _Shared] = {}


def _acquire(ctx: HandlerContext) -> _Shared:
    """The engine of this node (its bus history), made on first use with the plugin's config."""
    key = str(ctx.stats().get("epoch", ""))
    shared = _ENGINES.get(key)
    if shared is None:
        config = ctx.config
        limits = _limits(config)
        grace = _config_number(config, "default_grace_s", 0.0)
        engine = Engine(limits)
        windows = config.get("windows", [])
        if not isinstance(windows, list):
            raise ValueError("[handlers.analytics] windows must be a list of window definitions")
        for index, payload in enumerate(windows):
            if not isinstance(payload, Mapping):
                raise ValueError(f"[handlers.analytics] windows[{index}] must be a table (a define_window payload)")
            try:
                engine.define(WindowSpec.parse(payload, default_grace_s=grace, limits=limits))
            except InvalidInput as exc:
                raise ValueError(f"[handlers.analytics] windows[{index}]: {exc}") from None
        shared = _ENGINES[key] = _Shared(engine, grace)
    shared.users += 1
    return shared


def _release(shared: _Shared) -> None:
    shared.users -= 1
    if shared.users <= 0:
        for key, value in list(_ENGINES.items()):
            if value is shared:
                del _ENGINES[key]


# --- schemas ----------------------------------------------------------------------------------------------------

_TIME = {
    "type": ["string", "number"],
    "description": "RFC 3339 text or epoch seconds; the node's clock when absent.",
}
_THRESHOLDS = {
    "type": "object",
    "description": "Alert levels; an alert is raised when a closed window's value crosses one, and on recovery.",
    "properties": {
        "low": {"type": "number", "description": "Breached at or below this value."},
        "critical": {"type": "number", "description": "Breached at or below this value (not above `low`)."},
        "high": {"type": "number", "description": "Breached at or above this value."},
        "hysteresis": {
            "type": "number",
            "minimum": 0,
            "description": "How far back past a threshold a value must come to count as recovered (default 0).",
        },
    },
    "additionalProperties": False,
}
_TAGS = {
    "type": "object",
    "additionalProperties": {"type": ["string", "number", "boolean"]},
}
_DEFINITION_PROPERTIES: dict[str, Any] = {
    "name": {"type": "string", "minLength": 1, "maxLength": 200, "description": "The window's name (unique)."},
    "metric": {"type": "string", "minLength": 1, "maxLength": 200, "description": "The metric it aggregates."},
    "kind": {"enum": list(KINDS), "description": "How values are cut into windows."},
    "size_s": {
        "type": "number",
        "exclusiveMinimum": 0,
        "description": "Window length (tumbling, sliding); for session windows the longest a session may last.",
    },
    "slide_s": {
        "type": "number",
        "exclusiveMinimum": 0,
        "description": "Sliding windows: a window starts every slide_s (at most size_s).",
    },
    "gap_s": {
        "type": "number",
        "exclusiveMinimum": 0,
        "description": "Session windows: a session ends after gap_s without values.",
    },
    "agg": {"enum": list(AGGREGATES), "description": "The aggregate a closed window reports."},
    "grace_s": {
        "type": "number",
        "minimum": 0,
        "description": "How far behind the greatest event time the watermark runs (default: config default_grace_s).",
    },
    "thresholds": _THRESHOLDS,
    "tags": {**_TAGS, "description": "Only values whose tags include all of these count."},
}

DEFINE_WINDOW_EXAMPLE: Final = {
    "name": "parking_free_5m",
    "metric": "parking.free_spaces",
    "kind": "tumbling",
    "size_s": 300,
    "agg": "mean",
    "grace_s": 30,
    "thresholds": {"low": 40, "critical": 20},
}

_WINDOW_CLOSED_SPEC = EventSpec(
    WINDOW_CLOSED,
    "A window closed (the watermark reached its end): its aggregate and how many values it held.",
    {
        "type": "object",
        "required": ["name", "metric", "start", "end", "value", "count"],
        "properties": {
            "name": {"type": "string", "description": "The window definition."},
            "metric": {"type": "string", "description": "The metric."},
            "kind": {"enum": list(KINDS), "description": "The definition's kind."},
            "agg": {"enum": list(AGGREGATES), "description": "The aggregate `value` is."},
            "start": {"type": "string", "description": "Window start (RFC 3339, inclusive)."},
            "end": {"type": "string", "description": "Window end (RFC 3339, exclusive)."},
            "value": {"type": "number", "description": "The aggregate of the window's values."},
            "count": {"type": "integer", "description": "Values in the window."},
            "late": {
                "type": "integer",
                "description": "Late values of this definition dropped since its previous closed window.",
            },
            "early": {
                "type": "boolean",
                "description": "Closed before the watermark reached its end: the definition had too many open windows.",
            },
        },
    },
    example={
        "name": "parking_free_5m",
        "metric": "parking.free_spaces",
        "kind": "tumbling",
        "agg": "mean",
        "start": "2025-01-06T08:00:00Z",
        "end": "2025-01-06T08:05:00Z",
        "value": 37.5,
        "count": 4,
        "late": 0,
        "early": False,
    },
)

_THRESHOLD_SPEC = EventSpec(
    THRESHOLD_CROSSED,
    "A closed window's value crossed a threshold: into it (`breached`) or back out of it (`recovered`). "
    "Raised once per crossing, not for every window in breach.",
    {
        "type": "object",
        "required": ["name", "level", "direction", "value", "threshold"],
        "properties": {
            "name": {"type": "string", "description": "The window definition."},
            "metric": {"type": "string", "description": "The metric."},
            "level": {"enum": ["low", "critical", "high"], "description": "The threshold crossed."},
            "direction": {"enum": ["down", "up"], "description": "The way the value moved across it."},
            "state": {"enum": ["breached", "recovered"], "description": "Whether the level is now breached."},
            "value": {"type": "number", "description": "The window's value."},
            "threshold": {"type": "number", "description": "The threshold's value."},
            "start": {"type": "string", "description": "Start of the window (RFC 3339)."},
            "end": {"type": "string", "description": "End of the window (RFC 3339)."},
        },
    },
    example={
        "name": "parking_free_5m",
        "metric": "parking.free_spaces",
        "level": "low",
        "direction": "down",
        "state": "breached",
        "value": 37.5,
        "threshold": 40,
        "start": "2025-01-06T08:00:00Z",
        "end": "2025-01-06T08:05:00Z",
    },
)


def _invalid(exc: InvalidInput, event: Event) -> InvalidPayload:
    return InvalidPayload(f"{event.event_type} payload: {exc}")


async def _publish_closed(ctx: HandlerContext, closed: list[ClosedWindow]) -> None:
    for window in closed:
        await ctx.publish(WINDOW_CLOSED, window.to_payload())
        for alert in window.alerts:
            await ctx.publish(THRESHOLD_CROSSED, alert.to_payload())


# --- handlers ---------------------------------------------------------------------------------------------------


class DefineWindow(EventHandler):
    """Defines (or replaces) a time window over a metric, with its aggregate and threshold alerts.

    Definitions live in memory on the node and do not persist; put permanent ones in the config (``windows``).
    """

    event_type = "analytics:define_window:v1"
    ordering_key = "name"
    takes = EventSpec(
        "analytics:define_window:v1:requested",
        "Define a window over a metric: tumbling (size_s), sliding (size_s, slide_s) or session (gap_s, and "
        "optionally size_s as the longest session). Replaces a definition of the same name (dropping its open "
        "windows).",
        {
            "type": "object",
            "required": ["name", "metric", "kind", "agg"],
            "properties": _DEFINITION_PROPERTIES,
        },
        example=DEFINE_WINDOW_EXAMPLE,
    )
    emits = (
        EventSpec(
            "analytics:define_window:v1:success",
            "The definition as the node keeps it (defaults filled in).",
            {
                "type": "object",
                "required": ["name", "metric", "kind", "agg", "grace_s", "replaced"],
                "properties": {
                    **_DEFINITION_PROPERTIES,
                    "replaced": {"type": "boolean", "description": "Whether a definition of this name was replaced."},
                },
            },
            example={**DEFINE_WINDOW_EXAMPLE, "tags": {}, "replaced": False},
        ),
    )

    async def setup(self, ctx: HandlerContext) -> None:
        self._shared = _acquire(ctx)

    async def teardown(self) -> None:
        _release(self._shared)

    async def handle(self, event: Event) -> dict[str, Any]:
        shared = self._shared
        try:
            spec = WindowSpec.parse(event.payload, default_grace_s=shared.default_grace_s, limits=shared.engine.limits)
            replaced = shared.engine.define(spec)
        except InvalidInput as exc:
            raise _invalid(exc, event) from None
        self.ctx.log.info("window_defined", name=spec.name, metric=spec.metric, kind=spec.kind, replaced=replaced)
        return {**spec.to_payload(), "replaced": replaced}


class RecordMetric(EventHandler):
    """Records one value of a metric into every window defined over it.

    Windows close on event time (the watermark: the greatest event time seen minus ``grace_s``) and publish
    ``analytics:window:v1:closed``; a crossed threshold publishes ``analytics:threshold:v1:crossed``.
    """

    event_type = "analytics:record_metric:v1"
    ordering_key = "metric"
    takes = EventSpec(
        "analytics:record_metric:v1:requested",
        "One value of a metric at an event time. A value whose window has already closed is late: counted and "
        "reported, not mixed into another window.",
        {
            "type": "object",
            "required": ["metric", "value"],
            "properties": {
                "metric": {"type": "string", "minLength": 1, "maxLength": 200, "description": "The metric's name."},
                "value": {"type": "number", "description": "The value."},
                "timestamp": {**_TIME, "description": "Event time: " + str(_TIME["description"])},
                "tags": {**_TAGS, "description": "Labels a window definition may select on."},
            },
        },
        example={
            "metric": "parking.free_spaces",
            "value": 35,
            "timestamp": "2025-01-06T08:03:10Z",
            "tags": {"zone": "north"},
        },
    )
    emits = (
        EventSpec(
            "analytics:record_metric:v1:success",
            "Where the value went: the windows that took it, those that found it late, and what closed.",
            {
                "type": "object",
                "required": ["metric", "timestamp", "windows", "late", "closed", "alerts"],
                "properties": {
                    "metric": {"type": "string", "description": "The metric."},
                    "timestamp": {"type": "string", "description": "The value's event time (RFC 3339)."},
                    "windows": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "Definitions that took the value.",
                    },
                    "late": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "Definitions for which the value came after its window closed (counted, "
                        "not mixed in).",
                    },
                    "closed": {"type": "integer", "description": "Windows this value closed (published)."},
                    "alerts": {"type": "integer", "description": "Threshold alerts raised (published)."},
                },
            },
            example={
                "metric": "parking.free_spaces",
                "timestamp": "2025-01-06T08:03:10Z",
                "windows": ["parking_free_5m"],
                "late": [],
                "closed": 0,
                "alerts": 0,
            },
        ),
        _WINDOW_CLOSED_SPEC,
        _THRESHOLD_SPEC,
    )

    async def setup(self, ctx: HandlerContext) -> None:
        self._shared = _acquire(ctx)
        self._max_future_s = _config_number(ctx.config, "max_future_s", 300.0)
        self._check_s = _config_number(ctx.config, "session_check_s", 0.5, minimum=0.001)
        self._timer = asyncio.create_task(self._close_silent_sessions(), name="analytics-session-timer")

    async def teardown(self) -> None:
        self._timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._timer
        _release(self._shared)

    async def _close_silent_sessions(self) -> None:
        """Close session windows whose metric fell silent (no further value would ever close them)."""
        while True:
            await asyncio.sleep(self._check_s)
            outcome = self._shared.engine.tick(time.monotonic())
            try:
                await _publish_closed(self.ctx, outcome.closed)
            except Exception as exc:
                self.ctx.log.error("window_publish_failed", error=f"{type(exc).__name__}: {exc}")

    async def handle(self, event: Event) -> dict[str, Any]:
        payload = event.payload
        metric = str(payload["metric"])
        now = time.time()
        stamp = payload.get("timestamp")
        try:
            moment = now if stamp is None else parse_time(stamp)
        except InvalidPayload as exc:
            raise InvalidPayload(f"{event.event_type} payload.timestamp: {exc.message}") from None
        if moment > now + self._max_future_s:
            raise InvalidPayload(
                f"{event.event_type} payload.timestamp: {rfc3339(moment)} is {moment - now:.0f} s ahead of this "
                f"node's clock (at most {self._max_future_s:g} s is accepted)"
            )
        try:
            tags = check_tags(payload.get("tags"))
            outcome = self._shared.engine.record(metric, payload["value"], moment, time.monotonic(), tags)
        except InvalidInput as exc:
            raise _invalid(exc, event) from None
        await _publish_closed(self.ctx, outcome.closed)
        return {
            "metric": metric,
            "timestamp": rfc3339(moment),
            "windows": outcome.matched,
            "late": outcome.late,
            "closed": len(outcome.closed),
            "alerts": len(outcome.alerts),
        }


_LATENCY = {
    "type": "object",
    "description": "Delivery latency percentiles in milliseconds (publish to subscriber), over recent deliveries.",
    "properties": {
        "p50": {"type": "number", "description": "Median, ms."},
        "p95": {"type": "number", "description": "95th percentile, ms."},
        "p99": {"type": "number", "description": "99th percentile, ms."},
        "samples": {"type": "integer", "description": "Deliveries the percentiles are taken over."},
    },
}


class StreamMetrics(StreamingEventHandler):
    """Streams the bus's own live statistics every interval, until cancelled."""

    event_type = "analytics:stream_metrics:v1"
    stream_timeout = None
    takes = EventSpec(
        "analytics:stream_metrics:v1:requested",
        "Stream this node's live statistics: one chunk at once, then one every interval_s.",
        {
            "type": "object",
            "properties": {
                "interval_s": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "description": "Seconds between chunks (default: config metrics_interval_s, 1; at least "
                    "min_interval_s, 0.1; at most max_interval_s, 3600).",
                },
            },
        },
        example={"interval_s": 5},
    )
    emits = (
        EventSpec(
            "analytics:stream_metrics:v1:stream",
            "One snapshot of the node's statistics; rates are over the last `window_s` seconds.",
            {
                "type": "object",
                "required": ["at", "events_per_s", "events_per_s_by_service", "active_streams", "subscribers"],
                "properties": {
                    "at": {"type": "string", "description": "When the snapshot was taken (RFC 3339)."},
                    "window_s": {"type": "number", "description": "The window rates are measured over, seconds."},
                    "events_per_s": {"type": "number", "description": "Events per second on the bus."},
                    "events_per_s_by_service": {
                        "type": "object",
                        "additionalProperties": {"type": "number"},
                        "description": "Events per second by service (the first token of the event type).",
                    },
                    "events_total": {"type": "integer", "description": "Events counted since the node started."},
                    "active_streams": {"type": "integer", "description": "Streams this node drives now."},
                    "active_requests": {"type": "integer", "description": "Requests (plain and streaming) running."},
                    "queued_requests": {
                        "type": "integer",
                        "description": "Requests waiting behind their ordering key.",
                    },
                    "subscribers": {"type": "integer", "description": "Subscriptions connected to the bus."},
                    "delivery_latency_ms": _LATENCY,
                    "head_offset": {"type": "integer", "description": "The bus's latest offset."},
                    "epoch": {"type": "string", "description": "The bus history's epoch."},
                },
            },
            example={
                "at": "2025-01-06T08:03:10Z",
                "window_s": 10.0,
                "events_per_s": 120.4,
                "events_per_s_by_service": {"analytics": 100.2, "messaging": 20.2},
                "events_total": 51230,
                "active_streams": 7,
                "active_requests": 8,
                "queued_requests": 0,
                "subscribers": 12,
                "delivery_latency_ms": {"p50": 0.4, "p95": 1.9, "p99": 4.2, "samples": 2048},
                "head_offset": 51230,
                "epoch": "5f1c2a9be0d34c71",
            },
        ),
    )

    async def setup(self, ctx: HandlerContext) -> None:
        self._default = _config_number(ctx.config, "metrics_interval_s", 1.0, minimum=0.001)
        self._min = _config_number(ctx.config, "min_interval_s", 0.1, minimum=0.001)
        self._max = _config_number(ctx.config, "max_interval_s", 3600.0, minimum=self._min)

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        interval = float(event.payload.get("interval_s", self._default))
        if not self._min <= interval <= self._max:
            raise InvalidPayload(
                f"{event.event_type} payload.interval_s: {interval:g} is outside {self._min:g} to {self._max:g} s"
            )
        while True:
            snapshot = dict(self.ctx.stats())
            snapshot["at"] = rfc3339(round(time.time(), 3))
            await stream.send(snapshot)
            await asyncio.sleep(interval)
