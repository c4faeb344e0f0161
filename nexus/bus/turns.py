"""Fair turns between publishers and subscribers on one event loop.

A bus whose publish stores in memory never really awaits: a publisher in a tight loop (a handler publishing
thousands of events, a ``PublishEvents`` stream, many concurrent ``EmitEvent`` calls) would keep the event loop
to itself, and every subscriber's queue would overflow before it ever got a turn to write. :class:`PublishTurns`
is what such a bus awaits after each publish:

- every ``budget`` publishes since the bus last delivered, the publisher yields once: the bus's delivery runs
  and every subscriber it woke gets a turn;
- while a subscriber's backlog is over its high-water mark (:attr:`Subscription.high_water
  <nexus.bus.base.Subscription.high_water>`), the publisher keeps yielding until it drains, as long as that
  subscriber makes progress (takes events). A subscriber that makes none for ``stall_s`` seconds (its client
  stopped reading, or the publisher is its own reader) is no longer waited for until it has drained: it is cut
  off as too slow when its queue overflows, and the others carry on.

So a subscriber that keeps reading keeps up with any publisher on its event loop, and one that stops reading
holds publishers up once, for at most ``stall_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

from nexus.bus.base import Fanout, Subscription

PUBLISH_BUDGET: Final = 64
"""Publishes between two turns of the event loop, when nothing else awaits between them."""
STALL_S: Final = 1.0
"""Seconds a backlogged subscriber may make no progress before publishers stop waiting for it."""
IDLE_SPINS: Final = 2
"""Turns without any subscriber progress after which a waiting publisher sleeps a little instead of spinning."""
IDLE_SLEEP_S: Final = 0.0005


class PublishTurns:
    """Counts publishes since the last delivery and gives subscribers their turns (see the module docstring)."""

    def __init__(
        self,
        fanout: Fanout,
        *,
        budget: int = PUBLISH_BUDGET,
        stall_s: float = STALL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if budget < 1:
            raise ValueError("budget must be at least 1")
        self.fanout = fanout
        self.budget = budget
        self.stall_s = stall_s
        self.count = 0
        """Publishes since the bus last scheduled a delivery (the bus resets it)."""
        self._clock = clock
        self._progress: dict[Subscription, tuple[int, int, float]] = {}
        self._stalled: set[Subscription] = set()
        self._moved = False

    async def published(self, count: int = 1) -> None:
        """Called after ``count`` events were stored (and their delivery scheduled)."""
        self.count += count
        if self.count < self.budget:
            return
        self.count = 0
        await asyncio.sleep(0)  # the scheduled delivery runs, then the subscribers it woke
        if self.fanout.backlogged:
            await self._drain()

    async def _drain(self) -> None:
        """Yield while a backlogged subscriber is making progress."""
        idle = 0
        while self._waiting_for():
            if idle < IDLE_SPINS:
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(IDLE_SLEEP_S)  # a subscriber waiting for its socket: leave the CPU to it
            idle = 0 if self._moved else idle + 1

    def _waiting_for(self) -> bool:
        """Whether a backlogged subscriber is still worth waiting for (it drains, and has not stalled)."""
        now = self._clock()
        backlogged = self.fanout.backlogged
        progress = self._progress
        waiting = moved = False
        for sub in list(backlogged):
            if sub.closed or sub.backlog <= sub.high_water:
                backlogged.discard(sub)
                progress.pop(sub, None)
                self._stalled.discard(sub)
                continue
            if sub in self._stalled:
                continue
            seen = progress.get(sub)
            if seen is None or sub.last_offset != seen[0] or sub.backlog < seen[1]:
                progress[sub] = (sub.last_offset, sub.backlog, now)
                moved = moved or seen is not None
                waiting = True
            elif now - seen[2] < self.stall_s:
                waiting = True
            else:  # no progress for stall_s: not waited for again until it has drained
                self._stalled.add(sub)
        self._moved = moved
        return waiting
