"""Each agent's current state, as the bus last told it (places plugin). Pure.

Fed with the ``places:location:v1:updated`` events (every accepted fix: its time and position, the agent's
state after it, the open encounter and its place) and the ``places:encounter:v1:completed`` events (an agent
forgotten for being idle or evicted has its encounter completed without a new fix). Whichever node placed a
fix, every node that follows the bus answers the same.

Memory: at most ``max_agents`` agents (least recently updated forgotten first), one fixed-size
:class:`AgentState` each.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from .staypoints import DWELLING, MOVING


@dataclasses.dataclass(frozen=True, slots=True)
class AgentState:
    """What is known of an agent: its last accepted fix and what it was doing after it."""

    agent_id: str
    last_fix_time: float
    latitude: float
    longitude: float
    state: str
    """``"moving"`` or ``"dwelling"``."""
    encounter_id: str | None
    place_id: str | None

    @property
    def dwelling(self) -> bool:
        return self.state == DWELLING


class AgentStates:
    """The last known state of at most ``max_agents`` agents."""

    def __init__(self, max_agents: int = 100_000) -> None:
        if max_agents < 1:
            raise ValueError(f"max_agents must be at least 1, got {max_agents!r}")
        self.max_agents = max_agents
        self._agents: OrderedDict[str, AgentState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._agents)

    def get(self, agent_id: str) -> AgentState | None:
        return self._agents.get(agent_id)

    def located(self, state: AgentState) -> None:
        """An accepted fix: the agent's state after it. An older fix than the one known changes nothing."""
        known = self._agents.get(state.agent_id)
        if known is not None and state.last_fix_time < known.last_fix_time:
            return
        self._agents[state.agent_id] = state
        self._agents.move_to_end(state.agent_id)
        while len(self._agents) > self.max_agents:
            self._agents.popitem(last=False)

    def completed(self, agent_id: str, encounter_id: str) -> None:
        """An encounter ended without a fix (the agent was forgotten): the agent is no longer dwelling there."""
        known = self._agents.get(agent_id)
        if known is not None and known.encounter_id == encounter_id:
            self._agents[agent_id] = dataclasses.replace(known, state=MOVING, encounter_id=None, place_id=None)
