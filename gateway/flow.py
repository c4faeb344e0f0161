"""Flow control of one WebSocket connection. Pure: no I/O, no asyncio.

- :class:`Outbox`: the bounded outgoing queue between the bus and the connection's writer, bounded in frames
  AND bytes. ``put`` never blocks: it reports an overflow, and the connection is then closed with 4008 (too
  slow) instead of slowing the bus or growing without bound.
- :class:`~nexus.ratelimit.RateLimiter` (from ``nexus.ratelimit``): a token bucket for incoming frames; it answers
  how long to pause reading, so a client that floods frames is slowed down (TCP pushes back on it) while the
  others are served.
"""

from __future__ import annotations

from collections import deque

from nexus.ratelimit import RateLimiter


class Outbox:
    """Frames waiting to be written, with the offset of the event each carries (0 for control frames).

    Empty most of the time (frames go straight to the socket while it takes them): its queue is made on the
    first ``put`` and dropped when it empties, so an idle connection holds none.
    """

    __slots__ = ("_bytes", "_frames", "max_bytes", "max_frames", "overflowed")

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        if max_frames < 1 or max_bytes < 1:
            raise ValueError("an outbox holds at least one frame and one byte")
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: deque[tuple[bytes, int]] | None = None
        self._bytes = 0
        self.overflowed = False

    def put(self, frame: bytes, offset: int = 0) -> bool:
        """Queue ``frame``; False (and nothing queued) when that would pass a bound, or after an overflow."""
        if self.overflowed:
            return False
        frames = self._frames
        if frames is None:
            frames = self._frames = deque()
        size = len(frame)
        if len(frames) >= self.max_frames or self._bytes + size > self.max_bytes:
            self.overflowed = True
            self.clear()
            return False
        frames.append((frame, offset))
        self._bytes += size
        return True

    def pop(self) -> tuple[bytes, int]:
        """The oldest frame and its offset; raises IndexError when empty."""
        if not self._frames:
            raise IndexError("pop from an empty outbox")
        frame = self._frames.popleft()
        self._bytes -= len(frame[0])
        if not self._frames:
            self._frames = None
        return frame

    def take(self, max_frames: int) -> list[tuple[bytes, int]]:
        """Up to ``max_frames`` frames, oldest first."""
        frames = self._frames
        if not frames:
            return []
        count = min(max_frames, len(frames))
        taken = [frames.popleft() for _ in range(count)]
        self._bytes -= sum(len(frame) for frame, _ in taken)
        if not frames:
            self._frames = None
        return taken

    def take_bytes(self, budget: int) -> tuple[list[bytes], int]:
        """The oldest frames while fewer than ``budget`` bytes are taken (so at least one when ``budget`` is
        positive), and the offset of the last event among them (0: none carried one)."""
        frames = self._frames
        taken: list[bytes] = []
        if not frames:
            return taken, 0
        size = 0
        last = 0
        popleft = frames.popleft
        while frames and size < budget:
            frame, offset = popleft()
            taken.append(frame)
            size += len(frame)
            if offset:
                last = offset
        self._bytes -= size
        if not frames:
            self._frames = None
        return taken, last

    def clear(self) -> None:
        """Drop everything queued."""
        self._frames = None
        self._bytes = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._frames) if self._frames is not None else 0

    def __bool__(self) -> bool:
        return bool(self._frames)


__all__ = ["Outbox", "RateLimiter"]
