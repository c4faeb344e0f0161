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
    """Frames waiting to be written, with the offset of the event each carries (0 for control frames)."""

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        if max_frames < 1 or max_bytes < 1:
            raise ValueError("an outbox holds at least one frame and one byte")
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: deque[tuple[bytes, int]] = deque()
        self._bytes = 0
        self.overflowed = False

    def put(self, frame: bytes, offset: int = 0) -> bool:
        """Queue ``frame``; False (and nothing queued) when that would pass a bound, or after an overflow."""
        if self.overflowed:
            return False
        size = len(frame)
        if len(self._frames) >= self.max_frames or self._bytes + size > self.max_bytes:
            self.overflowed = True
            self.clear()
            return False
        self._frames.append((frame, offset))
        self._bytes += size
        return True

    def pop(self) -> tuple[bytes, int]:
        """The oldest frame and its offset; raises IndexError when empty."""
        frame = self._frames.popleft()
        self._bytes -= len(frame[0])
        return frame

    def take(self, max_frames: int) -> list[tuple[bytes, int]]:
        """Up to ``max_frames`` frames, oldest first."""
        frames = self._frames
        count = min(max_frames, len(frames))
        taken = [frames.popleft() for _ in range(count)]
        self._bytes -= sum(len(frame) for frame, _ in taken)
        return taken

    def clear(self) -> None:
        """Drop everything queued."""
        self._frames.clear()
        self._bytes = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._frames)

    def __bool__(self) -> bool:
        return bool(self._frames)


__all__ = ["Outbox", "RateLimiter"]
