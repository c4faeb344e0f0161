"""The event grammar and the ``Event`` value. Pure: no I/O, no asyncio.

An event type is ``<service>:<action>:v<N>:<state>``: ``service``, ``action`` and ``state`` are lowercase
``[a-z][a-z0-9_]*`` and the version is ``v`` plus a positive integer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from nexus.errors import InvalidEventType, InvalidPayload, PayloadTooLarge

NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]*\Z")
VERSION_RE: Final = re.compile(r"v[1-9][0-9]*\Z")
MAX_TOKEN_LENGTH: Final = 128
DEFAULT_MAX_PAYLOAD_BYTES: Final = 1_000_000
"""One payload limit for every bus: a default NATS server carries messages up to 1 MiB, which must also hold the
event's id, timestamp and metadata (``nexus.bus.nats`` checks the server's limit at start-up)."""

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


def check_name_token(value: str, what: str) -> str | None:
    """Return why ``value`` is not a valid ``what`` token (service, action or state), or None."""
    if not value:
        return f"{what} is empty"
    if len(value) > MAX_TOKEN_LENGTH:
        return f"{what} is longer than {MAX_TOKEN_LENGTH} characters"
    if not NAME_RE.match(value):
        return f"{what} {value!r} must match [a-z][a-z0-9_]*"
    return None


def check_version_token(value: str) -> str | None:
    """Return why ``value`` is not a valid version token (``v1``, ``v2``, ...), or None."""
    if not VERSION_RE.match(value):
        return f"version {value!r} must be 'v' followed by a positive integer, like 'v1'"
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
        """Parse ``text`` or raise :class:`InvalidEventType` naming the bad token."""
        if not isinstance(text, str):
            raise InvalidEventType(f"event type must be a string, not {type(text).__name__}")
        tokens = text.split(":")
        if len(tokens) != 4:
            raise InvalidEventType(
                f"invalid event type {text!r}: expected 4 ':'-separated tokens "
                f"<service>:<action>:v<N>:<state>, got {len(tokens)}"
            )
        for index, token in enumerate(tokens):
            problem = check_token(index, token)
            if problem is not None:
                raise InvalidEventType(f"invalid event type {text!r}: {problem}")
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


def validate_event_type(text: str) -> str:
    """Return ``text`` if it is a valid event type, else raise :class:`InvalidEventType`."""
    EventType.parse(text)
    return text


def _check_json(value: Any, path: str) -> None:
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if abs(value) >= _MAX_DOUBLE_INT:
            raise InvalidPayload(f"payload{path} is an integer too large for a JSON number (a double)")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidPayload(f"payload{path} is {value!r}: NaN and Infinity are not valid JSON")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidPayload(f"payload{path} has a non-string key {key!r}")
            _check_json(item, f"{path}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]")
        return
    raise InvalidPayload(f"payload{path} holds a {type(value).__name__}, which is not JSON")


def validate_payload(payload: Any, *, max_bytes: int | None = None) -> JSONObject:
    """Return ``payload`` as a JSON object, or raise :class:`InvalidPayload` naming the problem.

    ``None`` stands for the empty object. With ``max_bytes``, a payload whose compact JSON encoding is
    larger raises :class:`PayloadTooLarge`.
    """
    if payload is None:
        return {}
    if not isinstance(payload, Mapping):
        raise InvalidPayload(f"payload must be a JSON object, not {type(payload).__name__}")
    _check_json(payload, "")
    result = dict(payload)
    if max_bytes is not None:
        size = len(json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode())
        if size > max_bytes:
            raise PayloadTooLarge(f"payload is {size} bytes, over the limit of {max_bytes} bytes")
    return result


def validate_metadata(metadata: Any) -> dict[str, str]:
    """Return ``metadata`` as a string map, or raise :class:`InvalidPayload`."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidPayload(f"metadata must be an object of strings, not {type(metadata).__name__}")
    result: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidPayload(f"metadata entry {key!r} must map a string to a string")
        result[key] = value
    return result


def new_event_id() -> str:
    """A fresh, unique event id."""
    return uuid.uuid4().hex


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` suffix and microseconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_timestamp() -> str:
    """The current time, RFC 3339 UTC."""
    return format_timestamp(datetime.now(UTC))


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


@dataclasses.dataclass(slots=True)
class Event:
    """One event (contract): what handlers receive and clients see.

    ``offset`` and ``epoch`` are set once the bus stores the event; ``offset`` is 0 for an event that is not
    stored (a heartbeat) or not stored yet.
    """

    event_type: str
    payload: JSONObject = dataclasses.field(default_factory=dict)
    event_id: str = dataclasses.field(default_factory=new_event_id)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    timestamp: str = dataclasses.field(default_factory=now_timestamp)
    offset: int = 0
    epoch: str = ""

    @property
    def type(self) -> EventType:
        """The parsed event type."""
        return EventType.parse(self.event_type)

    @property
    def state(self) -> str:
        """The last token of the event type."""
        return self.event_type.rsplit(":", 1)[-1]

    @property
    def correlation_id(self) -> str:
        """``metadata['correlation_id']``, or empty."""
        return self.metadata.get("correlation_id", "")

    def stored(self, offset: int, epoch: str) -> Event:
        """A copy carrying the offset and epoch the bus gave it."""
        return dataclasses.replace(self, offset=offset, epoch=epoch)

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
    ) -> Event:
        """Build a validated event; raises :class:`InvalidEventType` or :class:`InvalidPayload`."""
        validate_event_type(event_type)
        if event_id is not None and not isinstance(event_id, str):
            raise InvalidPayload("event_id must be a string")
        if event_id is not None and len(event_id) > 256:
            raise InvalidPayload("event_id is longer than 256 characters")
        return cls(
            event_type=event_type,
            payload=validate_payload(payload, max_bytes=max_payload_bytes),
            event_id=event_id or new_event_id(),
            metadata=validate_metadata(metadata),
        )
