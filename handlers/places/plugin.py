"""The places handlers: ``places:track_location``, ``places:stream_encounters`` and ``places:agent_state``.

Settings (``[handlers.places]``, declared in ``specs.CONFIG`` from :class:`.staypoints.PlacesSettings`):
``dwell_radius_m`` (50), ``stay_rule`` ("anchor"), ``min_dwell_s`` (120), ``max_drift_mps`` (0.15), ``exit_points``
(2), ``max_gap_s`` (600), ``max_accuracy_m`` (100), ``max_agents`` (100000), ``idle_ttl_s`` (3600),
``sweep_interval_s`` (60), ``place_radius_m`` (50), ``max_places`` (10000); agent_state also ``sync_timeout_s``
(5). Idle agents are swept by a background task of the server (``ctx.start_soon``), cancelled when it stops. What
each handler takes and emits is declared in :mod:`.specs`.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from nexus import (
    Event,
    EventHandler,
    Follower,
    HandlerContext,
    InvalidPayload,
    NexusError,
    Stream,
    StreamingEventHandler,
    key_for,
    parse_time,
    read_number,
)

from . import specs
from .agents import AgentState, AgentStates
from .known import Place
from .specs import AGENT_STATE_REQUESTED, ENCOUNTER_COMPLETED, ENCOUNTER_STARTED, LOCATION_UPDATED, PLACE_DISCOVERED
from .staypoints import (
    Encounter,
    EncounterCompleted,
    EncounterStarted,
    PlacesSettings,
    StayPointTracker,
    check_fix,
)


def rfc3339(seconds: float) -> str:
    """Epoch seconds as RFC 3339 UTC text (``2025-01-01T08:00:00Z``; milliseconds when not whole)."""
    moment = datetime.fromtimestamp(seconds, UTC)
    text = moment.isoformat(timespec="seconds" if float(seconds).is_integer() else "milliseconds")
    return text.replace("+00:00", "Z")


def _encounter_payload(encounter: Encounter) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "agent_id": encounter.agent_id,
        "encounter_id": encounter.encounter_id,
        "latitude": encounter.latitude,
        "longitude": encounter.longitude,
        "start_time": rfc3339(encounter.start_time),
    }
    if encounter.place_id is not None:
        payload["place_id"] = encounter.place_id
    if isinstance(encounter, EncounterCompleted):
        payload.update(
            end_time=rfc3339(encounter.end_time),
            duration_s=encounter.duration_s,
            point_count=encounter.point_count,
            reason=encounter.reason,
        )
    return payload


def _place_payload(place: Place, agent_id: str) -> dict[str, Any]:
    return {
        "place_id": place.place_id,
        "latitude": place.latitude,
        "longitude": place.longitude,
        "discovered_at": rfc3339(place.discovered_at),
        "agent_id": agent_id,
    }


def _event_type(encounter: Encounter) -> str:
    return ENCOUNTER_STARTED if isinstance(encounter, EncounterStarted) else ENCOUNTER_COMPLETED


# --- track_location ---------------------------------------------------------------------------------------


PLACE_KEY_PREFIX = "place."


def _place_key(place_id: str) -> str:
    """Where a known place is kept in the plugin's ``ctx.kv``."""
    return key_for("place", place_id)


def _kept_place(place: Place) -> dict[str, Any]:
    return {
        "place_id": place.place_id,
        "latitude": place.latitude,
        "longitude": place.longitude,
        "discovered_at": place.discovered_at,
        "last_visit": place.last_visit,
        "visits": place.visits,
    }


def _place_from_kept(value: Any) -> Place | None:
    """The place a kept value holds, or None for one that is not (written by something else)."""
    if not isinstance(value, dict):
        return None
    try:
        place = Place(
            str(value["place_id"]),
            float(value["latitude"]),
            float(value["longitude"]),
            float(value["discovered_at"]),
            float(value["last_visit"]),
            int(value["visits"]),
        )
        check_fix(place.latitude, place.longitude, place.discovered_at)
    except (KeyError, TypeError, ValueError, OverflowError, InvalidPayload):
        return None
    return place


class TrackLocation(EventHandler):
    """One GPS fix of an agent in, the agent's state out; stay-point detection per agent.

    Encounters are published as ``places:encounter:v1:started`` / ``completed`` side events and every
    accepted fix as ``places:location:v1:updated``. Fixes out of time order or with poor accuracy are dropped
    and counted. Settings: dwell_radius_m, min_dwell_s, exit_points, max_gap_s, max_accuracy_m, max_agents,
    idle_ttl_s, sweep_interval_s (``[handlers.places]``).
    """

    event_type = "places:track_location:v1"
    ordering_key = "agent_id"
    takes = specs.TRACK_LOCATION_TAKES
    config_keys = specs.CONFIG
    emits = specs.TRACK_LOCATION_EMITS

    def __init__(self) -> None:
        self.settings = PlacesSettings()
        self.tracker = StayPointTracker(self.settings)

    async def setup(self, ctx: HandlerContext) -> None:
        try:
            self.settings = PlacesSettings.from_config(ctx.config)
        except ValueError as exc:
            raise ValueError(f"{ctx.name}: {exc}") from None
        self.tracker = StayPointTracker(self.settings)
        await self._load_kept_places(ctx)
        ctx.start_soon(self._sweep_idle, name=f"{ctx.name}-idle-sweep")
        # Every node learns every node's places (from the history the bus still holds), so one place has one id.
        await ctx.follow(PLACE_DISCOVERED, on_event=self._learn, since_offset=0)

    async def _load_kept_places(self, ctx: HandlerContext) -> None:
        """Learn the places kept in ``ctx.kv`` (they outlive restarts and the bus history), least recently
        visited first, so the bound forgets the same ones it would have."""
        kept: list[Place] = []
        for key in await ctx.kv.keys(PLACE_KEY_PREFIX):
            entry = await ctx.kv.get(key)
            place = _place_from_kept(entry.value if entry is not None else None)
            if place is None:
                ctx.log.warning("kept_place_skipped", key=key)
            else:
                kept.append(place)
        places = self.tracker.places
        for place in sorted(kept, key=lambda place: place.last_visit):
            places.learn(place)
        dropped, places.dropped = places.dropped, []
        for place in dropped:  # over max_places (lowered since): the store forgets them too
            await ctx.kv.delete(_place_key(place.place_id))

    async def _keep_places(self, visited: list[str]) -> None:
        """Keep the places learned or visited in ``ctx.kv``, and forget those the bound dropped. A store that
        cannot answer is logged, never a failed fix: the places stay known in memory."""
        places = self.tracker.places
        dropped, places.dropped = places.dropped, []
        try:
            for place_id in dict.fromkeys(visited):
                place = places.get(place_id)
                if place is not None:
                    await self.ctx.kv.put(_place_key(place_id), _kept_place(place))
            for place in dropped:
                await self.ctx.kv.delete(_place_key(place.place_id))
        except NexusError as exc:
            self.ctx.log.warning("places_not_kept", error=exc.message)

    def _learn(self, event: Event) -> None:
        payload = event.payload
        place_id = payload.get("place_id")
        try:
            if not isinstance(place_id, str) or not 0 < len(place_id) <= 256:
                raise ValueError(f"place_id must be a string of 1 to 256 characters, got {place_id!r}")
            discovered_at = parse_time(payload.get("discovered_at"))
            latitude: Any = payload.get("latitude")
            longitude: Any = payload.get("longitude")
            check_fix(latitude, longitude, discovered_at)
        except (InvalidPayload, ValueError, OverflowError) as exc:
            self.ctx.log.warning("place_not_learned", event_id=event.event_id, error=str(exc))
            return
        self.tracker.places.learn(Place(place_id, float(latitude), float(longitude), discovered_at, discovered_at))

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                for completed in self.tracker.expire(time.monotonic()):
                    await self.ctx.publish(ENCOUNTER_COMPLETED, _encounter_payload(completed))
            except Exception as exc:  # keep sweeping: a bus hiccup must not stop idle expiry for good
                self.ctx.log.warning("idle_sweep_failed", error=f"{type(exc).__name__}: {exc}")

    async def handle(self, event: Event) -> dict[str, Any]:
        payload = event.payload
        agent_id = payload["agent_id"]
        try:
            fix_time = parse_time(payload["timestamp"])
            fix_text = rfc3339(fix_time)
        except InvalidPayload as exc:
            raise InvalidPayload(f"timestamp: {exc.message}") from None
        except (ValueError, OverflowError, OSError):
            raise InvalidPayload(f"timestamp {payload['timestamp']!r} is out of range") from None
        accuracy = payload.get("accuracy_m")
        now = time.monotonic()
        try:
            result = self.tracker.track(
                agent_id, payload["latitude"], payload["longitude"], fix_time, accuracy, now=now
            )
        except ValueError as exc:
            raise InvalidPayload(str(exc)) from None
        for completed in result.evicted:
            await self.ctx.publish(ENCOUNTER_COMPLETED, _encounter_payload(completed))
        if result.accepted:
            location: dict[str, Any] = {
                "agent_id": agent_id,
                "latitude": payload["latitude"],
                "longitude": payload["longitude"],
                "timestamp": fix_text,
                "state": result.state,
                "encounter_id": result.encounter_id,
                "place_id": result.place_id,
            }
            if accuracy is not None:
                location["accuracy_m"] = accuracy
            await self.ctx.publish(LOCATION_UPDATED, location)
        for place in result.discovered:
            await self.ctx.publish(PLACE_DISCOVERED, _place_payload(place, agent_id))
        for encounter in result.encounters:
            await self.ctx.publish(_event_type(encounter), _encounter_payload(encounter))
        visited = [place.place_id for place in result.discovered]
        visited += [e.place_id for e in result.encounters if isinstance(e, EncounterStarted) and e.place_id]
        if visited or self.tracker.places.dropped:
            await self._keep_places(visited)
        reply: dict[str, Any] = {
            "agent_id": agent_id,
            "state": result.state,
            "accepted": result.accepted,
            "encounter_id": result.encounter_id,
            "place_id": result.place_id,
            "dropped_out_of_order": result.dropped_out_of_order,
            "dropped_poor_accuracy": result.dropped_poor_accuracy,
        }
        if result.dropped is not None:
            reply["dropped"] = result.dropped
        return reply


# --- stream_encounters ------------------------------------------------------------------------------------


class StreamEncounters(StreamingEventHandler):
    """Live encounter events of one agent, or of every agent, until cancelled.

    Follows ``places:encounter:v1:*`` on the bus from the request on, so it sees the encounters of every node.
    """

    event_type = "places:stream_encounters:v1"
    stream_timeout = None
    takes = specs.STREAM_ENCOUNTERS_TAKES
    config_keys = specs.CONFIG
    emits = specs.STREAM_ENCOUNTERS_EMITS

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        agent_id = event.payload.get("agent_id")
        # From the request's own offset: no encounter published after the request can slip past.
        async with self.ctx.subscribe(ENCOUNTER_STARTED, ENCOUNTER_COMPLETED, since_offset=event.offset) as encounters:
            async for encounter in encounters:
                if agent_id is not None and encounter.payload.get("agent_id") != agent_id:
                    continue
                await stream.send({"phase": encounter.state, **encounter.payload})


# --- agent_state ------------------------------------------------------------------------------------------


class AgentStateQuery(EventHandler):
    """An agent's current state: last fix time and position, dwelling or not, the open encounter and place.

    Follows ``places:location:v1:updated`` and ``places:encounter:v1:completed`` on the bus (from the history it
    still holds), so it answers for agents placed on any node; before answering it waits until it has seen the
    bus up to the request (``sync_timeout_s``, 5), so a query sent after a fix's ``success`` sees that fix.
    Keeps at most ``max_agents`` agents.
    """

    event_type = "places:agent_state:v1"
    takes = specs.AGENT_STATE_TAKES
    config_keys = specs.CONFIG
    emits = specs.AGENT_STATE_EMITS

    def __init__(self) -> None:
        self.states = AgentStates()
        self.sync_timeout_s: float = specs.DEFAULTS["sync_timeout_s"]
        self._follower: Follower | None = None

    async def setup(self, ctx: HandlerContext) -> None:
        try:
            settings = PlacesSettings.from_config(ctx.config)
            self.sync_timeout_s = read_number(
                ctx.config, "sync_timeout_s", self.sync_timeout_s, plugin="places", minimum=0, strict=True
            )
        except ValueError as exc:
            raise ValueError(f"{ctx.name}: {exc}") from None
        self.states = AgentStates(settings.max_agents)
        self._follower = await ctx.follow(
            LOCATION_UPDATED, ENCOUNTER_COMPLETED, AGENT_STATE_REQUESTED, on_event=self._apply, since_offset=0
        )

    def _apply(self, event: Event) -> None:
        payload = event.payload
        agent_id = payload.get("agent_id")
        if not isinstance(agent_id, str):
            return
        if event.event_type == ENCOUNTER_COMPLETED:
            if payload.get("reason") in ("idle", "evicted") and isinstance(payload.get("encounter_id"), str):
                self.states.completed(agent_id, payload["encounter_id"])
            return
        if event.event_type != LOCATION_UPDATED:
            return
        try:
            fix_time = parse_time(payload.get("timestamp"))
            check_fix(payload.get("latitude"), payload.get("longitude"), fix_time)
        except (InvalidPayload, ValueError, OverflowError):
            return
        state = payload.get("state")
        encounter_id, place_id = payload.get("encounter_id"), payload.get("place_id")
        self.states.located(
            AgentState(
                agent_id=agent_id,
                last_fix_time=fix_time,
                latitude=float(payload["latitude"]),
                longitude=float(payload["longitude"]),
                state="dwelling" if state == "dwelling" else "moving",
                encounter_id=encounter_id if isinstance(encounter_id, str) else None,
                place_id=place_id if isinstance(place_id, str) else None,
            )
        )

    async def handle(self, event: Event) -> dict[str, Any]:
        agent_id = event.payload["agent_id"]
        if self._follower is not None:
            await self._follower.reached(event.offset, self.sync_timeout_s)
        known = self.states.get(agent_id)
        if known is None:
            return {"agent_id": agent_id, "known": False}
        return {
            "agent_id": agent_id,
            "known": True,
            "last_fix_time": rfc3339(known.last_fix_time),
            "latitude": known.latitude,
            "longitude": known.longitude,
            "state": known.state,
            "dwelling": known.dwelling,
            "encounter_id": known.encounter_id,
            "place_id": known.place_id,
        }
