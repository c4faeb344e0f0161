"""Known places: stays whose centroids fall within ``place_radius_m`` of a place share its ``place_id``. Pure.

A place is learned at the first encounter that is not within ``place_radius_m`` (default 50 m, haversine)
of a known place, at that encounter's centroid; it never moves afterwards, so its id is stable and two places
are never merged. An encounter near several known places gets the nearest. Revisits and the fragments of one
stay (a stay cut in two by a gap or by k fixes outside) therefore share a ``place_id``.

Lookup is a grid of cells at least ``place_radius_m`` wide (bands of latitude, each cut into longitude cells
wide enough at the band's edge nearest a pole, wrapping at the antimeridian), so only the 3 x 5 cells around
a point are searched, whatever the number of places.

Memory: at most ``max_places`` places (default 10,000). At the limit the place visited longest ago is
forgotten to make room (counted in :attr:`KnownPlaces.forgotten`); a later stay there learns a new id. Each
place is one :class:`Place` (id, position, discovery and last visit times, visit count).
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Final

from .geo import EARTH_RADIUS_M, haversine_m

_METRES_PER_DEGREE: Final = math.radians(EARTH_RADIUS_M)


@dataclasses.dataclass(slots=True)
class Place:
    """One known place."""

    place_id: str
    latitude: float
    longitude: float
    discovered_at: float
    """Epoch seconds of the first fix of the encounter that found it."""
    last_visit: float
    visits: int = 1


Cell = tuple[int, int]


class KnownPlaces:
    """The places of one deployment, bounded by ``max_places`` (least recently visited forgotten first)."""

    def __init__(
        self,
        place_radius_m: float = 50.0,
        max_places: int = 10_000,
        *,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        if not place_radius_m > 0:
            raise ValueError(f"place_radius_m must be more than 0, got {place_radius_m!r}")
        if max_places < 1:
            raise ValueError(f"max_places must be at least 1, got {max_places!r}")
        self.place_radius_m = place_radius_m
        self.max_places = max_places
        self._new_id = new_id
        self._places: OrderedDict[str, Place] = OrderedDict()  # least recently visited first
        self._cells: dict[Cell, list[str]] = {}
        self._band_deg = place_radius_m / _METRES_PER_DEGREE
        self.forgotten = 0
        """Places forgotten to make room for new ones."""
        self.discovered: list[Place] = []
        """Places learned by :meth:`visit` and not yet taken by the caller (who clears the list)."""
        self.dropped: list[Place] = []
        """Places forgotten to make room, not yet taken by the caller (who clears the list)."""

    def __len__(self) -> int:
        return len(self._places)

    def __iter__(self) -> Iterator[Place]:
        """The places, least recently visited first (the order to store them in)."""
        return iter(list(self._places.values()))

    def get(self, place_id: str) -> Place | None:
        return self._places.get(place_id)

    def nearest(self, latitude: float, longitude: float) -> Place | None:
        """The nearest known place within ``place_radius_m``, or None."""
        best: Place | None = None
        best_distance = math.inf
        for cell in self._neighbours(latitude, longitude):
            for place_id in self._cells.get(cell, ()):
                place = self._places[place_id]
                distance = haversine_m(place.latitude, place.longitude, latitude, longitude)
                if distance <= self.place_radius_m and distance < best_distance:
                    best, best_distance = place, distance
        return best

    def visit(self, latitude: float, longitude: float, time: float) -> tuple[Place, bool]:
        """The place of an encounter at ``(latitude, longitude)``: ``(place, True)`` when it is newly learned."""
        place = self.nearest(latitude, longitude)
        if place is not None:
            place.visits += 1
            place.last_visit = max(place.last_visit, time)
            self._places.move_to_end(place.place_id)
            return place, False
        place = Place(self._new_id(), latitude, longitude, time, time)
        self.learn(place)
        self.discovered.append(place)
        return place, True

    def learn(self, place: Place) -> bool:
        """Add a place found elsewhere (another node, storage) unless its id is known; False when it was."""
        if place.place_id in self._places:
            return False
        while len(self._places) >= self.max_places:
            _, oldest = self._places.popitem(last=False)
            self._cells[self._cell(oldest.latitude, oldest.longitude)].remove(oldest.place_id)
            self.forgotten += 1
            self.dropped.append(oldest)
        self._places[place.place_id] = place
        self._cells.setdefault(self._cell(place.latitude, place.longitude), []).append(place.place_id)
        return True

    # --- the grid -----------------------------------------------------------------------------------------

    def _band(self, latitude: float) -> int:
        return math.floor((latitude + 90.0) / self._band_deg)

    def _cells_in_band(self, band: int) -> int:
        """How many longitude cells band ``band`` has: each at least place_radius_m wide at its polar edge."""
        low = band * self._band_deg - 90.0
        polar_edge = max(abs(low), abs(low + self._band_deg))
        width_m = 360.0 * _METRES_PER_DEGREE * math.cos(math.radians(min(polar_edge, 90.0)))
        return max(1, math.floor(width_m / self.place_radius_m))

    def _column(self, band: int, longitude: float) -> int:
        count = self._cells_in_band(band)
        return math.floor((longitude + 180.0) / 360.0 * count) % count

    def _cell(self, latitude: float, longitude: float) -> Cell:
        band = self._band(latitude)
        return band, self._column(band, longitude)

    def _neighbours(self, latitude: float, longitude: float) -> set[Cell]:
        cells: set[Cell] = set()
        centre = self._band(latitude)
        for band in (centre - 1, centre, centre + 1):
            count = self._cells_in_band(band)
            column = self._column(band, longitude)
            cells.update((band, (column + step) % count) for step in (-2, -1, 0, 1, 2))
        return cells
