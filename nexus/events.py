"""The event grammar and the ``Event`` value. Pure: no I/O, no asyncio.

An event type is ``<service>:<action>:v<N>:<state>``: ``service``, ``action`` and ``state`` are lowercase
``[a-z][a-z0-9_]*`` and the version is ``v`` plus a positive integer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from nexus.errors import InvalidEventType, InvalidPayload, PayloadTooLarge

NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]*\Z")
VERSION_RE: Final = re.compile(r"v[1-9][0-9]*\Z")
MAX_TOKEN_LENGTH: Final = 128
MAX_VERSION: Final = 2**31 - 1
"""Versions fit 31 bits (a signed 32-bit integer in every client language)."""
DEFAULT_MAX_PAYLOAD_BYTES: Final = 1_000_000
"""One payload limit for every bus and transport: a default NATS server carries messages up to 1 MiB, which must
also hold the event's id, timestamp and metadata (the NATS bus checks the server's limit at start-up)."""
DEFAULT_MAX_EVENT_BYTES: Final = 1024 * 1024
DEFAULT_MAX_PAYLOAD_DEPTH: Final = 32
DEFAULT_MAX_METADATA_ENTRIES: Final = 64
MAX_EVENT_ID_CHARS: Final = 256
QUOTE_CHARS: Final = 100
"""At most this many characters of a client's input are repeated in an error message."""

# Lifecycle states (contract).
REQUESTED: Final = "requested"
STARTED: Final = "started"
STREAM: Final = "stream"
HEARTBEAT: Final = "heartbeat"
SUCCESS: Final = "success"
FAILED: Final = "failed"
TIMEOUT: Final = "timeout"
CANCELLED: Final = "cancelled"
TERMINAL_STATES: Final = frozenset({SUCCESS, FAILED, TIMEOUT, CANCELLED})
LIFECYCLE_STATES: Final = frozenset({REQUESTED, STARTED, STREAM, HEARTBEAT}) | TERMINAL_STATES

TOKEN_NAMES: Final = ("service", "action", "version", "state")
_MAX_DOUBLE_INT: Final = 2**1024

JSONObject = dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class EventLimits:
    """What one event may hold; checked once, where an event enters Nexus (every transport, the NATS tail)."""

    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    """The whole event: type, id, payload and metadata as compact UTF-8 JSON."""
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_payload_depth: int = DEFAULT_MAX_PAYLOAD_DEPTH
    """Objects and arrays nested inside the payload object (the payload itself is depth 1)."""
    max_metadata_entries: int = DEFAULT_MAX_METADATA_ENTRIES


DEFAULT_LIMITS: Final = EventLimits()

DERIVED_METADATA_ENTRIES: Final = 5
"""Metadata entries Nexus adds to a client's event: who sent it (``owner``, and ``auth`` or ``user_id``, set by
the node that admitted it), its ``traceparent`` when traced, and to the events it derives from one (a lifecycle
event carries its request's metadata plus ``correlation_id``; a handler's side event ``causation_id``)."""
DERIVED_KEYS: Final = frozenset({"owner", "correlation_id", "causation_id"})
DERIVED_EVENT_BYTES: Final = 2048
"""Bytes those entries may add (a ``correlation_id`` is an event id: at most 256 characters)."""


def derived_event_limits(limits: EventLimits) -> EventLimits:
    """What an event Nexus derives from a client's may hold when the client's keeps ``limits``: the events of a
    request's lifecycle carry one metadata entry more than the request (and its bytes)."""
    return dataclasses.replace(
        limits,
        max_metadata_entries=limits.max_metadata_entries + DERIVED_METADATA_ENTRIES,
        max_event_bytes=limits.max_event_bytes + DERIVED_EVENT_BYTES,
    )


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters, so an error never repeats a whole oversized input.

    ``repr`` escapes what cannot be sent as UTF-8 (a lone surrogate becomes ``\\ud800``) and control characters
    (``\\x00``): the quote holds at most ``limit`` characters once escaped, plus its quotes.
    """
    shown = text[:limit]
    while len(repr(shown)) > limit + 2:  # escapes made it longer; one character is at most 10 escaped
        shown = shown[: -max(1, (len(repr(shown)) - limit - 2) // 10)]
    if len(shown) == len(text):
        return repr(text)
    return f"{shown!r}... ({len(text)} characters)"


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode text (a lone surrogate), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds {text[exc.start]!r} at character {exc.start}, a lone surrogate (not valid Unicode)"
    return None


def check_name_token(value: str, what: str) -> str | None:
    """Return why ``value`` is not a valid ``what`` token (service, action or state), or None."""
    if not value:
        return f"{what} is empty"
    if len(value) > MAX_TOKEN_LENGTH:
        return f"{what} is longer than {MAX_TOKEN_LENGTH} characters"
    if not NAME_RE.match(value):
        return f"{what} {quote(value, 40)} must match [a-z][a-z0-9_]*"
    return None


def check_version_token(value: str) -> str | None:
    """Return why ``value`` is not a valid version token (``v1``, ``v2``, ...), or None."""
    if not VERSION_RE.match(value):
        return f"version {quote(value, 40)} must be 'v' followed by a positive integer, like 'v1'"
    if len(value) > 11 or int(value[1:]) > MAX_VERSION:
        return f"version {quote(value, 40)} is over v{MAX_VERSION}"
    return None


def check_token(index: int, value: str) -> str | None:
    """Return why ``value`` is not valid at position ``index`` of an event type, or None."""
    if index == 2:
        return check_version_token(value)
    return check_name_token(value, TOKEN_NAMES[index])


@dataclasses.dataclass(frozen=True, slots=True)
class EventType:
    """A parsed event type."""

    service: str
    action: str
    version: int
    state: str

    @classmethod
    def parse(cls, text: str) -> EventType:
        """Parse ``text`` or raise :class:`InvalidEventType` naming the bad token.

        Valid types are remembered (at most :data:`TYPE_CACHE_SIZE`; a full cache starts over), so the few types
        a deployment uses are checked once, not once per event.
        """
        cached = _TYPE_CACHE.get(text) if type(text) is str else None
        if cached is not None:
            return cached
        parsed = cls._parse(text)
        if len(_TYPE_CACHE) >= TYPE_CACHE_SIZE:
            _TYPE_CACHE.clear()
        _TYPE_CACHE[text] = parsed
        return parsed

    @classmethod
    def _parse(cls, text: str) -> EventType:
        if not isinstance(text, str):
            raise InvalidEventType(f"event type must be a string, not {type(text).__name__}")
        tokens = text.split(":", 4)
        if len(tokens) != 4:
            count = text.count(":") + 1
            raise InvalidEventType(
                f"invalid event type {quote(text)}: expected 4 ':'-separated tokens "
                f"<service>:<action>:v<N>:<state>, got {count}"
            )
        for index, token in enumerate(tokens):
            problem = check_token(index, token)
            if problem is not None:
                raise InvalidEventType(f"invalid event type {quote(text, 60)}: {problem}")
        return cls(tokens[0], tokens[1], int(tokens[2][1:]), tokens[3])

    @property
    def base(self) -> str:
        """``service:action:vN``, the part shared by a request's whole lifecycle."""
        return f"{self.service}:{self.action}:v{self.version}"

    def with_state(self, state: str) -> EventType:
        """The same service, action and version with another state."""
        return dataclasses.replace(self, state=state)

    def __str__(self) -> str:
        return f"{self.base}:{self.state}"


TYPE_CACHE_SIZE: Final = 4096
_TYPE_CACHE: dict[str, EventType] = {}


def validate_event_type(text: str) -> str:
    """Return ``text`` if it is a valid event type, else raise :class:`InvalidEventType`."""
    EventType.parse(text)
    return text


def _check_json(value: Any, path: str, depth: int, max_depth: int) -> None:
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if abs(value) >= _MAX_DOUBLE_INT:
            raise InvalidPayload(f"payload{cut_path(path)} is an integer too large for a JSON number (a double)")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidPayload(f"payload{cut_path(path)} is {value!r}: NaN and Infinity are not valid JSON")
        return
    if isinstance(value, (Mapping, list, tuple)):
        if depth >= max_depth:
            raise InvalidPayload(f"payload{cut_path(path)} nests deeper than {max_depth} levels")
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InvalidPayload(f"payload{cut_path(path)} has a non-string key {cut_path(repr(key))}")
                _check_json(item, f"{path}.{key}", depth + 1, max_depth)
        else:
            for index, item in enumerate(value):
                _check_json(item, f"{path}[{index}]", depth + 1, max_depth)
        return
    raise InvalidPayload(f"payload{cut_path(path)} holds a {type(value).__name__}, which is not JSON")


_MIN_DOUBLE_INT: Final = -_MAX_DOUBLE_INT


def _plainly_json(payload: dict[str, Any], max_depth: int) -> bool:
    """Whether ``payload`` certainly passes :func:`_check_json` (plain dicts, lists, strings, finite floats, ints
    a double holds, nested at most ``max_depth`` levels): an iterative walk that builds no paths, and allocates
    nothing for a flat payload. False sends the payload to :func:`_check_json`, which decides and names the
    problem."""
    if max_depth < 1:
        return False
    for key in payload:
        if type(key) is not str:
            return False
    stack: list[tuple[Any, int]] | None = None
    isfinite = math.isfinite
    items: Any = payload.values()
    depth = 1
    while True:
        for item in items:
            kind = type(item)
            if kind is str or kind is bool or item is None:
                continue
            if kind is int:
                if _MIN_DOUBLE_INT < item < _MAX_DOUBLE_INT:
                    continue
                return False
            if kind is float:
                if isfinite(item):
                    continue
                return False
            if (kind is dict or kind is list) and depth < max_depth:
                if stack is None:
                    stack = []
                stack.append((item, depth + 1))
                continue
            return False
        if not stack:
            return True
        container, depth = stack.pop()
        if type(container) is dict:
            for key in container:
                if type(key) is not str:
                    return False
            items = container.values()
        else:
            items = container


def _check_payload(payload: Any, max_depth: int) -> None:
    """:func:`_check_json` for a payload object, fast when nothing is wrong."""
    if type(payload) is not dict or not _plainly_json(payload, max_depth):
        _check_json(payload, "", 0, max_depth)


def json_shape_problem(value: Any, max_depth: int) -> str | None:
    """Why ``value`` is no JSON a client can read back — objects and arrays nested deeper than ``max_depth``
    levels (``value`` itself is the first), or NaN / Infinity — or None.

    Iterative, so any depth is measured, and it looks at nothing but containers and floats: cheap enough for an
    encoder to run on every event it sends (text that is not valid Unicode fails the encoding itself).
    """
    if not isinstance(value, (Mapping, list, tuple)):
        return None
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > max_depth:
            return f"nests deeper than {max_depth} levels"
        items = container.values() if isinstance(container, Mapping) else container
        for item in items:
            if isinstance(item, (Mapping, list, tuple)):
                stack.append((item, depth + 1))
            elif isinstance(item, float) and not math.isfinite(item):
                return f"holds {item!r}: NaN and Infinity are not valid JSON"
    return None


def shorten(text: str, limit: int = QUOTE_CHARS) -> str:
    """``text`` cut to ``limit`` characters (for log lines: never all of a long input)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def cut_path(path: str) -> str:
    """A payload path as an error message shows it (keys come from the client: never all of a long one, and a
    key that is not valid Unicode text shows its lone surrogates escaped, so the message can be sent)."""
    shown = path if len(path) <= QUOTE_CHARS else f"{path[:QUOTE_CHARS]}..."
    if unicode_problem(shown) is not None:
        shown = shown.encode("utf-8", "backslashreplace").decode("utf-8")
    return shown


def _find_bad_text(value: Any, path: str) -> str | None:
    """The path of the first key or string in ``value`` that is not valid Unicode (only called on failure)."""
    if isinstance(value, str):
        return path if unicode_problem(value) else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if unicode_problem(key):
                return f"{path} (a key)"
            found = _find_bad_text(item, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _find_bad_text(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _compact_encoder() -> Callable[[Any], str]:
    """Compact JSON text (``ensure_ascii=False``, no NaN): the C encoder called directly where it exists.

    ``json.JSONEncoder.encode`` builds that encoder and a circular-reference table on every call, which costs more
    than encoding a small payload; what reaches this encoder was walked first (a bounded depth), or is caught as
    the :class:`RecursionError` a cycle ends in.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has the C encoder
        return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
    encoder = make(None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, False)

    def encode(value: Any) -> str:
        if type(value) is str:
            return json.encoder.encode_basestring(value)
        return "".join(encoder(value, 0))

    return encode


_encode_compact: Final = _compact_encoder()


def encode_json(value: Any, what: str) -> bytes:
    """``value`` as compact UTF-8 JSON; raises :class:`InvalidPayload` for text that is not valid Unicode, for
    NaN or Infinity, and for what no JSON can hold (a cycle, a value of another type)."""
    try:
        return _encode_compact(value).encode("utf-8")
    except UnicodeEncodeError:
        where = _find_bad_text(value, "") or ""
        raise InvalidPayload(f"{what}{cut_path(where)} holds a lone surrogate: not valid Unicode text") from None
    except ValueError as exc:
        raise InvalidPayload(f"{what} holds NaN or Infinity, which are not valid JSON") from exc
    except RecursionError:
        raise InvalidPayload(f"{what} nests too deep (or holds itself) to be JSON") from None
    except TypeError as exc:
        raise InvalidPayload(f"{what} holds a value that is not JSON: {exc}") from None


def json_size(value: Any, what: str) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON; raises :class:`InvalidPayload` for text that is not valid Unicode."""
    return len(encode_json(value, what))


_ENVELOPE_BYTES: Final = len('{"t":,"i":,"p":,"m":}')


_ESCAPED: Final = re.compile(r'[\x00-\x1f"\\]')
"""Characters compact JSON text escapes (with ``ensure_ascii=False``: quotes, backslashes, control characters)."""


def _text_size(text: str) -> int:
    """``len`` of ``text`` as a JSON string in UTF-8 (quotes included), without encoding it when nothing in it is
    escaped; raises :class:`UnicodeEncodeError` for text that is not valid Unicode."""
    if _ESCAPED.search(text) is None:
        return (len(text) if text.isascii() else len(text.encode("utf-8"))) + 2
    return len(_encode_compact(text).encode("utf-8"))


def _envelope_size(payload_json: bytes, event_type: str, event_id: str, metadata: Mapping[str, str]) -> int:
    """``len`` of ``{"t":event_type,"i":event_id,"p":payload,"m":metadata}`` as compact UTF-8 JSON, given the
    payload's encoding (the rest is counted, not encoded)."""
    if type(event_type) is not str or type(event_id) is not str or type(metadata) is not dict:
        rest = encode_json([event_type, event_id, metadata], "event")  # ["t","i",{...}]: brackets and two commas
        return _ENVELOPE_BYTES + len(payload_json) + len(rest) - 4
    size = _ENVELOPE_BYTES + len(payload_json) + _text_size(event_type) + _text_size(event_id) + 2
    if metadata:
        size += 2 * len(metadata) - 1  # a colon per entry, a comma between two
        for key, value in metadata.items():
            if type(key) is not str or type(value) is not str:
                raise InvalidPayload("metadata must map strings to strings")
            size += _text_size(key) + _text_size(value)
    return size


_set: Final = object.__setattr__
"""Sets a cache field of a frozen :class:`Event` (only values derived from fields that never change)."""


def validate_payload(
    payload: Any, *, max_bytes: int | None = None, max_depth: int = DEFAULT_MAX_PAYLOAD_DEPTH
) -> JSONObject:
    """Return ``payload`` as a JSON object, or raise :class:`InvalidPayload` naming the problem.

    ``None`` stands for the empty object. Objects and arrays nest at most ``max_depth`` levels (the payload
    itself is the first), every key and string is valid Unicode. With ``max_bytes``, a payload whose compact
    JSON encoding is larger raises :class:`PayloadTooLarge`.
    """
    return _checked_payload(payload, max_bytes=max_bytes, max_depth=max_depth)[0]


_EMPTY_OBJECT: Final = b"{}"


def _checked_payload(payload: Any, *, max_bytes: int | None, max_depth: int) -> tuple[JSONObject, bytes]:
    """:func:`validate_payload`, also returning the payload's compact JSON encoding (made once, for the size)."""
    if payload is None:
        return {}, _EMPTY_OBJECT
    if not isinstance(payload, Mapping):
        raise InvalidPayload(f"payload must be a JSON object, not {type(payload).__name__}")
    _check_payload(payload, max_depth)
    result = dict(payload)
    encoded = encode_json(result, "payload")
    if max_bytes is not None and len(encoded) > max_bytes:
        raise PayloadTooLarge(f"payload is {len(encoded)} bytes, over the limit of {max_bytes} bytes")
    return result, encoded


def validate_metadata(metadata: Any, *, max_entries: int = DEFAULT_MAX_METADATA_ENTRIES) -> dict[str, str]:
    """Return ``metadata`` as a string map of valid Unicode text, at most ``max_entries`` entries, or raise
    :class:`InvalidPayload`."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidPayload(f"metadata must be an object of strings, not {type(metadata).__name__}")
    if len(metadata) > max_entries:
        raise InvalidPayload(f"metadata has {len(metadata)} entries, over the limit of {max_entries}")
    result: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidPayload(f"metadata entry {cut_path(repr(key))} must map a string to a string")
        if not key:
            raise InvalidPayload("metadata keys must not be empty")
        problem = unicode_problem(key) or unicode_problem(value)
        if problem is not None:
            raise InvalidPayload(f"metadata entry {quote(key, 40)} {problem}")
        result[key] = value
    return result


def validate_event_id(event_id: Any) -> str:
    """Return ``event_id`` if it is at most 256 printable characters, else raise :class:`InvalidPayload`."""
    if not isinstance(event_id, str):
        raise InvalidPayload("event_id must be a string")
    if len(event_id) > MAX_EVENT_ID_CHARS:
        raise InvalidPayload(f"event_id is longer than {MAX_EVENT_ID_CHARS} characters")
    if not event_id.isprintable():
        bad = next(char for char in event_id if not char.isprintable())
        raise InvalidPayload(
            f"event_id {quote(event_id, 40)} holds {bad!r}: ids are printable text (no control characters, "
            "line breaks or lone surrogates)"
        )
    return event_id


class _IdSource(threading.local):
    """128 random bits as 32 hex characters per id (as ``uuid4().hex`` gives, minus its version bits), read from
    the OS's random source 256 ids at a time: ids are unguessable and cost no system call each. Each thread reads
    its own (two threads never hand out the same id)."""

    _IDS_PER_READ: Final = 256

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the ids read so far (a forked process reads its own)."""
        self._hex = ""
        self._next = 0

    def __call__(self) -> str:
        start = self._next
        if start >= len(self._hex):
            self._hex = os.urandom(16 * self._IDS_PER_READ).hex()
            start = 0
        self._next = start + 32
        return self._hex[start : start + 32]


new_event_id: Final = _IdSource()
"""A fresh, unique, unguessable event id (32 hex characters)."""
if hasattr(os, "register_at_fork"):  # a forked worker must not hand out its parent's next ids
    os.register_at_fork(after_in_child=new_event_id.reset)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` suffix and microseconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_second_text: tuple[int, str] = (-1, "")


def timestamp_of_ns(nanoseconds: int) -> str:
    """Epoch nanoseconds as RFC 3339 UTC text with microseconds (``2026-11-27T07:19:24.123456Z``).

    The date and time of day are formatted once per second; only the microseconds are formatted per call.
    """
    global _second_text
    micros = nanoseconds // 1000
    second, fraction = divmod(micros, 1_000_000)
    cached_second, prefix = _second_text
    if second != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second_text = (second, prefix)
    return f"{prefix}.{fraction:06d}Z"


def now_timestamp() -> str:
    """The current time, RFC 3339 UTC."""
    return timestamp_of_ns(time.time_ns())


def parse_time(value: Any) -> float:
    """Read a time given as RFC 3339 text or epoch seconds; return epoch seconds.

    Raises :class:`InvalidPayload` for anything else, NaN and Infinity included.
    """
    if isinstance(value, bool):
        raise InvalidPayload(f"time must be RFC 3339 text or epoch seconds, not {value!r}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            raise InvalidPayload("time is not a finite number: too large for a double") from None
        if not math.isfinite(seconds):
            raise InvalidPayload(f"time {value!r} is not a finite number")
        return seconds
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidPayload(f"time {value!r} is not RFC 3339 text") from None
        if moment.tzinfo is None:
            raise InvalidPayload(f"time {value!r} has no UTC offset (add 'Z' or '+00:00')")
        return moment.timestamp()
    raise InvalidPayload(f"time must be RFC 3339 text or epoch seconds, not {type(value).__name__}")


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One event (contract): what handlers receive and clients see.

    ``offset`` and ``epoch`` are set once the bus stores the event (:meth:`stored` returns a copy carrying them);
    ``offset`` is 0 for an event that is not stored (a heartbeat) or not stored yet. An event is a value: its
    fields cannot be reassigned (``dataclasses.replace`` makes a changed copy), and code that builds an event
    from another builds new ``payload`` / ``metadata`` dicts rather than changing the original's.
    """

    event_type: str
    payload: JSONObject = dataclasses.field(default_factory=dict)
    event_id: str = dataclasses.field(default_factory=new_event_id)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    timestamp: str = dataclasses.field(default_factory=now_timestamp)
    offset: int = 0
    epoch: str = ""
    _parsed: EventType | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _size: int = dataclasses.field(default=-1, init=False, repr=False, compare=False)
    _payload_json: bytes | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def type(self) -> EventType:
        """The parsed event type (parsed once per event, then kept)."""
        parsed = self._parsed
        if parsed is None:
            parsed = EventType.parse(self.event_type)
            object.__setattr__(self, "_parsed", parsed)  # a cache: the value it derives from never changes
        return parsed

    @property
    def state(self) -> str:
        """The last token of the event type."""
        return self.event_type.rsplit(":", 1)[-1]

    @property
    def correlation_id(self) -> str:
        """``metadata['correlation_id']``, or empty."""
        return self.metadata.get("correlation_id", "")

    def stored(self, offset: int, epoch: str) -> Event:
        """A copy carrying the offset and epoch the bus gave it (what was derived from the fields is kept)."""
        return _build(
            self.event_type,
            self.payload,
            self.event_id,
            self.metadata,
            self.timestamp,
            offset,
            epoch,
            self._parsed,
            self._size,
            self._payload_json,
        )

    def evolve(self, **changes: Any) -> Event:
        """A copy with ``changes`` (field names and new values); what was derived from unchanged fields is kept."""
        unknown = changes.keys() - _FIELD_NAMES
        if unknown:
            raise TypeError(f"Event has no field {sorted(unknown)[0]!r} to change")
        event_type = changes.get("event_type", self.event_type)
        payload_changed = "payload" in changes
        return _build(
            event_type,
            changes["payload"] if payload_changed else self.payload,
            changes.get("event_id", self.event_id),
            changes.get("metadata", self.metadata),
            changes.get("timestamp", self.timestamp),
            changes.get("offset", self.offset),
            changes.get("epoch", self.epoch),
            self._parsed if event_type == self.event_type else None,
            -1 if changes.keys() & _SIZED_FIELDS else self._size,
            None if payload_changed else self._payload_json,
        )

    def payload_json(self) -> bytes:
        """The payload as compact UTF-8 JSON (``ensure_ascii=False``), encoded once per event, then kept.

        What sizes an event, what the JSON payload encoding of gRPC and the gateway's frames carry. Raises
        :class:`InvalidPayload` for a payload no JSON encoder can write (text that is not valid Unicode, NaN).
        """
        data = self._payload_json
        if data is None:
            data = encode_json(self.payload, "payload")
            _set(self, "_payload_json", data)  # a cache: the payload it derives from never changes
        return data

    def size(self) -> int:
        """Bytes of the event's type, id, payload and metadata as compact UTF-8 JSON (what limits count):
        ``{"t":<type>,"i":<id>,"p":<payload>,"m":<metadata>}``.

        Computed once per event (the edge's check computes it), then kept.
        """
        size = self._size
        if size < 0:
            try:
                size = _envelope_size(self.payload_json(), self.event_type, self.event_id, self.metadata)
            except (InvalidPayload, ValueError, TypeError, RecursionError):
                # An event no encoder could send (built without the checks): its size only bounds memory.
                body = {"t": self.event_type, "i": self.event_id, "p": self.payload, "m": self.metadata}
                size = len(repr(body))
            _set(self, "_size", size)  # a cache: the fields it derives from never change
        return size

    def to_dict(self) -> JSONObject:
        """A JSON-ready dict, as the CLI prints and the gateway sends it."""
        return {
            "event_type": self.event_type,
            "event_id": self.event_id,
            "payload": self.payload,
            "metadata": self.metadata,
            "timestamp": self.timestamp,
            "offset": self.offset,
            "epoch": self.epoch,
        }

    @classmethod
    def create(
        cls,
        event_type: str,
        payload: Any = None,
        *,
        event_id: str | None = None,
        metadata: Any = None,
        max_payload_bytes: int | None = None,
        limits: EventLimits | None = None,
    ) -> Event:
        """Build a validated event; raises :class:`InvalidEventType`, :class:`InvalidPayload` or
        :class:`PayloadTooLarge` (``limits``: :data:`DEFAULT_LIMITS` unless given; ``max_payload_bytes``
        overrides its payload limit)."""
        limits = limits or DEFAULT_LIMITS
        parsed = EventType.parse(event_type)
        if event_id is not None:
            validate_event_id(event_id)
        checked, encoded = _checked_payload(
            payload,
            max_bytes=max_payload_bytes if max_payload_bytes is not None else limits.max_payload_bytes,
            max_depth=limits.max_payload_depth,
        )
        meta = validate_metadata(metadata, max_entries=limits.max_metadata_entries)
        event_id = event_id or new_event_id()
        size = _envelope_size(encoded, event_type, event_id, meta)
        if size > limits.max_event_bytes:
            raise PayloadTooLarge(
                f"the event is {size} bytes (type, id, payload and metadata), over the limit of "
                f"{limits.max_event_bytes} bytes"
            )
        if cls is not Event:  # pragma: no cover - a subclass gets its own __init__
            event = cls(event_type, checked, event_id, meta)
            _set(event, "_payload_json", encoded)
            _set(event, "_parsed", parsed)
            return event
        # What the checks made is kept: the type's parse, the payload's encoding and the size.
        return _build(event_type, checked, event_id, meta, now_timestamp(), 0, "", parsed, size, encoded)


_FIELD_NAMES: Final = frozenset(field.name for field in dataclasses.fields(Event) if field.init)
_SIZED_FIELDS: Final = frozenset({"event_type", "event_id", "payload", "metadata"})
_new: Final = object.__new__
(
    _set_type,
    _set_payload,
    _set_id,
    _set_metadata,
    _set_timestamp,
    _set_offset,
    _set_epoch,
    _set_parsed,
    _set_size,
    _set_payload_json,
) = (
    Event.__dict__[name].__set__
    for name in (
        "event_type",
        "payload",
        "event_id",
        "metadata",
        "timestamp",
        "offset",
        "epoch",
        "_parsed",
        "_size",
        "_payload_json",
    )
)


def _build(
    event_type: str,
    payload: JSONObject,
    event_id: str,
    metadata: dict[str, str],
    timestamp: str,
    offset: int,
    epoch: str,
    parsed: EventType | None,
    size: int,
    payload_json: bytes | None,
) -> Event:
    """An :class:`Event` with its caches, set through its slots (a frozen dataclass's ``__init__`` costs twice as
    much: every copy of a stored or admitted event is made here)."""
    event: Event = _new(Event)
    _set_type(event, event_type)
    _set_payload(event, payload)
    _set_id(event, event_id)
    _set_metadata(event, metadata)
    _set_timestamp(event, timestamp)
    _set_offset(event, offset)
    _set_epoch(event, epoch)
    _set_parsed(event, parsed)
    _set_size(event, size)
    _set_payload_json(event, payload_json)
    return event


def check_event(event: Event, limits: EventLimits = DEFAULT_LIMITS, *, size_at_most: int | None = None) -> Event:
    """Return ``event`` if it keeps every rule :meth:`Event.create` enforces, else raise
    :class:`InvalidEventType`, :class:`InvalidPayload` or :class:`PayloadTooLarge`.

    For events built by something that did not validate them: the NATS tail reads what any writer put on a
    Nexus subject (another Nexus version, a NATS tool). Besides what ``create`` checks, the timestamp must be
    RFC 3339 text with an offset.

    ``size_at_most``: a bound on :meth:`Event.size` the caller knows, given only when it also knows that all the
    event's text is valid Unicode (decoded from strict UTF-8 JSON holding no ``\\u`` escape). Under both
    limits, the event is then not encoded again to be measured.
    """
    if isinstance(event.metadata, Mapping) and not DERIVED_KEYS.isdisjoint(event.metadata):
        # Stored by a node (owner) or derived from such an event (correlation_id): the client's part kept
        # ``limits``; the node's entries come on top.
        limits = derived_event_limits(limits)
    EventType.parse(event.event_type)
    validate_event_id(event.event_id)
    if not isinstance(event.payload, dict):
        raise InvalidPayload(f"payload must be a JSON object, not {type(event.payload).__name__}")
    _check_payload(event.payload, limits.max_payload_depth)
    validate_metadata(event.metadata, max_entries=limits.max_metadata_entries)
    if not isinstance(event.timestamp, str) or unicode_problem(event.timestamp) is not None:
        raise InvalidPayload("timestamp must be RFC 3339 text")
    parse_time(event.timestamp)
    if size_at_most is not None and size_at_most <= min(limits.max_event_bytes, limits.max_payload_bytes):
        return event
    payload_json = encode_json(event.payload, "payload")  # also finds any text that is not valid Unicode
    size = _envelope_size(payload_json, event.event_type, event.event_id, event.metadata)
    _set(event, "_payload_json", payload_json)
    _set(event, "_size", size)
    if size > limits.max_event_bytes:
        raise PayloadTooLarge(
            f"the event is {size} bytes (type, id, payload and metadata), over the limit of "
            f"{limits.max_event_bytes} bytes"
        )
    if size > limits.max_payload_bytes:
        payload_size = len(payload_json)
        if payload_size > limits.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload is {payload_size} bytes, over the limit of {limits.max_payload_bytes} bytes"
            )
    return event
