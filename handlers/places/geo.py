"""Distances on the Earth for the places plugin. Pure."""

from __future__ import annotations

import math
from typing import Final

EARTH_RADIUS_M: Final = 6_371_008.8
"""Mean Earth radius (IUGG), in metres."""


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres between two points given in degrees (haversine formula)."""
    phi1 = math.radians(lat1)
    phi2 = math.radians(lat2)
    d_phi = phi2 - phi1
    d_lambda = math.radians(lon2 - lon1)
    a = math.sin(d_phi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(d_lambda / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def local_m(lat0: float, lon0: float, latitude: float, longitude: float) -> tuple[float, float]:
    """``(north, east)`` metres of a point from ``(lat0, lon0)`` on the local tangent plane (equirectangular;
    exact to well under a centimetre at dwell scale, and right across the antimeridian)."""
    d_lon = (longitude - lon0 + 180.0) % 360.0 - 180.0
    metres = math.radians(EARTH_RADIUS_M)
    return (latitude - lat0) * metres, d_lon * metres * math.cos(math.radians(lat0))
