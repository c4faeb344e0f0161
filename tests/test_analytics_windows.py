"""The analytics windowing algorithm, tested synchronously against numbers worked out by hand."""

from __future__ import annotations

import random
from typing import Any

import pytest
from nexus.handlers.analytics.windows import Engine, InvalidInput, Limits, WindowSpec, percentile, rfc3339

from nexus import parse_time


def spec(**fields: Any) -> Any:
    payload: dict[str, Any] = {"name": "w", "metric": "m", "kind": "tumbling", "size_s": 60, "agg": "mean"}
    payload.update(fields)
    return WindowSpec.parse(payload)


def engine_with(*specs: Any, limits: Any = None) -> Any:
    engine = Engine(limits)
    for item in specs:
        engine.define(item)
    return engine


def closed_summary(outcome: Any) -> list[tuple[float, float, float, int]]:
    return [(w.start, w.end, w.value, w.count) for w in outcome.closed]


def test_tumbling_window_closes_exactly_when_the_watermark_reaches_its_end() -> None:
    """With grace 10 the window [0, 60) stays open at event time 69 (watermark 59) and closes at 70 (watermark 60)."""
    engine = engine_with(spec(grace_s=10))
    for t, v in ((0, 10.0), (30, 20.0), (59, 30.0), (65, 40.0), (69, 41.0)):
        assert engine.record("m", v, t, arrival=0).closed == []
    outcome = engine.record("m", 50.0, 70, arrival=0)
    # mean of 10, 20, 30 = 20; the values at 65, 69 and 70 belong to [60, 120)
    assert closed_summary(outcome) == [(0.0, 60.0, 20.0, 3)]
    assert outcome.closed[0].to_payload() == {
        "name": "w",
        "metric": "m",
        "kind": "tumbling",
        "agg": "mean",
        "start": "1970-01-01T00:00:00Z",
        "end": "1970-01-01T00:01:00Z",
        "value": 20.0,
        "count": 3,
        "late": 0,
        "early": False,
    }


def test_value_within_grace_joins_its_window_and_a_later_one_is_counted_late() -> None:
    """A value behind the greatest time but inside the grace is mixed in; one whose window closed is only counted."""
    engine = engine_with(spec(grace_s=10, agg="sum"))
    engine.record("m", 1.0, 10, arrival=0)
    engine.record("m", 2.0, 65, arrival=0)  # watermark 55: [0, 60) still open
    on_time = engine.record("m", 4.0, 50, arrival=0)
    assert on_time.matched == ["w"]
    assert on_time.late == []
    closing = engine.record("m", 8.0, 75, arrival=0)  # watermark 65 closes [0, 60): 1 + 4
    assert closed_summary(closing) == [(0.0, 60.0, 5.0, 2)]
    late = engine.record("m", 100.0, 59, arrival=0)  # its window [0, 60) has closed
    assert late.matched == []
    assert late.late == ["w"]
    assert late.closed == []
    assert engine.stats("w")["late_total"] == 1
    # [60, 120) holds 2 and 8 only, and reports the one late value dropped since the previous window
    final = engine.record("m", 0.0, 130, arrival=0)
    assert closed_summary(final) == [(60.0, 120.0, 10.0, 2)]
    assert final.closed[0].late == 1


def test_p95_matches_a_hand_computed_percentile() -> None:
    """p95 interpolates between closest ranks: for 1..20 the rank is 0.95 * 19 = 18.05, so 19 + 0.05 = 19.05."""
    engine = engine_with(spec(agg="p95"))
    for i in range(1, 21):
        engine.record("m", float(i), i, arrival=0)
    [window] = engine.record("m", 0.0, 60, arrival=0).closed
    assert window.value == pytest.approx(19.05)
    assert window.count == 20
    # ten values sorted 1 3 7 9 15 20 35 40 50 100: rank 9 * 0.95 = 8.55, 50 + 0.55 * (100 - 50) = 77.5
    assert percentile([15, 20, 35, 40, 50, 1, 3, 7, 9, 100], 95) == pytest.approx(77.5)


@pytest.mark.parametrize(
    ("agg", "expected"),
    [("mean", 4.0), ("sum", 12.0), ("count", 3), ("min", 1.0), ("max", 8.0)],
)
def test_each_aggregate_over_one_window(agg: str, expected: float) -> None:
    """The values 1, 3 and 8 give mean 4, sum 12, count 3, min 1 and max 8."""
    engine = engine_with(spec(agg=agg))
    for t, v in ((1, 1.0), (2, 3.0), (3, 8.0)):
        engine.record("m", v, t, arrival=0)
    [window] = engine.record("m", 0.0, 61, arrival=0).closed
    assert window.value == expected


def test_sliding_windows_take_a_value_in_every_window_containing_it() -> None:
    """Size 10, slide 5: values at 1, 7 and 12 give sums 1 for [-5,5), 3 for [0,10), 5 for [5,15), 3 for [10,20)."""
    engine = engine_with(spec(kind="sliding", size_s=10, slide_s=5, agg="sum", grace_s=20))
    engine.record("m", 1.0, 1, arrival=0)
    engine.record("m", 2.0, 7, arrival=0)
    assert engine.record("m", 3.0, 12, arrival=0).closed == []  # watermark -8
    outcome = engine.record("m", 0.0, 40, arrival=0)  # watermark 20; 40 itself is in [35,45) and [40,50)
    assert closed_summary(outcome) == [
        (-5.0, 5.0, 1.0, 1),
        (0.0, 10.0, 3.0, 2),
        (5.0, 15.0, 5.0, 2),
        (10.0, 20.0, 3.0, 1),
    ]


def test_sliding_value_late_for_one_window_still_counts_in_the_open_one() -> None:
    """After [0,10) closed, a value at 8 is late for it but goes into [5,15), which is still open."""
    engine = engine_with(spec(kind="sliding", size_s=10, slide_s=5, agg="sum"))
    engine.record("m", 1.0, 6, arrival=0)
    engine.record("m", 1.0, 10, arrival=0)  # watermark 10 closes [0,10) (and [-5,5))
    outcome = engine.record("m", 5.0, 8, arrival=0)
    assert outcome.late == ["w"]
    assert outcome.matched == ["w"]
    closed = engine.record("m", 0.0, 15, arrival=0).closed
    assert [(w.start, w.value, w.late) for w in closed] == [(5.0, 7.0, 1)]


def test_session_window_closes_after_the_gap_and_values_exactly_a_gap_apart_split() -> None:
    """Gap 10: values at 0, 5 and 12 form one session [0, 22); a value at 30 closes it; 40 is a gap after 30."""
    engine = engine_with(spec(kind="session", gap_s=10, size_s=None, agg="count"))
    for t in (0, 5, 12):
        assert engine.record("m", 1.0, t, arrival=0).closed == []
    assert closed_summary(engine.record("m", 1.0, 30, arrival=0)) == [(0.0, 22.0, 3, 3)]
    assert closed_summary(engine.record("m", 1.0, 40, arrival=0)) == [(30.0, 40.0, 1, 1)]


def test_out_of_order_value_merges_two_sessions() -> None:
    """Gap 10 and grace 30: sessions {0} and {15} merge into one when a value at 8 bridges them."""
    engine = engine_with(spec(kind="session", gap_s=10, size_s=None, agg="sum", grace_s=30))
    engine.record("m", 1.0, 0, arrival=0)
    engine.record("m", 2.0, 15, arrival=0)
    engine.record("m", 4.0, 8, arrival=0)
    assert closed_summary(engine.record("m", 0.0, 100, arrival=0)) == [(0.0, 25.0, 7.0, 3)]


def test_silent_session_closes_on_the_timer_with_no_further_value() -> None:
    """A session whose last value arrived at monotonic 1000 closes at tick 1010 (gap 10), not at 1009.9."""
    engine = engine_with(spec(kind="session", gap_s=10, size_s=None, agg="max"))
    engine.record("m", 3.0, 100, arrival=995.0)
    engine.record("m", 7.0, 105, arrival=1000.0)
    assert engine.tick(1009.9).closed == []  # idle watermark 105 + 9.9 = 114.9 < 115
    outcome = engine.tick(1010.0)  # idle watermark 105 + 10 = 115 reaches the session's end
    assert closed_summary(outcome) == [(100.0, 115.0, 7.0, 2)]
    # a value for the closed session's time is now late
    assert engine.record("m", 1.0, 104, arrival=1016.0).late == ["w"]


def test_timer_respects_grace_for_sessions() -> None:
    """With gap 10 and grace 5 a silent session ends 15 s of the arrival clock after its last value."""
    engine = engine_with(spec(kind="session", gap_s=10, size_s=None, agg="count", grace_s=5))
    engine.record("m", 1.0, 50, arrival=0.0)
    assert engine.tick(14.9).closed == []
    assert closed_summary(engine.tick(15.0)) == [(50.0, 60.0, 1, 1)]


def test_tumbling_windows_ignore_the_timer() -> None:
    """Tick never closes tumbling windows: they close on event time alone."""
    engine = engine_with(spec())
    engine.record("m", 1.0, 10, arrival=0.0)
    assert engine.tick(10_000.0).closed == []


def test_session_longer_than_size_is_cut() -> None:
    """Gap 10 and size 20: values at 0, 8, 16 then 24 cut the session at 24 (24 - 0 >= 20); 24 opens the next."""
    engine = engine_with(spec(kind="session", gap_s=10, size_s=20, agg="count"))
    for t in (0, 8, 16):
        engine.record("m", 1.0, t, arrival=0)
    assert closed_summary(engine.record("m", 1.0, 24, arrival=0)) == [(0.0, 24.0, 3, 3)]
    assert closed_summary(engine.record("m", 1.0, 50, arrival=0)) == [(24.0, 34.0, 1, 1)]


def alerts_for(values: list[float], **thresholds: float) -> list[tuple[str, str, str, float, float]]:
    """Feed one value per tumbling window of 10 s and return (level, direction, state, value, threshold)."""
    engine = engine_with(spec(size_s=10, agg="mean", thresholds=thresholds))
    seen = []
    for i, value in enumerate([*values, 0.0]):
        for window in engine.record("m", value, i * 10, arrival=0).closed:
            seen += [(a.level, a.direction, a.state, a.value, a.threshold) for a in window.alerts]
    return seen


def test_threshold_alerts_fire_on_crossing_and_recovery_only() -> None:
    """Low 40, critical 20: 50 35 30 15 18 25 45 50 gives low down at 35, critical down at 15, back up at 25 and 45."""
    assert alerts_for([50, 35, 30, 15, 18, 25, 45, 50], low=40, critical=20) == [
        ("low", "down", "breached", 35, 40),
        ("critical", "down", "breached", 15, 20),
        ("critical", "up", "recovered", 25, 20),
        ("low", "up", "recovered", 45, 40),
    ]


def test_jump_across_two_thresholds_raises_both_in_crossing_order() -> None:
    """50 to 10 crosses low then critical; 10 to 60 crosses critical then low; the boundary value itself breaches."""
    assert alerts_for([50, 10, 60, 40], low=40, critical=20) == [
        ("low", "down", "breached", 10, 40),
        ("critical", "down", "breached", 10, 20),
        ("critical", "up", "recovered", 60, 20),
        ("low", "up", "recovered", 60, 40),
        ("low", "down", "breached", 40, 40),
    ]


def test_high_threshold_and_hysteresis() -> None:
    """High 80 with hysteresis 5: 85 breaches, 77 is not yet a recovery, 74 is; a first window in breach alerts."""
    assert alerts_for([85, 77, 74, 79], high=80, hysteresis=5) == [
        ("high", "up", "breached", 85, 80),
        ("high", "down", "recovered", 74, 80),
    ]
    assert alerts_for([30, 30, 30], low=40) == [("low", "down", "breached", 30, 40)]


def test_tag_filter_selects_values() -> None:
    """A definition with tags counts only values carrying all of them."""
    engine = engine_with(spec(agg="sum", tags={"zone": "north"}))
    assert engine.record("m", 5.0, 1, arrival=0, tags={"zone": "north", "x": 1}).matched == ["w"]
    assert engine.record("m", 7.0, 2, arrival=0, tags={"zone": "south"}).matched == []
    assert engine.record("m", 7.0, 3, arrival=0).matched == []
    [window] = engine.record("m", 1.0, 61, arrival=0, tags={"zone": "north"}).closed
    assert window.value == 5.0


def test_open_windows_per_definition_are_bounded() -> None:
    """With at most two open windows the oldest closes early when a third opens; a value for it then counts late."""
    engine = engine_with(spec(size_s=1, agg="count", grace_s=100), limits=Limits(max_open_windows=2))
    engine.record("m", 1.0, 0.5, arrival=0)
    engine.record("m", 1.0, 1.5, arrival=0)
    outcome = engine.record("m", 1.0, 2.5, arrival=0)
    assert [(w.start, w.early, w.count) for w in outcome.closed] == [(0.0, True, 1)]
    assert engine.record("m", 1.0, 0.7, arrival=0).late == ["w"]
    assert engine.stats("w")["open_windows"] == 2


def test_p95_sample_is_bounded() -> None:
    """Past max_samples a p95 window keeps a reservoir: count stays exact and the estimate stays in range."""
    engine = engine_with(spec(agg="p95"), limits=Limits(max_samples=50))
    for i in range(1000):
        engine.record("m", float(i), 1 + i / 100, arrival=0)
    [window] = engine.record("m", 0.0, 60, arrival=0).closed
    assert window.count == 1000
    assert 800 <= window.value <= 999


def test_definitions_are_bounded_and_replaced_by_name() -> None:
    """Redefining a name replaces it; a new name past max_definitions is refused with a clear message."""
    engine = Engine(Limits(max_definitions=1))
    assert engine.define(spec()) is False
    assert engine.define(spec(agg="sum")) is True
    assert [d.agg for d in engine.definitions()] == ["sum"]
    with pytest.raises(InvalidInput, match="max_definitions"):
        engine.define(spec(name="other"))
    assert engine.remove("w") is True
    assert engine.remove("w") is False


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"size_s": None}, "size_s is required"),
        ({"kind": "sliding"}, "slide_s is required"),
        ({"kind": "sliding", "slide_s": 90}, "must not exceed size_s"),
        ({"kind": "sliding", "size_s": 1000, "slide_s": 1}, "more than 100 windows"),
        ({"kind": "session"}, "gap_s is required"),
        ({"gap_s": 5}, "gap_s is for session windows"),
        ({"kind": "weekly"}, "kind must be one of"),
        ({"agg": "median"}, "agg must be one of"),
        ({"size_s": 0}, "size_s must be greater than 0"),
        ({"size_s": float("nan")}, "size_s must be a finite number"),
        ({"grace_s": -1}, "grace_s must be at least 0"),
        ({"thresholds": {"low": 20, "critical": 40}}, "critical .40. must not be above"),
        ({"thresholds": {"low": 50, "high": 40}}, "high .40. must be above"),
        ({"thresholds": {"medium": 3}}, "unknown field"),
        ({"name": ""}, "name must be a non-empty string"),
        ({"tags": {"zone": [1]}}, "tags.zone must be"),
    ],
)
def test_bad_definitions_are_refused_with_the_field_named(fields: dict[str, Any], message: str) -> None:
    """Each wrong field gives an InvalidInput that names it."""
    with pytest.raises(InvalidInput, match=message):
        spec(**fields)


def test_non_finite_values_are_refused_and_leave_state_untouched() -> None:
    """NaN as a value or time raises InvalidInput before any window changes."""
    engine = engine_with(spec(agg="count"))
    engine.record("m", 1.0, 1, arrival=0)
    with pytest.raises(InvalidInput, match="value must be a finite number"):
        engine.record("m", float("nan"), 2, arrival=0)
    with pytest.raises(InvalidInput, match="timestamp must be a finite number"):
        engine.record("m", 1.0, float("inf"), arrival=0)
    [window] = engine.record("m", 1.0, 61, arrival=0).closed
    assert window.count == 1


def test_rfc3339_round_trips_through_parse_time() -> None:
    """Window bounds are written as RFC 3339 UTC text that parse_time reads back to the same seconds."""
    assert rfc3339(1736150400) == "2025-01-06T08:00:00Z"
    assert rfc3339(0.25) == "1970-01-01T00:00:00.250000Z"
    assert parse_time(rfc3339(1736150400.5)) == 1736150400.5


# --- named thresholds -------------------------------------------------------------------------------------------


def named_alerts(values: list[float], thresholds: Any) -> list[tuple[str, str, str, float, float]]:
    """Feed one value per tumbling window of 10 s (the last one only closes the window before it)."""
    engine = engine_with(spec(size_s=10, agg="mean", thresholds=thresholds))
    seen = []
    for i, value in enumerate([*values, 0.0]):
        for window in engine.record("m", value, i * 10, arrival=0).closed:
            seen += [(a.level, a.direction, a.state, a.value, a.threshold) for a in window.alerts]
    return seen


def test_named_threshold_enters_stays_clears_and_re_enters_past_its_hysteresis() -> None:
    """high_temp above 30, hysteresis 2: 30 enters, 31 and 28.5 stay, 27.9 clears, 29 does not re-enter, 30.5
    does; 28.1 stays, 27 clears."""
    high_temp = [{"name": "high_temp", "above": 30, "hysteresis": 2}]
    assert named_alerts([25, 30, 31, 29, 28.5, 28, 27.9, 29, 30.5, 28.1, 30, 27], high_temp) == [
        ("high_temp", "up", "breached", 30, 30),
        ("high_temp", "down", "recovered", 27.9, 30),
        ("high_temp", "up", "breached", 30.5, 30),
        ("high_temp", "down", "recovered", 27, 30),
    ]
    frost = [{"name": "frost", "below": 0, "hysteresis": 1}]
    assert named_alerts([2, 0, 0.9, 1.0, 1.01, -0.5], frost) == [
        ("frost", "down", "breached", 0, 0),
        ("frost", "up", "recovered", 1.01, 0),
        ("frost", "down", "breached", -0.5, 0),
    ]


def test_no_flapping_within_the_hysteresis_band() -> None:
    """A value wandering 28.5..31.5 around a bound of 30 with hysteresis 2 raises one alert in 200 windows."""
    rng = random.Random(7)
    values = [30.0] + [rng.uniform(28.5, 31.5) for _ in range(200)]
    alerts = named_alerts(values, [{"name": "hot", "above": 30, "hysteresis": 2}])
    assert alerts == [("hot", "up", "breached", 30, 30)]
    # without hysteresis the same values flap
    assert len(named_alerts(values, [{"name": "hot", "above": 30}])) > 50


def schmitt(values: list[float], bound: str, level: float, hysteresis: float) -> list[tuple[int, str]]:
    """An independent Schmitt trigger: (index, state) at every change."""
    on = False
    changes = []
    for i, v in enumerate(values):
        inside = v >= level if bound == "above" else v <= level
        outside = v < level - hysteresis if bound == "above" else v > level + hysteresis
        if (not on and inside) or (on and outside):
            on = not on
            changes.append((i, "breached" if on else "recovered"))
    return changes


def test_named_thresholds_match_an_independent_trigger_on_random_values() -> None:
    """Three named thresholds over 2,000 random windows give each its own Schmitt trigger's changes."""
    rng = random.Random(13)
    values = [round(rng.gauss(50, 15), 1) for _ in range(2000)]
    named: list[dict[str, Any]] = [
        {"name": "hot", "above": 70, "hysteresis": 5},
        {"name": "warm", "above": 55, "hysteresis": 0.5},
        {"name": "cold", "below": 30, "hysteresis": 3},
    ]
    engine = engine_with(spec(size_s=10, agg="mean", thresholds=named))
    seen: dict[str, list[tuple[int, str]]] = {"hot": [], "warm": [], "cold": []}
    for i, value in enumerate([*values, 0.0]):
        for window in engine.record("m", value, i * 10, arrival=0).closed:
            for alert in window.alerts:
                seen[alert.level].append((int(window.start // 10), alert.state))
                assert alert.bound == ("below" if alert.level == "cold" else "above")
    for item in named:
        bound = "above" if "above" in item else "below"
        expected = schmitt(values, bound, float(item[bound]), float(item["hysteresis"]))
        assert seen[str(item["name"])] == expected
        assert len(expected) > 20


def test_low_critical_high_behave_as_the_named_thresholds_they_stand_for() -> None:
    """{low, critical, high, hysteresis} raises exactly what the same three named thresholds raise."""
    rng = random.Random(3)
    values = [round(rng.uniform(0, 100), 1) for _ in range(1000)]
    legacy = {"low": 40, "critical": 20, "high": 80, "hysteresis": 3}
    named: list[dict[str, Any]] = [
        {"name": "low", "below": 40, "hysteresis": 3},
        {"name": "critical", "below": 20, "hysteresis": 3},
        {"name": "high", "above": 80, "hysteresis": 3},
    ]
    assert named_alerts(values, legacy) == named_alerts(values, named)
    assert spec(thresholds=legacy).to_payload()["thresholds"] == legacy
    assert spec(thresholds=named).to_payload()["thresholds"] == named


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ([{"name": "x", "above": 1, "below": 0}], r"thresholds\[0\]: needs exactly one of above or below"),
        ([{"name": "x"}], r"thresholds\[0\]: needs exactly one of above or below"),
        ([{"above": 1}], r"thresholds\[0\]: name must be a non-empty string"),
        ([{"name": "x", "above": "hot"}], r"thresholds\[0\]: above must be a number"),
        ([{"name": "x", "above": 1, "hysteresis": -1}], r"thresholds\[0\]: hysteresis must be at least 0"),
        ([{"name": "x", "above": 1, "level": 2}], r"thresholds\[0\] has unknown field"),
        ([{"name": "x", "above": 1}, {"name": "x", "below": 0}], r"names must be unique: \['x'\]"),
        ([{"name": f"t{i}", "above": i} for i in range(33)], "at most 32"),
        (["hot"], r"thresholds\[0\] must be an object"),
        ("hot", "thresholds must be an object"),
    ],
)
def test_bad_named_thresholds_are_refused_with_the_entry_named(thresholds: Any, message: str) -> None:
    """Each wrong entry gives an InvalidInput naming its index and field."""
    with pytest.raises(InvalidInput, match=message):
        spec(thresholds=thresholds)


# --- snapshots of open windows ----------------------------------------------------------------------------------


def test_snapshot_gives_each_open_window_its_aggregate_so_far() -> None:
    """Open tumbling, sliding and session windows with the aggregate of the values they hold; closed ones gone."""
    engine = engine_with(
        spec(name="t", agg="sum"),
        spec(name="s", kind="sliding", size_s=20, slide_s=10, agg="max"),
        spec(name="v", metric="door", kind="session", size_s=None, gap_s=5, agg="count"),
        spec(name="p", agg="p95"),
    )
    for time, value in [(1, 1.0), (12, 2.0), (61, 4.0), (65, 8.0)]:
        engine.record("m", value, time, arrival=0)
    for time in (100, 102, 110):
        engine.record("door", 1.0, time, arrival=0)
    found = [(w.name, w.start, w.end, w.value, w.count) for w in engine.snapshot().windows]
    assert found == [
        # p95 of 4 and 8: rank 0.95 -> 4 + 0.95 * 4 = 7.8
        ("p", 60, 120, pytest.approx(7.8), 2),
        # sliding 20/10: the value at 12 closed [0, 20) at watermark 65; [50, 70) and [60, 80) hold 4 and 8
        ("s", 50, 70, 8.0, 2),
        ("s", 60, 80, 8.0, 2),
        ("t", 60, 120, 12.0, 2),
        # sessions: 100, 102 (until 107) and 110 (until 115); the first closed at watermark 110 >= 107
        ("v", 110, 115, 1, 1),
    ]
    assert engine.snapshot().total == 5
    cut = engine.snapshot(limit=2)  # the limit falls inside a definition's windows
    assert [(w.name, w.start) for w in cut.windows] == [("p", 60), ("s", 50)]
    assert (cut.total, cut.truncated) == (5, True)


def test_snapshot_is_filtered_by_name_or_metric_and_bounded() -> None:
    """name and metric select definitions; past the limit the rest is counted and the snapshot says truncated."""
    engine = engine_with(spec(name="a", agg="count"), spec(name="b", agg="count"), spec(name="c", metric="n"))
    for time in (1, 61, 121):  # tumbling, grace 0: each value closes the window before it
        engine.record("m", 1.0, time + 0.5, arrival=0)
    engine.record("m", 1.0, 170, arrival=0)
    engine.record("n", 3.0, 5, arrival=0)
    assert [w.name for w in engine.snapshot(metric="m").windows] == ["a", "b"]
    assert [(w.name, w.value) for w in engine.snapshot(name="c").windows] == [("c", 3.0)]
    assert engine.snapshot(name="c", metric="m").windows == []
    assert engine.snapshot(name="nope").definitions == 0
    bounded = engine.snapshot(limit=2)
    assert [w.name for w in bounded.windows] == ["a", "b"]
    assert (bounded.total, bounded.truncated) == (3, True)
    assert engine.snapshot().truncated is False


# --- silent sources -----------------------------------------------------------------------------------------------


def source_events(outcome: Any) -> list[tuple[str, str, float]]:
    return [(c.name, c.state, c.silent_for_s) for c in outcome.sources]


def test_a_silent_source_is_reported_once_and_its_return_once() -> None:
    """silence_s 30: nothing at 29.9 s, one silent at 30 s and none after, resumed by the next value, then again."""
    engine = engine_with(spec(silence_s=30))
    engine.record("m", 1.0, 1000, arrival=100)
    assert source_events(engine.tick(129.9)) == []
    assert source_events(engine.tick(130)) == [("w", "silent", 30)]
    silent = engine.tick(130).sources  # already reported
    assert silent == []
    assert source_events(engine.tick(500)) == []
    back = engine.record("m", 2.0, 1400, arrival=520)
    assert source_events(back) == [("w", "resumed", 420)]
    assert back.sources[0].to_payload() == {
        "name": "w",
        "metric": "m",
        "silence_s": 30,
        "silent_for_s": 420,
        "last_value_at": rfc3339(1000),
        "value_at": rfc3339(1400),
    }
    assert source_events(engine.record("m", 3.0, 1401, arrival=521)) == []
    assert source_events(engine.tick(550.9)) == []
    assert source_events(engine.tick(551)) == [("w", "silent", 30)]


def test_silence_counts_late_values_and_only_matching_tags_and_is_off_by_default() -> None:
    """A late value still shows the source alive; a value without the definition's tags does not."""
    engine = engine_with(spec(name="north", silence_s=10, tags={"zone": "north"}), spec(name="quiet"))
    engine.record("m", 1.0, 100, arrival=0, tags={"zone": "north"})
    engine.record("m", 1.0, 200, arrival=5, tags={"zone": "north"})  # closes [60, 120)
    late = engine.record("m", 1.0, 30, arrival=9, tags={"zone": "north"})
    assert late.late == ["north", "quiet"]  # late, yet a sign of life
    engine.record("m", 1.0, 201, arrival=15, tags={"zone": "south"})  # not this definition's source
    assert source_events(engine.tick(18.9)) == []
    assert source_events(engine.tick(19)) == [("north", "silent", 10)]
    assert source_events(engine.tick(10_000)) == []  # quiet has no silence_s


def test_a_definition_that_never_had_a_value_is_not_reported_silent() -> None:
    """Silence is counted from a source's last value; a negative silence_s is refused."""
    engine = engine_with(spec(silence_s=5))
    assert engine.tick(1000).sources == []
    with pytest.raises(InvalidInput, match="silence_s must be at least 0"):
        spec(silence_s=-1)
