"""The gateway's event catalogue as an AsyncAPI 3.0 document: ``nexus docs asyncapi`` and ``GET /asyncapi.json``.

One channel, ``/ws``: the gateway's WebSocket, on which every frame is one JSON object. Its messages are the
control frames of the protocol (``connection``, ``subscribe`` / ``subscribed``, ``unsubscribe`` /
``unsubscribed``, ``cancel``, ``ping`` / ``pong``, ``published``, ``error``) and, for every handler, the events of
its requests: the ``requested`` event a client sends (its payload schema as the handler declares it in ``takes``)
and its lifecycle (``started``, ``stream``, ``heartbeat`` for streaming handlers, then ``success``, ``failed``,
``timeout`` or ``cancelled``; a ``stream`` or ``success`` payload the handler declares in ``emits`` replaces the
generic one), and the side events it declares. What is known about each handler comes from
:class:`nexus.eventdocs.HandlerEvents`, which ``docs/events.md`` is rendered from too.

Operations group the messages: one ``send`` per control frame (with its ``reply``), one ``send`` per handler's
request (replied to by ``published``) with a ``receive`` of its lifecycle, one ``receive`` per side event.

Payload schemas are the handlers' JSON Schemas as declared; AsyncAPI reads them as its default schema format, a
superset of JSON Schema draft 07, so keywords newer than draft 07 are carried but not understood by its tools.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

from nexus import __version__
from nexus.eventdocs import HandlerClass, HandlerEvents, handler_events
from nexus.events import HEARTBEAT, REQUESTED, EventType
from nexus.schema import EventSpec

from .protocol import ERRORS, SUBPROTOCOL

ASYNCAPI_VERSION: Final = "3.0.0"
CHANNEL: Final = "ws"
"""The id of the one channel, the WebSocket ``/ws``."""
EXAMPLE_EPOCH: Final = "9f1c2a7e4b3d5a60"
EXAMPLE_TIME: Final = "2026-01-05T09:30:00.250Z"
EXAMPLE_REQUEST_ID: Final = "5b0e0c9a8d7f4e21a3c6b1d2e4f60718"

_CHANNEL_REF: Final = {"$ref": f"#/channels/{CHANNEL}"}
_STRING: Final = {"type": "string"}
_REF: Final = {"type": "string", "maxLength": 256, "description": "echoed in the answer (and in an error frame)"}
_OFFSET: Final = {"type": "integer", "minimum": 0}
_PATTERNS: Final = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "string", "description": "`*` matches one token, a final `>` the rest"},
    "examples": [["messaging:*:v1:*", "places:>"]],
}


def _object(required: Iterable[str], properties: Mapping[str, Any], description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "required": list(required), "properties": dict(properties)}
    if description:
        schema["description"] = description
    return schema


def _frame_type(value: str) -> dict[str, Any]:
    return {"type": "string", "const": value}


def message_id(event_type: str) -> str:
    """A message id for an event type: its tokens joined by ``.`` (``messaging.send_message.v1.requested``)."""
    return event_type.replace(":", ".")


def _schemas() -> dict[str, Any]:
    """The frames every event message builds on."""
    metadata = {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": "string map: user_id, correlation_id (a request's event_id, on its lifecycle events), "
        "causation_id, traceparent, …",
    }
    event = _object(
        ["type", "event_id", "payload", "metadata", "offset", "epoch", "timestamp"],
        {
            "type": {"type": "string", "description": "the event type, `<service>:<action>:v<N>:<state>`"},
            "event_id": {
                "type": "string",
                "description": "unique; a repeated id inside the dedupe window is not stored twice",
            },
            "payload": {"type": "object"},
            "metadata": metadata,
            "offset": {**_OFFSET, "description": "its place in the bus's history, from 1; 0: not stored (heartbeats)"},
            "epoch": {"type": "string", "description": "the history its offset belongs to"},
            "timestamp": {"type": "string", "format": "date-time", "description": "RFC 3339, UTC"},
        },
        "An event as the gateway delivers it.",
    )
    publish = _object(
        ["type"],
        {
            "type": {"type": "string", "description": "the event type to publish"},
            "payload": {"type": "object", "default": {}},
            "event_id": {
                "type": "string",
                "description": "chosen by the client to make retries safe; a fresh one otherwise",
            },
            "metadata": metadata,
            "ref": _REF,
        },
        "An event a client publishes; answered by `published` (or `error`, whose `ref` is the event_id).",
    )
    publish["additionalProperties"] = False
    return {"Event": event, "Publish": publish}


def _control_messages() -> dict[str, dict[str, Any]]:
    """The protocol's control frames, by message id."""
    codes = sorted(ERRORS)
    fatal = ", ".join(f"{code} ({spec.close_code:d})" for code, spec in ERRORS.items() if spec.close_code is not None)
    frames: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
        "connection": (
            "The server's first frame on every connection.",
            _object(
                ["type", "status", "connection_id", "epoch"],
                {
                    "type": _frame_type("connection"),
                    "status": _frame_type("connected"),
                    "connection_id": _STRING,
                    "epoch": {"type": "string", "description": "the history offsets refer to"},
                },
            ),
            {"type": "connection", "status": "connected", "connection_id": "3f9a1c0e5d7b2a46", "epoch": EXAMPLE_EPOCH},
        ),
        "subscribe": (
            "Follow more patterns. With `since_offset` (the last offset seen) and `epoch`, the events stored after "
            "it are replayed first, in order, then delivery goes on live with no gap and no duplicate.",
            _object(
                ["type", "event_types"],
                {
                    "type": _frame_type("subscribe"),
                    "event_types": _PATTERNS,
                    "since_offset": {**_OFFSET, "description": "replay what was stored after this offset"},
                    "epoch": {"type": "string", "description": "the epoch since_offset belongs to"},
                    "ref": _REF,
                },
            ),
            {"type": "subscribe", "event_types": ["messaging:>"], "since_offset": 120, "epoch": EXAMPLE_EPOCH},
        ),
        "subscribed": (
            "The answer to `subscribe`, before any replayed event. `recovered` (when resuming) says whether every "
            "event after since_offset could be replayed; false: delivery goes on live from head_offset.",
            _object(
                ["type", "event_types", "epoch", "head_offset"],
                {
                    "type": _frame_type("subscribed"),
                    "event_types": _PATTERNS,
                    "recovered": {"type": "boolean"},
                    "epoch": _STRING,
                    "head_offset": {**_OFFSET, "description": "the newest stored offset"},
                    "ref": _REF,
                },
            ),
            {
                "type": "subscribed",
                "event_types": ["messaging:>"],
                "recovered": True,
                "epoch": EXAMPLE_EPOCH,
                "head_offset": 164,
            },
        ),
        "unsubscribe": (
            "Stop following patterns.",
            _object(
                ["type", "event_types"], {"type": _frame_type("unsubscribe"), "event_types": _PATTERNS, "ref": _REF}
            ),
            {"type": "unsubscribe", "event_types": ["messaging:>"]},
        ),
        "unsubscribed": (
            "The answer to `unsubscribe`.",
            _object(
                ["type", "event_types"], {"type": _frame_type("unsubscribed"), "event_types": _PATTERNS, "ref": _REF}
            ),
            {"type": "unsubscribed", "event_types": ["messaging:>"]},
        ),
        "cancel": (
            "Cancel a stream this connection (or, with authentication, its user) started: it ends with "
            "`cancelled`. Closing the socket cancels them all.",
            _object(
                ["type", "correlation_id"],
                {
                    "type": _frame_type("cancel"),
                    "correlation_id": {"type": "string", "description": "the request's event_id"},
                    "reason": {"type": "string", "maxLength": 256},
                    "ref": _REF,
                },
            ),
            {"type": "cancel", "correlation_id": EXAMPLE_REQUEST_ID, "reason": "closed the view"},
        ),
        "ping": (
            "Application-level ping (the server also pings at the protocol level).",
            _object(["type"], {"type": _frame_type("ping"), "ref": _REF}),
            {"type": "ping", "ref": "p1"},
        ),
        "pong": (
            "The answer to `ping`.",
            _object(["type"], {"type": _frame_type("pong"), "ref": _REF}),
            {"type": "pong", "ref": "p1"},
        ),
        "published": (
            "A publish was stored: its event_id and offset (for a repeated event_id, the original's, "
            "`duplicate: true`). A request's lifecycle follows without a subscription.",
            _object(
                ["type", "event_id", "offset", "epoch", "event_type", "duplicate"],
                {
                    "type": _frame_type("published"),
                    "event_id": _STRING,
                    "offset": _OFFSET,
                    "epoch": _STRING,
                    "event_type": _STRING,
                    "duplicate": {"type": "boolean"},
                },
            ),
            {
                "type": "published",
                "event_id": EXAMPLE_REQUEST_ID,
                "offset": 165,
                "epoch": EXAMPLE_EPOCH,
                "event_type": "messaging:send_message:v1:requested",
                "duplicate": False,
            },
        ),
        "error": (
            "A frame the server could not act on, with a stable code; `ref` is the client's event_id or ref. The "
            f"connection stays open, except for {fatal} (code, then the WebSocket close code).",
            _object(
                ["type", "code", "message"],
                {
                    "type": _frame_type("error"),
                    "code": {"type": "string", "enum": codes},
                    "message": _STRING,
                    "ref": _REF,
                },
            ),
            {
                "type": "error",
                "code": "invalid_pattern",
                "message": "pattern 'places:>:x': '>' must be the last token",
                "ref": "s1",
            },
        ),
        "event": (
            "Any event matching the connection's patterns, or of a request it sent.",
            {"$ref": "#/components/schemas/Event"},
            _event_example("demo:tick:v1:happened", {"n": 1}, offset=166, correlation=False),
        ),
        "publish": (
            "Publish any event (a `requested` one is a request, see the handlers' operations).",
            {"$ref": "#/components/schemas/Publish"},
            {"type": "demo:tick:v1:happened", "payload": {"n": 1}, "event_id": "tick-1"},
        ),
    }
    return {
        name: {
            "name": name,
            "title": name,
            "summary": summary,
            "contentType": "application/json",
            "payload": schema,
            "examples": [{"name": name, "payload": example}],
        }
        for name, (summary, schema, example) in frames.items()
    }


def _first_line(spec: EventSpec) -> str:
    """The first line of an event's description (its type when it has none)."""
    lines = spec.description.strip().splitlines()
    return lines[0] if lines else spec.event_type


def _event_example(event_type: str, payload: Mapping[str, Any], *, offset: int, correlation: bool) -> dict[str, Any]:
    metadata = {"user_id": "alice"}
    if correlation:
        metadata["correlation_id"] = EXAMPLE_REQUEST_ID
    return {
        "type": event_type,
        "event_id": f"{offset:032x}",
        "payload": dict(payload),
        "metadata": metadata,
        "offset": offset,
        "epoch": EXAMPLE_EPOCH,
        "timestamp": EXAMPLE_TIME,
    }


def _event_message(spec: EventSpec, *, role: str, plugin: str, correlated: bool) -> dict[str, Any]:
    """One event's message: the event frame with its type and payload schema, and an example frame."""
    state = EventType.parse(spec.event_type).state
    if state == REQUESTED:
        envelope = "#/components/schemas/Publish"
        example: dict[str, Any] = {
            "type": spec.event_type,
            "event_id": EXAMPLE_REQUEST_ID,
            "payload": dict(spec.example),
        }
    else:
        envelope = "#/components/schemas/Event"
        example = _event_example(
            spec.event_type, spec.example, offset=0 if state == HEARTBEAT else 166, correlation=correlated
        )
    payload = {
        "allOf": [
            {"$ref": envelope},
            {"type": "object", "properties": {"type": _frame_type(spec.event_type), "payload": dict(spec.schema)}},
        ]
    }
    message: dict[str, Any] = {
        "name": spec.event_type,
        "title": spec.event_type,
        "summary": f"{role}: {_first_line(spec)}",
        "description": spec.description.strip(),
        "contentType": "application/json",
        "tags": [{"name": plugin}],
        "payload": payload,
        "examples": [{"name": message_id(spec.event_type), "payload": example}],
    }
    if state == REQUESTED:
        message["correlationId"] = {"$ref": "#/components/correlationIds/request"}
    elif correlated:
        message["correlationId"] = {"$ref": "#/components/correlationIds/lifecycle"}
    return message


def _handler_operations(handler: HandlerEvents, messages: dict[str, Any]) -> dict[str, Any]:
    """The ``send`` of a handler's request and the ``receive`` of its lifecycle; adds their messages."""
    request = handler.request
    plugin = handler.plugin
    request_id = message_id(request.event_type)
    messages[request_id] = _event_message(request, role="request", plugin=plugin, correlated=False)
    lifecycle_ids = []
    for spec in handler.lifecycle:
        mid = message_id(spec.event_type)
        messages[mid] = _event_message(spec, role="lifecycle", plugin=plugin, correlated=True)
        lifecycle_ids.append(mid)
    kind = ", ".join(note.replace("`", "") for note in handler.notes)
    summary = handler.summary or f"The handler of {handler.base}."
    base_id = message_id(handler.base)
    return {
        base_id: {
            "action": "send",
            "channel": _CHANNEL_REF,
            "title": f"Request {handler.base}",
            "summary": summary,
            "description": f"{summary} ({kind}). Its lifecycle events carry metadata.correlation_id = the "
            f"request's event_id and reach the requesting connection without a subscription.",
            "tags": [{"name": plugin}],
            "messages": [_message_ref(request_id)],
            "reply": {"channel": _CHANNEL_REF, "messages": [_message_ref("published")]},
        },
        f"{base_id}.lifecycle": {
            "action": "receive",
            "channel": _CHANNEL_REF,
            "title": f"Lifecycle of {handler.base}",
            "summary": "started, stream chunks and heartbeats, then one terminal event"
            if handler.streaming
            else "one terminal event",
            "tags": [{"name": plugin}],
            "messages": [_message_ref(mid) for mid in lifecycle_ids],
        },
    }


def _message_ref(mid: str) -> dict[str, str]:
    return {"$ref": f"#/channels/{CHANNEL}/messages/{mid}"}


def _control_operations() -> dict[str, Any]:
    def op(action: str, title: str, message: str, reply: str | None = None) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "action": action,
            "channel": _CHANNEL_REF,
            "title": title,
            "tags": [{"name": "protocol"}],
            "messages": [_message_ref(message)],
        }
        if reply is not None:
            operation["reply"] = {"channel": _CHANNEL_REF, "messages": [_message_ref(reply)]}
        return operation

    return {
        "connect": op("receive", "The connection frame", "connection"),
        "subscribe": op("send", "Subscribe to patterns", "subscribe", "subscribed"),
        "unsubscribe": op("send", "Unsubscribe", "unsubscribe", "unsubscribed"),
        "cancel": op("send", "Cancel a stream", "cancel"),
        "ping": op("send", "Ping", "ping", "pong"),
        "publish": op("send", "Publish an event", "publish", "published"),
        "receiveEvents": op("receive", "Receive events", "event"),
        "receiveErrors": op("receive", "Receive errors", "error"),
    }


def asyncapi_document(
    handlers: Iterable[HandlerClass], *, host: str = "127.0.0.1:8080", tls: bool = False
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of a gateway at ``host`` (``host:port``) whose server runs ``handlers``."""
    messages: dict[str, Any] = _control_messages()
    operations: dict[str, Any] = _control_operations()
    tags = [{"name": "protocol", "description": "the WebSocket protocol's control frames"}]
    side: dict[str, tuple[EventSpec, str]] = {}
    for plugin, group in handler_events(handlers).items():
        tags.append({"name": plugin, "description": f"the {plugin} plugin's events"})
        for handler in group:
            operations.update(_handler_operations(handler, messages))
            for spec in handler.side_events:
                side.setdefault(spec.event_type, (spec, plugin))
    for event_type, (spec, plugin) in sorted(side.items()):
        mid = message_id(event_type)
        if mid in messages:
            continue  # another handler's lifecycle event, already described
        messages[mid] = _event_message(spec, role="event", plugin=plugin, correlated=False)
        operations[mid] = {
            "action": "receive",
            "channel": _CHANNEL_REF,
            "title": event_type,
            "summary": _first_line(spec),
            "tags": [{"name": plugin}],
            "messages": [_message_ref(mid)],
        }
    protocol = "wss" if tls else "ws"
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Nexus WebSocket gateway",
            "version": __version__,
            "description": (
                f"Events `<service>:<action>:v<N>:<state>` over one WebSocket, `{protocol}://{host}/ws`, offering "
                f"the subprotocol `{SUBPROTOCOL}`; every frame is one JSON object. Subscribe with patterns, resume "
                "after the last offset seen, publish events, and send requests to the handlers listed here: each "
                "request's lifecycle comes back on the same connection."
            ),
            "tags": tags,
        },
        "defaultContentType": "application/json",
        "servers": {
            "gateway": {
                "host": host,
                "protocol": protocol,
                "description": "The gateway of a Nexus server (`nexus serve`, or `nexus gateway` for a remote one).",
                "security": [{"$ref": "#/components/securitySchemes/token"}],
            }
        },
        "channels": {
            CHANNEL: {
                "address": "/ws",
                "title": "The gateway's WebSocket",
                "description": "Every frame the protocol knows, both ways.",
                "servers": [{"$ref": "#/servers/gateway"}],
                "messages": {mid: {"$ref": f"#/components/messages/{mid}"} for mid in messages},
                "bindings": {
                    "ws": {
                        "query": _object(
                            [],
                            {"token": {"type": "string", "description": "a JWT, when authentication is on"}},
                        ),
                        "bindingVersion": "0.1.0",
                    }
                },
            }
        },
        "operations": operations,
        "components": {
            "schemas": _schemas(),
            "messages": messages,
            "correlationIds": {
                "request": {"description": "A request's event_id.", "location": "$message.payload#/event_id"},
                "lifecycle": {
                    "description": "The event_id of the request this lifecycle event belongs to.",
                    "location": "$message.payload#/metadata/correlation_id",
                },
            },
            "securitySchemes": {
                "token": {
                    "type": "httpApiKey",
                    "name": "token",
                    "in": "query",
                    "description": "With authentication on: a JWT in the `token` query parameter, or as a "
                    f"Sec-WebSocket-Protocol entry after `{SUBPROTOCOL}`. Without it, no token is needed.",
                }
            },
        },
    }


def render_asyncapi(handlers: Iterable[HandlerClass], *, host: str = "127.0.0.1:8080", tls: bool = False) -> str:
    """:func:`asyncapi_document` as indented JSON text, ending with a newline."""
    document = asyncapi_document(handlers, host=host, tls=tls)
    return json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
