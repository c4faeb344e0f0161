"""The places plugin's declarations: what each handler takes and emits, with payload schemas and examples, and the
settings of its ``[handlers.places]`` section (:data:`CONFIG`)."""

from __future__ import annotations

from typing import Any, Final

from nexus import ConfigKey, EventSpec

from .staypoints import PlacesSettings

CONFIG: Final = (
    *ConfigKey.from_dataclass(PlacesSettings),
    ConfigKey("sync_timeout_s", float, 5.0, "The longest agent_state waits for this node to catch up with the bus."),
)
DEFAULTS: Final = {key.name: key.default for key in CONFIG}

ENCOUNTER_STARTED: Final = "places:encounter:v1:started"
ENCOUNTER_COMPLETED: Final = "places:encounter:v1:completed"
LOCATION_UPDATED: Final = "places:location:v1:updated"
PLACE_DISCOVERED: Final = "places:place:v1:discovered"
AGENT_STATE_REQUESTED: Final = "places:agent_state:v1:requested"

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

_CURRENT_PLACE = {
    "type": ["string", "null"],
    "description": "The place of the open encounter, or null while moving.",
}

_ENCOUNTER_FIELDS: dict[str, Any] = {
    "agent_id": {"type": "string", "description": "The agent."},
    "encounter_id": {"type": "string", "description": "Names the encounter; the same in started and completed."},
    "latitude": {"type": "number", "description": "Centroid of the dwell's fixes (at start: so far)."},
    "longitude": {"type": "number", "description": "Centroid of the dwell's fixes (at start: so far)."},
    "start_time": {"type": "string", "description": "Time of the dwell's first fix (RFC 3339)."},
    "place_id": {
        "type": "string",
        "description": "The known place the encounter is at: the same for every encounter whose centroid (at "
        "start) is within place_radius_m of the place.",
    },
}
_ENCOUNTER_REQUIRED = ["agent_id", "encounter_id", "latitude", "longitude", "start_time"]
_COMPLETED_REQUIRED = [*_ENCOUNTER_REQUIRED, "end_time", "duration_s", "point_count", "reason"]

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
    "place_id": "4b1e0c2d9a8f4e7b8c6d5a4f3e2d1c0b",
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
        "required": _ENCOUNTER_REQUIRED,
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
        "required": _COMPLETED_REQUIRED,
        "properties": _COMPLETED_FIELDS,
    },
    example=_COMPLETED_EXAMPLE,
)

TRACK_LOCATION_TAKES = EventSpec(
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

TRACK_LOCATION_EMITS = (
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
                "place_id": _CURRENT_PLACE,
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
            "place_id": "4b1e0c2d9a8f4e7b8c6d5a4f3e2d1c0b",
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
                "encounter_id": {
                    "type": ["string", "null"],
                    "description": "The open encounter after the fix, or null while moving.",
                },
                "place_id": _CURRENT_PLACE,
            },
        },
        example={
            "agent_id": "courier-7",
            "latitude": 48.856613,
            "longitude": 2.352222,
            "timestamp": "2025-03-01T08:00:00Z",
            "accuracy_m": 8.5,
            "state": "moving",
            "encounter_id": None,
            "place_id": None,
        },
    ),
    STARTED_SPEC,
    COMPLETED_SPEC,
    EventSpec(
        PLACE_DISCOVERED,
        "A new place was learned: an encounter started farther than place_radius_m from every known place. "
        "Later encounters within place_radius_m of it carry its place_id.",
        {
            "type": "object",
            "required": ["place_id", "latitude", "longitude", "discovered_at", "agent_id"],
            "properties": {
                "place_id": {"type": "string", "description": "Names the place from now on."},
                "latitude": {"type": "number", "description": "The place: the encounter's centroid at its start."},
                "longitude": {"type": "number", "description": "The place: the encounter's centroid at its start."},
                "discovered_at": {"type": "string", "description": "The encounter's first fix time (RFC 3339)."},
                "agent_id": {"type": "string", "description": "The agent whose encounter found it."},
            },
        },
        example={
            "place_id": "4b1e0c2d9a8f4e7b8c6d5a4f3e2d1c0b",
            "latitude": 48.856613,
            "longitude": 2.352222,
            "discovered_at": "2025-03-01T08:00:00Z",
            "agent_id": "courier-7",
        },
    ),
)

STREAM_ENCOUNTERS_TAKES = EventSpec(
    "places:stream_encounters:v1:requested",
    "Follow encounters live: those of one agent, or every agent's when agent_id is absent.",
    {
        "type": "object",
        "properties": {"agent_id": {**_AGENT_ID, "description": "Only this agent's encounters."}},
    },
    example={"agent_id": "courier-7"},
)

STREAM_ENCOUNTERS_EMITS = (
    EventSpec(
        "places:stream_encounters:v1:stream",
        "One encounter event: its phase and the payload of places:encounter:v1:started or completed.",
        {
            "type": "object",
            "required": ["phase", *_ENCOUNTER_REQUIRED],
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

AGENT_STATE_TAKES = EventSpec(
    AGENT_STATE_REQUESTED,
    "An agent's current state: its last accepted fix, whether it is dwelling, and where.",
    {"type": "object", "required": ["agent_id"], "properties": {"agent_id": _AGENT_ID}},
    example={"agent_id": "courier-7"},
)

AGENT_STATE_EMITS = (
    EventSpec(
        "places:agent_state:v1:success",
        "The agent's state as of every fix published before the request (from any node); known is false for "
        "an agent with no fix kept (never seen, or forgotten: max_agents).",
        {
            "type": "object",
            "required": ["agent_id", "known"],
            "properties": {
                "agent_id": {"type": "string", "description": "The agent."},
                "known": {"type": "boolean", "description": "False when no fix of the agent is kept."},
                "last_fix_time": {"type": "string", "description": "Time of its last accepted fix (RFC 3339)."},
                "latitude": {"type": "number", "description": "Its last accepted fix."},
                "longitude": {"type": "number", "description": "Its last accepted fix."},
                "state": {"enum": ["moving", "dwelling"], "description": "dwelling: inside an encounter."},
                "dwelling": {"type": "boolean", "description": "True while inside an encounter."},
                "encounter_id": {**_CURRENT_PLACE, "description": "The open encounter, or null while moving."},
                "place_id": _CURRENT_PLACE,
            },
        },
        example={
            "agent_id": "courier-7",
            "known": True,
            "last_fix_time": "2025-03-01T08:09:30Z",
            "latitude": 48.856613,
            "longitude": 2.352222,
            "state": "dwelling",
            "dwelling": True,
            "encounter_id": "9f2c4e0a6b1d4c3e8a7f5b2d1c0e9a8b",
            "place_id": "4b1e0c2d9a8f4e7b8c6d5a4f3e2d1c0b",
        },
    ),
)
