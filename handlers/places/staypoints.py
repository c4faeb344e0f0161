"""Stay-point detection on a stream of GPS fixes, per agent. Pure: no I/O, no asyncio; clocks are given.

The stay-point algorithm of Li et al. (2008) and Zheng (2009), run one fix at a time:

- A **dwell** is a run of fixes within ``dwell_radius_m`` (default 50 m) of the dwell's **anchor**, its first
  fix (the anchor-point rule of Li et al.; ``stay_rule = "centroid"`` measures from the running centroid
  instead), by the haversine formula. The first fix of a trace (or after a dwell ended) opens a candidate.
- Once the candidate has lasted ``min_dwell_s`` (default 120 s, first to last fix) **and** the speed of the
  least-squares straight line through its fixes is at most ``max_drift_mps`` (default 0.15 m/s) it becomes an
  **encounter**: :class:`EncounterStarted` is produced once, with the centroid at that moment. The drift check
  is what keeps a slow walk (0.4-0.5 m/s stays within 50 m of its start for two minutes) from being a stay;
  a real stay's fitted drift shrinks with every fix, so a noisy stay only starts a fix or a few later. The
  defaults were chosen by seeded walks at 0.4-1.4 m/s and stays with 5-15 m of GPS noise
  (``tests/test_places_staypoints.py``): no walk becomes an encounter, every stay is exactly one.
- The agent **leaves** when ``exit_points`` consecutive fixes (k, default 2) fall outside the radius. Fewer
  outside fixes followed by one inside are a GPS spike: they neither end the dwell nor become part of it.
  The fixes that left open the next candidate (they are placed again, in order).
- A **gap** of more than ``max_gap_s`` (default 600 s) between consecutive fixes ends the dwell too.
- An encounter that ends produces :class:`EncounterCompleted`: the centroid of all the dwell's fixes,
  its first and last fix times, ``duration_s`` from the first to the last fix, and ``point_count``.
- Fixes earlier than the agent's previous fix, or with ``accuracy_m`` above ``max_accuracy_m`` (default
  100 m), are dropped and counted; they never change the dwell.

The centroid is the normalised mean of the fixes as unit vectors (exact at the poles and across the
antimeridian; at dwell scale it equals the mean of latitudes and longitudes to well under a millimetre).

Memory: :class:`StayPointTracker` keeps at most ``max_agents`` agents (least recently seen evicted first)
and forgets an agent idle for ``idle_ttl_s`` of wall-clock time; an evicted agent's open encounter is
completed (``reason`` ``"evicted"`` or ``"idle"``). Per agent it holds a fixed-size record (anchor, running
centroid sums, drift-fit sums, first/last times, counters, the open encounter's id) plus at most
``exit_points - 1`` pending fixes: about 0.98 KB per agent with the defaults, its id included (measured with
tracemalloc; a test keeps it under 1 KB), so the default 100,000 agents take at most about 98 MB.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

from nexus import read_int, read_number

from .geo import haversine_m, local_m
from .known import KnownPlaces, Place

MOVING: Final = "moving"
DWELLING: Final = "dwelling"
OUT_OF_ORDER: Final = "out_of_order"
POOR_ACCURACY: Final = "poor_accuracy"

ANCHOR: Final = "anchor"
CENTROID: Final = "centroid"
STAY_RULES: Final = (ANCHOR, CENTROID)

EndReason = Literal["left", "gap", "idle", "evicted"]


# --- settings ---------------------------------------------------------------------------------------------

_PLUGIN: Final = "places"


def _read_choice(config: Mapping[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = config.get(key, default)
    if value not in choices:
        raise ValueError(f"{_PLUGIN} setting {key!r} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


@dataclasses.dataclass(frozen=True)
class PlacesSettings:
    """The plugin's settings (``[handlers.places]`` in the config file); every default is the issue's."""

    dwell_radius_m: float = 50.0
    """Fixes within this distance of the dwell's anchor (its first fix) belong to the dwell."""
    stay_rule: str = ANCHOR
    """What a fix is measured from: ``"anchor"``, the dwell's first fix (a walk cannot stay within the radius
    of where it began), or ``"centroid"``, the running centroid of the dwell's fixes (which follows a slow walker)."""
    min_dwell_s: float = 120.0
    """How long a dwell must last (first to last fix) to become an encounter."""
    max_drift_mps: float = 0.15
    """A dwell becomes an encounter only while the least-squares speed through its fixes is at most this;
    0 turns the check off."""
    exit_points: int = 2
    """Consecutive fixes outside the radius that end a dwell (k); fewer are a spike."""
    max_gap_s: float = 600.0
    """A longer silence between two fixes ends the dwell."""
    max_accuracy_m: float = 100.0
    """Fixes reporting a worse ``accuracy_m`` are dropped."""
    max_agents: int = 100_000
    """Agents kept at once; the least recently seen is evicted first."""
    idle_ttl_s: float = 3600.0
    """Wall-clock seconds after which an agent that sent nothing is forgotten; 0 keeps agents until evicted."""
    sweep_interval_s: float = 60.0
    """How often the plugin looks for idle agents."""
    place_radius_m: float = 50.0
    """An encounter whose centroid is within this distance of a known place is at that place."""
    max_places: int = 10_000
    """Known places kept at once; the one visited longest ago is forgotten first."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PlacesSettings:
        """Read the settings from a ``ctx.config`` mapping; raises ValueError naming a bad key."""
        return cls(
            dwell_radius_m=read_number(
                config, "dwell_radius_m", cls.dwell_radius_m, plugin=_PLUGIN, minimum=0, strict=True
            ),
            stay_rule=_read_choice(config, "stay_rule", cls.stay_rule, STAY_RULES),
            min_dwell_s=read_number(config, "min_dwell_s", cls.min_dwell_s, plugin=_PLUGIN, minimum=0),
            max_drift_mps=read_number(config, "max_drift_mps", cls.max_drift_mps, plugin=_PLUGIN, minimum=0),
            exit_points=read_int(config, "exit_points", cls.exit_points, plugin=_PLUGIN, minimum=1),
            max_gap_s=read_number(config, "max_gap_s", cls.max_gap_s, plugin=_PLUGIN, minimum=0, strict=True),
            max_accuracy_m=read_number(
                config, "max_accuracy_m", cls.max_accuracy_m, plugin=_PLUGIN, minimum=0, strict=True
            ),
            max_agents=read_int(config, "max_agents", cls.max_agents, plugin=_PLUGIN, minimum=1),
            idle_ttl_s=read_number(config, "idle_ttl_s", cls.idle_ttl_s, plugin=_PLUGIN, minimum=0),
            sweep_interval_s=read_number(
                config, "sweep_interval_s", cls.sweep_interval_s, plugin=_PLUGIN, minimum=0, strict=True
            ),
            place_radius_m=read_number(
                config, "place_radius_m", cls.place_radius_m, plugin=_PLUGIN, minimum=0, strict=True
            ),
            max_places=read_int(config, "max_places", cls.max_places, plugin=_PLUGIN, minimum=1),
        )


# --- results ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class EncounterStarted:
    """A dwell has lasted ``min_dwell_s``: the agent is at a place."""

    agent_id: str
    encounter_id: str
    latitude: float
    longitude: float
    start_time: float
    place_id: str | None = None
    """The known place the encounter is at (None without known places)."""


@dataclasses.dataclass(frozen=True, slots=True)
class EncounterCompleted:
    """An encounter ended: where (centroid of its fixes), when, and why."""

    agent_id: str
    encounter_id: str
    latitude: float
    longitude: float
    start_time: float
    end_time: float
    duration_s: float
    point_count: int
    reason: EndReason
    place_id: str | None = None


Encounter = EncounterStarted | EncounterCompleted


@dataclasses.dataclass(frozen=True, slots=True)
class TrackResult:
    """What one fix did to its agent."""

    agent_id: str
    state: str
    """``"moving"`` or ``"dwelling"`` (inside an encounter) after the fix."""
    accepted: bool
    dropped: str | None
    """Why the fix was dropped (``"out_of_order"``, ``"poor_accuracy"``), or None."""
    encounter_id: str | None
    """The open encounter, when dwelling."""
    encounters: tuple[Encounter, ...]
    """Encounter events of this agent caused by the fix, in order."""
    evicted: tuple[EncounterCompleted, ...]
    """Encounters of other agents completed because they were evicted to make room."""
    dropped_out_of_order: int
    dropped_poor_accuracy: int
    place_id: str | None = None
    """The open encounter's place, when dwelling."""
    discovered: tuple[Place, ...] = ()
    """Places learned because of the fix."""


# --- one agent --------------------------------------------------------------------------------------------


class _Centroid:
    """Running mean of points as unit vectors."""

    __slots__ = ("count", "x", "y", "z")

    def __init__(self) -> None:
        self.x = 0.0
        self.y = 0.0
        self.z = 0.0
        self.count = 0

    def add(self, latitude: float, longitude: float) -> None:
        phi = math.radians(latitude)
        lam = math.radians(longitude)
        self.x += math.cos(phi) * math.cos(lam)
        self.y += math.cos(phi) * math.sin(lam)
        self.z += math.sin(phi)
        self.count += 1

    def position(self) -> tuple[float, float]:
        """``(latitude, longitude)`` in degrees of the mean direction."""
        hyp = math.hypot(self.x, self.y)
        latitude = math.degrees(math.atan2(self.z, hyp))
        longitude = math.degrees(math.atan2(self.y, self.x)) if hyp > 0 else 0.0
        return latitude, longitude


@dataclasses.dataclass(frozen=True, slots=True)
class _Fix:
    latitude: float
    longitude: float
    time: float


class _Dwell:
    """One candidate dwell: its anchor, running centroid, times, and the sums of a least-squares drift fit."""

    __slots__ = (
        "anchor_lat",
        "anchor_lon",
        "centroid",
        "encounter_id",
        "first_time",
        "last_time",
        "latitude",
        "longitude",
        "place_id",
        "st",
        "stt",
        "stx",
        "sty",
    )

    def __init__(self, fix: _Fix) -> None:
        self.anchor_lat = fix.latitude
        self.anchor_lon = fix.longitude
        self.centroid = _Centroid()
        self.first_time = fix.time
        self.last_time = fix.time
        self.encounter_id: str | None = None
        self.place_id: str | None = None
        self.latitude = fix.latitude
        self.longitude = fix.longitude
        self.st = self.stt = self.stx = self.sty = 0.0
        self.add(fix)

    def add(self, fix: _Fix) -> None:
        self.centroid.add(fix.latitude, fix.longitude)
        self.latitude, self.longitude = self.centroid.position()
        self.last_time = fix.time
        north, east = local_m(self.anchor_lat, self.anchor_lon, fix.latitude, fix.longitude)
        t = fix.time - self.first_time
        self.st += t
        self.stt += t * t
        self.stx += t * east
        self.sty += t * north

    def drift_mps(self) -> float:
        """The speed of the least-squares straight-line motion through the dwell's fixes (0 for one instant)."""
        n = self.centroid.count
        spread = self.stt - self.st * self.st / n
        if spread <= 0:
            return 0.0
        # The mean position is the centroid's (the same to well under a millimetre at dwell scale).
        north, east = local_m(self.anchor_lat, self.anchor_lon, self.latitude, self.longitude)
        return math.hypot(self.stx - self.st * east, self.sty - self.st * north) / spread


class StayPointDetector:
    """Stay-point detection for one agent; feed it fixes in time order with :meth:`add`."""

    __slots__ = (
        "_dwell",
        "_new_id",
        "_pending",
        "_places",
        "agent_id",
        "dropped_out_of_order",
        "dropped_poor_accuracy",
        "last_time",
        "settings",
    )

    def __init__(
        self,
        agent_id: str,
        settings: PlacesSettings,
        *,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
        places: KnownPlaces | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.settings = settings
        self._new_id = new_id
        self._places = places
        self._dwell: _Dwell | None = None
        self._pending: list[_Fix] = []
        self.last_time: float | None = None
        self.dropped_out_of_order = 0
        self.dropped_poor_accuracy = 0

    @property
    def state(self) -> str:
        """``"dwelling"`` while an encounter is open, else ``"moving"``."""
        return DWELLING if self._dwell is not None and self._dwell.encounter_id is not None else MOVING

    @property
    def encounter_id(self) -> str | None:
        """The open encounter's id, or None."""
        return self._dwell.encounter_id if self._dwell is not None else None

    @property
    def place_id(self) -> str | None:
        """The open encounter's place, or None."""
        return self._dwell.place_id if self._dwell is not None else None

    def add(
        self, latitude: float, longitude: float, time: float, accuracy_m: float | None = None
    ) -> tuple[str | None, list[Encounter]]:
        """Place one fix; returns ``(why it was dropped or None, encounter events)``.

        Inputs must be checked already (finite, in range): see :meth:`StayPointTracker.track`.
        """
        if accuracy_m is not None and accuracy_m > self.settings.max_accuracy_m:
            self.dropped_poor_accuracy += 1
            return POOR_ACCURACY, []
        if self.last_time is not None and time < self.last_time:
            self.dropped_out_of_order += 1
            return OUT_OF_ORDER, []
        events: list[Encounter] = []
        if self.last_time is not None and time - self.last_time > self.settings.max_gap_s:
            ended = self._end("gap")
            if ended is not None:
                events.append(ended)
        self.last_time = time
        events.extend(self._place(_Fix(latitude, longitude, time)))
        return None, events

    def close(self, reason: EndReason) -> EncounterCompleted | None:
        """End the current dwell (the agent is being forgotten); the completed encounter if one was open."""
        return self._end(reason)

    def _place(self, fix: _Fix) -> list[Encounter]:
        dwell = self._dwell
        if dwell is None:
            self._dwell = _Dwell(fix)
            return self._maybe_start()
        if self.settings.stay_rule == ANCHOR:
            distance = haversine_m(dwell.anchor_lat, dwell.anchor_lon, fix.latitude, fix.longitude)
        else:
            distance = haversine_m(dwell.latitude, dwell.longitude, fix.latitude, fix.longitude)
        if distance <= self.settings.dwell_radius_m:
            self._pending.clear()  # a spike that did not end the dwell is not part of it
            dwell.add(fix)
            return self._maybe_start()
        self._pending.append(fix)
        if len(self._pending) < self.settings.exit_points:
            return []
        left, self._pending = self._pending, []
        ended = self._end("left")
        events: list[Encounter] = [ended] if ended is not None else []
        for pending in left:  # the fixes that left open the next candidate
            events.extend(self._place(pending))
        return events

    def _maybe_start(self) -> list[Encounter]:
        dwell = self._dwell
        assert dwell is not None
        if dwell.encounter_id is not None or dwell.last_time - dwell.first_time < self.settings.min_dwell_s:
            return []
        if self.settings.max_drift_mps > 0 and dwell.drift_mps() > self.settings.max_drift_mps:
            return []  # a steady slow walk, not a stay (yet): a real stay's fitted drift falls with every fix
        dwell.encounter_id = self._new_id()
        if self._places is not None:
            dwell.place_id = self._places.visit(dwell.latitude, dwell.longitude, dwell.first_time)[0].place_id
        return [
            EncounterStarted(
                self.agent_id, dwell.encounter_id, dwell.latitude, dwell.longitude, dwell.first_time, dwell.place_id
            )
        ]

    def _end(self, reason: EndReason) -> EncounterCompleted | None:
        dwell, self._dwell = self._dwell, None
        self._pending = []
        if dwell is None or dwell.encounter_id is None:
            return None
        return EncounterCompleted(
            agent_id=self.agent_id,
            encounter_id=dwell.encounter_id,
            latitude=dwell.latitude,
            longitude=dwell.longitude,
            start_time=dwell.first_time,
            end_time=dwell.last_time,
            duration_s=dwell.last_time - dwell.first_time,
            point_count=dwell.centroid.count,
            reason=reason,
            place_id=dwell.place_id,
        )


# --- every agent ------------------------------------------------------------------------------------------


def check_fix(latitude: Any, longitude: Any, time: Any, accuracy_m: Any = None) -> None:
    """Raise ValueError with a clear message for a fix that cannot be placed (NaN, out of range, ...)."""
    for name, value, low, high in (("latitude", latitude, -90.0, 90.0), ("longitude", longitude, -180.0, 180.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number of degrees, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be from {low:g} to {high:g} degrees, got {value!r}")
    if isinstance(time, bool) or not isinstance(time, (int, float)) or not math.isfinite(time):
        raise ValueError(f"timestamp must be finite epoch seconds, got {time!r}")
    if accuracy_m is not None and (
        isinstance(accuracy_m, bool)
        or not isinstance(accuracy_m, (int, float))
        or not math.isfinite(accuracy_m)
        or accuracy_m < 0
    ):
        raise ValueError(f"accuracy_m must be a finite number of metres, 0 or more, got {accuracy_m!r}")


class _Agent:
    __slots__ = ("detector", "last_seen")

    def __init__(self, detector: StayPointDetector, last_seen: float) -> None:
        self.detector = detector
        self.last_seen = last_seen


class StayPointTracker:
    """A :class:`StayPointDetector` per agent, bounded by count (LRU) and idle time (TTL)."""

    def __init__(
        self, settings: PlacesSettings | None = None, *, new_id: Callable[[], str] = lambda: uuid.uuid4().hex
    ) -> None:
        self.settings = settings or PlacesSettings()
        self._new_id = new_id
        self._agents: OrderedDict[str, _Agent] = OrderedDict()
        self.places = KnownPlaces(self.settings.place_radius_m, self.settings.max_places, new_id=new_id)
        """The deployment's known places, shared by every agent."""

    def __len__(self) -> int:
        return len(self._agents)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    def track(
        self,
        agent_id: str,
        latitude: float,
        longitude: float,
        time: float,
        accuracy_m: float | None = None,
        *,
        now: float,
    ) -> TrackResult:
        """Place one fix of ``agent_id`` (``time`` in epoch seconds, ``now`` a monotonic wall clock).

        Raises ValueError, changing nothing, for a fix that cannot be placed.
        """
        if not isinstance(agent_id, str) or not agent_id:
            raise ValueError(f"agent_id must be a non-empty string, got {agent_id!r}")
        check_fix(latitude, longitude, time, accuracy_m)
        evicted: list[EncounterCompleted] = []
        agent = self._agents.get(agent_id)
        if agent is None:
            while len(self._agents) >= self.settings.max_agents:
                _, oldest = self._agents.popitem(last=False)
                completed = oldest.detector.close("evicted")
                if completed is not None:
                    evicted.append(completed)
            detector = StayPointDetector(agent_id, self.settings, new_id=self._new_id, places=self.places)
            agent = _Agent(detector, now)
            self._agents[agent_id] = agent
        else:
            self._agents.move_to_end(agent_id)
            agent.last_seen = now
        detector = agent.detector
        learned = len(self.places.discovered)
        dropped, encounters = detector.add(float(latitude), float(longitude), float(time), accuracy_m)
        discovered = tuple(self.places.discovered[learned:])
        del self.places.discovered[learned:]
        return TrackResult(
            agent_id=agent_id,
            state=detector.state,
            accepted=dropped is None,
            dropped=dropped,
            encounter_id=detector.encounter_id,
            encounters=tuple(encounters),
            evicted=tuple(evicted),
            dropped_out_of_order=detector.dropped_out_of_order,
            dropped_poor_accuracy=detector.dropped_poor_accuracy,
            place_id=detector.place_id,
            discovered=discovered,
        )

    def expire(self, now: float) -> list[EncounterCompleted]:
        """Forget agents idle for more than ``idle_ttl_s``; their open encounters, completed."""
        ttl = self.settings.idle_ttl_s
        completed: list[EncounterCompleted] = []
        if ttl <= 0:
            return completed
        while self._agents:
            agent_id, agent = next(iter(self._agents.items()))
            if now - agent.last_seen <= ttl:
                break
            del self._agents[agent_id]
            ended = agent.detector.close("idle")
            if ended is not None:
                completed.append(ended)
        return completed

    def state_of(self, agent_id: str) -> str | None:
        """The agent's state, or None for an agent not tracked."""
        agent = self._agents.get(agent_id)
        return agent.detector.state if agent is not None else None
