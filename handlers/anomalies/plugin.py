"""The anomalies handlers: ``score_log``, ``stream_log``, ``set_baseline``, ``monitor``, ``stream_health``.

Settings (``[handlers.anomalies]``): the log model's (:class:`.logs.LogSettings`: ``order``, ``top_k``,
``warmup_lines``, ``score_window``, ``low_percentile``, ``med_percentile``, ``high_percentile``,
``max_sources``, ``source_ttl_s``, ``max_templates``, ``max_ngrams``, ``drain_depth``, ``drain_similarity``,
``drain_max_children``, ``max_line_chars``), the baselines' (:class:`.baseline.BaselineSettings`:
``confidence``, ``ridge``, ``max_dimension``, ``max_baselines``, ``health_window``, ``failing_pct``,
``deteriorating_pct``), and ``log_dir`` (the only directory stream_log may follow files in; default the
server's ``--log-dir``), ``poll_interval_s`` (0.25), ``max_line_bytes`` (65536), ``sync_timeout_s`` (5).

Baselines travel on the bus: set_baseline publishes ``anomalies:baseline:v1:set`` with the fitted mean and
covariance, and monitor and stream_health follow those events (and monitor's results), so every node of a
cluster knows every baseline and every health window. A handler waits until its follower has seen the bus up
to the request's own offset before it looks a baseline up, so a monitor sent right after set_baseline's
``success`` always finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from nexus import (
    Event,
    EventHandler,
    EventSpec,
    HandlerContext,
    InvalidPayload,
    Stream,
    StreamingEventHandler,
    read_number,
)

from .baseline import Baseline, BaselineError, BaselineSettings, BaselineStore, HealthStore
from .follow import DEFAULT_MAX_LINE_BYTES, FileFollower, PathNotAllowed
from .logs import LogScore, LogScorer, LogSettings, LogSource

ALERT = "anomalies:alert:v1:raised"
BASELINE_SET = "anomalies:baseline:v1:set"
MONITOR_REQUESTED = "anomalies:monitor:v1:requested"
MONITOR_SUCCESS = "anomalies:monitor:v1:success"
HEALTH_REQUESTED = "anomalies:stream_health:v1:requested"


def _plugin_number(config: Mapping[str, Any], key: str, default: float) -> float:
    return read_number(config, key, default, plugin="anomalies", minimum=0, strict=True, must_be="a positive number")


def _settings(ctx: HandlerContext, read: Callable[[Mapping[str, Any]], Any]) -> Any:
    try:
        return read(ctx.config)
    except ValueError as exc:
        raise ValueError(f"{ctx.name}: {exc}") from None


# --- schemas ----------------------------------------------------------------------------------------------

_SOURCE = {"type": "string", "minLength": 1, "maxLength": 256, "description": "Whose logs: a service, host or file."}
_BASELINE_ID = {"type": "string", "minLength": 1, "maxLength": 256, "description": "Names the baseline."}
_SEVERITY = {
    "enum": ["LEARNING", "NONE", "LOW", "MED", "HIGH"],
    "description": "By the source's own score percentiles, strictly above: > p99.9 HIGH, > p99 MED, > p95 "
    "LOW, else NONE; a predicted template is at most LOW; LEARNING during the warm-up.",
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
}
_SCORE_EXAMPLE: dict[str, Any] = {
    "source": "payments-api",
    "template_id": "T17",
    "template": "connection to <IP> refused after <NUM> ms",
    "score": 9.53,
    "severity": "HIGH",
    "predicted": False,
    "rank": None,
    "lines_seen": 5231,
    "new_template": True,
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


def _score_payload(result: LogScore) -> dict[str, Any]:
    return {
        "source": result.source,
        "template_id": result.template_id,
        "template": result.template,
        "score": result.score,
        "severity": result.severity,
        "predicted": result.predicted,
        "rank": result.rank,
        "lines_seen": result.lines_seen,
        "new_template": result.new_template,
    }


def _log_alert(result: LogScore, line: str | None) -> dict[str, Any]:
    return {
        "kind": "log",
        "source": result.source,
        "score": result.score,
        "severity": result.severity,
        "template": result.template,
        "template_id": result.template_id,
        "line": line,
    }


# --- score_log --------------------------------------------------------------------------------------------


class ScoreLog(EventHandler):
    """Score one log line (or template id) of a source against the source's own history.

    The line is mined into a template (variables masked, then Drain), scored by an order-h n-gram model of the
    source's template sequence (``-ln P(template | previous h)``, Witten-Bell smoothing) with a DeepLog-style
    top-k check, and graded by the source's own score percentiles; MED and HIGH raise
    ``anomalies:alert:v1:raised``. A new source reports LEARNING for its first warmup_lines lines.
    """

    event_type = "anomalies:score_log:v1"
    ordering_key = "source"
    takes = EventSpec(
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
    emits = (
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

    def __init__(self) -> None:
        self.scorer = LogScorer()

    async def setup(self, ctx: HandlerContext) -> None:
        self.scorer = LogScorer(_settings(ctx, LogSettings.from_config))

    async def handle(self, event: Event) -> dict[str, Any]:
        payload = event.payload
        line = payload.get("line")
        template_id = payload.get("template_id")
        if (line is None) == (template_id is None):
            raise InvalidPayload("anomalies:score_log needs exactly one of line and template_id")
        now = time.monotonic()
        self.scorer.expire(now)
        if isinstance(line, str):
            result = self.scorer.score_line(payload["source"], line, now=now)
        elif isinstance(template_id, str):
            result = self.scorer.score_template(payload["source"], template_id, now=now)
        else:  # the schema rules this out; kept for a handler called directly
            raise InvalidPayload("anomalies:score_log line and template_id must be strings")
        if result.alert:
            await self.ctx.publish(ALERT, _log_alert(result, line))
        reply = _score_payload(result)
        reply["thresholds"] = result.thresholds
        return reply


# --- stream_log -------------------------------------------------------------------------------------------


def _unusable_path(path: str, exc: OSError | ValueError) -> InvalidPayload:
    if isinstance(exc, PathNotAllowed):
        return InvalidPayload(f"path {path!r} cannot be followed: {exc}")
    if isinstance(exc, FileNotFoundError):
        return InvalidPayload(f"path {path!r}: no such file in the log directory")
    if isinstance(exc, PermissionError):
        return InvalidPayload(f"path {path!r} cannot be read: permission denied")
    return InvalidPayload(f"path {path!r} cannot be followed: {exc}")


class StreamLog(StreamingEventHandler):
    """Follow a log file under the configured log directory like ``tail -F`` and stream each new line's score.

    Rotation and truncation are followed; a path outside the log directory (also through ``..`` or symbolic
    links) fails. Each stream scores its file as one source with its own model (LEARNING for the first
    warmup_lines lines); MED and HIGH lines also raise ``anomalies:alert:v1:raised``.
    """

    event_type = "anomalies:stream_log:v1"
    stream_timeout = None
    takes = EventSpec(
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
    emits = (
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
    )

    def __init__(self) -> None:
        self.settings = LogSettings()
        self.log_dir: str | None = None
        self.poll_interval_s = 0.25
        self.max_line_bytes = DEFAULT_MAX_LINE_BYTES

    async def setup(self, ctx: HandlerContext) -> None:
        self.settings = _settings(ctx, LogSettings.from_config)
        log_dir = ctx.config.get("log_dir")
        if log_dir is not None and (
            not isinstance(log_dir, str) or not await asyncio.to_thread(os.path.isdir, log_dir)
        ):
            raise ValueError(f"{ctx.name}: anomalies setting 'log_dir' must be an existing directory, got {log_dir!r}")
        self.log_dir = log_dir
        self.poll_interval_s = _settings(ctx, lambda c: _plugin_number(c, "poll_interval_s", 0.25))
        self.max_line_bytes = int(_settings(ctx, lambda c: _plugin_number(c, "max_line_bytes", 65536)))

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        if self.log_dir is None:
            raise RuntimeError(
                "stream_log is turned off: no log directory is configured (nexus serve --log-dir DIR, "
                "NEXUS_LOG_DIR, or log_dir in [handlers.anomalies])"
            )
        path = event.payload["path"]
        from_start = bool(event.payload.get("from_start", False))
        try:
            follower = await asyncio.to_thread(
                FileFollower, self.log_dir, path, from_start=from_start, max_line_bytes=self.max_line_bytes
            )
        except PathNotAllowed as exc:
            raise _unusable_path(path, exc) from None
        try:  # from here on the follower is closed whatever happens, a cancel during open() included
            try:
                await asyncio.to_thread(follower.open)
            except (OSError, PathNotAllowed) as exc:
                raise _unusable_path(path, exc) from None
            await self._follow(event, stream, follower)
        finally:
            follower.close()

    async def _follow(self, event: Event, stream: Stream, follower: FileFollower) -> None:
        path = event.payload["path"]
        relative = follower.relative_path
        source = LogSource(event.payload.get("source") or relative, self.settings)
        self.ctx.log.info("stream_log_following", path=relative, target=str(follower.target))
        rotations = truncations = 0
        while True:
            try:
                lines = await asyncio.to_thread(follower.poll)
            except PathNotAllowed as exc:
                raise InvalidPayload(f"path {path!r} cannot be followed any more: {exc}") from None
            if (follower.rotations, follower.truncations) != (rotations, truncations):
                rotations, truncations = follower.rotations, follower.truncations
                self.ctx.log.info("stream_log_reopened", path=relative, rotations=rotations, truncations=truncations)
            for line in lines:
                result = source.score_line(line)
                if result.alert:
                    await self.ctx.publish(ALERT, _log_alert(result, line))
                await stream.send({"path": relative, "line": line, **_score_payload(result)})
            if not lines:
                await asyncio.sleep(self.poll_interval_s)


# --- set_baseline -----------------------------------------------------------------------------------------


class SetBaseline(EventHandler):
    """Fit a baseline from points: mean, sample covariance (n - 1) and the Mahalanobis threshold.

    The baseline is published as ``anomalies:baseline:v1:set``, which monitor and stream_health follow on
    every node. Setting an existing baseline_id replaces it and restarts its health window.
    """

    event_type = "anomalies:set_baseline:v1"
    ordering_key = "baseline_id"
    takes = EventSpec(
        "anomalies:set_baseline:v1:requested",
        "Points of normal behaviour: any dimension d >= 1 (at most max_dimension), at least d + 2 points.",
        {
            "type": "object",
            "required": ["baseline_id", "points"],
            "properties": {
                "baseline_id": _BASELINE_ID,
                "points": {
                    "type": "array",
                    "description": "The points, each an array of d numbers (d >= 1, the same for every point); "
                    "at least d + 2 of them.",
                    "items": {"type": "array", "minItems": 1, "items": {"type": "number"}},
                },
                "confidence": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "exclusiveMaximum": 1,
                    "description": "Chi-square confidence of the threshold (default the setting, 0.99).",
                },
            },
        },
        example={"baseline_id": "pump-3", "points": [[1.0, 2.0], [2.0, 1.0], [3.0, 4.0], [4.0, 3.0], [2.5, 2.5]]},
    )
    emits = (
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
                        "description": "sqrt of the chi-square quantile at confidence for d (2-D, 0.99: 3.0349).",
                    },
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
                "count": 5,
                "mean": [2.5, 2.5],
                "threshold": 3.0348542587702925,
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
            },
        ),
    )

    def __init__(self) -> None:
        self.settings = BaselineSettings()

    async def setup(self, ctx: HandlerContext) -> None:
        self.settings = _settings(ctx, BaselineSettings.from_config)

    async def handle(self, event: Event) -> dict[str, Any]:
        payload = event.payload
        confidence = payload.get("confidence", self.settings.confidence)
        try:
            baseline = Baseline.fit(
                payload["baseline_id"],
                payload["points"],
                confidence=float(confidence),
                ridge=self.settings.ridge,
                max_dimension=self.settings.max_dimension,
            )
        except BaselineError as exc:
            raise InvalidPayload(f"baseline {payload['baseline_id']!r}: {exc}") from None
        await self.ctx.publish(BASELINE_SET, baseline.to_payload())
        return {
            "baseline_id": baseline.baseline_id,
            "dimension": baseline.dimension,
            "count": baseline.count,
            "mean": [float(v) for v in baseline.mean],
            "threshold": baseline.threshold,
            "confidence": baseline.confidence,
            "regularised": baseline.regularised,
        }


# --- following the bus ------------------------------------------------------------------------------------


class BusFollower:
    """Applies the events matching ``patterns`` to local state in offset order, in a background task.

    :meth:`reached` waits until every matching event up to an offset has been applied. It subscribes from
    offset 1, so while the bus still holds its whole history a node that starts late replays it and learns the
    earlier baselines; otherwise it follows live. After an error it resubscribes from the last offset applied.
    """

    def __init__(self, ctx: HandlerContext, patterns: tuple[str, ...], apply: Callable[[Event], None]) -> None:
        self._ctx = ctx
        self._patterns = patterns
        self._apply = apply
        self.offset = 0
        self._advanced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self._ctx.name}-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                async with self._ctx.subscribe(*self._patterns, since_offset=max(self.offset, 1)) as events:
                    async for event in events:
                        try:
                            self._apply(event)
                        except Exception as exc:  # one malformed event must not stop the follower
                            self._ctx.log.warning(
                                "follower_skipped_event",
                                event_type=event.event_type,
                                offset=event.offset,
                                error=str(exc),
                            )
                        if event.offset > self.offset:
                            self.offset = event.offset
                            self._advanced.set()
                            self._advanced = asyncio.Event()
                        delay = 0.05
                return  # the bus closed the subscription: the server is stopping
            except Exception as exc:  # resubscribe from the last offset seen: nothing is skipped
                self._ctx.log.warning(
                    "follower_resubscribing", error=f"{type(exc).__name__}: {exc}", offset=self.offset
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def reached(self, offset: int, timeout: float) -> bool:
        """Wait until events up to ``offset`` are applied; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.offset < offset:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            waiter = self._advanced
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), remaining)
        return True


def _unknown_baseline(baseline_id: str) -> InvalidPayload:
    return InvalidPayload(f"unknown baseline {baseline_id!r}: set it first with anomalies:set_baseline")


# --- monitor ----------------------------------------------------------------------------------------------


class Monitor(EventHandler):
    """Mahalanobis distance of a point to a baseline, against the chi-square threshold.

    A point farther than the threshold is an anomaly and raises ``anomalies:alert:v1:raised``.
    """

    event_type = "anomalies:monitor:v1"
    ordering_key = "baseline_id"
    takes = EventSpec(
        "anomalies:monitor:v1:requested",
        "One observation to compare with a baseline set earlier.",
        {
            "type": "object",
            "required": ["baseline_id", "point"],
            "properties": {
                "baseline_id": _BASELINE_ID,
                "point": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "number"},
                    "description": "The observation: d numbers, d the baseline's dimension.",
                },
            },
        },
        example={"baseline_id": "pump-3", "point": [7.9, 1.2]},
    )
    emits = (
        EventSpec(
            MONITOR_SUCCESS,
            "The point's distance to the baseline and whether it is an anomaly (distance > threshold).",
            {
                "type": "object",
                "required": ["baseline_id", "distance", "threshold", "is_anomaly"],
                "properties": {
                    "baseline_id": {"type": "string", "description": "The baseline."},
                    "distance": {"type": "number", "minimum": 0, "description": "The Mahalanobis distance."},
                    "threshold": {"type": "number", "description": "sqrt(chi2.ppf(confidence, d))."},
                    "is_anomaly": {"type": "boolean", "description": "distance > threshold."},
                },
            },
            example={"baseline_id": "pump-3", "distance": 4.21, "threshold": 3.0348542587702925, "is_anomaly": True},
        ),
        BASELINE_ALERT_SPEC,
    )

    def __init__(self) -> None:
        self.settings = BaselineSettings()
        self.store = BaselineStore()
        self.sync_timeout_s = 5.0
        self._follower: BusFollower | None = None

    async def setup(self, ctx: HandlerContext) -> None:
        self.settings = _settings(ctx, BaselineSettings.from_config)
        self.sync_timeout_s = _settings(ctx, lambda c: _plugin_number(c, "sync_timeout_s", 5.0))
        self.store = BaselineStore(self.settings.max_baselines)
        self._follower = BusFollower(ctx, (BASELINE_SET, MONITOR_REQUESTED), self._apply)
        self._follower.start()

    async def teardown(self) -> None:
        if self._follower is not None:
            await self._follower.stop()

    def _apply(self, event: Event) -> None:
        if event.event_type == BASELINE_SET:
            self.store.put(Baseline.from_payload(event.payload))

    async def handle(self, event: Event) -> dict[str, Any]:
        baseline_id = event.payload["baseline_id"]
        if self._follower is not None:
            await self._follower.reached(event.offset, self.sync_timeout_s)
        baseline = self.store.get(baseline_id)
        if baseline is None:
            raise _unknown_baseline(baseline_id)
        try:
            distance = baseline.distance(event.payload["point"])
        except BaselineError as exc:
            raise InvalidPayload(str(exc)) from None
        is_anomaly = distance > baseline.threshold
        if is_anomaly:
            await self.ctx.publish(
                ALERT,
                {
                    "kind": "baseline",
                    "baseline_id": baseline_id,
                    "distance": distance,
                    "threshold": baseline.threshold,
                    "point": event.payload["point"],
                },
            )
        return {
            "baseline_id": baseline_id,
            "distance": distance,
            "threshold": baseline.threshold,
            "is_anomaly": is_anomaly,
        }


# --- stream_health ----------------------------------------------------------------------------------------


class _Listener:
    __slots__ = ("changed", "latest")

    def __init__(self, latest: dict[str, Any]) -> None:
        self.latest = latest
        self.changed = asyncio.Event()


class StreamHealth(StreamingEventHandler):
    """Stream a baseline's rolling anomaly percentage and health label, until cancelled.

    The window is the last health_window monitored points (default 100): ``failing`` at 15 % anomalies or
    more, ``deteriorating`` at 5 % or more, else ``healthy``. The current value comes first, then one chunk per
    monitored point (the latest, when the stream falls behind).
    """

    event_type = "anomalies:stream_health:v1"
    stream_timeout = None
    takes = EventSpec(
        "anomalies:stream_health:v1:requested",
        "Follow the health of a baseline set earlier.",
        {"type": "object", "required": ["baseline_id"], "properties": {"baseline_id": _BASELINE_ID}},
        example={"baseline_id": "pump-3"},
    )
    emits = (
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

    def __init__(self) -> None:
        self.health = HealthStore()
        self.sync_timeout_s = 5.0
        self._follower: BusFollower | None = None
        self._listeners: dict[str, set[_Listener]] = {}

    async def setup(self, ctx: HandlerContext) -> None:
        self.health = HealthStore(_settings(ctx, BaselineSettings.from_config))
        self.sync_timeout_s = _settings(ctx, lambda c: _plugin_number(c, "sync_timeout_s", 5.0))
        self._follower = BusFollower(ctx, (BASELINE_SET, MONITOR_SUCCESS, HEALTH_REQUESTED), self._apply)
        self._follower.start()

    async def teardown(self) -> None:
        if self._follower is not None:
            await self._follower.stop()

    def _apply(self, event: Event) -> None:
        baseline_id = event.payload.get("baseline_id")
        if not isinstance(baseline_id, str):
            return
        if event.event_type == BASELINE_SET:
            self.health.reset(baseline_id)
            health = self.health.health(baseline_id)
        elif event.event_type == MONITOR_SUCCESS:
            health = self.health.record(baseline_id, bool(event.payload.get("is_anomaly")))
        else:
            return
        if health is None:
            return
        for listener in self._listeners.get(baseline_id, ()):
            listener.latest = health
            listener.changed.set()

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        baseline_id = event.payload["baseline_id"]
        if self._follower is not None:
            await self._follower.reached(event.offset, self.sync_timeout_s)
        current = self.health.health(baseline_id)
        if current is None:
            raise _unknown_baseline(baseline_id)
        listener = _Listener(current)
        self._listeners.setdefault(baseline_id, set()).add(listener)
        try:
            await stream.send(current)
            while True:
                await listener.changed.wait()
                listener.changed.clear()
                await stream.send(listener.latest)
        finally:
            listeners = self._listeners.get(baseline_id)
            if listeners is not None:
                listeners.discard(listener)
                if not listeners:
                    del self._listeners[baseline_id]
