"""The analytics plugin's handlers: window definitions, metric values, and the bus's own live statistics.

Entry points (``[project.entry-points."nexus.handlers"]``): ``analytics.define_window``,
``analytics.record_metric``, ``analytics.snapshot``, ``analytics.stream_metrics``. The windowing algorithm is the pure
:mod:`.windows`; this module reads payloads and config, keeps the clock and publishes what the engine returns.

State. The window definitions and their open windows live in memory, in one :class:`~.windows.Engine` per
server that ``define_window``, ``record_metric`` and ``snapshot`` share (:class:`Windows`, through
``ctx.shared``). Everything that defines a window is its ``define_window`` payload (``WindowSpec.to_payload``
gives it back, ``Windows.parse`` reads it). ``define_window`` keeps each definition's payload in the plugin's
``ctx.kv`` under ``window.<base64url of the name>``, and the first handler set up defines them again when the
server starts, after the config file's ``windows`` (which win on a shared name); the open windows are not kept.
With the NATS bus the store is the deployment's bucket, so a node that starts defines every window kept by any
node; while running, each node keeps its own definitions and windows: send a metric's values to one node (or
define the window on every node and accept per-node aggregates).

Clocks. Event times come from ``timestamp`` (RFC 3339 or epoch seconds; the node's wall clock when absent).
Session windows also close when their metric falls silent: a timer in ``record_metric`` calls
:meth:`~.windows.Engine.tick` every ``session_check_s`` with ``time.monotonic()``, the same clock every value's
arrival is read from, so a silent session closes within ``session_check_s`` after ``gap_s + grace_s``. The timer
is a background task of the server (``ctx.start_soon``), cancelled when it stops; it also publishes
``analytics:source:v1:silent`` for definitions whose ``silence_s`` has passed since their last value (so within
``session_check_s`` of it), and ``record_metric`` publishes ``analytics:source:v1:resumed`` with the value that
ends a silence. What each handler takes and emits is declared in :mod:`.specs`.

New subscribers. Closed windows are events on the bus; the windows still open are not. A subscriber that
starts late asks ``snapshot`` for them (their aggregates so far) and then follows ``analytics:window:v1:closed``.
``stream_metrics`` streams the node's own statistics, not windows, so it does not start with a snapshot.

Configuration (``[handlers.analytics]``, shared by the four handlers and declared in ``specs.CONFIG``; engine-wide
keys are read by the first handler set up on a server):

- ``default_grace_s`` (0): ``grace_s`` of a definition that gives none;
- ``default_silence_s`` (0, off): ``silence_s`` of a definition that gives none;
- ``max_thresholds`` (32): named thresholds per definition;
- ``max_snapshot_windows`` (1000): the most windows one ``snapshot`` answers (and its default ``limit``); a
  ``p95`` window sorts its samples to answer (about 1 ms of CPU per 10,000), the others cost next to nothing;
- ``max_definitions`` (1000), ``max_open_windows`` (1000 per definition), ``max_windows_per_value`` (100:
  ``size_s / slide_s`` of a sliding window), ``max_samples`` (10000 values per ``p95`` window): see
  :mod:`.windows`;
- ``max_future_s`` (300): a ``timestamp`` further ahead of the node's clock is refused, so one bad clock
  cannot push the watermark past every window;
- ``session_check_s`` (0.5): how often silent session windows and silent sources are looked for;
- ``windows`` ([]): definitions (``define_window`` payloads) made at start-up;
- ``metrics_interval_s`` (1.0), ``min_interval_s`` (0.1), ``max_interval_s`` (3600): ``stream_metrics``'s
  default interval and the range a request may ask for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from nexus import (
    Event,
    EventHandler,
    HandlerContext,
    InvalidPayload,
    Stream,
    StreamingEventHandler,
    key_for,
    parse_time,
    read_int,
    read_number,
)

from . import specs
from .specs import DEFAULTS, SOURCE_RESUMED, SOURCE_SILENT, THRESHOLD_CROSSED, WINDOW_CLOSED
from .windows import ClosedWindow, Engine, InvalidInput, Limits, Outcome, WindowSpec, check_tags, rfc3339

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
        max_thresholds=_config_int(config, "max_thresholds", defaults.max_thresholds),
    )


# --- the engine shared by the handlers of one server ---------------------------------------------------------


class Windows:
    """The window definitions and open windows that ``define_window`` and ``record_metric`` share.

    One per plugin and server (``ctx.shared(Windows, ...)``), made by the first of the two handlers set up, with
    its config: the engine-wide keys (limits, ``default_grace_s``, ``windows``) are read there.
    """

    def __init__(self, engine: Engine, default_grace_s: float, default_silence_s: float = 0.0) -> None:
        self.engine = engine
        self.default_grace_s = default_grace_s
        self.default_silence_s = default_silence_s
        self.configured: set[str] = set()
        """Names of the windows the config file defines (they win over kept ones at start)."""
        self._kept_loaded = False

    async def load_kept(self, ctx: HandlerContext) -> None:
        """Define the windows ``define_window`` kept in ``ctx.kv`` (once per server, by the first handler set up).

        The config file wins at start: a kept definition whose name the config also defines is left out (and
        logged); one that no longer parses (limits changed) is skipped and logged.
        """
        if self._kept_loaded:
            return
        self._kept_loaded = True
        for key in await ctx.kv.keys(WINDOW_KEY_PREFIX):
            entry = await ctx.kv.get(key)
            if entry is None:
                continue
            try:
                spec = self.parse(entry.value) if isinstance(entry.value, Mapping) else None
            except InvalidInput as exc:
                ctx.log.warning("kept_window_skipped", key=key, error=str(exc))
                continue
            if spec is None:
                ctx.log.warning("kept_window_skipped", key=key, error="not a window definition")
            elif spec.name in self.configured:
                ctx.log.info("kept_window_overridden_by_config", name=spec.name)
            else:
                self.engine.define(spec)

    def parse(self, payload: Mapping[str, Any]) -> WindowSpec:
        """A definition with this node's defaults and limits; raises :class:`InvalidInput`."""
        return WindowSpec.parse(
            payload,
            default_grace_s=self.default_grace_s,
            default_silence_s=self.default_silence_s,
            limits=self.engine.limits,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Windows:
        """An engine with the limits of ``config`` and its permanent ``windows`` defined."""
        shared = cls(
            Engine(_limits(config)),
            _config_number(config, "default_grace_s", DEFAULTS["default_grace_s"]),
            _config_number(config, "default_silence_s", DEFAULTS["default_silence_s"]),
        )
        windows = config.get("windows", DEFAULTS["windows"])
        if not isinstance(windows, list):
            raise ValueError("[handlers.analytics] windows must be a list of window definitions")
        for index, payload in enumerate(windows):
            if not isinstance(payload, Mapping):
                raise ValueError(f"[handlers.analytics] windows[{index}] must be a table (a define_window payload)")
            try:
                spec = shared.parse(payload)
                shared.engine.define(spec)
            except InvalidInput as exc:
                raise ValueError(f"[handlers.analytics] windows[{index}]: {exc}") from None
            shared.configured.add(spec.name)
        return shared


WINDOW_KEY_PREFIX = "window."


def _window_key(name: str) -> str:
    """Where ``define_window`` keeps a definition in the plugin's ``ctx.kv``."""
    return key_for("window", name)


async def _windows(ctx: HandlerContext) -> Windows:
    shared = ctx.shared(Windows, lambda: Windows.from_config(ctx.config))
    await shared.load_kept(ctx)
    return shared


def _invalid(exc: InvalidInput, event: Event) -> InvalidPayload:
    return InvalidPayload(f"{event.event_type} payload: {exc}")


async def _publish_closed(ctx: HandlerContext, closed: list[ClosedWindow]) -> None:
    for window in closed:
        await ctx.publish(WINDOW_CLOSED, window.to_payload())
        for alert in window.alerts:
            await ctx.publish(THRESHOLD_CROSSED, alert.to_payload())


async def _publish(ctx: HandlerContext, outcome: Outcome) -> None:
    """The closed windows and their alerts, then the sources that fell silent or came back."""
    await _publish_closed(ctx, outcome.closed)
    for change in outcome.sources:
        await ctx.publish(SOURCE_SILENT if change.state == "silent" else SOURCE_RESUMED, change.to_payload())


# --- handlers ---------------------------------------------------------------------------------------------------


class DefineWindow(EventHandler):
    """Defines (or replaces) a time window over a metric, with its aggregate and threshold alerts.

    Each definition is kept in the plugin's ``ctx.kv`` and defined again when the server starts (after the
    config file's ``windows``, which win on a name they share); its open windows are not kept.
    """

    event_type = "analytics:define_window:v1"
    ordering_key = "name"
    takes = specs.DEFINE_WINDOW_TAKES
    config_keys = specs.CONFIG
    emits = specs.DEFINE_WINDOW_EMITS

    async def setup(self, ctx: HandlerContext) -> None:
        self._shared = await _windows(ctx)

    async def handle(self, event: Event) -> dict[str, Any]:
        shared = self._shared
        try:
            spec = shared.parse(event.payload)
            replaced = shared.engine.define(spec)
        except InvalidInput as exc:
            raise _invalid(exc, event) from None
        await self.ctx.kv.put(_window_key(spec.name), spec.to_payload())  # defined again after a restart
        self.ctx.log.info("window_defined", name=spec.name, metric=spec.metric, kind=spec.kind, replaced=replaced)
        return {**spec.to_payload(), "replaced": replaced}


class RecordMetric(EventHandler):
    """Records one value of a metric into every window defined over it.

    Windows close on event time (the watermark: the greatest event time seen minus ``grace_s``) and publish
    ``analytics:window:v1:closed``; a crossed threshold publishes ``analytics:threshold:v1:crossed``.
    """

    event_type = "analytics:record_metric:v1"
    ordering_key = "metric"
    takes = specs.RECORD_METRIC_TAKES
    config_keys = specs.CONFIG
    emits = specs.RECORD_METRIC_EMITS

    async def setup(self, ctx: HandlerContext) -> None:
        self._shared = await _windows(ctx)
        self._max_future_s = _config_number(ctx.config, "max_future_s", DEFAULTS["max_future_s"])
        self._check_s = _config_number(ctx.config, "session_check_s", DEFAULTS["session_check_s"], minimum=0.001)
        ctx.start_soon(self._close_silent_sessions, name="analytics-session-timer")

    async def _close_silent_sessions(self) -> None:
        """Close session windows whose metric fell silent (no further value would ever close them), and report
        sources silent for their definition's ``silence_s``."""
        while True:
            await asyncio.sleep(self._check_s)
            outcome = self._shared.engine.tick(time.monotonic())
            try:
                await _publish(self.ctx, outcome)
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
        await _publish(self.ctx, outcome)
        return {
            "metric": metric,
            "timestamp": rfc3339(moment),
            "windows": outcome.matched,
            "late": outcome.late,
            "closed": len(outcome.closed),
            "alerts": len(outcome.alerts),
        }


class Snapshot(EventHandler):
    """Answers the open windows with their aggregates so far: what a new subscriber to the closed windows has
    missed of the windows still running (``name`` / ``metric`` select, ``limit`` bounds)."""

    event_type = "analytics:snapshot:v1"
    takes = specs.SNAPSHOT_TAKES
    config_keys = specs.CONFIG
    emits = specs.SNAPSHOT_EMITS

    async def setup(self, ctx: HandlerContext) -> None:
        self._shared = await _windows(ctx)
        self._max = _config_int(ctx.config, "max_snapshot_windows", DEFAULTS["max_snapshot_windows"])

    async def handle(self, event: Event) -> dict[str, Any]:
        payload = event.payload
        limit = payload.get("limit", self._max)
        if limit > self._max:
            raise InvalidPayload(f"{event.event_type} payload.limit: {limit} is more than {self._max} (the most)")
        found = self._shared.engine.snapshot(name=payload.get("name"), metric=payload.get("metric"), limit=limit)
        return {
            "at": rfc3339(round(time.time(), 3)),
            "windows": [window.to_payload() for window in found.windows],
            "total": found.total,
            "truncated": found.truncated,
            "definitions": found.definitions,
        }


class StreamMetrics(StreamingEventHandler):
    """Streams the bus's own live statistics every interval, until cancelled."""

    event_type = "analytics:stream_metrics:v1"
    stream_timeout = None
    takes = specs.STREAM_METRICS_TAKES
    config_keys = specs.CONFIG
    emits = specs.STREAM_METRICS_EMITS

    async def setup(self, ctx: HandlerContext) -> None:
        self._default = _config_number(ctx.config, "metrics_interval_s", DEFAULTS["metrics_interval_s"], minimum=0.001)
        self._min = _config_number(ctx.config, "min_interval_s", DEFAULTS["min_interval_s"], minimum=0.001)
        self._max = _config_number(ctx.config, "max_interval_s", DEFAULTS["max_interval_s"], minimum=self._min)

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
