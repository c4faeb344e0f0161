"""The messaging plugin's declarations: what each handler takes and emits, with payload schemas and examples, and
the settings of its ``[handlers.messaging]`` section (:data:`CONFIG`)."""

from __future__ import annotations

from typing import Any, Final

from nexus import ConfigKey, EventSpec

CONFIG: Final = (
    ConfigKey("db_path", str, None, "The SQLite database (default: messaging.sqlite3 in the node's data_dir)."),
    ConfigKey("synchronous", str, "NORMAL", "SQLite's PRAGMA synchronous (FULL survives power loss too)."),
    ConfigKey("history_limit", int, 500, "The most history messages a stream sends (the most recent ones)."),
    ConfigKey("max_text_length", int, 10_000, "Characters in a message."),
    ConfigKey("live_queue", int, 1000, "Live items a stream may have waiting before it ends with failed."),
    ConfigKey("typing_ttl_s", float, 5.0, "How long a typing indicator lasts unless set again."),
    ConfigKey("max_typing_conversations", int, 10_000, "Conversations the typing board keeps."),
    ConfigKey("max_tracked_streams", int, 100_000, "Streams the presence board keeps."),
    ConfigKey("anonymous_user", str, "anonymous", "Who acts when a request names nobody."),
    ConfigKey("admins", list, [], "User ids that read and write every conversation (authentication on)."),
    ConfigKey("max_participants", int, 1000, "Participants a conversation may have."),
    ConfigKey("sync_timeout_s", float, 5.0, "The longest a request waits for this node to catch up with the bus."),
)
DEFAULTS: Final = {key.name: key.default for key in CONFIG}

SENT: Final = "messaging:send_message:v1:success"
TYPING_CHANGED: Final = "messaging:typing:v1:changed"

_CONVERSATION_ID = {"type": "string", "minLength": 1, "maxLength": 256, "description": "The conversation."}

_USER_ID = {
    "type": "string",
    "minLength": 1,
    "maxLength": 256,
    "description": "Who acts, only while authentication is off and the request carries no metadata.user_id "
    "(with authentication on, the requester is always the token's user).",
}

MAX_NAMED: Final = 100
_PARTICIPANTS_NAMED = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 256},
    "maxItems": MAX_NAMED,
    "description": "User ids to take part in the conversation. The first message creates the conversation: its "
    "sender and the users it names are the participants. A later message, from a participant, adds the users it "
    "names. Nobody is removed.",
}

_PARTICIPANTS_ONLY: Final = (
    " With authentication on, only the conversation's participants (and admins) may: anyone else gets `failed` "
    "(`handler_error`, the message starting `PermissionDenied:`)."
)

_PARTICIPANTS = {
    "type": "array",
    "items": {"type": "string"},
    "description": "The conversation's participants after this message, sorted; only they (and admins) read it.",
}

_MESSAGE_PROPERTIES: dict[str, Any] = {
    "message_id": {"type": "string", "description": "The message's id (a ULID: unique, sortable by time)."},
    "conversation_id": {"type": "string", "description": "The conversation."},
    "sender": {
        "type": "string",
        "description": "Who sent it: the authenticated user (metadata.user_id); the payload's user_id only while "
        "authentication is off.",
    },
    "text": {"type": "string", "description": "The text."},
    "sent_at": {"type": "string", "description": "When the node stored it (RFC 3339 UTC)."},
}

_MESSAGE_EXAMPLE: Final = {
    "message_id": "01JGZ8Q4V6M3T0D1XH2B7C9KEF",
    "conversation_id": "team-42",
    "sender": "ada",
    "text": "Standup in 5 minutes",
    "sent_at": "2025-01-06T08:55:02.118000Z",
}

SEND_MESSAGE_TAKES = EventSpec(
    "messaging:send_message:v1:requested",
    "Send a message to a conversation. The sender is the authenticated user (metadata.user_id). The first "
    "message creates the conversation, its sender and the users it names in `participants` taking part; after "
    "that only participants (and admins) may send, and the result is theirs only.",
    {
        "type": "object",
        "required": ["conversation_id", "text"],
        "properties": {
            "conversation_id": _CONVERSATION_ID,
            "text": {"type": "string", "minLength": 1, "description": "The message (at most max_text_length)."},
            "participants": _PARTICIPANTS_NAMED,
            "user_id": _USER_ID,
        },
    },
    example={"conversation_id": "team-42", "text": "Standup in 5 minutes", "participants": ["bob", "cy"]},
)

SEND_MESSAGE_EMITS = (
    EventSpec(
        SENT,
        "The stored message and the conversation's participants. Streams of the conversation follow these "
        "events, whichever node sent it, and every node keeps the participants they name. With authentication on "
        "it reaches the sender (and admins) only.",
        {
            "type": "object",
            "required": [*_MESSAGE_PROPERTIES, "participants"],
            "properties": {**_MESSAGE_PROPERTIES, "participants": _PARTICIPANTS},
        },
        example={**_MESSAGE_EXAMPLE, "participants": ["ada", "bob", "cy"]},
    ),
)

STREAM_MESSAGES_TAKES = EventSpec(
    "messaging:stream_messages:v1:requested",
    "Stream a conversation's messages, one `stream` event each: the history first (all of it, or what "
    "came after `since`; at most the most recent history_limit), then every new message live, until "
    "cancelled. No message is missed or repeated between the two." + _PARTICIPANTS_ONLY,
    {
        "type": "object",
        "required": ["conversation_id"],
        "properties": {
            "conversation_id": _CONVERSATION_ID,
            "since": {
                "type": ["string", "number"],
                "description": "A message id (history after it) or a time, RFC 3339 or epoch seconds "
                "(history sent at or after it). Absent: all the history.",
            },
            "limit": {
                "type": "integer",
                "minimum": 0,
                "description": "The most history messages to send (at most config history_limit, 500).",
            },
            "user_id": _USER_ID,
        },
    },
    example={"conversation_id": "team-42", "since": "2025-01-06T08:00:00Z"},
)

STREAM_MESSAGES_EMITS = (
    EventSpec(
        "messaging:stream_messages:v1:stream",
        "One message of the conversation; `live` is false for history, true for messages sent since.",
        {
            "type": "object",
            "required": [*_MESSAGE_PROPERTIES, "live"],
            "properties": {
                **_MESSAGE_PROPERTIES,
                "live": {"type": "boolean", "description": "False for history, true for a new message."},
            },
        },
        example={**_MESSAGE_EXAMPLE, "live": True},
    ),
)

SET_TYPING_TAKES = EventSpec(
    "messaging:set_typing:v1:requested",
    "Say that the requester is typing (or stopped). An indicator lasts typing_ttl_s (5 s) unless set again."
    + _PARTICIPANTS_ONLY,
    {
        "type": "object",
        "required": ["conversation_id", "typing"],
        "properties": {
            "conversation_id": _CONVERSATION_ID,
            "typing": {"type": "boolean", "description": "True while typing; false to clear it at once."},
            "user_id": _USER_ID,
        },
    },
    example={"conversation_id": "team-42", "typing": True},
)

SET_TYPING_EMITS = (
    EventSpec(
        "messaging:set_typing:v1:success",
        "The indicator as set.",
        {
            "type": "object",
            "required": ["conversation_id", "user_id", "typing", "expires_at"],
            "properties": {
                "conversation_id": {"type": "string", "description": "The conversation."},
                "user_id": {"type": "string", "description": "Who is typing."},
                "typing": {"type": "boolean", "description": "Whether they are."},
                "expires_at": {
                    "type": ["string", "null"],
                    "description": "When the indicator lapses unless set again (RFC 3339); null when cleared.",
                },
            },
        },
        example={
            "conversation_id": "team-42",
            "user_id": "ada",
            "typing": True,
            "expires_at": "2025-01-06T08:55:07.118000Z",
        },
    ),
    EventSpec(
        TYPING_CHANGED,
        "A typing indicator was set or cleared; every node's typing streams follow these events. Its "
        "metadata.audience names the conversation's participants: with authentication on, only they (and admins) "
        "receive it.",
        {
            "type": "object",
            "required": ["conversation_id", "user_id", "typing", "ttl_s"],
            "properties": {
                "conversation_id": {"type": "string", "description": "The conversation."},
                "user_id": {"type": "string", "description": "Who is typing."},
                "typing": {"type": "boolean", "description": "Whether they are."},
                "ttl_s": {"type": "number", "description": "Seconds the indicator lasts unless set again."},
            },
        },
        example={"conversation_id": "team-42", "user_id": "ada", "typing": True, "ttl_s": 5.0},
    ),
)

STREAM_TYPING_TAKES = EventSpec(
    "messaging:stream_typing:v1:requested",
    "Stream the typing indicators of a conversation: who types now, then each change (someone started, "
    "stopped, or their indicator expired)." + _PARTICIPANTS_ONLY,
    {
        "type": "object",
        "required": ["conversation_id"],
        "properties": {"conversation_id": _CONVERSATION_ID, "user_id": _USER_ID},
    },
    example={"conversation_id": "team-42"},
)

STREAM_TYPING_EMITS = (
    EventSpec(
        "messaging:stream_typing:v1:stream",
        "Who is typing after a change (the first chunk is the snapshot).",
        {
            "type": "object",
            "required": ["conversation_id", "users", "change", "user_id"],
            "properties": {
                "conversation_id": {"type": "string", "description": "The conversation."},
                "users": {"type": "array", "items": {"type": "string"}, "description": "Who types, sorted."},
                "change": {
                    "enum": ["snapshot", "typing", "stopped", "expired"],
                    "description": "What happened: the first chunk, someone started, stopped, or timed out.",
                },
                "user_id": {"type": ["string", "null"], "description": "Whose indicator changed (null first)."},
            },
        },
        example={"conversation_id": "team-42", "users": ["ada"], "change": "typing", "user_id": "ada"},
    ),
)

STREAM_PRESENCE_TAKES = EventSpec(
    "messaging:stream_presence:v1:requested",
    "Stream who is present in a conversation. A user joins when they start any stream in it "
    "(stream_messages, stream_typing, stream_presence) and leaves when their last one ends, including by "
    "their connection dropping." + _PARTICIPANTS_ONLY,
    {
        "type": "object",
        "required": ["conversation_id"],
        "properties": {"conversation_id": _CONVERSATION_ID, "user_id": _USER_ID},
    },
    example={"conversation_id": "team-42"},
)

STREAM_PRESENCE_EMITS = (
    EventSpec(
        "messaging:stream_presence:v1:stream",
        "Who is present after a change (the first chunk is the snapshot).",
        {
            "type": "object",
            "required": ["conversation_id", "present", "change", "user_id"],
            "properties": {
                "conversation_id": {"type": "string", "description": "The conversation."},
                "present": {"type": "array", "items": {"type": "string"}, "description": "Who is, sorted."},
                "change": {"enum": ["snapshot", "joined", "left"], "description": "What happened."},
                "user_id": {"type": ["string", "null"], "description": "Who joined or left (null first)."},
            },
        },
        example={"conversation_id": "team-42", "present": ["ada", "bob"], "change": "joined", "user_id": "bob"},
    ),
)
