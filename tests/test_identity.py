"""Principals and pattern scopes, tested without a loop."""

from __future__ import annotations

import pytest

from nexus.identity import LOCAL, Principal, covers


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        (">", "a:b:v1:c", True),
        (">", ">", True),
        ("a:>", "a:b:v1:c", True),
        ("a:>", "a:>", True),
        ("a:>", ">", False),
        ("a:>", "b:>", False),
        ("a:*:v1:*", "a:b:v1:c", True),
        ("a:*:v1:*", "a:*:v1:c", True),
        ("a:*:v1:*", "a:>", False),
        ("a:b:v1:c", "a:*:v1:c", False),
        ("a:b:v1:c", "a:b:v1:c", True),
        ("a:b:v1:>", "a:b:v1:c", True),
        ("a:b:v1:>", "a:b:v2:c", False),
    ],
)
def test_covers_means_every_match_of_the_inner_pattern_is_a_match_of_the_outer(
    outer: str, inner: str, expected: bool
) -> None:
    """A scope pattern covers a requested pattern only when nothing the latter matches escapes the former."""
    assert covers(outer, inner) is expected


def test_scopes_owners_and_admins() -> None:
    """Publish and subscribe scopes are checked by pattern cover; an admin may anything; owners are per user,
    or per connection when anonymous."""
    alice = Principal("c1", "alice", authenticated=True, publish=("demo:>",), subscribe=("demo:*:v1:*",))
    assert alice.may_publish("demo:echo:v1:requested")
    assert not alice.may_publish("other:echo:v1:requested")
    assert alice.may_subscribe("demo:echo:v1:*")
    assert alice.out_of_scope(["demo:>", "demo:x:v1:y"]) == ["demo:>"]
    assert alice.owner == "user:alice"
    assert Principal("c2").owner == "connection:c2"
    assert alice.owns("user:alice")
    assert not alice.owns("user:bob")
    assert LOCAL.owns("user:bob")
    assert Principal("c3", publish=()).may_publish("demo:echo:v1:requested") is False
    assert Principal("c4").may_subscribe(">")
