"""The anomalies handlers: ``score_log``, ``stream_log``, ``set_baseline``, ``monitor``, ``stream_health``,
``latest``, ``reset``.

Settings (``[handlers.anomalies]``, declared in ``specs.CONFIG``): the log model's (:class:`.logs.LogSettings`:
``order``, ``top_k``, ``warmup_lines``, ``score_window``, ``low_percentile``, ``med_percentile``, ``high_percentile``,
``max_sources``, ``source_ttl_s``, ``max_templates``, ``max_ngrams``, ``drain_depth``, ``drain_similarity``,
``drain_max_children``, ``max_line_chars``), the baselines' (:class:`.baseline.BaselineSettings`:
``confidence``, ``threshold``, ``min_excess_points``, ``ridge``, ``max_dimension``, ``max_baselines``,
``max_points``, ``max_batch``, ``latest_points``, ``health_window``, ``failing_pct``, ``deteriorating_pct``),
and ``log_dir`` (the only directory stream_log may follow files in; default the server's ``--log-dir``),
``poll_interval_s`` (0.25), ``max_line_bytes`` (65536), ``sync_timeout_s`` (5).
The log model also reads ``new_template_lines`` and ``sequence_length`` (see :mod:`.logs`); stream_log
``stats_interval_s`` (60; 0 turns the statistics off).

Baselines travel on the bus: set_baseline publishes ``anomalies:baseline:v1:set`` with the fitted mean and
covariance, reset publishes ``anomalies:baseline:v1:reset``, and monitor, stream_health and latest follow
those events (and monitor's results), so every node of a cluster knows every baseline, every health window
and every baseline's latest points. A handler waits until its follower has seen the bus up
to the request's own offset before it looks a baseline up, so a monitor sent right after set_baseline's
``success`` always finds it. The followers (``ctx.follow``) start from the whole history the bus still holds,
so a node that starts late learns the earlier baselines. What each handler takes and emits is declared in
:mod:`.specs`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from nexus import (
    Event,
    EventHandler,
    Follower,
    HandlerContext,
    InvalidPayload,
    Stream,
    StreamingEventHandler,
    key_for,
    read_number,
)

from . import specs
from .baseline import (
    Baseline,
    BaselineError,
    BaselineSettings,
    BaselineStore,
    HealthStore,
    LatestStore,
    parse_csv,
)
from .follow import DEFAULT_MAX_LINE_BYTES, FileFollower, PathNotAllowed
from .logs import LogScore, LogScorer, LogSettings, LogSource, LogStats
from .specs import (
    ALERT,
    BASELINE_RESET,
    BASELINE_SET,
    DEFAULTS,
    HEALTH_REQUESTED,
    LATEST_REQUESTED,
    LOG_STATS,
    MONITOR_REQUESTED,
    MONITOR_SUCCESS,
    RESET_REQUESTED,
)


def _plugin_number(config: Mapping[str, Any], key: str) -> float:
    """A positive number the handlers read themselves (default: its declaration in ``specs.CONFIG``)."""
    default = DEFAULTS[key]
    return read_number(config, key, default, plugin="anomalies", minimum=0, strict=True, must_be="a positive number")


def _settings(ctx: HandlerContext, read: Callable[[Mapping[str, Any]], Any]) -> Any:
    try:
        return read(ctx.config)
    except ValueError as exc:
        raise ValueError(f"{ctx.name}: {exc}") from None


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
        "seen": result.seen,
        "sequence": list(result.sequence),
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
    takes = specs.SCORE_LOG_TAKES
    config_keys = specs.CONFIG
    emits = specs.SCORE_LOG_EMITS

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
    warmup_lines lines); MED and HIGH lines also raise ``anomalies:alert:v1:raised``. Every
    ``stats_interval_s`` (60) of :attr:`clock` a stream publishes ``anomalies:log_stats:v1:reported``: lines
    scored, alerts and errors (lines that could not be scored) since it started, and lines per second.
    """

    event_type = "anomalies:stream_log:v1"
    stream_timeout = None
    takes = specs.STREAM_LOG_TAKES
    config_keys = specs.CONFIG
    emits = specs.STREAM_LOG_EMITS

    def __init__(self) -> None:
        self.settings = LogSettings()
        self.log_dir: str | None = None
        self.poll_interval_s = 0.25
        self.max_line_bytes = DEFAULT_MAX_LINE_BYTES
        self.stats_interval_s = 60.0
        self.clock: Callable[[], float] = time.monotonic
        """The clock statistics are timed by (tests replace it)."""

    async def setup(self, ctx: HandlerContext) -> None:
        self.settings = _settings(ctx, LogSettings.from_config)
        self.stats_interval_s = _settings(ctx, lambda c: _plugin_number(c, "stats_interval_s"))
        log_dir = ctx.config.get("log_dir")
        if log_dir is not None and (
            not isinstance(log_dir, str) or not await asyncio.to_thread(os.path.isdir, log_dir)
        ):
            raise ValueError(f"{ctx.name}: anomalies setting 'log_dir' must be an existing directory, got {log_dir!r}")
        self.log_dir = log_dir
        self.poll_interval_s = _settings(ctx, lambda c: _plugin_number(c, "poll_interval_s"))
        self.max_line_bytes = int(_settings(ctx, lambda c: _plugin_number(c, "max_line_bytes")))

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
        stats = LogStats(self.stats_interval_s, self.clock())
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
                try:
                    result = source.score_line(line)
                except Exception:  # one line the scorer cannot take must not end the stream
                    self.ctx.log.exception("stream_log_line_failed", path=relative, line=line[:200])
                    stats.count(None)
                    continue
                stats.count(result)
                if result.alert:
                    await self.ctx.publish(ALERT, _log_alert(result, line))
                await stream.send({"path": relative, "line": line, **_score_payload(result)})
            report = stats.due(self.clock())
            if report is not None:
                await self.ctx.publish(LOG_STATS, {"path": relative, "source": source.name, **report})
            if not lines:
                await asyncio.sleep(self.poll_interval_s)


# --- set_baseline -----------------------------------------------------------------------------------------


class SetBaseline(EventHandler):
    """Fit a baseline from points (an array, or CSV text): mean, sample covariance (n - 1) and the threshold.

    The threshold is the finite-sample prediction bound (``finite``, the default) or sqrt chi-square
    (``asymptotic``); a d-dimensional baseline needs at least d + min_excess_points points (default d + 10).
    The baseline is published as ``anomalies:baseline:v1:set``, which monitor, stream_health and latest follow
    on every node. Setting an existing baseline_id replaces it and restarts its health window and latest points.
    """

    event_type = "anomalies:set_baseline:v1"
    ordering_key = "baseline_id"
    takes = specs.SET_BASELINE_TAKES
    config_keys = specs.CONFIG
    emits = specs.SET_BASELINE_EMITS

    def __init__(self) -> None:
        self.settings = BaselineSettings()

    async def setup(self, ctx: HandlerContext) -> None:
        self.settings = _settings(ctx, BaselineSettings.from_config)

    def _points(self, payload: Mapping[str, Any]) -> Any:
        points, text = payload.get("points"), payload.get("csv")
        if (points is None) == (text is None):
            raise InvalidPayload("anomalies:set_baseline needs exactly one of points and csv")
        if not isinstance(text, str):
            return points
        return parse_csv(
            text,
            max_rows=self.settings.max_points,
            max_columns=self.settings.max_dimension,
            max_chars=specs.MAX_CSV_CHARS,
        )

    async def handle(self, event: Event) -> dict[str, Any]:
        payload = event.payload
        confidence = payload.get("confidence", self.settings.confidence)
        try:
            baseline = Baseline.fit(
                payload["baseline_id"],
                self._points(payload),
                confidence=float(confidence),
                ridge=self.settings.ridge,
                max_dimension=self.settings.max_dimension,
                method=payload.get("threshold", self.settings.threshold),
                min_excess_points=self.settings.min_excess_points,
                max_points=self.settings.max_points,
            )
        except BaselineError as exc:
            raise InvalidPayload(f"baseline {payload['baseline_id']!r}: {exc}") from None
        await self.ctx.kv.put(_baseline_key(baseline.baseline_id), baseline.to_payload())  # survives restarts
        await self.ctx.publish(BASELINE_SET, baseline.to_payload())
        return {
            "baseline_id": baseline.baseline_id,
            "dimension": baseline.dimension,
            "count": baseline.count,
            "mean": [float(v) for v in baseline.mean],
            "threshold": baseline.threshold,
            "threshold_method": baseline.method,
            "confidence": baseline.confidence,
            "regularised": baseline.regularised,
        }


def _unknown_baseline(baseline_id: str) -> InvalidPayload:
    return InvalidPayload(f"unknown baseline {baseline_id!r}: set it first with anomalies:set_baseline")


def _baseline_key(baseline_id: str) -> str:
    """Where a baseline is kept in the plugin's ``ctx.kv``."""
    return key_for("baseline", baseline_id)


async def _kept_baseline(ctx: HandlerContext, baseline_id: str) -> Baseline | None:
    """The baseline ``set_baseline`` kept in ``ctx.kv`` (it outlives restarts and the bus history), or None."""
    entry = await ctx.kv.get(_baseline_key(baseline_id))
    if entry is None:
        return None
    try:
        return Baseline.from_payload(entry.value)
    except (BaselineError, KeyError, TypeError, ValueError) as exc:
        ctx.log.warning("baseline_unreadable", baseline_id=baseline_id, error=str(exc))
        return None


# --- monitor ----------------------------------------------------------------------------------------------


class Monitor(EventHandler):
    """Mahalanobis distance of a point, or of each point of a batch, to a baseline, against its threshold.

    A point farther than the threshold is an anomaly and raises ``anomalies:alert:v1:raised`` (one per point).
    A batch (``points``, at most max_batch) answers each point's distance in ``results`` and, in ``distance``
    and ``is_anomaly``, the largest distance and whether any point is an anomaly.
    """

    event_type = "anomalies:monitor:v1"
    ordering_key = "baseline_id"
    takes = specs.MONITOR_TAKES
    config_keys = specs.CONFIG
    emits = specs.MONITOR_EMITS

    def __init__(self) -> None:
        self.settings = BaselineSettings()
        self.store = BaselineStore()
        self.sync_timeout_s = 5.0
        self._follower: Follower | None = None

    async def setup(self, ctx: HandlerContext) -> None:
        self.settings = _settings(ctx, BaselineSettings.from_config)
        self.sync_timeout_s = _settings(ctx, lambda c: _plugin_number(c, "sync_timeout_s"))
        self.store = BaselineStore(self.settings.max_baselines)
        self._follower = await ctx.follow(
            BASELINE_SET, BASELINE_RESET, MONITOR_REQUESTED, on_event=self._apply, since_offset=0
        )

    def _apply(self, event: Event) -> None:
        if event.event_type == BASELINE_SET:
            self.store.put(Baseline.from_payload(event.payload))
        elif event.event_type == BASELINE_RESET and event.payload.get("forget"):
            self.store.remove(str(event.payload.get("baseline_id")))

    async def handle(self, event: Event) -> dict[str, Any]:
        payload = event.payload
        baseline_id = payload["baseline_id"]
        point, points = payload.get("point"), payload.get("points")
        if (point is None) == (points is None):
            raise InvalidPayload("anomalies:monitor needs exactly one of point and points")
        if points is not None and len(points) > self.settings.max_batch:
            raise InvalidPayload(f"points has {len(points)} points, more than max_batch {self.settings.max_batch}")
        if self._follower is not None:
            await self._follower.reached(event.offset, self.sync_timeout_s)
        baseline = self.store.get(baseline_id)
        if baseline is None:
            baseline = await _kept_baseline(self.ctx, baseline_id)  # set before a restart: the bus may not hold it
            if baseline is None:
                raise _unknown_baseline(baseline_id)
            self.store.put(baseline)
        batch: list[Any] = [point] if points is None else points
        try:
            distances = [baseline.distance(item) for item in batch]
        except BaselineError as exc:
            raise InvalidPayload(str(exc) if points is None else f"points: {exc}") from None
        results = [
            {"point": item, "distance": distance, "is_anomaly": distance > baseline.threshold}
            for item, distance in zip(batch, distances, strict=True)
        ]
        for result in results:
            if result["is_anomaly"]:
                await self.ctx.publish(
                    ALERT,
                    {
                        "kind": "baseline",
                        "baseline_id": baseline_id,
                        "distance": result["distance"],
                        "threshold": baseline.threshold,
                        "point": result["point"],
                    },
                )
        if points is None:
            return {"baseline_id": baseline_id, "threshold": baseline.threshold, **results[0]}
        return {
            "baseline_id": baseline_id,
            "distance": max(distances, default=0.0),
            "threshold": baseline.threshold,
            "is_anomaly": any(result["is_anomaly"] for result in results),
            "anomalies": sum(1 for result in results if result["is_anomaly"]),
            "results": results,
        }


def _scored(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The scored points of a monitor success: its results (a batch), or itself (one point)."""
    results = payload.get("results")
    if isinstance(results, list):
        return [result for result in results if isinstance(result, dict)]
    return [{key: payload.get(key) for key in ("point", "distance", "is_anomaly")}]


# --- latest -----------------------------------------------------------------------------------------------


class Latest(EventHandler):
    """The last points monitored against a baseline (at most latest_points, default 100), oldest first."""

    event_type = "anomalies:latest:v1"
    ordering_key = "baseline_id"
    takes = specs.LATEST_TAKES
    config_keys = specs.CONFIG
    emits = specs.LATEST_EMITS

    def __init__(self) -> None:
        self.settings = BaselineSettings()
        self.latest = LatestStore()
        self.sync_timeout_s = 5.0
        self._follower: Follower | None = None

    async def setup(self, ctx: HandlerContext) -> None:
        self.settings = _settings(ctx, BaselineSettings.from_config)
        self.sync_timeout_s = _settings(ctx, lambda c: _plugin_number(c, "sync_timeout_s"))
        self.latest = LatestStore(self.settings.latest_points, self.settings.max_baselines)
        self._follower = await ctx.follow(
            BASELINE_SET, BASELINE_RESET, MONITOR_SUCCESS, LATEST_REQUESTED, on_event=self._apply, since_offset=0
        )

    def _apply(self, event: Event) -> None:
        baseline_id = event.payload.get("baseline_id")
        if not isinstance(baseline_id, str):
            return
        if event.event_type == BASELINE_SET:
            self.latest.reset(baseline_id)
        elif event.event_type == BASELINE_RESET:
            if event.payload.get("forget"):
                self.latest.forget(baseline_id)
            elif baseline_id in self.latest:
                self.latest.reset(baseline_id)
        elif event.event_type == MONITOR_SUCCESS:
            self.latest.record(baseline_id, _scored(event.payload))

    async def handle(self, event: Event) -> dict[str, Any]:
        baseline_id = event.payload["baseline_id"]
        limit = int(event.payload.get("limit", self.settings.latest_points))
        if self._follower is not None:
            await self._follower.reached(event.offset, self.sync_timeout_s)
        points = self.latest.latest(baseline_id, min(limit, self.settings.latest_points))
        if points is None:
            if await _kept_baseline(self.ctx, baseline_id) is None:
                raise _unknown_baseline(baseline_id)
            self.latest.reset(baseline_id)  # set before a restart: nothing monitored since
            points = []
        return {"baseline_id": baseline_id, "points": points}


# --- reset ------------------------------------------------------------------------------------------------


class Reset(EventHandler):
    """Forget what was monitored against a baseline (health window, latest points); with ``forget``, the baseline
    too. Published as ``anomalies:baseline:v1:reset``, which monitor, stream_health and latest follow."""

    event_type = "anomalies:reset:v1"
    ordering_key = "baseline_id"
    takes = specs.RESET_TAKES
    config_keys = specs.CONFIG
    emits = specs.RESET_EMITS

    def __init__(self) -> None:
        self.known = BaselineStore()
        self.sync_timeout_s = 5.0
        self._follower: Follower | None = None

    async def setup(self, ctx: HandlerContext) -> None:
        settings = _settings(ctx, BaselineSettings.from_config)
        self.sync_timeout_s = _settings(ctx, lambda c: _plugin_number(c, "sync_timeout_s"))
        self.known = BaselineStore(settings.max_baselines)
        self._follower = await ctx.follow(
            BASELINE_SET, BASELINE_RESET, RESET_REQUESTED, on_event=self._apply, since_offset=0
        )

    def _apply(self, event: Event) -> None:
        if event.event_type == BASELINE_SET:
            self.known.put(Baseline.from_payload(event.payload))
        elif event.event_type == BASELINE_RESET and event.payload.get("forget"):
            self.known.remove(str(event.payload.get("baseline_id")))

    async def handle(self, event: Event) -> dict[str, Any]:
        baseline_id = event.payload["baseline_id"]
        forget = bool(event.payload.get("forget", False))
        if self._follower is not None:
            await self._follower.reached(event.offset, self.sync_timeout_s)
        if baseline_id not in self.known and await _kept_baseline(self.ctx, baseline_id) is None:
            raise _unknown_baseline(baseline_id)
        if forget:
            await self.ctx.kv.delete(_baseline_key(baseline_id))
        await self.ctx.publish(BASELINE_RESET, {"baseline_id": baseline_id, "forget": forget})
        return {"baseline_id": baseline_id, "forgotten": forget}


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
    takes = specs.STREAM_HEALTH_TAKES
    config_keys = specs.CONFIG
    emits = specs.STREAM_HEALTH_EMITS

    def __init__(self) -> None:
        self.health = HealthStore()
        self.sync_timeout_s = 5.0
        self._follower: Follower | None = None
        self._listeners: dict[str, set[_Listener]] = {}

    async def setup(self, ctx: HandlerContext) -> None:
        self.health = HealthStore(_settings(ctx, BaselineSettings.from_config))
        self.sync_timeout_s = _settings(ctx, lambda c: _plugin_number(c, "sync_timeout_s"))
        self._follower = await ctx.follow(
            BASELINE_SET, BASELINE_RESET, MONITOR_SUCCESS, HEALTH_REQUESTED, on_event=self._apply, since_offset=0
        )

    def _apply(self, event: Event) -> None:
        baseline_id = event.payload.get("baseline_id")
        if not isinstance(baseline_id, str):
            return
        if event.event_type == BASELINE_SET or (
            event.event_type == BASELINE_RESET and not event.payload.get("forget") and baseline_id in self.health
        ):
            self.health.reset(baseline_id)
            health = self.health.health(baseline_id)
        elif event.event_type == BASELINE_RESET:
            self.health.forget(baseline_id)
            return
        elif event.event_type == MONITOR_SUCCESS:
            health = None
            for scored in _scored(event.payload):
                health = self.health.record(baseline_id, bool(scored.get("is_anomaly")))
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
            if await _kept_baseline(self.ctx, baseline_id) is None:
                raise _unknown_baseline(baseline_id)
            self.health.reset(baseline_id)  # set before a restart: nothing monitored since
            current = self.health.health(baseline_id)
            assert current is not None
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
