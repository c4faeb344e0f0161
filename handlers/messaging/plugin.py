"""The messaging plugin's handlers: messages, typing indicators and presence per conversation.

Entry points (``[project.entry-points."nexus.handlers"]``): ``messaging.send_message``,
``messaging.stream_messages``, ``messaging.set_typing``, ``messaging.stream_typing``,
``messaging.stream_presence``. The state and its rules are the pure :mod:`.conversations`; what each handler
takes and emits is declared in :mod:`.specs`; messages persist in the SQLite :mod:`.store`, which is only ever
called from a worker thread (``anyio.to_thread``, one call at a time per connection), never on the event loop.
Each follower (``ctx.follow``) and the typing expiry timer (``ctx.start_soon``) run in the server's task group
until it stops.

Everything live follows the bus, not in-process callbacks, so it works whichever node a request reached:

- ``stream_messages`` streams on every node follow ``messaging:send_message:v1:success``. One follower per
  node stores each message it sees in the node's database (idempotent by ``message_id``, so a message sent
  through another node is in this node's history too) and only then hands it to the node's streams of that
  conversation. A stream registers for live messages *before* it reads its history, and skips live messages
  with a ``seq`` it already read, so nothing is missed or repeated between the two.
- ``set_typing`` publishes ``messaging:typing:v1:changed``; each node's ``stream_typing`` follower keeps the
  indicators and expires them ``ttl_s`` later on its own monotonic clock.
- Presence is read from the lifecycle of the conversation's streams (``stream_messages``, ``stream_typing``,
  ``stream_presence``): a user joins when their first stream in the conversation is ``started`` and leaves
  when their last one reaches a terminal state (``cancelled`` is how a dropped connection shows).
  A node knows the streams that started while it was running; one that restarts does not see users whose
  streams began before it, until those streams end or start again.

Who acts is ``metadata.user_id``. Only while authentication is off (the server marks such requests
``metadata.auth = "none"``) is a missing one replaced by the payload's optional ``user_id``; otherwise, or
without either, ``anonymous_user``. With authentication on the payload's ``user_id`` is never read.

Participants and access (:mod:`.conversations` holds the rule, :class:`_Participants` applies it):

- The first message sent to a conversation creates it: its participants are its sender and the user ids the
  message names in ``participants``. A later message, from a participant, adds the users it names. Nobody is
  removed.
- Participants are stored in the node's database, by ``send_message`` itself and, on every node, by one
  follower of ``messaging:send_message:v1:success`` (its payload lists them). That follower also follows the
  plugin's own requests, and a handler waits (``sync_timeout_s``) until it has applied everything published
  before the request, so a conversation created through one node is known on the node checking the next request.
- With authentication on (no ``metadata.auth = "none"``), only participants and the users listed in ``admins``
  may send, stream history, typing and presence, or set typing; anyone else's request ends ``failed``
  (``handler_error``, ``PermissionDenied: ...``), and a refused stream does not count for presence. With
  authentication off nothing is checked.
- ``messaging:typing:v1:changed`` carries ``metadata.audience`` = the participants, so subscribers other than
  them (and admins) do not receive it; a ``send_message`` result is private to its sender as every request's
  lifecycle is. The plugin's followers are server-side subscriptions: they receive every event.

Configuration (``[handlers.messaging]``, shared by the five handlers and declared in ``specs.CONFIG``):

- ``data_dir`` (the node's data directory: ``nexus serve --data-dir``, by default one per node), ``db_path``
  (``<data_dir>/messaging.sqlite3``): the database. Nodes keep one each by default (every node stores the
  messages it sees on the bus), or may share one file on one machine (WAL mode) through ``db_path``.
- ``synchronous`` (``NORMAL``): SQLite's ``PRAGMA synchronous`` (``FULL`` survives power loss too).
- ``history_limit`` (500): the most history messages a stream sends (the most recent ones).
- ``max_text_length`` (10000): characters in a message.
- ``live_queue`` (1000): live items a stream may have waiting; past that it ends with ``failed`` and the
  client resumes with ``since`` = the last message id it got.
- ``typing_ttl_s`` (5): how long a typing indicator lasts unless set again.
- ``max_typing_conversations`` (10000), ``max_tracked_streams`` (100000): memory bounds of the typing and
  presence boards (see :mod:`.conversations`).
- ``anonymous_user`` (``anonymous``).
- ``admins`` (none): user ids that read and write every conversation while authentication is on.
- ``max_participants`` (1000): participants a conversation may have (a message naming more fails).
- ``sync_timeout_s`` (5): the longest a request waits for this node to apply what was published before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import anyio
import anyio.to_thread

from nexus import (
    Event,
    EventHandler,
    Follower,
    HandlerContext,
    InvalidPayload,
    Stream,
    StreamingEventHandler,
    default_data_dir,
    parse_time,
    read_int,
    read_number,
)

from . import specs
from .conversations import (
    InvalidRequest,
    Message,
    PermissionDenied,
    PresenceBoard,
    PresenceChange,
    Requester,
    TypingBoard,
    TypingChange,
    check_access,
    new_message_id,
    parse_since,
    participants_after,
    rfc3339,
)
from .specs import DEFAULTS, SENT, TYPING_CHANGED
from .store import MessageStore

T = TypeVar("T")

STREAMING_ACTIONS: Final = ("stream_messages", "stream_typing", "stream_presence")
LIFECYCLE_PATTERNS: Final = tuple(
    f"messaging:{action}:v1:{state}"
    for action in STREAMING_ACTIONS
    for state in ("requested", "started", "success", "failed", "timeout", "cancelled")
)
MAX_TYPING_TTL_S: Final = 3600.0
REQUESTS: Final = "messaging:*:v1:requested"


# --- configuration ------------------------------------------------------------------------------------------


def _positive_int(config: Mapping[str, Any], key: str, default: int) -> int:
    return read_int(config, key, default, plugin="messaging", table=True, minimum=1, must_be="a positive integer")


def _positive_number(config: Mapping[str, Any], key: str, default: float) -> float:
    return read_number(
        config, key, default, plugin="messaging", table=True, minimum=0, strict=True, must_be="a positive number"
    )


def _text(config: Mapping[str, Any], key: str, default: str) -> str:
    value = config.get(key, default)
    if not isinstance(value, str) or not value:
        raise ValueError(f"[handlers.messaging] {key} must be a non-empty string, got {value!r}")
    return value


def _user_ids(config: Mapping[str, Any], key: str) -> frozenset[str]:
    value = config.get(key, [])
    if not isinstance(value, list) or not all(isinstance(user, str) and user for user in value):
        raise ValueError(f"[handlers.messaging] {key} must be a list of user ids, got {value!r}")
    return frozenset(value)


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The plugin's configuration, checked (a bad key stops the server at start-up, naming it)."""

    db_path: Path
    synchronous: str = DEFAULTS["synchronous"]
    history_limit: int = DEFAULTS["history_limit"]
    max_text_length: int = DEFAULTS["max_text_length"]
    live_queue: int = DEFAULTS["live_queue"]
    typing_ttl_s: float = DEFAULTS["typing_ttl_s"]
    max_typing_conversations: int = DEFAULTS["max_typing_conversations"]
    max_tracked_streams: int = DEFAULTS["max_tracked_streams"]
    anonymous_user: str = DEFAULTS["anonymous_user"]
    admins: frozenset[str] = frozenset()
    max_participants: int = DEFAULTS["max_participants"]
    sync_timeout_s: float = DEFAULTS["sync_timeout_s"]

    @classmethod
    def read(cls, config: Mapping[str, Any]) -> Settings:
        """The settings in ``config`` (declared in ``specs.CONFIG``, with their defaults); ``data_dir`` is the
        node's data directory, where the database is unless ``db_path`` says otherwise."""
        data_dir = Path(_text(config, "data_dir", str(default_data_dir()))).expanduser()
        db_path = Path(_text(config, "db_path", str(data_dir / "messaging.sqlite3"))).expanduser()
        integers = ["history_limit", "max_text_length", "live_queue", "max_typing_conversations"]
        integers += ["max_tracked_streams", "max_participants"]
        return cls(
            db_path=db_path,
            synchronous=_text(config, "synchronous", DEFAULTS["synchronous"]),
            anonymous_user=_text(config, "anonymous_user", DEFAULTS["anonymous_user"]),
            admins=_user_ids(config, "admins"),
            typing_ttl_s=_positive_number(config, "typing_ttl_s", DEFAULTS["typing_ttl_s"]),
            sync_timeout_s=_positive_number(config, "sync_timeout_s", DEFAULTS["sync_timeout_s"]),
            **{key: _positive_int(config, key, DEFAULTS[key]) for key in integers},
        )


# --- plumbing: the store off the loop, per-conversation fan-out ----------------------------------


class _Database:
    """A :class:`MessageStore` used from a worker thread, one call at a time."""

    def __init__(self, settings: Settings) -> None:
        self.store = MessageStore(settings.db_path, synchronous=settings.synchronous)
        self._limiter = anyio.CapacityLimiter(1)

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(function, *args, limiter=self._limiter)

    async def open(self) -> None:
        await self.run(self.store.open)

    async def close(self) -> None:
        await self.run(self.store.close)


class FellBehind(Exception):
    """A stream's client did not keep up with the live items of its conversation."""


class _Inbox(Generic[T]):
    """A stream's live items, bounded: past ``capacity`` waiting items :meth:`get` raises :class:`FellBehind`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.overflowed = False
        self._items: deque[T] = deque()
        self._ready = asyncio.Event()

    def put(self, item: T) -> None:
        if self.overflowed:
            return
        if len(self._items) >= self.capacity:
            self.overflowed = True
            self._items.clear()
        else:
            self._items.append(item)
        self._ready.set()

    async def get(self) -> T:
        while True:
            if self.overflowed:
                raise FellBehind(f"more than {self.capacity} live items waited for this stream")
            if self._items:
                return self._items.popleft()
            self._ready.clear()
            await self._ready.wait()


class _Rooms(Generic[T]):
    """The inboxes of this node's streams, by conversation."""

    def __init__(self) -> None:
        self._rooms: dict[str, set[_Inbox[T]]] = {}

    @contextlib.contextmanager
    def joined(self, conversation_id: str, inbox: _Inbox[T]) -> Iterator[None]:
        self._rooms.setdefault(conversation_id, set()).add(inbox)
        try:
            yield
        finally:
            room = self._rooms.get(conversation_id)
            if room is not None:
                room.discard(inbox)
                if not room:
                    del self._rooms[conversation_id]

    def publish(self, conversation_id: str, item: T) -> None:
        for inbox in self._rooms.get(conversation_id, ()):
            inbox.put(item)

    def __len__(self) -> int:
        return sum(len(room) for room in self._rooms.values())


class _Participants:
    """Who takes part in which conversation on this server, shared by the plugin's handlers (``ctx.shared``).

    Its database is kept up to date by one follower of ``send_message`` successes (sent through any node), which
    also follows the plugin's own requests, so that a handler can wait until everything published before a
    request is applied (:meth:`sync`) before it decides who may do what.
    """

    def __init__(self, settings: Settings, log: Any) -> None:
        self.settings = settings
        self.log = log
        self.db = _Database(settings)
        self._follower: Follower | None = None
        self._starting = anyio.Lock()

    async def start(self, ctx: HandlerContext) -> None:
        """Open the database and follow the bus, once per server (every handler calls it in its ``setup``)."""
        async with self._starting:
            if self._follower is None:
                await self.db.open()
                self._follower = await ctx.follow(SENT, REQUESTS, on_event=self._on_event, name="participants_follower")

    async def aclose(self) -> None:
        await self.db.close()

    async def _on_event(self, event: Event) -> None:
        if event.event_type != SENT:
            return  # a request: it only moves the follower's offset (see sync)
        conversation_id, participants = event.payload.get("conversation_id"), event.payload.get("participants")
        if participants is None:
            participants = []  # a node without access control: its sender still takes part
        sender = event.payload.get("sender")
        users = [*participants, sender] if isinstance(participants, list) else None
        if (
            not isinstance(conversation_id, str)
            or users is None
            or not all(isinstance(user, str) and user for user in users)
        ):
            self.log.warning("participants_unreadable", event_id=event.event_id)
            return
        await self.db.run(self.db.store.add_participants, conversation_id, users)

    async def sync(self, request: Event) -> None:
        """Wait (at most ``sync_timeout_s``) until every message stored before ``request`` is applied."""
        if self._follower is not None:
            await self._follower.reached(request.offset, self.settings.sync_timeout_s)

    def requester(self, request: Event) -> Requester:
        return Requester.of(request.metadata, request.payload, self.settings.anonymous_user, self.settings.admins)

    async def participants(self, conversation_id: str) -> frozenset[str]:
        return await self.db.run(self.db.store.participants, conversation_id)

    async def check(self, request: Event) -> tuple[Requester, frozenset[str]]:
        """The requester and the conversation's participants; raises :class:`PermissionDenied` for a verified
        requester who is neither a participant nor an admin."""
        requester = self.requester(request)
        conversation_id = _conversation(request)
        if not requester.verified:
            return requester, await self.participants(conversation_id)
        await self.sync(request)
        participants = await self.participants(conversation_id)
        check_access(requester, conversation_id, participants)
        return requester, participants


async def _participants(ctx: HandlerContext) -> _Participants:
    shared = ctx.shared(_Participants, lambda: _Participants(Settings.read(ctx.config), ctx.log))
    await shared.start(ctx)
    return shared


def _audience(participants: frozenset[str]) -> dict[str, str]:
    """Metadata making a side event private to the participants (none yet: while authentication is off)."""
    return {"audience": ",".join(sorted(participants))} if participants else {}


def _conversation(event: Event) -> str:
    return str(event.payload["conversation_id"])


def _invalid(event: Event, problem: str) -> InvalidPayload:
    return InvalidPayload(f"{event.event_type} payload.{problem}")


# --- handlers ---------------------------------------------------------------------------------------------------


class SendMessage(EventHandler):
    """Stores a message in its conversation and returns it; every ``stream_messages`` of the conversation, on
    any node, delivers it live."""

    event_type = "messaging:send_message:v1"
    ordering_key = "conversation_id"
    takes = specs.SEND_MESSAGE_TAKES
    config_keys = specs.CONFIG
    emits = specs.SEND_MESSAGE_EMITS

    async def setup(self, ctx: HandlerContext) -> None:
        self._settings = Settings.read(ctx.config)
        self._access = await _participants(ctx)
        ctx.log.info("message_store_open", path=str(self._settings.db_path))

    async def handle(self, event: Event) -> dict[str, Any]:
        text = str(event.payload["text"])
        if len(text) > self._settings.max_text_length:
            raise _invalid(
                event, f"text: {len(text)} characters, more than max_text_length ({self._settings.max_text_length})"
            )
        conversation_id = _conversation(event)
        access = self._access
        requester = access.requester(event)
        await access.sync(event)
        before = await access.participants(conversation_id)
        participants = participants_after(requester, conversation_id, before, event.payload.get("participants", ()))
        if len(participants) > self._settings.max_participants:
            raise _invalid(
                event,
                f"participants: the conversation would have {len(participants)}, more than max_participants "
                f"({self._settings.max_participants})",
            )
        now = parse_time(rfc3339(time.time()))
        message = Message(
            message_id=new_message_id(now, os.urandom(10)),
            conversation_id=conversation_id,
            sender=requester.user_id,
            text=text,
            sent_at=rfc3339(now),
            sent_ts=now,
        )
        await access.db.run(access.db.store.add_participants, conversation_id, participants)
        await access.db.run(access.db.store.add, message)
        return {**message.to_payload(), "participants": sorted(participants)}


class StreamMessages(StreamingEventHandler):
    """Streams a conversation's messages: its history first, then live ones, until cancelled."""

    event_type = "messaging:stream_messages:v1"
    stream_timeout = None
    takes = specs.STREAM_MESSAGES_TAKES
    config_keys = specs.CONFIG
    emits = specs.STREAM_MESSAGES_EMITS

    async def setup(self, ctx: HandlerContext) -> None:
        self._settings = Settings.read(ctx.config)
        self._db = _Database(self._settings)
        await self._db.open()
        self._rooms: _Rooms[tuple[int | None, Message]] = _Rooms()
        await ctx.follow(SENT, on_event=self._on_sent, name="messages_follower")
        self._access = await _participants(ctx)

    async def teardown(self) -> None:
        await self._db.close()

    async def _on_sent(self, event: Event) -> None:
        """Store a message seen on the bus (from any node), then hand it to this node's streams."""
        try:
            message = Message.from_payload(event.payload)
        except InvalidRequest as exc:
            self.ctx.log.warning("sent_message_unreadable", error=str(exc), event_id=event.event_id)
            return
        seq: int | None
        try:
            seq = await self._db.run(self._db.store.add, message)
        except Exception as exc:  # deliver it live all the same; it is not in the history either
            self.ctx.log.error("message_store_failed", error=f"{type(exc).__name__}: {exc}")
            seq = None
        self._rooms.publish(message.conversation_id, (seq, message))

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        conversation_id = _conversation(event)
        await self._access.check(event)
        try:
            since = parse_since(event.payload.get("since"))
        except InvalidRequest as exc:
            raise _invalid(event, str(exc)) from None
        limit = min(int(event.payload.get("limit", self._settings.history_limit)), self._settings.history_limit)
        inbox: _Inbox[tuple[int | None, Message]] = _Inbox(self._settings.live_queue)
        last_id = ""
        # Live first, then history: what is stored after the history read arrives live, with a greater seq.
        with self._rooms.joined(conversation_id, inbox):
            try:
                history, head = await self._db.run(self._db.store.history, conversation_id, since, limit)
            except InvalidRequest as exc:
                raise _invalid(event, str(exc)) from None
            for _, message in history:
                await stream.send({**message.to_payload(), "live": False})
                last_id = message.message_id
            while True:
                try:
                    seq, message = await inbox.get()
                except FellBehind as exc:
                    resume = f"since={last_id!r}" if last_id else "the same request"
                    raise FellBehind(f"{exc}: the client reads too slowly; resume with {resume}") from None
                if seq is not None and seq <= head:
                    continue  # already sent as history
                await stream.send({**message.to_payload(), "live": True})
                last_id = message.message_id


class SetTyping(EventHandler):
    """Shows or clears the requester's typing indicator in a conversation; it expires by itself."""

    event_type = "messaging:set_typing:v1"
    ordering_key = "conversation_id"
    takes = specs.SET_TYPING_TAKES
    config_keys = specs.CONFIG
    emits = specs.SET_TYPING_EMITS

    async def setup(self, ctx: HandlerContext) -> None:
        self._settings = Settings.read(ctx.config)
        self._access = await _participants(ctx)

    async def handle(self, event: Event) -> dict[str, Any]:
        conversation_id = _conversation(event)
        requester, participants = await self._access.check(event)
        user_id = requester.user_id
        typing = bool(event.payload["typing"])
        ttl = self._settings.typing_ttl_s
        await self.ctx.publish(
            TYPING_CHANGED,
            {"conversation_id": conversation_id, "user_id": user_id, "typing": typing, "ttl_s": ttl},
            metadata=_audience(participants),
        )
        expires_at = rfc3339(time.time() + ttl) if typing else None
        return {"conversation_id": conversation_id, "user_id": user_id, "typing": typing, "expires_at": expires_at}


def _typing_chunk(conversation_id: str, users: tuple[str, ...], change: TypingChange | None) -> dict[str, Any]:
    return {
        "conversation_id": conversation_id,
        "users": list(users),
        "change": "snapshot" if change is None else change.reason,
        "user_id": None if change is None else change.user_id,
    }


class StreamTyping(StreamingEventHandler):
    """Streams who is typing in a conversation: a snapshot, then every change, until cancelled."""

    event_type = "messaging:stream_typing:v1"
    stream_timeout = None
    takes = specs.STREAM_TYPING_TAKES
    config_keys = specs.CONFIG
    emits = specs.STREAM_TYPING_EMITS

    async def setup(self, ctx: HandlerContext) -> None:
        self._settings = Settings.read(ctx.config)
        self._board = TypingBoard(max_conversations=self._settings.max_typing_conversations)
        self._rooms: _Rooms[TypingChange] = _Rooms()
        self._wake = asyncio.Event()
        await ctx.follow(TYPING_CHANGED, on_event=self._on_changed, name="typing_follower")
        ctx.start_soon(self._expire_indicators, name="typing-expiry")
        self._access = await _participants(ctx)

    async def _on_changed(self, event: Event) -> None:
        payload = event.payload
        conversation_id, user_id = payload.get("conversation_id"), payload.get("user_id")
        typing, ttl = payload.get("typing"), payload.get("ttl_s")
        if (
            not isinstance(conversation_id, str)
            or not isinstance(user_id, str)
            or not isinstance(typing, bool)
            or isinstance(ttl, bool)
            or not isinstance(ttl, (int, float))
            or not 0 < ttl <= MAX_TYPING_TTL_S
        ):
            self.ctx.log.warning("typing_event_unreadable", event_id=event.event_id)
            return
        change = self._board.set(conversation_id, user_id, typing, float(ttl), time.monotonic())
        if change is not None:
            self._rooms.publish(conversation_id, change)
        self._wake.set()

    def _expire_now(self) -> None:
        for change in self._board.expire(time.monotonic()):
            self._rooms.publish(change.conversation_id, change)

    async def _expire_indicators(self) -> None:
        """Expire indicators when their time comes (monotonic clock), whether or not anything else happens."""
        while True:
            self._wake.clear()
            deadline = self._board.next_expiry()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._expire_now()

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        conversation_id = _conversation(event)
        await self._access.check(event)
        inbox: _Inbox[TypingChange] = _Inbox(self._settings.live_queue)
        self._expire_now()
        with self._rooms.joined(conversation_id, inbox):
            await stream.send(_typing_chunk(conversation_id, self._board.typing(conversation_id), None))
            while True:
                change = await inbox.get()
                await stream.send(_typing_chunk(conversation_id, change.users, change))


def _presence_chunk(conversation_id: str, present: tuple[str, ...], change: PresenceChange | None) -> dict[str, Any]:
    return {
        "conversation_id": conversation_id,
        "present": list(present),
        "change": "snapshot" if change is None else change.status,
        "user_id": None if change is None else change.user_id,
    }


class StreamPresence(StreamingEventHandler):
    """Streams who is present in a conversation: a snapshot, then each join and leave, until cancelled."""

    event_type = "messaging:stream_presence:v1"
    stream_timeout = None
    takes = specs.STREAM_PRESENCE_TAKES
    config_keys = specs.CONFIG
    emits = specs.STREAM_PRESENCE_EMITS

    async def setup(self, ctx: HandlerContext) -> None:
        self._settings = Settings.read(ctx.config)
        self._board = PresenceBoard(max_streams=self._settings.max_tracked_streams)
        self._rooms: _Rooms[PresenceChange] = _Rooms()
        self._access = await _participants(ctx)
        await ctx.follow(*LIFECYCLE_PATTERNS, on_event=self._on_lifecycle, name="presence_follower")

    async def _on_lifecycle(self, event: Event) -> None:
        state = event.event_type.rsplit(":", 1)[-1]
        if state == "requested":
            conversation_id = event.payload.get("conversation_id")
            if isinstance(conversation_id, str) and conversation_id:
                try:  # a stream that will be refused does not make its requester present
                    requester, _ = await self._access.check(event)
                except PermissionDenied:
                    return
                self._board.requested(event.event_id, conversation_id, requester.user_id)
            return
        correlation_id = event.metadata.get("correlation_id", "")
        changes = self._board.started(correlation_id) if state == "started" else self._board.ended(correlation_id)
        for change in changes:
            self._rooms.publish(change.conversation_id, change)

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        conversation_id = _conversation(event)
        await self._access.check(event)
        inbox: _Inbox[PresenceChange] = _Inbox(self._settings.live_queue)
        with self._rooms.joined(conversation_id, inbox):
            await stream.send(_presence_chunk(conversation_id, self._board.present(conversation_id), None))
            while True:
                change = await inbox.get()
                await stream.send(_presence_chunk(conversation_id, change.present, change))
