"""The analytics plugin's handlers: window definitions, metric values, and the bus's own live statistics.

Entry points (``[project.entry-points."nexus.handlers"]``): ``analytics.define_window``,
``analytics.record_metric``, ``analytics.stream_metrics``. The windowing algorithm is the pure
:mod:`.windows`; this module reads payloads and config, keeps the clock and publishes what the engine returns.

State. The window definitions and their open windows live in memory, in one :class:`~.windows.Engine` per
server that ``define_window`` and ``record_metric`` share (:class:`Windows`, through ``ctx.shared``). Windows
defined with ``define_window`` do **not** persist: their open windows would be lost with the process anyway,
and a restart should not resurrect definitions nobody can list. Definitions that must always exist go in the
config file (``windows``, below) and are defined again at every start. On a cluster each node keeps its own
definitions and windows: send a metric's values to one node (or define the window on every node and accept
per-node aggregates).

Clocks. Event times come from ``timestamp`` (RFC 3339 or epoch seconds; the node's wall clock when absent).
Session windows also close when their metric falls silent: a timer in ``record_metric`` calls
:meth:`~.windows.Engine.tick` every ``session_check_s`` with ``time.monotonic()``, the same clock every value's
arrival is read from, so a silent session closes within ``session_check_s`` after ``gap_s + grace_s``. The timer
is a background task of the server (``ctx.start_soon``), cancelled when it stops. What each handler takes and
emits is declared in :mod:`.specs`.

Configuration (``[handlers.analytics]``, shared by the three handlers; engine-wide keys are read by the first
handler set up on a server):

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
    parse_time,
    read_int,
    read_number,
)

from . import specs
from .specs import THRESHOLD_CROSSED, WINDOW_CLOSED
from .windows import ClosedWindow, Engine, InvalidInput, Limits, WindowSpec, check_tags, rfc3339

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


# --- the engine shared by the handlers of one server ---------------------------------------------------------


class Windows:
    """The window definitions and open windows that ``define_window`` and ``record_metric`` share.

    One per plugin and server (``ctx.shared(Windows, ...)``), made by the first of the two handlers set up, with
    its config: the engine-wide keys (limits, ``default_grace_s``, ``windows``) are read there.
    """

    def __init__(self, engine: Engine, default_grace_s: float) -> None:
        self.engine = engine
        self.default_grace_s = default_grace_s

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Windows:
        """An engine with the limits of ``config`` and its permanent ``windows`` defined."""
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
        return cls(engine, grace)


def _windows(ctx: HandlerContext) -> Windows:
    return ctx.shared(Windows, lambda: Windows.from_config(ctx.config))


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
    takes = specs.DEFINE_WINDOW_TAKES
    emits = specs.DEFINE_WINDOW_EMITS

    async def setup(self, ctx: HandlerContext) -> None:
        self._shared = _windows(ctx)

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
    takes = specs.RECORD_METRIC_TAKES
    emits = specs.RECORD_METRIC_EMITS

    async def setup(self, ctx: HandlerContext) -> None:
        self._shared = _windows(ctx)
        self._max_future_s = _config_number(ctx.config, "max_future_s", 300.0)
        self._check_s = _config_number(ctx.config, "session_check_s", 0.5, minimum=0.001)
        ctx.start_soon(self._close_silent_sessions, name="analytics-session-timer")

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


class StreamMetrics(StreamingEventHandler):
    """Streams the bus's own live statistics every interval, until cancelled."""

    event_type = "analytics:stream_metrics:v1"
    stream_timeout = None
    takes = specs.STREAM_METRICS_TAKES
    emits = specs.STREAM_METRICS_EMITS

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
