"""The places handlers: ``places:track_location`` and ``places:stream_encounters``.

Settings (``[handlers.places]``, see :class:`.staypoints.PlacesSettings`): ``dwell_radius_m`` (50),
``min_dwell_s`` (120), ``exit_points`` (2), ``max_gap_s`` (600), ``max_accuracy_m`` (100), ``max_agents``
(100000), ``idle_ttl_s`` (3600), ``sweep_interval_s`` (60).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

from nexus import (
    Event,
    EventHandler,
    EventSpec,
    HandlerContext,
    InvalidPayload,
    Stream,
    StreamingEventHandler,
    parse_time,
)

from .staypoints import Encounter, EncounterCompleted, EncounterStarted, PlacesSettings, StayPointTracker

ENCOUNTER_STARTED = "places:encounter:v1:started"
ENCOUNTER_COMPLETED = "places:encounter:v1:completed"
LOCATION_UPDATED = "places:location:v1:updated"


def rfc3339(seconds: float) -> str:
    """Epoch seconds as RFC 3339 UTC text (``2025-01-01T08:00:00Z``; milliseconds when not whole)."""
    moment = datetime.fromtimestamp(seconds, UTC)
    text = moment.isoformat(timespec="seconds" if float(seconds).is_integer() else "milliseconds")
    return text.replace("+00:00", "Z")


# --- schemas ----------------------------------------------------------------------------------------------

_AGENT_ID = {"type": "string", "minLength": 1, "maxLength": 256, "description": "Who moves: any stable id."}
_TIME = {
    "type": ["string", "number"],
    "description": "When the fix was taken: RFC 3339 text or epoch seconds.",
}
_LATITUDE = {"type": "number", "minimum": -90, "maximum": 90, "description": "Degrees north, -90 to 90 (WGS 84)."}
_LONGITUDE = {
    "type": "number",
    "minimum": -180,
    "maximum": 180,
    "description": "Degrees east, -180 to 180 (WGS 84).",
}

_ENCOUNTER_FIELDS: dict[str, Any] = {
    "agent_id": {"type": "string", "description": "The agent."},
    "encounter_id": {"type": "string", "description": "Names the encounter; the same in started and completed."},
    "latitude": {"type": "number", "description": "Centroid of the dwell's fixes (at start: so far)."},
    "longitude": {"type": "number", "description": "Centroid of the dwell's fixes (at start: so far)."},
    "start_time": {"type": "string", "description": "Time of the dwell's first fix (RFC 3339)."},
}
_COMPLETED_FIELDS: dict[str, Any] = {
    **_ENCOUNTER_FIELDS,
    "end_time": {"type": "string", "description": "Time of the dwell's last fix (RFC 3339)."},
    "duration_s": {"type": "number", "minimum": 0, "description": "From the first to the last fix, in seconds."},
    "point_count": {"type": "integer", "minimum": 1, "description": "Fixes in the dwell (spikes not counted)."},
    "reason": {
        "enum": ["left", "gap", "idle", "evicted"],
        "description": "left: k consecutive fixes outside the radius; gap: more than max_gap_s without a fix; "
        "idle / evicted: the agent was forgotten (idle_ttl_s, max_agents).",
    },
}
_STARTED_EXAMPLE = {
    "agent_id": "courier-7",
    "encounter_id": "9f2c4e0a6b1d4c3e8a7f5b2d1c0e9a8b",
    "latitude": 48.856613,
    "longitude": 2.352222,
    "start_time": "2025-03-01T08:00:00Z",
}
_COMPLETED_EXAMPLE = {
    **_STARTED_EXAMPLE,
    "end_time": "2025-03-01T08:09:30Z",
    "duration_s": 570.0,
    "point_count": 20,
    "reason": "left",
}

STARTED_SPEC = EventSpec(
    ENCOUNTER_STARTED,
    "An agent has stayed within dwell_radius_m of one place for min_dwell_s: published once per dwell.",
    {
        "type": "object",
        "required": list(_ENCOUNTER_FIELDS),
        "properties": _ENCOUNTER_FIELDS,
    },
    example=_STARTED_EXAMPLE,
)
COMPLETED_SPEC = EventSpec(
    ENCOUNTER_COMPLETED,
    "An encounter ended: the agent left (k consecutive fixes outside), the trace had a gap over max_gap_s, "
    "or the agent was forgotten. Latitude and longitude are the centroid of all the dwell's fixes.",
    {
        "type": "object",
        "required": list(_COMPLETED_FIELDS),
        "properties": _COMPLETED_FIELDS,
    },
    example=_COMPLETED_EXAMPLE,
)


def _encounter_payload(encounter: Encounter) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "agent_id": encounter.agent_id,
        "encounter_id": encounter.encounter_id,
        "latitude": encounter.latitude,
        "longitude": encounter.longitude,
        "start_time": rfc3339(encounter.start_time),
    }
    if isinstance(encounter, EncounterCompleted):
        payload.update(
            end_time=rfc3339(encounter.end_time),
            duration_s=encounter.duration_s,
            point_count=encounter.point_count,
            reason=encounter.reason,
        )
    return payload


def _event_type(encounter: Encounter) -> str:
    return ENCOUNTER_STARTED if isinstance(encounter, EncounterStarted) else ENCOUNTER_COMPLETED


# --- track_location ---------------------------------------------------------------------------------------


class TrackLocation(EventHandler):
    """One GPS fix of an agent in, the agent's state out; stay-point detection per agent.

    Encounters are published as ``places:encounter:v1:started`` / ``completed`` side events and every
    accepted fix as ``places:location:v1:updated``. Fixes out of time order or with poor accuracy are dropped
    and counted. Settings: dwell_radius_m, min_dwell_s, exit_points, max_gap_s, max_accuracy_m, max_agents,
    idle_ttl_s, sweep_interval_s (``[handlers.places]``).
    """

    event_type = "places:track_location:v1"
    ordering_key = "agent_id"
    takes = EventSpec(
        "places:track_location:v1:requested",
        "One GPS fix of an agent. Fixes of one agent are placed in the order they were published.",
        {
            "type": "object",
            "required": ["agent_id", "latitude", "longitude", "timestamp"],
            "properties": {
                "agent_id": _AGENT_ID,
                "latitude": _LATITUDE,
                "longitude": _LONGITUDE,
                "timestamp": _TIME,
                "accuracy_m": {
                    "type": "number",
                    "minimum": 0,
                    "description": "Horizontal accuracy in metres; fixes worse than max_accuracy_m (100) are dropped.",
                },
            },
        },
        example={
            "agent_id": "courier-7",
            "latitude": 48.856613,
            "longitude": 2.352222,
            "timestamp": "2025-03-01T08:00:00Z",
            "accuracy_m": 8.5,
        },
    )
    emits = (
        EventSpec(
            "places:track_location:v1:success",
            "The agent's state after the fix, and whether the fix was used.",
            {
                "type": "object",
                "required": ["agent_id", "state", "accepted"],
                "properties": {
                    "agent_id": {"type": "string", "description": "The agent."},
                    "state": {"enum": ["moving", "dwelling"], "description": "dwelling: inside an encounter."},
                    "accepted": {"type": "boolean", "description": "False when the fix was dropped."},
                    "dropped": {
                        "enum": ["out_of_order", "poor_accuracy"],
                        "description": "Why the fix was dropped (only when it was).",
                    },
                    "encounter_id": {
                        "type": ["string", "null"],
                        "description": "The open encounter, or null while moving.",
                    },
                    "dropped_out_of_order": {
                        "type": "integer",
                        "description": "Fixes of this agent dropped for being earlier than the previous one.",
                    },
                    "dropped_poor_accuracy": {
                        "type": "integer",
                        "description": "Fixes of this agent dropped for accuracy_m over max_accuracy_m.",
                    },
                },
            },
            example={
                "agent_id": "courier-7",
                "state": "dwelling",
                "accepted": True,
                "encounter_id": "9f2c4e0a6b1d4c3e8a7f5b2d1c0e9a8b",
                "dropped_out_of_order": 0,
                "dropped_poor_accuracy": 1,
            },
        ),
        EventSpec(
            LOCATION_UPDATED,
            "Every accepted fix, so a map can follow the agent.",
            {
                "type": "object",
                "required": ["agent_id", "latitude", "longitude", "timestamp", "state"],
                "properties": {
                    "agent_id": {"type": "string", "description": "The agent."},
                    "latitude": {"type": "number", "description": "The fix's latitude."},
                    "longitude": {"type": "number", "description": "The fix's longitude."},
                    "timestamp": {"type": "string", "description": "The fix's time (RFC 3339)."},
                    "accuracy_m": {"type": "number", "description": "The fix's accuracy, when given."},
                    "state": {"enum": ["moving", "dwelling"], "description": "The agent's state after the fix."},
                },
            },
            example={
                "agent_id": "courier-7",
                "latitude": 48.856613,
                "longitude": 2.352222,
                "timestamp": "2025-03-01T08:00:00Z",
                "accuracy_m": 8.5,
                "state": "moving",
            },
        ),
        STARTED_SPEC,
        COMPLETED_SPEC,
    )

    def __init__(self) -> None:
        self.settings = PlacesSettings()
        self.tracker = StayPointTracker(self.settings)
        self._sweeper: asyncio.Task[None] | None = None

    async def setup(self, ctx: HandlerContext) -> None:
        try:
            self.settings = PlacesSettings.from_config(ctx.config)
        except ValueError as exc:
            raise ValueError(f"{ctx.name}: {exc}") from None
        self.tracker = StayPointTracker(self.settings)
        self._sweeper = asyncio.create_task(self._sweep_idle(), name=f"{ctx.name}-idle-sweep")

    async def teardown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

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
            }
            if accuracy is not None:
                location["accuracy_m"] = accuracy
            await self.ctx.publish(LOCATION_UPDATED, location)
        for encounter in result.encounters:
            await self.ctx.publish(_event_type(encounter), _encounter_payload(encounter))
        reply: dict[str, Any] = {
            "agent_id": agent_id,
            "state": result.state,
            "accepted": result.accepted,
            "encounter_id": result.encounter_id,
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
    takes = EventSpec(
        "places:stream_encounters:v1:requested",
        "Follow encounters live: those of one agent, or every agent's when agent_id is absent.",
        {
            "type": "object",
            "properties": {"agent_id": {**_AGENT_ID, "description": "Only this agent's encounters."}},
        },
        example={"agent_id": "courier-7"},
    )
    emits = (
        EventSpec(
            "places:stream_encounters:v1:stream",
            "One encounter event: its phase and the payload of places:encounter:v1:started or completed.",
            {
                "type": "object",
                "required": ["phase", *_ENCOUNTER_FIELDS],
                "properties": {
                    "phase": {"enum": ["started", "completed"], "description": "Which encounter event this is."},
                    **_COMPLETED_FIELDS,
                    "end_time": {**_COMPLETED_FIELDS["end_time"], "description": "completed only: last fix time."},
                    "duration_s": {**_COMPLETED_FIELDS["duration_s"], "description": "completed only."},
                    "point_count": {**_COMPLETED_FIELDS["point_count"], "description": "completed only."},
                    "reason": {**_COMPLETED_FIELDS["reason"], "description": "completed only: why it ended."},
                },
            },
            example={"phase": "completed", **_COMPLETED_EXAMPLE},
        ),
    )

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        agent_id = event.payload.get("agent_id")
        # From the request's own offset: no encounter published after the request can slip past.
        async with self.ctx.subscribe(ENCOUNTER_STARTED, ENCOUNTER_COMPLETED, since_offset=event.offset) as encounters:
            async for encounter in encounters:
                if agent_id is not None and encounter.payload.get("agent_id") != agent_id:
                    continue
                await stream.send({"phase": encounter.state, **encounter.payload})
