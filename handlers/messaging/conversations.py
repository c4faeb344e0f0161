"""Conversation state of the messaging plugin: messages, ``since`` cursors, typing indicators and presence.

Pure: no I/O, no asyncio; every clock reading is passed in.

- :class:`Message` and :func:`new_message_id`: ids are ULIDs (26 characters of Crockford base32: 48 bits of
  milliseconds then 80 random bits), unique across nodes and sortable by the time they were made.
- :func:`parse_since`: a stream's ``since`` is a message id (the history starts after that message) or a time
  (RFC 3339 text or epoch seconds; the history starts with the messages sent at or after it).
- :class:`TypingBoard`: who is typing in which conversation. An indicator expires by itself ``ttl_s`` after
  it was last set (on the monotonic clock the caller passes), so a client that vanishes mid-sentence does not
  type forever.
- :func:`actor`, :class:`Requester`, :func:`check_access`, :func:`participants_after`: who acts and what they
  may do. The first message's sender and the users it names are a conversation's participants; later messages
  from participants add the users they name; with authentication on only participants (and admins) use it.
- :class:`PresenceBoard`: who is present where, from the lifecycle of their streams: a user joins a
  conversation when the first of their streams in it starts and leaves when the last one ends (a dropped
  connection ends a stream with ``cancelled``).

Memory per key: a conversation with someone typing costs about 300 B plus about 150 B per typing user, and is
dropped as soon as nobody types in it (at most ``max_conversations``, least recently changed evicted first).
Presence costs about 300 B per live stream (its request id, conversation and user), plus about 200 B per
conversation with someone present; streams are bounded by ``max_streams`` (the oldest forgotten first, which
reports its user as left) and requests seen but not yet started by ``max_pending``.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from nexus import ErrorCode, InvalidPayload, NexusError, parse_time

CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MESSAGE_ID_RE: Final = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}\Z")


class InvalidRequest(ValueError):
    """A request field that cannot be used; the message names it."""


def rfc3339(seconds: float) -> str:
    """Epoch seconds as RFC 3339 UTC text with microseconds, ending in ``Z``."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def new_message_id(now_s: float, entropy: bytes) -> str:
    """A ULID for a message made at ``now_s`` (epoch seconds) from 10 bytes of ``entropy``."""
    if len(entropy) != 10:
        raise ValueError("a message id needs 10 bytes of entropy")
    millis = max(0, int(now_s * 1000)) & ((1 << 48) - 1)
    number = (millis << 80) | int.from_bytes(entropy, "big")
    chars = []
    for _ in range(26):
        chars.append(CROCKFORD[number & 31])
        number >>= 5
    return "".join(reversed(chars))


def is_message_id(text: str) -> bool:
    """Whether ``text`` has the shape of a message id."""
    return bool(MESSAGE_ID_RE.match(text))


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One message, as stored and as published."""

    message_id: str
    conversation_id: str
    sender: str
    text: str
    sent_at: str
    """RFC 3339 UTC."""
    sent_ts: float
    """``sent_at`` as epoch seconds."""

    def to_payload(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "conversation_id": self.conversation_id,
            "sender": self.sender,
            "text": self.text,
            "sent_at": self.sent_at,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Message:
        """Read a ``send_message`` success payload (from any node); raises :class:`InvalidRequest`."""
        fields = {}
        for name in ("message_id", "conversation_id", "sender", "text", "sent_at"):
            value = payload.get(name)
            if not isinstance(value, str):
                raise InvalidRequest(f"{name} must be a string")
            fields[name] = value
        if not is_message_id(fields["message_id"]):
            raise InvalidRequest(f"message_id {fields['message_id']!r} is not a message id")
        try:
            sent_ts = parse_time(fields["sent_at"])
        except InvalidPayload as exc:
            raise InvalidRequest(f"sent_at: {exc.message}") from None
        return cls(sent_ts=sent_ts, **fields)


@dataclasses.dataclass(frozen=True, slots=True)
class AfterMessage:
    """History after one message (exclusive)."""

    message_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class SinceTime:
    """History of the messages sent at or after a time (epoch seconds)."""

    seconds: float


Cursor = AfterMessage | SinceTime | None


def parse_since(value: Any) -> Cursor:
    """A stream's ``since``: absent, a message id, or a time (RFC 3339 text or epoch seconds).

    Raises :class:`InvalidRequest` naming the field.
    """
    if value is None:
        return None
    if isinstance(value, str) and is_message_id(value):
        return AfterMessage(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidRequest(f"since must be a message id, RFC 3339 text or epoch seconds, not {value!r}")
    try:
        seconds = parse_time(value)
    except InvalidPayload:
        raise InvalidRequest(
            f"since {value!r} is neither a message id nor a time (RFC 3339 text or epoch seconds)"
        ) from None
    return SinceTime(seconds)


def verified(metadata: Mapping[str, str]) -> bool:
    """Whether the request's ``metadata.user_id`` was set by the server (authentication on, or the server's own
    code): a client's unverified claim is marked ``metadata.auth = "none"``."""
    return metadata.get("auth") != "none"


def actor(metadata: Mapping[str, str], payload: Mapping[str, Any], anonymous: str) -> str:
    """Who acts: ``metadata.user_id``; when it is unverified (``metadata.auth == "none"``) and absent, the
    payload's ``user_id`` claim; else ``anonymous``. With authentication on the payload is never read."""
    user = metadata.get("user_id")
    if isinstance(user, str) and user:
        return user
    claimed = payload.get("user_id")
    if not verified(metadata) and isinstance(claimed, str) and claimed:
        return claimed
    return anonymous


# --- who may do what ---------------------------------------------------------------------------------------------


class PermissionDenied(NexusError):
    """The requester takes no part in the conversation (the request ends ``failed``, its message saying so)."""

    code = ErrorCode.PERMISSION_DENIED


@dataclasses.dataclass(frozen=True, slots=True)
class Requester:
    """Who sent a request, and how far it is trusted."""

    user_id: str
    verified: bool
    """The user id comes from the server (a token); unverified requesters are not checked at all."""
    admin: bool
    """Reads and writes every conversation."""

    @classmethod
    def of(
        cls, metadata: Mapping[str, str], payload: Mapping[str, Any], anonymous: str, admins: frozenset[str]
    ) -> Requester:
        user_id = actor(metadata, payload, anonymous)
        trusted = verified(metadata)
        # metadata.admin is the server's mark of an admin token (never a client's: the node drops client values).
        return cls(user_id, trusted, trusted and (user_id in admins or metadata.get("admin") == "true"))


def check_access(requester: Requester, conversation_id: str, participants: frozenset[str]) -> None:
    """Let a participant (or an admin, or anyone unverified while authentication is off) use the conversation;
    raise :class:`PermissionDenied` for anyone else."""
    if not requester.verified or requester.admin or requester.user_id in participants:
        return
    if not participants:
        raise PermissionDenied(
            f"conversation {conversation_id!r} has no messages yet: its first message (send_message) creates it"
        )
    raise PermissionDenied(f"{requester.user_id!r} is not a participant of conversation {conversation_id!r}")


def participants_after(
    requester: Requester, conversation_id: str, participants: frozenset[str], named: Iterable[str]
) -> frozenset[str]:
    """The conversation's participants once ``requester`` sent a message naming ``named``: the first message
    makes its sender and the users it names the participants; a later one, from a participant, adds those it
    names. Raises :class:`PermissionDenied` for a verified sender who is not a participant (nor an admin)."""
    if participants:
        check_access(requester, conversation_id, participants)
    return participants | {requester.user_id, *named}


# --- typing indicators ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TypingChange:
    """Someone started or stopped typing in a conversation (``reason``: ``typing``, ``stopped``, ``expired``)."""

    conversation_id: str
    user_id: str
    typing: bool
    reason: str
    users: tuple[str, ...]
    """Who types in the conversation after the change, sorted."""


class TypingBoard:
    """Typing indicators per conversation, each expiring ``ttl_s`` after it was last set."""

    def __init__(self, *, max_conversations: int = 10_000, max_typers: int = 100) -> None:
        self.max_conversations = max_conversations
        self.max_typers = max_typers
        self._rooms: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._deadlines: list[tuple[float, str, str]] = []  # (expires_at, conversation, user), lazily pruned

    def typing(self, conversation_id: str) -> tuple[str, ...]:
        """Who types in the conversation now (as of the last :meth:`expire`), sorted."""
        return tuple(sorted(self._rooms.get(conversation_id, {})))

    def set(self, conversation_id: str, user_id: str, typing: bool, ttl_s: float, now: float) -> TypingChange | None:
        """Record an indicator; returns the change, or None when it only refreshed one already shown."""
        room = self._rooms.get(conversation_id)
        if not typing:
            if room is None or user_id not in room:
                return None
            del room[user_id]
            if not room:
                del self._rooms[conversation_id]
            return TypingChange(conversation_id, user_id, False, "stopped", self.typing(conversation_id))
        if room is None:
            room = self._rooms[conversation_id] = {}
            while len(self._rooms) > self.max_conversations:
                self._rooms.popitem(last=False)
        self._rooms.move_to_end(conversation_id)
        already = user_id in room
        expires = now + ttl_s
        room[user_id] = expires
        heapq.heappush(self._deadlines, (expires, conversation_id, user_id))
        if not already and len(room) > self.max_typers:
            oldest = min(room, key=lambda user: room[user])
            del room[oldest]
        if already:
            return None
        return TypingChange(conversation_id, user_id, True, "typing", self.typing(conversation_id))

    def expire(self, now: float) -> list[TypingChange]:
        """Remove the indicators whose time has come; returns one ``expired`` change for each."""
        changes = []
        while self._deadlines and self._deadlines[0][0] <= now:
            expires, conversation_id, user_id = heapq.heappop(self._deadlines)
            room = self._rooms.get(conversation_id)
            if room is None or room.get(user_id) != expires:
                continue  # refreshed, stopped or evicted since
            del room[user_id]
            if not room:
                del self._rooms[conversation_id]
            changes.append(TypingChange(conversation_id, user_id, False, "expired", self.typing(conversation_id)))
        return changes

    def next_expiry(self) -> float | None:
        """When :meth:`expire` next has something to do (maybe earlier: stale deadlines are pruned lazily)."""
        return self._deadlines[0][0] if self._deadlines else None

    def __len__(self) -> int:
        return len(self._rooms)


# --- presence ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PresenceChange:
    """A user joined or left a conversation (``status``: ``joined`` or ``left``)."""

    conversation_id: str
    user_id: str
    status: str
    present: tuple[str, ...]
    """Who is present after the change, sorted."""


class PresenceBoard:
    """Who is present in which conversation, counted from the streams users run in it."""

    def __init__(self, *, max_streams: int = 100_000, max_pending: int = 10_000) -> None:
        self.max_streams = max_streams
        self.max_pending = max_pending
        self._pending: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._streams: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._rooms: dict[str, dict[str, int]] = {}

    def present(self, conversation_id: str) -> tuple[str, ...]:
        """Who is present in the conversation, sorted."""
        return tuple(sorted(self._rooms.get(conversation_id, {})))

    def requested(self, request_id: str, conversation_id: str, user_id: str) -> None:
        """A stream was asked for; it counts once it starts."""
        if request_id in self._streams:
            return
        self._pending[request_id] = (conversation_id, user_id)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)

    def started(self, request_id: str) -> list[PresenceChange]:
        """A requested stream started; returns ``joined`` when it is its user's first in the conversation."""
        entry = self._pending.pop(request_id, None)
        if entry is None or request_id in self._streams:
            return []
        changes: list[PresenceChange] = []
        self._streams[request_id] = entry
        while len(self._streams) > self.max_streams:
            oldest, _ = next(iter(self._streams.items()))
            changes += self.ended(oldest)
        conversation_id, user_id = entry
        room = self._rooms.setdefault(conversation_id, {})
        room[user_id] = room.get(user_id, 0) + 1
        if room[user_id] == 1:
            changes.append(PresenceChange(conversation_id, user_id, "joined", self.present(conversation_id)))
        return changes

    def ended(self, request_id: str) -> list[PresenceChange]:
        """A stream ended (any terminal state); returns ``left`` when it was its user's last in the conversation."""
        self._pending.pop(request_id, None)
        entry = self._streams.pop(request_id, None)
        if entry is None:
            return []
        conversation_id, user_id = entry
        room = self._rooms[conversation_id]
        room[user_id] -= 1
        if room[user_id] > 0:
            return []
        del room[user_id]
        if not room:
            del self._rooms[conversation_id]
        return [PresenceChange(conversation_id, user_id, "left", self.present(conversation_id))]

    @property
    def streams(self) -> int:
        return len(self._streams)

    @property
    def pending(self) -> int:
        return len(self._pending)
