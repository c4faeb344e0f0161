"""Subscription patterns, the reference matcher and the trie index that must agree with it."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus import InvalidPattern
from nexus.errors import ResourceExhausted
from nexus.patterns import (
    PatternIndex,
    PatternSet,
    check_pattern_count,
    parse_pattern,
    pattern_matches,
    validate_pattern,
)

# --- parse_pattern ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        (">", (">",)),
        ("places:>", ("places", ">")),
        ("messaging:*:v1:*", ("messaging", "*", "v1", "*")),
        ("a:b:v1:>", ("a", "b", "v1", ">")),
        ("a:b:>", ("a", "b", ">")),
        ("*:*:*:*", ("*", "*", "*", "*")),
        ("*:>", ("*", ">")),
        ("demo:echo:v1:requested", ("demo", "echo", "v1", "requested")),
    ],
)
def test_valid_patterns(text: str, tokens: tuple[str, ...]) -> None:
    """Valid patterns (literal tokens, ``*`` and a final ``>``) split into their tokens."""
    assert parse_pattern(text) == tokens
    assert validate_pattern(text) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (">:a", "'>' may only be the last token"),
        ("a:>:v1:b", "'>' may only be the last token"),
        ("a:b:>:>", "'>' may only be the last token"),
        ("A:>", "service 'A'"),
        ("a:B:v1:*", "action 'B'"),
        ("a:b:v0:*", "version 'v0'"),
        ("a:b:x1:*", "version 'x1'"),
        ("a:b:v1:C", "state 'C'"),
        ("a:b:v1:", "state is empty"),
        ("", "service is empty"),
        ("a**:>", "service 'a**'"),
        ("a:b:v1:c:d", "more than 4"),
        ("a:b:v1:c:>", "more than 4"),
        ("a:b", "2 tokens; a pattern has 4 tokens <service>:<action>:v<N>:<state>, or fewer ending in '>'"),
        ("a:b:v1", "3 tokens"),
        ("*", "1 tokens"),
        ("a", "1 tokens"),
    ],
)
def test_invalid_patterns(text: str, message: str) -> None:
    """Invalid patterns are rejected with a message naming the problem or the bad token."""
    with pytest.raises(InvalidPattern, match=re.escape(message)):
        parse_pattern(text)


def test_non_string_pattern() -> None:
    """A pattern that is not a string is rejected with InvalidPattern."""
    bad: Any = None
    with pytest.raises(InvalidPattern, match="must be a string"):
        parse_pattern(bad)


@pytest.mark.parametrize(
    ("pattern", "event_type", "expected"),
    [
        (">", "a:b:v1:c", True),
        ("places:>", "places:encounter:v1:started", True),
        ("places:>", "placesx:encounter:v1:started", False),
        ("messaging:*:v1:*", "messaging:typing:v1:stream", True),
        ("messaging:*:v1:*", "messaging:typing:v2:stream", False),
        ("a:b:v1:>", "a:b:v1:c", True),
        ("a:b:v1:>", "a:b:v2:c", False),
        ("a:b:v1:c", "a:b:v1:c", True),
        ("a:b:v1:c", "a:b:v1:d", False),
        ("*:*:*:*", "a:b:v1:c", True),
        ("a:b:>", "a:b:v9:zzz", True),
    ],
)
def test_pattern_matches(pattern: str, event_type: str, expected: bool) -> None:
    """``*`` matches exactly one token, ``>`` the remaining ones, literals themselves."""
    assert pattern_matches(pattern, event_type) is expected


# --- PatternIndex ---------------------------------------------------------------------------------------------


def test_index_add_match_remove() -> None:
    """Keys are found by the event types their patterns match, and no longer after removal."""
    index: PatternIndex[str] = PatternIndex()
    index.add("places:>", "p")
    index.add("messaging:*:v1:*", "m")
    index.add(">", "all")
    index.add("demo:echo:v1:requested", "exact")
    assert index.match("places:encounter:v1:started") == {"p", "all"}
    assert index.match("messaging:typing:v1:stream") == {"m", "all"}
    assert index.match("demo:echo:v1:requested") == {"exact", "all"}
    assert index.match("demo:echo:v1:success") == {"all"}
    assert index.remove(">", "all") is True
    assert index.match("demo:echo:v1:success") == set()
    assert index.remove("places:>", "p") is True
    assert index.match("places:encounter:v1:started") == set()
    assert len(index) == 2


def test_remove_unknown_returns_false() -> None:
    """Removing a pattern or key that was never added reports False and changes nothing."""
    index: PatternIndex[str] = PatternIndex()
    index.add("a:b:v1:c", "k")
    assert index.remove("a:b:v1:c", "other") is False
    assert index.remove("a:b:v1:d", "k") is False
    assert index.remove("a:>", "k") is False
    assert index.remove(">", "k") is False
    assert len(index) == 1
    assert index.match("a:b:v1:c") == {"k"}


def test_remove_validates_pattern() -> None:
    """Removing an invalid pattern raises InvalidPattern."""
    index: PatternIndex[str] = PatternIndex()
    with pytest.raises(InvalidPattern):
        index.remove("a:b", "k")
    with pytest.raises(InvalidPattern):
        index.add("A:>", "k")
    assert len(index) == 0


def test_reference_counting() -> None:
    """The same key added twice under one pattern still matches after one removal, not after two."""
    index: PatternIndex[str] = PatternIndex()
    for pattern in ("a:b:v1:c", "a:>"):
        index.add(pattern, "k")
        index.add(pattern, "k")
        assert index.remove(pattern, "k") is True
        assert index.match("a:b:v1:c") == {"k"}
        assert index.remove(pattern, "k") is True
        assert index.match("a:b:v1:c") == set()
        assert index.remove(pattern, "k") is False
    assert len(index) == 0


def test_key_under_several_patterns_returned_once() -> None:
    """A key registered under several matching patterns is returned once."""
    index: PatternIndex[int] = PatternIndex()
    for pattern in (">", "a:>", "a:*:v1:*", "a:b:v1:c", "*:b:>"):
        index.add(pattern, 1)
    index.add("a:b:v1:c", 2)
    assert index.match("a:b:v1:c") == {1, 2}
    assert len(index) == 6
    assert sorted(index.patterns()) == sorted(
        [(">", 1), ("a:>", 1), ("a:*:v1:*", 1), ("a:b:v1:c", 1), ("*:b:>", 1), ("a:b:v1:c", 2)]
    )


def test_patterns_lists_each_pair_once() -> None:
    """``patterns()`` lists a (pattern, key) pair once however many times it was added."""
    index: PatternIndex[str] = PatternIndex()
    index.add("a:b:v1:c", "k")
    index.add("a:b:v1:c", "k")
    index.add("a:>", "k")
    index.add("a:>", "k")
    assert sorted(index.patterns()) == [("a:>", "k"), ("a:b:v1:c", "k")]
    assert len(index) == 4


def test_pruning_leaves_an_empty_index() -> None:
    """After every registration is removed the index is empty: no size, no patterns, no trie nodes left."""
    index: PatternIndex[str] = PatternIndex()
    pairs = [
        (">", "a"),
        ("x:>", "b"),
        ("x:y:v1:z", "c"),
        ("x:y:v1:>", "d"),
        ("x:*:v2:*", "e"),
        ("*:*:*:*", "f"),
        ("x:y:v1:z", "c"),
    ]
    for pattern, key in pairs:
        index.add(pattern, key)
    for pattern, key in pairs:
        assert index.remove(pattern, key) is True
    assert len(index) == 0
    assert list(index.patterns()) == []
    assert index._root.children == {}
    assert index._root.keys == {}
    assert index._root.rest_keys == {}


def test_pruning_keeps_shared_branches() -> None:
    """Removing one pattern keeps the branches other patterns still use."""
    index: PatternIndex[str] = PatternIndex()
    index.add("x:y:v1:z", "a")
    index.add("x:y:v1:w", "b")
    index.add("x:y:>", "c")
    assert index.remove("x:y:v1:z", "a")
    assert index.match("x:y:v1:w") == {"b", "c"}
    assert index.remove("x:y:v1:w", "b")
    assert index.match("x:y:v1:w") == {"c"}
    assert list(index.patterns()) == [("x:y:>", "c")]
    assert list(index._root.children["x"].children["y"].children) == []


# --- property: the index agrees with the reference matcher ----------------------------------------------------

NAME_TOKENS = ("a", "b", "c")
VERSION_TOKENS = ("v1", "v2")


def _literal(position: int) -> st.SearchStrategy[str]:
    return st.sampled_from(VERSION_TOKENS if position == 2 else NAME_TOKENS)


@st.composite
def patterns_strategy(draw: st.DrawFn) -> str:
    """A valid pattern: up to four tokens of literals and ``*``, or fewer ending in ``>``."""
    ends_with_rest = draw(st.booleans())
    length = draw(st.integers(min_value=0, max_value=3)) if ends_with_rest else 4
    tokens = [draw(st.one_of(_literal(i), st.just("*"))) for i in range(length)]
    if ends_with_rest:
        tokens.append(">")
    return ":".join(tokens)


event_types = st.tuples(_literal(0), _literal(1), _literal(2), _literal(3)).map(":".join)
odd_event_types = st.lists(st.sampled_from(("a", "b", "v1", "")), min_size=1, max_size=6).map(":".join)


@settings(max_examples=200, deadline=None)
@given(
    registrations=st.lists(st.tuples(patterns_strategy(), st.integers(0, 5)), max_size=25),
    queries=st.lists(st.one_of(event_types, odd_event_types), min_size=1, max_size=15),
    removals=st.lists(st.integers(min_value=0, max_value=30), max_size=25),
)
def test_index_agrees_with_reference(
    registrations: list[tuple[str, int]], queries: list[str], removals: list[int]
) -> None:
    """For random patterns and event types, the index matches exactly what ``pattern_matches`` says, also
    after random removals."""
    index: PatternIndex[int] = PatternIndex()
    live = list(registrations)
    for pattern, key in registrations:
        index.add(pattern, key)

    def check() -> None:
        assert len(index) == len(live)
        assert set(index.patterns()) == set(live)
        for event_type in queries:
            expected = {key for pattern, key in live if pattern_matches(pattern, event_type)}
            assert index.match(event_type) == expected, event_type

    check()
    for position in removals:
        if not live:
            break
        pattern, key = live.pop(position % len(live))
        assert index.remove(pattern, key) is True
        check()
    for pattern, key in list(live):
        live.remove((pattern, key))
        assert index.remove(pattern, key) is True
    check()
    assert index._root.children == {}


# --- PatternSet -----------------------------------------------------------------------------------------------


def test_pattern_set_basics() -> None:
    """A PatternSet validates, counts distinct patterns, matches, and ``discard`` removes every copy."""
    patterns = PatternSet(["places:>", "messaging:*:v1:*", "places:>"])
    assert len(patterns) == 2
    assert "places:>" in patterns
    assert "other:>" not in patterns
    assert sorted(patterns) == ["messaging:*:v1:*", "places:>"]
    assert patterns.matches("places:encounter:v1:started")
    assert patterns.matches("messaging:typing:v1:stream")
    assert not patterns.matches("demo:echo:v1:requested")
    patterns.discard("places:>")
    assert "places:>" not in patterns
    assert not patterns.matches("places:encounter:v1:started")
    patterns.discard("never:>")
    assert len(patterns) == 1


def test_pattern_set_rejects_invalid() -> None:
    """Adding or discarding an invalid pattern raises InvalidPattern and leaves the set unchanged."""
    patterns = PatternSet()
    with pytest.raises(InvalidPattern):
        patterns.add("a:b")
    with pytest.raises(InvalidPattern):
        patterns.discard(">:a")
    with pytest.raises(InvalidPattern):
        PatternSet(["ok:>", "Bad:>"])
    assert len(patterns) == 0
    assert not patterns.matches("a:b:v1:c")


def test_empty_pattern_set_matches_nothing() -> None:
    """An empty PatternSet matches no event type."""
    assert not PatternSet().matches("a:b:v1:c")


def test_a_subscription_may_hold_exactly_the_pattern_limit() -> None:
    """check_pattern_count accepts ``limit`` patterns and refuses one more, naming both numbers."""
    check_pattern_count(3, limit=3)
    with pytest.raises(ResourceExhausted, match=r"^4 patterns in one subscription, over the limit of 3$"):
        check_pattern_count(4, limit=3)
