"""The gateway's JSON framing (the WebSocket protocol of the README). Pure: no I/O, no asyncio, tested without a loop.

Client frames are decoded into typed commands, or a :class:`ProtocolError` with a stable code; server frames
are encoded to UTF-8 JSON bytes, sent as text frames. One table, :data:`ERRORS`, says for every error code
whether the connection stays open (an ``error`` frame) or is closed, and with which close code::

    client frame (text)                         command
    {"type":"subscribe","event_types":[…]}      Subscribe(patterns, since_offset, epoch, ref)
    {"type":"unsubscribe","event_types":[…]}    Unsubscribe(patterns, ref)
    {"type":"cancel","correlation_id":…}        Cancel(correlation_id, reason, ref)
    {"type":"ping"}                             Ping(ref)
    {"type":"<svc>:<act>:v<N>:<state>",…}       Publish(event, ref)
    anything else                               ProtocolError(code, message, ref)

Event frames are encoded once per event for every connection that receives it (:class:`EventFrameCache`), as
complete WebSocket text frames (:func:`encode_event_frame`) with the payload's JSON spliced in as the event
already holds it (:meth:`~nexus.events.Event.payload_json`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring
from typing import Any, Final

from nexus.errors import (
    AlreadyExists,
    ErrorCode,
    InvalidEventType,
    InvalidPattern,
    InvalidPayload,
    NexusError,
    PayloadTooLarge,
    RateLimited,
    ReservedState,
    SlowConsumer,
)
from nexus.events import Event, EventLimits, unicode_problem
from nexus.patterns import DEFAULT_MAX_PATTERNS, check_pattern_count, parse_pattern

SUBPROTOCOL: Final = "nexus.v1"
"""The WebSocket subprotocol the gateway selects (browsers send it next to the token)."""

MAX_PATTERNS_PER_FRAME: Final = DEFAULT_MAX_PATTERNS
MAX_REF_LENGTH: Final = 256
MAX_CLOSE_REASON_BYTES: Final = 123  # RFC 6455: a close frame's payload is at most 125 bytes, 2 for the code


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway uses."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the server is shutting down
    POLICY_VIOLATION = 1008  # authentication refused
    MESSAGE_TOO_BIG = 1009  # a frame over the size limit
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # the upstream history was lost: reconnect, resume, and be told recovered: false
    TRY_AGAIN_LATER = 1013  # the upstream Nexus is unreachable
    TOO_SLOW = 4008  # the outgoing queue overflowed: reconnect and resume from the last offset received


class GatewayCode(enum.StrEnum):
    """Error codes of the gateway itself (the core's :class:`~nexus.errors.ErrorCode` values are used too)."""

    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    INVALID_FRAME = "invalid_frame"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_EVENT_TYPE = "invalid_event_type"
    INVALID_PATTERN = "invalid_pattern"
    INVALID_PAYLOAD = "invalid_payload"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    RESERVED_STATE = "reserved_state"
    DUPLICATE_ID = "duplicate_id"
    FRAME_TOO_LARGE = "frame_too_large"
    TOO_SLOW = "too_slow"
    GOING_AWAY = "going_away"
    HISTORY_RESET = "history_reset"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorSpec:
    """What an error code does to the connection: ``close_code`` None keeps it open (an ``error`` frame)."""

    close_code: CloseCode | None
    description: str

    @property
    def fatal(self) -> bool:
        return self.close_code is not None


ERRORS: Final[dict[str, ErrorSpec]] = {
    # Bad input: an error frame, the connection stays open.
    GatewayCode.INVALID_JSON: ErrorSpec(None, "the frame is not valid JSON (NaN and Infinity included)"),
    GatewayCode.NOT_AN_OBJECT: ErrorSpec(None, "the frame is JSON but not an object"),
    GatewayCode.INVALID_FRAME: ErrorSpec(None, "a field of the frame is missing or has the wrong type"),
    GatewayCode.UNKNOWN_TYPE: ErrorSpec(None, "`type` is neither a control type nor an event type"),
    GatewayCode.INVALID_EVENT_TYPE: ErrorSpec(None, "`type` looks like an event type but a token is wrong"),
    GatewayCode.INVALID_PATTERN: ErrorSpec(None, "a subscription pattern has a bad token"),
    GatewayCode.INVALID_PAYLOAD: ErrorSpec(None, "payload or metadata is not what an event carries"),
    GatewayCode.PAYLOAD_TOO_LARGE: ErrorSpec(None, "the payload is over the server's limit"),
    GatewayCode.RATE_LIMITED: ErrorSpec(None, "publishing faster than this connection may; slow down"),
    GatewayCode.RESERVED_STATE: ErrorSpec(None, "only the handler serving a request publishes its lifecycle"),
    GatewayCode.DUPLICATE_ID: ErrorSpec(None, "another client already used this event_id; choose a fresh one"),
    # The core's codes (nexus.errors.ErrorCode): the request failed, the connection stays open.
    ErrorCode.INVALID_ARGUMENT: ErrorSpec(None, "the request is not valid"),
    ErrorCode.RESOURCE_EXHAUSTED: ErrorSpec(None, "a limit was reached"),
    ErrorCode.UNAVAILABLE: ErrorSpec(None, "the bus cannot take the request now; retry later"),
    ErrorCode.NOT_FOUND: ErrorSpec(None, "no such live stream started by this connection"),
    ErrorCode.FAILED_PRECONDITION: ErrorSpec(None, "the operation does not fit the current state"),
    ErrorCode.INTERNAL: ErrorSpec(None, "an unexpected server error; the connection stays usable"),
    ErrorCode.PERMISSION_DENIED: ErrorSpec(None, "the credentials do not allow this"),
    ErrorCode.ALREADY_EXISTS: ErrorSpec(None, "another client already used this event_id; choose a fresh one"),
    # Fatal: the connection is closed with the code given.
    ErrorCode.UNAUTHENTICATED: ErrorSpec(CloseCode.POLICY_VIOLATION, "no valid credentials"),
    GatewayCode.FRAME_TOO_LARGE: ErrorSpec(CloseCode.MESSAGE_TOO_BIG, "a frame over the size limit"),
    GatewayCode.TOO_SLOW: ErrorSpec(CloseCode.TOO_SLOW, "the outgoing queue overflowed; resume from the last offset"),
    GatewayCode.GOING_AWAY: ErrorSpec(CloseCode.GOING_AWAY, "the server is shutting down"),
    GatewayCode.HISTORY_RESET: ErrorSpec(CloseCode.SERVICE_RESTART, "the upstream history was lost; resume"),
    GatewayCode.UPSTREAM_UNAVAILABLE: ErrorSpec(CloseCode.TRY_AGAIN_LATER, "the upstream Nexus is unreachable"),
}


def error_spec(code: str) -> ErrorSpec:
    """The table entry for ``code``; unknown codes are non-fatal."""
    return ERRORS.get(code, ERRORS[ErrorCode.INTERNAL])


def code_for_exception(error: NexusError) -> str:
    """The error-frame code for a core error: the precise gateway code where there is one."""
    if isinstance(error, InvalidEventType):
        return GatewayCode.INVALID_EVENT_TYPE
    if isinstance(error, InvalidPattern):
        return GatewayCode.INVALID_PATTERN
    if isinstance(error, PayloadTooLarge):
        return GatewayCode.PAYLOAD_TOO_LARGE
    if isinstance(error, InvalidPayload):
        return GatewayCode.INVALID_PAYLOAD
    if isinstance(error, SlowConsumer):
        return GatewayCode.TOO_SLOW
    if isinstance(error, RateLimited):
        return GatewayCode.RATE_LIMITED
    if isinstance(error, ReservedState):
        return GatewayCode.RESERVED_STATE
    if isinstance(error, AlreadyExists):
        return GatewayCode.DUPLICATE_ID
    return error.code.value


class ProtocolError(Exception):
    """A client frame the gateway cannot act on: ``code`` is stable, ``ref`` the client's reference if any."""

    def __init__(self, code: str, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    @property
    def spec(self) -> ErrorSpec:
        return error_spec(self.code)

    @classmethod
    def from_error(cls, error: NexusError, ref: str | None = None) -> ProtocolError:
        """The protocol error reporting a core error."""
        return cls(code_for_exception(error), error.message, ref)


# --- commands ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Subscribe:
    """Follow more patterns; with ``since_offset`` (and ``epoch``), replay what came after it first."""

    patterns: tuple[str, ...]
    since_offset: int = 0
    epoch: str | None = None
    ref: str | None = None

    @property
    def resume(self) -> bool:
        return self.since_offset > 0 or bool(self.epoch)


@dataclasses.dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Stop following patterns."""

    patterns: tuple[str, ...]
    ref: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel a stream this connection started."""

    correlation_id: str
    reason: str = "cancelled by requester"
    ref: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    """Application-level ping; answered by a ``pong``."""

    ref: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Publish:
    """Publish ``event`` (already validated); a ``requested`` event also brings its lifecycle back."""

    event: Event
    ref: str | None = None


Command = Subscribe | Unsubscribe | Cancel | Ping | Publish

CONTROL_TYPES: Final = frozenset({"subscribe", "unsubscribe", "cancel", "ping"})
_PUBLISH_FIELDS: Final = frozenset({"type", "payload", "event_id", "metadata", "ref"})


# --- decoding ---------------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(text: str | bytes) -> Any:
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(GatewayCode.INVALID_JSON, "the frame is not UTF-8 text") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            GatewayCode.INVALID_JSON, f"the frame is not valid JSON: {exc.msg} at character {exc.pos}"
        ) from None
    except ValueError as exc:  # NaN / Infinity, or an integer over Python's digit limit
        message = str(exc) if "not valid JSON" in str(exc) else "a number in the frame has too many digits"
        raise ProtocolError(GatewayCode.INVALID_JSON, f"the frame is not valid JSON: {message}") from None
    except RecursionError:
        raise ProtocolError(GatewayCode.INVALID_JSON, "the frame nests too deeply") from None


def _text(value: str) -> str:
    """``value`` with lone surrogates escaped, so echoing it back cannot break the frame's encoding."""
    if unicode_problem(value) is None:
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _ref(frame: dict[str, Any]) -> str | None:
    """The client's reference: its ``event_id`` when there is one, else its ``ref``."""
    for key in ("event_id", "ref"):
        value = frame.get(key)
        if isinstance(value, str) and value:
            return _text(value[:MAX_REF_LENGTH])
    return None


def _patterns(frame: dict[str, Any], ref: str | None, max_patterns: int) -> tuple[str, ...]:
    value = frame.get("event_types")
    if not isinstance(value, list) or not value:
        raise ProtocolError(
            GatewayCode.INVALID_FRAME, 'event_types must be a non-empty list of patterns, such as [">"]', ref
        )
    try:
        check_pattern_count(len(value), max_patterns)  # before any is parsed
    except NexusError as exc:
        raise ProtocolError.from_error(exc, ref) from None
    for item in value:
        if not isinstance(item, str):
            raise ProtocolError(
                GatewayCode.INVALID_PATTERN, f"a pattern must be a string, not {type(item).__name__}", ref
            )
        try:
            parse_pattern(item)
        except InvalidPattern as exc:
            raise ProtocolError(GatewayCode.INVALID_PATTERN, exc.message, ref) from None
    return tuple(dict.fromkeys(value))  # in order, without repeats


def _offset(frame: dict[str, Any], ref: str | None) -> int:
    value = frame.get("since_offset", 0)
    if value is None:
        return 0
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(GatewayCode.INVALID_FRAME, "since_offset must be a whole number, 0 or more", ref)
    return value


def _optional_string(frame: dict[str, Any], key: str, ref: str | None) -> str | None:
    value = frame.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ProtocolError(GatewayCode.INVALID_FRAME, f"{key} must be a string", ref)
    problem = unicode_problem(value)
    if problem is not None:
        raise ProtocolError(GatewayCode.INVALID_FRAME, f"{key} {problem}", ref)
    return value


def decode_frame(
    text: str | bytes,
    *,
    max_payload_bytes: int | None = None,
    limits: EventLimits | None = None,
    max_patterns: int = MAX_PATTERNS_PER_FRAME,
) -> Command:
    """Decode one client frame into a command, or raise :class:`ProtocolError`.

    A subscribe or unsubscribe frame carries at most ``max_patterns`` patterns (``resource_exhausted``, counted
    before any is parsed).

    A ``type`` holding ``:`` is an event type to publish; it is validated with its payload and metadata against
    ``limits`` (a payload over ``max_payload_bytes``, when given, raises ``payload_too_large``).
    """
    frame = _parse_json(text)
    if not isinstance(frame, dict):
        raise ProtocolError(GatewayCode.NOT_AN_OBJECT, f"a frame must be a JSON object, not {type(frame).__name__}")
    ref = _ref(frame)
    kind = frame.get("type")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError(GatewayCode.INVALID_FRAME, "every frame needs a string field `type`", ref)
    if kind == "subscribe":
        epoch = _optional_string(frame, "epoch", ref)
        return Subscribe(_patterns(frame, ref, max_patterns), _offset(frame, ref), epoch, ref)
    if kind == "unsubscribe":
        return Unsubscribe(_patterns(frame, ref, max_patterns), ref)
    if kind == "ping":
        return Ping(ref)
    if kind == "cancel":
        correlation_id = _optional_string(frame, "correlation_id", ref)
        if correlation_id is None:
            raise ProtocolError(GatewayCode.INVALID_FRAME, "cancel needs a string correlation_id", ref)
        reason = _optional_string(frame, "reason", ref) or "cancelled by requester"
        return Cancel(correlation_id, reason[:256], ref or _text(correlation_id[:MAX_REF_LENGTH]))
    if ":" not in kind:
        raise ProtocolError(
            GatewayCode.UNKNOWN_TYPE,
            f"unknown frame type {kind[:64]!r}: use subscribe, unsubscribe, cancel, ping, "
            "or an event type <service>:<action>:v<N>:<state> to publish",
            ref,
        )
    return Publish(_event(frame, kind, ref, max_payload_bytes, limits), ref)


def _event(
    frame: dict[str, Any], kind: str, ref: str | None, max_payload_bytes: int | None, limits: EventLimits | None
) -> Event:
    unknown = sorted(set(frame) - _PUBLISH_FIELDS)
    if unknown:
        raise ProtocolError(
            GatewayCode.INVALID_FRAME,
            f"unknown field(s) {', '.join(unknown[:5])} in a publish frame; "
            "it carries type, payload, event_id and metadata",
            ref,
        )
    event_id = frame.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise ProtocolError(GatewayCode.INVALID_FRAME, "event_id must be a string", None)
    try:
        return Event.create(
            kind,
            frame.get("payload"),
            event_id=event_id or None,
            metadata=frame.get("metadata"),
            max_payload_bytes=max_payload_bytes,
            limits=limits,
        )
    except NexusError as exc:
        raise ProtocolError.from_error(exc, ref) from None


# --- encoding ---------------------------------------------------------------------------------------------------


def _dump(frame: dict[str, Any]) -> bytes:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def encode_connection(connection_id: str, epoch: str) -> bytes:
    """``{"type":"connection","status":"connected","connection_id","epoch"}``, the first frame."""
    return _dump({"type": "connection", "status": "connected", "connection_id": connection_id, "epoch": epoch})


def encode_subscribed(
    patterns: Sequence[str],
    *,
    epoch: str,
    head_offset: int,
    recovered: bool | None = None,
    ref: str | None = None,
) -> bytes:
    """The answer to ``subscribe``, sent before any replayed event; ``recovered`` only when resuming."""
    frame: dict[str, Any] = {"type": "subscribed", "event_types": list(patterns)}
    if recovered is not None:
        frame["recovered"] = recovered
    frame["epoch"] = epoch
    frame["head_offset"] = head_offset
    if ref is not None:
        frame["ref"] = ref
    return _dump(frame)


def encode_unsubscribed(patterns: Sequence[str], *, ref: str | None = None) -> bytes:
    """The answer to ``unsubscribe``."""
    frame: dict[str, Any] = {"type": "unsubscribed", "event_types": list(patterns)}
    if ref is not None:
        frame["ref"] = ref
    return _dump(frame)


def encode_published(event: Event, *, duplicate: bool = False) -> bytes:
    """The acknowledgement of a publish: the stored event's id and offset (the original's, for a duplicate)."""
    return _dump(
        {
            "type": "published",
            "event_id": event.event_id,
            "offset": event.offset,
            "epoch": event.epoch,
            "event_type": event.event_type,
            "duplicate": duplicate,
        }
    )


def encode_pong(ref: str | None = None) -> bytes:
    """The answer to ``ping``."""
    return _dump({"type": "pong", "ref": ref} if ref is not None else {"type": "pong"})


def encode_error(code: str, message: str, ref: str | None = None) -> bytes:
    """``{"type":"error","code","message","ref"?}``."""
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if ref is not None:
        frame["ref"] = ref
    return _dump(frame)


def encode_protocol_error(error: ProtocolError) -> bytes:
    """The error frame reporting ``error``."""
    return encode_error(error.code, error.message, error.ref)


_encode_string: Final = encode_basestring
"""JSON text of a ``str`` as ``json.dumps(..., ensure_ascii=False)`` writes it (the C encoder's)."""
_encode_compact: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _event_json_parts(event: Event) -> tuple[bytes, bytes, bytes]:
    """The event frame's JSON in three parts: what comes before the payload, the payload's JSON (the event's
    cached :meth:`~nexus.events.Event.payload_json`, never encoded again here) and what comes after it."""
    metadata = event.metadata
    head = f'{{"type":{_encode_string(event.event_type)},"event_id":{_encode_string(event.event_id)},"payload":'
    meta = _encode_compact(metadata) if metadata else "{}"
    tail = (
        f',"metadata":{meta},"offset":{event.offset:d},"epoch":{_encode_string(event.epoch)},'
        f'"timestamp":{_encode_string(event.timestamp)}}}'
    )
    return head.encode(), event.payload_json(), tail.encode()


def encode_event(event: Event) -> bytes:
    """``{"type":<event_type>,"event_id","payload","metadata","offset","epoch","timestamp"}``, compact UTF-8 JSON.

    The payload's JSON is spliced in from :meth:`~nexus.events.Event.payload_json` (encoded once per event, and
    already there when the edge checked it); the bytes are those of ``json.dumps`` of the whole object. Raises
    for an event no client could read (text that is not valid Unicode, NaN, a payload nested too deeply).
    """
    return b"".join(_event_json_parts(event))


def text_frame_header(size: int) -> bytes:
    """The header of one final, unmasked WebSocket text frame of ``size`` bytes (RFC 6455 §5.2: what a server
    writes; no extension is negotiated, the gateway serves without compression)."""
    if size < 126:
        return bytes((0x81, size))
    if size < 0x10000:
        return b"\x81\x7e" + size.to_bytes(2, "big")
    return b"\x81\x7f" + size.to_bytes(8, "big")


def text_frame(data: bytes) -> bytes:
    """``data`` (UTF-8 JSON) as one complete WebSocket text frame, ready for the socket."""
    return text_frame_header(len(data)) + data


def frame_data(frame: bytes) -> bytes:
    """The data of a frame made by :func:`text_frame` (its JSON)."""
    size = frame[1] & 0x7F
    return frame[2 if size < 126 else 4 if size == 126 else 10 :]


def encode_event_frame(event: Event) -> bytes:
    """The event's complete WebSocket text frame (header and :func:`encode_event`'s JSON), built once per event
    and written as is to every connection that receives it."""
    head, payload, tail = _event_json_parts(event)
    return b"".join((text_frame_header(len(head) + len(payload) + len(tail)), head, payload, tail))


def close_reason(text: str) -> str:
    """``text`` cut to what fits a close frame (123 UTF-8 bytes), on a character boundary."""
    data = text.encode()
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return text
    return data[:MAX_CLOSE_REASON_BYTES].decode("utf-8", errors="ignore")


class EventFrameCache:
    """Encodes each event once for every connection that receives it.

    The bus hands the same :class:`Event` object to every subscriber of a batch, so a recency cache keyed by the
    object's identity turns N encodings into one. An entry holds the event itself, so an ``id()`` is never
    reused while its entry lives. Connections take each batch within a turn or two of each other, so a few
    thousand entries suffice (``size``; a connection far behind re-encodes, as a replay does): the cache is held
    once per gateway, whatever the number of connections. ``encoder`` makes the bytes (the complete WebSocket
    event frame by default, :func:`encode_event_frame`; the Server-Sent Events endpoint caches its messages the
    same way).

    An event that cannot be encoded (text that is not valid Unicode, a payload nested past the JSON encoder's
    recursion limit, NaN: an old event in a NATS stream, say) encodes to None, and every connection skips it and
    keeps its place; it is counted in :attr:`skipped` and ``on_skip`` hears it (once per event).
    """

    def __init__(
        self,
        size: int = 4_096,
        encoder: Callable[[Event], bytes] = encode_event_frame,
        *,
        on_skip: Callable[[Event, Exception], None] | None = None,
    ) -> None:
        self._size = size
        self._encoder = encoder
        self._on_skip = on_skip
        self._entries: OrderedDict[int, tuple[Event, bytes | None]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.skipped = 0

    def encode(self, event: Event) -> bytes | None:
        """The frame of ``event``, or None when it cannot be sent."""
        key = id(event)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is event:
            self.hits += 1
            return entry[1]
        self.misses += 1
        data: bytes | None
        try:
            data = self._encoder(event)
        except Exception as exc:  # UnicodeEncodeError, RecursionError, ValueError (NaN), TypeError
            data = None
            self.skipped += 1
            if self._on_skip is not None:
                self._on_skip(event, exc)
        self._entries[key] = (event, data)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return data

    def __len__(self) -> int:
        return len(self._entries)
