"""Which event types are streaming events: the default rules and custom ones."""

from __future__ import annotations

import pytest

from nexus.detect import DEFAULT_RULES, Rule, StreamingDetector
from nexus.errors import ErrorCode, InvalidArgument


@pytest.mark.parametrize(
    "event_type",
    [
        "demo:stream_x:v1:requested",
        "messaging:stream_messages:v2:requested",
        "demo:stream_:v1:requested",
        "svc:stream:v1:requested",
        "messaging:typing:v1:requested",
        "users:presence:v1:requested",
        "files:chunks:v1:requested",
        "scores:live:v1:requested",
        "market:realtime:v3:requested",
    ],
)
def test_default_rules_detect_streaming(event_type: str) -> None:
    """Types with a ``stream_`` action or one of the marker tokens are streaming events by default."""
    assert StreamingDetector().is_streaming(event_type)


@pytest.mark.parametrize(
    "event_type",
    [
        "demo:echo:v1:requested",
        "places:encounter:v1:started",
        "demo:streamx:v1:requested",
        "demo:xstream_y:v1:requested",
        "demo:live_scores:v1:requested",
        "demo:typings:v1:requested",
        "demo:echo:v1:stream",
        "demo:echo:v1:live",
    ],
)
def test_plain_types_are_not_streaming(event_type: str) -> None:
    """Types that merely resemble the markers (or end with one, without a following ':') are not streaming."""
    assert not StreamingDetector().is_streaming(event_type)


@pytest.mark.parametrize(
    ("event_type", "rule"),
    [
        ("demo:stream_x:v1:requested", "action_prefix:stream_"),
        ("svc:stream:v1:requested", "contains::stream:"),
        ("messaging:typing:v1:requested", "contains::typing:"),
        ("users:presence:v1:requested", "contains::presence:"),
        ("files:chunks:v1:requested", "contains::chunks:"),
        ("scores:live:v1:requested", "contains::live:"),
        ("market:realtime:v1:requested", "contains::realtime:"),
    ],
)
def test_rule_for_names_the_rule(event_type: str, rule: str) -> None:
    """Each default rule is the one reported for the type it covers."""
    found = StreamingDetector().rule_for(event_type)
    assert found is not None
    assert str(found) == rule


def test_default_rules_are_the_contract() -> None:
    """The default rule set is exactly the contract's prefix and six markers."""
    assert set(DEFAULT_RULES) == {
        "action_prefix:stream_",
        "contains::stream:",
        "contains::typing:",
        "contains::presence:",
        "contains::chunks:",
        "contains::live:",
        "contains::realtime:",
    }


def test_custom_rules_replace_defaults() -> None:
    """A detector built from custom rules uses only those rules."""
    detector = StreamingDetector(["action:chat", "action_prefix:feed_", "contains::ticker:"])
    assert detector.is_streaming("x:chat:v1:requested")
    assert not detector.is_streaming("x:chatter:v1:requested")
    assert detector.is_streaming("x:feed_news:v1:requested")
    assert detector.is_streaming("x:ticker:v1:requested")
    assert not detector.is_streaming("x:stream_y:v1:requested")
    assert not detector.is_streaming("x:typing:v1:requested")


def test_no_rules_means_nothing_streams() -> None:
    """With an empty rule set no type is streaming."""
    assert not StreamingDetector([]).is_streaming("demo:stream_x:v1:requested")


def test_rule_parse_round_trips() -> None:
    """A rule's text parses into its kind and value and prints back the same."""
    rule = Rule.parse("contains::live:")
    assert (rule.kind, rule.value) == ("contains", ":live:")
    assert str(rule) == "contains::live:"


@pytest.mark.parametrize("text", ["", "stream_", "prefix:stream_", "contains:", "action:", "action_prefix", ":x"])
def test_bad_rule_text_raises(text: str) -> None:
    """Rule text with an unknown kind or an empty value raises InvalidArgument quoting the text."""
    with pytest.raises(InvalidArgument) as info:
        Rule.parse(text)
    assert repr(text) in str(info.value)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument):
        StreamingDetector(["action:ok", text])


@pytest.mark.parametrize(
    ("service_action", "rule"),
    [
        ("svc:stream_x", "action_prefix:stream_"),
        ("messaging:typing", "contains::typing:"),
        ("svc:stream_x:v3", "action_prefix:stream_"),
        ("messaging:live:v2", "contains::live:"),
        ("demo:echo", None),
        ("demo:echo:v2", None),
    ],
)
def test_check_requested(service_action: str, rule: str | None) -> None:
    """``check_requested`` applies the rules to the requests a ``service:action[:vN]`` handler receives."""
    found = StreamingDetector().check_requested(service_action)
    assert (str(found) if found is not None else None) == rule


def test_a_contains_rule_naming_a_version_holds_for_that_version_only() -> None:
    """A ``contains`` rule that names a version applies to the handlers registered at that version, and a handler
    registered without one is at version 1."""
    detector = StreamingDetector(["contains::v1:"])
    assert str(detector.check_requested("demo:echo")) == "contains::v1:"
    assert str(detector.check_requested("demo:echo:v1")) == "contains::v1:"
    assert detector.check_requested("demo:echo:v2") is None
    assert detector.check_requested("demo:echo:v10") is None


def test_a_rule_reads_the_action_of_a_shorter_type() -> None:
    """A rule applies to ``service:action`` as to a full type, and a text without an action token falls under
    no action rule (it is not an error)."""
    detector = StreamingDetector(["action_prefix:stream_", "action:chat"])
    assert detector.is_streaming("svc:stream_x")
    assert detector.is_streaming("svc:chat")
    assert not detector.is_streaming("stream_x")
    assert not detector.is_streaming("chat")
