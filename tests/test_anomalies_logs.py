"""Log template mining and sequence scoring (anomalies plugin), tested synchronously with hand-worked numbers."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from nexus.handlers.anomalies.logs import (
    HIGH,
    LEARNING,
    LOW,
    MED,
    NONE,
    LogScore,
    LogScorer,
    LogSettings,
    LogSource,
    LogStats,
    NGramModel,
    ScoreWindow,
    grade,
)
from nexus.handlers.anomalies.templates import Drain, mask

# A service's normal request cycle: five templates, always in this order, with variable parts.
CYCLE = (
    "accepted connection from 10.0.{a}.{b}:{port}",
    "user u{n} authenticated with token {hex}",
    "GET /api/orders/{n} returned 200 in {ms} ms",
    "cache hit ratio {ratio} for shard {shard}",
    "closing session {uuid} cleanly",
)


def cycle_lines(cycles: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(cycles):
        for template in CYCLE:
            lines.append(
                template.format(
                    a=rng.randint(0, 255),
                    b=rng.randint(1, 254),
                    port=rng.randint(1024, 65535),
                    n=rng.randint(1, 99999),
                    hex=f"0x{rng.getrandbits(32):08x}",
                    ms=rng.randint(1, 900),
                    ratio=round(rng.random(), 3),
                    shard=rng.randint(1, 64),
                    uuid="-".join(f"{rng.getrandbits(4 * n):0{n}x}" for n in (8, 4, 4, 4, 12)),
                )
            )
    return lines


# --- masking and Drain ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "masked"),
    [
        ("Connection from 10.0.0.5:5432 closed after 12.5s", "Connection from <IP> closed after <NUM>s"),
        ("read /var/log/app/server.log and C:\\Temp\\x.log", "read <PATH> and <PATH>"),
        ("session 550e8400-e29b-41d4-a716-446655440000 ok", "session <UUID> ok"),
        ("ptr 0x7fff5fbff8a8 id deadbeef1234", "ptr <HEX> id <HEX>"),
        ("block blk_-1608999687919862906 terminating", "block blk_-<NUM> terminating"),
        ("peer fe80::1ff:fe23:4567:890a up", "peer <IP> up"),
        ("at 2024-01-01T10:00:00Z and 12:34:56.789", "at <TIME> and <TIME>"),
        ("mail bob@example.com via https://mx.example.com/x?y=1", "mail <EMAIL> via <URL>"),
        ("nic 00:1A:2B:3C:4D:5E down", "nic <MAC> down"),
        ("retry 3 of -5 for worker-12", "retry <NUM> of <NUM> for worker-<NUM>"),
        ("std::vector grew", "std::vector grew"),
    ],
)
def test_variable_parts_are_masked(line: str, masked: str) -> None:
    """Numbers, ids, IPs, paths, times, URLs and addresses become typed placeholders; words stay."""
    assert mask(line) == masked


def test_drain_groups_lines_and_generalises_the_tokens_that_differ() -> None:
    """Lines of one shape share a template whose differing positions become <*>; other shapes get their own."""
    drain = Drain()
    first = drain.add("user alice logged in from 10.0.0.1")
    assert (first.created, first.template.text) == (True, "user alice logged in from <IP>")
    second = drain.add("user bob logged in from 10.0.0.2")
    assert (second.created, second.changed) == (False, True)
    assert second.template.template_id == first.template.template_id
    assert second.template.text == "user <*> logged in from <IP>"
    assert second.template.size == 2
    other = drain.add("disk sda1 is 91% full")
    longer = drain.add("user carol logged in from 10.0.0.3 twice")  # another token count: another template
    assert len({first.template.template_id, other.template.template_id, longer.template.template_id}) == 3
    assert drain.match("user dave logged in from 10.9.9.9") is first.template
    assert len(drain) == 3


def test_drain_similarity_threshold_decides_whether_a_line_joins() -> None:
    """With similarity 0.4, 2 of 4 equal tokens join a template and 1 of 4 does not (same first token)."""
    drain = Drain(similarity=0.4)
    base = drain.add("job alpha started now").template
    assert drain.add("job alpha finished later").template is base  # 2/4 = 0.5 >= 0.4
    assert drain.add("job beta failed badly").created  # 1/4 against the template "job alpha <*> <*>"


DPKG = """2025-06-24 14:36:25 startup archives unpack
2025-06-24 14:36:25 upgrade libsystemd0:amd64 252.36-1~deb12u1 252.38-1~deb12u1
2025-06-24 14:36:25 status triggers-pending libc-bin:amd64 2.36-9+deb12u10
2025-06-24 14:36:25 status half-configured libsystemd0:amd64 252.36-1~deb12u1
2025-06-24 14:36:25 status unpacked libsystemd0:amd64 252.36-1~deb12u1
2025-06-24 14:36:25 status half-installed libsystemd0:amd64 252.36-1~deb12u1
2025-06-24 14:36:26 status unpacked libsystemd0:amd64 252.38-1~deb12u1
2025-06-24 14:36:26 startup packages configure
2025-06-24 14:36:26 configure libsystemd0:amd64 252.38-1~deb12u1 <none>
2025-06-24 14:36:26 status unpacked libsystemd0:amd64 252.38-1~deb12u1
2025-06-24 14:36:26 status half-configured libsystemd0:amd64 252.38-1~deb12u1
2025-06-24 14:36:26 status installed libsystemd0:amd64 252.38-1~deb12u1
2025-06-24 14:36:26 trigproc libc-bin:amd64 2.36-9+deb12u10 <none>
2025-06-24 14:36:26 status half-configured libc-bin:amd64 2.36-9+deb12u10
2025-06-24 14:36:26 status installed libc-bin:amd64 2.36-9+deb12u10""".splitlines()


def dpkg_action(line: str) -> str:
    parts = line.split()
    return f"status {parts[3]}" if parts[2] == "status" else parts[2]


def test_the_default_template_settings_keep_dpkg_actions_apart() -> None:
    """With the defaults (depth 6, similarity 0.5) no template holds two dpkg actions; depth 4 / 0.4 merged them."""
    for settings, merged in ((LogSettings(), False), (LogSettings(drain_depth=4, drain_similarity=0.4), True)):
        source = LogSource("dpkg", settings)
        actions: dict[str, set[str]] = {}
        for line in DPKG:
            actions.setdefault(source.score_line(line).template_id, set()).add(dpkg_action(line))
        assert any(len(kinds) > 1 for kinds in actions.values()) == merged
    assert (LogSettings().drain_depth, LogSettings().drain_similarity) == (6, 0.5)


def test_drain_keeps_at_most_max_templates_and_prunes_its_tree() -> None:
    """Past max_templates the least recently matched template is forgotten and removed from the parse tree."""
    drain = Drain(max_templates=3)
    made = [drain.add(f"{word} happened {word}").template for word in ("alpha", "beta", "gamma")]
    drain.add("alpha happened alpha")  # alpha is now the most recent
    drain.add("delta happened delta")
    assert len(drain) == 3
    assert drain.get(made[1].template_id) is None  # beta was the least recent
    assert drain.match("beta happened beta") is None
    assert drain.match("alpha happened alpha") is made[0]
    assert sorted(t.text for t in drain.templates) == [
        "alpha happened alpha",
        "delta happened delta",
        "gamma happened gamma",
    ]


# --- the n-gram model -------------------------------------------------------------------------------------


def test_witten_bell_probabilities_match_hand_computed_values() -> None:
    """After A B A B A C (order 1) P(B|A) = 0.52, P(A|B) = 0.8, P(unseen|A) = 0.04, and P(.|A) sums to 1."""
    model = NGramModel(order=1)
    previous: tuple[str, ...] = ()
    for symbol in "ABABAC":
        model.observe(previous, symbol)
        previous = (symbol,)
    # Unigrams A3 B2 C1: N = 6, V = 3, P0(w) = (c + 1) / (N + V + 1): A 0.4, B 0.3, C 0.2, unseen 0.1.
    # After A: B twice, C once, so T = 2: P(w|A) = (c(A, w) + 2 P0(w)) / (3 + 2).
    assert model.probability(("A",), "B") == pytest.approx((2 + 2 * 0.3) / 5)
    assert model.probability(("A",), "C") == pytest.approx((1 + 2 * 0.2) / 5)
    assert model.probability(("A",), "A") == pytest.approx((0 + 2 * 0.4) / 5)
    assert model.probability(("A",), "Z") == pytest.approx((0 + 2 * 0.1) / 5)
    assert model.probability(("B",), "A") == pytest.approx((2 + 1 * 0.4) / 3)
    total = sum(model.probability(("A",), w) for w in "ABC") + model.probability(("A",), "unseen")
    assert total == pytest.approx(1.0)
    assert model.probability(("Q",), "B") == pytest.approx(0.3)  # an unknown context backs off entirely


def test_top_k_check_ranks_the_followers_of_the_longest_known_context() -> None:
    """A template is predicted when among the k most frequent after its context; ties share a rank."""
    model = NGramModel(order=2)
    for follower, times in (("X", 5), ("Y", 3), ("Z", 3), ("W", 1)):
        for _ in range(times):
            model.observe(("A", "B"), follower)
    assert model.predicted(("A", "B"), "X", 1) == (True, 1)
    assert model.predicted(("A", "B"), "Y", 2) == (True, 2)
    assert model.predicted(("A", "B"), "Z", 2) == (True, 2)
    assert model.predicted(("A", "B"), "W", 3) == (False, 4)
    assert model.predicted(("A", "B"), "V", 9) == (False, None)
    # (Q, B) is unknown: the longest known context is (B,), whose followers are the same.
    assert model.predicted(("Q", "B"), "X", 1) == (True, 1)


def test_the_model_keeps_at_most_max_ngrams_counts() -> None:
    """Past max_ngrams the least recently used contexts are dropped; the vocabulary is bounded too."""
    model = NGramModel(order=2, max_ngrams=50, max_vocabulary=20)
    rng = random.Random(1)
    previous: list[str] = []
    for _ in range(2000):
        symbol = f"s{rng.randrange(40)}"
        model.observe(tuple(previous[-2:]), symbol)
        previous.append(symbol)
    assert model.entries <= 50 + 20
    assert model.vocabulary == 20


# --- percentiles and severity -----------------------------------------------------------------------------


def test_score_window_percentiles_interpolate_between_ranks() -> None:
    """For 1..100 the 95th percentile is 95.05 and the 99.9th 99.901; the window forgets the oldest."""
    window = ScoreWindow(100)
    for value in range(1, 101):
        window.add(float(value))
    assert window.percentile(95) == pytest.approx(95.05)
    assert window.percentile(99) == pytest.approx(99.01)
    assert window.percentile(99.9) == pytest.approx(99.901)
    window.add(1000.0)  # pushes 1 out: now 2..100 and 1000
    assert len(window) == 100
    assert window.percentile(0) == 2.0
    assert window.percentile(100) == 1000.0


def test_severity_is_strictly_above_the_percentiles() -> None:
    """A score equal to a percentile does not reach its level; above p99.9 is HIGH unless the template was predicted."""
    thresholds = {"p95": 1.0, "p99": 2.0, "p99_9": 3.0}
    assert [grade(s, thresholds) for s in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5)] == [
        NONE,
        NONE,
        LOW,
        LOW,
        MED,
        MED,
        HIGH,
    ]
    assert grade(3.5, thresholds, predicted=True) == LOW
    same = {"p95": 2.0, "p99": 2.0, "p99_9": 2.0}
    assert grade(2.0, same) == NONE


# --- whole sources ----------------------------------------------------------------------------------------


def flagged(results: list[Any]) -> list[int]:
    return [i for i, result in enumerate(results) if result.severity in (MED, HIGH)]


def test_an_injected_unseen_template_is_the_one_line_flagged() -> None:
    """After 300 normal cycles, one never-seen line is HIGH (by its score alone) and no other line is flagged."""
    source = LogSource("api", LogSettings(new_template_lines=0))
    normal = cycle_lines(300)
    before = [source.score_line(line) for line in normal]
    assert [r.severity for r in before[:1000]] == [LEARNING] * 1000
    assert {r.severity for r in before[1000:]} == {NONE}
    after_lines = cycle_lines(4, seed=9)
    injected = "kernel: disk /dev/sdb1 I/O error at sector 88123, remounting read-only"
    stream = [*after_lines[:7], injected, *after_lines[7:]]
    results = [source.score_line(line) for line in stream]
    assert flagged(results) == [7]
    assert results[7].severity == HIGH
    assert results[7].new_template
    assert not results[7].predicted
    assert results[7].template == "kernel: disk <PATH> I/O error at sector <NUM>, remounting read-only"
    assert results[7].score > results[7].thresholds["p99_9"]


def test_a_new_template_stays_med_until_seen_new_template_lines_times() -> None:
    """A new error template is MED on each of its first new_template_lines lines, then graded by its score."""
    injected = "kernel: disk /dev/sdb1 I/O error at sector 88123, remounting read-only"
    for new_template_lines in (1, 3, 5):
        source = LogSource("api", LogSettings(new_template_lines=new_template_lines))
        for line in cycle_lines(300):
            source.score_line(line)
        results: list[LogScore] = []
        for cycle in range(8):
            lines = cycle_lines(1, seed=20 + cycle)
            results.extend(source.score_line(line) for line in lines[:3])
            results.append(source.score_line(injected.replace("88123", str(cycle))))
            results.extend(source.score_line(line) for line in lines[3:])
        errors = [r for r in results if r.template.startswith("kernel:")]
        assert [r.seen for r in errors] == list(range(1, 9))
        assert [r.severity for r in errors[:new_template_lines]] == [MED] * new_template_lines
        assert errors[0].score > (errors[0].thresholds or {})["p99_9"]  # by its score alone it would be HIGH
        after = errors[new_template_lines]
        assert after.severity == grade(after.score, after.thresholds or {}, predicted=after.predicted)
        assert [r.severity for r in results if not r.template.startswith("kernel:")].count(HIGH) == 0


def test_each_score_carries_the_templates_that_led_to_it() -> None:
    """sequence holds the previous lines' template ids, oldest first, at most sequence_length of them."""
    source = LogSource("api", LogSettings(sequence_length=4))
    results = [source.score_line(line) for line in cycle_lines(3)]
    ids = [r.template_id for r in results]
    assert len(set(ids)) == 5
    assert [r.sequence for r in results[:3]] == [(), (ids[0],), (ids[0], ids[1])]
    for i in range(4, 15):
        assert results[i].sequence == tuple(ids[i - 4 : i])
    off = LogSource("api", LogSettings(sequence_length=0, order=3))
    assert {off.score_line(line).sequence for line in cycle_lines(3)} == {()}
    short = LogSource("api", LogSettings(sequence_length=1, order=3))  # the model still sees 3 templates
    scores = [short.score_line(line) for line in cycle_lines(3)]
    assert [len(r.sequence) for r in scores] == [0] + [1] * 14
    longer = LogSource("api", LogSettings(sequence_length=10, order=3))
    assert [r.score for r in scores] == [longer.score_line(line).score for line in cycle_lines(3)]


def test_an_injected_unseen_order_flags_exactly_the_lines_with_unseen_transitions() -> None:
    """Swapping two lines of the cycle flags exactly the lines whose transition from the previous one never occurs."""
    source = LogSource("api")
    normal = cycle_lines(300)
    for line in normal:
        source.score_line(line)
    lines = cycle_lines(3, seed=5)
    lines[6], lines[7] = lines[7], lines[6]  # second cycle: A C B D E
    results = [source.score_line(line) for line in lines]
    # Worked out from the cycle alone: A->C, C->B and B->D never happen in normal traffic; D->E does.
    seen = {(CYCLE[i], CYCLE[(i + 1) % 5]) for i in range(5)}
    order = [CYCLE[i % 5] for i in range(15)]
    order[6], order[7] = order[7], order[6]
    unseen = [i for i in range(1, 15) if (order[i - 1], order[i]) not in seen]
    assert unseen == [6, 7, 8]
    assert flagged(results) == unseen


def test_a_source_whose_normal_lines_all_score_alike_raises_nothing() -> None:
    """One line repeated, or a fixed cycle, scores alike after warm-up: every line is NONE, none alerts."""
    repeated = LogSource("heartbeat")
    results = [repeated.score_line(f"heartbeat ok seq={i}") for i in range(3000)]
    assert {r.severity for r in results[1000:]} == {NONE}
    assert len({r.template_id for r in results}) == 1
    cyclic = LogSource("cron", LogSettings(warmup_lines=200))
    results = [cyclic.score_line(line) for line in cycle_lines(400)]
    assert [r.severity for r in results[:200]] == [LEARNING] * 200
    assert {r.severity for r in results[200:]} == {NONE}
    assert not any(r.alert for r in results)


def test_learning_lasts_warmup_lines_then_thresholds_apply() -> None:
    """With warmup_lines 20 the first 20 lines report LEARNING without thresholds; the 21st is graded."""
    source = LogSource("svc", LogSettings(warmup_lines=20))
    results = [source.score_line(line) for line in cycle_lines(5)]
    assert [r.severity for r in results[:20]] == [LEARNING] * 20
    assert all(r.thresholds is None for r in results[:20])
    assert results[20].severity == NONE
    assert set(results[20].thresholds or {}) == {"p95", "p99", "p99_9"}
    assert [r.lines_seen for r in results] == list(range(1, 26))


def test_scores_are_minus_log_probabilities_of_the_model() -> None:
    """The first line of a new source has P = 1/(0+0+1), score 0; the second, unseen, P = 1/3, score ln 3."""
    source = LogSource("svc")
    assert source.score_line("alpha started").score == 0.0
    assert source.score_line("beta stopped suddenly").score == pytest.approx(math.log(3))


def test_templates_can_be_scored_by_id() -> None:
    """A caller's own template ids are symbols of the same model; a mined T<n> id reports its template text."""
    source = LogSource("svc", LogSettings(warmup_lines=10))
    for _ in range(20):
        for symbol in ("E1", "E2", "E3"):
            source.score_template(symbol)
    assert source.score_template("E1").severity == NONE
    odd = source.score_template("E3")  # E3 after E1: never seen
    assert (odd.severity, odd.predicted, odd.rank) == (HIGH, False, None)
    mined = source.score_line("worker 7 finished job 12")
    by_id = source.score_template(mined.template_id)
    assert (by_id.template_id, by_id.template) == (mined.template_id, "worker <NUM> finished job <NUM>")
    assert source.score_template("E9").new_template


def test_sources_are_bounded_by_count_and_idle_time() -> None:
    """max_sources evicts the least recently used source; source_ttl_s forgets idle ones."""
    scorer = LogScorer(LogSettings(max_sources=2, source_ttl_s=60))
    scorer.score_line("a", "x happened", now=0.0)
    scorer.score_line("b", "y happened", now=10.0)
    scorer.score_line("a", "x happened", now=20.0)
    scorer.score_line("c", "z happened", now=30.0)
    assert ("a" in scorer, "b" in scorer, "c" in scorer) == (True, False, True)
    assert scorer.expire(80.0) == []
    assert scorer.expire(80.5) == ["a"]
    assert len(scorer) == 1
    with pytest.raises(ValueError, match="source must be a non-empty string"):
        scorer.score_line("", "x", now=0.0)


def test_settings_are_read_from_config_and_checked() -> None:
    """Every default can be set through ctx.config; a bad value names its key."""
    assert LogSettings.from_config({}) == LogSettings()
    custom = LogSettings.from_config({"order": 3, "top_k": 0, "warmup_lines": 10.0, "drain_similarity": 0.5})
    assert (custom.order, custom.top_k, custom.warmup_lines, custom.drain_similarity) == (3, 0, 10, 0.5)
    novelty = LogSettings.from_config({"new_template_lines": 0, "sequence_length": 25})
    assert (novelty.new_template_lines, novelty.sequence_length) == (0, 25)
    bad = (("order", 0), ("warmup_lines", "many"), ("drain_similarity", 1.5), ("max_sources", True))
    for key, value in (*bad, ("new_template_lines", -1), ("sequence_length", 2.5)):
        with pytest.raises(ValueError, match=key):
            LogSettings.from_config({key: value})
    with pytest.raises(ValueError, match="low_percentile <= med_percentile"):
        LogSettings.from_config({"low_percentile": 99.5})


def test_stats_are_reported_every_interval_of_the_given_clock() -> None:
    """Totals of lines, alerts and errors, and lines per second over the last interval, once per interval."""
    source = LogSource("api", LogSettings(warmup_lines=10, new_template_lines=1))
    stats = LogStats(60.0, start=1000.0)
    for line in cycle_lines(4):
        stats.count(source.score_line(line))
    stats.count(source.score_line("fatal: ledger checksum mismatch on page 12"))
    stats.count(None)
    assert stats.due(1059.9) is None
    assert stats.due(1060.0) == {
        "lines": 22,
        "alerts": 1,
        "errors": 1,
        "lines_per_s": 22 / 60,
        "interval_s": 60.0,
        "uptime_s": 60.0,
    }
    assert stats.due(1061.0) is None
    for line in cycle_lines(6):
        stats.count(source.score_line(line))
    report = stats.due(1150.0)
    assert report is not None
    assert (report["lines"], report["alerts"], report["errors"]) == (52, 1, 1)
    assert report["lines_per_s"] == pytest.approx(30 / 90)
    assert (report["interval_s"], report["uptime_s"]) == (90.0, 150.0)
    off = LogStats(0, start=0.0)
    off.count(None)
    assert off.due(1e9) is None
