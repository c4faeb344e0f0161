"""What handlers declare about their events, and its Markdown rendering (``docs/events.md``).

:class:`HandlerEvents` reads one handler class: its kind, its request type, the schemas it declares (``takes`` /
``emits``) and the lifecycle its requests get (:mod:`nexus.lifecycle`), each event as an
:class:`~nexus.schema.EventSpec`. The Markdown catalogue (:func:`render_events`, ``nexus docs events``) and the
AsyncAPI document (:mod:`nexus.asyncapi`, ``nexus docs asyncapi``) are both built from it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

from nexus.api import EventHandler, StreamingEventHandler
from nexus.errors import StreamErrorType
from nexus.events import (
    CANCELLED,
    FAILED,
    HEARTBEAT,
    REQUESTED,
    STARTED,
    STREAM,
    SUCCESS,
    TIMEOUT,
    EventType,
)
from nexus.schema import EventSpec, spec_fields

HandlerClass = type[EventHandler] | type[StreamingEventHandler]
HEADER = """# Events of the built-in plugins

Generated from the schemas the plugins declare (`takes` and `emits`); `nexus docs events` writes this file
and a test fails when the two disagree. Every request also gets its lifecycle: streaming
requests `started` → `stream`* (+ `heartbeat`) → one terminal event; plain requests `success` or `failed`.
A payload that does not fit the request's schema ends with `failed` (`error.type = "invalid_payload"`) and a
message naming the field. Times are read as RFC 3339 text or epoch seconds; a field documented as
`integer` also accepts a whole number written `10.0`.
"""


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_spec(spec: EventSpec, role: str) -> str:
    """One event as a Markdown section: description, field table, example."""
    lines = [f"#### `{spec.event_type}` ({role})", "", spec.description.strip(), ""]
    rows = spec_fields(spec.schema)
    if rows:
        lines += ["| field | type | required | description |", "| --- | --- | --- | --- |"]
        for name, kind, required, description in rows:
            lines.append(f"| `{name}` | {_escape(kind)} | {'yes' if required else 'no'} | {_escape(description)} |")
    else:
        lines.append("Payload: an empty object.")
    lines += ["", "```json", json.dumps(dict(spec.example), indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(lines)


_OBJECT: Final = {"type": "object"}
_COUNT: Final = {"type": "integer", "minimum": 0, "description": "chunks the stream sent"}
_DURATION: Final = {"type": "number", "minimum": 0, "description": "seconds since the stream started"}
_ERROR_TYPES: Final = ", ".join(f"`{t.value}`" for t in StreamErrorType)


def _schema(required: Iterable[str], **properties: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": dict(properties)}


@dataclasses.dataclass(frozen=True)
class HandlerEvents:
    """The events of one handler class: the request it takes, its lifecycle and its side events."""

    cls: HandlerClass

    @property
    def streaming(self) -> bool:
        return issubclass(self.cls, StreamingEventHandler)

    @property
    def plugin(self) -> str:
        """The service token of its event type (``messaging`` for ``messaging:send_message``)."""
        return self.cls.event_type.split(":", 1)[0]

    @functools.cached_property
    def base(self) -> str:
        """``service:action:vN`` of its requests: the declared request's version, or the pinned one, or v1 (a
        handler of every version is documented at v1)."""
        if self.cls.takes is not None:
            return EventType.parse(self.cls.takes.event_type).base
        tokens = self.cls.event_type.split(":")
        return self.cls.event_type if len(tokens) == 3 else f"{self.cls.event_type}:v1"

    @property
    def notes(self) -> list[str]:
        """``streaming`` / ``plain``, its ordering key and its timeout, as the catalogue states them."""
        notes = ["streaming" if self.streaming else "plain"]
        if self.cls.ordering_key:
            notes.append(f"ordered by `{self.cls.ordering_key}`")
        timeout: Any = self.cls.stream_timeout
        if timeout is None:
            notes.append("runs until cancelled")
        elif isinstance(timeout, (int, float)):
            notes.append(f"timeout {timeout:g} s")
        return notes

    @property
    def summary(self) -> str:
        """The first paragraph of the class's docstring, on one line."""
        doc = (self.cls.__doc__ or "").strip()
        return doc.split("\n\n", 1)[0].replace("\n", " ") if doc else ""

    @property
    def request(self) -> EventSpec:
        """The ``requested`` event: as declared (``takes``), or any JSON object."""
        if self.cls.takes is not None:
            return self.cls.takes
        return EventSpec(f"{self.base}:{REQUESTED}", "A request; the handler declares no schema for it.", _OBJECT)

    @functools.cached_property
    def lifecycle(self) -> list[EventSpec]:
        """Every event a request of this handler may get after ``requested``, in lifecycle order; a ``stream`` or
        ``success`` payload the handler declares in ``emits`` replaces the generic one."""
        declared = {spec.event_type: spec for spec in self.cls.emits}
        states = (
            [STARTED, STREAM, HEARTBEAT, SUCCESS, FAILED, TIMEOUT, CANCELLED]
            if self.streaming
            else [SUCCESS, FAILED, TIMEOUT, CANCELLED]
        )
        if self.cls.stream_timeout is None:
            states.remove(TIMEOUT)
        specs = []
        for state in states:
            event_type = f"{self.base}:{state}"
            specs.append(declared.get(event_type) or self._generic(state))
        return specs

    @property
    def side_events(self) -> list[EventSpec]:
        """The events it declares that are not part of its requests' lifecycle (``places:encounter:v1:started``)."""
        lifecycle = {spec.event_type for spec in self.lifecycle}
        return [spec for spec in self.cls.emits if spec.event_type not in lifecycle]

    def _generic(self, state: str) -> EventSpec:
        event_type = f"{self.base}:{state}"
        stream_stats = {"stream_count": _COUNT, "duration_s": _DURATION}
        if state == STARTED:
            return EventSpec(event_type, "The stream started; its chunks follow.", {**_OBJECT, "maxProperties": 0})
        if state == STREAM:
            return EventSpec(event_type, "One chunk the handler sent, in order.", _OBJECT)
        if state == HEARTBEAT:
            elapsed = {"type": "number", "minimum": 0, "description": "seconds since the stream started"}
            schema = _schema(["stream_count", "elapsed_s"], stream_count=_COUNT, elapsed_s=elapsed)
            description = (
                "Sent every heartbeat interval while the stream lives; delivered live only (offset 0, never stored "
                "or replayed)."
            )
            return EventSpec(event_type, description, schema, example={"stream_count": 2, "elapsed_s": 1.0})
        if state == SUCCESS and self.streaming:
            schema = _schema(["stream_count", "duration_s"], **stream_stats)
            return EventSpec(event_type, "The stream ended by itself.", schema, {"stream_count": 3, "duration_s": 1.5})
        if state == SUCCESS:
            return EventSpec(event_type, "The handler's result.", _OBJECT)
        if state == FAILED:
            error = _schema(
                ["type", "message"],
                type={"type": "string", "description": f"a stable code: {_ERROR_TYPES}"},
                message={"type": "string", "description": "what went wrong"},
            )
            extra = stream_stats if self.streaming else {}
            example: dict[str, Any] = {"error": {"type": "handler_error", "message": "ValueError: n must be positive"}}
            return EventSpec(event_type, "The request failed.", _schema(["error"], error=error, **extra), example)
        if state == TIMEOUT:
            limit = {"type": "number", "minimum": 0, "description": "the timeout it outlived, in seconds"}
            schema = _schema(["stream_count", "duration_s", "timeout_s"], **stream_stats, timeout_s=limit)
            example = {"stream_count": 0, "duration_s": 30.0, "timeout_s": 30.0}
            return EventSpec(event_type, "The request outlived its timeout.", schema, example)
        reason = {"type": "string", "description": "who or what cancelled it"}
        schema = _schema(["stream_count", "duration_s", "reason"], **stream_stats, reason=reason)
        description = "The requester cancelled it or disconnected, or the server shut down."
        example = {"stream_count": 1, "duration_s": 0.4, "reason": "cancelled by requester"}
        return EventSpec(event_type, description, schema, example)


def handler_events(handlers: Iterable[HandlerClass]) -> dict[str, list[HandlerEvents]]:
    """The handlers grouped by plugin (service), both sorted: plugins by name, handlers by event type."""
    by_plugin: dict[str, list[HandlerEvents]] = {}
    for cls in handlers:
        events = HandlerEvents(cls)
        by_plugin.setdefault(events.plugin, []).append(events)
    return {plugin: sorted(by_plugin[plugin], key=lambda h: h.cls.event_type) for plugin in sorted(by_plugin)}


def render_events(handlers: Iterable[HandlerClass]) -> str:
    """Markdown for every handler's declared events, grouped by plugin (service) and handler."""
    parts = [HEADER]
    for plugin, group in handler_events(handlers).items():
        parts.append(f"## {plugin}\n")
        for handler in group:
            cls = handler.cls
            parts.append(f"### `{cls.event_type}` ({', '.join(handler.notes)})\n")
            if handler.summary:
                parts.append(handler.summary + "\n")
            if cls.takes is not None:
                parts.append(render_spec(cls.takes, "takes"))
            for spec in cls.emits:
                parts.append(render_spec(spec, "emits"))
    return "\n".join(parts).rstrip() + "\n"
