"""An agent's current state (places plugin), kept from the bus's location and encounter events, tested synchronously."""

from __future__ import annotations

import pytest
from gps_trace import STOP_A, T0
from nexus.handlers.places.agents import AgentState, AgentStates


def at(agent: str, time: float, state: str = "moving", encounter: str | None = None) -> AgentState:
    return AgentState(agent, time, *STOP_A, state, encounter, "p1" if encounter else None)


def test_the_latest_fix_is_the_agents_state_and_an_older_one_changes_nothing() -> None:
    """located() keeps the state after the latest fix; a fix older than it (another node, replay) is ignored."""
    states = AgentStates()
    states.located(at("a", T0 + 60, "dwelling", "e1"))
    states.located(at("a", T0 + 30))
    now = states.get("a")
    assert now is not None
    assert (now.last_fix_time, now.dwelling, now.encounter_id, now.place_id) == (T0 + 60, True, "e1", "p1")
    assert states.get("b") is None


def test_an_encounter_completed_without_a_fix_ends_the_dwelling() -> None:
    """An idle or evicted agent's completed encounter makes it moving; another encounter's completion does not."""
    states = AgentStates()
    states.located(at("a", T0, "dwelling", "e2"))
    states.completed("a", "e1")
    assert states.get("a") == at("a", T0, "dwelling", "e2")
    states.completed("a", "e2")
    assert states.get("a") == at("a", T0)
    states.completed("nobody", "e2")
    assert len(states) == 1


def test_at_most_max_agents_are_kept_the_least_recently_updated_forgotten() -> None:
    """With max_agents 2, a third agent forgets the one updated longest ago."""
    states = AgentStates(2)
    states.located(at("a", T0))
    states.located(at("b", T0))
    states.located(at("a", T0 + 1))
    states.located(at("c", T0))
    assert (states.get("a") is not None, states.get("b"), states.get("c") is not None) == (True, None, True)
    with pytest.raises(ValueError, match="max_agents"):
        AgentStates(0)
