"""Where a subscription over gRPC resumes from. Pure: no I/O, no gRPC.

Every call of ``SubscribeEvents`` / ``SubscribeEventBatches`` is answered with initial metadata before any event
(:class:`Answer`): ``nexus-epoch``, ``nexus-head-offset`` and, when the call asked to resume,
``nexus-recovered``. A client that reconnects asks for what follows the last stored event it was given, in the
epoch that offset belongs to (:class:`ResumePoint`)::

    point = ResumePoint(since_offset, epoch)
    while True:
        since_offset, epoch = point.ask()              # the next call's since_offset and epoch
        answer = Answer.read(initial_metadata)          # None: the call failed before a server answered
        if answer is not None:
            point.answered(answer)
        for event in events:
            point.delivered(event.offset)               # heartbeats (offset 0) do not move it

The rules, each a way an event could otherwise be lost or repeated after a cut:

- an event not stored (a heartbeat, offset 0) never moves the resume offset: resuming from 0 would be "live";
- a subscription that started live resumes after the head the server reported when it went live, in that
  server's epoch, so what was stored while it was cut off is replayed, although it had received nothing;
- once a server has answered, every later call names that server's epoch: offset 0 with an epoch is "everything
  of that epoch", never "live";
- ``recovered: false`` (another epoch, or the gap no longer held) moves the resume point to the head the server
  reported, so a later call does not ask again for offsets of a history that no longer exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Final

EPOCH_KEY: Final = "nexus-epoch"
HEAD_OFFSET_KEY: Final = "nexus-head-offset"
RECOVERED_KEY: Final = "nexus-recovered"


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """A server's answer to one subscribe call (its initial metadata)."""

    epoch: str
    head_offset: int
    """The newest stored offset when the subscription went live: live events follow it."""
    recovered: bool | None = None
    """Whether everything after the offset asked for was replayed; None when the call asked for nothing."""

    @classmethod
    def read(cls, metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Answer | None:
        """The answer in a call's initial metadata, or None when it holds none: gRPC "returns" empty initial
        metadata for a call that failed before a server answered (a closed port), and that is no epoch of ""."""
        if metadata is None:
            return None
        items = dict(metadata)
        if EPOCH_KEY not in items:
            return None
        head = str(items.get(HEAD_OFFSET_KEY, "0"))
        if not (head.isascii() and head.isdigit()):
            raise ValueError(f"{HEAD_OFFSET_KEY} must be a non-negative integer, got {head[:40]!r}")
        recovered = items.get(RECOVERED_KEY)
        return cls(
            epoch=str(items[EPOCH_KEY]),
            head_offset=int(head),
            recovered=None if recovered is None else recovered == "true",
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The initial metadata a server sends for this answer."""
        keys = ((EPOCH_KEY, self.epoch), (HEAD_OFFSET_KEY, str(self.head_offset)))
        if self.recovered is None:
            return keys
        return (*keys, (RECOVERED_KEY, "true" if self.recovered else "false"))


class ResumePoint:
    """The ``since_offset`` and ``epoch`` a subscription's next call asks for (module docstring: the rules)."""

    __slots__ = ("epoch", "head_offset", "last_offset", "recovered")

    def __init__(self, since_offset: int = 0, epoch: str | None = None) -> None:
        if since_offset < 0:
            raise ValueError(f"since_offset must be 0 or more, got {since_offset}")
        self.last_offset = since_offset
        """The last stored offset delivered (or skipped on purpose: the head a live start began after)."""
        self.epoch = epoch or ""
        """The epoch ``last_offset`` belongs to; "" until a server answered, when none was given."""
        self.head_offset = 0
        """The head the latest answer reported."""
        self.recovered: bool | None = None
        """The latest answer's ``recovered``."""

    def ask(self) -> tuple[int, str]:
        """``(since_offset, epoch)`` for the next call."""
        return self.last_offset, self.epoch

    def answered(self, answer: Answer) -> None:
        """A server answered a call made with :meth:`ask`."""
        self.head_offset = answer.head_offset
        self.recovered = answer.recovered
        if answer.recovered is None:
            # Nothing was asked (a live start): the subscription goes on after the head, in this epoch.
            self.last_offset = max(self.last_offset, answer.head_offset)
        elif not answer.recovered:
            # The gap is gone (another epoch, or older than the history): go on live from the head.
            self.last_offset = answer.head_offset
        self.epoch = answer.epoch

    def delivered(self, offset: int) -> None:
        """An event was delivered; only a stored one (offset above 0) moves the resume point."""
        if offset > self.last_offset:
            self.last_offset = offset
