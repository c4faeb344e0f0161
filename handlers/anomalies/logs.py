"""Log anomaly scoring: templates, an n-gram model of template sequences, and severity by the source's own
score percentiles. Pure: no I/O, no asyncio; the clock is given.

Per source (a service, a host, a file):

1. A line becomes a template (:mod:`.templates`: variable parts masked, then Drain); a caller that parses its
   own logs may give a template id instead. Either way the sequence model sees a symbol per line.
2. An order-h n-gram model (default h = 2: the previous two templates) scores each new template before
   learning it: ``score = -log P(template | previous h)``, the natural logarithm, with Witten-Bell
   interpolated smoothing down to add-one unigrams, so an unseen template or transition has a small but
   non-zero probability::

       P(w | c) = (count(c, w) + T(c) * P(w | c')) / (count(c) + T(c))

   where ``c'`` is ``c`` without its oldest template and ``T(c)`` the number of distinct templates seen after
   ``c``; at the bottom ``P(w) = (count(w) + 1) / (N + V + 1)`` (``N`` lines, ``V`` templates).
3. A DeepLog-style top-k check (Du et al., CCS 2017): the template is *predicted* when it is among the k most
   frequent templates seen after the longest context the model knows (default k = 9).
4. Severity by the source's own recent scores (the last ``score_window``, default 10,000), strictly above
   them: ``> p99.9`` HIGH, ``> p99`` MED, ``> p95`` LOW, else NONE — so a source whose normal lines all
   score alike raises nothing. A predicted template is at most LOW: MED and HIGH mean both a rare score and
   an unexpected template. Until a source has scored ``warmup_lines`` lines (default 1,000) it learns and
   reports LEARNING.
5. A template still new to a warm source is MED, however it scores, for its first ``new_template_lines``
   lines (default 3): a new error message is neither HIGH on its first line and then NONE on its second (the
   model learns it at once) nor silent.

Each score carries its ``sequence``: the ids of the templates of the source's previous lines, oldest first,
at most ``sequence_length`` (default 10) of them.

Memory per source, bounded by settings: the miner (at most ``max_templates`` templates, default 1,000), the
model (at most ``max_ngrams`` (context, template) counts, default 20,000, least recently used contexts
evicted first; at most ``max_templates`` distinct templates) and the score window (16 bytes per score: 160 KB
with the default 10,000). With the defaults a source takes at most about 4 MB (measured with every bound
reached) and typically a few hundred KB. :class:`LogScorer` keeps at most ``max_sources`` sources (default
256, least recently used evicted) and forgets a source idle for ``source_ttl_s`` (default one day).
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import math
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any, Final

from nexus import read_int, read_number

from .templates import Drain

LEARNING: Final = "LEARNING"
NONE: Final = "NONE"
LOW: Final = "LOW"
MED: Final = "MED"
HIGH: Final = "HIGH"
SEVERITIES: Final = (LEARNING, NONE, LOW, MED, HIGH)
ALERT_SEVERITIES: Final = frozenset({MED, HIGH})

TEMPLATE_PREFIX: Final = "T"


# --- settings ---------------------------------------------------------------------------------------------

_PLUGIN: Final = "anomalies"


@dataclasses.dataclass(frozen=True)
class LogSettings:
    """Log scoring settings (``[handlers.anomalies]``)."""

    order: int = 2
    """h: how many previous templates the n-gram model conditions on."""
    top_k: int = 9
    """A template among the k most frequent after its context is predicted (at most LOW); 0 turns it off."""
    warmup_lines: int = 1000
    """Lines a source learns from (severity LEARNING) before it is scored."""
    score_window: int = 10_000
    """Recent scores of a source its percentiles are taken from."""
    low_percentile: float = 95.0
    med_percentile: float = 99.0
    high_percentile: float = 99.9
    max_sources: int = 256
    source_ttl_s: float = 86_400.0
    """Wall-clock seconds after which an idle source is forgotten; 0 keeps sources until evicted."""
    max_templates: int = 1000
    max_ngrams: int = 20_000
    drain_depth: int = 6
    drain_similarity: float = 0.5
    drain_max_children: int = 100
    max_line_chars: int = 10_000
    new_template_lines: int = 3
    """A template's first this many lines are MED (not HIGH, not NONE) once warm; 0 turns it off."""
    sequence_length: int = 10
    """How many of the templates that led to a line its score carries (``sequence``)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LogSettings:
        """Read the settings from a ``ctx.config`` mapping; raises ValueError naming a bad key."""
        settings = cls(
            order=read_int(config, "order", cls.order, plugin=_PLUGIN, minimum=1),
            top_k=read_int(config, "top_k", cls.top_k, plugin=_PLUGIN, minimum=0),
            warmup_lines=read_int(config, "warmup_lines", cls.warmup_lines, plugin=_PLUGIN, minimum=1),
            score_window=read_int(config, "score_window", cls.score_window, plugin=_PLUGIN, minimum=10),
            low_percentile=read_number(
                config, "low_percentile", cls.low_percentile, plugin=_PLUGIN, minimum=0, maximum=100
            ),
            med_percentile=read_number(
                config, "med_percentile", cls.med_percentile, plugin=_PLUGIN, minimum=0, maximum=100
            ),
            high_percentile=read_number(
                config, "high_percentile", cls.high_percentile, plugin=_PLUGIN, minimum=0, maximum=100
            ),
            max_sources=read_int(config, "max_sources", cls.max_sources, plugin=_PLUGIN, minimum=1),
            source_ttl_s=read_number(config, "source_ttl_s", cls.source_ttl_s, plugin=_PLUGIN, minimum=0),
            max_templates=read_int(config, "max_templates", cls.max_templates, plugin=_PLUGIN, minimum=1),
            max_ngrams=read_int(config, "max_ngrams", cls.max_ngrams, plugin=_PLUGIN, minimum=1),
            drain_depth=read_int(config, "drain_depth", cls.drain_depth, plugin=_PLUGIN, minimum=3),
            drain_similarity=read_number(
                config, "drain_similarity", cls.drain_similarity, plugin=_PLUGIN, minimum=0, maximum=1
            ),
            drain_max_children=read_int(
                config, "drain_max_children", cls.drain_max_children, plugin=_PLUGIN, minimum=2
            ),
            max_line_chars=read_int(config, "max_line_chars", cls.max_line_chars, plugin=_PLUGIN, minimum=1),
            new_template_lines=read_int(
                config, "new_template_lines", cls.new_template_lines, plugin=_PLUGIN, minimum=0
            ),
            sequence_length=read_int(config, "sequence_length", cls.sequence_length, plugin=_PLUGIN, minimum=0),
        )
        if not settings.low_percentile <= settings.med_percentile <= settings.high_percentile:
            raise ValueError(
                "anomalies settings low_percentile <= med_percentile <= high_percentile must hold, got "
                f"{settings.low_percentile:g}, {settings.med_percentile:g}, {settings.high_percentile:g}"
            )
        return settings


# --- the n-gram model -------------------------------------------------------------------------------------


class _Counts:
    __slots__ = ("followers", "total")

    def __init__(self) -> None:
        self.total = 0
        self.followers: dict[str, int] = {}


Context = tuple[str, ...]


class NGramModel:
    """Counts of templates after contexts of 0..``order`` templates, with Witten-Bell interpolation."""

    def __init__(self, order: int = 2, *, max_ngrams: int = 20_000, max_vocabulary: int = 1000) -> None:
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}")
        self.order = order
        self.max_ngrams = max_ngrams
        self.max_vocabulary = max_vocabulary
        self._unigrams: OrderedDict[str, int] = OrderedDict()
        self._lines = 0
        self._contexts: OrderedDict[Context, _Counts] = OrderedDict()
        self._entries = 0

    @property
    def vocabulary(self) -> int:
        """Distinct templates the model knows."""
        return len(self._unigrams)

    @property
    def entries(self) -> int:
        """(context, template) counts kept, unigrams included."""
        return self._entries + len(self._unigrams)

    def knows(self, symbol: str) -> bool:
        """Whether the model has seen ``symbol`` (and still keeps it)."""
        return symbol in self._unigrams

    def count(self, symbol: str) -> int:
        """How many times the model has seen ``symbol`` (0 once forgotten)."""
        return self._unigrams.get(symbol, 0)

    def probability(self, context: Context, symbol: str) -> float:
        """``P(symbol | context)``, smoothed; ``context`` holds the previous templates, oldest first."""
        p = (self._unigrams.get(symbol, 0) + 1) / (self._lines + len(self._unigrams) + 1)
        for n in range(1, min(len(context), self.order) + 1):
            counts = self._contexts.get(context[-n:])
            if counts is None or counts.total == 0:
                continue
            distinct = len(counts.followers)
            p = (counts.followers.get(symbol, 0) + distinct * p) / (counts.total + distinct)
        return p

    def predicted(self, context: Context, symbol: str, k: int) -> tuple[bool, int | None]:
        """``(is symbol among the k most frequent after the longest known context, its rank or None)``.

        The rank counts templates seen strictly more often, plus one (ties share a rank).
        """
        followers: Mapping[str, int] = self._unigrams
        for n in range(min(len(context), self.order), 0, -1):
            counts = self._contexts.get(context[-n:])
            if counts is not None and counts.total > 0:
                followers = counts.followers
                break
        count = followers.get(symbol, 0)
        if count == 0:
            return False, None
        rank = 1 + sum(1 for other in followers.values() if other > count)
        return rank <= k, rank

    def observe(self, context: Context, symbol: str) -> None:
        """Learn that ``symbol`` followed ``context``."""
        self._lines += 1
        self._unigrams[symbol] = self._unigrams.get(symbol, 0) + 1
        self._unigrams.move_to_end(symbol)
        while len(self._unigrams) > self.max_vocabulary:
            _, count = self._unigrams.popitem(last=False)
            self._lines -= count
        for n in range(1, min(len(context), self.order) + 1):
            key = context[-n:]
            counts = self._contexts.get(key)
            if counts is None:
                counts = self._contexts[key] = _Counts()
            else:
                self._contexts.move_to_end(key)
            if symbol not in counts.followers:
                self._entries += 1
            counts.followers[symbol] = counts.followers.get(symbol, 0) + 1
            counts.total += 1
        while self._entries > self.max_ngrams and len(self._contexts) > 1:
            _, evicted = self._contexts.popitem(last=False)
            self._entries -= len(evicted.followers)


# --- percentiles of recent scores -------------------------------------------------------------------------


class ScoreWindow:
    """The last ``size`` scores, kept sorted too, for percentiles in O(log n) + a memmove per score."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.size = size
        self._ring = array.array("d")
        self._head = 0
        self._sorted = array.array("d")

    def __len__(self) -> int:
        return len(self._ring)

    def add(self, score: float) -> None:
        """Add a score, forgetting the oldest when full."""
        if len(self._ring) < self.size:
            self._ring.append(score)
        else:
            oldest = self._ring[self._head]
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
            self._ring[self._head] = score
            self._head = (self._head + 1) % self.size
        bisect.insort(self._sorted, score)

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0 to 100) by linear interpolation between ranks; NaN when empty."""
        values = self._sorted
        if not values:
            return math.nan
        rank = (len(values) - 1) * q / 100.0
        low = math.floor(rank)
        high = math.ceil(rank)
        return values[low] + (values[high] - values[low]) * (rank - low)


# --- one source -------------------------------------------------------------------------------------------


def grade(score: float, thresholds: Mapping[str, float], *, predicted: bool = False) -> str:
    """Severity of ``score`` against a source's ``p95`` / ``p99`` / ``p99_9``, strictly above each.

    A ``predicted`` template (among the top-k after its context) is at most LOW.
    """
    if score > thresholds["p99_9"]:
        severity = HIGH
    elif score > thresholds["p99"]:
        severity = MED
    elif score > thresholds["p95"]:
        severity = LOW
    else:
        severity = NONE
    return LOW if predicted and severity in ALERT_SEVERITIES else severity


@dataclasses.dataclass(frozen=True, slots=True)
class LogScore:
    """How one line (or template) of a source scored."""

    source: str
    template_id: str
    template: str
    score: float
    """``-ln P(template | previous h templates)``."""
    severity: str
    predicted: bool
    """Whether the template is among the top-k after its context (DeepLog's check)."""
    rank: int | None
    """The template's rank after its context (1 = most frequent); None when never seen there."""
    lines_seen: int
    """Lines this source has scored, this one included."""
    new_template: bool
    thresholds: dict[str, float] | None
    """The source's p95 / p99 / p99.9 the score was compared with (None while learning)."""
    seen: int = 1
    """Lines of this template the source has seen, this one included."""
    sequence: tuple[str, ...] = ()
    """The template ids of the lines before this one, oldest first (at most ``sequence_length``)."""

    @property
    def alert(self) -> bool:
        """MED or HIGH."""
        return self.severity in ALERT_SEVERITIES


class LogSource:
    """The template miner, sequence model and score window of one source."""

    def __init__(self, name: str, settings: LogSettings | None = None) -> None:
        self.name = name
        self.settings = settings or LogSettings()
        s = self.settings
        self.miner = Drain(
            depth=s.drain_depth,
            similarity=s.drain_similarity,
            max_children=s.drain_max_children,
            max_templates=s.max_templates,
            max_line_chars=s.max_line_chars,
        )
        self.model = NGramModel(s.order, max_ngrams=s.max_ngrams, max_vocabulary=s.max_templates)
        self.window = ScoreWindow(s.score_window)
        self.history: deque[str] = deque(maxlen=max(s.order, s.sequence_length))
        self.lines_seen = 0

    def score_line(self, line: str) -> LogScore:
        """Mine ``line`` into a template, score it, then learn from it."""
        match = self.miner.add(line)
        symbol = f"{TEMPLATE_PREFIX}{match.template.template_id}"
        return self._score(symbol, match.template.text, new_template=match.created)

    def score_template(self, template_id: str) -> LogScore:
        """Score a template given by id (one this source mined, ``T12``, or the caller's own), then learn it."""
        template = self.miner.get(_mined_id(template_id) or 0)
        text = template.text if template is not None else template_id
        return self._score(template_id, text, new_template=not self.model.knows(template_id))

    def _score(self, symbol: str, text: str, *, new_template: bool) -> LogScore:
        s = self.settings
        history = tuple(self.history)
        context = history[-s.order :]
        score = -math.log(self.model.probability(context, symbol))
        predicted, rank = self.model.predicted(context, symbol, s.top_k)
        seen = self.model.count(symbol) + 1
        thresholds: dict[str, float] | None = None
        if self.lines_seen < s.warmup_lines:
            severity = LEARNING
        else:
            thresholds = {
                "p95": self.window.percentile(s.low_percentile),
                "p99": self.window.percentile(s.med_percentile),
                "p99_9": self.window.percentile(s.high_percentile),
            }
            if seen <= s.new_template_lines:
                severity = MED  # a template still new to the source: worth a look, however it scores
            else:
                severity = grade(score, thresholds, predicted=predicted and s.top_k > 0)
        self.model.observe(context, symbol)
        self.window.add(score)
        self.history.append(symbol)
        self.lines_seen += 1
        return LogScore(
            source=self.name,
            template_id=symbol,
            template=text,
            score=score,
            severity=severity,
            predicted=predicted and s.top_k > 0,
            rank=rank,
            lines_seen=self.lines_seen,
            new_template=new_template,
            thresholds=thresholds,
            seen=seen,
            sequence=history[-s.sequence_length :] if s.sequence_length else (),
        )


def _mined_id(template_id: str) -> int | None:
    digits = template_id[len(TEMPLATE_PREFIX) :]
    if template_id.startswith(TEMPLATE_PREFIX) and digits.isdigit() and digits.isascii():
        return int(digits)
    return None


# --- every source -----------------------------------------------------------------------------------------


class LogScorer:
    """A :class:`LogSource` per source name, bounded by count (LRU) and idle time (TTL)."""

    def __init__(self, settings: LogSettings | None = None) -> None:
        self.settings = settings or LogSettings()
        self._sources: OrderedDict[str, tuple[LogSource, list[float]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def __contains__(self, source: object) -> bool:
        return source in self._sources

    def source(self, name: str, now: float) -> LogSource:
        """The source's state, created (evicting the least recently used) when new."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"source must be a non-empty string, got {name!r}")
        entry = self._sources.get(name)
        if entry is None:
            while len(self._sources) >= self.settings.max_sources:
                self._sources.popitem(last=False)
            entry = (LogSource(name, self.settings), [now])
            self._sources[name] = entry
        else:
            self._sources.move_to_end(name)
            entry[1][0] = now
        return entry[0]

    def score_line(self, source: str, line: str, *, now: float) -> LogScore:
        """Score one line of ``source`` (``now``: a monotonic wall clock, for idle expiry)."""
        if not isinstance(line, str):
            raise ValueError(f"line must be a string, got {type(line).__name__}")
        return self.source(source, now).score_line(line)

    def score_template(self, source: str, template_id: str, *, now: float) -> LogScore:
        """Score one template id of ``source``."""
        if not isinstance(template_id, str) or not template_id:
            raise ValueError(f"template_id must be a non-empty string, got {template_id!r}")
        return self.source(source, now).score_template(template_id)

    def expire(self, now: float) -> list[str]:
        """Forget sources idle for more than ``source_ttl_s``; their names."""
        ttl = self.settings.source_ttl_s
        gone: list[str] = []
        if ttl <= 0:
            return gone
        while self._sources:
            name, (_, seen) = next(iter(self._sources.items()))
            if now - seen[0] <= ttl:
                break
            del self._sources[name]
            gone.append(name)
        return gone


# --- statistics of a stream -------------------------------------------------------------------------------


class LogStats:
    """Counts of a followed file's lines, alerts and errors, reported every ``interval_s`` of a given clock.

    :meth:`due` answers the report when ``interval_s`` has passed since the last one (the first is due
    ``interval_s`` after ``start``): totals since the start and the lines per second over the last interval.
    ``interval_s`` 0 never reports.
    """

    def __init__(self, interval_s: float, start: float) -> None:
        if not interval_s >= 0:
            raise ValueError(f"interval_s must be at least 0, got {interval_s}")
        self.interval_s = interval_s
        self.lines = 0
        self.alerts = 0
        self.errors = 0
        self._start = start
        self._last = start
        self._last_lines = 0

    def count(self, result: LogScore | None) -> None:
        """Count one line: its score, or None when it could not be scored (an error)."""
        self.lines += 1
        if result is None:
            self.errors += 1
        elif result.alert:
            self.alerts += 1

    def due(self, now: float) -> dict[str, float] | None:
        """The report when one is due at ``now``, else None."""
        elapsed = now - self._last
        if self.interval_s <= 0 or elapsed < self.interval_s:
            return None
        report = {
            "lines": self.lines,
            "alerts": self.alerts,
            "errors": self.errors,
            "lines_per_s": (self.lines - self._last_lines) / elapsed,
            "interval_s": elapsed,
            "uptime_s": now - self._start,
        }
        self._last = now
        self._last_lines = self.lines
        return report
