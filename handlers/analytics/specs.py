"""The analytics plugin's declarations: what each handler takes and emits, with payload schemas and examples, and
the settings of its ``[handlers.analytics]`` section (:data:`CONFIG`)."""

from __future__ import annotations

from typing import Any, Final

from nexus import ConfigKey, EventSpec

from .windows import AGGREGATES, KINDS, Limits

_LIMITS: Final = Limits()
CONFIG: Final = (
    ConfigKey("default_grace_s", float, 0.0, "grace_s of a definition that gives none."),
    ConfigKey("default_silence_s", float, 0.0, "silence_s of a definition that gives none (0: off)."),
    ConfigKey("max_thresholds", int, _LIMITS.max_thresholds, "Named thresholds per definition."),
    ConfigKey("max_snapshot_windows", int, 1000, "The most windows one snapshot answers (its default limit)."),
    ConfigKey("max_definitions", int, _LIMITS.max_definitions, "Window definitions a node keeps."),
    ConfigKey("max_open_windows", int, _LIMITS.max_open_windows, "Open windows per definition."),
    ConfigKey("max_windows_per_value", int, _LIMITS.max_windows_per_value, "size_s / slide_s of a sliding window."),
    ConfigKey("max_samples", int, _LIMITS.max_samples, "Values a p95 window keeps."),
    ConfigKey("max_future_s", float, 300.0, "A timestamp further ahead of the node's clock is refused."),
    ConfigKey("session_check_s", float, 0.5, "How often silent sessions and sources are looked for."),
    ConfigKey("windows", list, [], "Definitions (define_window payloads) made at start-up."),
    ConfigKey("metrics_interval_s", float, 1.0, "stream_metrics's default interval."),
    ConfigKey("min_interval_s", float, 0.1, "The shortest interval a stream_metrics request may ask for."),
    ConfigKey("max_interval_s", float, 3600.0, "The longest interval a stream_metrics request may ask for."),
)
DEFAULTS: Final = {key.name: key.default for key in CONFIG}

WINDOW_CLOSED: Final = "analytics:window:v1:closed"
THRESHOLD_CROSSED: Final = "analytics:threshold:v1:crossed"
SOURCE_SILENT: Final = "analytics:source:v1:silent"
SOURCE_RESUMED: Final = "analytics:source:v1:resumed"

_TIME = {
    "type": ["string", "number"],
    "description": "RFC 3339 text or epoch seconds; the node's clock when absent.",
}

_LEVELS = {
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

_NAMED_THRESHOLD = {
    "type": "object",
    "description": "A named threshold: breached at or above `above` (at or below `below`), cleared once a value "
    "is back past it by more than `hysteresis`.",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 200, "description": "Its name, unique in the list."},
        "above": {"type": "number", "description": "Breached at or above this value."},
        "below": {"type": "number", "description": "Breached at or below this value."},
        "hysteresis": {
            "type": "number",
            "minimum": 0,
            "description": "How far back past the bound a value must come to clear the alert (default 0).",
        },
    },
    "oneOf": [{"required": ["above"]}, {"required": ["below"]}],
    "additionalProperties": False,
}

_THRESHOLDS = {
    "description": "Either {low, critical, high, hysteresis} or a list of named thresholds (at most "
    "max_thresholds, 32). An alert is raised when a closed window's value crosses one, and when it clears.",
    "oneOf": [
        _LEVELS,
        {"type": "array", "maxItems": 1000, "items": _NAMED_THRESHOLD},
    ],
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
    "silence_s": {
        "type": "number",
        "minimum": 0,
        "description": "Publish analytics:source:v1:silent once no matching value has arrived for this many "
        "seconds (0: never; default: config default_silence_s, 0).",
    },
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
            "level": {
                "type": "string",
                "description": "The threshold crossed: low, critical or high, or a named threshold's name.",
            },
            "bound": {"enum": ["above", "below"], "description": "The side of `threshold` on which it is breached."},
            "hysteresis": {"type": "number", "description": "The threshold's hysteresis."},
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
        "bound": "below",
        "hysteresis": 0,
        "start": "2025-01-06T08:00:00Z",
        "end": "2025-01-06T08:05:00Z",
    },
)

_SOURCE_PROPERTIES: dict[str, Any] = {
    "name": {"type": "string", "description": "The window definition whose source it is."},
    "metric": {"type": "string", "description": "The metric."},
    "silence_s": {"type": "number", "description": "The definition's silence_s."},
    "silent_for_s": {"type": "number", "description": "Seconds since the last value (node's monotonic clock)."},
    "last_value_at": {"type": "string", "description": "Event time of the last value before the silence."},
}

_SOURCE_SILENT_SPEC = EventSpec(
    SOURCE_SILENT,
    "No value matching a window definition has arrived for its silence_s. Published once per silence, within "
    "session_check_s of the moment.",
    {
        "type": "object",
        "required": ["name", "metric", "silence_s", "silent_for_s", "last_value_at"],
        "properties": _SOURCE_PROPERTIES,
    },
    example={
        "name": "boiler_temp_1m",
        "metric": "boiler.temperature",
        "silence_s": 120,
        "silent_for_s": 120.3,
        "last_value_at": "2025-01-06T08:03:10Z",
    },
)

_SOURCE_RESUMED_SPEC = EventSpec(
    SOURCE_RESUMED,
    "A value came for a definition whose source had been reported silent.",
    {
        "type": "object",
        "required": ["name", "metric", "silence_s", "silent_for_s", "last_value_at", "value_at"],
        "properties": {
            **_SOURCE_PROPERTIES,
            "silent_for_s": {"type": "number", "description": "How long the silence lasted, seconds."},
            "value_at": {"type": "string", "description": "Event time of the value that ended the silence."},
        },
    },
    example={
        "name": "boiler_temp_1m",
        "metric": "boiler.temperature",
        "silence_s": 120,
        "silent_for_s": 431.9,
        "last_value_at": "2025-01-06T08:03:10Z",
        "value_at": "2025-01-06T08:10:22Z",
    },
)

DEFINE_WINDOW_TAKES = EventSpec(
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

DEFINE_WINDOW_EMITS = (
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
        example={**DEFINE_WINDOW_EXAMPLE, "tags": {}, "silence_s": 0, "replaced": False},
    ),
)

RECORD_METRIC_TAKES = EventSpec(
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

RECORD_METRIC_EMITS = (
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
    _SOURCE_SILENT_SPEC,
    _SOURCE_RESUMED_SPEC,
)

_OPEN_WINDOW = {
    "type": "object",
    "required": ["name", "metric", "kind", "agg", "start", "end", "value", "count"],
    "properties": {
        "name": {"type": "string", "description": "The window definition."},
        "metric": {"type": "string", "description": "The metric."},
        "kind": {"enum": list(KINDS), "description": "The definition's kind."},
        "agg": {"enum": list(AGGREGATES), "description": "The aggregate `value` is."},
        "start": {"type": "string", "description": "Window start (RFC 3339, inclusive)."},
        "end": {
            "type": "string",
            "description": "Window end (RFC 3339, exclusive); for a session, where it ends if no value comes.",
        },
        "value": {"type": "number", "description": "The aggregate of the values the window holds so far."},
        "count": {"type": "integer", "description": "Values in the window so far."},
    },
}

SNAPSHOT_TAKES = EventSpec(
    "analytics:snapshot:v1:requested",
    "The open windows of this node with their aggregates so far, by definition name and start; optionally of "
    "one definition or one metric only.",
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 200, "description": "Only this definition."},
            "metric": {"type": "string", "minLength": 1, "maxLength": 200, "description": "Only this metric."},
            "limit": {
                "type": "integer",
                "minimum": 1,
                "description": "At most this many windows (default and most: config max_snapshot_windows, 1000).",
            },
        },
    },
    example={"metric": "parking.free_spaces"},
)

SNAPSHOT_EMITS = (
    EventSpec(
        "analytics:snapshot:v1:success",
        "The open windows; `total` counts all that matched, `truncated` says some were left out.",
        {
            "type": "object",
            "required": ["at", "windows", "total", "truncated", "definitions"],
            "properties": {
                "at": {"type": "string", "description": "When the snapshot was taken (RFC 3339)."},
                "windows": {"type": "array", "items": _OPEN_WINDOW, "description": "The open windows."},
                "total": {"type": "integer", "description": "Open windows that matched, listed or not."},
                "truncated": {"type": "boolean", "description": "Whether the limit left some out."},
                "definitions": {"type": "integer", "description": "Definitions that matched."},
            },
        },
        example={
            "at": "2025-01-06T08:03:10Z",
            "windows": [
                {
                    "name": "parking_free_5m",
                    "metric": "parking.free_spaces",
                    "kind": "tumbling",
                    "agg": "mean",
                    "start": "2025-01-06T08:00:00Z",
                    "end": "2025-01-06T08:05:00Z",
                    "value": 36.5,
                    "count": 3,
                }
            ],
            "total": 1,
            "truncated": False,
            "definitions": 1,
        },
    ),
)

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

STREAM_METRICS_TAKES = EventSpec(
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

STREAM_METRICS_EMITS = (
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
