"""The event grammar, payload and metadata validation, times, and ``Event.create``."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from datetime import UTC, datetime
from typing import Any

import fuzz_strategies
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nexus.events as events_module
from nexus import Event, EventType, InvalidEventType, InvalidPayload, parse_time
from nexus.errors import AlreadyExists, ErrorCode, InvalidState, NexusError, PayloadTooLarge, error_for_code
from nexus.events import (
    LIFECYCLE_STATES,
    TERMINAL_STATES,
    EventLimits,
    check_event,
    json_shape_problem,
    quote,
    validate_event_type,
    validate_metadata,
    validate_payload,
)

GRAMMAR = re.compile(r"[a-z][a-z0-9_]{0,127}:[a-z][a-z0-9_]{0,127}:v[1-9][0-9]*:[a-z][a-z0-9_]{0,127}")

names = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True)
versions = st.integers(min_value=1, max_value=10**6)


# --- event types --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "demo:echo:v1:requested",
        "places:encounter:v1:started",
        "a:b:v1:c",
        "svc_1:act_2:v10:state_3",
        "x9:y_:v123456:z",
        "messaging:stream_messages:v2:requested",
    ],
)
def test_valid_event_types_parse(text: str) -> None:
    """A well-formed ``service:action:vN:state`` type is accepted and prints back unchanged."""
    parsed = EventType.parse(text)
    assert str(parsed) == text
    assert validate_event_type(text) == text


def test_parse_splits_into_fields() -> None:
    """Parsing exposes the service, action, integer version, state and the shared base."""
    parsed = EventType.parse("demo:stream_x:v12:heartbeat")
    assert parsed.service == "demo"
    assert parsed.action == "stream_x"
    assert parsed.version == 12
    assert parsed.state == "heartbeat"
    assert parsed.base == "demo:stream_x:v12"
    assert str(parsed.with_state("success")) == "demo:stream_x:v12:success"


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("Demo:echo:v1:requested", "service"),
        ("1demo:echo:v1:requested", "service"),
        (":echo:v1:requested", "service"),
        ("demo:Echo:v1:requested", "action"),
        ("demo:ec-ho:v1:requested", "action"),
        ("demo::v1:requested", "action"),
        ("demo:echo:v0:requested", "version"),
        ("demo:echo:1:requested", "version"),
        ("demo:echo:V1:requested", "version"),
        ("demo:echo:v01:requested", "version"),
        ("demo:echo:v:requested", "version"),
        ("demo:echo:v1x:requested", "version"),
        ("demo:echo:v1:Requested", "state"),
        ("demo:echo:v1:", "state"),
        ("demo:echo:v1:requested\n", "state"),
        ("demo:echo:v1:req uested", "state"),
    ],
)
def test_invalid_token_is_named(text: str, token: str) -> None:
    """A bad event type is rejected with a message that names the wrong token."""
    with pytest.raises(InvalidEventType) as info:
        EventType.parse(text)
    problem = str(info.value).rsplit("': ", 1)[1]
    assert problem.startswith(f"{token} ")
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


def test_message_names_only_the_bad_token() -> None:
    """The error for a bad version talks about the version, not about the other tokens."""
    with pytest.raises(InvalidEventType) as info:
        EventType.parse("demo:echo:v0:requested")
    assert "version 'v0'" in str(info.value)
    with pytest.raises(InvalidEventType) as info:
        EventType.parse("demo:ECHO:v1:requested")
    assert "action 'ECHO'" in str(info.value)


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("demo:echo:v1", 3),
        ("demo:echo:v1:requested:extra", 5),
        ("", 1),
        ("demo", 1),
        ("a:b:v1:c:d:e", 6),
    ],
)
def test_wrong_token_count_is_rejected(text: str, count: int) -> None:
    """A type with other than four tokens (empty included) is rejected, saying how many it had."""
    with pytest.raises(InvalidEventType, match=f"expected 4 .*got {count}"):
        EventType.parse(text)


def test_token_length_limit() -> None:
    """A token longer than 128 characters is rejected; one of exactly 128 is fine."""
    EventType.parse(f"{'a' * 128}:b:v1:c")
    with pytest.raises(InvalidEventType, match="service is longer than 128"):
        EventType.parse(f"{'a' * 129}:b:v1:c")


def test_non_string_type_is_rejected() -> None:
    """Passing something other than a string as the type raises InvalidEventType, not a TypeError."""
    bad: Any = 42
    with pytest.raises(InvalidEventType, match="must be a string"):
        EventType.parse(bad)


@pytest.mark.parametrize("state", ["stream", "heartbeat", "requested", "started", "success", "cancelled"])
def test_lifecycle_states_are_publishable_types(state: str) -> None:
    """Lifecycle states such as ``stream`` and ``heartbeat`` make valid event types to publish."""
    event = Event.create(f"demo:stream_x:v1:{state}", {"i": 1})
    assert event.state == state
    assert event.type.state == state


def test_lifecycle_state_sets() -> None:
    """The eight lifecycle states of the contract are known, four of them terminal."""
    assert {"success", "failed", "timeout", "cancelled"} == TERMINAL_STATES
    assert {"requested", "started", "stream", "heartbeat"} | TERMINAL_STATES == LIFECYCLE_STATES


@given(service=names, action=names, version=versions, state=names)
def test_generated_types_round_trip(service: str, action: str, version: int, state: str) -> None:
    """Any type built from valid tokens parses to those tokens and prints back to the same text."""
    text = f"{service}:{action}:v{version}:{state}"
    parsed = EventType.parse(text)
    assert (parsed.service, parsed.action, parsed.version, parsed.state) == (service, action, version, state)
    assert str(parsed) == text
    assert EventType.parse(str(parsed)) == parsed


@given(st.text(alphabet="abAZ09_:v- \n", max_size=24))
def test_parse_accepts_exactly_the_grammar(text: str) -> None:
    """Arbitrary text parses if and only if it matches the documented grammar."""
    try:
        EventType.parse(text)
    except InvalidEventType:
        assert GRAMMAR.fullmatch(text) is None
    else:
        assert GRAMMAR.fullmatch(text) is not None


# --- payloads -----------------------------------------------------------------------------------------------


def test_payload_none_is_empty_object() -> None:
    """A missing payload stands for the empty object."""
    assert validate_payload(None) == {}


@pytest.mark.parametrize("payload", [[1, 2], "text", 3, 2.5, True, b"{}"])
def test_payload_must_be_an_object(payload: Any) -> None:
    """A payload that is not a JSON object is rejected, naming what it was."""
    with pytest.raises(InvalidPayload, match="must be a JSON object"):
        validate_payload(payload)


def test_valid_nested_payload_is_kept() -> None:
    """A JSON object with nested lists, objects and every scalar type is accepted unchanged."""
    payload = {"a": [1, 2.5, "x", None, True, {"b": [{"c": -0.0}]}], "d": {"e": {}}}
    assert validate_payload(payload) == payload


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        ({"x": math.nan}, "payload.x"),
        ({"x": math.inf}, "payload.x"),
        ({"x": -math.inf}, "payload.x"),
        ({"a": [1, {"b": [0, 0, math.nan]}]}, "payload.a[1].b[2]"),
        ({"a": {"b": {"c": {"d": [[math.inf]]}}}}, "payload.a.b.c.d[0][0]"),
        ({"a": (1.0, math.nan)}, "payload.a[1]"),
    ],
)
def test_nan_and_infinity_rejected_with_path(payload: dict[str, Any], path: str) -> None:
    """NaN and Infinity anywhere in a payload are rejected with a message naming where."""
    with pytest.raises(InvalidPayload) as info:
        validate_payload(payload)
    assert path in str(info.value)
    assert re.search(r"nan|inf", str(info.value))


def test_non_string_key_rejected() -> None:
    """An object key that is not a string is rejected, naming the key and where it sits."""
    with pytest.raises(InvalidPayload, match=r"payload\.a has a non-string key 1"):
        validate_payload({"a": {1: "x"}})
    bad: Any = {2: "x"}
    with pytest.raises(InvalidPayload, match="non-string key 2"):
        validate_payload(bad)


@pytest.mark.parametrize("value", [{1, 2}, object(), b"bytes", datetime.now(UTC)])
def test_non_json_values_rejected(value: object) -> None:
    """A value JSON cannot represent (a set, bytes, a datetime, ...) is rejected, naming its type."""
    with pytest.raises(InvalidPayload, match=rf"payload\.v holds a {type(value).__name__}"):
        validate_payload({"v": value})


def test_payload_size_limit() -> None:
    """A payload whose compact JSON is over the limit raises PayloadTooLarge; at the limit it passes."""
    payload = {"k": "x" * 100}
    size = len('{"k":""}') + 100
    assert validate_payload(payload, max_bytes=size) == payload
    with pytest.raises(PayloadTooLarge, match=f"{size + 1} bytes, over the limit of {size}") as info:
        validate_payload({"k": "x" * 101}, max_bytes=size)
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED


def test_payload_size_counts_utf8_bytes() -> None:
    """The size limit counts encoded bytes, so multi-byte characters count for more than one."""
    payload = {"k": "é" * 10}
    size = len('{"k":""}') + 20
    assert validate_payload(payload, max_bytes=size) == payload
    with pytest.raises(PayloadTooLarge):
        validate_payload(payload, max_bytes=size - 1)


# --- metadata -----------------------------------------------------------------------------------------------


def test_metadata_string_map_accepted() -> None:
    """A string-to-string map is accepted as metadata, and None is the empty map."""
    metadata = {"user_id": "u1", "traceparent": "00-x"}
    assert validate_metadata(metadata) == metadata
    assert validate_metadata(None) == {}


@pytest.mark.parametrize("metadata", [{"n": 1}, {"n": None}, {1: "x"}, {"n": ["a"]}])
def test_metadata_non_string_entries_rejected(metadata: Any) -> None:
    """Metadata entries that are not string to string are rejected."""
    with pytest.raises(InvalidPayload, match="must map a string to a string"):
        validate_metadata(metadata)


@pytest.mark.parametrize("metadata", [["a"], "text", 5])
def test_metadata_must_be_a_map(metadata: Any) -> None:
    """Metadata that is not an object is rejected."""
    with pytest.raises(InvalidPayload, match="metadata must be an object"):
        validate_metadata(metadata)


# --- times --------------------------------------------------------------------------------------------------

EPOCH_2024 = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-02T03:04:05Z", EPOCH_2024),
        ("2024-01-02T03:04:05z", EPOCH_2024),
        ("2024-01-02T03:04:05+00:00", EPOCH_2024),
        ("2024-01-02T05:04:05+02:00", EPOCH_2024),
        ("2024-01-01T22:04:05-05:00", EPOCH_2024),
        ("2024-01-02T03:04:05.250Z", EPOCH_2024 + 0.25),
        ("  2024-01-02T03:04:05Z  ", EPOCH_2024),
    ],
)
def test_parse_time_rfc3339(text: str, expected: float) -> None:
    """RFC 3339 text with ``Z`` or a numeric offset is read as the right epoch seconds."""
    assert parse_time(text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (1_700_000_000, 1.7e9), (1.5, 1.5), (10.0, 10.0)])
def test_parse_time_epoch_seconds(value: float, expected: float) -> None:
    """Epoch seconds given as an int or a float are returned as a float."""
    result = parse_time(value)
    assert result == expected
    assert isinstance(result, float)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2024-01-02T03:04:05", "no UTC offset"),
        ("2024-01-02", "no UTC offset"),
        ("yesterday", "not RFC 3339"),
        ("", "not RFC 3339"),
        (True, "not True"),
        (False, "not False"),
        (math.nan, "not a finite number"),
        (math.inf, "not a finite number"),
        (-math.inf, "not a finite number"),
        (None, "not NoneType"),
        ([1], "not list"),
        (datetime(2024, 1, 2), "not datetime"),
        pytest.param(10**400, "too large|not a finite number", id="integer-too-large-for-a-double"),
    ],
)
def test_parse_time_rejects(value: Any, message: str) -> None:
    """Naive times, booleans, NaN, Infinity and non-time values are rejected with a reason."""
    with pytest.raises(InvalidPayload, match=message):
        parse_time(value)


# --- Event.create -------------------------------------------------------------------------------------------


def test_create_fills_defaults() -> None:
    """A created event gets a fresh id, an RFC 3339 UTC timestamp and no offset yet."""
    first = Event.create("demo:echo:v1:requested", {"x": 1})
    second = Event.create("demo:echo:v1:requested", {"x": 1})
    assert first.event_id
    assert first.event_id != second.event_id
    assert first.payload == {"x": 1}
    assert first.metadata == {}
    assert first.offset == 0
    assert first.epoch == ""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first.timestamp)
    assert abs(parse_time(first.timestamp) - datetime.now(UTC).timestamp()) < 3600


def test_create_keeps_client_choices() -> None:
    """A client-chosen event id and metadata are kept as given."""
    event = Event.create("demo:echo:v1:requested", None, event_id="my-id", metadata={"user_id": "u"})
    assert event.event_id == "my-id"
    assert event.metadata == {"user_id": "u"}
    assert event.payload == {}
    assert event.correlation_id == ""


def test_create_validates_everything() -> None:
    """Event.create rejects a bad type, payload, metadata, event id or an oversized payload."""
    with pytest.raises(InvalidEventType, match="version"):
        Event.create("demo:echo:v0:requested")
    with pytest.raises(InvalidPayload, match=r"payload\.x"):
        Event.create("demo:echo:v1:requested", {"x": math.nan})
    with pytest.raises(InvalidPayload, match="metadata"):
        Event.create("demo:echo:v1:requested", metadata={"a": 1})
    bad_id: Any = 12
    with pytest.raises(InvalidPayload, match="event_id must be a string"):
        Event.create("demo:echo:v1:requested", event_id=bad_id)
    with pytest.raises(InvalidPayload, match="longer than 256"):
        Event.create("demo:echo:v1:requested", event_id="x" * 257)
    with pytest.raises(PayloadTooLarge):
        Event.create("demo:echo:v1:requested", {"k": "x" * 50}, max_payload_bytes=20)
    assert Event.create("demo:echo:v1:requested", event_id="x" * 256).event_id == "x" * 256


def test_event_accessors_and_stored_copy() -> None:
    """An event exposes its state and correlation id, and ``stored`` returns a copy with offset and epoch."""
    event = Event.create("demo:echo:v1:success", {"a": 1}, metadata={"correlation_id": "c1"})
    assert event.state == "success"
    assert event.correlation_id == "c1"
    stored = event.stored(7, "ep")
    assert (stored.offset, stored.epoch) == (7, "ep")
    assert (event.offset, event.epoch) == (0, "")
    assert stored.to_dict() == {
        "event_type": "demo:echo:v1:success",
        "event_id": event.event_id,
        "payload": {"a": 1},
        "metadata": {"correlation_id": "c1"},
        "timestamp": event.timestamp,
        "offset": 7,
        "epoch": "ep",
    }


def test_an_event_is_a_value_that_cannot_be_reassigned() -> None:
    """Fields of an event cannot be reassigned; evolve() and stored() return changed copies."""
    event = Event.create("demo:echo:v1:requested", {"a": 1}, event_id="e1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.event_id = "other"  # type: ignore[misc]
    renamed = event.evolve(event_id="e2", metadata={"user_id": "u"})
    assert (renamed.event_id, renamed.metadata) == ("e2", {"user_id": "u"})
    assert (event.event_id, event.metadata) == ("e1", {})
    assert renamed == event.evolve(event_id="e2", metadata={"user_id": "u"})


def test_a_request_type_is_parsed_once_on_its_way_through_a_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building, storing, routing and driving a request parses its type once (the edge's check)."""
    calls: list[str] = []
    original = EventType.parse.__func__  # type: ignore[attr-defined]

    def counting(cls: type[EventType], text: str) -> EventType:
        calls.append(text)
        return original(cls, text)  # type: ignore[no-any-return]

    monkeypatch.setattr(EventType, "parse", classmethod(counting))

    async def run() -> list[str]:
        from nexus import EventHandler
        from nexus.testing import run_server

        class Echo(EventHandler):
            event_type = "demo:echo"

            async def handle(self, request: Event) -> dict[str, Any]:
                return {"type": request.type.action}

        async with run_server(Echo()) as server:
            calls.clear()
            session = await server.server.node.request(Event.create("demo:echo:v1:requested", {"x": 1}))
            events = [event async for event in session.events()]
            assert events[-1].payload == {"type": "echo"}
        return [text for text in calls if text == "demo:echo:v1:requested"]

    assert asyncio.run(run()) == ["demo:echo:v1:requested"]


@pytest.mark.parametrize(
    ("what", "build"),
    [
        ("a payload string", lambda: Event.create("a:b:v1:c", {"k": "x\ud800"})),
        ("a payload key", lambda: Event.create("a:b:v1:c", {"k\udfff": 1})),
        ("a nested string", lambda: Event.create("a:b:v1:c", {"a": [{"b": "\ud800"}]})),
        ("a metadata value", lambda: Event.create("a:b:v1:c", metadata={"k": "\ud800"})),
        ("a metadata key", lambda: Event.create("a:b:v1:c", metadata={"\ud800": "v"})),
        ("an event id", lambda: Event.create("a:b:v1:c", event_id="id\ud800")),
    ],
)
def test_lone_surrogates_are_refused_everywhere(what: str, build: Any) -> None:
    """Text that is not valid Unicode (a lone surrogate, which JSON's \\u escapes can carry) is refused in every
    string of an event, and the message itself is valid UTF-8."""
    with pytest.raises(InvalidPayload) as caught:
        build()
    caught.value.message.encode("utf-8")


@pytest.mark.parametrize("depth", [33, 34, 100, 10_000])
def test_payloads_nest_at_most_32_levels(depth: int) -> None:
    """Objects and arrays nest at most 32 levels (the payload is level 1); deeper ones are refused, however deep."""
    value: Any = 1
    for level in range(depth - 1):
        value = {"n": value} if level % 2 else [value]
    with pytest.raises(InvalidPayload, match="deeper than 32"):
        Event.create("a:b:v1:c", {"n": value})


def test_payloads_at_32_levels_are_accepted() -> None:
    """32 levels is within the limit; a configured limit moves it."""
    value: Any = {"leaf": True}
    for _ in range(30):
        value = {"n": value}
    assert Event.create("a:b:v1:c", {"n": value}).payload["n"] == value
    with pytest.raises(InvalidPayload, match="deeper than 3 levels"):
        Event.create("a:b:v1:c", {"a": {"b": {"c": {}}}}, limits=EventLimits(max_payload_depth=3))


def test_versions_fit_31_bits_and_huge_ones_are_refused_quickly() -> None:
    """v2147483647 is the largest version; more digits are refused without converting them."""
    assert EventType.parse("a:b:v2147483647:c").version == 2**31 - 1
    for version in ("v2147483648", "v99999999999999999999999", "v" + "9" * 5000):
        with pytest.raises(InvalidEventType, match="is over v2147483647") as caught:
            EventType.parse(f"a:b:{version}:c")
        assert len(caught.value.message) < 300


def test_metadata_entries_and_whole_event_size_are_bounded() -> None:
    """At most 64 metadata entries; the whole event (ids, payload, metadata) at most max_event_bytes."""
    Event.create("a:b:v1:c", metadata={f"k{i}": "v" for i in range(64)})
    with pytest.raises(InvalidPayload, match="65 entries, over the limit of 64"):
        Event.create("a:b:v1:c", metadata={f"k{i}": "v" for i in range(65)})
    with pytest.raises(PayloadTooLarge, match="over the limit of 1048576 bytes"):
        Event.create("a:b:v1:c", {"p": "x" * 900_000}, metadata={"m": "y" * 200_000})
    small = EventLimits(max_event_bytes=200)
    with pytest.raises(PayloadTooLarge, match="over the limit of 200 bytes"):
        Event.create("a:b:v1:c", metadata={"m": "y" * 200}, limits=small)


@pytest.mark.parametrize("event_id", ["a\nb", "a\x00b", "tab\there", "x" * 257])
def test_event_ids_are_short_printable_text(event_id: str) -> None:
    """Event ids are at most 256 printable characters: no line breaks, NUL or other control characters."""
    with pytest.raises(InvalidPayload, match="event_id"):
        Event.create("a:b:v1:c", event_id=event_id)


def test_errors_quote_at_most_about_100_characters_of_the_input() -> None:
    """However long the bad input, an error repeats only its start and says how long it was."""
    for bad in ("X" * 100_000, "a:b:v1:" + "Y" * 100_000, "a:" * 50_000):
        with pytest.raises(InvalidEventType) as caught:
            EventType.parse(bad)
        assert len(caught.value.message) < 300
    assert quote("z" * 1000).endswith("(1000 characters)")
    assert quote("\ud800") == "'\\ud800'"


def test_timestamps_match_the_rfc_3339_formatter_across_seconds_and_days() -> None:
    from datetime import UTC, datetime

    from nexus.events import format_timestamp, timestamp_of_ns

    for ns in (0, 999_999_999, 1_000_000_000, 1_790_000_000_123_456_789, 1_790_000_059_999_999_000, 86_399_999_999_000):
        moment = datetime.fromtimestamp(ns // 1000 / 1_000_000, UTC)
        assert timestamp_of_ns(ns) == format_timestamp(moment)


def test_generated_event_ids_are_unique_hex_and_not_sequential() -> None:
    import itertools

    from nexus.events import new_event_id

    ids = [new_event_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    # no shared prefix between neighbours: ids cannot be guessed from one seen before
    assert sum(a[:8] == b[:8] for a, b in itertools.pairwise(ids)) < 5


def test_an_event_no_encoder_can_write_is_still_sized_by_what_it_holds() -> None:
    """An event built without the checks whose payload cannot be encoded (NaN) still has a size that grows with its
    type, id, payload and metadata: it is what bounds the memory such an event takes in a history."""
    small = Event("demo:echo:v1:created", {"x": math.nan})
    big = Event("demo:echo:v1:created", {"x": math.nan, "text": "y" * 5000}, metadata={"k": "v" * 1000})
    assert small.size() > len(small.event_type) + len(small.event_id)
    assert big.size() > 6000


@pytest.mark.parametrize(
    ("event_type", "event_id", "metadata"),
    [
        ("demo:echo:v1:created", 12345, {"k": "v"}),
        (42, "an-id", {"k": "v"}),
        ("demo:echo:v1:created", "an-id", [("k", "v")]),
    ],
)
def test_an_event_built_with_fields_of_other_types_is_sized_as_the_json_it_holds(
    event_type: Any, event_id: Any, metadata: Any
) -> None:
    """An event built without the checks, a field of another type than the checks allow (a number for an id, a list
    for metadata), is sized as the compact JSON of the whole event, like any other: not refused, not crashed on."""
    import json

    event = Event(event_type, {"x": 1}, event_id, metadata)
    body = {"t": event_type, "i": event_id, "p": {"x": 1}, "m": metadata}
    assert event.size() == len(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())


@pytest.mark.parametrize("metadata", [{"k": 5}, {5: "v"}, {"k": None}])
def test_an_event_whose_metadata_maps_other_types_still_has_a_size(metadata: dict[Any, Any]) -> None:
    """Metadata that is not a string map (an event built without the checks) does not make ``size()`` fail: the
    size bounds the memory the event takes, so it grows with what the event holds."""
    small = Event("demo:echo:v1:created", {}, "an-id", metadata)
    big = Event("demo:echo:v1:created", {"text": "y" * 1000}, "an-id", metadata)
    assert small.size() > len("demo:echo:v1:created") + len("an-id")
    assert big.size() > small.size() + 1000


def test_event_size_is_the_compact_json_of_the_whole_event() -> None:
    import json

    for payload, metadata in (
        ({}, {}),
        ({"text": "é" * 40, "n": [1, 2.5, None, True], "deep": {"a": {"b": '\n"quoted"'}}}, {"owner": "ü\t"}),
        ({"x": 1}, {"correlation_id": "c" * 256, "k": ""}),
    ):
        event = Event.create("svc:act:v1:done", payload, metadata=metadata)
        body = {"t": event.event_type, "i": event.event_id, "p": event.payload, "m": event.metadata}
        expected = len(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
        assert event.size() == expected
        assert event.payload_json() == json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        stored = event.stored(7, "e")
        assert (stored.offset, stored.epoch, stored.size()) == (7, "e", expected)
        assert stored.payload_json() == event.payload_json()
        assert stored.payload == event.payload
        assert stored.metadata == event.metadata
        plain = Event(event.event_type, event.payload, event.event_id, event.metadata)
        assert plain.size() == expected


def _reference_check(payload: Any, max_depth: int) -> str | None:
    """What the path-naming walk says of ``payload`` (the reference the fast check must agree with)."""
    from nexus.events import _check_json

    try:
        _check_json(payload, "", 0, max_depth)
    except InvalidPayload as exc:
        return exc.message
    return None


ODD_KEYS = st.dictionaries(st.one_of(st.integers(), st.none(), st.text(max_size=3)), st.integers(), max_size=3)
ODD_VALUES = st.sampled_from([(1, 2), {"t": (1, {2: 3})}, b"bytes", {1, 2}, 2**1024, -(2**1024), math.inf, object()])


@given(
    payload=st.one_of(
        fuzz_strategies.payloads(surrogates=True),
        st.builds(lambda inner, depth: fuzz_strategies.nested({"x": inner}, depth), ODD_KEYS, st.integers(1, 3)),
        st.builds(lambda inner, depth: fuzz_strategies.nested({"x": inner}, depth), ODD_VALUES, st.integers(1, 3)),
    ),
    max_depth=st.integers(0, 34),
)
@settings(max_examples=400, deadline=None)
def test_payload_checks_agree_with_the_path_naming_walk(payload: Any, max_depth: int) -> None:
    """Any payload is refused by the fast validation exactly when the walk that names the problem refuses it, with
    the same message (the fast walk never lets through what the full one would refuse)."""
    from nexus.events import _check_payload

    expected = _reference_check(payload, max_depth) if isinstance(payload, dict) else "not a dict"
    try:
        _check_payload(payload, max_depth)
        got = None
    except InvalidPayload as exc:
        got = exc.message
    if isinstance(payload, dict):
        assert got == expected


@given(
    event_type=fuzz_strategies.event_types(surrogates=True),
    event_id=fuzz_strategies.event_ids(surrogates=True),
    metadata=fuzz_strategies.metadata(surrogates=True),
)
@settings(max_examples=400, deadline=None)
def test_event_size_is_counted_exactly_for_any_text(event_type: str, event_id: str, metadata: dict[str, str]) -> None:
    """Counting the envelope (quotes, escapes, multi-byte characters) gives the length of its compact UTF-8 JSON,
    and text that is not valid Unicode is refused rather than counted."""
    import json

    from nexus.events import _envelope_size

    try:
        body = {"t": event_type, "i": event_id, "p": {"a": 1}, "m": metadata}
        expected: int | None = len(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    except UnicodeEncodeError:
        expected = None
    try:
        got: int | None = _envelope_size(b'{"a":1}', event_type, event_id, metadata)
    except (UnicodeEncodeError, InvalidPayload):
        got = None
    assert got == expected


def test_evolve_changes_fields_and_refuses_what_is_not_one() -> None:
    """``evolve`` makes a changed copy (derived values recomputed for what changed) and refuses names that are not
    fields a caller sets."""
    event = Event.create("svc:act:v1:done", {"a": 1}, metadata={"k": "v"}).stored(3, "e")
    changed = event.evolve(metadata={"k": "w" * 10}, offset=4)
    assert (changed.metadata, changed.offset, changed.payload, changed.epoch) == ({"k": "w" * 10}, 4, {"a": 1}, "e")
    assert changed.size() == event.size() + 9
    assert event.evolve(payload={"b": [1]}).payload_json() == b'{"b":[1]}'
    for bad in ("_size", "_payload_json", "nope"):
        with pytest.raises(TypeError, match=bad):
            event.evolve(**{bad: 1})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("event_type", "other:act_two:v2:started"),
        ("payload", {"b": [1, 2]}),
        ("event_id", "e-2"),
        ("metadata", {"k": "w", "user_id": "u"}),
        ("timestamp", "2026-01-02T03:04:05.000000Z"),
        ("offset", 9),
        ("epoch", "ep-2"),
    ],
)
def test_evolve_changes_the_named_field_and_keeps_every_other(field: str, value: object) -> None:
    """``evolve`` changes exactly the field it is given, keeps every other one, and what it derives (the parsed
    type, the size, the payload's JSON) is what an event built from scratch with those fields has."""
    event = Event.create("svc:act:v1:done", {"a": 1}, event_id="e-1", metadata={"k": "v"}).stored(3, "ep-1")
    assert (event.type.action, event.payload_json(), event.size()) == ("act", b'{"a":1}', event.size())  # kept
    changed = event.evolve(**{field: value})
    names = [f.name for f in dataclasses.fields(Event) if f.init]
    assert {name: getattr(changed, name) for name in names} == {
        name: value if name == field else getattr(event, name) for name in names
    }
    fresh = Event(**{name: getattr(changed, name) for name in names})
    assert changed.type == fresh.type == EventType.parse(changed.event_type)
    assert changed.size() == fresh.size()
    assert changed.payload_json() == fresh.payload_json()


def test_an_event_derived_from_a_request_may_hold_one_metadata_entry_and_its_bytes_more() -> None:
    """A request at its limits may get lifecycle events that add a ``correlation_id``: an event carrying one is
    held to limits that allow that entry and its bytes, and no more; one without it is held to the request's."""
    limits = EventLimits(max_event_bytes=600, max_metadata_entries=1)
    request = Event.create("demo:echo:v1:requested", {"t": "x" * 400}, metadata={"k": "v"}, limits=limits)
    derived = request.evolve(metadata={"k": "v", "correlation_id": "c" * 2000})
    assert check_event(derived, limits) is derived
    with pytest.raises(PayloadTooLarge):
        check_event(request.evolve(metadata={"k": "v", "correlation_id": "c" * 3000}), limits)
    with pytest.raises(PayloadTooLarge):
        check_event(request.evolve(payload={"t": "x" * 2400}), limits)


def test_check_event_holds_an_unchecked_event_to_every_bound_exactly() -> None:
    """An event built without the checks (what the NATS tail reads) passes ``check_event`` at exactly its limits:
    the whole event's size (type, id and metadata counted) and the payload's; a byte over either, or a payload
    nested deeper than allowed, is refused."""
    event = Event("demo:echo:v1:created", {"a": {"b": "x" * 50}}, event_id="e" * 40, metadata={"k": "v" * 30})
    size, payload_size = event.size(), len(event.payload_json())
    fresh = dataclasses.replace
    assert check_event(fresh(event), EventLimits(max_event_bytes=size, max_payload_bytes=payload_size))
    with pytest.raises(PayloadTooLarge, match=f"the event is {size} bytes"):
        check_event(fresh(event), EventLimits(max_event_bytes=size - 1))
    with pytest.raises(PayloadTooLarge, match=f"payload is {payload_size} bytes"):
        check_event(fresh(event), EventLimits(max_payload_bytes=payload_size - 1))
    with pytest.raises(InvalidPayload, match="deeper"):
        check_event(fresh(event), EventLimits(max_payload_depth=1))


def test_a_refusal_naming_a_key_that_is_not_valid_unicode_is_itself_valid_text() -> None:
    """The path of a refused value may run through a key holding a lone surrogate: the message shows it escaped,
    so every transport can send it (gRPC status details and WebSocket frames are UTF-8)."""
    with pytest.raises(InvalidPayload) as caught:
        Event.create("svc:act:v1:done", {"k\udeb3": {"n": [2**1024]}})
    message = caught.value.message
    message.encode("utf-8")
    assert "k\\udeb3" in message
    assert "too large" in message


# --- events read from outside (the NATS tail), encoders and client-side errors --------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (1.5, None),
        ({"a": [1, {"b": 2.0}], "c": ("x",)}, None),
        ({"a": [[[1]]]}, "nests deeper than 3 levels"),
        ([{"a": {"b": 1}}], None),
        ({"a": [1, float("nan")]}, "holds nan: NaN and Infinity are not valid JSON"),
        ((1, {"x": float("-inf")}), "holds -inf: NaN and Infinity are not valid JSON"),
    ],
)
def test_an_encoder_finds_what_a_client_could_not_read_back(value: Any, problem: str | None) -> None:
    """json_shape_problem names too deep nesting (the value is level 1) and NaN/Infinity anywhere, else None."""
    assert json_shape_problem(value, 3) == problem


def _unchecked(**fields: Any) -> Event:
    """An event as a foreign writer may have built it: every field as given, nothing validated."""
    base: dict[str, Any] = {
        "event_type": "demo:thing:v1:made",
        "event_id": "e-1",
        "payload": {"n": 1},
        "metadata": {},
        "timestamp": "2026-01-02T03:04:05Z",
    }
    return Event(**{**base, **fields})


def test_an_event_read_from_outside_is_kept_only_if_it_keeps_every_rule() -> None:
    """check_event returns a valid event as it is and refuses each broken field with a message naming it."""
    event = _unchecked()
    assert check_event(event) is event
    assert event.size() > 0
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"event_type": "Demo:thing:v1:made"}, InvalidEventType, "Demo"),
        ({"payload": [1]}, InvalidPayload, "payload must be a JSON object, not list"),
        ({"payload": {"n": float("nan")}}, InvalidPayload, "NaN"),
        ({"metadata": {"k": 1}}, InvalidPayload, "metadata"),
        ({"timestamp": 17}, InvalidPayload, "timestamp must be RFC 3339 text"),
        ({"timestamp": "yesterday"}, InvalidPayload, "yesterday"),
    ]
    for fields, error, words in cases:
        with pytest.raises(error, match=re.escape(words)):
            check_event(_unchecked(**fields))


def test_an_event_read_from_outside_is_held_to_the_size_limits() -> None:
    """Over max_event_bytes the whole event is refused; over max_payload_bytes the payload is, naming its size."""
    big = _unchecked(payload={"text": "x" * 1000})
    with pytest.raises(PayloadTooLarge, match="over the limit of 500 bytes"):
        check_event(big, EventLimits(max_event_bytes=500))
    with pytest.raises(PayloadTooLarge, match=r"payload is 1011 bytes, over the limit of 1000 bytes"):
        check_event(big, EventLimits(max_payload_bytes=1000))
    # A bound the caller knows under both limits skips measuring; one over them does not.
    assert check_event(big, EventLimits(max_payload_bytes=1000), size_at_most=900) is big
    with pytest.raises(PayloadTooLarge):
        check_event(big, EventLimits(max_payload_bytes=1000), size_at_most=5000)


def test_an_event_a_node_derived_may_carry_the_entries_the_node_adds() -> None:
    """A lifecycle event (correlation_id) may exceed the client's metadata limit by what Nexus adds; others may not."""
    limits = EventLimits(max_metadata_entries=2)
    client = {"a": "1", "b": "2"}
    derived = _unchecked(metadata={**client, "owner": "o", "correlation_id": "c"})
    assert check_event(derived, limits) is derived
    with pytest.raises(InvalidPayload, match="metadata"):
        check_event(_unchecked(metadata={**client, "c": "3", "d": "4"}), limits)


def test_a_server_error_code_becomes_its_exception_and_an_unknown_one_keeps_its_code() -> None:
    """error_for_code gives each code its exception class; a code without one is a NexusError carrying it."""
    assert type(error_for_code(ErrorCode.ALREADY_EXISTS, "taken")) is AlreadyExists
    assert type(error_for_code(ErrorCode.FAILED_PRECONDITION, "no")) is InvalidState
    internal = error_for_code(ErrorCode.INTERNAL, "boom")
    assert (type(internal), internal.code, str(internal)) == (NexusError, ErrorCode.INTERNAL, "boom")


def test_create_applies_each_limit_it_is_given_exactly() -> None:
    """Event.create enforces the payload limit it is handed, the metadata and whole-event limits of its
    ``limits``, each at the exact bound: one byte or entry more is refused, the bound itself accepted."""
    payload = {"text": "x" * 50}
    size = len(Event.create("demo:thing:v1:made", payload).payload_json())
    assert Event.create("demo:thing:v1:made", payload, max_payload_bytes=size).payload == payload
    with pytest.raises(PayloadTooLarge):
        Event.create("demo:thing:v1:made", payload, max_payload_bytes=size - 1)

    two = {"a": "1", "b": "2"}
    at_bound = Event.create("demo:thing:v1:made", {}, metadata=two, limits=EventLimits(max_metadata_entries=2))
    assert at_bound.metadata == two
    with pytest.raises(NexusError, match="metadata"):
        Event.create("demo:thing:v1:made", {}, metadata=two, limits=EventLimits(max_metadata_entries=1))

    whole = Event.create("demo:thing:v1:made", payload, event_id="e1").size()
    exact = EventLimits(max_event_bytes=whole)
    assert Event.create("demo:thing:v1:made", payload, event_id="e1", limits=exact).size() == whole
    with pytest.raises(PayloadTooLarge, match="over the limit"):
        Event.create("demo:thing:v1:made", payload, event_id="e1", limits=EventLimits(max_event_bytes=whole - 1))


def _nested(depth: int) -> dict[str, Any]:
    """A payload nesting exactly ``depth`` levels (itself the first), alternating objects and arrays, every plain
    kind at each level."""
    plain: list[Any] = ["text", True, False, None, 7, -(2**53) + 1, 1.5]
    value: Any = {"leaf": "x"}
    for level in range(depth - 1, 0, -1):
        value = {"kinds": plain[:], "next": value} if level % 2 else [*plain, value]
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize("depth", [1, 2, 3, 6])
def test_a_plain_payload_within_the_depth_bound_needs_no_full_walk(
    depth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every publish validates its payload: one that is plainly JSON (strings, booleans, null, integers a double
    holds, finite floats, objects with string keys and arrays, within the depth bound) is accepted by the fast
    walk alone; the full walk that builds paths for error messages runs only when something may be wrong."""

    def full_walk(*args: Any) -> None:
        raise AssertionError(f"the full walk ran for a plain payload: {args[1]!r}")

    monkeypatch.setattr(events_module, "_check_json", full_walk)
    payload = _nested(depth)
    assert validate_payload(payload, max_depth=depth) == payload
    assert validate_payload({}, max_depth=depth) == {}
    with pytest.raises(AssertionError, match="the full walk ran"):
        validate_payload(_nested(depth + 1), max_depth=depth)  # one level too deep: the full walk decides


@pytest.mark.parametrize(
    "payload",
    [
        {"n": 1, "bad": math.nan},
        {"n": 1, "bad": object()},
        {"n": 1.5, "bad": math.inf},
        {"n": 1, "list": [1, math.nan]},
        {"n": 1, "obj": {"m": 2, "bad": -math.inf}},
        {"n": 1, "obj": {1: "a key that is no string"}},
    ],
)
def test_what_follows_a_plain_value_is_still_checked(payload: dict[str, Any]) -> None:
    """The fast walk moves on after each plain value; it never stops early and lets the rest through."""
    with pytest.raises(InvalidPayload):
        validate_payload(payload)


@pytest.mark.parametrize(("payload", "kind"), [([1], "list"), ("text", "str"), (3, "int"), ((), "tuple")])
def test_a_payload_that_is_no_object_is_refused_naming_its_type(payload: Any, kind: str) -> None:
    with pytest.raises(InvalidPayload, match=rf"^payload must be a JSON object, not {kind}$"):
        validate_payload(payload)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"s": "\ud800"}, "payload.s holds a lone surrogate: not valid Unicode text"),
        ({"a": {"b": ["x", "\udfff"]}}, "payload.a.b[1] holds a lone surrogate: not valid Unicode text"),
    ],
)
def test_a_lone_surrogate_in_a_payload_is_refused_with_its_path(payload: dict[str, Any], message: str) -> None:
    """Text is checked for valid Unicode when the payload is encoded; the refusal still names where it is."""
    with pytest.raises(InvalidPayload, match=rf"^{re.escape(message)}$"):
        validate_payload(payload)


def _holds_itself() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"x": math.nan}, "reply holds NaN or Infinity, which are not valid JSON"),
        ([1, math.inf], "reply holds NaN or Infinity, which are not valid JSON"),
        ({"a": ["ok", "\ud800"]}, "reply.a[1] holds a lone surrogate: not valid Unicode text"),
        ("\udfff", "reply holds a lone surrogate: not valid Unicode text"),
        (_holds_itself(), "reply nests too deep (or holds itself) to be JSON"),
        ({"when": datetime(2026, 1, 1, tzinfo=UTC)}, "reply holds a value that is not JSON: Object of type datetime"),
    ],
)
def test_encode_json_names_what_it_cannot_write_and_where(value: Any, message: str) -> None:
    """What the SDK, the gateway and the workers encode without the edge's checks is refused with the name it was
    given, and the path of a bad text."""
    with pytest.raises(InvalidPayload, match=f"^{re.escape(message)}"):
        events_module.encode_json(value, "reply")


def test_generated_event_ids_are_32_hex_characters_and_unique_across_reads() -> None:
    """Ids come from a buffer of random bytes refilled every 256 ids: every one of them, the last of a buffer
    included, is 32 lowercase hex characters, and none repeats."""
    source = events_module._IdSource()
    ids = [source() for _ in range(3 * 256 + 7)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", event_id) for event_id in ids), [i for i in ids if len(i) != 32][:3]
    assert len(set(ids)) == len(ids)
    assert re.fullmatch(r"[0-9a-f]{32}", Event.create("demo:echo:v1:created").event_id)


def test_a_valid_type_is_parsed_once_and_the_cache_stays_bounded() -> None:
    """Types are remembered so that the few a deployment uses are checked once, not once per event: parsing one
    again returns the same parse. The cache holds at most TYPE_CACHE_SIZE types (a full cache starts over), so a
    client sending endless distinct types does not grow it. Something that is no string is refused, never looked
    up."""
    events_module._TYPE_CACHE.clear()
    first = EventType.parse("demo:cached:v1:made")
    assert EventType.parse("demo:cached:v1:made") is first
    for n in range(events_module.TYPE_CACHE_SIZE - 1):
        EventType.parse(f"demo:a{n}:v1:made")
    assert len(events_module._TYPE_CACHE) == events_module.TYPE_CACHE_SIZE
    assert EventType.parse("demo:cached:v1:made") is first  # still held: the cache is full, not over
    EventType.parse("demo:one_more:v1:made")
    assert len(events_module._TYPE_CACHE) == 1  # started over
    assert EventType.parse("demo:cached:v1:made") is not first
    for unhashable in (["demo:x:v1:made"], {"t": 1}):
        with pytest.raises(InvalidEventType, match=r"^event type must be a string, not "):
            EventType.parse(unhashable)  # type: ignore[arg-type]
