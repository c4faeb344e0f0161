"""Baseline deviation (anomalies plugin): chi-square thresholds, Mahalanobis distance, rolling health."""

from __future__ import annotations

import io
import math
import re
import statistics
from typing import Any

import numpy as np
import pytest
from nexus.handlers.anomalies.baseline import (
    Baseline,
    BaselineError,
    BaselineSettings,
    BaselineStore,
    HealthStore,
    HealthWindow,
    LatestStore,
    chi2_quantile,
    finite_threshold,
    health_label,
    parse_csv,
    threshold,
)


def fit_small(baseline_id: str, points: Any, **options: Any) -> Baseline:
    """A baseline of as few as d + 2 points with the chi-square threshold, as fitted before the finite default."""
    return Baseline.fit(baseline_id, points, min_excess_points=2, method="asymptotic", **options)


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
    assert fit_small("b", [[0, 0], [2, 0], [0, 2], [2, 2]]).threshold == pytest.approx(3.0349, abs=5e-5)


def test_mahalanobis_distance_matches_a_hand_computed_correlated_case() -> None:
    """For five correlated 2-D points the distance equals the one from the hand-inverted 2x2 sample covariance."""
    points = [[1.0, 2.0], [2.0, 3.0], [3.0, 5.0], [4.0, 4.0], [5.0, 6.0]]
    # By hand: mean (3, 4); deviations (-2,-2) (-1,-1) (0,1) (1,0) (2,2).
    # Sxx = (4+1+0+1+4)/4 = 2.5, Syy = (4+1+1+0+4)/4 = 2.5, Sxy = (4+1+0+0+4)/4 = 2.25; det = 6.25 - 5.0625.
    sxx, syy, sxy = 2.5, 2.5, 2.25
    det = sxx * syy - sxy * sxy
    dx, dy = 5.0 - 3.0, 2.0 - 4.0  # the point (5, 2): against the correlation
    want = math.sqrt((syy * dx * dx - 2 * sxy * dx * dy + sxx * dy * dy) / det)
    baseline = fit_small("b", points)
    assert baseline.distance([5.0, 2.0]) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(math.sqrt(38 / 1.1875), rel=1e-12)  # = sqrt(32) = 5.657
    assert baseline.distance([3.0, 4.0]) == 0.0
    assert baseline.distance([5.0, 6.0]) == pytest.approx(math.sqrt((2.5 * 4 - 2 * 2.25 * 4 + 2.5 * 4) / det))
    assert not baseline.regularised


def test_sample_covariance_divides_by_n_minus_1() -> None:
    """1-D: for 1, 2, 3, 4 the variance is 5/3 (not 5/4), so 5 lies 2.5 / sqrt(5/3) = 1.9365 away."""
    baseline = fit_small("b", [[1], [2], [3], [4]])
    assert baseline.distance([5]) == pytest.approx(2.5 / math.sqrt(5 / 3), rel=1e-12)
    assert float(baseline.covariance[0][0]) == pytest.approx(5 / 3)


def test_a_singular_covariance_is_regularised_and_only_then() -> None:
    """Points on a line get a ridge; a point off the line is far, a point along it is not; a full-rank set gets none."""
    on_line = [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]
    baseline = fit_small("b", on_line)
    assert baseline.regularised
    # trace(S) / d = 2.5, ridge 1e-6 of it.
    assert baseline.ridge == pytest.approx(2.5e-6)
    assert baseline.distance([5.0, 5.0]) < baseline.threshold
    # By hand: S = [[2.5, 2.5], [2.5, 2.5]] has eigenvalues 5 along (1, 1)/sqrt 2 and 0 along (1, -1)/sqrt 2;
    # with the ridge r they are 5 + r and r. (2, 2.5) - mean = (0, 0.5): 0.5/sqrt 2 along each.
    r = 2.5e-6
    assert baseline.distance([2.0, 2.5]) == pytest.approx(math.sqrt(0.125 / (5 + r) + 0.125 / r), rel=1e-6)
    assert baseline.distance([2.0, 2.5]) > 50 * baseline.threshold
    constant = fit_small("c", [[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0]])
    assert constant.regularised
    assert constant.distance([2.5, 5.0]) == pytest.approx(0.0, abs=1e-6)
    assert constant.distance([2.5, 5.01]) > constant.threshold
    assert not fit_small("d", [[0, 0], [1, 0], [0, 1], [1, 1]]).regularised


def test_the_distance_agrees_with_numpy_in_higher_dimensions() -> None:
    """In 4-D the distance is sqrt(d^T S^-1 d) with S the n-1 sample covariance, and the threshold is chi2's."""
    rng = np.random.default_rng(4)
    points = rng.normal(size=(50, 4)) @ np.array([[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 3, 0], [0, 1, 0, 0.5]])
    baseline = fit_small("b", points.tolist(), confidence=0.95)
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
        Baseline.fit("b", points, min_excess_points=2)


def test_a_point_of_the_wrong_dimension_is_refused() -> None:
    """A 3-D point against a 2-D baseline, or a NaN coordinate, raises BaselineError naming the problem."""
    baseline = fit_small("b", [[0, 0], [2, 0], [0, 2], [2, 2]])
    with pytest.raises(BaselineError, match="point has 3 coordinates but baseline 'b' has dimension 2"):
        baseline.distance([1, 2, 3])
    with pytest.raises(BaselineError, match=r"point\[0\] must be a finite number"):
        baseline.distance([math.inf, 0])


def test_a_baseline_rebuilt_from_its_published_payload_measures_the_same() -> None:
    """What set_baseline publishes is enough for another node to compute identical distances."""
    for points in ([[1.0, 2.0], [2.0, 3.0], [3.0, 5.0], [4.0, 4.0], [5.0, 6.0]], [[0, 0], [1, 1], [2, 2], [3, 3]]):
        original = fit_small("b", points, confidence=0.95)
        assert original.method == "asymptotic"
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
        store.put(fit_small(name, points))
    assert store.get("a") is not None  # a is now the most recent
    store.put(fit_small("c", points))
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


# --- finite-sample thresholds -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dimension", "count", "confidence"),
    [(1, 3, 0.95), (2, 12, 0.99), (4, 20, 0.9), (13, 40, 0.99), (13, 23, 0.999), (64, 80, 0.99)],
)
def test_the_finite_threshold_is_the_hotelling_prediction_bound_from_scipys_f(
    dimension: int, count: int, confidence: float
) -> None:
    """sqrt(d (n-1)(n+1) / (n (n-d)) F.ppf(c, d, n-d)), with SciPy's F quantile, is what a fitted baseline uses."""
    from scipy import stats

    d, n = dimension, count
    want = math.sqrt(d * (n - 1) * (n + 1) / (n * (n - d)) * stats.f.ppf(confidence, d, n - d))
    assert finite_threshold(d, n, confidence) == pytest.approx(want, rel=1e-10)
    rng = np.random.default_rng(d * 1000 + n)
    baseline = Baseline.fit("b", rng.normal(size=(n, d)).tolist(), confidence=confidence, min_excess_points=n - d)
    assert (baseline.method, baseline.count) == ("finite", n)
    assert baseline.threshold == pytest.approx(want, rel=1e-10)


def test_the_finite_threshold_is_larger_and_tends_to_the_chi_square_one() -> None:
    """13-D from 40 points at 0.99: 7.434 against chi-square's 5.262; with a million points they agree to 1e-4."""
    from scipy import stats

    assert finite_threshold(13, 40, 0.99) == pytest.approx(7.434, abs=1e-3)
    assert threshold(13, 0.99) == pytest.approx(math.sqrt(stats.chi2.ppf(0.99, 13)), rel=1e-12)
    assert threshold(13, 0.99) == pytest.approx(5.262, abs=1e-3)
    previous = math.inf
    for n in (23, 40, 100, 1000, 10_000):
        current = finite_threshold(13, n, 0.99)
        assert threshold(13, 0.99) < current < previous
        previous = current
    assert finite_threshold(13, 1_000_000, 0.99) == pytest.approx(threshold(13, 0.99), rel=1e-4)
    with pytest.raises(ValueError, match="needs more than 3 points"):
        finite_threshold(3, 3, 0.99)


def test_simulated_new_points_fall_outside_the_finite_threshold_at_the_promised_rate() -> None:
    """20,000 simulated baselines of 8 points in 3-D, one new point each: 10.0 % beyond the 0.9 finite threshold
    (within 4 standard errors), while the asymptotic one flags over 25 %."""
    rng = np.random.default_rng(13)
    trials, n, d, confidence = 20_000, 8, 3, 0.9
    mixing = np.array([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [-1.0, 0.3, 3.0]])
    data = rng.normal(size=(trials, n + 1, d)) @ mixing.T + np.array([5.0, -2.0, 1.0])
    baseline, new = data[:, :n, :], data[:, n, :]
    mean = baseline.mean(axis=1)
    centred = baseline - mean[:, None, :]
    covariance = np.einsum("tni,tnj->tij", centred, centred) / (n - 1)
    diff = new - mean
    squared = np.einsum("ti,ti->t", diff, np.linalg.solve(covariance, diff[:, :, None])[:, :, 0])
    finite = float(np.mean(np.sqrt(squared) > finite_threshold(d, n, confidence)))
    asymptotic = float(np.mean(np.sqrt(squared) > threshold(d, confidence)))
    assert abs(finite - 0.1) < 4 * math.sqrt(0.1 * 0.9 / trials), finite
    assert asymptotic > 0.25, asymptotic
    # The same numbers through Baseline for a few of the trials.
    for t in range(5):
        fitted = Baseline.fit("b", baseline[t].tolist(), confidence=confidence, min_excess_points=n - d)
        assert fitted.distance(new[t].tolist()) == pytest.approx(math.sqrt(squared[t]), rel=1e-9)


def test_acceptance_the_finite_threshold_flags_at_most_two_percent_of_held_out_normal_points() -> None:
    """20 baselines of 40 points from a correlated 13-D Gaussian at 0.99: the finite threshold flags on average
    at most 2 % of 500 held-out normal points each, the asymptotic one more than 6 %."""
    rng = np.random.default_rng(2026)
    d = 13
    mixing = rng.normal(size=(d, d)) + 3 * np.eye(d)
    centre = rng.normal(scale=10.0, size=d)
    finite_rates, asymptotic_rates = [], []
    for _ in range(20):
        points = rng.normal(size=(40, d)) @ mixing.T + centre
        held_out = rng.normal(size=(500, d)) @ mixing.T + centre
        finite = Baseline.fit("f", points.tolist(), confidence=0.99)
        asymptotic = Baseline.fit("a", points.tolist(), confidence=0.99, method="asymptotic")
        distances = [finite.distance(point) for point in held_out.tolist()]
        finite_rates.append(sum(x > finite.threshold for x in distances) / len(distances))
        asymptotic_rates.append(sum(x > asymptotic.threshold for x in distances) / len(distances))
    assert statistics.mean(finite_rates) <= 0.02, finite_rates
    assert statistics.mean(asymptotic_rates) > 0.06, asymptotic_rates


def test_too_small_baselines_are_refused_with_the_reason() -> None:
    """By default d + 10 points are needed: d + 2 (accepted before) and d + 9 are refused, d + 10 is fitted."""
    rng = np.random.default_rng(5)
    for count in (3 + 2, 3 + 9):
        with pytest.raises(
            BaselineError,
            match=rf"3-dimensional baseline needs at least 13 points \(dimension \+ 10\), got {count}: with fewer",
        ):
            Baseline.fit("b", rng.normal(size=(count, 3)).tolist())
    assert Baseline.fit("b", rng.normal(size=(13, 3)).tolist()).count == 13
    assert Baseline.fit("b", rng.normal(size=(5, 3)).tolist(), min_excess_points=2).count == 5
    with pytest.raises(BaselineError, match="at least 5 points"):  # below 2 is raised to 2
        Baseline.fit("b", rng.normal(size=(4, 3)).tolist(), min_excess_points=0)
    with pytest.raises(BaselineError, match="14 points are more than max_points 13"):
        Baseline.fit("b", rng.normal(size=(14, 3)).tolist(), max_points=13)
    with pytest.raises(BaselineError, match="threshold must be 'finite' or 'asymptotic', got 'exact'"):
        Baseline.fit("b", rng.normal(size=(13, 3)).tolist(), method="exact")


def test_the_threshold_method_travels_with_the_published_baseline() -> None:
    """A finite baseline rebuilt from its payload keeps its threshold; a payload without a method is asymptotic."""
    points = np.random.default_rng(6).normal(size=(14, 4)).tolist()
    original = Baseline.fit("b", points)
    payload = original.to_payload()
    assert payload["threshold_method"] == "finite"
    copy = Baseline.from_payload(payload)
    assert (copy.method, copy.threshold) == ("finite", original.threshold)
    del payload["threshold_method"]
    assert Baseline.from_payload(payload).threshold == threshold(4, 0.99)
    with pytest.raises(BaselineError, match="threshold_method"):
        Baseline.from_payload({**payload, "threshold_method": "other"})


def test_threshold_settings_are_read_and_checked() -> None:
    """threshold is finite by default, can be asymptotic, anything else is refused; min_excess_points is >= 2."""
    assert (BaselineSettings().threshold, BaselineSettings().min_excess_points) == ("finite", 10)
    custom = BaselineSettings.from_config(
        {"threshold": "asymptotic", "min_excess_points": 3, "max_points": 50, "max_batch": 7, "latest_points": 9}
    )
    assert (custom.threshold, custom.min_excess_points, custom.max_points, custom.max_batch, custom.latest_points) == (
        "asymptotic",
        3,
        50,
        7,
        9,
    )
    for key, value in (("threshold", "chi2"), ("min_excess_points", 1), ("max_batch", 0), ("latest_points", 0)):
        with pytest.raises(ValueError, match=key):
            BaselineSettings.from_config({key: value})


# --- CSV --------------------------------------------------------------------------------------------------


def test_csv_points_are_read_like_numpy_reads_them() -> None:
    """With or without a header, blank lines and spaces around numbers: the same rows numpy.loadtxt reads."""
    body = "1.5, -2\n3e2,4.25\n\n.5,+7\n-0.0,1E-3\n"
    want = np.loadtxt(io.StringIO(body), delimiter=",", ndmin=2).tolist()
    assert parse_csv(body, max_rows=10, max_columns=5) == want
    assert parse_csv("temp, pressure\n" + body, max_rows=10, max_columns=5) == want
    assert parse_csv('"1","2"\r\n3,4\r\n', max_rows=10, max_columns=5) == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,2\n3,4,5\n", "csv line 2 has 3 columns but line 1 has 2: every row needs the same number"),
        ("a,b\n1,2\n3\n", "csv line 3 has 1 columns but line 1 has 2"),
        ("1,2\n3,x\n", "csv line 2 column 2: 'x' is not a finite decimal number"),
        ("1,2\n3,nan\n", "csv line 2 column 2: 'nan' is not a finite decimal number"),
        ("1,2\n3,inf\n", "'inf' is not a finite decimal number"),
        ("1,2\n3,1e999\n", "'1e999' is not a finite decimal number"),
        ("1,2\n0x10,1\n", "'0x10' is not"),
        ("1,2\n1_0,1\n", "'1_0' is not"),
        ("1,2\n,1\n", "csv line 2 column 1: '' is not"),
        ("x,1\n2,3\n", "csv line 1 column 1: 'x' is not"),
        ("a,b\nc,d\n", "csv line 2 column 1: 'c' is not"),
        ("", "csv has no rows of points"),
        ("a,b\n\n", "csv has no rows of points"),
        ("1\n2\n3\n4\n", "csv has more than 3 rows of points"),
        ("1,2,3,4,5,6\n", "csv line 1 has 6 columns, more than 5"),
        ('1,"2\n', "csv cannot be read"),
    ],
)
def test_unusable_csv_is_refused_naming_the_line(text: str, message: str) -> None:
    """Ragged rows, non-numbers (NaN, inf, hex too), empty text and too many rows or columns raise BaselineError."""
    with pytest.raises(BaselineError, match=re.escape(message)):
        parse_csv(text, max_rows=3, max_columns=5)


def test_csv_longer_than_its_limit_is_refused_before_it_is_read() -> None:
    """max_chars bounds the text itself."""
    with pytest.raises(BaselineError, match="csv has 12 characters, more than 11"):
        parse_csv("1,2\n" * 3, max_rows=10, max_columns=5, max_chars=11)


# --- latest points ----------------------------------------------------------------------------------------


def test_the_latest_store_keeps_the_last_points_of_known_baselines() -> None:
    """Up to size points per baseline, oldest first; unknown baselines are None; reset empties, forget drops."""
    store = LatestStore(size=3, max_baselines=2)
    store.record("a", [{"point": [1.0]}])
    assert store.latest("a", 10) is None
    store.reset("a")
    store.record("a", [{"point": [float(i)], "distance": float(i)} for i in range(5)])
    assert [item["point"] for item in store.latest("a", 10) or []] == [[2.0], [3.0], [4.0]]
    assert [item["point"] for item in store.latest("a", 2) or []] == [[3.0], [4.0]]
    assert store.latest("a", 0) == []
    store.reset("a")
    assert store.latest("a", 10) == []
    store.reset("b")
    store.reset("c")  # a is the least recently used
    assert ("a" in store, "b" in store, "c" in store) == (False, True, True)
    store.forget("b")
    assert store.latest("b", 1) is None
