"""Fair turns between publishers and subscribers on one event loop.

A bus whose publish stores in memory never really awaits: a publisher in a tight loop (a handler publishing
thousands of events, a ``PublishEvents`` stream, many concurrent ``EmitEvent`` calls) would keep the event loop
to itself, and every subscriber's queue would overflow before it ever got a turn to write. :class:`PublishTurns`
is what such a bus awaits before each publish:

- every ``budget`` publishes since the bus last delivered, the publisher yields once: the bus's delivery runs
  and every subscriber it woke gets a turn;
- while a subscriber's backlog is over its high-water mark (:attr:`Subscription.high_water
  <nexus.bus.base.Subscription.high_water>`) and it makes progress (takes events), the publisher keeps yielding
  until it drains, for at most ``max_wait_s`` per turn;
- a subscriber that takes nothing for ``stall_s`` seconds (its client stopped reading) is not waited for until
  it takes events again: it is cut off as too slow when its queue overflows, and the others carry on. A
  publisher never waits for a subscription it reads itself;
- each subscriber has a wait budget: the seconds publishers spent waiting for it are charged to it (refilled at
  ``share`` seconds per second, at most ``burst_s`` saved up); once it is spent, that subscriber is not waited
  for until the budget refills.

So a subscriber that keeps reading keeps up with a burst from a publisher on its event loop; one that stops
reading holds publishers up once, for about ``stall_s``; and one that reads slowly on purpose slows publishers by
``share`` at most (a quarter) before it is cut off as too slow.
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
MAX_WAIT_S: Final = 0.05
"""Seconds a publisher waits for backlogged subscribers per turn at most."""
WAIT_SHARE: Final = 0.25
"""Seconds of waiting one subscriber may cost publishers per second, in the long run: a client that reads slowly
on purpose slows publishers by a quarter at most, then is cut off as too slow like any other."""
WAIT_BURST_S: Final = 2.0
"""Seconds of waiting one subscriber may cost at once (a burst of thousands of events to a subscriber that writes
one frame per event)."""
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
        max_wait_s: float = MAX_WAIT_S,
        share: float = WAIT_SHARE,
        burst_s: float = WAIT_BURST_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if budget < 1:
            raise ValueError("budget must be at least 1")
        self.fanout = fanout
        self.budget = budget
        self.stall_s = stall_s
        self.max_wait_s = max_wait_s
        self.share = share
        self.burst_s = burst_s
        self.count = 0
        """Publishes since the bus last scheduled a delivery (the bus resets it)."""
        self._clock = clock
        self._progress: dict[Subscription, tuple[int, int, float]] = {}
        self._credit: dict[Subscription, tuple[float, float]] = {}
        """Per backlogged subscriber: seconds of waiting it may still cost, and when that was last counted."""
        self._waited_for: list[Subscription] = []
        self._moved = False

    def published(self, count: int = 1) -> None:
        """``count`` events were stored (and their delivery scheduled)."""
        self.count += count

    async def next_turn(self) -> None:
        """Awaited before storing: once ``budget`` publishes went by without a delivery, subscribers get their turns.

        Awaiting before the event is stored keeps a publish whole: cancelled while it waits, nothing was stored.
        """
        if self.count < self.budget:
            return
        self.count = 0
        await asyncio.sleep(0)  # the scheduled delivery runs, then the subscribers it woke
        if self.fanout.backlogged:
            await self._drain()

    async def _drain(self) -> None:
        """Yield while a backlogged subscriber is making progress (and has wait budget left)."""
        idle = 0
        clock = self._clock
        start = before = clock()
        deadline = start + self.max_wait_s
        while self._waiting_for() and before < deadline:
            if idle < IDLE_SPINS:
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(IDLE_SLEEP_S)  # a subscriber waiting for its socket: leave the CPU to it
            idle = 0 if self._moved else idle + 1
            after = clock()
            self._charge(after - before, after)
            before = after

    def _charge(self, seconds: float, now: float) -> None:
        """Charge ``seconds`` of waiting to every subscriber the publisher just waited for."""
        for sub in self._waited_for:
            credit, _ = self._credit.get(sub, (self.burst_s, now))
            self._credit[sub] = (credit - seconds, now)

    def _has_credit(self, sub: Subscription, now: float) -> bool:
        entry = self._credit.get(sub)
        if entry is None:
            return True
        credit, since = entry
        credit = min(self.burst_s, credit + (now - since) * self.share)
        self._credit[sub] = (credit, now)
        return credit > 0

    def _waiting_for(self) -> bool:
        """Whether a backlogged subscriber is still worth waiting for (it drains, and has not stalled)."""
        now = self._clock()
        me = asyncio.current_task()
        backlogged = self.fanout.backlogged
        progress = self._progress
        waiting = moved = False
        waited_for = self._waited_for
        waited_for.clear()
        for sub in list(backlogged):
            if sub.closed or sub.backlog <= sub.high_water:
                backlogged.discard(sub)
                progress.pop(sub, None)
                if sub.closed:
                    self._credit.pop(sub, None)
                continue
            if sub.reader is me:
                continue  # the publisher reads this subscription itself: waiting could only stall
            if not self._has_credit(sub, now):
                continue  # it has cost publishers its share of waiting: it keeps up by itself or is cut off
            seen = progress.get(sub)
            if seen is None or sub.last_offset != seen[0] or sub.backlog < seen[1]:
                progress[sub] = (sub.last_offset, sub.backlog, now)
                moved = moved or seen is not None
                waiting = True
                waited_for.append(sub)
            elif now - seen[2] < self.stall_s:
                waiting = True
                waited_for.append(sub)
            # else: no progress for stall_s (its client stopped reading): not waited for until it moves again
        self._moved = moved
        return waiting
