"""What plugins declare: the events a handler takes and emits, and the settings its plugin reads.

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

A plugin declares its settings the same way, as :class:`ConfigKey` entries in ``config_keys``::

    class Monitor(EventHandler):
        event_type = "pumps:monitor"
        config_keys = (ConfigKey("window", int, 100, "Readings per window."),)

At start-up every key of the plugin's ``[handlers.<plugin>]`` section is checked against what its handlers
declare: an unknown key, or a value of the wrong type, stops the server naming it (with the closest declared
key). ``nexus handlers --config FILE`` shows each handler's effective settings: the declared defaults, overlaid
with the file's values. Ranges and other rules stay where the plugin reads the value (``read_int``, ...).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any, Final

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


CONFIG_TYPES: Final[dict[type, str]] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a table",
}
"""The types a :class:`ConfigKey` may declare, with how an error names them."""


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One setting of a plugin's ``[handlers.<plugin>]`` section: its name, type, default and meaning.

    ``kind`` is ``bool``, ``int`` (a whole number; ``10.0`` counts), ``float`` (any finite number), ``str``,
    ``list`` or ``dict`` (a table). ``default`` is what the plugin uses when the key is not set (None: nothing,
    the key is optional).
    """

    name: str
    kind: type
    default: Any
    description: str

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "a").isalnum() or not self.name[0].isalpha():
            raise ValueError(f"a config key name is letters, digits and '_', starting with a letter: {self.name!r}")
        if self.kind not in CONFIG_TYPES:
            allowed = ", ".join(kind.__name__ for kind in CONFIG_TYPES)
            raise ValueError(f"config key {self.name!r}: kind must be one of {allowed}, not {self.kind!r}")
        if self.default is not None and self.problem(self.default) is not None:
            raise ValueError(f"config key {self.name!r}: the default {self.default!r} is not {self.type_label}")

    @classmethod
    def from_dataclass(cls, settings: type, descriptions: Mapping[str, str] | None = None) -> tuple[ConfigKey, ...]:
        """One key per field of the dataclass ``settings`` (its name, annotated type and default): for a plugin
        that reads its section into such a class. ``descriptions`` gives fields a meaning (default: none)."""
        hints = typing.get_type_hints(settings)
        keys = []
        for field in dataclasses.fields(settings):
            kind = typing.get_origin(hints[field.name]) or hints[field.name]
            default = field.default if field.default is not dataclasses.MISSING else None
            keys.append(cls(field.name, kind, default, (descriptions or {}).get(field.name, "")))
        return tuple(keys)

    @property
    def type_label(self) -> str:
        """``an integer``, ``a string``, ...: what the value must be."""
        return CONFIG_TYPES[self.kind]

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this key's type, or None when it fits."""
        fits: bool
        if self.kind is bool:
            fits = isinstance(value, bool)
        elif self.kind is int:
            fits = not isinstance(value, bool) and (
                isinstance(value, int) or (isinstance(value, float) and value.is_integer())
            )
        elif self.kind is float:
            fits = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        else:
            fits = isinstance(value, self.kind)
        return None if fits else f"must be {self.type_label}, got {value!r}"
