"""docs/events.md is generated from the schemas the built-in plugins declare, and agrees with them."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexus.eventdocs import HandlerClass, render_events
from nexus.plugins import discover

ROOT = Path(__file__).resolve().parent.parent
BUILT_IN = "nexus.handlers."


def _built_in_handlers() -> list[HandlerClass]:
    specs = discover(True, (), ())
    return [type(s.handler) for s in specs if type(s.handler).__module__.startswith(BUILT_IN)]


def test_events_doc_matches_the_declared_schemas() -> None:
    """docs/events.md is exactly what `nexus docs events` renders from the built-in plugins' declarations."""
    handlers = _built_in_handlers()
    if not handlers:
        pytest.fail("no built-in plugin is registered through the nexus.handlers entry points")
    expected = render_events(handlers)
    actual = (ROOT / "docs" / "events.md").read_text()
    assert actual == expected, "docs/events.md is out of date: run `nexus docs events -o docs/events.md`"


def test_every_built_in_handler_declares_what_it_takes_and_emits() -> None:
    """Each built-in handler documents its request schema and at least one event it emits, with examples."""
    handlers = _built_in_handlers()
    assert len(handlers) >= 19, "the built-in plugins' handlers are not all registered"
    for cls in handlers:
        assert cls.takes is not None, cls
        assert cls.emits, cls
        for spec in (cls.takes, *cls.emits):
            assert spec.example_errors() == [], spec.event_type
            assert spec.description.strip(), spec.event_type
