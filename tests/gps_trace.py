"""A synthetic GPS trace with two known stops 1 km apart and a spike, and the encounters it must give.

The expected values are worked out here from the trace itself (plain means of the stop fixes, first and last
fix times), independently of the stay-point code.
"""

from __future__ import annotations

import dataclasses
import math
import random

T0 = 1_700_000_000.0
"""2023-11-14T22:13:20Z."""
STOP_A = (48.8566, 2.3522)
METRES_PER_DEGREE = 6_371_008.8 * math.pi / 180.0


def offset(origin: tuple[float, float], north_m: float, east_m: float) -> tuple[float, float]:
    """A point ``north_m`` / ``east_m`` metres from ``origin`` (local flat-earth approximation)."""
    lat, lon = origin
    return (
        lat + north_m / METRES_PER_DEGREE,
        lon + east_m / (METRES_PER_DEGREE * math.cos(math.radians(lat))),
    )


STOP_B = offset(STOP_A, 0.0, 1000.0)


@dataclasses.dataclass(frozen=True)
class Fix:
    latitude: float
    longitude: float
    time: float


@dataclasses.dataclass(frozen=True)
class ExpectedEncounter:
    latitude: float
    longitude: float
    start_time: float
    end_time: float
    point_count: int

    @property
    def duration_s(self) -> float:
        return self.end_time - self.start_time


def _jittered(rng: random.Random, centre: tuple[float, float], radius_m: float) -> tuple[float, float]:
    angle = rng.uniform(0, 2 * math.pi)
    distance = radius_m * math.sqrt(rng.random())
    return offset(centre, distance * math.sin(angle), distance * math.cos(angle))


def two_stops_trace(seed: int = 7) -> tuple[list[Fix], list[ExpectedEncounter]]:
    """Stop A for 10 minutes, a 1 km walk east, stop B for 8 minutes with one 400 m spike, then away north.

    Fixes every 30 s; stop fixes jitter up to 15 m around the stop; walking fixes are 100 m apart and at
    least 150 m from either stop.
    """
    rng = random.Random(seed)
    fixes: list[Fix] = []
    stop_a = [Fix(*_jittered(rng, STOP_A, 15.0), T0 + 30.0 * i) for i in range(21)]  # t = 0 .. 600
    fixes += stop_a
    for i, east in enumerate(range(150, 851, 100)):  # 8 walking fixes, t = 630 .. 840
        fixes.append(Fix(*offset(STOP_A, 0.0, float(east)), T0 + 630.0 + 30.0 * i))
    stop_b = [Fix(*_jittered(rng, STOP_B, 15.0), T0 + 870.0 + 30.0 * i) for i in range(17)]  # t = 870 .. 1350
    spike = Fix(*offset(STOP_B, 400.0, 0.0), T0 + 1115.0)
    fixes += [f for f in stop_b if f.time < spike.time] + [spike] + [f for f in stop_b if f.time > spike.time]
    for i, north in enumerate((200.0, 400.0, 600.0)):  # leaving: t = 1380, 1410, 1440
        fixes.append(Fix(*offset(STOP_B, north, 0.0), T0 + 1380.0 + 30.0 * i))
    expected = [
        ExpectedEncounter(
            latitude=sum(f.latitude for f in stop) / len(stop),
            longitude=sum(f.longitude for f in stop) / len(stop),
            start_time=stop[0].time,
            end_time=stop[-1].time,
            point_count=len(stop),
        )
        for stop in (stop_a, stop_b)
    ]
    return fixes, expected


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """The test's own haversine, for checking distances between results."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6_371_008.8 * math.asin(math.sqrt(a))


def _noisy(rng: random.Random, point: tuple[float, float], noise_m: float) -> tuple[float, float]:
    """``point`` with Gaussian GPS noise of ``noise_m`` metres horizontal RMS (``noise_m / sqrt(2)`` per axis)."""
    sigma = noise_m / math.sqrt(2)
    return offset(point, rng.gauss(0.0, sigma), rng.gauss(0.0, sigma))


def straight_walk(
    seed: int, speed_mps: float, noise_m: float, *, every_s: float = 10.0, duration_s: float = 600.0
) -> list[Fix]:
    """A walk from STOP_A in a random straight direction at ``speed_mps``, one noisy fix every ``every_s``."""
    rng = random.Random(seed)
    heading = rng.uniform(0.0, 2 * math.pi)
    fixes = []
    for i in range(int(duration_s // every_s) + 1):
        travelled = speed_mps * every_s * i
        where = offset(STOP_A, travelled * math.sin(heading), travelled * math.cos(heading))
        fixes.append(Fix(*_noisy(rng, where, noise_m), T0 + every_s * i))
    return fixes


def noisy_stay(
    seed: int,
    noise_m: float,
    *,
    at: tuple[float, float] = STOP_A,
    start: float = T0,
    every_s: float = 10.0,
    duration_s: float = 600.0,
) -> list[Fix]:
    """A stay at ``at``, one noisy fix every ``every_s`` for ``duration_s``."""
    rng = random.Random(seed)
    return [Fix(*_noisy(rng, at, noise_m), start + every_s * i) for i in range(int(duration_s // every_s) + 1)]
