"""Conversions between protobuf messages and :class:`~nexus.events.Event`, and the error-code table."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import grpc
import structlog
from google.protobuf import struct_pb2, timestamp_pb2

from nexus.errors import ErrorCode, InvalidArgument, InvalidPayload, PayloadTooLarge
from nexus.events import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_PAYLOAD_DEPTH,
    Event,
    EventLimits,
    JSONObject,
    cut_path,
    shorten,
)
from nexus.logs import LogLimiter
from nexus.v1 import nexus_pb2

log = structlog.get_logger("nexus.grpc")

STATUS_FOR_CODE: Final[dict[ErrorCode, grpc.StatusCode]] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}
CODE_FOR_STATUS: Final[dict[grpc.StatusCode, ErrorCode]] = {v: k for k, v in STATUS_FOR_CODE.items()}
STORED: Final = "stored"
DUPLICATE: Final = "duplicate"
"""``EventResponse.message`` of a publish: the event was stored now, or its ``event_id`` was stored before (the
response carries the stored original)."""


def payload_to_struct(payload: JSONObject) -> struct_pb2.Struct:
    """A JSON object as a ``google.protobuf.Struct``."""
    struct = struct_pb2.Struct()
    if payload:
        struct.update(payload)
    return struct


_MAX_EXACT_INT: Final = 2**53
_ANY_DEPTH: Final = 10_000
"""What a client reads back: protobuf's own parser stops far earlier (100 levels)."""
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _from_value(value: struct_pb2.Value, path: str, depth: int, max_depth: int) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise InvalidPayload(f"payload{cut_path(path)} is {number!r}: NaN and Infinity are not valid JSON")
        # Struct numbers are doubles; a whole number within the exact range reads back as an int.
        if number.is_integer() and abs(number) < _MAX_EXACT_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _from_struct(value.struct_value, path, depth + 1, max_depth)
    if kind == "list_value":
        if depth + 1 > max_depth:
            raise InvalidPayload(f"payload{cut_path(path)} nests deeper than {max_depth} levels")
        return [
            _from_value(item, f"{path}[{index}]", depth + 1, max_depth)
            for index, item in enumerate(value.list_value.values)
        ]
    return None


def _from_struct(struct: struct_pb2.Struct, path: str, depth: int, max_depth: int) -> JSONObject:
    if depth > max_depth:
        raise InvalidPayload(f"payload{cut_path(path)} nests deeper than {max_depth} levels")
    return {key: _from_value(item, f"{path}.{key}", depth, max_depth) for key, item in struct.fields.items()}


def struct_to_payload(struct: struct_pb2.Struct, max_depth: int = DEFAULT_MAX_PAYLOAD_DEPTH) -> JSONObject:
    """A ``Struct`` as a JSON object. Raises :class:`InvalidPayload` for NaN or Infinity, or for objects and
    arrays nested deeper than ``max_depth`` (the payload itself is level 1).

    Struct numbers are doubles: whole numbers below 2**53 come back as ``int``, so ``{"n": 3}`` sent by any
    client reads as ``3`` in a handler; other numbers stay ``float``.
    """
    if max_depth >= 1:
        try:
            return {key: _plain_value(item, 1, max_depth) for key, item in struct.fields.items()}
        except _Refused:
            pass
    return _from_struct(struct, "", 1, max_depth)  # names the problem


class _Refused(InvalidPayload):
    """:func:`_plain_value` met what :func:`_from_struct` refuses (it then runs, to say where and why)."""

    def __init__(self) -> None:
        super().__init__("the payload is refused")


def _plain_value(value: struct_pb2.Value, depth: int, max_depth: int) -> Any:
    """:func:`_from_value` without the paths an error message needs (built per key, they cost more than the
    conversion): anything it would refuse raises :class:`_Refused`."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise _Refused
        if number.is_integer() and -_MAX_EXACT_INT < number < _MAX_EXACT_INT:
            return int(number)
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        if depth + 1 > max_depth:
            raise _Refused
        return {key: _plain_value(item, depth + 1, max_depth) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        if depth + 1 > max_depth:
            raise _Refused
        return [_plain_value(item, depth + 1, max_depth) for item in value.list_value.values]
    return None


def _timestamp_slow(text: str) -> tuple[int, int]:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromJsonString(text)
        return stamp.seconds, stamp.nanos
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return delta.days * 86_400 + delta.seconds, delta.microseconds * 1000


_SECONDS_OF: dict[str, int] = {}
"""Epoch seconds of recent ``YYYY-MM-DDTHH:MM:SS`` prefixes: events of one second share one parse."""
_SECONDS_CACHE_SIZE: Final = 4096


def timestamp_parts(text: str) -> tuple[int, int]:
    """Epoch seconds and nanoseconds of an RFC 3339 string; ``(0, 0)`` for empty text; raises ``ValueError`` for
    text that is not a time.

    Nexus's own timestamps (``2026-11-27T07:19:24.123456Z``) are read with the date and time of day parsed once per
    second; any other form goes through ``datetime.fromisoformat`` (far faster than protobuf's FromJsonString,
    which is the last resort)."""
    if not text:
        return 0, 0
    if len(text) == 27 and text[26] == "Z" and text[19] == ".":
        prefix = text[:19]
        seconds = _SECONDS_OF.get(prefix)
        if seconds is None:
            seconds = _timestamp_slow(prefix)[0] if prefix.isascii() else None
            if seconds is not None:
                if len(_SECONDS_OF) >= _SECONDS_CACHE_SIZE:
                    _SECONDS_OF.clear()
                _SECONDS_OF[prefix] = seconds
        fraction = text[20:26]
        if seconds is not None and fraction.isascii() and fraction.isdigit():
            return seconds, int(fraction) * 1000
    return _timestamp_slow(text)


def timestamp_to_proto(text: str) -> timestamp_pb2.Timestamp:
    """An RFC 3339 string as a ``Timestamp`` (see :func:`timestamp_parts`)."""
    seconds, nanos = timestamp_parts(text)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def timestamp_from_proto(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    text: str = stamp.ToJsonString()
    return text


def _json_constant(name: str) -> Any:
    raise InvalidPayload(f"payload_json holds {name}: NaN and Infinity are not valid JSON")


def _json_float(text: str) -> float | int:
    number = float(text)
    if not math.isfinite(number):
        raise InvalidPayload(f"payload_json holds {shorten(text, 40)}, too large for a JSON number (a double)")
    return _whole(number)


def _whole(number: float) -> float | int:
    """A whole double within the exact range as an ``int`` (what a ``Struct`` payload reads back as), else as it
    is: a payload reads the same whichever encoding carried it."""
    if number.is_integer() and abs(number) < _MAX_EXACT_INT:
        return int(number)
    return number


def payload_from_json(data: bytes, limits: EventLimits = DEFAULT_LIMITS) -> JSONObject:
    """The payload a ``payload_json`` field carries: UTF-8 JSON text of one object. Raises
    :class:`InvalidPayload` (or :class:`~nexus.errors.PayloadTooLarge`) naming the problem: not UTF-8, not JSON,
    not an object, NaN or Infinity, nested too deep, too large. What :meth:`Event.create` checks of any payload
    (depth, size) is checked there, with the same messages."""
    if len(data) > limits.max_event_bytes:
        raise PayloadTooLarge(
            f"payload_json is {len(data)} bytes, over the limit of {limits.max_event_bytes} bytes for a whole event"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPayload(f"payload_json is not valid UTF-8 (byte {exc.start})") from None
    try:
        payload = json.loads(text, parse_constant=_json_constant, parse_float=_json_float)
    except json.JSONDecodeError as exc:
        raise InvalidPayload(f"payload_json is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidPayload(f"payload nests deeper than {limits.max_payload_depth} levels") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise InvalidPayload(f"payload_json holds a number that is not valid JSON: {shorten(str(exc), 80)}") from None
    if not isinstance(payload, dict):
        raise InvalidPayload(f"payload must be a JSON object, not {_json_kind(payload)}")
    return payload


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", type(None): "null"}.get(type(value), type(value).__name__)


def event_from_request(request: nexus_pb2.EventRequest, *, limits: EventLimits = DEFAULT_LIMITS) -> Event:
    """A validated :class:`Event` from an ``EventRequest``; raises a ``NexusError`` for bad input."""
    if len(request.metadata) > limits.max_metadata_entries:
        raise InvalidPayload(
            f"metadata has {len(request.metadata)} entries, over the limit of {limits.max_metadata_entries}"
        )
    payload: Any
    if request.payload_json:
        if request.HasField("payload"):
            raise InvalidArgument("set payload or payload_json, not both")
        payload = payload_from_json(request.payload_json, limits)
    elif request.HasField("payload"):
        payload = struct_to_payload(request.payload, limits.max_payload_depth)
    else:
        payload = {}
    return Event.create(
        request.event_type,
        payload,
        event_id=request.event_id or None,
        metadata=dict(request.metadata),
        limits=limits,
    )


def event_to_request(event: Event, *, json_payload: bool = False) -> nexus_pb2.EventRequest:
    """An ``EventRequest`` carrying ``event`` (client side); with ``json_payload``, its payload as
    ``payload_json``."""
    if json_payload:
        return nexus_pb2.EventRequest(
            event_type=event.event_type,
            event_id=event.event_id,
            payload_json=event.payload_json(),
            metadata=event.metadata,
        )
    return nexus_pb2.EventRequest(
        event_type=event.event_type,
        event_id=event.event_id,
        payload=payload_to_struct(event.payload),
        metadata=event.metadata,
    )


def event_to_response(
    event: Event, *, message: str = "", success: bool = True, json_payload: bool = False
) -> nexus_pb2.EventResponse:
    """An ``EventResponse`` for ``event``, built through the protobuf API (the servicer sends
    :func:`encode_response`'s bytes, which parse to this message); with ``json_payload``, the payload goes as
    ``payload_json``."""
    response = nexus_pb2.EventResponse(
        success=success,
        message=message,
        event_type=event.event_type,
        event_id=event.event_id,
        metadata=event.metadata,
        offset=event.offset,
        epoch=event.epoch,
        timestamp=timestamp_to_proto(event.timestamp),
    )
    if json_payload:
        response.payload_json = event.payload_json()
    elif event.payload:
        response.payload.update(event.payload)  # in place: no copy of a separately built Struct
    return response


def _decoded_float(text: str) -> float | int:
    return _whole(float(text))


def event_from_response(response: nexus_pb2.EventResponse) -> Event:
    """An :class:`Event` from an ``EventResponse`` (client side)."""
    if response.payload_json:
        # The server checked it; whole numbers read as they would from a Struct.
        payload = json.loads(response.payload_json, parse_float=_decoded_float)
    else:
        payload = struct_to_payload(response.payload, max_depth=_ANY_DEPTH)  # the server checked it
    return Event(
        event_type=response.event_type,
        payload=payload,
        event_id=response.event_id,
        metadata=dict(response.metadata),
        timestamp=timestamp_from_proto(response.timestamp),
        offset=response.offset,
        epoch=response.epoch,
    )


def _varint(value: int) -> bytes:
    """``value`` (0 to 2**64 - 1) as a protobuf varint: 7 bits per byte, low bits first."""
    if value < 0x4000:
        return _LENGTHS[value] if _LENGTHS else _varint_loop(value)
    if value < 0x200000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
    if value < 0x10000000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, ((value >> 14) & 0x7F) | 0x80, value >> 21))
    if value < 0x800000000:  # nanoseconds, epoch seconds
        return bytes(
            (
                (value & 0x7F) | 0x80,
                ((value >> 7) & 0x7F) | 0x80,
                ((value >> 14) & 0x7F) | 0x80,
                ((value >> 21) & 0x7F) | 0x80,
                value >> 28,
            )
        )
    return _varint_loop(value)


def _varint_loop(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_EVENTS_FIELD_TAG: Final = b"\x0a"  # SubscribeEventBatchesResponse.events: field 1, length-delimited
_EVENT_FIELD_TAG: Final = b"\x0a"  # RequestEventResponse.event: field 1, length-delimited


# --- EventResponse bytes, assembled by hand -------------------------------------------------------------------------
#
# A message on the wire is its fields in turn: a tag (field number << 3 | wire type), then a varint, a fixed 64-bit
# value or a length and that many bytes. Building an ``EventResponse`` and a ``Struct`` through the protobuf API
# costs more than the rest of a delivery; these functions write the same fields directly. What they write parses
# to the message :func:`event_to_response` builds (tests/test_grpc_encoding.py checks it for any event).

_LENGTHS: tuple[bytes, ...] = ()
_LENGTHS = tuple(_varint_loop(n) for n in range(1 << 14))
"""Varints of the lengths below 16 KiB, looked up rather than computed."""
_pack_double: Final = struct.Struct("<d").pack
_UINT64: Final = 1 << 64


def _length(size: int) -> bytes:
    return _LENGTHS[size] if size < 16384 else _varint(size)


def length_delimited(number: int, data: bytes) -> bytes:
    """Field ``number`` (below 16) of a message, holding ``data`` (bytes, a string or a serialized message)."""
    return bytes((number << 3 | 2,)) + _length(len(data)) + data


class Unsendable(InvalidPayload):
    """A payload no protobuf client could read (NaN, nesting past :data:`PROTOBUF_MAX_PAYLOAD_DEPTH`, a number
    past a double, a value that is not JSON): an event stored before the checks, or by another writer."""


def _value_bytes(value: Any, level: int) -> bytes:
    """A ``google.protobuf.Value`` holding ``value``, inside a container at nesting ``level``."""
    kind = type(value)
    if kind is str:
        data: bytes = value.encode("utf-8")
        return b"\x1a" + _length(len(data)) + data  # string_value = 3
    if kind is bool:
        return b"\x20\x01" if value else b"\x20\x00"  # bool_value = 4
    if kind is int or kind is float:
        try:
            number = float(value)
        except OverflowError:
            raise Unsendable("holds an integer too large for a JSON number (a double)") from None
        if not math.isfinite(number):
            raise Unsendable(f"holds {value!r}: NaN and Infinity are not valid JSON")
        return b"\x11" + _pack_double(number)  # number_value = 2, a double
    if value is None:
        return b"\x08\x00"  # null_value = 1
    if kind is dict:
        data = _struct_bytes(value, level + 1)
        return b"\x2a" + _length(len(data)) + data  # struct_value = 5
    if kind is list or kind is tuple:
        data = _list_bytes(value, level + 1)
        return b"\x32" + _length(len(data)) + data  # list_value = 6
    # Subclasses and other mappings, as Struct.update takes them.
    if isinstance(value, bool):
        return _value_bytes(bool(value), level)
    if isinstance(value, str):
        return _value_bytes(str(value), level)
    if isinstance(value, (int, float)):
        return _value_bytes(float(value), level)
    if isinstance(value, Mapping):
        return _value_bytes(dict(value), level)
    if isinstance(value, list):
        return _value_bytes(list(value), level)
    raise Unsendable(f"holds a {type(value).__name__}, which is not JSON")


def _list_bytes(items: list[Any] | tuple[Any, ...], level: int) -> bytes:
    """A ``ListValue`` (``values = 1``, repeated) at nesting ``level``."""
    if level > PROTOBUF_MAX_PAYLOAD_DEPTH:
        raise Unsendable(f"nests deeper than {PROTOBUF_MAX_PAYLOAD_DEPTH} levels")
    parts: list[bytes] = []
    for item in items:
        data = _value_bytes(item, level)
        parts += (b"\x0a", _length(len(data)), data)
    return b"".join(parts)


def _struct_bytes(payload: Mapping[str, Any], level: int = 1) -> bytes:
    """A ``Struct`` (``map<string, Value> fields = 1``: one entry message per key) at nesting ``level``."""
    if level > PROTOBUF_MAX_PAYLOAD_DEPTH:
        raise Unsendable(f"nests deeper than {PROTOBUF_MAX_PAYLOAD_DEPTH} levels")
    parts: list[bytes] = []
    keys = _key_fields
    for key, item in payload.items():
        name = keys.get(key) if type(key) is str else None
        if name is None:
            if not isinstance(key, str):
                raise Unsendable(f"has a non-string key {cut_path(repr(key))}")
            name = _remember(keys, key, _key_field(key))
        data = _value_bytes(item, level)
        entry = name + b"\x12" + _length(len(data)) + data
        parts += (b"\x0a", _length(len(entry)), entry)
    return b"".join(parts)


def _text_field(tag: bytes, text: str) -> bytes:
    data = text.encode("utf-8")
    return tag + _length(len(data)) + data


_FIELD_CACHE_SIZE: Final = 4096
_type_fields: dict[str, bytes] = {}
_epoch_fields: dict[str, bytes] = {}
_key_fields: dict[str, bytes] = {}
_metadata_fields: dict[tuple[str, str], bytes] = {}


def _remember(cache: dict[Any, bytes], key: Any, data: bytes) -> bytes:
    """``data``, remembered under ``key`` when short (at most :data:`_FIELD_CACHE_SIZE` entries; a full cache
    starts over): the few event types, epochs, payload keys and metadata entries a server sees are encoded once."""
    if len(data) <= 256:
        if len(cache) >= _FIELD_CACHE_SIZE:
            cache.clear()
        cache[key] = data
    return data


def _metadata_entry(key: str, value: str) -> bytes:
    name = key.encode("utf-8")
    text = value.encode("utf-8")
    entry = b"\x0a" + _length(len(name)) + name + b"\x12" + _length(len(text)) + text
    return b"\x32" + _length(len(entry)) + entry


def _key_field(key: str) -> bytes:
    name = key.encode("utf-8")
    return b"\x0a" + _length(len(name)) + name


_seconds_fields: dict[str, bytes] = {}


def _timestamp_bytes(text: str) -> bytes:
    """A ``Timestamp`` (``seconds = 1``, ``nanos = 2``) of an RFC 3339 string; its seconds field encoded once
    per second for Nexus's own timestamps."""
    if len(text) == 27:
        seconds_field = _seconds_fields.get(text[:19])
        fraction = text[20:26]
        if (
            seconds_field is not None
            and text[26] == "Z"
            and text[19] == "."
            and fraction.isascii()
            and fraction.isdigit()
        ):
            nanos = int(fraction) * 1000
            return seconds_field + b"\x10" + _varint(nanos) if nanos else seconds_field
    seconds, nanos = timestamp_parts(text)
    seconds_field = b"\x08" + _varint(seconds % _UINT64) if seconds else b""
    if len(text) == 27 and text[26] == "Z" and text[19] == "." and seconds_field:
        _remember(_seconds_fields, text[:19], seconds_field)
    return seconds_field + b"\x10" + _varint(nanos) if nanos else seconds_field


def encode_response(event: Event, *, message: str = "", success: bool = True, json_payload: bool = False) -> bytes:
    """The serialized ``EventResponse`` of ``event`` (what ``event_to_response(...).SerializeToString()`` gives,
    assembled directly), its payload a ``Struct`` or, with ``json_payload``, ``payload_json`` (the event's own
    compact JSON, not encoded again).

    Raises :class:`Unsendable` (an :class:`~nexus.errors.InvalidPayload`) for a payload no protobuf client could read,
    :class:`UnicodeEncodeError` for text that is not valid Unicode, ``ValueError`` for a timestamp that is not
    one, :class:`~nexus.errors.InvalidPayload` for a payload no JSON can hold.
    """
    parts: list[bytes] = [b"\x08\x01"] if success else []  # success = 1
    if message:
        parts.append(_text_field(b"\x12", message))  # message = 2
    event_type = event.event_type
    if event_type:  # event_type = 3
        field = _type_fields.get(event_type)
        parts.append(field or _remember(_type_fields, event_type, _text_field(b"\x1a", event_type)))
    if event.event_id:
        parts.append(_text_field(b"\x22", event.event_id))  # event_id = 4
    if json_payload:
        payload = b""
        data = event.payload_json()
    else:
        payload = _struct_bytes(event.payload) if event.payload else b""
        data = b""
    if payload:
        parts += (b"\x2a", _length(len(payload)), payload)  # payload = 5
    entries = _metadata_fields
    for item in event.metadata.items():  # metadata = 6: one entry message per key
        field = entries.get(item)
        if field is None:
            field = _remember(entries, item, _metadata_entry(*item))
        parts.append(field)
    if event.offset:
        parts += (b"\x38", _varint(event.offset))  # offset = 7
    epoch = event.epoch
    if epoch:  # epoch = 8
        field = _epoch_fields.get(epoch)
        parts.append(field or _remember(_epoch_fields, epoch, _text_field(b"\x42", epoch)))
    stamp = _timestamp_bytes(event.timestamp)
    parts += (b"\x4a", _length(len(stamp)), stamp)  # timestamp = 9, always set (empty when unknown)
    if data:
        parts += (b"\x52", _length(len(data)), data)  # payload_json = 10
    return b"".join(parts)


PROTOBUF_MAX_PAYLOAD_DEPTH: Final = 33
"""The deepest payload a protobuf client can still read in an ``EventResponse`` (its parsers stop at 100
message levels, and each JSON level costs three: Struct, map entry, Value)."""


class EncodeCache:
    """Serializes each delivered event once for every subscriber that receives it.

    The bus hands the same :class:`Event` object to every subscriber of a batch, so a recency cache keyed by
    the object's identity turns N serializations into one. Entries hold the event itself, so an id is never
    reused while its entry lives. Batches are assembled from the cached bytes: a repeated message field on the
    wire is just tag + length + bytes per element, so no per-subscriber message is built or serialized.

    An event that cannot be sent (text that is not valid Unicode, a payload nested deeper than clients can
    read: an old event in a NATS stream, say) encodes to None: subscribers skip it and keep their place. It is
    counted in :attr:`skipped` and logged once (rate-limited), whatever the number of subscribers.
    """

    def __init__(self, size: int = 16_384, *, warnings: LogLimiter | None = None, json_payload: bool = False) -> None:
        self.json_payload = json_payload
        """Payloads go as ``payload_json`` (``PAYLOAD_ENCODING_JSON``) rather than as a ``Struct``."""
        self._size = size
        self._entries: OrderedDict[int, tuple[Event, bytes | None]] = OrderedDict()
        self._warnings = warnings or LogLimiter()
        self.skipped = 0
        """Events that could not be encoded for subscribers."""

    def encode(self, event: Event) -> bytes | None:
        """The serialized ``EventResponse`` of ``event``, or None when it cannot be sent."""
        key = id(event)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is event:
            return entry[1]
        data = self._serialize(event)
        self._entries[key] = (event, data)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return data

    def _serialize(self, event: Event) -> bytes | None:
        try:
            return encode_response(event, json_payload=self.json_payload)
        except Unsendable as exc:
            problem = f"the payload {exc.message}: clients could not read it"
        except Exception as exc:  # UnicodeEncodeError, RecursionError, ValueError (a bad timestamp), ...
            problem = f"{type(exc).__name__}: {shorten(str(exc))}"
        self.skipped += 1
        self._warnings.warning(
            log,
            "grpc_event_skipped",
            offset=event.offset,
            event_type=shorten(event.event_type),
            event_id=shorten(event.event_id),
            error=problem,
        )
        return None

    def encode_batch(self, events: list[Event]) -> bytes:
        """The serialized ``SubscribeEventBatchesResponse`` carrying ``events`` (those that can be sent)."""
        parts: list[bytes] = []
        for event in events:
            data = self.encode(event)
            if data is None:
                continue
            parts += (_EVENTS_FIELD_TAG, _length(len(data)), data)
        return b"".join(parts)

    def encode_request_event(self, event: Event) -> bytes | None:
        """The serialized ``RequestEventResponse`` carrying ``event``, or None when it cannot be sent."""
        data = self.encode(event)
        if data is None:
            return None
        return _EVENT_FIELD_TAG + _length(len(data)) + data


def request_event_response(response: bytes) -> bytes:
    """The serialized ``RequestEventResponse`` carrying a serialized ``EventResponse``."""
    return _EVENT_FIELD_TAG + _length(len(response)) + response


def passthrough_serializer(serializer: Any) -> Any:
    """Wrap a response serializer so that already-serialized ``bytes`` are sent as they are."""

    def serialize(message: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        data: bytes = serializer(message)
        return data

    return serialize


@dataclasses.dataclass(frozen=True, slots=True)
class Undecodable:
    """What a guarded request deserializer returns for bytes that are not a valid message of its type.

    grpcio answers an exception raised while deserializing with ``UNKNOWN`` and logs its traceback at error
    level; the handler wrappers of :func:`guard_handler` answer this marker with ``INVALID_ARGUMENT`` instead.
    """

    message_type: str
    reason: str

    @property
    def message(self) -> str:
        return (
            f"the request is not a valid {self.message_type} message ({self.reason}): malformed protobuf, "
            "a string that is not UTF-8, or fields nested deeper than protobuf's limit of 100 levels"
        )


def guarded_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wrap a request deserializer so that bytes it cannot decode become an :class:`Undecodable`."""
    if deserializer is None:
        return None
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    message_type = str(getattr(descriptor, "full_name", "") or "request")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, and whatever else a parser may raise on hostile bytes
            return Undecodable(message_type, type(exc).__name__)

    return deserialize
