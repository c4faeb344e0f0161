"""Declared event schemas: validation messages, field tables and the Markdown they render to."""

from __future__ import annotations

from typing import Any

import pytest

from nexus import Event, EventHandler, InvalidPayload
from nexus.eventdocs import render_events
from nexus.schema import EventSpec, spec_fields

POINT = EventSpec(
    "places:track_location:v1:requested",
    "One GPS fix.",
    {
        "type": "object",
        "required": ["agent_id", "latitude"],
        "properties": {
            "agent_id": {"type": "string", "minLength": 1, "description": "Who moved."},
            "latitude": {"type": "number", "minimum": -90, "maximum": 90, "description": "Degrees."},
            "tags": {"type": "object", "properties": {"zone": {"type": "string", "description": "A zone."}}},
            "mode": {"enum": ["walk", "ride"]},
        },
    },
    example={"agent_id": "a1", "latitude": 52.5},
)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"latitude": 1}, "payload: 'agent_id' is a required property"),
        ({"agent_id": "a", "latitude": 91}, "payload.latitude: 91 is greater than the maximum of 90"),
        ({"agent_id": 7, "latitude": 1}, "payload.agent_id: 7 is not of type 'string'"),
        ({"agent_id": "a", "latitude": 1, "tags": {"zone": 3}}, "payload.tags.zone: 3 is not of type 'string'"),
    ],
)
def test_validation_names_the_field_and_the_problem(payload: dict[str, Any], message: str) -> None:
    """A payload that does not fit is refused with the event type, the field path and what is wrong."""
    with pytest.raises(InvalidPayload) as caught:
        POINT.validate(payload)
    assert caught.value.message == f"places:track_location:v1:requested {message}"


def test_fitting_payload_passes_and_whole_floats_count_as_integers() -> None:
    """A payload that fits passes; 10.0 is accepted where an integer is wanted, as JSON cannot tell them apart."""
    POINT.validate({"agent_id": "a", "latitude": 0})
    spec = EventSpec("a:b:v1:requested", "n", {"type": "object", "properties": {"n": {"type": "integer"}}})
    spec.validate({"n": 10.0})
    with pytest.raises(InvalidPayload):
        spec.validate({"n": 10.5})


def test_spec_refuses_a_bad_type_or_schema() -> None:
    """An EventSpec with a malformed event type or an invalid JSON Schema fails when declared."""
    with pytest.raises(Exception, match="invalid event type"):
        EventSpec("Places:x", "bad", {"type": "object"})
    with pytest.raises(Exception, match="is not valid"):
        EventSpec("a:b:v1:requested", "bad", {"type": "no-such-type"})


def test_example_errors_report_an_example_that_does_not_fit() -> None:
    """A spec whose example contradicts its schema says so."""
    spec = EventSpec("a:b:v1:requested", "x", {"type": "object", "required": ["n"]}, example={})
    assert spec.example_errors() == ["a:b:v1:requested payload: 'n' is a required property"]
    assert POINT.example_errors() == []


def test_field_rows_flatten_nested_objects() -> None:
    """The field table lists nested fields with dotted names, their types, required flags and descriptions."""
    assert spec_fields(POINT.schema) == [
        ("agent_id", "string", True, "Who moved."),
        ("latitude", "number", True, "Degrees."),
        ("tags", "object", False, ""),
        ("tags.zone", "string", False, "A zone."),
        ("mode", '"walk" | "ride"', False, ""),
    ]


class _Track(EventHandler):
    """Tracks agents.

    More detail that stays out of the summary.
    """

    event_type = "places:track_location"
    ordering_key = "agent_id"
    takes = POINT
    emits = (
        EventSpec(
            "places:track_location:v1:success",
            "The state.",
            {"type": "object", "properties": {"state": {"type": "string", "description": "moving | dwelling"}}},
            example={"state": "moving"},
        ),
    )

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"state": "moving"}


def test_markdown_lists_each_event_with_fields_and_example() -> None:
    """The rendered Markdown has a section per plugin and handler, each event's field table and example."""
    text = render_events([_Track])
    assert "## places" in text
    assert "### `places:track_location` (plain, ordered by `agent_id`, timeout" not in text
    assert "### `places:track_location` (plain, ordered by `agent_id`)" in text
    assert "Tracks agents." in text
    assert "More detail" not in text
    assert "#### `places:track_location:v1:requested` (takes)" in text
    assert "| `agent_id` | string | yes | Who moved. |" in text
    assert "#### `places:track_location:v1:success` (emits)" in text
    assert '"state": "moving"' in text
