"""Known places (places plugin): one place_id for every stay near a place, a bounded set, tested synchronously."""

from __future__ import annotations

import math
from typing import Any

import pytest
from gps_trace import STOP_A, STOP_B, T0, haversine_m, noisy_stay, offset, straight_walk
from nexus.handlers.places.known import KnownPlaces
from nexus.handlers.places.staypoints import EncounterCompleted, EncounterStarted, PlacesSettings, StayPointTracker


def ids(prefix: str = "p") -> Any:
    counter = iter(range(1, 1_000_000))
    return lambda: f"{prefix}{next(counter)}"


def test_a_point_within_the_radius_gets_the_known_place_and_one_beyond_a_new_one() -> None:
    """49 m from a place is that place (visits counted); 51 m away is a new place, discovered once."""
    places = KnownPlaces(50.0, new_id=ids())
    first, new = places.visit(*STOP_A, T0)
    assert (first.place_id, new) == ("p1", True)
    again, new = places.visit(*offset(STOP_A, 49.0, 0.0), T0 + 3600)
    assert (again.place_id, new, again.visits, again.last_visit) == ("p1", False, 2, T0 + 3600)
    assert (again.latitude, again.longitude) == STOP_A  # a place never moves
    other, new = places.visit(*offset(STOP_A, 0.0, 51.0), T0 + 7200)
    assert (other.place_id, new) == ("p2", True)
    assert [p.place_id for p in places.discovered] == ["p1", "p2"]
    assert len(places) == 2


def test_the_nearest_known_place_wins() -> None:
    """Between two places 80 m apart, a point 30 m from the second is at the second."""
    places = KnownPlaces(50.0, new_id=ids())
    places.visit(*STOP_A, T0)
    places.visit(*offset(STOP_A, 80.0, 0.0), T0)
    assert places.visit(*offset(STOP_A, 50.0, 0.0), T0)[0].place_id == "p2"
    assert places.visit(*offset(STOP_A, 30.0, 0.0), T0)[0].place_id == "p1"


@pytest.mark.parametrize(
    "where",
    [(0.0, 179.9998), (0.0, -179.9998), (89.9999, 10.0), (-89.99995, -170.0), (64.0, 0.0), (-33.9, 18.4)],
)
def test_the_grid_finds_places_across_cell_edges_the_antimeridian_and_the_poles(where: tuple[float, float]) -> None:
    """Around a place, every point within the radius (in 16 directions and 5 distances) finds it; none beyond."""
    places = KnownPlaces(50.0, new_id=ids())
    place, _ = places.visit(*where, T0)
    for step in range(16):
        for distance in (1.0, 20.0, 35.0, 49.0, 49.9, 50.5, 70.0):
            north = distance * math.cos(step * math.pi / 8)
            east = distance * math.sin(step * math.pi / 8)
            point = offset(where, north, east)
            lat, lon = point[0], (point[1] + 180.0) % 360.0 - 180.0
            if abs(lat) > 90:
                continue
            want = haversine_m(*where, lat, lon) <= 50.0
            found = places.nearest(lat, lon)
            assert (found is not None) == want, (where, distance, step)
    assert places.nearest(*offset(where, 0.0, 0.0)) is place


def test_at_the_limit_the_place_visited_longest_ago_is_forgotten() -> None:
    """With max_places 2, a third place forgets the least recently visited one, which is no longer found."""
    places = KnownPlaces(50.0, 2, new_id=ids())
    places.visit(*STOP_A, T0)
    places.visit(*STOP_B, T0 + 10)
    places.visit(*STOP_A, T0 + 20)  # A is now the most recently visited
    third, _ = places.visit(*offset(STOP_A, 5000.0, 0.0), T0 + 30)
    assert (third.place_id, len(places), places.forgotten) == ("p3", 2, 1)
    assert [p.place_id for p in places] == ["p1", "p3"]
    assert places.nearest(*STOP_B) is None
    assert places.visit(*STOP_B, T0 + 40)[0].place_id == "p4"


def test_places_learned_elsewhere_are_known_by_their_id() -> None:
    """learn() adds a place found by another node under its own id, once."""
    source = KnownPlaces(50.0, new_id=ids("remote-"))
    found, _ = source.visit(*STOP_A, T0)
    places = KnownPlaces(50.0, new_id=ids())
    assert places.learn(found) is True
    assert places.learn(found) is False
    assert places.visit(*offset(STOP_A, 10.0, 10.0), T0 + 60)[0].place_id == "remote-1"


def test_settings_that_cannot_make_a_place_set_are_refused() -> None:
    """A radius of 0 or a limit under 1 is a ValueError naming the setting."""
    with pytest.raises(ValueError, match="place_radius_m"):
        KnownPlaces(0.0)
    with pytest.raises(ValueError, match="max_places"):
        KnownPlaces(50.0, 0)


def stay_events(tracker: StayPointTracker, agent: str, fixes: list[Any], now: float = 0.0) -> list[Any]:
    events: list[Any] = []
    for fix in fixes:
        events += tracker.track(agent, fix.latitude, fix.longitude, fix.time, now=now).encounters
    return events


def test_revisits_and_other_agents_get_the_same_place_id() -> None:
    """Two noisy stays at A hours apart, and one by another agent, share A's place_id; B gets another."""
    tracker = StayPointTracker(new_id=ids())
    away = straight_walk(1, 1.4, 5.0, duration_s=300.0)
    first = stay_events(tracker, "a", noisy_stay(1, 15.0))
    walked = stay_events(tracker, "a", [type(f)(f.latitude, f.longitude, f.time + 601) for f in away])
    at_b = stay_events(tracker, "a", noisy_stay(2, 15.0, at=STOP_B, start=T0 + 3600))
    back = stay_events(tracker, "a", noisy_stay(3, 15.0, start=T0 + 7200))
    other = stay_events(tracker, "b", noisy_stay(4, 15.0, start=T0 + 9000))
    started = [e for e in first + at_b + back + other if isinstance(e, EncounterStarted)]
    assert [e.start_time - T0 for e in started] == [0.0, 3600.0, 7200.0, 9000.0]
    place_ids = [e.place_id for e in started]
    assert place_ids[0] is not None
    assert place_ids[2] == place_ids[3] == place_ids[0]  # the revisit, and the other agent at A
    assert place_ids[1] not in (None, place_ids[0])  # B is another place
    completed = [e for e in walked + back if isinstance(e, EncounterCompleted)]
    assert [e.place_id for e in completed] == place_ids[:2]  # a completed encounter keeps its place
    assert len(tracker.places) == 2


def test_fragments_of_one_stay_share_a_place_and_only_the_first_discovers_it() -> None:
    """A stay cut in two by a gap over max_gap_s gives two encounters at one place; one place is discovered."""
    tracker = StayPointTracker(PlacesSettings(max_gap_s=300), new_id=ids())
    before = noisy_stay(5, 10.0, duration_s=300.0)
    after = noisy_stay(6, 10.0, start=T0 + 700.0, duration_s=300.0)
    discovered = []
    events = []
    for fix in before + after:
        result = tracker.track("a", fix.latitude, fix.longitude, fix.time, now=0.0)
        discovered += result.discovered
        events += result.encounters
        if result.state == "dwelling":  # the fix's answer names the place of the open encounter
            assert result.place_id == events[-1].place_id
    started = [e for e in events if isinstance(e, EncounterStarted)]
    completed = [e for e in events if isinstance(e, EncounterCompleted)]
    assert (len(started), len(completed), completed[0].reason) == (2, 1, "gap")
    assert started[0].encounter_id != started[1].encounter_id
    assert started[0].place_id == started[1].place_id == completed[0].place_id == discovered[0].place_id
    assert len(discovered) == 1
