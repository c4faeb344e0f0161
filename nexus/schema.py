"""Event schemas plugins declare: what a handler takes and what it emits, for validation and documentation.

A handler declares the request it takes and every event it publishes::

    class TrackLocation(EventHandler):
        event_type = "places:track_location"
        takes = EventSpec(
            "places:track_location:v1:requested",
            "One GPS fix of an agent.",
            {"type": "object", "required": ["agent_id"], "properties": {"agent_id": {"type": "string"}}},
            example={"agent_id": "a1"},
        )
        emits = (EventSpec("places:track_location:v1:success", "The agent's state.", {...}, example={...}),)

The provider validates a request's payload against ``takes.schema`` before the handler runs: a payload that
does not fit ends with ``failed`` / ``invalid_payload`` and a message naming the field. ``nexus docs events``
renders every declared event as Markdown (``docs/events.md``). Schemas are JSON Schema (draft 2020-12).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from nexus.errors import InvalidPayload
from nexus.events import EventType, JSONObject

_Validator = jsonschema.validators.Draft202012Validator


@dataclasses.dataclass(frozen=True)
class EventSpec:
    """One event a plugin takes or emits: its type, what it means, its payload schema and an example."""

    event_type: str
    description: str
    schema: Mapping[str, Any]
    example: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    validator: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        EventType.parse(self.event_type)
        _Validator.check_schema(dict(self.schema))
        compiled = _Validator(dict(self.schema), format_checker=_Validator.FORMAT_CHECKER)
        object.__setattr__(self, "validator", compiled)

    def validate(self, payload: JSONObject) -> None:
        """Raise :class:`InvalidPayload` naming the first field that does not fit the schema."""
        error = jsonschema.exceptions.best_match(self.validator.iter_errors(payload))
        if error is not None:
            raise InvalidPayload(describe_error(self.event_type, error))

    def example_errors(self) -> list[str]:
        """Problems of the example against the schema (empty when it fits)."""
        return [describe_error(self.event_type, e) for e in self.validator.iter_errors(dict(self.example))]


def describe_error(event_type: str, error: jsonschema.exceptions.ValidationError) -> str:
    """A one-line message: ``<event type> payload.field: what is wrong``."""
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
    return f"{event_type} payload{path}: {error.message}"


def spec_fields(schema: Mapping[str, Any]) -> list[tuple[str, str, bool, str]]:
    """``(name, type, required, description)`` rows for a payload schema, nested objects flattened."""
    rows: list[tuple[str, str, bool, str]] = []
    _collect_fields(schema, "", rows, parent_required=True)
    return rows


def _type_label(schema: Mapping[str, Any]) -> str:
    if "enum" in schema:
        return " | ".join(repr(v) if not isinstance(v, str) else f'"{v}"' for v in schema["enum"])
    if "const" in schema:
        return repr(schema["const"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(str(k) for k in kind)
    if kind == "array":
        items = schema.get("items")
        return f"array of {_type_label(items)}" if isinstance(items, Mapping) else "array"
    if kind is None and "anyOf" in schema:
        return " | ".join(_type_label(option) for option in schema["anyOf"])
    if kind is None and "oneOf" in schema:
        return " | ".join(_type_label(option) for option in schema["oneOf"])
    return str(kind or "any")


def _collect_fields(
    schema: Mapping[str, Any], prefix: str, rows: list[tuple[str, str, bool, str]], *, parent_required: bool
) -> None:
    required = set(schema.get("required", ()))
    for name, sub in (schema.get("properties") or {}).items():
        full = f"{prefix}{name}"
        is_required = parent_required and name in required
        rows.append((full, _type_label(sub), is_required, str(sub.get("description", ""))))
        if sub.get("type") == "object" and sub.get("properties"):
            _collect_fields(sub, f"{full}.", rows, parent_required=is_required)
        items = sub.get("items")
        if sub.get("type") == "array" and isinstance(items, Mapping) and items.get("properties"):
            _collect_fields(items, f"{full}[].", rows, parent_required=is_required)
