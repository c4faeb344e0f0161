"""Stay-point detection (places plugin), tested synchronously against values worked out in the tests."""

from __future__ import annotations

import math
import random
import tracemalloc
from typing import Any

import pytest
from gps_trace import STOP_A, STOP_B, T0, Fix, haversine_m, noisy_stay, offset, straight_walk, two_stops_trace
from nexus.handlers.places.staypoints import (
    EncounterCompleted,
    EncounterStarted,
    PlacesSettings,
    StayPointDetector,
    StayPointTracker,
)
from nexus.handlers.places.staypoints import haversine_m as plugin_haversine

DEGREE_AT_EQUATOR_M = 2 * math.pi * 6_371_008.8 / 360


def ids() -> Any:
    counter = iter(range(1, 1_000_000))
    return lambda: f"e{next(counter)}"


def feed(detector: StayPointDetector, fixes: list[tuple[float, float, float]]) -> list[Any]:
    events: list[Any] = []
    for lat, lon, t in fixes:
        dropped, produced = detector.add(lat, lon, t)
        assert dropped is None
        events += produced
    return events


def test_two_stops_one_kilometre_apart_and_a_spike_give_exactly_two_encounters() -> None:
    """The acceptance trace yields two encounters whose centroids, times, durations and counts match the stops."""
    fixes, expected = two_stops_trace()
    tracker = StayPointTracker(new_id=ids())
    events: list[Any] = []
    for step, fix in enumerate(fixes):
        result = tracker.track("courier", fix.latitude, fix.longitude, fix.time, now=float(step))
        assert result.accepted
        events += result.encounters

    started = [e for e in events if isinstance(e, EncounterStarted)]
    completed = [e for e in events if isinstance(e, EncounterCompleted)]
    assert [type(e).__name__ for e in events] == ["EncounterStarted", "EncounterCompleted"] * 2
    assert len(started) == len(completed) == 2
    for start, done, want in zip(started, completed, expected, strict=True):
        assert start.encounter_id == done.encounter_id
        assert start.start_time == done.start_time == want.start_time
        assert done.end_time == want.end_time
        assert done.duration_s == want.duration_s
        assert done.point_count == want.point_count
        assert done.latitude == pytest.approx(want.latitude, abs=1e-7)  # about 1 cm
        assert done.longitude == pytest.approx(want.longitude, abs=1e-7)
        assert done.reason == "left"
    assert [d.duration_s for d in completed] == [600.0, 480.0]
    assert [d.point_count for d in completed] == [21, 17]  # the spike is not part of stop B
    # Each encounter starts once it has lasted min_dwell_s (120 s), with the centroid so far near its stop.
    assert haversine_m(started[0].latitude, started[0].longitude, *STOP_A) < 15
    assert haversine_m(started[1].latitude, started[1].longitude, *STOP_B) < 15
    assert haversine_m(
        completed[0].latitude, completed[0].longitude, completed[1].latitude, completed[1].longitude
    ) == (pytest.approx(1000.0, abs=20.0))
    assert tracker.state_of("courier") == "moving"


def test_haversine_matches_known_distances() -> None:
    """One degree along the equator or a meridian is 2*pi*R/360; antipodes are half the circumference."""
    assert plugin_haversine(0.0, 0.0, 0.0, 1.0) == pytest.approx(DEGREE_AT_EQUATOR_M, rel=1e-12)
    assert plugin_haversine(10.0, 20.0, 11.0, 20.0) == pytest.approx(DEGREE_AT_EQUATOR_M, rel=1e-12)
    assert plugin_haversine(0.0, 0.0, 0.0, 180.0) == pytest.approx(math.pi * 6_371_008.8, rel=1e-12)
    assert plugin_haversine(0.0, 179.9995, 0.0, -179.9995) == pytest.approx(DEGREE_AT_EQUATOR_M / 1000, rel=1e-6)
    # 60 degrees north, one degree of longitude: 2 R asin(cos(60) sin(0.5 deg)).
    want = 2 * 6_371_008.8 * math.asin(0.5 * math.sin(math.radians(0.5)))
    assert plugin_haversine(60.0, 0.0, 60.0, 1.0) == pytest.approx(want, rel=1e-12)


def test_a_single_spike_neither_ends_the_dwell_nor_joins_it() -> None:
    """One fix 300 m away between two fixes at the place leaves the encounter open and its centroid untouched."""
    detector = StayPointDetector("a", PlacesSettings(), new_id=ids())
    spike = offset(STOP_A, 300.0, 0.0)
    events = feed(
        detector,
        [(*STOP_A, T0), (*STOP_A, T0 + 60), (*STOP_A, T0 + 120), (*spike, T0 + 150), (*STOP_A, T0 + 180)],
    )
    assert [type(e).__name__ for e in events] == ["EncounterStarted"]
    assert detector.state == "dwelling"
    away = [offset(STOP_A, 500.0, 0.0), offset(STOP_A, 600.0, 0.0)]
    events = feed(detector, [(*away[0], T0 + 210), (*away[1], T0 + 240)])
    (done,) = events
    assert isinstance(done, EncounterCompleted)
    assert (done.latitude, done.longitude) == (pytest.approx(STOP_A[0], abs=1e-9), pytest.approx(STOP_A[1], abs=1e-9))
    assert done.point_count == 4
    assert done.end_time == T0 + 180
    assert done.duration_s == 180.0


def test_k_consecutive_outside_fixes_end_the_dwell_and_open_the_next_candidate() -> None:
    """With exit_points 3, two outside fixes are tolerated; the third ends it and the three start a new dwell."""
    detector = StayPointDetector("a", PlacesSettings(exit_points=3, min_dwell_s=60), new_id=ids())
    events = feed(detector, [(*STOP_A, T0), (*STOP_A, T0 + 60)])
    assert [type(e).__name__ for e in events] == ["EncounterStarted"]
    there = offset(STOP_A, 0.0, 400.0)
    assert feed(detector, [(*there, T0 + 90), (*there, T0 + 120)]) == []
    assert detector.state == "dwelling"
    events = feed(detector, [(*there, T0 + 150)])
    assert [type(e).__name__ for e in events] == ["EncounterCompleted", "EncounterStarted"]
    completed, started = events
    assert (completed.point_count, completed.end_time) == (2, T0 + 60)
    # The three fixes that left are the new dwell: 60 s long, so it starts at once.
    assert started.start_time == T0 + 90
    assert (started.latitude, started.longitude) == (pytest.approx(there[0], abs=1e-9), pytest.approx(there[1]))


def test_a_gap_over_max_gap_s_completes_the_encounter() -> None:
    """Silence longer than max_gap_s ends the dwell (reason gap) even when the next fix is at the same place."""
    detector = StayPointDetector("a", PlacesSettings(max_gap_s=600), new_id=ids())
    feed(detector, [(*STOP_A, T0), (*STOP_A, T0 + 120), (*STOP_A, T0 + 720)])  # a 600 s gap is not over
    assert detector.state == "dwelling"
    events = feed(detector, [(*STOP_A, T0 + 1321)])
    (done,) = events
    assert isinstance(done, EncounterCompleted)
    assert (done.reason, done.start_time, done.end_time, done.point_count) == ("gap", T0, T0 + 720, 3)
    assert detector.state == "moving"  # a new candidate, not yet min_dwell_s long


def test_the_encounter_starts_once_per_dwell() -> None:
    """A dwell of ten minutes produces one started event, at the first fix that makes it last min_dwell_s."""
    detector = StayPointDetector("a", PlacesSettings(), new_id=ids())
    events = feed(detector, [(*STOP_A, T0 + 30.0 * i) for i in range(21)])
    assert len(events) == 1
    assert isinstance(events[0], EncounterStarted)
    assert events[0].start_time == T0


def test_out_of_order_and_inaccurate_fixes_are_dropped_and_counted() -> None:
    """Fixes earlier than the previous one or worse than max_accuracy_m change nothing and are counted."""
    tracker = StayPointTracker(PlacesSettings(max_accuracy_m=30), new_id=ids())
    for i in range(5):
        tracker.track("a", *STOP_A, T0 + 30 * i, 5.0, now=0.0)
    late = tracker.track("a", *offset(STOP_A, 900, 0), T0 + 10, now=0.0)
    assert (late.accepted, late.dropped, late.dropped_out_of_order) == (False, "out_of_order", 1)
    blurry = tracker.track("a", *offset(STOP_A, 900, 0), T0 + 500, 250.0, now=0.0)
    assert (blurry.accepted, blurry.dropped, blurry.dropped_poor_accuracy) == (False, "poor_accuracy", 1)
    assert blurry.state == "dwelling"
    away = offset(STOP_A, 900, 0)
    tracker.track("a", *away, T0 + 150, now=0.0)
    done = tracker.track("a", *away, T0 + 180, now=0.0).encounters
    assert [type(e).__name__ for e in done] == ["EncounterCompleted"]
    assert done[0].point_count == 5  # neither dropped fix joined the dwell
    assert done[0].end_time == T0 + 120


@pytest.mark.parametrize(
    ("fix", "message"),
    [
        ((math.nan, 2.0, T0), "latitude must be a finite number"),
        ((48.0, math.inf, T0), "longitude must be a finite number"),
        ((91.0, 2.0, T0), "latitude must be from -90 to 90"),
        ((48.0, -180.5, T0), "longitude must be from -180 to 180"),
        ((True, 2.0, T0), "latitude must be a number"),
        (("48", 2.0, T0), "latitude must be a number"),
        ((48.0, 2.0, math.nan), "timestamp must be finite"),
    ],
)
def test_fixes_that_cannot_be_placed_raise_and_change_nothing(fix: tuple[Any, Any, Any], message: str) -> None:
    """A NaN, out-of-range or mistyped fix raises ValueError and leaves the agent's dwell as it was."""
    tracker = StayPointTracker(new_id=ids())
    for i in range(5):
        tracker.track("a", *STOP_A, T0 + 30 * i, now=0.0)
    with pytest.raises(ValueError, match=message):
        tracker.track("a", *fix, now=0.0)
    with pytest.raises(ValueError, match="accuracy_m"):
        tracker.track("a", *STOP_A, T0 + 200, -1.0, now=0.0)
    assert tracker.state_of("a") == "dwelling"
    result = tracker.track("a", *STOP_A, T0 + 150, now=0.0)
    assert (result.accepted, result.dropped_out_of_order, result.state) == (True, 0, "dwelling")


def test_least_recently_seen_agent_is_evicted_and_its_encounter_completed() -> None:
    """With max_agents 2, a third agent evicts the oldest; its open encounter completes with reason evicted."""
    tracker = StayPointTracker(PlacesSettings(max_agents=2), new_id=ids())
    for i in range(5):
        tracker.track("a", *STOP_A, T0 + 30 * i, now=1.0)
    tracker.track("b", *STOP_B, T0, now=2.0)
    result = tracker.track("c", *STOP_B, T0, now=3.0)
    (evicted,) = result.evicted
    assert (evicted.agent_id, evicted.reason, evicted.point_count, evicted.duration_s) == ("a", "evicted", 5, 120.0)
    assert "a" not in tracker
    assert len(tracker) == 2


def test_idle_agents_are_forgotten_after_idle_ttl_s() -> None:
    """expire() forgets agents idle longer than idle_ttl_s and completes their open encounters (reason idle)."""
    tracker = StayPointTracker(PlacesSettings(idle_ttl_s=100), new_id=ids())
    for i in range(5):
        tracker.track("a", *STOP_A, T0 + 30 * i, now=10.0)
    tracker.track("b", *STOP_B, T0, now=50.0)
    assert tracker.expire(110.0) == []
    (done,) = tracker.expire(110.5)
    assert (done.agent_id, done.reason) == ("a", "idle")
    assert ("a" in tracker, "b" in tracker) == (False, True)
    assert tracker.expire(151.0) == []  # b had no encounter open
    assert len(tracker) == 0


def test_centroid_is_right_across_the_antimeridian() -> None:
    """Fixes on both sides of longitude 180 average to a point on it, not to longitude 0."""
    detector = StayPointDetector("a", PlacesSettings(), new_id=ids())
    feed(detector, [(0.0, 179.9999, T0), (0.0, -179.9999, T0 + 60), (0.0, 179.9999, T0 + 120)])
    far = [(0.0, 170.0, T0 + 150), (0.0, 169.0, T0 + 180)]
    (done,) = feed(detector, far)
    assert abs(done.longitude) == pytest.approx(180.0 - 0.0001 / 3, abs=1e-6)
    assert done.latitude == pytest.approx(0.0, abs=1e-9)


def test_settings_are_read_from_config_and_checked() -> None:
    """Every default can be set through ctx.config; a bad value names its key."""
    assert PlacesSettings.from_config({}) == PlacesSettings()
    custom = PlacesSettings.from_config({"dwell_radius_m": 80, "min_dwell_s": 30.0, "exit_points": 3.0})
    assert (custom.dwell_radius_m, custom.min_dwell_s, custom.exit_points) == (80.0, 30.0, 3)
    new = PlacesSettings.from_config(
        {"stay_rule": "centroid", "max_drift_mps": 0, "place_radius_m": 100, "max_places": 5}
    )
    assert (new.stay_rule, new.max_drift_mps, new.place_radius_m, new.max_places) == ("centroid", 0.0, 100.0, 5)
    bad = (
        ("dwell_radius_m", 0),
        ("exit_points", 0),
        ("max_gap_s", "long"),
        ("max_agents", 1.5),
        ("stay_rule", "median"),
        ("max_drift_mps", -0.1),
        ("place_radius_m", 0),
        ("max_places", 0),
    )
    for key, value in bad:
        with pytest.raises(ValueError, match=key):
            PlacesSettings.from_config({key: value})


def test_memory_per_agent_is_under_a_kilobyte() -> None:
    """2,000 agents each in an open encounter with one pending fix take less than 1 KB each."""
    tracker = StayPointTracker(new_id=ids())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(2_000):
            agent = f"agent-{n}"
            for i in range(5):
                tracker.track(agent, *STOP_A, T0 + 30 * i, now=0.0)
            tracker.track(agent, *STOP_B, T0 + 150, now=0.0)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert used / 2_000 < 1024


def encounters_of(settings: PlacesSettings, fixes: list[Fix]) -> list[EncounterStarted]:
    detector = StayPointDetector("a", settings, new_id=ids())
    events = feed(detector, [(f.latitude, f.longitude, f.time) for f in fixes])
    return [e for e in events if isinstance(e, EncounterStarted)]


WALK_SPEEDS = (0.4, 0.5, 0.6, 0.8, 1.0, 1.4)
NOISES = (5.0, 10.0, 15.0)


def test_no_straight_walk_from_0_4_to_1_4_metres_a_second_becomes_an_encounter() -> None:
    """Seeded 10-minute walks at 0.4-1.4 m/s with 5-15 m GPS noise give no encounter with the default settings."""
    for speed in WALK_SPEEDS:
        for noise in NOISES:
            for seed in range(20):
                walk = straight_walk(seed, speed, noise)
                assert encounters_of(PlacesSettings(), walk) == [], (speed, noise, seed)
    # The 0.6 m/s walk with 5 m noise also at one fix every 30 s.
    for seed in range(20):
        assert encounters_of(PlacesSettings(), straight_walk(seed, 0.6, 5.0, every_s=30.0)) == []


def test_the_running_centroid_alone_takes_a_slow_walk_for_a_stay() -> None:
    """Why the defaults check more: measured from the running centroid with no drift check, 0.6 m/s walks dwell."""
    old_rule = PlacesSettings(stay_rule="centroid", max_drift_mps=0)
    dwelt = sum(bool(encounters_of(old_rule, straight_walk(seed, 0.6, 5.0))) for seed in range(20))
    assert dwelt == 20
    anchor_only = PlacesSettings(max_drift_mps=0)  # the anchor alone lets the slowest walks through
    assert sum(bool(encounters_of(anchor_only, straight_walk(seed, 0.4, 5.0))) for seed in range(20)) == 20


@pytest.mark.parametrize("every_s", [10.0, 30.0])
def test_every_stay_with_5_to_15_metres_of_noise_is_one_encounter(every_s: float) -> None:
    """Seeded stays of 5 and 10 minutes with 5-15 m GPS noise each give exactly one encounter, from the first fix."""
    for noise in NOISES:
        for duration in (300.0, 600.0):
            for seed in range(20):
                stay = noisy_stay(seed, noise, every_s=every_s, duration_s=duration)
                (started,) = encounters_of(PlacesSettings(), stay)
                assert started.start_time == T0
                assert haversine_m(started.latitude, started.longitude, *STOP_A) < 15


def test_drift_is_the_least_squares_speed_through_the_dwells_fixes() -> None:
    """A dwell checks the speed of the straight line fitted to its fixes, here worked out by the normal equations."""
    rng = random.Random(3)
    times = [30.0 * i for i in range(6)]
    north = [0.1 * t + rng.uniform(-4, 4) for t in times]
    east = [-0.05 * t + rng.uniform(-4, 4) for t in times]

    def slope(values: list[float]) -> float:
        mean_t, mean_v = sum(times) / len(times), sum(values) / len(values)
        return sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True)) / sum(
            (t - mean_t) ** 2 for t in times
        )

    want = math.hypot(slope(north), slope(east))  # about 0.11 m/s
    fixes = [(*offset(STOP_A, n, e), T0 + t) for n, e, t in zip(north, east, times, strict=True)]
    just_above = PlacesSettings(max_drift_mps=want * 0.999)
    just_below = PlacesSettings(max_drift_mps=want * 1.001)
    assert feed(StayPointDetector("a", just_above, new_id=ids()), fixes) == []
    (started,) = feed(StayPointDetector("a", just_below, new_id=ids()), fixes)
    assert started.start_time == T0


def test_a_fix_is_measured_from_the_anchor_not_from_the_centroid() -> None:
    """Fixes 30 m apart in a row: the third is 45 m from the running centroid but 60 m from the anchor."""
    row = [(*offset(STOP_A, 0.0, 30.0 * i), T0 + 60.0 * i) for i in (0, 1)]
    third = (*offset(STOP_A, 0.0, 60.0), T0 + 120.0)
    anchor = StayPointDetector("a", PlacesSettings(max_drift_mps=0), new_id=ids())
    assert feed(anchor, [*row, third]) == []  # outside the anchor's radius: the dwell is still 60 s old
    centroid = StayPointDetector("a", PlacesSettings(stay_rule="centroid", max_drift_mps=0), new_id=ids())
    assert [type(e).__name__ for e in feed(centroid, [*row, third])] == ["EncounterStarted"]
