"""Hypothesis strategies for hostile input at every Nexus edge, and a seeded way to draw many examples at once.

The strategies stay close to the grammar (event types, patterns, protocol frames) so that most inputs get past
the first check and reach the deeper ones, and mix in what an attacker sends: lone surrogates, control
characters, NaN, numbers too large for a double, 5,000-digit versions, deep nesting, long strings.

:func:`draw` runs a strategy ``count`` times with a fixed seed (``derandomize``: the same inputs on every run and
machine, no example database), so a CI failure names an input that reproduces anywhere.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any, Final, TypeVar
from urllib.parse import quote

from google.protobuf import struct_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nexus.v1 import nexus_pb2

T = TypeVar("T")

HANDLED_TYPES: Final = ("fuzz:echo:v1:requested", "fuzz:stream_short:v1:requested")
"""Requests the fuzzed server has handlers for (a plain and a streaming one)."""


def draw(strategy: st.SearchStrategy[T], count: int, batch: int = 10) -> list[T]:
    """``count`` examples of ``strategy``, the same ones on every run (generation only: nothing is shrunk).

    Hypothesis draws them ``batch`` at a time (lists of ``batch`` examples): its cost per example run is then
    paid once per batch.
    """
    found: list[T] = []
    runs = -(-count // batch)

    @settings(
        max_examples=runs,
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(strategy, min_size=batch, max_size=batch))
    def collect(examples: list[T]) -> None:
        found.extend(examples)

    collect()
    assert len(found) >= count, f"hypothesis made {len(found)} examples of {count}"
    return found[:count]


# --- text ---------------------------------------------------------------------------------------------------------

SURROGATES: Final = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
CONTROLS: Final = st.sampled_from(["\x00", "\n", "\r", "\t", "\x7f", "\x1b", "\u2028", "\u0085", "\ufeff"])


def hostile_text(*, surrogates: bool, max_size: int = 24) -> st.SearchStrategy[str]:
    """Short text of any kind; with ``surrogates``, lone surrogates too (only JSON text can carry them)."""
    chars: list[st.SearchStrategy[str]] = [st.characters(codec="utf-8"), CONTROLS, st.sampled_from(":*>._- ")]
    if surrogates:
        chars.append(SURROGATES)
    alphabet = st.one_of(*chars)
    return st.one_of(
        st.text(alphabet=alphabet, max_size=max_size),
        st.text(alphabet="abcxyz_019", max_size=max_size),
        st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "\U0001f600", "\u0000"]), st.integers(250, 5000)),
    )


def tokens(*, surrogates: bool) -> st.SearchStrategy[str]:
    """One token of an event type: valid names, near misses and anything."""
    return st.one_of(
        st.sampled_from(["fuzz", "echo", "stream_short", "a", "x_1", "stream_x", "requested", "made", "success"]),
        st.builds(str.__add__, st.sampled_from("abcxyz"), st.text(alphabet="abcz019_", max_size=8)),
        st.text(alphabet="AZaz09_-. ", max_size=6),
        st.sampled_from(["", "*", ">", "a" * 128, "a" * 129, "A", "1a", "_a", "a-b", "a.b"]),
        hostile_text(surrogates=surrogates, max_size=6),
    )


def versions() -> st.SearchStrategy[str]:
    """Version tokens: valid, at and over 31 bits, thousands of digits, near misses."""
    return st.one_of(
        st.integers(1, 9).map(lambda n: f"v{n}"),
        st.integers(0, 2**40).map(lambda n: f"v{n}"),
        st.sampled_from(["v2147483647", "v2147483648", "v0", "v01", "V1", "v", "v-1", "v1.0", "v\u0661", "v1 "]),
        st.integers(10, 6000).map(lambda n: "v" + "9" * n),
        tokens(surrogates=False),
    )


def event_types(*, surrogates: bool = False) -> st.SearchStrategy[str]:
    """Event types near the grammar and far from it."""
    four = st.tuples(
        tokens(surrogates=surrogates), tokens(surrogates=surrogates), versions(), tokens(surrogates=surrogates)
    )
    return st.one_of(
        four.map(":".join),
        st.lists(st.one_of(tokens(surrogates=surrogates), versions()), max_size=7).map(":".join),
        st.sampled_from(HANDLED_TYPES),
        st.sampled_from(["fuzz:thing:v1:made", "fuzz:echo:v1:success", "fuzz:stream_short:v2:requested"]),
        hostile_text(surrogates=surrogates, max_size=40),
    )


def patterns(*, surrogates: bool = False) -> st.SearchStrategy[str]:
    """Subscription patterns: wildcards anywhere, and event types."""
    token = st.one_of(st.sampled_from(["*", ">", "*", ">"]), tokens(surrogates=surrogates), versions())
    return st.one_of(
        st.lists(token, min_size=1, max_size=6).map(":".join),
        st.sampled_from([">", "*:>", "fuzz:>", "*:*:*:*", "fuzz:*:v1:*", ">:a", "*", "a:>:b", ":>"]),
        event_types(surrogates=surrogates),
    )


def event_ids(*, surrogates: bool = False) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""),
        st.text(alphabet="abcdef0123456789-", min_size=1, max_size=12),
        st.sampled_from(["i" * 256, "i" * 257, "a\nb", "a\x00b", " ", "id with spaces"]),
        hostile_text(surrogates=surrogates, max_size=30),
    )


def metadata(*, surrogates: bool = False) -> st.SearchStrategy[dict[str, str]]:
    text = hostile_text(surrogates=surrogates, max_size=12)
    return st.one_of(
        st.dictionaries(text, text, max_size=5),
        st.integers(60, 70).map(lambda n: {f"k{i}": "v" for i in range(n)}),
        st.integers(1, 5000).map(lambda n: {"long": "v" * n}),
        st.sampled_from([{"user_id": "u"}, {"correlation_id": ""}, {"": "empty key"}]),
    )


# --- JSON values --------------------------------------------------------------------------------------------------

NUMBERS: Final = st.one_of(
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -0.0, 2**53, 2**53 + 1, 1e308, 5e-324, 2**1023, -(2**63)]),
    st.integers(2**1024 - 10, 2**1024 + 10),
)


def nested(leaf: Any, depth: int, *, lists: bool = False) -> Any:
    """``leaf`` inside ``depth`` levels of objects (or arrays); depth 1 is ``leaf`` alone."""
    value = leaf
    for _ in range(depth - 1):
        value = [value] if lists else {"n": value}
    return value


def json_values(*, surrogates: bool = False, floats: st.SearchStrategy[Any] = NUMBERS) -> st.SearchStrategy[Any]:
    text = hostile_text(surrogates=surrogates, max_size=16)
    scalars = st.one_of(st.none(), st.booleans(), floats, text)
    tree = st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
        max_leaves=12,
    )
    deep = st.builds(nested, tree, st.integers(1, 40), lists=st.booleans())
    return st.one_of(tree, deep)


def payloads(*, surrogates: bool = False, floats: st.SearchStrategy[Any] = NUMBERS) -> st.SearchStrategy[Any]:
    """Payloads: mostly objects, some of them too deep, too large or holding NaN; some not objects at all."""
    values = json_values(surrogates=surrogates, floats=floats)
    text = hostile_text(surrogates=surrogates, max_size=16)
    return st.one_of(
        st.dictionaries(text, values, max_size=4),
        st.builds(lambda depth: nested({"leaf": 1}, depth), st.integers(28, 40)),
        st.integers(1, 5000).map(lambda n: {"s": "x" * n}),
        st.just({"x": math.nan}),
        values,
    )


# --- gRPC messages ------------------------------------------------------------------------------------------------


def to_value(value: Any) -> struct_pb2.Value:
    """Any JSON-ish value as a protobuf ``Value`` (floats as they are: NaN and Infinity included; a tuple is a
    list)."""
    out = struct_pb2.Value()
    if value is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, (int, float)):
        try:
            out.number_value = float(value)
        except OverflowError:
            out.number_value = math.inf
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, dict):
        out.struct_value.CopyFrom(to_struct(value))
    else:
        out.list_value.values.extend([to_value(item) for item in value])
    return out


def to_struct(payload: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    for key, item in payload.items():
        struct.fields[key].CopyFrom(to_value(item))
    return struct


GRPC_FLOATS: Final = st.one_of(NUMBERS, st.sampled_from([math.nan, math.inf, -math.inf]))


def event_request(event_type: str, event_id: str, meta: dict[str, str], payload: Any) -> nexus_pb2.EventRequest:
    request = nexus_pb2.EventRequest(event_type=event_type, event_id=event_id, metadata=meta)
    if isinstance(payload, dict):
        request.payload.CopyFrom(to_struct(payload))
    elif payload is not None:
        request.payload.fields["value"].CopyFrom(to_value(payload))
    return request


def event_requests() -> st.SearchStrategy[nexus_pb2.EventRequest]:
    """``EventRequest`` messages (protobuf strings cannot hold lone surrogates; undecodable bytes are fuzzed
    apart, in :func:`raw_requests`)."""
    return st.builds(event_request, event_types(), event_ids(), metadata(), payloads(floats=GRPC_FLOATS))


HUGE: Final = (
    {"payload": {"s": "x" * 1_048_000}},
    {"payload": {"s": "x" * 999_900}},
    {"metadata": {"k": "v" * 3_900_000}},
    {"metadata": {"k": "v" * 1_040_000}},
    {"payload": {"s": "é" * 400_000}},
    {"metadata": {f"k{i}": "v" for i in range(100_000)}},
)
"""Events at and over the size limits, mixed into the generated ones now and then (they are slow to send)."""


def event_request_inputs(count: int, seed: int = 3) -> list[nexus_pb2.EventRequest]:
    """``count`` EventRequests assembled from hypothesis-drawn pools of event types, ids, metadata and payloads
    by a seeded random (drawing whole requests one by one is several times slower); every 200th is one of
    :data:`HUGE`."""
    rng = random.Random(seed)
    types = draw(event_types(), 2500)
    ids = draw(event_ids(), 1000)
    metas = draw(metadata(), 1000)
    bodies = draw(payloads(floats=GRPC_FLOATS), 2500)
    out = []
    for index in range(count):
        fields: dict[str, Any] = {"payload": rng.choice(bodies), "metadata": rng.choice(metas)}
        if index % 200 == 199:
            fields.update(HUGE[(index // 200) % len(HUGE)])
        out.append(event_request(rng.choice(types), rng.choice(ids), fields["metadata"], fields["payload"]))
    return out


def subscribe_requests() -> st.SearchStrategy[nexus_pb2.SubscribeRequest]:
    return st.builds(
        nexus_pb2.SubscribeRequest,
        event_types=st.one_of(
            st.lists(patterns(), max_size=4),
            st.integers(250, 1100).map(lambda n: [f"fuzz:p{i}:*:*" for i in range(n)]),
        ),
        since_offset=st.one_of(st.just(0), st.integers(0, 50), st.integers(0, 2**64 - 1)),
        epoch=st.one_of(st.just(""), hostile_text(surrogates=False, max_size=40)),
    )


# --- raw bytes for gRPC -------------------------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with a few random bytes flipped, cut, repeated or spliced."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        action = rng.randrange(4)
        if action == 0 and buffer:
            buffer[rng.randrange(len(buffer))] = rng.randrange(256)
        elif action == 1 and buffer:
            del buffer[rng.randrange(len(buffer)) :]
        elif action == 2:
            buffer[rng.randrange(len(buffer) + 1) : 0] = rng.randbytes(rng.randint(1, 8))
        else:
            buffer += buffer[: rng.randint(0, 16)]
    return bytes(buffer)


def raw_requests(count: int, seed: int = 9) -> list[bytes]:
    """Bytes for any request message: random, valid messages mutated, invalid UTF-8 in strings, and structs
    nested past protobuf's limit of 100 levels."""
    rng = random.Random(seed)
    valid = [
        nexus_pb2.EventRequest(event_type="fuzz:thing:v1:made", event_id="x", metadata={"k": "v"}).SerializeToString(),
        nexus_pb2.RequestEventRequest(
            event=nexus_pb2.EventRequest(event_type="fuzz:echo:v1:requested")
        ).SerializeToString(),
        nexus_pb2.SubscribeRequest(event_types=[">", "fuzz:*:v1:*"], since_offset=3, epoch="e").SerializeToString(),
        nexus_pb2.CancelStreamRequest(correlation_id="c", reason="r").SerializeToString(),
        event_request("fuzz:thing:v1:made", "", {}, {"a": [1, {"b": "c"}]}).SerializeToString(),
    ]
    out: list[bytes] = []
    for index in range(count):
        kind = index % 5
        if kind == 0:
            out.append(rng.randbytes(rng.randint(0, 200)))
        elif kind in (1, 2):
            out.append(mutate(rng.choice(valid), rng))
        elif kind == 3:
            text = bytes(rng.choice([0xFF, 0xC3, 0xED, 0xA0, 0x80, 0x00, 0x61]) for _ in range(rng.randint(1, 6)))
            field = rng.choice([1, 2, 3])
            out.append(bytes([field << 3 | 2, len(text)]) + text)
        else:
            out.append(deep_struct(rng.randint(95, 140)))
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def deep_struct(levels: int, event_type: bytes = b"fuzz:thing:v1:made") -> bytes:
    """An EventRequest whose payload Struct nests ``levels`` objects ({"n": {"n": ... {}}}), built by hand (protobuf
    refuses to)."""
    struct = b""
    for _ in range(levels - 1):
        struct = field(1, field(1, b"n") + field(2, field(5, struct)))
    return field(1, event_type) + field(3, struct)


# --- WebSocket frames ---------------------------------------------------------------------------------------------

NUMBER_TOKENS: Final = ["1e999", "-1e999", "9" * 5000, "1" * 4301, "1e-999", "-0", "0.0e0", "123456789" * 50, "1E400"]
HOLE: Final = "\x00number\x00"


def _frame_text(frame: Any, ascii_only: bool, number: str | None, cut: int | None) -> str:
    """A frame as JSON text: with ``ascii_only`` lone surrogates become ``\\ud800`` escapes (as browsers send
    them); a ``number`` replaces every hole; ``cut`` truncates the text."""
    try:
        text = json.dumps(frame, ensure_ascii=ascii_only, allow_nan=True)
    except (ValueError, RecursionError):
        text = "{}"
    if number is not None:
        text = text.replace(json.dumps(HOLE, ensure_ascii=ascii_only), number)
    if cut is not None:
        text = text[:cut]
    return text


def ws_frames() -> st.SearchStrategy[str | bytes]:
    """Text frames close to the protocol with hostile fields, raw JSON oddities, and binary frames."""
    anything = json_values(surrogates=True, floats=st.one_of(NUMBERS, st.just(HOLE)))
    pattern_lists = st.one_of(
        st.lists(patterns(surrogates=True), max_size=4),
        st.integers(250, 300).map(lambda n: [f"fuzz:p{i}:*:*" for i in range(n)]),
        anything,
    )
    offsets = st.one_of(st.integers(-5, 2**70), NUMBERS, st.just(HOLE), anything)
    maybe_text = st.one_of(hostile_text(surrogates=True, max_size=40), anything)
    fields = {"ref": maybe_text, "event_id": maybe_text}
    control = st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("subscribe"), "event_types": pattern_lists},
            optional={"since_offset": offsets, "epoch": maybe_text, **fields},
        ),
        st.fixed_dictionaries({"type": st.just("unsubscribe"), "event_types": pattern_lists}, optional=fields),
        st.fixed_dictionaries(
            {"type": st.just("cancel")}, optional={"correlation_id": maybe_text, "reason": maybe_text, **fields}
        ),
        st.fixed_dictionaries({"type": st.just("ping")}, optional=fields),
        st.fixed_dictionaries({"type": st.one_of(maybe_text, st.sampled_from(["Ping", "pong", "error", ""]))}),
    )
    publish = st.fixed_dictionaries(
        {"type": event_types(surrogates=True)},
        optional={
            "payload": payloads(surrogates=True, floats=st.one_of(NUMBERS, st.just(HOLE))),
            "event_id": st.one_of(event_ids(surrogates=True), anything),
            "metadata": st.one_of(metadata(surrogates=True), anything),
            "ref": maybe_text,
            "extra": anything,
        },
    )
    objects = st.one_of(control, publish, anything)
    text = st.builds(
        _frame_text,
        objects,
        st.booleans(),
        st.one_of(st.none(), st.sampled_from(NUMBER_TOKENS)),
        st.one_of(st.none(), st.none(), st.none(), st.integers(0, 80)),
    )
    raw = st.one_of(
        st.integers(30, 12_000).map(lambda n: "[" * n + "]" * n),
        st.integers(30, 12_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
        st.integers(30, 12_000).map(
            lambda n: '{"type":"fuzz:thing:v1:made","payload":' + '{"a":' * n + "1" + "}" * (n + 1)
        ),
        st.sampled_from(['{"type":"ping"', "NaN", "[]", "null", '"subscribe"', "", " ", '{"type":"ping"}{}']),
        hostile_text(surrogates=False, max_size=30),
    )
    binary = st.one_of(st.binary(max_size=300), text.map(lambda t: t.encode("utf-8", "surrogatepass")))
    return st.one_of(text, text, text, raw, binary)


# --- SSE requests -------------------------------------------------------------------------------------------------

SSE_TEXT: Final = st.text(
    alphabet=st.characters(codec="latin-1", exclude_characters="\r\n\x7f").filter(lambda c: c == "\t" or c >= " "),
    max_size=30,
)
"""Text a header value may hold (HTTP refuses control characters before any Nexus code sees them)."""
MAX_TARGET: Final = 8000
"""websockets refuses request lines over 8 KiB (414) before the SSE endpoint sees them."""


def _query(pairs: list[tuple[str, str]], raw_tail: str) -> str:
    encoded = "&".join(f"{quote(key, safe='')}={quote(value, safe=':>*,')}" for key, value in pairs)
    return f"/sse?{encoded}{raw_tail}"


def sse_requests() -> st.SearchStrategy[tuple[str, str | None]]:
    """``(target, Last-Event-ID)``: query strings with patterns, offsets and epochs, and header values."""
    value = st.one_of(
        patterns(surrogates=False),
        st.lists(patterns(), min_size=1, max_size=4).map(",".join),
        st.integers(-(2**70), 2**70).map(str),
        hostile_text(surrogates=False, max_size=30),
    )
    key = st.one_of(st.sampled_from(["patterns", "patterns", "since_offset", "epoch", "token"]), SSE_TEXT)
    pairs = st.lists(st.tuples(key, value), max_size=6)
    tail = st.one_of(
        st.just(""), st.sampled_from(["&%ff", "&patterns=%ed%a0%80", "&&&", "&=", "&patterns", "%", "&a=%0a", "#frag"])
    )
    targets = st.one_of(
        st.builds(_query, pairs, tail),
        st.integers(250, 600).map(lambda n: "/sse?patterns=" + ",".join(f"a:p{i}:>" for i in range(n))),
        st.integers(250, 520).map(lambda n: "/sse?" + "&".join(f"patterns=p{i}:>" for i in range(n))),
    )
    last = st.one_of(
        st.none(),
        st.integers(0, 2**70).map(str),
        st.builds(lambda e, o: f"{e}:{o}", SSE_TEXT, st.integers(-5, 2**66)),
        SSE_TEXT,
    )
    return st.tuples(targets, last)


def sse_inputs(count: int, seed: int = 5) -> list[tuple[str, str | None]]:
    """``count`` (target, Last-Event-ID) pairs: drawn targets, each paired with drawn header values."""
    rng = random.Random(seed)
    pairs = draw(sse_requests(), count // 2)
    lasts = [last for _, last in draw(sse_requests(), 1000)]
    pairs += [(target, rng.choice(lasts)) for target, _ in rng.choices(pairs, k=count - len(pairs))]
    return [(target[:MAX_TARGET], last) for target, last in pairs]
