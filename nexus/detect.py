"""Which event types are streaming events. Pure: no I/O, no asyncio.

A rule is written as text so it can live in a config file:

- ``action_prefix:<prefix>``: the action token starts with ``<prefix>`` (default ``stream_``);
- ``contains:<text>``: the event type contains ``<text>`` (defaults ``:stream:``, ``:typing:``,
  ``:presence:``, ``:chunks:``, ``:live:``, ``:realtime:``);
- ``action:<name>``: the action token is exactly ``<name>``.

The rules decide which lifecycle a ``requested`` event gets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Final

from nexus.errors import InvalidArgument

DEFAULT_RULES: Final[tuple[str, ...]] = (
    "action_prefix:stream_",
    "contains::stream:",
    "contains::typing:",
    "contains::presence:",
    "contains::chunks:",
    "contains::live:",
    "contains::realtime:",
)

_KINDS: Final = ("action_prefix", "contains", "action")


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """One detection rule."""

    kind: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Rule:
        """Parse ``kind:value``; raise :class:`InvalidArgument` for an unknown kind or empty value."""
        kind, sep, value = text.partition(":")
        if not sep or kind not in _KINDS or not value:
            raise InvalidArgument(
                f"invalid streaming rule {text!r}: expected one of " + ", ".join(f"'{k}:<text>'" for k in _KINDS)
            )
        return cls(kind, value)

    def matches(self, event_type: str) -> bool:
        """Whether ``event_type`` (or ``service:action`` / ``service:action:vN``) falls under this rule."""
        tokens = event_type.split(":")
        action = tokens[1] if len(tokens) > 1 else ""
        if self.kind == "action_prefix":
            return action.startswith(self.value)
        if self.kind == "action":
            return action == self.value
        return self.value in event_type

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


class StreamingDetector:
    """Decides whether an event type is a streaming event."""

    def __init__(self, rules: Iterable[str] = DEFAULT_RULES) -> None:
        self.rules: Sequence[Rule] = tuple(Rule.parse(rule) for rule in rules)

    def rule_for(self, event_type: str) -> Rule | None:
        """The first rule that makes ``event_type`` a streaming event, or None."""
        for rule in self.rules:
            if rule.matches(event_type):
                return rule
        return None

    def is_streaming(self, event_type: str) -> bool:
        """Whether ``event_type`` is a streaming event."""
        return self.rule_for(event_type) is not None

    def check_requested(self, service_action: str) -> Rule | None:
        """The rule that makes requests to ``service:action[:vN]`` streaming, or None.

        A handler is registered by ``service:action``; its requests look like ``service:action:vN:requested``.
        ``contains`` rules are checked against that full shape with version ``v1`` when none is given.
        """
        tokens = service_action.split(":")
        probe = service_action if len(tokens) >= 3 else f"{service_action}:v1"
        return self.rule_for(f"{probe}:requested")
