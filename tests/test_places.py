"""The places plugin end to end: track_location, the encounter and location events, stream_encounters."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from gps_trace import STOP_A, STOP_B, T0, offset, two_stops_trace
from nexus.handlers.places.plugin import AgentStateQuery, StreamEncounters, TrackLocation, rfc3339

from nexus import Event, InvalidPayload, parse_time
from nexus.bus.memory import MemoryBus
from nexus.plugins import HandlerSpec, discover
from nexus.queue import MemoryRequestQueue
from nexus.testing import StreamFollower, TestServer, run_server

GUARD = 10.0
TRACK = "places:track_location:v1:requested"
STREAM = "places:stream_encounters:v1:requested"
STATE = "places:agent_state:v1:requested"


async def track(nexus: TestServer, payload: dict[str, Any]) -> Event:
    return await asyncio.wait_for(nexus.client.call(TRACK, payload), GUARD)


def fix_payload(agent_id: str, latitude: float, longitude: float, time: float | str, **extra: Any) -> dict[str, Any]:
    return {"agent_id": agent_id, "latitude": latitude, "longitude": longitude, "timestamp": time, **extra}


async def started_stream(nexus: TestServer, payload: dict[str, Any]) -> StreamFollower:
    """Start a stream_encounters request; returns once its `started` arrived."""
    follow = StreamFollower(nexus.client.request(STREAM, payload, heartbeats=False))
    await follow.started()
    return follow


async def test_the_acceptance_trace_gives_two_encounters_through_the_server() -> None:
    """Two stops 1 km apart and a spike, sent as requests, publish exactly two started/completed encounter pairs."""
    fixes, expected = two_stops_trace()
    async with run_server(TrackLocation(), StreamEncounters()) as nexus:
        encounters = await nexus.record("places:encounter:v1:*")
        locations = await nexus.record("places:location:v1:updated")
        stream = await started_stream(nexus, {"agent_id": "courier"})
        states = []
        for fix in fixes:
            done = await track(nexus, fix_payload("courier", fix.latitude, fix.longitude, rfc3339(fix.time)))
            assert done.state == "success", done.payload
            states.append(done.payload["state"])
        await encounters.wait_count(4)
        await locations.wait_count(len(fixes))
        chunks = await stream.wait_for(lambda chunks: len(chunks) >= 4)

        assert [e.event_type for e in encounters.events] == [
            "places:encounter:v1:started",
            "places:encounter:v1:completed",
        ] * 2
        completed = [e.payload for e in encounters.events if e.state == "completed"]
        for got, want in zip(completed, expected, strict=True):
            assert got["latitude"] == pytest.approx(want.latitude, abs=1e-7)
            assert got["longitude"] == pytest.approx(want.longitude, abs=1e-7)
            assert parse_time(got["start_time"]) == want.start_time
            assert parse_time(got["end_time"]) == want.end_time
            assert got["duration_s"] == want.duration_s
            assert got["point_count"] == want.point_count
            assert got["reason"] == "left"
        started = [e.payload for e in encounters.events if e.state == "started"]
        assert [s["encounter_id"] for s in started] == [c["encounter_id"] for c in completed]
        # The state is dwelling from the fix that made a dwell last 120 s until the fix that ended it.
        assert states[3] == "moving"
        assert states[4] == "dwelling"
        assert states[-1] == "moving"
        # Every fix is on the map, and the stream carried the same four encounter events in order.
        assert [e.payload["timestamp"] for e in locations.events] == [rfc3339(f.time) for f in fixes]
        assert [c["phase"] for c in chunks] == ["started", "completed", "started", "completed"]
        assert [{k: v for k, v in c.items() if k != "phase"} for c in chunks] == [e.payload for e in encounters.events]
        assert await stream.stream.cancel()
        assert (await stream.ended()).state == "cancelled"
        await encounters.stop()
        await locations.stop()


async def test_stream_encounters_follows_one_agent_or_all() -> None:
    """A stream with agent_id gets only that agent's encounters; one without gets every agent's."""
    async with run_server(TrackLocation(), StreamEncounters()) as nexus:
        only_b = await started_stream(nexus, {"agent_id": "b"})
        everyone = await started_stream(nexus, {})
        for agent, origin in (("a", STOP_A), ("b", offset(STOP_A, 5000, 0))):
            for i in range(5):
                await track(nexus, fix_payload(agent, *origin, T0 + 30 * i))
        to_everyone = await everyone.wait_for(lambda chunks: len(chunks) >= 2)
        assert [c["agent_id"] for c in to_everyone] == ["a", "b"]
        to_b = await only_b.wait_for(lambda chunks: len(chunks) >= 1)
        assert [(c["agent_id"], c["phase"]) for c in to_b] == [("b", "started")]
        assert await everyone.stream.cancel()
        await everyone.ended()
        assert await only_b.stream.cancel()
        await only_b.ended()
        assert len(only_b.chunks) == 1


async def test_dropped_fixes_are_reported_and_counted() -> None:
    """An out-of-order or inaccurate fix succeeds with accepted false, the reason, the counts, and no map update."""
    async with run_server(TrackLocation()) as nexus:
        locations = await nexus.record("places:location:v1:updated")
        first = await track(nexus, fix_payload("a", *STOP_A, "2025-03-01T08:00:00Z", accuracy_m=5))
        assert first.payload == {
            "agent_id": "a",
            "state": "moving",
            "accepted": True,
            "encounter_id": None,
            "place_id": None,
            "dropped_out_of_order": 0,
            "dropped_poor_accuracy": 0,
        }
        late = await track(nexus, fix_payload("a", *STOP_A, "2025-03-01T07:59:00Z"))
        assert (late.payload["accepted"], late.payload["dropped"], late.payload["dropped_out_of_order"]) == (
            False,
            "out_of_order",
            1,
        )
        blurry = await track(nexus, fix_payload("a", *STOP_A, "2025-03-01T08:01:00Z", accuracy_m=500))
        assert (blurry.payload["dropped"], blurry.payload["dropped_poor_accuracy"]) == ("poor_accuracy", 1)
        await track(nexus, fix_payload("a", *STOP_A, "2025-03-01T08:02:00Z"))
        await locations.wait_count(2)
        assert [e.payload["timestamp"] for e in locations.events] == ["2025-03-01T08:00:00Z", "2025-03-01T08:02:00Z"]
        assert locations.events[0].payload["accuracy_m"] == 5
        await locations.stop()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"latitude": 1.0, "longitude": 2.0, "timestamp": T0}, "'agent_id' is a required property"),
        ({"agent_id": "a", "longitude": 2.0, "timestamp": T0}, "'latitude' is a required property"),
        ({"agent_id": "a", "latitude": "48.1", "longitude": 2.0, "timestamp": T0}, "payload.latitude: '48.1' is not"),
        (
            {"agent_id": "a", "latitude": 91.0, "longitude": 2.0, "timestamp": T0},
            "payload.latitude: 91 is greater than the maximum of 90",
        ),
        ({"agent_id": "a", "latitude": 1.0, "longitude": -181, "timestamp": T0}, "payload.longitude: -181 is less"),
        ({"agent_id": "a", "latitude": 1.0, "longitude": 2.0, "timestamp": "yesterday"}, "'yesterday' is not RFC 3339"),
        ({"agent_id": "a", "latitude": 1.0, "longitude": 2.0, "timestamp": T0, "accuracy_m": -1}, "accuracy_m"),
        ({"agent_id": 7, "latitude": 1.0, "longitude": 2.0, "timestamp": T0}, "payload.agent_id: 7 is not"),
        (
            {"agent_id": "a", "latitude": 1.0, "longitude": 2.0, "timestamp": 1e15},
            "timestamp 1000000000000000 is out of range",
        ),
    ],
)
async def test_bad_payloads_fail_and_the_agents_state_is_kept(payload: dict[str, Any], message: str) -> None:
    """Each bad fix ends failed/invalid_payload with a clear message; the dwelling agent stays dwelling."""
    async with run_server(TrackLocation()) as nexus:
        for i in range(5):
            await track(nexus, fix_payload("a", *STOP_A, T0 + 30 * i))
        bad = await track(nexus, payload)
        assert bad.state == "failed"
        assert bad.payload["error"]["type"] == "invalid_payload"
        assert message in bad.payload["error"]["message"]
        good = await track(nexus, fix_payload("a", *STOP_A, T0 + 150))
        assert (good.payload["state"], good.payload["dropped_out_of_order"]) == ("dwelling", 0)


async def test_nan_coordinates_that_reach_the_handler_fail_cleanly() -> None:
    """NaN is not JSON (clients refuse to send it), and one published straight onto the bus still ends failed."""
    async with run_server(TrackLocation()) as nexus:
        with pytest.raises(InvalidPayload):
            await nexus.client.call(TRACK, fix_payload("a", math.nan, 2.0, T0))
        terminal = await nexus.record("places:track_location:v1:failed")
        request = Event(event_type=TRACK, payload=fix_payload("a", math.nan, 2.0, T0))
        await nexus.bus.publish(request)
        (failed,) = await terminal.wait_count(1)
        assert failed.correlation_id == request.event_id
        assert failed.payload["error"] == {
            "type": "invalid_payload",
            "message": "payload.latitude is nan: NaN and Infinity are not valid JSON",
        }
        await terminal.stop()
        ok = await track(nexus, fix_payload("a", *STOP_A, T0))
        assert ok.state == "success"


async def test_settings_come_from_the_plugin_section() -> None:
    """[handlers.places] sets the detector: min_dwell_s 30 starts an encounter after two fixes 30 s apart."""
    spec = HandlerSpec("places.track_location", TrackLocation(), "--handler")
    async with run_server(spec, handler_config={"places": {"min_dwell_s": 30, "dwell_radius_m": 20}}) as nexus:
        assert (await track(nexus, fix_payload("a", *STOP_A, T0))).payload["state"] == "moving"
        assert (await track(nexus, fix_payload("a", *STOP_A, T0 + 30))).payload["state"] == "dwelling"


async def test_an_agent_that_falls_silent_has_its_encounter_completed_as_idle() -> None:
    """With idle_ttl_s and sweep_interval_s small, a silent agent is forgotten and its open encounter completes."""
    spec = HandlerSpec("places.track_location", TrackLocation(), "--handler")
    settings = {"places": {"min_dwell_s": 0, "idle_ttl_s": 0.05, "sweep_interval_s": 0.02}}
    async with run_server(spec, handler_config=settings) as nexus:
        completed = await nexus.record("places:encounter:v1:completed")
        started = await track(nexus, fix_payload("a", *STOP_A, T0))
        assert started.payload["state"] == "dwelling"
        (done,) = await completed.wait_count(1)
        assert done.payload["encounter_id"] == started.payload["encounter_id"]
        assert (done.payload["reason"], done.payload["point_count"], done.payload["duration_s"]) == ("idle", 1, 0)
        await completed.stop()


async def test_a_bad_setting_stops_the_server_from_starting() -> None:
    """A setting of the wrong type is refused at start-up, naming the handler and the key."""
    spec = HandlerSpec("places.track_location", TrackLocation(), "--handler")
    with pytest.raises(ValueError, match=r"places\.track_location: places setting 'exit_points' must be at least 1"):
        async with run_server(spec, handler_config={"places": {"exit_points": 0}}):
            pass


def test_the_plugin_registers_through_entry_points() -> None:
    """The places handlers are found as entry points named places.<handler>."""
    found = {spec.name: type(spec.handler) for spec in discover(True, (), ())}
    assert found["places.track_location"] is TrackLocation
    assert found["places.stream_encounters"] is StreamEncounters
    assert found["places.agent_state"] is AgentStateQuery


async def test_a_revisit_gets_the_same_place_id_and_a_new_place_is_discovered_once() -> None:
    """Stop A, stop B, back at A an hour later: A's two encounters share a place_id; two places are discovered."""
    fixes, _ = two_stops_trace()
    async with run_server(TrackLocation()) as nexus:
        discovered = await nexus.record("places:place:v1:discovered")
        started = await nexus.record("places:encounter:v1:started")
        for fix in fixes:
            await track(nexus, fix_payload("courier", fix.latitude, fix.longitude, fix.time))
        replies = [await track(nexus, fix_payload("courier", *STOP_A, T0 + 3600 + 30 * i)) for i in range(5)]
        places = await discovered.wait_count(2)
        encounters = await started.wait_count(3)
        place_ids = [e.payload["place_id"] for e in encounters]
        assert place_ids[0] == place_ids[2] != place_ids[1]
        assert [p.payload["place_id"] for p in places] == place_ids[:2]
        assert places[0].payload["agent_id"] == "courier"
        assert places[0].payload["discovered_at"] == rfc3339(T0)
        assert (replies[-1].payload["state"], replies[-1].payload["place_id"]) == ("dwelling", place_ids[0])
        await asyncio.sleep(0.05)
        assert len(discovered.events) == 2  # the revisit discovered nothing
        await discovered.stop()
        await started.stop()


async def test_two_nodes_give_one_place_one_id_and_ignore_a_bad_discovery() -> None:
    """A place discovered through one node is known to the other; a malformed discovery on the bus is skipped."""
    bus = MemoryBus()
    queue = MemoryRequestQueue(bus)
    first, second = TrackLocation(), TrackLocation()
    async with (
        run_server(first, bus=bus, queue=queue) as node_a,
        run_server(second, bus=bus, queue=queue),
    ):
        await bus.publish(Event(event_type="places:place:v1:discovered", payload={"place_id": "x", "latitude": 91}))
        discovered = await node_a.record("places:place:v1:discovered")
        started = await node_a.record("places:encounter:v1:started")
        for agent in ("x", "y"):
            for i in range(5):
                await track(node_a, fix_payload(agent, *offset(STOP_A, 3.0 * i, 0.0), T0 + 30 * i))
            if agent == "x":
                (place,) = await discovered.wait_count(1)
                for _ in range(200):  # until both nodes have followed the discovery
                    if all(len(h.tracker.places) == 1 for h in (first, second)):
                        break
                    await asyncio.sleep(0.01)
        encounters = await started.wait_count(2)
        assert [e.payload["place_id"] for e in encounters] == [place.payload["place_id"]] * 2
        for handler in (first, second):
            assert [p.place_id for p in handler.tracker.places] == [place.payload["place_id"]]
        await discovered.stop()
        await started.stop()


async def test_agent_state_answers_the_last_fix_dwelling_and_place() -> None:
    """agent_state right after a fix's success gives that fix's time, dwelling or not, the encounter and place."""
    async with run_server(TrackLocation(), AgentStateQuery()) as nexus:
        unknown = await asyncio.wait_for(nexus.client.call(STATE, {"agent_id": "a"}), GUARD)
        assert unknown.payload == {"agent_id": "a", "known": False}
        for i in range(5):
            fix = await track(nexus, fix_payload("a", *STOP_A, T0 + 30 * i))
            now = await asyncio.wait_for(nexus.client.call(STATE, {"agent_id": "a"}), GUARD)
            assert now.payload["last_fix_time"] == rfc3339(T0 + 30 * i)
            assert now.payload["dwelling"] is (i >= 4)
            assert (now.payload["encounter_id"], now.payload["place_id"]) == (
                fix.payload["encounter_id"],
                fix.payload["place_id"],
            )
        assert now.payload["place_id"] is not None
        assert (now.payload["latitude"], now.payload["longitude"]) == STOP_A
        late = await track(nexus, fix_payload("a", *offset(STOP_A, 900, 0), T0))  # dropped: changes nothing
        assert late.payload["accepted"] is False
        assert (await nexus.client.call(STATE, {"agent_id": "a"})).payload == now.payload
        bad = await nexus.client.call(STATE, {"agent_id": ""})
        assert bad.state == "failed"
        assert bad.payload["error"]["type"] == "invalid_payload"


async def test_agent_state_knows_an_idle_agent_is_no_longer_dwelling() -> None:
    """When an agent is forgotten for being idle, its encounter completes and agent_state says it is moving."""
    spec = HandlerSpec("places.track_location", TrackLocation(), "--handler")
    state_spec = HandlerSpec("places.agent_state", AgentStateQuery(), "--handler")
    settings = {"places": {"min_dwell_s": 0, "idle_ttl_s": 0.05, "sweep_interval_s": 0.02}}
    async with run_server(spec, state_spec, handler_config=settings) as nexus:
        completed = await nexus.record("places:encounter:v1:completed")
        assert (await track(nexus, fix_payload("a", *STOP_A, T0))).payload["state"] == "dwelling"
        await completed.wait_count(1)
        now = await asyncio.wait_for(nexus.client.call(STATE, {"agent_id": "a"}), GUARD)
        assert (now.payload["known"], now.payload["state"], now.payload["encounter_id"]) == (True, "moving", None)
        await completed.stop()



async def stay(nexus: TestServer, agent_id: str, at: tuple[float, float], start: float) -> str | None:
    """Six fixes 30 s apart at one spot (a dwell of 150 s): the place_id the last one answers."""
    replies = [await track(nexus, fix_payload(agent_id, *at, start + 30 * i)) for i in range(6)]
    assert replies[-1].payload["state"] == "dwelling", replies[-1].payload
    place_id: str | None = replies[-1].payload["place_id"]
    return place_id


def tracking() -> HandlerSpec:
    return HandlerSpec("places.track_location", TrackLocation(), "--handler")


async def test_places_outlive_a_restart_and_one_forgotten_to_make_room_leaves_the_store(tmp_path: Any) -> None:
    """Known places are kept in the plugin's store (data_dir): after a restart, on a memory bus whose history is
    empty, a stay at a known place gets its place_id and discovers nothing. With max_places 1 a server keeps
    the most recently visited place and drops the others from the store too, so later servers do not know them."""
    data = str(tmp_path / "data")
    async with run_server(tracking(), data_dir=data) as nexus:
        place_a = await stay(nexus, "courier", STOP_A, T0)
        place_b = await stay(nexus, "courier", STOP_B, T0 + 1200)
    assert place_a != place_b
    async with run_server(tracking(), data_dir=data) as nexus:
        assert await nexus.bus.head_offset() == 0
        discovered = await nexus.record("places:place:v1:discovered")
        assert await stay(nexus, "van", STOP_A, T0 + 7200) == place_a  # A is now the most recently visited
        await asyncio.sleep(0.05)
        assert discovered.events == []
        await discovered.stop()
    async with run_server(tracking(), data_dir=data, handler_config={"places": {"max_places": 1}}) as nexus:
        assert await stay(nexus, "bike", STOP_A, T0 + 9000) == place_a
    async with run_server(tracking(), data_dir=data) as nexus:
        assert await stay(nexus, "cab", STOP_A, T0 + 12_000) == place_a
        assert await stay(nexus, "cab", STOP_B, T0 + 13_000) not in (place_a, place_b)  # B was dropped
