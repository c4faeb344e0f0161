"""Baseline deviation (anomalies plugin): chi-square thresholds, Mahalanobis distance, rolling health."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from nexus.handlers.anomalies.baseline import (
    Baseline,
    BaselineError,
    BaselineSettings,
    BaselineStore,
    HealthStore,
    HealthWindow,
    chi2_quantile,
    health_label,
    threshold,
)

# Chi-square quantiles from published tables (NIST/SEMATECH e-Handbook, table 1.3.6.7.4), to 3-4 decimals.
TABLE = [
    (1, 0.95, 3.841),
    (1, 0.99, 6.635),
    (2, 0.95, 5.991),
    (2, 0.99, 9.210),
    (3, 0.99, 11.345),
    (4, 0.90, 7.779),
    (5, 0.999, 20.515),
    (10, 0.975, 20.483),
    (20, 0.95, 31.410),
]


@pytest.mark.parametrize(("dof", "confidence", "quantile"), TABLE)
def test_chi_square_quantiles_match_the_tables(dof: int, confidence: float, quantile: float) -> None:
    """The quantile for several dimensions and confidences matches the published table to its precision."""
    assert chi2_quantile(dof, confidence) == pytest.approx(quantile, abs=6e-4)
    assert threshold(dof, confidence) == pytest.approx(math.sqrt(quantile), abs=1e-3)


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99, 0.999, 0.999999])
def test_thresholds_match_closed_forms_in_one_and_two_dimensions(confidence: float) -> None:
    """2-D: chi2 has the closed form -2 ln(1 - p); 1-D: it is the square of the normal quantile at (1 + p) / 2."""
    assert chi2_quantile(2, confidence) == pytest.approx(-2 * math.log(1 - confidence), rel=1e-9)
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    assert threshold(1, confidence) == pytest.approx(z, rel=1e-9)


def test_the_two_dimensional_threshold_at_99_percent_is_3_0349() -> None:
    """The issue's reference value: sqrt(chi2.ppf(0.99, 2)) = sqrt(-2 ln 0.01) = 3.0349."""
    assert threshold(2, 0.99) == pytest.approx(3.0349, abs=5e-5)
    assert Baseline.fit("b", [[0, 0], [2, 0], [0, 2], [2, 2]]).threshold == pytest.approx(3.0349, abs=5e-5)


def test_mahalanobis_distance_matches_a_hand_computed_correlated_case() -> None:
    """For five correlated 2-D points the distance equals the one from the hand-inverted 2x2 sample covariance."""
    points = [[1.0, 2.0], [2.0, 3.0], [3.0, 5.0], [4.0, 4.0], [5.0, 6.0]]
    # By hand: mean (3, 4); deviations (-2,-2) (-1,-1) (0,1) (1,0) (2,2).
    # Sxx = (4+1+0+1+4)/4 = 2.5, Syy = (4+1+1+0+4)/4 = 2.5, Sxy = (4+1+0+0+4)/4 = 2.25; det = 6.25 - 5.0625.
    sxx, syy, sxy = 2.5, 2.5, 2.25
    det = sxx * syy - sxy * sxy
    dx, dy = 5.0 - 3.0, 2.0 - 4.0  # the point (5, 2): against the correlation
    want = math.sqrt((syy * dx * dx - 2 * sxy * dx * dy + sxx * dy * dy) / det)
    baseline = Baseline.fit("b", points)
    assert baseline.distance([5.0, 2.0]) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(math.sqrt(38 / 1.1875), rel=1e-12)  # = sqrt(32) = 5.657
    assert baseline.distance([3.0, 4.0]) == 0.0
    assert baseline.distance([5.0, 6.0]) == pytest.approx(math.sqrt((2.5 * 4 - 2 * 2.25 * 4 + 2.5 * 4) / det))
    assert not baseline.regularised


def test_sample_covariance_divides_by_n_minus_1() -> None:
    """1-D: for 1, 2, 3, 4 the variance is 5/3 (not 5/4), so 5 lies 2.5 / sqrt(5/3) = 1.9365 away."""
    baseline = Baseline.fit("b", [[1], [2], [3], [4]])
    assert baseline.distance([5]) == pytest.approx(2.5 / math.sqrt(5 / 3), rel=1e-12)
    assert float(baseline.covariance[0][0]) == pytest.approx(5 / 3)


def test_a_singular_covariance_is_regularised_and_only_then() -> None:
    """Points on a line get a ridge; a point off the line is far, a point along it is not; a full-rank set gets none."""
    on_line = [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]
    baseline = Baseline.fit("b", on_line)
    assert baseline.regularised
    # trace(S) / d = 2.5, ridge 1e-6 of it.
    assert baseline.ridge == pytest.approx(2.5e-6)
    assert baseline.distance([5.0, 5.0]) < baseline.threshold
    # By hand: S = [[2.5, 2.5], [2.5, 2.5]] has eigenvalues 5 along (1, 1)/sqrt 2 and 0 along (1, -1)/sqrt 2;
    # with the ridge r they are 5 + r and r. (2, 2.5) - mean = (0, 0.5): 0.5/sqrt 2 along each.
    r = 2.5e-6
    assert baseline.distance([2.0, 2.5]) == pytest.approx(math.sqrt(0.125 / (5 + r) + 0.125 / r), rel=1e-6)
    assert baseline.distance([2.0, 2.5]) > 50 * baseline.threshold
    constant = Baseline.fit("c", [[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0]])
    assert constant.regularised
    assert constant.distance([2.5, 5.0]) == pytest.approx(0.0, abs=1e-6)
    assert constant.distance([2.5, 5.01]) > constant.threshold
    assert not Baseline.fit("d", [[0, 0], [1, 0], [0, 1], [1, 1]]).regularised


def test_the_distance_agrees_with_numpy_in_higher_dimensions() -> None:
    """In 4-D the distance is sqrt(d^T S^-1 d) with S the n-1 sample covariance, and the threshold is chi2's."""
    rng = np.random.default_rng(4)
    points = rng.normal(size=(50, 4)) @ np.array([[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 3, 0], [0, 1, 0, 0.5]])
    baseline = Baseline.fit("b", points.tolist(), confidence=0.95)
    x = np.array([1.0, -2.0, 0.5, 3.0])
    d = x - points.mean(axis=0)
    s = np.cov(points.T, ddof=1)
    assert baseline.distance(x.tolist()) == pytest.approx(math.sqrt(d @ np.linalg.solve(s, d)), rel=1e-9)
    assert baseline.threshold == pytest.approx(math.sqrt(9.488), abs=1e-3)  # table: chi2(4, 0.95) = 9.488


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([], "non-empty array of points"),
        ([[1, 2], [3, 4], [5]], r"points\[2\] has 1 coordinates but points\[0\] has 2"),
        ([[1, 2], [3, 4], [5, 6]], "a 2-dimensional baseline needs at least 4 points"),
        ([[1], [2]], "a 1-dimensional baseline needs at least 3 points"),
        ([[1, 2], [3, math.nan], [5, 6], [7, 8]], r"points\[1\]\[1\] must be a finite number"),
        ([[1, 2], [3, "4"], [5, 6], [7, 8]], r"points\[1\]\[1\] must be a number"),
        ([[], [], []], r"points\[0\] must be a non-empty array"),
    ],
)
def test_unusable_points_are_refused_with_a_reason(points: list[list[float]], message: str) -> None:
    """Mismatched dimensions, too few points (dimension + 2), NaN and non-numbers raise BaselineError."""
    with pytest.raises(BaselineError, match=message):
        Baseline.fit("b", points)


def test_a_point_of_the_wrong_dimension_is_refused() -> None:
    """A 3-D point against a 2-D baseline, or a NaN coordinate, raises BaselineError naming the problem."""
    baseline = Baseline.fit("b", [[0, 0], [2, 0], [0, 2], [2, 2]])
    with pytest.raises(BaselineError, match="point has 3 coordinates but baseline 'b' has dimension 2"):
        baseline.distance([1, 2, 3])
    with pytest.raises(BaselineError, match=r"point\[0\] must be a finite number"):
        baseline.distance([math.inf, 0])


def test_a_baseline_rebuilt_from_its_published_payload_measures_the_same() -> None:
    """What set_baseline publishes is enough for another node to compute identical distances."""
    for points in ([[1.0, 2.0], [2.0, 3.0], [3.0, 5.0], [4.0, 4.0], [5.0, 6.0]], [[0, 0], [1, 1], [2, 2], [3, 3]]):
        original = Baseline.fit("b", points, confidence=0.95)
        copy = Baseline.from_payload(original.to_payload())
        assert copy.threshold == original.threshold
        assert copy.ridge == original.ridge
        for probe in ([0.0, 0.0], [5.0, 2.0], [2.0, 2.5]):
            assert copy.distance(probe) == original.distance(probe)


def test_health_labels_follow_the_rolling_anomaly_percentage() -> None:
    """Of the last 100 points: 4 anomalies healthy, 5 deteriorating, 14 deteriorating, 15 failing; old ones roll off."""
    assert [health_label(p) for p in (0.0, 4.99, 5.0, 14.99, 15.0, 100.0)] == [
        "healthy",
        "healthy",
        "deteriorating",
        "deteriorating",
        "failing",
        "failing",
    ]
    window = HealthWindow(100)
    for i in range(100):
        window.add(i < 15)  # the first 15 are anomalies
    assert (window.anomalies, window.anomaly_pct) == (15, 15.0)
    for _ in range(11):
        window.add(False)  # pushes 11 of the anomalies out
    assert (window.anomalies, window.anomaly_pct, len(window)) == (4, 4.0, 100)


def test_the_health_store_tracks_known_baselines_only() -> None:
    """record() counts points of baselines that were set; a reset starts the window again; unknown is None."""
    store = HealthStore(BaselineSettings(health_window=4))
    assert store.record("b", True) is None
    store.reset("b")
    store.record("b", True)
    health = store.record("b", False)
    assert health == {
        "baseline_id": "b",
        "anomaly_pct": 50.0,
        "health": "failing",
        "anomalies": 1,
        "samples": 2,
        "window": 4,
    }
    store.reset("b")
    assert store.health("b") == {**health, "anomaly_pct": 0.0, "health": "healthy", "anomalies": 0, "samples": 0}


def test_the_baseline_store_keeps_the_most_recently_used() -> None:
    """Past max_baselines the least recently used baseline is forgotten."""
    store = BaselineStore(max_baselines=2)
    points = [[0, 0], [2, 0], [0, 2], [2, 2]]
    for name in ("a", "b"):
        store.put(Baseline.fit(name, points))
    assert store.get("a") is not None  # a is now the most recent
    store.put(Baseline.fit("c", points))
    assert ("a" in store, "b" in store, "c" in store) == (True, False, True)


def test_settings_are_read_from_config_and_checked() -> None:
    """Every default can be set through ctx.config; a bad value names its key."""
    assert BaselineSettings.from_config({}) == BaselineSettings()
    custom = BaselineSettings.from_config({"confidence": 0.95, "health_window": 50.0, "failing_pct": 20})
    assert (custom.confidence, custom.health_window, custom.failing_pct) == (0.95, 50, 20.0)
    for key, value in (("confidence", 1.0), ("confidence", 0), ("health_window", 0), ("ridge", -1)):
        with pytest.raises(ValueError, match=key):
            BaselineSettings.from_config({key: value})
    with pytest.raises(ValueError, match="deteriorating_pct"):
        BaselineSettings.from_config({"deteriorating_pct": 30})
