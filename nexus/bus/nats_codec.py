"""How Nexus events sit in NATS: subjects, message bodies, ids and names. Pure: no I/O, no nats-py.

An event type's four tokens become a subject under a prefix: ``demo:stream_x:v1:started`` is stored on
``nexus.demo.stream_x.v1.started``, so NATS tools and wildcards see the same structure (``nexus.demo.>``,
``nexus.*.*.*.requested``). A pattern maps the same way (``demo:*:v1:*`` → ``nexus.demo.*.v1.*``).

The message body is a compact JSON envelope ``{"v": 1, "id", "ts", "payload", "metadata"}``; the type is the
subject and the offset the stream sequence, so neither is repeated. A message another tool published on a
Nexus subject with a plain JSON object body is read as an event whose payload is that object.

``Nats-Msg-Id`` carries the deduplication key: ``e:<event_id>`` for an event, ``t:<correlation_id>`` for the
terminal event of a request, so at most one terminal event per request is stored inside the duplicate window
however many nodes try (the driving node, or every survivor that saw it die).
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import UTC, datetime
from typing import Final

from nexus.errors import InvalidPattern, InvalidPayload, NexusError
from nexus.events import (
    DEFAULT_LIMITS,
    Event,
    EventLimits,
    EventType,
    JSONObject,
    check_event,
    format_timestamp,
)
from nexus.patterns import parse_pattern

DEFAULT_STREAM: Final = "NEXUS"
DEFAULT_SUBJECT_PREFIX: Final = "nexus"
ENVELOPE_VERSION: Final = 1
MSG_ID_HEADER: Final = "Nats-Msg-Id"
EXPECTED_STREAM_HEADER: Final = "Nats-Expected-Stream"
"""Sent with every event: JetStream refuses it unless the stream storing the subject is the node's."""
EVENT_ID_PREFIX: Final = "e:"
TERMINAL_ID_PREFIX: Final = "t:"
ENVELOPE_RESERVE: Final = 32 * 1024
"""Bytes a NATS message needs beyond the payload limit: the event's id, timestamp, headers and metadata."""

_STREAM_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_PREFIX_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]+\Z")
_TYPE_CACHE_LIMIT: Final = 10_000


def check_stream_name(name: str) -> str | None:
    """Why ``name`` cannot name a JetStream stream, or None."""
    if not _STREAM_NAME_RE.match(name):
        return f"a stream name is 1 to 64 of A-Z, a-z, 0-9, '_' and '-', got {name!r}"
    return None


def check_subject_prefix(prefix: str) -> str | None:
    """Why ``prefix`` cannot prefix Nexus subjects (dot-separated tokens, no wildcards), or None."""
    tokens = prefix.split(".")
    if not prefix or any(not _PREFIX_TOKEN_RE.match(token) for token in tokens):
        return f"a subject prefix is one or more '.'-separated tokens of A-Z, a-z, 0-9, '_' and '-', got {prefix!r}"
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class Subjects:
    """The subjects of one Nexus installation on NATS, derived from its prefix.

    ``events`` (``<prefix>.>``) is what the stream stores. Heartbeats go to ``<prefix>_live.…`` and control
    messages to ``<prefix>_ctl.…``: plain NATS subjects outside the stream, so they are never stored.
    """

    prefix: str = DEFAULT_SUBJECT_PREFIX

    @property
    def events(self) -> str:
        return f"{self.prefix}.>"

    @property
    def requests(self) -> str:
        """Every ``requested`` event."""
        return f"{self.prefix}.*.*.*.requested"

    @property
    def live(self) -> str:
        return f"{self.prefix}_live.>"

    @property
    def control(self) -> str:
        return f"{self.prefix}_ctl"

    @property
    def presence(self) -> str:
        return f"{self.prefix}_ctl.presence"

    @property
    def claims(self) -> str:
        return f"{self.prefix}_ctl.claims"

    @property
    def messages(self) -> str:
        """Control messages between providers (cancels)."""
        return f"{self.prefix}_ctl.msg"

    def for_type(self, event_type: str) -> str:
        """The stream subject of an event type."""
        return f"{self.prefix}.{event_type.replace(':', '.')}"

    def live_for_type(self, event_type: str) -> str:
        """The live-only subject of an event type (heartbeats)."""
        return f"{self.prefix}_live.{event_type.replace(':', '.')}"

    def requests_for(self, service_action: str) -> str:
        """Every ``requested`` event of ``service:action``, whatever its version."""
        service, action = service_action.split(":")
        return f"{self.prefix}.{service}.{action}.*.requested"

    def for_pattern(self, pattern: str) -> str:
        """The subject filter selecting what ``pattern`` matches (validated first)."""
        parse_pattern(pattern)
        return f"{self.prefix}.{pattern.replace(':', '.')}"


class SubjectTypes:
    """Turns stream or live subjects back into event types, validating each distinct subject once."""

    def __init__(self, subjects: Subjects) -> None:
        self._stream_prefix = subjects.prefix + "."
        self._live_prefix = subjects.prefix + "_live."
        self._cache: dict[str, str | None] = {}

    def event_type(self, subject: str) -> str | None:
        """The event type of a stream or live subject, or None when the subject is not a valid one."""
        found = self._cache.get(subject, "")
        if found != "":
            return found
        result: str | None = None
        for prefix in (self._stream_prefix, self._live_prefix):
            if subject.startswith(prefix):
                candidate = subject[len(prefix) :].replace(".", ":")
                try:
                    EventType.parse(candidate)
                except Exception:
                    break
                result = candidate
                break
        if len(self._cache) >= _TYPE_CACHE_LIMIT:
            self._cache.clear()
        self._cache[subject] = result
        return result


def event_msg_id(event_id: str) -> str:
    """The ``Nats-Msg-Id`` that deduplicates a client's event id."""
    return EVENT_ID_PREFIX + event_id


def terminal_msg_id(correlation_id: str) -> str:
    """The ``Nats-Msg-Id`` that lets one terminal event per request be stored."""
    return TERMINAL_ID_PREFIX + correlation_id


_encode: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def encode_event(event: Event) -> bytes:
    """The message body of ``event``: ``{"v":1,"id":…,"ts":…,"payload":…,"metadata":…}``, compact UTF-8 JSON.

    The payload's part is :meth:`Event.payload_json` (encoded once per event; what subscribers' encoders reuse).
    """
    head = f'{{"v":{ENVELOPE_VERSION},"id":{_encode(event.event_id)},"ts":{_encode(event.timestamp)},"payload":'
    tail = f',"metadata":{_encode(event.metadata)}}}'
    return b"".join((head.encode(), event.payload_json(), tail.encode()))


def decode_event(
    event_type: str,
    data: bytes,
    *,
    offset: int,
    epoch: str,
    msg_id: str | None = None,
    stored_at: datetime | None = None,
) -> Event | None:
    """The event in a message body, or None when it is not a valid event (see :func:`read_event`)."""
    try:
        return read_event(event_type, data, offset=offset, epoch=epoch, msg_id=msg_id, stored_at=stored_at)
    except NexusError:
        return None


def read_event(
    event_type: str,
    data: bytes,
    *,
    offset: int,
    epoch: str,
    msg_id: str | None = None,
    stored_at: datetime | None = None,
    limits: EventLimits = DEFAULT_LIMITS,
) -> Event:
    """The event in a message body, validated as every event entering Nexus is (:func:`~nexus.events.check_event`
    with ``limits``); raises :class:`~nexus.errors.InvalidPayload` (or another ``NexusError``) saying why not.

    Anything may write on a Nexus subject, so nothing is trusted: the body must be UTF-8 JSON holding an object.
    A body without the envelope (published by another tool) becomes the payload; its id is the message's
    ``Nats-Msg-Id`` (without Nexus's ``e:`` prefix) or ``nats-<offset>``, its time the time NATS stored it.
    """
    text, body = _read_body(data)
    if body.get("v") == ENVELOPE_VERSION and isinstance(body.get("payload"), dict):
        event_id = body.get("id") or f"nats-{offset}"
        timestamp = body.get("ts") or _timestamp(stored_at)
        metadata = body.get("metadata")
        if not isinstance(event_id, str) or not isinstance(timestamp, str):
            raise InvalidPayload("the envelope's id and ts must be strings")
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidPayload("the envelope's metadata must be an object of strings")
        event = Event(
            event_type=event_type,
            payload=body["payload"],
            event_id=event_id,
            metadata=metadata or {},
            timestamp=timestamp,
            offset=offset,
            epoch=epoch,
        )
    else:
        event = Event(
            event_type=event_type,
            payload=body,
            event_id=msg_id.removeprefix(EVENT_ID_PREFIX) if msg_id else f"nats-{offset}",
            metadata={},
            timestamp=_timestamp(stored_at),
            offset=offset,
            epoch=epoch,
        )
    size_at_most = None
    if "\\u" not in text:  # strict UTF-8 and no escape: every string is valid Unicode
        # The event's compact JSON repeats the body's strings and numbers; a number may grow in the re-encoding
        # (``1e15`` is ``1000000000000000.0``), never by more than five times.
        size_at_most = 5 * len(data) + len(event.event_type) + len(event.event_id) + 64
    return check_event(event, limits, size_at_most=size_at_most)


def _read_body(data: bytes) -> tuple[str, JSONObject]:
    """The text of a message body and the JSON object it holds, or :class:`~nexus.errors.InvalidPayload`."""
    if not data:
        return "", {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPayload("the message body is not UTF-8 text") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidPayload(f"the message body is not JSON: {exc.msg} at character {exc.pos}") from None
    except ValueError:  # an integer over Python's digit limit
        raise InvalidPayload("the message body holds a number with too many digits") from None
    except RecursionError:
        raise InvalidPayload("the message body nests too deeply") from None
    if not isinstance(body, dict):
        raise InvalidPayload(f"the message body is JSON but not an object ({type(body).__name__})")
    return text, body


def _timestamp(moment: datetime | None) -> str:
    return format_timestamp(moment or datetime.now(UTC))


@dataclasses.dataclass(frozen=True, slots=True)
class AckInfo:
    """What a JetStream message's reply subject says about it."""

    stream: str
    consumer: str
    delivered: int
    stream_seq: int
    consumer_seq: int
    timestamp_ns: int
    pending: int


def parse_ack_reply(reply: str) -> AckInfo | None:
    """Read ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>`` (and the longer form with a
    domain and account), or None when ``reply`` is not a JetStream ack subject."""
    tokens = reply.split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        return None
    base = 2 if len(tokens) == 9 else 4
    try:
        return AckInfo(
            stream=tokens[base],
            consumer=tokens[base + 1],
            delivered=int(tokens[base + 2]),
            stream_seq=int(tokens[base + 3]),
            consumer_seq=int(tokens[base + 4]),
            timestamp_ns=int(tokens[base + 5]),
            pending=int(tokens[base + 6]),
        )
    except (IndexError, ValueError):
        return None


def ack_sequences(reply: str) -> tuple[int, int] | None:
    """The stream and consumer sequences in a JetStream ack subject (see :func:`parse_ack_reply`), or None: what
    the tail reads of every message, without the rest."""
    tokens = reply.split(".")
    count = len(tokens)
    if count < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        return None
    base = 2 if count == 9 else 4
    try:
        return int(tokens[base + 3]), int(tokens[base + 4])
    except (IndexError, ValueError):
        return None


def stream_epoch(stream: str, created: datetime) -> str:
    """The epoch of a stream instance: its name and creation time, so a re-created stream has a new one."""
    return f"{stream}@{created.astimezone(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}"


def request_consumer_name(stream: str, service_action: str | None) -> str:
    """The durable consumer shared by the nodes for one handler's requests (None: every request)."""
    if service_action is None:
        return f"{stream}_requests"
    service, action = service_action.split(":")
    return f"{stream}_req_{service}_{action}"


def filter_for_patterns(subjects: Subjects, patterns: list[str], following: bool) -> str:
    """The narrowest single subject filter covering ``patterns`` (a replay reads only that), else everything."""
    if len(patterns) == 1 and not following:
        try:
            return subjects.for_pattern(patterns[0])
        except InvalidPattern:
            pass
    return subjects.events


def control_body(message: JSONObject) -> bytes:
    """A control message as JSON bytes."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def read_control(data: bytes) -> JSONObject | None:
    """A control message from JSON bytes, or None when it is not a JSON object."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
