"""The gateway's framing, flow control and auth helpers as pure functions: no server, no event loop."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nexus.gateway.auth import token_from
from nexus.gateway.flow import Outbox, RateLimiter
from nexus.gateway.protocol import (
    ERRORS,
    Cancel,
    CloseCode,
    EventFrameCache,
    GatewayCode,
    Ping,
    ProtocolError,
    Publish,
    Subscribe,
    Unsubscribe,
    close_reason,
    code_for_exception,
    decode_frame,
    encode_connection,
    encode_error,
    encode_event,
    encode_event_frame,
    encode_pong,
    encode_published,
    encode_subscribed,
    encode_unsubscribed,
    error_spec,
    frame_data,
    text_frame,
)
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Protocol, Side

from nexus.errors import ErrorCode, InvalidPattern, NotFound, SlowConsumer, Unauthenticated
from nexus.events import Event

RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z\Z")


def frame(**fields: Any) -> str:
    """A client frame as the text a socket carries."""
    return json.dumps(fields)


def decode_error(text: str | bytes, **kwargs: Any) -> ProtocolError:
    """Decode ``text`` expecting a ProtocolError, and return it."""
    with pytest.raises(ProtocolError) as caught:
        decode_frame(text, **kwargs)
    return caught.value


# --- decoding commands ------------------------------------------------------------------------------------------


def test_subscribe_decodes_patterns_offset_and_epoch() -> None:
    """A subscribe frame becomes a Subscribe with its patterns in order, without repeats."""
    command = decode_frame(
        frame(type="subscribe", event_types=["demo:>", "a:*:v1:*", "demo:>"], since_offset=7, epoch="e1", ref="r1")
    )
    assert command == Subscribe(("demo:>", "a:*:v1:*"), 7, "e1", "r1")
    assert command.resume


def test_subscribe_without_offset_is_live() -> None:
    """No since_offset and no epoch means a live subscription; a whole float offset is accepted."""
    live = decode_frame(frame(type="subscribe", event_types=[">"]))
    assert isinstance(live, Subscribe)
    assert (live.since_offset, live.epoch, live.resume) == (0, None, False)
    whole = decode_frame(frame(type="subscribe", event_types=[">"], since_offset=5.0))
    assert isinstance(whole, Subscribe)
    assert whole.since_offset == 5


def test_unsubscribe_cancel_and_ping_decode() -> None:
    """unsubscribe, cancel and ping become their commands; cancel's ref defaults to its correlation id."""
    assert decode_frame(frame(type="unsubscribe", event_types=["x:>"])) == Unsubscribe(("x:>",))
    assert decode_frame(frame(type="cancel", correlation_id="c1")) == Cancel("c1", "cancelled by requester", "c1")
    cancel = decode_frame(frame(type="cancel", correlation_id="c1", reason="enough", ref="r"))
    assert cancel == Cancel("c1", "enough", "r")
    assert decode_frame(frame(type="ping")) == Ping()
    assert decode_frame(b'{"type":"ping","ref":"p1"}') == Ping("p1")


def test_publish_decodes_a_validated_event() -> None:
    """An event type as `type` is a publish: payload, event_id and metadata are validated into an Event."""
    command = decode_frame(
        frame(type="demo:echo:v1:requested", payload={"x": 1}, event_id="id-1", metadata={"traceparent": "t"})
    )
    assert isinstance(command, Publish)
    assert command.ref == "id-1"
    event = command.event
    assert (event.event_type, event.event_id, event.payload, event.metadata) == (
        "demo:echo:v1:requested",
        "id-1",
        {"x": 1},
        {"traceparent": "t"},
    )


def test_publish_without_event_id_gets_a_fresh_one() -> None:
    """A publish frame without event_id gets a generated id and no ref."""
    command = decode_frame(frame(type="demo:thing:v1:happened"))
    assert isinstance(command, Publish)
    assert command.event.event_id
    assert command.ref is None
    assert command.event.payload == {}


# --- decoding errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", GatewayCode.INVALID_JSON),
        ('{"type": "ping"', GatewayCode.INVALID_JSON),
        ('{"type":"demo:a:v1:x","payload":{"n":NaN}}', GatewayCode.INVALID_JSON),
        ('{"type":"demo:a:v1:x","payload":{"n":Infinity}}', GatewayCode.INVALID_JSON),
        (b"\xff\xfe", GatewayCode.INVALID_JSON),
        ("[1, 2]", GatewayCode.NOT_AN_OBJECT),
        ("42", GatewayCode.NOT_AN_OBJECT),
        ('"ping"', GatewayCode.NOT_AN_OBJECT),
        ("{}", GatewayCode.INVALID_FRAME),
        ('{"type": 5}', GatewayCode.INVALID_FRAME),
        ('{"type":"subscribe"}', GatewayCode.INVALID_FRAME),
        ('{"type":"subscribe","event_types":[]}', GatewayCode.INVALID_FRAME),
        ('{"type":"subscribe","event_types":">"}', GatewayCode.INVALID_FRAME),
        ('{"type":"subscribe","event_types":[">"],"since_offset":-1}', GatewayCode.INVALID_FRAME),
        ('{"type":"subscribe","event_types":[">"],"since_offset":"3"}', GatewayCode.INVALID_FRAME),
        ('{"type":"subscribe","event_types":[">"],"since_offset":true}', GatewayCode.INVALID_FRAME),
        ('{"type":"subscribe","event_types":[">"],"epoch":7}', GatewayCode.INVALID_FRAME),
        ('{"type":"cancel"}', GatewayCode.INVALID_FRAME),
        ('{"type":"demo:a:v1:x","payload":{},"extra":1}', GatewayCode.INVALID_FRAME),
        ('{"type":"subscrib"}', GatewayCode.UNKNOWN_TYPE),
        ('{"type":"hello"}', GatewayCode.UNKNOWN_TYPE),
        ('{"type":"Demo:a:v1:x"}', GatewayCode.INVALID_EVENT_TYPE),
        ('{"type":"demo:a:1:x"}', GatewayCode.INVALID_EVENT_TYPE),
        ('{"type":"demo:a:v1"}', GatewayCode.INVALID_EVENT_TYPE),
        ('{"type":"subscribe","event_types":["demo:>:v1"]}', GatewayCode.INVALID_PATTERN),
        ('{"type":"subscribe","event_types":["a:b"]}', GatewayCode.INVALID_PATTERN),
        ('{"type":"subscribe","event_types":[3]}', GatewayCode.INVALID_PATTERN),
        ('{"type":"demo:a:v1:x","payload":[1]}', GatewayCode.INVALID_PAYLOAD),
        ('{"type":"demo:a:v1:x","metadata":{"k":1}}', GatewayCode.INVALID_PAYLOAD),
    ],
)
def test_bad_frames_raise_protocol_errors_with_stable_codes(text: str | bytes, code: str) -> None:
    """Every kind of bad input maps to its stable code, and none of them is fatal."""
    error = decode_error(text)
    assert error.code == code
    assert error.message
    assert not error.spec.fatal


def test_payload_over_the_limit_is_payload_too_large() -> None:
    """A payload bigger than max_payload_bytes is refused with payload_too_large and the client's ref."""
    error = decode_error(frame(type="demo:a:v1:x", event_id="big", payload={"s": "x" * 200}), max_payload_bytes=100)
    assert (error.code, error.ref) == (GatewayCode.PAYLOAD_TOO_LARGE, "big")


def test_errors_carry_the_clients_reference() -> None:
    """`ref` is the frame's event_id when there is one, else its `ref` field."""
    assert decode_error(frame(type="demo:a:v1:x", event_id="e1", payload=[1])).ref == "e1"
    assert decode_error(frame(type="subscribe", event_types=["bad"], ref="r9")).ref == "r9"
    assert decode_error(frame(type="nope", ref="r2")).ref == "r2"
    assert decode_error("[]").ref is None


def test_error_messages_name_the_problem() -> None:
    """A bad token is named in the message, as the core's grammar says it."""
    assert "version" in decode_error(frame(type="demo:a:1:x")).message
    assert "'>' may only be the last token" in decode_error(frame(type="subscribe", event_types=["a:>:v1:x"])).message


# --- the error table --------------------------------------------------------------------------------------------


def test_fatal_codes_map_to_their_close_codes() -> None:
    """frame_too_large closes with 1009, auth refusals with 1008, too_slow with 4008; a frame the credentials do
    not allow (out of scope, a reserved lifecycle state, another's event_id) gets an error frame and no close."""
    assert error_spec(GatewayCode.FRAME_TOO_LARGE).close_code == CloseCode.MESSAGE_TOO_BIG == 1009
    assert error_spec(ErrorCode.UNAUTHENTICATED).close_code == CloseCode.POLICY_VIOLATION == 1008
    assert error_spec(ErrorCode.PERMISSION_DENIED).close_code is None
    assert error_spec(GatewayCode.RESERVED_STATE).close_code is None
    assert error_spec(GatewayCode.DUPLICATE_ID).close_code is None
    assert error_spec(GatewayCode.TOO_SLOW).close_code == CloseCode.TOO_SLOW == 4008
    assert error_spec(GatewayCode.GOING_AWAY).close_code == 1001
    assert error_spec(GatewayCode.HISTORY_RESET).close_code == 1012


def test_every_core_error_code_has_an_entry() -> None:
    """The table covers every nexus.errors.ErrorCode and every gateway code; unknown codes are not fatal."""
    for code in [*ErrorCode, *GatewayCode]:
        assert code in ERRORS, code
    assert not error_spec("something_new").fatal


def test_core_errors_get_their_precise_code() -> None:
    """Core exceptions map to the most precise code: patterns, slow consumers, not found, auth."""
    assert code_for_exception(InvalidPattern("x")) == "invalid_pattern"
    assert code_for_exception(SlowConsumer("x")) == "too_slow"
    assert code_for_exception(NotFound("x")) == "not_found"
    assert code_for_exception(Unauthenticated("x")) == "unauthenticated"


def test_close_reason_fits_a_close_frame() -> None:
    """Close reasons are cut to 123 UTF-8 bytes without splitting a character."""
    assert close_reason("short") == "short"
    cut = close_reason("é" * 100)
    assert len(cut.encode()) <= 123
    assert cut == "é" * 61


# --- encoding ---------------------------------------------------------------------------------------------------


def test_connection_and_subscribed_frames() -> None:
    """The first frame names the connection and epoch; subscribed carries recovered only when resuming."""
    assert json.loads(encode_connection("c1", "ep")) == {
        "type": "connection",
        "status": "connected",
        "connection_id": "c1",
        "epoch": "ep",
    }
    live = json.loads(encode_subscribed([">"], epoch="ep", head_offset=4))
    assert live == {"type": "subscribed", "event_types": [">"], "epoch": "ep", "head_offset": 4}
    resumed = json.loads(encode_subscribed(["a:>"], epoch="ep", head_offset=9, recovered=False, ref="r"))
    assert resumed["recovered"] is False
    assert resumed["ref"] == "r"
    assert json.loads(encode_unsubscribed(["a:>"])) == {"type": "unsubscribed", "event_types": ["a:>"]}


def test_event_frame_has_the_contract_fields() -> None:
    """An event frame has type, event_id, payload, metadata, a numeric offset, epoch and an RFC 3339 timestamp."""
    event = Event("demo:a:v1:x", {"n": 1}, event_id="e1", metadata={"correlation_id": "c"}).stored(12, "ep")
    decoded = json.loads(encode_event(event))
    assert decoded == {
        "type": "demo:a:v1:x",
        "event_id": "e1",
        "payload": {"n": 1},
        "metadata": {"correlation_id": "c"},
        "offset": 12,
        "epoch": "ep",
        "timestamp": event.timestamp,
    }
    assert isinstance(decoded["offset"], int)
    assert RFC3339_UTC.match(decoded["timestamp"])


def test_published_pong_and_error_frames() -> None:
    """published names the stored id and offset; pong echoes a ref; errors carry code, message and ref."""
    stored = Event("demo:a:v1:requested", event_id="e1").stored(3, "ep")
    published = json.loads(encode_published(stored, duplicate=True))
    assert published["type"] == "published"
    assert (published["event_id"], published["offset"], published["duplicate"]) == ("e1", 3, True)
    assert json.loads(encode_pong()) == {"type": "pong"}
    assert json.loads(encode_pong("p")) == {"type": "pong", "ref": "p"}
    error = {"type": "error", "code": "invalid_json", "message": "bad"}
    assert json.loads(encode_error("invalid_json", "bad")) == error
    assert json.loads(encode_error("not_found", "gone", "c1"))["ref"] == "c1"


def test_frames_keep_unicode_and_are_compact() -> None:
    """Frames are compact UTF-8 JSON, non-ASCII kept as is."""
    event = Event("demo:a:v1:x", {"name": "Zoë"}, event_id="e").stored(1, "ep")
    data = encode_event(event)
    assert "Zoë".encode() in data
    assert b": " not in data


def test_event_frames_are_encoded_once_per_event() -> None:
    """The cache returns the same bytes for the same event object and encodes it once."""
    cache = EventFrameCache(size=2)
    first = Event("demo:a:v1:x", {"n": 1}).stored(1, "ep")
    second = Event("demo:a:v1:x", {"n": 2}).stored(2, "ep")
    data = cache.encode(first)
    for _ in range(100):
        assert cache.encode(first) is data
    assert (cache.misses, cache.hits) == (1, 100)
    cache.encode(second)
    cache.encode(Event("demo:a:v1:x").stored(3, "ep"))
    assert len(cache) == 2  # bounded: the oldest entry went
    assert cache.encode(first) == data


def dumps_frame(event: Event) -> bytes:
    """The event frame as one ``json.dumps`` of the whole object (the spliced frame must equal it)."""
    frame = {
        "type": event.event_type,
        "event_id": event.event_id,
        "payload": event.payload,
        "metadata": event.metadata,
        "offset": event.offset,
        "epoch": event.epoch,
        "timestamp": event.timestamp,
    }
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def outcome(encode: Any, event: Event) -> bytes | str:
    """The bytes ``encode`` makes of ``event``, or that it refused it."""
    try:
        data: bytes = encode(event)
    except Exception:  # which one differs (InvalidPayload, ValueError): both refuse the event
        return "refused"
    return data


TRICKY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12) | st.sampled_from(
    ['"', "\\", "\n\t\r\x00\x1f\x7f", "\u2028\u2029", "\ud800", "Zoë 🚀 中", "</script>", ""]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY_TEXT, inner, max_size=4),
    max_leaves=12,
)
EVENTS = st.builds(
    lambda event_type, payload, event_id, metadata, timestamp, offset, epoch: Event(
        event_type, payload, event_id, metadata, timestamp
    ).stored(offset, epoch),
    TRICKY_TEXT,
    st.dictionaries(TRICKY_TEXT, JSON_VALUES, max_size=5),
    TRICKY_TEXT,
    st.dictionaries(TRICKY_TEXT, TRICKY_TEXT, max_size=3),
    TRICKY_TEXT,
    st.integers(min_value=0, max_value=2**63 - 1),
    TRICKY_TEXT,
)


@settings(max_examples=400, deadline=None)
@given(EVENTS)
def test_spliced_event_frame_is_the_json_dumps_frame(event: Event) -> None:
    """The frame built around the payload's cached JSON is byte for byte the ``json.dumps`` frame (unicode,
    escapes, empty payloads and metadata alike), and an event one cannot encode the other cannot either."""
    expected = outcome(dumps_frame, event)
    assert outcome(encode_event, event) == expected
    if isinstance(expected, bytes):
        assert json.loads(encode_event(event)) == json.loads(expected)
        assert frame_data(encode_event_frame(event)) == expected


def read_frames(data: bytes) -> list[Frame]:
    """The frames a WebSocket client parses out of ``data`` (the websockets library's own parser)."""
    client = Protocol(Side.CLIENT, state=OPEN, max_size=None)
    client.receive_data(data)
    frames = client.events_received()
    assert all(isinstance(frame, Frame) for frame in frames)
    return [frame for frame in frames if isinstance(frame, Frame)]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 200_000])
def test_event_frames_are_complete_websocket_text_frames(size: int) -> None:
    """An event frame of any length (each header size) parses as one final text frame holding the event's JSON;
    frames written back to back parse one by one."""
    event = Event("demo:a:v1:x", {"text": "é" * (size // 2)}, event_id="e").stored(7, "ep")
    frame = encode_event_frame(event)
    (parsed,) = read_frames(frame)
    assert (parsed.opcode, parsed.fin) == (Opcode.TEXT, True)
    assert bytes(parsed.data) == encode_event(event) == dumps_frame(event)
    control = text_frame(b'{"type":"pong"}')
    assert [bytes(f.data) for f in read_frames(frame + control + frame)] == [
        encode_event(event),
        b'{"type":"pong"}',
        encode_event(event),
    ]
    for length in (0, 125, 126, 65_535, 65_536):
        data = b"x" * length
        assert frame_data(text_frame(data)) == data


# --- flow control -----------------------------------------------------------------------------------------------


def test_outbox_is_bounded_in_frames() -> None:
    """A put past max_frames fails, empties the outbox and keeps failing."""
    outbox = Outbox(max_frames=3, max_bytes=1000)
    assert all(outbox.put(b"x", offset) for offset in (1, 2, 3))
    assert not outbox.put(b"x", 4)
    assert outbox.overflowed
    assert len(outbox) == 0
    assert outbox.bytes == 0
    assert not outbox.put(b"y")


def test_outbox_is_bounded_in_bytes() -> None:
    """A put that would pass max_bytes fails even with room for more frames."""
    outbox = Outbox(max_frames=100, max_bytes=10)
    assert outbox.put(b"12345")
    assert outbox.put(b"12345")
    assert not outbox.put(b"1")


def test_outbox_hands_frames_out_in_order() -> None:
    """pop and take return frames oldest first with their offsets, and keep the byte count right."""
    outbox = Outbox(max_frames=10, max_bytes=100)
    outbox.put(b"aa", 1)
    outbox.put(b"bbb", 2)
    outbox.put(b"c")
    assert outbox.bytes == 6
    assert outbox.pop() == (b"aa", 1)
    assert outbox.take(5) == [(b"bbb", 2), (b"c", 0)]
    assert not outbox
    assert outbox.bytes == 0
    with pytest.raises(ValueError, match="at least one"):
        Outbox(0, 10)


def test_rate_limiter_lets_bursts_through_then_paces() -> None:
    """Up to `burst` frames pass at once; after that each frame waits 1/rate, and tokens come back with time."""
    limiter = RateLimiter(rate=10, burst=3, now=0.0)
    assert [limiter.acquire(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire(0.0) == pytest.approx(0.1)
    assert limiter.acquire(0.0) == pytest.approx(0.2)
    assert limiter.acquire(10.0) == 0.0


# --- tokens -----------------------------------------------------------------------------------------------------


def test_token_comes_from_the_query_or_a_subprotocol_entry() -> None:
    """The token query parameter wins; else the first subprotocol entry besides nexus.v1."""
    assert token_from("/ws?token=abc", ["nexus.v1", "zzz"]) == "abc"
    assert token_from("/ws", ["nexus.v1", "tok.en-1"]) == "tok.en-1"
    assert token_from("/ws?other=1", ["nexus.v1"]) is None
    assert token_from("/ws", []) is None
