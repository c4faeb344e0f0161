"""The anomalies plugin's declarations: what each handler takes and emits, with payload schemas and examples, and
the settings of its ``[handlers.anomalies]`` section (:data:`CONFIG`)."""

from __future__ import annotations

from typing import Any, Final

from nexus import ConfigKey, EventSpec

from .baseline import BaselineSettings
from .follow import DEFAULT_MAX_LINE_BYTES
from .logs import LogSettings

CONFIG: Final = (
    *ConfigKey.from_dataclass(LogSettings),
    *ConfigKey.from_dataclass(BaselineSettings),
    ConfigKey("poll_interval_s", float, 0.25, "How often stream_log looks for new lines."),
    ConfigKey("max_line_bytes", int, DEFAULT_MAX_LINE_BYTES, "The longest line stream_log reads (longer: cut)."),
    ConfigKey("stats_interval_s", float, 60.0, "How often stream_log publishes its statistics (0: never)."),
    ConfigKey("sync_timeout_s", float, 5.0, "The longest a request waits for this node to catch up with the bus."),
)
DEFAULTS: Final = {key.name: key.default for key in CONFIG}

ALERT: Final = "anomalies:alert:v1:raised"
BASELINE_SET: Final = "anomalies:baseline:v1:set"
MONITOR_REQUESTED: Final = "anomalies:monitor:v1:requested"
MONITOR_SUCCESS: Final = "anomalies:monitor:v1:success"
HEALTH_REQUESTED: Final = "anomalies:stream_health:v1:requested"
BASELINE_RESET: Final = "anomalies:baseline:v1:reset"
LATEST_REQUESTED: Final = "anomalies:latest:v1:requested"
RESET_REQUESTED: Final = "anomalies:reset:v1:requested"
MAX_CSV_CHARS: Final = 1_000_000
"""The longest CSV text set_baseline takes (the server's payload limit, max_payload_bytes, applies first)."""
LOG_STATS: Final = "anomalies:log_stats:v1:reported"

_SOURCE = {"type": "string", "minLength": 1, "maxLength": 256, "description": "Whose logs: a service, host or file."}

_BASELINE_ID = {"type": "string", "minLength": 1, "maxLength": 256, "description": "Names the baseline."}

_POINT = {"type": "array", "minItems": 1, "items": {"type": "number"}}

_THRESHOLD_METHODS = (
    "finite: the prediction bound for a new point from n baseline points, sqrt(d (n-1)(n+1) / (n (n-d)) "
    "F.ppf(confidence, d, n-d)); asymptotic: sqrt(chi2.ppf(confidence, d)), its limit for large n."
)

_THRESHOLD_METHOD = {"enum": ["finite", "asymptotic"], "description": _THRESHOLD_METHODS}

_SCORED = {
    "type": "object",
    "required": ["point", "distance", "is_anomaly"],
    "properties": {
        "point": {**_POINT, "description": "The point."},
        "distance": {"type": "number", "minimum": 0, "description": "Its Mahalanobis distance."},
        "is_anomaly": {"type": "boolean", "description": "distance > threshold."},
    },
}

_SEVERITY = {
    "enum": ["LEARNING", "NONE", "LOW", "MED", "HIGH"],
    "description": "By the source's own score percentiles, strictly above: > p99.9 HIGH, > p99 MED, > p95 "
    "LOW, else NONE; a predicted template is at most LOW; a template's first new_template_lines lines are MED; "
    "LEARNING during the warm-up.",
}

_SCORE_FIELDS: dict[str, Any] = {
    "source": {"type": "string", "description": "The source."},
    "template_id": {"type": "string", "description": "The template's id (T<n> when mined here)."},
    "template": {"type": "string", "description": "The template, variable parts masked (<NUM>, <IP>, <*>)."},
    "score": {"type": "number", "minimum": 0, "description": "-ln P(template | previous h templates)."},
    "severity": _SEVERITY,
    "predicted": {
        "type": "boolean",
        "description": "DeepLog's check: the template is among the top_k seen after its context.",
    },
    "rank": {
        "type": ["integer", "null"],
        "description": "The template's rank after its context (1 = most frequent); null when never seen there.",
    },
    "lines_seen": {"type": "integer", "description": "Lines this source has scored, this one included."},
    "new_template": {"type": "boolean", "description": "The line founded a new template."},
    "seen": {
        "type": "integer",
        "minimum": 1,
        "description": "Lines of this template the source has seen, this one included; while at most "
        "new_template_lines (3) the line is MED once the source is warm.",
    },
    "sequence": {
        "type": "array",
        "items": {"type": "string"},
        "description": "The template ids of the source's previous lines, oldest first (at most sequence_length, 10).",
    },
}

_SCORE_EXAMPLE: dict[str, Any] = {
    "source": "payments-api",
    "template_id": "T17",
    "template": "connection to <IP> refused after <NUM> ms",
    "score": 9.53,
    "severity": "MED",
    "predicted": False,
    "rank": None,
    "lines_seen": 5231,
    "new_template": True,
    "seen": 1,
    "sequence": ["T3", "T4", "T9"],
}

ALERT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind"],
    "properties": {
        "kind": {"enum": ["log", "baseline"], "description": "What raised it: a log line or a baseline monitor."},
        "source": {"type": "string", "description": "log: the source."},
        "score": {"type": "number", "description": "log: the line's score."},
        "severity": {"enum": ["MED", "HIGH"], "description": "log: the line's severity."},
        "template": {"type": "string", "description": "log: the line's template."},
        "template_id": {"type": "string", "description": "log: the template's id."},
        "line": {"type": ["string", "null"], "description": "log: the line (null when scored by template_id)."},
        "baseline_id": {"type": "string", "description": "baseline: the baseline."},
        "distance": {"type": "number", "description": "baseline: the point's Mahalanobis distance."},
        "threshold": {"type": "number", "description": "baseline: the distance threshold it exceeded."},
        "point": {"type": "array", "items": {"type": "number"}, "description": "baseline: the point."},
    },
    "allOf": [
        {
            "if": {"properties": {"kind": {"const": "log"}}},
            "then": {"required": ["source", "score", "severity", "template", "line"]},
        },
        {
            "if": {"properties": {"kind": {"const": "baseline"}}},
            "then": {"required": ["baseline_id", "distance", "threshold"]},
        },
    ],
}

LOG_ALERT_SPEC = EventSpec(
    ALERT,
    "A log line scored MED or HIGH (kind log), or a monitored point was farther than the threshold (kind baseline).",
    ALERT_SCHEMA,
    example={
        "kind": "log",
        "source": "payments-api",
        "score": 9.53,
        "severity": "HIGH",
        "template": "connection to <IP> refused after <NUM> ms",
        "template_id": "T17",
        "line": "connection to 10.2.0.7 refused after 30 ms",
    },
)

BASELINE_ALERT_SPEC = EventSpec(
    ALERT,
    "A monitored point was farther from its baseline than the threshold (kind baseline), or a log line scored "
    "MED or HIGH (kind log).",
    ALERT_SCHEMA,
    example={"kind": "baseline", "baseline_id": "pump-3", "distance": 4.21, "threshold": 3.0349, "point": [7.9, 1.2]},
)

SCORE_LOG_TAKES = EventSpec(
    "anomalies:score_log:v1:requested",
    "One log line of a source, or the id of a template the caller parsed itself (give one of the two).",
    {
        "type": "object",
        "required": ["source"],
        "properties": {
            "source": _SOURCE,
            "line": {"type": "string", "description": "The raw log line."},
            "template_id": {
                "type": "string",
                "minLength": 1,
                "maxLength": 256,
                "description": "Instead of line: a template id (one returned earlier, or your own).",
            },
        },
    },
    example={"source": "payments-api", "line": "connection to 10.2.0.7 refused after 30 ms"},
)

SCORE_LOG_EMITS = (
    EventSpec(
        "anomalies:score_log:v1:success",
        "How the line scored; thresholds are the source's percentiles it was compared with.",
        {
            "type": "object",
            "required": ["source", "template_id", "template", "score", "severity", "predicted", "lines_seen"],
            "properties": {
                **_SCORE_FIELDS,
                "thresholds": {
                    "type": ["object", "null"],
                    "description": "The source's p95, p99 and p99.9 scores (null while learning).",
                    "properties": {
                        "p95": {"type": "number", "description": "Above it: LOW."},
                        "p99": {"type": "number", "description": "Above it: MED."},
                        "p99_9": {"type": "number", "description": "Above it: HIGH."},
                    },
                },
            },
        },
        example={**_SCORE_EXAMPLE, "thresholds": {"p95": 0.41, "p99": 2.2, "p99_9": 6.9}},
    ),
    LOG_ALERT_SPEC,
)

STREAM_LOG_TAKES = EventSpec(
    "anomalies:stream_log:v1:requested",
    "Follow a file in the server's log directory (log_dir; nexus serve --log-dir) until cancelled.",
    {
        "type": "object",
        "required": ["path"],
        "properties": {
            "path": {
                "type": "string",
                "minLength": 1,
                "maxLength": 4096,
                "description": "The file: relative to the log directory, or absolute inside it.",
            },
            "source": {**_SOURCE, "description": "The source its lines are scored as (default: the path)."},
            "from_start": {
                "type": "boolean",
                "description": "Score the lines already in the file first (default false: only new ones).",
            },
        },
    },
    example={"path": "payments/api.log"},
)

LOG_STATS_SPEC = EventSpec(
    LOG_STATS,
    "A followed file's statistics, every stats_interval_s (60) while stream_log runs.",
    {
        "type": "object",
        "required": ["path", "source", "lines", "alerts", "errors", "lines_per_s", "interval_s", "uptime_s"],
        "properties": {
            "path": {"type": "string", "description": "The file, relative to the log directory."},
            "source": {"type": "string", "description": "The source its lines are scored as."},
            "lines": {"type": "integer", "minimum": 0, "description": "Lines read since the stream started."},
            "alerts": {"type": "integer", "minimum": 0, "description": "Of them, scored MED or HIGH."},
            "errors": {"type": "integer", "minimum": 0, "description": "Of them, lines that could not be scored."},
            "lines_per_s": {"type": "number", "minimum": 0, "description": "Lines per second since the last report."},
            "interval_s": {"type": "number", "minimum": 0, "description": "Seconds since the last report."},
            "uptime_s": {"type": "number", "minimum": 0, "description": "Seconds since the stream started."},
        },
    },
    example={
        "path": "payments/api.log",
        "source": "payments/api.log",
        "lines": 18234,
        "alerts": 41,
        "errors": 0,
        "lines_per_s": 12.5,
        "interval_s": 60.0,
        "uptime_s": 1440.0,
    },
)

STREAM_LOG_EMITS = (
    EventSpec(
        "anomalies:stream_log:v1:stream",
        "One line of the file and how it scored.",
        {
            "type": "object",
            "required": ["path", "line", "source", "template_id", "template", "score", "severity"],
            "properties": {
                "path": {"type": "string", "description": "The file, relative to the log directory."},
                "line": {"type": "string", "description": "The line, without its newline."},
                **_SCORE_FIELDS,
            },
        },
        example={
            "path": "payments/api.log",
            "line": "connection to 10.2.0.7 refused after 30 ms",
            **_SCORE_EXAMPLE,
            "source": "payments/api.log",
        },
    ),
    LOG_ALERT_SPEC,
    LOG_STATS_SPEC,
)

SET_BASELINE_TAKES = EventSpec(
    "anomalies:set_baseline:v1:requested",
    "Points of normal behaviour, as an array or as CSV text: any dimension d >= 1 (at most max_dimension), at "
    "least d + min_excess_points points (default d + 10), at most max_points.",
    {
        "type": "object",
        "required": ["baseline_id"],
        "properties": {
            "baseline_id": _BASELINE_ID,
            "points": {
                "type": "array",
                "description": "The points, each an array of d numbers (d >= 1, the same for every point); "
                "at least d + min_excess_points of them. Give points or csv.",
                "items": {"type": "array", "minItems": 1, "items": {"type": "number"}},
            },
            "csv": {
                "type": "string",
                "maxLength": MAX_CSV_CHARS,
                "description": "Instead of points: one point a line, comma-separated decimal numbers; a first "
                "line without numbers is a header and skipped; blank lines are skipped.",
            },
            "confidence": {
                "type": "number",
                "exclusiveMinimum": 0,
                "exclusiveMaximum": 1,
                "description": "Confidence of the threshold (default the setting, 0.99).",
            },
            "threshold": {
                **_THRESHOLD_METHOD,
                "description": "How the threshold is computed (default the setting, finite). " + _THRESHOLD_METHODS,
            },
        },
    },
    example={
        "baseline_id": "pump-3",
        "csv": "rpm,temp\n1480,61.2\n1502,62.0\n1497,61.7\n1510,62.4\n1489,61.5\n1495,61.9\n1503,62.1\n"
        "1478,61.0\n1491,61.6\n1507,62.3\n1499,61.8\n1486,61.4\n",
    },
)

SET_BASELINE_EMITS = (
    EventSpec(
        "anomalies:set_baseline:v1:success",
        "The fitted baseline.",
        {
            "type": "object",
            "required": ["baseline_id", "dimension", "count", "threshold", "confidence", "regularised"],
            "properties": {
                "baseline_id": {"type": "string", "description": "The baseline."},
                "dimension": {"type": "integer", "description": "d."},
                "count": {"type": "integer", "description": "Points it was fitted on."},
                "mean": {"type": "array", "items": {"type": "number"}, "description": "The mean point."},
                "threshold": {
                    "type": "number",
                    "description": "The distance threshold (finite, 13-D from 40 points at 0.99: 7.434; "
                    "asymptotic, 2-D at 0.99: 3.0349).",
                },
                "threshold_method": {**_THRESHOLD_METHOD, "description": "How the threshold was computed."},
                "confidence": {"type": "number", "description": "The confidence used."},
                "regularised": {
                    "type": "boolean",
                    "description": "The covariance was singular and got a ridge.",
                },
            },
        },
        example={
            "baseline_id": "pump-3",
            "dimension": 2,
            "count": 12,
            "mean": [1494.75, 61.741666666666667],
            "threshold": 4.24460205934029,
            "threshold_method": "finite",
            "confidence": 0.99,
            "regularised": False,
        },
    ),
    EventSpec(
        BASELINE_SET,
        "A baseline was set: what every node rebuilds it from.",
        {
            "type": "object",
            "required": ["baseline_id", "dimension", "count", "mean", "covariance", "ridge", "confidence"],
            "properties": {
                "baseline_id": {"type": "string", "description": "The baseline."},
                "dimension": {"type": "integer", "description": "d."},
                "count": {"type": "integer", "description": "Points it was fitted on."},
                "mean": {"type": "array", "items": {"type": "number"}, "description": "The mean point."},
                "covariance": {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "number"}},
                    "description": "The sample covariance (n - 1), d x d.",
                },
                "ridge": {"type": "number", "description": "Added to the diagonal (0 unless singular)."},
                "confidence": {"type": "number", "description": "The threshold's confidence."},
                "threshold": {"type": "number", "description": "The distance threshold."},
                "threshold_method": {
                    **_THRESHOLD_METHOD,
                    "description": "How the threshold was computed (absent: asymptotic).",
                },
            },
        },
        example={
            "baseline_id": "pump-3",
            "dimension": 2,
            "count": 5,
            "mean": [2.5, 2.5],
            "covariance": [[1.375, 1.125], [1.125, 1.375]],
            "ridge": 0.0,
            "confidence": 0.99,
            "threshold": 3.0348542587702925,
            "threshold_method": "asymptotic",
        },
    ),
)

MONITOR_TAKES = EventSpec(
    "anomalies:monitor:v1:requested",
    "One observation (point), or a batch of them (points, at most max_batch), to compare with a baseline set earlier.",
    {
        "type": "object",
        "required": ["baseline_id"],
        "properties": {
            "baseline_id": _BASELINE_ID,
            "point": {**_POINT, "description": "The observation: d numbers, d the baseline's dimension."},
            "points": {
                "type": "array",
                "minItems": 1,
                "items": _POINT,
                "description": "Instead of point: several observations, in order (at most max_batch, 1000).",
            },
        },
    },
    example={"baseline_id": "pump-3", "point": [7.9, 1.2]},
)

MONITOR_EMITS = (
    EventSpec(
        MONITOR_SUCCESS,
        "The point's distance to the baseline and whether it is an anomaly (distance > threshold); for a batch, "
        "each point's in results, the largest distance and whether any is an anomaly.",
        {
            "type": "object",
            "required": ["baseline_id", "distance", "threshold", "is_anomaly"],
            "properties": {
                "baseline_id": {"type": "string", "description": "The baseline."},
                "distance": {
                    "type": "number",
                    "minimum": 0,
                    "description": "The Mahalanobis distance (a batch: the largest).",
                },
                "threshold": {"type": "number", "description": "The baseline's distance threshold."},
                "is_anomaly": {"type": "boolean", "description": "distance > threshold (a batch: any point)."},
                "point": {**_POINT, "description": "The point (one point)."},
                "anomalies": {"type": "integer", "minimum": 0, "description": "A batch: how many are anomalies."},
                "results": {"type": "array", "items": _SCORED, "description": "A batch: each point, in order."},
            },
        },
        example={
            "baseline_id": "pump-3",
            "distance": 4.21,
            "threshold": 3.0348542587702925,
            "is_anomaly": True,
            "point": [7.9, 1.2],
        },
    ),
    BASELINE_ALERT_SPEC,
)

LATEST_TAKES = EventSpec(
    LATEST_REQUESTED,
    "The last points monitored against a baseline since it was set or reset.",
    {
        "type": "object",
        "required": ["baseline_id"],
        "properties": {
            "baseline_id": _BASELINE_ID,
            "limit": {
                "type": "integer",
                "minimum": 0,
                "description": "At most this many (default and most: latest_points, 100).",
            },
        },
    },
    example={"baseline_id": "pump-3", "limit": 2},
)

LATEST_EMITS = (
    EventSpec(
        "anomalies:latest:v1:success",
        "The points, oldest first.",
        {
            "type": "object",
            "required": ["baseline_id", "points"],
            "properties": {
                "baseline_id": {"type": "string", "description": "The baseline."},
                "points": {"type": "array", "items": _SCORED, "description": "The scored points, oldest first."},
            },
        },
        example={
            "baseline_id": "pump-3",
            "points": [
                {"point": [1.1, 0.9], "distance": 0.42, "is_anomaly": False},
                {"point": [7.9, 1.2], "distance": 4.21, "is_anomaly": True},
            ],
        },
    ),
)

RESET_TAKES = EventSpec(
    RESET_REQUESTED,
    "Forget what was monitored against a baseline: its health window and latest points (forget: the baseline too).",
    {
        "type": "object",
        "required": ["baseline_id"],
        "properties": {
            "baseline_id": _BASELINE_ID,
            "forget": {
                "type": "boolean",
                "description": "Forget the baseline itself too: monitor answers unknown baseline until it is set "
                "again (default false).",
            },
        },
    },
    example={"baseline_id": "pump-3"},
)

RESET_EMITS = (
    EventSpec(
        "anomalies:reset:v1:success",
        "The baseline was reset.",
        {
            "type": "object",
            "required": ["baseline_id", "forgotten"],
            "properties": {
                "baseline_id": {"type": "string", "description": "The baseline."},
                "forgotten": {"type": "boolean", "description": "The baseline itself was forgotten."},
            },
        },
        example={"baseline_id": "pump-3", "forgotten": False},
    ),
    EventSpec(
        BASELINE_RESET,
        "A baseline was reset: every node empties its health window and latest points (forget: drops it).",
        {
            "type": "object",
            "required": ["baseline_id", "forget"],
            "properties": {
                "baseline_id": {"type": "string", "description": "The baseline."},
                "forget": {"type": "boolean", "description": "The baseline itself is forgotten."},
            },
        },
        example={"baseline_id": "pump-3", "forget": False},
    ),
)

STREAM_HEALTH_TAKES = EventSpec(
    "anomalies:stream_health:v1:requested",
    "Follow the health of a baseline set earlier.",
    {"type": "object", "required": ["baseline_id"], "properties": {"baseline_id": _BASELINE_ID}},
    example={"baseline_id": "pump-3"},
)

STREAM_HEALTH_EMITS = (
    EventSpec(
        "anomalies:stream_health:v1:stream",
        "The baseline's rolling anomaly percentage and health label.",
        {
            "type": "object",
            "required": ["baseline_id", "anomaly_pct", "health", "anomalies", "samples", "window"],
            "properties": {
                "baseline_id": {"type": "string", "description": "The baseline."},
                "anomaly_pct": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 100,
                    "description": "Anomalies among the last monitored points, in percent.",
                },
                "health": {
                    "enum": ["healthy", "deteriorating", "failing"],
                    "description": ">= failing_pct (15) failing, >= deteriorating_pct (5) deteriorating.",
                },
                "anomalies": {"type": "integer", "description": "Anomalies in the window."},
                "samples": {"type": "integer", "description": "Monitored points in the window."},
                "window": {"type": "integer", "description": "The window's size (health_window)."},
            },
        },
        example={
            "baseline_id": "pump-3",
            "anomaly_pct": 6.0,
            "health": "deteriorating",
            "anomalies": 6,
            "samples": 100,
            "window": 100,
        },
    ),
)
