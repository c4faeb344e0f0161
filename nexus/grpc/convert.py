"""Conversions between protobuf messages and :class:`~nexus.events.Event`, and the error-code table."""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import grpc
import structlog
from google.protobuf import struct_pb2, timestamp_pb2

from nexus.errors import ErrorCode, InvalidPayload
from nexus.events import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_PAYLOAD_DEPTH,
    Event,
    EventLimits,
    JSONObject,
    cut_path,
    json_shape_problem,
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
    return _from_struct(struct, "", 1, max_depth)


def timestamp_to_proto(text: str) -> timestamp_pb2.Timestamp:
    """An RFC 3339 string as a ``Timestamp`` (``datetime.fromisoformat`` is far faster than FromJsonString)."""
    if not text:
        return timestamp_pb2.Timestamp()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromJsonString(text)
        return stamp
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    seconds = delta.days * 86_400 + delta.seconds
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=delta.microseconds * 1000)


def timestamp_from_proto(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    text: str = stamp.ToJsonString()
    return text


def event_from_request(request: nexus_pb2.EventRequest, *, limits: EventLimits = DEFAULT_LIMITS) -> Event:
    """A validated :class:`Event` from an ``EventRequest``; raises a ``NexusError`` for bad input."""
    if len(request.metadata) > limits.max_metadata_entries:
        raise InvalidPayload(
            f"metadata has {len(request.metadata)} entries, over the limit of {limits.max_metadata_entries}"
        )
    payload: Any = struct_to_payload(request.payload, limits.max_payload_depth) if request.HasField("payload") else {}
    return Event.create(
        request.event_type,
        payload,
        event_id=request.event_id or None,
        metadata=dict(request.metadata),
        limits=limits,
    )


def event_to_request(event: Event) -> nexus_pb2.EventRequest:
    """An ``EventRequest`` carrying ``event`` (client side)."""
    return nexus_pb2.EventRequest(
        event_type=event.event_type,
        event_id=event.event_id,
        payload=payload_to_struct(event.payload),
        metadata=event.metadata,
    )


def event_to_response(event: Event, *, message: str = "", success: bool = True) -> nexus_pb2.EventResponse:
    """An ``EventResponse`` for ``event``."""
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
    if event.payload:
        response.payload.update(event.payload)  # in place: no copy of a separately built Struct
    return response


def event_from_response(response: nexus_pb2.EventResponse) -> Event:
    """An :class:`Event` from an ``EventResponse`` (client side)."""
    return Event(
        event_type=response.event_type,
        payload=struct_to_payload(response.payload, max_depth=_ANY_DEPTH),  # the server checked it
        event_id=response.event_id,
        metadata=dict(response.metadata),
        timestamp=timestamp_from_proto(response.timestamp),
        offset=response.offset,
        epoch=response.epoch,
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_EVENTS_FIELD_TAG: Final = b"\x0a"  # SubscribeEventBatchesResponse.events: field 1, length-delimited
_EVENT_FIELD_TAG: Final = b"\x0a"  # RequestEventResponse.event: field 1, length-delimited


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

    def __init__(self, size: int = 16_384, *, warnings: LogLimiter | None = None) -> None:
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
        shape = json_shape_problem(event.payload, PROTOBUF_MAX_PAYLOAD_DEPTH)
        if shape is not None:
            problem = f"the payload {shape}: clients could not read it"
        else:
            try:
                data: bytes = event_to_response(event).SerializeToString()
                return data
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
            parts.append(_EVENTS_FIELD_TAG)
            parts.append(_varint(len(data)))
            parts.append(data)
        return b"".join(parts)

    def encode_request_event(self, event: Event) -> bytes | None:
        """The serialized ``RequestEventResponse`` carrying ``event``, or None when it cannot be sent."""
        data = self.encode(event)
        if data is None:
            return None
        return _EVENT_FIELD_TAG + _varint(len(data)) + data


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
