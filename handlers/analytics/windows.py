"""Event-time windows over metric values, with watermarks, late values and threshold alerts.

Pure: no I/O, no asyncio; every clock reading is passed in, so the whole algorithm is tested synchronously.

Windows. A definition (:class:`WindowSpec`) names a metric and how to cut its values into windows:

- ``tumbling``: back-to-back windows of ``size_s``, aligned to the epoch: ``[k·size, (k+1)·size)``;
- ``sliding``: windows of ``size_s`` starting every ``slide_s``: ``[j·slide, j·slide + size)``; a value falls
  into every window that contains its time (``size_s / slide_s`` of them);
- ``session``: values less than ``gap_s`` apart form one session, whose window is ``[first, last + gap_s)``;
  with ``size_s`` a session that would grow to ``size_s`` or longer is cut at the value that would make it so
  (its window ends there and that value opens the next session).

Event time and the watermark. Each definition keeps the greatest event time it has accepted; its watermark is
that time minus ``grace_s``. A window closes once the watermark reaches its end, and then yields one
:class:`ClosedWindow` with its aggregate (``mean``, ``sum``, ``count``, ``min``, ``max`` or ``p95``). Only
windows that received a value exist, so none closes empty. A value whose window has already closed is late:
it is counted (the next closed window of the definition reports how many came since the previous one, and
:meth:`Engine.record` says which definitions found it late) and never mixed into another window. A sliding
value late for some of its windows still goes into those that are open.

Sessions also close when no value comes at all. :meth:`Engine.tick` is given a monotonic clock reading
(``arrival``, the same clock :meth:`Engine.record` is given): for session definitions the watermark moves on
by the processing time that passed since the last value arrived, so a session whose metric falls silent
closes ``gap_s + grace_s`` seconds of that clock after its last value. Tumbling and sliding windows close on
event time alone.

Thresholds (:class:`Thresholds`). A definition gives them in one of two forms: ``{low, critical, high,
hysteresis}`` (``low`` and ``critical`` breached when a window's value is at or below them, ``high`` when it is
at or above), or a list of named thresholds ``[{name, above | below, hysteresis?}]``, each breached at or above
(at or below) its bound and cleared only once a value is back past the bound by more than its own
``hysteresis``. The first form is three named thresholds (``low``, ``critical``: ``below``; ``high``:
``above``) sharing one hysteresis. Each threshold is tracked on its own (a Schmitt trigger): an :class:`Alert`,
carrying the threshold's name as ``level``, is raised only when a closed window changes its state — breached
or recovered — never for every window in breach, and never for values that wander inside the hysteresis band.

Snapshots (:meth:`Engine.snapshot`). The open windows, each with the aggregate of the values it holds so far
(:class:`OpenWindow`; a session's ``end`` is where it would end if no further value came), selected by
definition name and/or metric and cut at a limit (the snapshot says how many matched in all).

Silent sources. A definition with ``silence_s`` reports its source silent (:class:`SourceChange`, from
:meth:`Engine.tick`) once the ``arrival`` clock has moved ``silence_s`` past the last value it matched — late
values count, values without its tags do not — once per silence; the next value reports it ``resumed``
(from :meth:`Engine.record`). A definition that has never had a value is not reported.

Memory per definition (the per-key state): about 1 KB for the definition and its counters, plus about 300 B
per open window, plus about 32 B per kept value for ``p95`` (at most ``max_samples`` per window: exact below
that, a uniform reservoir sample above it). Open windows per definition are bounded: past
``max_open_windows`` the oldest closes early (``early: true``), and values for it afterwards count as late.
Definitions are bounded by ``max_definitions``. A definition whose metric falls silent keeps at most its
last few windows open (sessions close by themselves), so idle metrics cost their definition and nothing more.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

KINDS: Final = ("tumbling", "sliding", "session")
AGGREGATES: Final = ("mean", "sum", "count", "min", "max", "p95")
LEVELS: Final = ("low", "critical", "high")
BOUNDS: Final = ("above", "below")
MAX_NAME_LENGTH: Final = 200


class InvalidInput(ValueError):
    """A definition or a value that cannot be used; the message says which field and why."""


def rfc3339(seconds: float) -> str:
    """Epoch seconds as RFC 3339 UTC text ending in ``Z`` (microseconds only when there are some)."""
    moment = datetime.fromtimestamp(seconds, UTC)
    spec = "seconds" if moment.microsecond == 0 else "microseconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0 to 100) by linear interpolation between closest ranks (NumPy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _number(
    payload: Mapping[str, Any],
    field: str,
    *,
    required: bool = False,
    minimum: float | None = None,
    positive: bool = False,
) -> float | None:
    value = payload.get(field)
    if value is None:
        if required:
            raise InvalidInput(f"{field} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{field} must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidInput(f"{field} must be a finite number, not {value!r}")
    if positive and number <= 0:
        raise InvalidInput(f"{field} must be greater than 0, got {value!r}")
    if minimum is not None and number < minimum:
        raise InvalidInput(f"{field} must be at least {minimum:g}, got {value!r}")
    return number


def _text(payload: Mapping[str, Any], field: str) -> str:
    value = payload.get(field)
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{field} must be a non-empty string")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidInput(f"{field} must be at most {MAX_NAME_LENGTH} characters")
    return value


def check_tags(tags: Any, field: str = "tags") -> dict[str, str | int | float | bool]:
    """``tags`` as a dict of scalars; raises :class:`InvalidInput` for anything else."""
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise InvalidInput(f"{field} must be an object of strings, numbers or booleans")
    checked: dict[str, str | int | float | bool] = {}
    for key, value in tags.items():
        if not isinstance(value, (str, int, float, bool)):
            raise InvalidInput(f"{field}.{key} must be a string, number or boolean, not {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"{field}.{key} must be a finite number")
        checked[str(key)] = value
    return checked


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what the engine keeps."""

    max_definitions: int = 1000
    max_open_windows: int = 1000
    """Open windows (or sessions) per definition; past it the oldest closes early."""
    max_windows_per_value: int = 100
    """``size_s / slide_s`` of a sliding definition: the windows one value can fall into."""
    max_samples: int = 10_000
    """Values a ``p95`` window keeps: exact below, a uniform reservoir sample above."""
    max_thresholds: int = 32
    """Named thresholds per definition."""


@dataclasses.dataclass(frozen=True, slots=True)
class NamedThreshold:
    """One alert bound: breached when a closed window's value is at or ``above`` it (or at or ``below`` it),
    cleared only once the value is back past it by more than ``hysteresis``."""

    name: str
    bound: str
    """``above`` or ``below``."""
    value: float
    hysteresis: float = 0.0

    def breached_by(self, value: float) -> bool:
        return value >= self.value if self.bound == "above" else value <= self.value

    def cleared_by(self, value: float) -> bool:
        if self.bound == "above":
            return value < self.value - self.hysteresis
        return value > self.value + self.hysteresis

    @classmethod
    def parse(cls, payload: Any, field: str) -> NamedThreshold:
        """Read ``{name, above | below, hysteresis?}``; raises :class:`InvalidInput` naming ``field``."""
        if not isinstance(payload, Mapping):
            raise InvalidInput(f"{field} must be an object with name and above or below")
        unknown = sorted(set(payload) - {"name", *BOUNDS, "hysteresis"})
        if unknown:
            raise InvalidInput(f"{field} has unknown field(s) {unknown}: use name, above, below, hysteresis")
        try:
            name = _text(payload, "name")
            bounds = [bound for bound in BOUNDS if payload.get(bound) is not None]
            if len(bounds) != 1:
                raise InvalidInput("needs exactly one of above or below")
            value = _number(payload, bounds[0], required=True)
            hysteresis = _number(payload, "hysteresis", minimum=0.0) or 0.0
        except InvalidInput as exc:
            raise InvalidInput(f"{field}: {exc}") from None
        assert value is not None
        return cls(name, bounds[0], value, hysteresis)

    def to_payload(self) -> dict[str, Any]:
        result: dict[str, Any] = {"name": self.name, self.bound: self.value}
        if self.hysteresis:
            result["hysteresis"] = self.hysteresis
        return result


@dataclasses.dataclass(frozen=True, slots=True)
class Thresholds:
    """Alert levels, in one of two forms.

    - ``{low?, critical?, high?, hysteresis?}``: ``low`` and ``critical`` breached at or below, ``high`` at or
      above, one ``hysteresis`` for all three;
    - a list of named thresholds, ``[{name, above | below, hysteresis?}, ...]``, each with its own hysteresis.

    Both are tracked the same way (:meth:`named`: ``low`` is the threshold named ``low`` with bound ``below``).
    """

    low: float | None = None
    critical: float | None = None
    high: float | None = None
    hysteresis: float = 0.0
    """How far past a threshold a value must come back before it counts as recovered."""
    listed: tuple[NamedThreshold, ...] = ()
    """The named thresholds, when the definition gave a list."""

    @classmethod
    def parse(cls, payload: Any, *, max_thresholds: int = 32) -> Thresholds:
        """Read either form; raises :class:`InvalidInput`."""
        if payload is None:
            return cls()
        if isinstance(payload, list):
            if len(payload) > max_thresholds:
                raise InvalidInput(f"thresholds has {len(payload)} entries, at most {max_thresholds} are allowed")
            listed = tuple(NamedThreshold.parse(item, f"thresholds[{i}]") for i, item in enumerate(payload))
            names = [threshold.name for threshold in listed]
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise InvalidInput(f"thresholds names must be unique: {repeated} given more than once")
            return cls(listed=listed)
        if not isinstance(payload, Mapping):
            raise InvalidInput(
                "thresholds must be an object with low, critical and/or high, or a list of named thresholds"
            )
        unknown = sorted(set(payload) - {*LEVELS, "hysteresis"})
        if unknown:
            raise InvalidInput(f"thresholds has unknown field(s) {unknown}: use low, critical, high, hysteresis")
        low = _number(payload, "low")
        critical = _number(payload, "critical")
        high = _number(payload, "high")
        hysteresis = _number(payload, "hysteresis", minimum=0.0) or 0.0
        if low is not None and critical is not None and critical > low:
            raise InvalidInput(f"thresholds.critical ({critical:g}) must not be above thresholds.low ({low:g})")
        for name, value in (("low", low), ("critical", critical)):
            if value is not None and high is not None and high <= value:
                raise InvalidInput(f"thresholds.high ({high:g}) must be above thresholds.{name} ({value:g})")
        return cls(low, critical, high, hysteresis)

    def levels(self) -> list[tuple[str, float]]:
        """The ``low`` / ``critical`` / ``high`` thresholds that are set, as ``(level, value)``."""
        return [
            (name, value)
            for name, value in (("low", self.low), ("critical", self.critical), ("high", self.high))
            if value is not None
        ]

    def named(self) -> tuple[NamedThreshold, ...]:
        """Every threshold as a named one (``low``, ``critical``: ``below``; ``high``: ``above``)."""
        if self.listed:
            return self.listed
        return tuple(
            NamedThreshold(level, "above" if level == "high" else "below", value, self.hysteresis)
            for level, value in self.levels()
        )

    def to_payload(self) -> dict[str, float] | list[dict[str, Any]]:
        """In the form the definition gave (an empty object when there are none)."""
        if self.listed:
            return [threshold.to_payload() for threshold in self.listed]
        result = dict(self.levels())
        if self.hysteresis:
            result["hysteresis"] = self.hysteresis
        return result


@dataclasses.dataclass(frozen=True, slots=True)
class WindowSpec:
    """One window definition."""

    name: str
    metric: str
    kind: str
    agg: str
    size_s: float | None
    slide_s: float | None = None
    gap_s: float | None = None
    grace_s: float = 0.0
    thresholds: Thresholds = Thresholds()
    tags: Mapping[str, str | int | float | bool] = dataclasses.field(default_factory=dict)
    """Only values whose tags include all of these count."""
    silence_s: float = 0.0
    """Report the source silent after this long without a value (arrival clock); 0: never."""

    @classmethod
    def parse(
        cls,
        payload: Mapping[str, Any],
        *,
        default_grace_s: float = 0.0,
        default_silence_s: float = 0.0,
        limits: Limits = Limits(),
    ) -> WindowSpec:
        """Read a ``define_window`` payload; raises :class:`InvalidInput` naming the field that is wrong."""
        name = _text(payload, "name")
        metric = _text(payload, "metric")
        kind = payload.get("kind")
        if kind not in KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        agg = payload.get("agg")
        if agg not in AGGREGATES:
            raise InvalidInput(f"agg must be one of {', '.join(AGGREGATES)}, not {agg!r}")
        size_s = _number(payload, "size_s", required=kind != "session", positive=True)
        slide_s = _number(payload, "slide_s", required=kind == "sliding", positive=True)
        gap_s = _number(payload, "gap_s", required=kind == "session", positive=True)
        if kind != "sliding" and slide_s is not None:
            raise InvalidInput(f"slide_s is for sliding windows, not {kind} ones")
        if kind != "session" and gap_s is not None:
            raise InvalidInput(f"gap_s is for session windows, not {kind} ones")
        if kind == "sliding":
            assert size_s is not None
            assert slide_s is not None
            if slide_s > size_s:
                raise InvalidInput(f"slide_s ({slide_s:g}) must not exceed size_s ({size_s:g})")
            if size_s / slide_s > limits.max_windows_per_value:
                raise InvalidInput(
                    f"size_s / slide_s is {size_s / slide_s:g}: a value would fall into more than "
                    f"{limits.max_windows_per_value} windows"
                )
        grace = _number(payload, "grace_s", minimum=0.0)
        silence = _number(payload, "silence_s", minimum=0.0)
        return cls(
            name=name,
            metric=metric,
            kind=str(kind),
            agg=str(agg),
            size_s=size_s,
            slide_s=slide_s,
            gap_s=gap_s,
            grace_s=default_grace_s if grace is None else grace,
            thresholds=Thresholds.parse(payload.get("thresholds"), max_thresholds=limits.max_thresholds),
            tags=check_tags(payload.get("tags")),
            silence_s=default_silence_s if silence is None else silence,
        )

    def to_payload(self) -> dict[str, Any]:
        """The definition as a JSON object (fields that are not set are left out)."""
        result: dict[str, Any] = {"name": self.name, "metric": self.metric, "kind": self.kind, "agg": self.agg}
        for field in ("size_s", "slide_s", "gap_s"):
            value = getattr(self, field)
            if value is not None:
                result[field] = value
        result["grace_s"] = self.grace_s
        result["thresholds"] = self.thresholds.to_payload()
        result["tags"] = dict(self.tags)
        result["silence_s"] = self.silence_s
        return result

    def matches(self, tags: Mapping[str, Any]) -> bool:
        """Whether a value with ``tags`` counts for this definition."""
        return all(key in tags and tags[key] == value for key, value in self.tags.items())


class Aggregate:
    """Running aggregate of one window: count, sum, min, max, and a bounded sample for ``p95``."""

    __slots__ = ("_rng", "_seen", "count", "high", "low", "max_samples", "samples", "total")

    def __init__(self, *, keep_samples: bool, max_samples: int, rng: random.Random) -> None:
        self.count = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.samples: list[float] | None = [] if keep_samples else None
        self.max_samples = max_samples
        self._seen = 0
        self._rng = rng

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.low = min(self.low, value)
        self.high = max(self.high, value)
        if self.samples is not None:
            self._sample(value)

    def merge(self, other: Aggregate) -> None:
        """Fold ``other`` (a merged session's aggregate) into this one."""
        self.count += other.count
        self.total += other.total
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)
        if self.samples is not None and other.samples is not None:
            for value in other.samples:
                self._sample(value)

    def _sample(self, value: float) -> None:
        assert self.samples is not None
        self._seen += 1
        if len(self.samples) < self.max_samples:
            self.samples.append(value)
        else:  # reservoir sampling (Vitter's algorithm R): every value is kept with equal probability
            slot = self._rng.randrange(self._seen)
            if slot < self.max_samples:
                self.samples[slot] = value

    def value(self, agg: str) -> float:
        """The aggregate ``agg`` of the values added (the window has at least one)."""
        if agg == "count":
            return self.count
        if agg == "sum":
            return self.total
        if agg == "mean":
            return self.total / self.count
        if agg == "min":
            return self.low
        if agg == "max":
            return self.high
        assert self.samples is not None
        return percentile(self.samples, 95)


@dataclasses.dataclass(frozen=True, slots=True)
class Alert:
    """A threshold crossed by a closed window's value."""

    name: str
    """The window definition."""
    metric: str
    level: str
    """The threshold's name: ``low``, ``critical`` or ``high`` in the object form, the given name in the list."""
    direction: str
    """``down`` or ``up``: the way the value moved across the threshold."""
    state: str
    """``breached`` or ``recovered``."""
    value: float
    threshold: float
    start: float
    end: float
    bound: str = "below"
    """``above`` or ``below``: the side of ``threshold`` on which it is breached."""
    hysteresis: float = 0.0

    def to_payload(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "level": self.level,
            "direction": self.direction,
            "state": self.state,
            "value": self.value,
            "threshold": self.threshold,
            "bound": self.bound,
            "hysteresis": self.hysteresis,
            "start": rfc3339(self.start),
            "end": rfc3339(self.end),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class ClosedWindow:
    """A window that closed, with its aggregate and the alerts its value raised."""

    name: str
    metric: str
    kind: str
    agg: str
    start: float
    end: float
    value: float
    count: int
    late: int
    """Late values of this definition dropped since its previous closed window."""
    early: bool = False
    """Closed before the watermark reached its end, because the definition had too many open windows."""
    alerts: tuple[Alert, ...] = ()

    def to_payload(self) -> dict[str, Any]:
        return {**_window_payload(self), "late": self.late, "early": self.early}


def _window_payload(window: ClosedWindow | OpenWindow) -> dict[str, Any]:
    """What a closed window's event and a snapshot say of a window alike."""
    return {
        "name": window.name,
        "metric": window.metric,
        "kind": window.kind,
        "agg": window.agg,
        "start": rfc3339(window.start),
        "end": rfc3339(window.end),
        "value": window.value,
        "count": window.count,
    }


@dataclasses.dataclass(frozen=True, slots=True)
class OpenWindow:
    """A window that has values and has not closed yet, with its aggregate so far."""

    name: str
    metric: str
    kind: str
    agg: str
    start: float
    end: float
    """For a session: the end it would have if no further value came (last value + ``gap_s``)."""
    value: float
    count: int

    def to_payload(self) -> dict[str, Any]:
        return _window_payload(self)


@dataclasses.dataclass(frozen=True, slots=True)
class SourceChange:
    """A definition's source fell silent (no value for ``silence_s``) or, after that, sent a value again."""

    name: str
    metric: str
    state: str
    """``silent`` or ``resumed``."""
    silence_s: float
    silent_for_s: float
    """Arrival-clock seconds since the last value (for ``resumed``: the whole silence)."""
    last_value_at: float
    """Event time of the last value before the silence."""
    value_at: float | None = None
    """``resumed``: event time of the value that ended the silence."""

    def to_payload(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "name": self.name,
            "metric": self.metric,
            "silence_s": self.silence_s,
            "silent_for_s": round(self.silent_for_s, 6),
            "last_value_at": rfc3339(self.last_value_at),
        }
        if self.value_at is not None:
            result["value_at"] = rfc3339(self.value_at)
        return result


class _ThresholdState:
    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds.named()
        self.breached = {threshold.name: False for threshold in self.thresholds}

    def check(self, value: float) -> list[tuple[NamedThreshold, str, str]]:
        """``(threshold, direction, state)`` for each threshold whose state this value changes."""
        changes: list[tuple[NamedThreshold, str, str]] = []
        for threshold in self.thresholds:
            away = "up" if threshold.bound == "above" else "down"
            back = "down" if away == "up" else "up"
            if not self.breached[threshold.name]:
                if threshold.breached_by(value):
                    changes.append((threshold, away, "breached"))
            elif threshold.cleared_by(value):
                changes.append((threshold, back, "recovered"))
        for threshold, _, state in changes:
            self.breached[threshold.name] = state == "breached"
        # In the order the value crossed them: downwards the higher threshold first, upwards the lower one.
        changes.sort(key=lambda change: change[0].value if change[1] == "up" else -change[0].value)
        return changes


@dataclasses.dataclass(slots=True)
class _Session:
    start: float
    last: float
    aggregate: Aggregate

    def end(self, gap: float) -> float:
        return self.last + gap


class _Definition:
    """The live state of one definition: open windows, event-time progress, late count, threshold states."""

    def __init__(self, spec: WindowSpec, limits: Limits) -> None:
        self.spec = spec
        self.limits = limits
        self.max_time: float | None = None
        self.last_arrival = 0.0
        self.idle_floor = -math.inf
        self.windows: dict[int, Aggregate] = {}
        self.keys: list[int] = []  # heap of open window indexes; their ends grow with the index
        self.closed_through: int | None = None  # indexes at or below this one closed early
        self.sessions: list[_Session] = []
        self.late_since_close = 0
        self.late_total = 0
        self.thresholds = _ThresholdState(spec.thresholds)
        self.rng = random.Random(spec.name)
        self.heard_at: float | None = None  # arrival of the last value (on time or late)
        self.heard_time = 0.0  # its event time
        self.silent = False

    @property
    def watermark(self) -> float:
        event_time = -math.inf if self.max_time is None else self.max_time - self.spec.grace_s
        return max(event_time, self.idle_floor)

    def _new_aggregate(self) -> Aggregate:
        return Aggregate(keep_samples=self.spec.agg == "p95", max_samples=self.limits.max_samples, rng=self.rng)

    def _bounds(self, index: int) -> tuple[float, float]:
        spec = self.spec
        assert spec.size_s is not None
        step = spec.size_s if spec.kind == "tumbling" else spec.slide_s
        assert step is not None
        start = index * step
        return start, start + spec.size_s

    def _indexes(self, time: float) -> list[int]:
        """Indexes of the windows containing ``time``."""
        spec = self.spec
        assert spec.size_s is not None
        if spec.kind == "tumbling":
            return [math.floor(time / spec.size_s)]
        assert spec.slide_s is not None
        first = math.floor((time - spec.size_s) / spec.slide_s)
        last = math.floor(time / spec.slide_s)
        found = []
        for index in range(first, last + 1):
            start, end = self._bounds(index)
            if start <= time < end:
                found.append(index)
        return found

    def _advance(self, time: float, arrival: float) -> None:
        if self.max_time is None or time > self.max_time:
            self.max_time = time
        self.last_arrival = arrival

    def _count_late(self) -> None:
        self.late_since_close += 1
        self.late_total += 1

    def add(self, value: float, time: float, arrival: float) -> tuple[bool, bool, list[ClosedWindow]]:
        """Take one value; returns whether it was late (for at least one window), whether it went into a
        window, and the windows that closed."""
        if self.spec.kind == "session":
            return self._add_session(value, time, arrival)
        watermark = self.watermark
        open_indexes = []
        late = False
        for index in self._indexes(time):
            _, end = self._bounds(index)
            if end <= watermark or (self.closed_through is not None and index <= self.closed_through):
                late = True
            else:
                open_indexes.append(index)
        if late:
            self._count_late()
        if not open_indexes:
            return True, False, []
        self._advance(time, arrival)
        closed: list[ClosedWindow] = []
        for index in open_indexes:
            aggregate = self.windows.get(index)
            if aggregate is None:
                aggregate = self.windows[index] = self._new_aggregate()
                heapq.heappush(self.keys, index)
            aggregate.add(value)
        while len(self.windows) > self.limits.max_open_windows:
            index = heapq.heappop(self.keys)
            closed.append(self._close_window(index, early=True))
        closed += self.close_ready()
        return late, True, closed

    def _close_window(self, index: int, *, early: bool = False) -> ClosedWindow:
        aggregate = self.windows.pop(index)
        if early:
            self.closed_through = index if self.closed_through is None else max(self.closed_through, index)
        start, end = self._bounds(index)
        return self._emit(start, end, aggregate, early=early)

    def _emit(self, start: float, end: float, aggregate: Aggregate, *, early: bool = False) -> ClosedWindow:
        spec = self.spec
        value = aggregate.value(spec.agg)
        alerts = tuple(
            Alert(spec.name, spec.metric, t.name, direction, state, value, t.value, start, end, t.bound, t.hysteresis)
            for t, direction, state in self.thresholds.check(value)
        )
        late, self.late_since_close = self.late_since_close, 0
        return ClosedWindow(
            spec.name, spec.metric, spec.kind, spec.agg, start, end, value, aggregate.count, late, early, alerts
        )

    def close_ready(self) -> list[ClosedWindow]:
        """Close every window the watermark has reached, in order of their ends."""
        watermark = self.watermark
        closed: list[ClosedWindow] = []
        if self.spec.kind == "session":
            gap = self.spec.gap_s
            assert gap is not None
            ready = sorted((s for s in self.sessions if s.end(gap) <= watermark), key=lambda s: (s.end(gap), s.start))
            for session in ready:
                self.sessions.remove(session)
                closed.append(self._emit(session.start, session.end(gap), session.aggregate))
            return closed
        while self.keys and self._bounds(self.keys[0])[1] <= watermark:
            closed.append(self._close_window(heapq.heappop(self.keys)))
        return closed

    def _add_session(self, value: float, time: float, arrival: float) -> tuple[bool, bool, list[ClosedWindow]]:
        spec = self.spec
        gap = spec.gap_s
        assert gap is not None
        closed: list[ClosedWindow] = []
        touching = [s for s in self.sessions if s.start - gap < time < s.last + gap]
        if not touching and time + gap <= self.watermark:
            self._count_late()
            return True, False, []
        self._advance(time, arrival)
        if (
            spec.size_s is not None
            and len(touching) == 1
            and time >= touching[0].last
            and time - touching[0].start >= spec.size_s
        ):
            # The session would last size_s or longer: cut it here; this value opens the next one.
            cut = touching[0]
            self.sessions.remove(cut)
            closed.append(self._emit(cut.start, time, cut.aggregate))
            touching = []
        if touching:
            merged = touching[0]
            for other in touching[1:]:
                merged.aggregate.merge(other.aggregate)
                merged.start = min(merged.start, other.start)
                merged.last = max(merged.last, other.last)
                self.sessions.remove(other)
            merged.aggregate.add(value)
            merged.start = min(merged.start, time)
            merged.last = max(merged.last, time)
        else:
            aggregate = self._new_aggregate()
            aggregate.add(value)
            self.sessions.append(_Session(time, time, aggregate))
            if len(self.sessions) > self.limits.max_open_windows:
                oldest = min(self.sessions, key=lambda s: (s.last, s.start))
                self.sessions.remove(oldest)
                closed.append(self._emit(oldest.start, oldest.end(gap), oldest.aggregate, early=True))
        closed += self.close_ready()
        return False, True, closed

    def tick(self, arrival: float) -> list[ClosedWindow]:
        """Session definitions: move the watermark on by the processing time since the last value arrived."""
        if self.spec.kind != "session" or self.max_time is None:
            return []
        idle = self.max_time + max(0.0, arrival - self.last_arrival) - self.spec.grace_s
        self.idle_floor = max(self.idle_floor, idle)
        return self.close_ready()

    @property
    def open_windows(self) -> int:
        return len(self.sessions) if self.spec.kind == "session" else len(self.windows)

    def heard(self, time: float, arrival: float) -> SourceChange | None:
        """A value came (on time or late): the source is not silent; says so if it was."""
        change = None
        if self.silent and self.heard_at is not None:
            spec = self.spec
            silent_for = arrival - self.heard_at
            change = SourceChange(spec.name, spec.metric, "resumed", spec.silence_s, silent_for, self.heard_time, time)
        self.silent = False
        self.heard_at = arrival
        self.heard_time = time
        return change

    def check_silence(self, arrival: float) -> SourceChange | None:
        """Once per silence: the source has sent nothing for ``silence_s`` of the arrival clock."""
        spec = self.spec
        if spec.silence_s <= 0 or self.silent or self.heard_at is None:
            return None
        silent_for = arrival - self.heard_at
        if silent_for < spec.silence_s:
            return None
        self.silent = True
        return SourceChange(spec.name, spec.metric, "silent", spec.silence_s, silent_for, self.heard_time)

    def snapshot(self, limit: int) -> list[OpenWindow]:
        """The first ``limit`` open windows by start, with their aggregates so far (only those are computed)."""
        spec = self.spec
        found: list[tuple[float, float, Aggregate]] = []
        if spec.kind == "session":
            assert spec.gap_s is not None
            found = [(s.start, s.end(spec.gap_s), s.aggregate) for s in self.sessions]
        else:
            found = [(*self._bounds(index), aggregate) for index, aggregate in self.windows.items()]
        found.sort(key=lambda item: (item[0], item[1]))
        del found[limit:]
        return [
            OpenWindow(spec.name, spec.metric, spec.kind, spec.agg, start, end, agg.value(spec.agg), agg.count)
            for start, end, agg in found
        ]


@dataclasses.dataclass(slots=True)
class Outcome:
    """What one :meth:`Engine.record` or :meth:`Engine.tick` did."""

    matched: list[str] = dataclasses.field(default_factory=list)
    """Definitions that took the value (on time for at least one of their windows)."""
    late: list[str] = dataclasses.field(default_factory=list)
    """Definitions that found the value late (for a sliding one: late for at least one window)."""
    closed: list[ClosedWindow] = dataclasses.field(default_factory=list)
    sources: list[SourceChange] = dataclasses.field(default_factory=list)
    """Sources that fell silent (:meth:`Engine.tick`) or came back (:meth:`Engine.record`)."""

    @property
    def alerts(self) -> list[Alert]:
        return [alert for window in self.closed for alert in window.alerts]


class Engine:
    """Window definitions and their state; one per node, shared by the analytics handlers."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._definitions: dict[str, _Definition] = {}
        self._by_metric: dict[str, dict[str, _Definition]] = {}

    def define(self, spec: WindowSpec) -> bool:
        """Add a definition, or replace the one with the same name (its open windows are dropped).

        Returns whether one was replaced; raises :class:`InvalidInput` when ``max_definitions`` are in use.
        """
        previous = self._definitions.get(spec.name)
        if previous is None and len(self._definitions) >= self.limits.max_definitions:
            raise InvalidInput(
                f"{len(self._definitions)} windows are defined, the most this node keeps (max_definitions); "
                "redefine or reuse an existing name"
            )
        if previous is not None:
            self._forget(previous)
        state = _Definition(spec, self.limits)
        self._definitions[spec.name] = state
        self._by_metric.setdefault(spec.metric, {})[spec.name] = state
        return previous is not None

    def _forget(self, state: _Definition) -> None:
        del self._definitions[state.spec.name]
        by_name = self._by_metric[state.spec.metric]
        del by_name[state.spec.name]
        if not by_name:
            del self._by_metric[state.spec.metric]

    def remove(self, name: str) -> bool:
        """Drop a definition and its open windows; returns whether it existed."""
        state = self._definitions.get(name)
        if state is None:
            return False
        self._forget(state)
        return True

    def definitions(self) -> list[WindowSpec]:
        """The definitions, by name."""
        return [self._definitions[name].spec for name in sorted(self._definitions)]

    def stats(self, name: str) -> dict[str, Any]:
        """Counters of one definition: open windows, late values in all, watermark."""
        state = self._definitions[name]
        watermark = state.watermark
        return {
            "open_windows": state.open_windows,
            "late_total": state.late_total,
            "watermark": None if math.isinf(watermark) else watermark,
        }

    def record(
        self, metric: str, value: float, time: float, arrival: float, tags: Mapping[str, Any] | None = None
    ) -> Outcome:
        """Feed one value of ``metric`` at event time ``time`` (epoch seconds); ``arrival`` is a monotonic
        clock reading. Raises :class:`InvalidInput` for a value or time that is not a finite number."""
        for field, number in (("value", value), ("timestamp", time)):
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise InvalidInput(f"{field} must be a finite number, not {number!r}")
        outcome = Outcome()
        for state in list(self._by_metric.get(metric, {}).values()):
            if not state.spec.matches(tags or {}):
                continue
            late, took, closed = state.add(float(value), float(time), arrival)
            resumed = state.heard(float(time), arrival)
            if resumed is not None:
                outcome.sources.append(resumed)
            if late:
                outcome.late.append(state.spec.name)
            if took:
                outcome.matched.append(state.spec.name)
            outcome.closed += closed
        return outcome

    def tick(self, arrival: float) -> Outcome:
        """Close session windows whose metric has been silent for ``gap_s + grace_s`` of the ``arrival`` clock,
        and report sources silent for their definition's ``silence_s``."""
        outcome = Outcome()
        for state in list(self._definitions.values()):
            outcome.closed += state.tick(arrival)
            silent = state.check_silence(arrival)
            if silent is not None:
                outcome.sources.append(silent)
        return outcome

    def snapshot(self, *, name: str | None = None, metric: str | None = None, limit: int = 1000) -> Snapshot:
        """The open windows (of definition ``name`` and/or of ``metric`` when given), by definition name and
        start, at most ``limit`` of them."""
        if name is not None:
            state = self._definitions.get(name)
            states = [] if state is None or (metric is not None and state.spec.metric != metric) else [state]
        elif metric is not None:
            states = [self._by_metric.get(metric, {})[key] for key in sorted(self._by_metric.get(metric, {}))]
        else:
            states = [self._definitions[key] for key in sorted(self._definitions)]
        total = sum(state.open_windows for state in states)
        windows: list[OpenWindow] = []
        for state in states:
            if len(windows) >= limit:
                break
            windows += state.snapshot(limit - len(windows))
        return Snapshot(windows, total, len(states))


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """What :meth:`Engine.snapshot` found."""

    windows: list[OpenWindow]
    total: int
    """Open windows that matched, including those past the limit."""
    definitions: int
    """Definitions that matched."""

    @property
    def truncated(self) -> bool:
        return self.total > len(self.windows)
