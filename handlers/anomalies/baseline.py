"""Baseline deviation: Mahalanobis distance to a baseline, finite-sample thresholds, rolling health.
Pure: no I/O, no asyncio.

A baseline is a set of ``n`` points of dimension ``d`` (at least ``d + min_excess_points``, default ``d + 10``):
its mean and its sample covariance (divided by ``n - 1``). A point's distance is the Mahalanobis distance
``sqrt((x - mean)^T S^-1 (x - mean))``.
When the covariance is singular (numerical rank below ``d``: a coordinate that never varied, or points on a
line), and only then, it is regularised with a ridge ``S + lambda I``, ``lambda = ridge x trace(S) / d``
(``ridge`` alone when the trace is 0), so a deviation off the degenerate subspace is far, not invisible.

The threshold is in the same units as the distance. By default (``finite``) it is the prediction region for a
new observation of the baseline's distribution, which accounts for the mean and covariance being estimated
from ``n`` points: ``sqrt(d (n - 1)(n + 1) / (n (n - d)) x F.ppf(confidence, d, n - d))`` (13-D, 40 points,
0.99: 7.43). The ``asymptotic`` threshold ``sqrt(chi2.ppf(confidence, d))`` (2-D at 0.99: 3.0349) is its
limit for large ``n``; with few points per dimension it flags far more normal points than ``1 - confidence``
(13-D, 40 points, 0.99: 20.6 % on average instead of 1 %). A point farther than the threshold is an anomaly.

The rolling share of anomalies over the last
``health_window`` monitored points gives a health label: ``failing`` at 15 % or more, ``deteriorating`` at
5 % or more, else ``healthy``.

Memory per baseline: the mean, the covariance and its inverse, ``(2 d^2 + d) x 8`` bytes plus about 1 KB
(2-D: about 1 KB; 64-D, the default maximum: about 66 KB); per health window about 1 KB with the default 100
points. Stores keep at most ``max_baselines`` (default 10,000), least recently used evicted first.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from scipy import special

from nexus import read_int, read_number

HEALTHY: Final = "healthy"
DETERIORATING: Final = "deteriorating"
FAILING: Final = "failing"

FloatArray = npt.NDArray[np.float64]


FINITE: Final = "finite"
ASYMPTOTIC: Final = "asymptotic"
THRESHOLD_METHODS: Final = (FINITE, ASYMPTOTIC)


class BaselineError(ValueError):
    """Points or a point that cannot be used; the message says why."""


# --- settings ---------------------------------------------------------------------------------------------

_PLUGIN: Final = "anomalies"
_POSITIVE_INT: Final = "an integer of at least 1"


@dataclasses.dataclass(frozen=True)
class BaselineSettings:
    """Baseline settings (``[handlers.anomalies]``)."""

    confidence: float = 0.99
    """Confidence of the threshold, when set_baseline does not give one."""
    threshold: str = FINITE
    """``finite`` (the F-distribution prediction region) or ``asymptotic`` (sqrt chi-square)."""
    min_excess_points: int = 10
    """A d-dimensional baseline needs at least ``d + min_excess_points`` points (at least 2)."""
    ridge: float = 1e-6
    """Relative size of the ridge added to a singular covariance."""
    max_dimension: int = 64
    max_baselines: int = 10_000
    health_window: int = 100
    """Monitored points the rolling anomaly percentage is taken over."""
    failing_pct: float = 15.0
    deteriorating_pct: float = 5.0
    max_points: int = 100_000
    """Points a baseline may be fitted on (CSV rows included)."""
    max_batch: int = 1000
    """Points one monitor request may carry."""
    latest_points: int = 100
    """Scored points kept per baseline for the latest query (its most it can return)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BaselineSettings:
        """Read the settings from a ``ctx.config`` mapping; raises ValueError naming a bad key."""
        settings = cls(
            confidence=read_number(config, "confidence", cls.confidence, plugin=_PLUGIN, minimum=0.0, maximum=1.0),
            ridge=read_number(config, "ridge", cls.ridge, plugin=_PLUGIN, minimum=0.0),
            max_dimension=read_int(
                config, "max_dimension", cls.max_dimension, plugin=_PLUGIN, minimum=1, must_be=_POSITIVE_INT
            ),
            max_baselines=read_int(
                config, "max_baselines", cls.max_baselines, plugin=_PLUGIN, minimum=1, must_be=_POSITIVE_INT
            ),
            health_window=read_int(
                config, "health_window", cls.health_window, plugin=_PLUGIN, minimum=1, must_be=_POSITIVE_INT
            ),
            failing_pct=read_number(config, "failing_pct", cls.failing_pct, plugin=_PLUGIN, minimum=0.0, maximum=100.0),
            deteriorating_pct=read_number(
                config, "deteriorating_pct", cls.deteriorating_pct, plugin=_PLUGIN, minimum=0.0, maximum=100.0
            ),
            threshold=_read_method(config),
            min_excess_points=read_int(
                config,
                "min_excess_points",
                cls.min_excess_points,
                plugin=_PLUGIN,
                minimum=2,
                must_be="an integer of at least 2",
            ),
            max_points=read_int(config, "max_points", cls.max_points, plugin=_PLUGIN, minimum=1, must_be=_POSITIVE_INT),
            max_batch=read_int(config, "max_batch", cls.max_batch, plugin=_PLUGIN, minimum=1, must_be=_POSITIVE_INT),
            latest_points=read_int(
                config, "latest_points", cls.latest_points, plugin=_PLUGIN, minimum=1, must_be=_POSITIVE_INT
            ),
        )
        if not 0.0 < settings.confidence < 1.0:
            raise ValueError(f"anomalies setting 'confidence' must be between 0 and 1, got {settings.confidence}")
        if settings.ridge <= 0:
            raise ValueError(f"anomalies setting 'ridge' must be more than 0, got {settings.ridge}")
        if settings.deteriorating_pct > settings.failing_pct:
            raise ValueError("anomalies setting 'deteriorating_pct' must not exceed 'failing_pct'")
        return settings


def _read_method(config: Mapping[str, Any]) -> str:
    method = config.get("threshold", FINITE)
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"anomalies setting 'threshold' must be 'finite' or 'asymptotic', got {method!r}")
    return str(method)


# --- thresholds -------------------------------------------------------------------------------------------


def chi2_quantile(dof: int, probability: float) -> float:
    """The chi-square quantile: ``x`` with ``P(X <= x) = probability`` for ``dof`` degrees of freedom."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {dof}")
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be between 0 and 1, got {probability}")
    return float(special.chdtri(dof, 1.0 - probability))


def threshold(dimension: int, confidence: float) -> float:
    """The asymptotic distance threshold: ``sqrt`` of the chi-square quantile at ``confidence`` for ``dimension``."""
    return math.sqrt(chi2_quantile(dimension, confidence))


def f_quantile(dfn: int, dfd: int, probability: float) -> float:
    """The F quantile: ``x`` with ``P(X <= x) = probability`` for ``dfn`` and ``dfd`` degrees of freedom."""
    if dfn < 1 or dfd < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {dfn} and {dfd}")
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be between 0 and 1, got {probability}")
    return float(special.fdtri(dfn, dfd, probability))


def finite_threshold(dimension: int, count: int, confidence: float) -> float:
    """The distance threshold of the prediction region for a new point, from a baseline of ``count`` points.

    ``sqrt(d (n - 1)(n + 1) / (n (n - d)) x F.ppf(confidence, d, n - d))``; needs ``n > d``.
    """
    d, n = dimension, count
    if n <= d:
        raise ValueError(f"a {d}-dimensional finite-sample threshold needs more than {d} points, got {n}")
    scale = d * (n - 1) * (n + 1) / (n * (n - d))
    return math.sqrt(scale * f_quantile(d, n - d, confidence))


def threshold_for(method: str, dimension: int, count: int, confidence: float) -> float:
    """The ``finite`` or ``asymptotic`` threshold for a baseline of ``count`` points in ``dimension``."""
    if method == FINITE:
        return finite_threshold(dimension, count, confidence)
    if method == ASYMPTOTIC:
        return threshold(dimension, confidence)
    raise ValueError(f"threshold must be 'finite' or 'asymptotic', got {method!r}")


# --- baselines --------------------------------------------------------------------------------------------


def _finite_vector(value: Any, what: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or not value:
        raise BaselineError(f"{what} must be a non-empty array of numbers")
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise BaselineError(f"{what}[{index}] must be a number, got {item!r}")
        if not math.isfinite(item):
            raise BaselineError(f"{what}[{index}] must be a finite number, got {item!r}")
    return [float(item) for item in value]


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Baseline:
    """A fitted baseline: mean, covariance (possibly with a ridge) and the threshold at its confidence."""

    baseline_id: str
    count: int
    mean: FloatArray
    covariance: FloatArray
    """The sample covariance, without the ridge."""
    ridge: float
    """The ridge added to the covariance's diagonal (0.0 when it was not singular)."""
    confidence: float
    threshold: float
    method: str
    """How the threshold was computed: ``finite`` or ``asymptotic``."""
    precision: FloatArray = dataclasses.field(repr=False)
    """The inverse of ``covariance + ridge I``."""

    @property
    def dimension(self) -> int:
        return int(self.mean.shape[0])

    @property
    def regularised(self) -> bool:
        return self.ridge > 0.0

    @classmethod
    def fit(
        cls,
        baseline_id: str,
        points: Sequence[Sequence[float]],
        *,
        confidence: float = 0.99,
        ridge: float = 1e-6,
        max_dimension: int | None = None,
        method: str = FINITE,
        min_excess_points: int = 10,
        max_points: int | None = None,
    ) -> Baseline:
        """Fit a baseline; raises :class:`BaselineError` naming what is wrong with the points.

        A ``d``-dimensional baseline needs at least ``d + min_excess_points`` points (``min_excess_points`` at
        least 2) and at most ``max_points``.
        """
        if not isinstance(points, (list, tuple)) or not points:
            raise BaselineError("points must be a non-empty array of points")
        if max_points is not None and len(points) > max_points:
            raise BaselineError(f"{len(points)} points are more than max_points {max_points}")
        if method not in THRESHOLD_METHODS:
            raise BaselineError(f"threshold must be 'finite' or 'asymptotic', got {method!r}")
        rows = [_finite_vector(point, f"points[{index}]") for index, point in enumerate(points)]
        dimension = len(rows[0])
        for index, row in enumerate(rows):
            if len(row) != dimension:
                raise BaselineError(
                    f"points[{index}] has {len(row)} coordinates but points[0] has {dimension}: "
                    "every point needs the same dimension"
                )
        if max_dimension is not None and dimension > max_dimension:
            raise BaselineError(f"points have {dimension} coordinates, more than max_dimension {max_dimension}")
        excess = max(min_excess_points, 2)
        if len(rows) < dimension + excess:
            raise BaselineError(
                f"a {dimension}-dimensional baseline needs at least {dimension + excess} points "
                f"(dimension + {excess}), got {len(rows)}: with fewer, its mean and covariance are too uncertain "
                "for a useful threshold"
            )
        if not 0.0 < confidence < 1.0:
            raise BaselineError(f"confidence must be between 0 and 1, got {confidence}")
        data = np.asarray(rows, dtype=np.float64)
        mean = data.mean(axis=0)
        covariance = np.atleast_2d(np.cov(data, rowvar=False, ddof=1))
        if not np.all(np.isfinite(covariance)):
            raise BaselineError("the points are too large: their covariance overflows")
        return cls.from_parts(
            baseline_id, len(rows), mean, covariance, confidence=confidence, ridge=ridge, method=method
        )

    @classmethod
    def from_parts(
        cls,
        baseline_id: str,
        count: int,
        mean: FloatArray,
        covariance: FloatArray,
        *,
        confidence: float,
        ridge: float = 1e-6,
        applied_ridge: float | None = None,
        method: str = FINITE,
    ) -> Baseline:
        """A baseline from its mean and covariance; the ridge is decided here unless ``applied_ridge`` is given."""
        dimension = int(mean.shape[0])
        if applied_ridge is None:
            applied_ridge = 0.0
            if _is_singular(covariance):
                scale = float(np.trace(covariance)) / dimension
                applied_ridge = ridge * scale if scale > 0 else ridge
        regularised = covariance + applied_ridge * np.eye(dimension)
        precision = np.asarray(np.linalg.inv(regularised), dtype=np.float64)
        return cls(
            baseline_id=baseline_id,
            count=count,
            mean=mean,
            covariance=covariance,
            ridge=applied_ridge,
            confidence=confidence,
            threshold=threshold_for(method, dimension, count, confidence),
            method=method,
            precision=precision,
        )

    def distance(self, point: Sequence[float]) -> float:
        """The Mahalanobis distance of ``point``; raises :class:`BaselineError` for a point that does not fit."""
        values = _finite_vector(point, "point")
        if len(values) != self.dimension:
            raise BaselineError(
                f"point has {len(values)} coordinates but baseline {self.baseline_id!r} has dimension {self.dimension}"
            )
        diff = np.asarray(values, dtype=np.float64) - self.mean
        squared = float(diff @ self.precision @ diff)
        return math.sqrt(max(squared, 0.0))

    def to_payload(self) -> dict[str, Any]:
        """A JSON description other nodes rebuild the baseline from (:meth:`from_payload`)."""
        return {
            "baseline_id": self.baseline_id,
            "dimension": self.dimension,
            "count": self.count,
            "mean": [float(v) for v in self.mean],
            "covariance": [[float(v) for v in row] for row in self.covariance],
            "ridge": self.ridge,
            "confidence": self.confidence,
            "threshold": self.threshold,
            "threshold_method": self.method,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Baseline:
        """Rebuild a baseline published with :meth:`to_payload`; raises BaselineError or KeyError."""
        mean = np.asarray(_finite_vector(payload["mean"], "mean"), dtype=np.float64)
        rows = payload["covariance"]
        if not isinstance(rows, list) or len(rows) != mean.shape[0]:
            raise BaselineError("covariance must be a square array matching the mean")
        covariance = np.asarray(
            [_finite_vector(row, f"covariance[{i}]") for i, row in enumerate(rows)], dtype=np.float64
        )
        if covariance.shape != (mean.shape[0], mean.shape[0]):
            raise BaselineError("covariance must be a square array matching the mean")
        method = payload.get("threshold_method", ASYMPTOTIC)  # published before finite thresholds existed
        if method not in THRESHOLD_METHODS:
            raise BaselineError(f"threshold_method must be 'finite' or 'asymptotic', got {method!r}")
        count = int(payload["count"])
        if method == FINITE and count <= mean.shape[0]:
            raise BaselineError(f"count {count} is too small for a finite threshold in {mean.shape[0]} dimensions")
        return cls.from_parts(
            str(payload["baseline_id"]),
            count,
            mean,
            covariance,
            confidence=float(payload["confidence"]),
            applied_ridge=float(payload["ridge"]),
            method=str(method),
        )


_NUMBER: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _csv_number(field: str) -> float | None:
    text = field.strip()
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def parse_csv(text: str, *, max_rows: int, max_columns: int, max_chars: int = 10_000_000) -> list[list[float]]:
    """The points in CSV text: one point a row, comma-separated decimal numbers.

    The first row is a header (skipped) when none of its fields is a number; blank lines are skipped. Raises
    :class:`BaselineError` naming the line for a ragged row, a field that is not a finite decimal number, or
    more than ``max_rows`` rows, ``max_columns`` columns or ``max_chars`` characters.
    """
    if len(text) > max_chars:
        raise BaselineError(f"csv has {len(text)} characters, more than {max_chars}")
    rows: list[list[float]] = []
    width = 0
    first_line = 0
    try:
        for line_no, fields in enumerate(csv.reader(io.StringIO(text), strict=True), start=1):
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) > max_columns:
                raise BaselineError(f"csv line {line_no} has {len(fields)} columns, more than {max_columns}")
            values = [_csv_number(field) for field in fields]
            if not rows and not width and all(value is None for value in values):
                width = len(fields)  # the header
                first_line = line_no
                continue
            for column, (field, value) in enumerate(zip(fields, values, strict=True), start=1):
                if value is None:
                    raise BaselineError(
                        f"csv line {line_no} column {column}: {field.strip()[:40]!r} is not a finite decimal number"
                    )
            if not width:
                width, first_line = len(fields), line_no
            elif len(fields) != width:
                raise BaselineError(
                    f"csv line {line_no} has {len(fields)} columns but line {first_line} has {width}: "
                    "every row needs the same number"
                )
            if len(rows) == max_rows:
                raise BaselineError(f"csv has more than {max_rows} rows of points")
            rows.append([value for value in values if value is not None])
    except csv.Error as exc:
        raise BaselineError(f"csv cannot be read: {exc}") from None
    if not rows:
        raise BaselineError("csv has no rows of points")
    return rows


def _is_singular(covariance: FloatArray) -> bool:
    """Numerically rank-deficient, with numpy's ``matrix_rank`` tolerance."""
    return bool(np.linalg.matrix_rank(covariance, hermitian=True) < covariance.shape[0])


class BaselineStore:
    """Baselines by id, at most ``max_baselines`` (least recently used evicted first)."""

    def __init__(self, max_baselines: int = 10_000) -> None:
        self.max_baselines = max_baselines
        self._baselines: OrderedDict[str, Baseline] = OrderedDict()

    def __len__(self) -> int:
        return len(self._baselines)

    def __contains__(self, baseline_id: object) -> bool:
        return baseline_id in self._baselines

    def put(self, baseline: Baseline) -> None:
        """Add or replace a baseline."""
        self._baselines[baseline.baseline_id] = baseline
        self._baselines.move_to_end(baseline.baseline_id)
        while len(self._baselines) > self.max_baselines:
            self._baselines.popitem(last=False)

    def get(self, baseline_id: str) -> Baseline | None:
        """The baseline, marked as recently used; None when unknown."""
        baseline = self._baselines.get(baseline_id)
        if baseline is not None:
            self._baselines.move_to_end(baseline_id)
        return baseline

    def remove(self, baseline_id: str) -> bool:
        """Forget a baseline; whether it was known."""
        return self._baselines.pop(baseline_id, None) is not None


class LatestStore:
    """The last ``size`` scored points of each known baseline (``{point, distance, is_anomaly}``), at most
    ``max_baselines`` baselines (LRU). A baseline (re)set or reset starts empty."""

    def __init__(self, size: int = 100, max_baselines: int = 10_000) -> None:
        self.size = size
        self.max_baselines = max_baselines
        self._points: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()

    def __contains__(self, baseline_id: object) -> bool:
        return baseline_id in self._points

    def reset(self, baseline_id: str) -> None:
        """The baseline is known and has no scored points."""
        self._points[baseline_id] = deque(maxlen=self.size)
        self._points.move_to_end(baseline_id)
        while len(self._points) > self.max_baselines:
            self._points.popitem(last=False)

    def forget(self, baseline_id: str) -> None:
        """The baseline is no longer known."""
        self._points.pop(baseline_id, None)

    def record(self, baseline_id: str, scored: Sequence[Mapping[str, Any]]) -> None:
        """Scored points of a baseline, oldest first; ignored for an unknown baseline."""
        points = self._points.get(baseline_id)
        if points is None:
            return
        self._points.move_to_end(baseline_id)
        points.extend(dict(item) for item in scored)

    def latest(self, baseline_id: str, limit: int) -> list[dict[str, Any]] | None:
        """The last ``limit`` scored points, oldest first; None for an unknown baseline."""
        points = self._points.get(baseline_id)
        if points is None:
            return None
        return list(points)[-limit:] if limit > 0 else []


# --- health -----------------------------------------------------------------------------------------------


def health_label(anomaly_pct: float, *, failing_pct: float = 15.0, deteriorating_pct: float = 5.0) -> str:
    """``failing`` at ``failing_pct`` or more, ``deteriorating`` at ``deteriorating_pct`` or more, else healthy."""
    if anomaly_pct >= failing_pct:
        return FAILING
    if anomaly_pct >= deteriorating_pct:
        return DETERIORATING
    return HEALTHY


class HealthWindow:
    """Whether each of the last ``size`` monitored points was an anomaly."""

    __slots__ = ("_flags", "anomalies")

    def __init__(self, size: int = 100) -> None:
        self._flags: deque[bool] = deque(maxlen=size)
        self.anomalies = 0

    def __len__(self) -> int:
        return len(self._flags)

    def add(self, is_anomaly: bool) -> None:
        """Record one monitored point."""
        if len(self._flags) == self._flags.maxlen and self._flags[0]:
            self.anomalies -= 1
        self._flags.append(is_anomaly)
        if is_anomaly:
            self.anomalies += 1

    @property
    def anomaly_pct(self) -> float:
        """Anomalies among the recorded points, in percent (0.0 with none recorded)."""
        return 100.0 * self.anomalies / len(self._flags) if self._flags else 0.0


class HealthStore:
    """A :class:`HealthWindow` per known baseline, at most ``max_baselines`` (LRU)."""

    def __init__(self, settings: BaselineSettings | None = None) -> None:
        self.settings = settings or BaselineSettings()
        self._windows: OrderedDict[str, HealthWindow] = OrderedDict()

    def __contains__(self, baseline_id: object) -> bool:
        return baseline_id in self._windows

    def reset(self, baseline_id: str) -> None:
        """A baseline was (re)set: its window starts empty."""
        self._windows[baseline_id] = HealthWindow(self.settings.health_window)
        self._windows.move_to_end(baseline_id)
        while len(self._windows) > self.settings.max_baselines:
            self._windows.popitem(last=False)

    def forget(self, baseline_id: str) -> None:
        """The baseline is no longer known."""
        self._windows.pop(baseline_id, None)

    def record(self, baseline_id: str, is_anomaly: bool) -> dict[str, Any] | None:
        """Record a monitored point of a known baseline; its new health, or None when unknown."""
        window = self._windows.get(baseline_id)
        if window is None:
            return None
        self._windows.move_to_end(baseline_id)
        window.add(is_anomaly)
        return self.health(baseline_id)

    def health(self, baseline_id: str) -> dict[str, Any] | None:
        """``{baseline_id, anomaly_pct, health, anomalies, samples, window}``, or None when unknown."""
        window = self._windows.get(baseline_id)
        if window is None:
            return None
        pct = window.anomaly_pct
        return {
            "baseline_id": baseline_id,
            "anomaly_pct": pct,
            "health": health_label(
                pct, failing_pct=self.settings.failing_pct, deteriorating_pct=self.settings.deteriorating_pct
            ),
            "anomalies": window.anomalies,
            "samples": len(window),
            "window": self.settings.health_window,
        }
