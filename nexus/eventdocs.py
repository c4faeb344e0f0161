"""Renders the events plugins declare (``takes`` / ``emits``) as Markdown: ``docs/events.md``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from nexus.api import EventHandler, StreamingEventHandler
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


def _plugin_of(cls: HandlerClass) -> str:
    return cls.event_type.split(":", 1)[0]


def render_events(handlers: Iterable[HandlerClass]) -> str:
    """Markdown for every handler's declared events, grouped by plugin (service) and handler."""
    by_plugin: dict[str, list[HandlerClass]] = {}
    for cls in handlers:
        by_plugin.setdefault(_plugin_of(cls), []).append(cls)
    parts = [HEADER]
    for plugin in sorted(by_plugin):
        parts.append(f"## {plugin}\n")
        for cls in sorted(by_plugin[plugin], key=lambda c: c.event_type):
            kind = "streaming" if issubclass(cls, StreamingEventHandler) else "plain"
            notes: list[str] = [kind]
            if cls.ordering_key:
                notes.append(f"ordered by `{cls.ordering_key}`")
            timeout: Any = cls.stream_timeout
            if timeout is None:
                notes.append("runs until cancelled")
            elif isinstance(timeout, (int, float)):
                notes.append(f"timeout {timeout:g} s")
            parts.append(f"### `{cls.event_type}` ({', '.join(notes)})\n")
            doc = (cls.__doc__ or "").strip()
            if doc:
                parts.append(doc.split("\n\n", 1)[0].replace("\n", " ") + "\n")
            if cls.takes is not None:
                parts.append(render_spec(cls.takes, "takes"))
            for spec in cls.emits:
                parts.append(render_spec(spec, "emits"))
    return "\n".join(parts).rstrip() + "\n"
