"""Following a log file like ``tail -F``, confined to a log directory. Synchronous file I/O, no asyncio.

:func:`resolve_log_path` decides whether a path may be followed: it must name something inside the log
directory once ``..`` and every symbolic link are resolved. :class:`FileFollower` reads the lines appended to
it, one :meth:`~FileFollower.poll` at a time:

- **Rotation** (the name now points to another file: ``mv app.log app.log.1`` then a new ``app.log``, or a
  symbolic link re-pointed): the rest of the old file is read first, then the new file from its start. While
  the name is missing the old file is still read, as a writer may keep appending to it.
- **Truncation** (the file shrank below the position read: ``copytruncate``, ``> app.log``): reading
  restarts at its start. A truncation followed by writes beyond the old position before the next poll looks
  like growth; ``tail -F`` has the same blind spot.
- The new file is checked again (inside the log directory, a regular file) before it is opened, and opened
  without following a symbolic link swapped in meanwhile.
- Lines are split on ``\\n`` (a trailing ``\\r`` dropped), decoded as UTF-8 with replacement characters; a
  line longer than ``max_line_bytes`` is cut there and the rest of it skipped. An unterminated last line is
  held until its newline arrives, or until rotation or truncation shows it will never come.

:meth:`~FileFollower.close` may be called from another thread while a poll runs: the poll closes the file
when it ends.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path
from typing import Final

DEFAULT_MAX_LINE_BYTES: Final = 64 * 1024
DEFAULT_READ_BYTES: Final = 1024 * 1024


class PathNotAllowed(ValueError):
    """The path is outside the log directory, or not a regular file."""


def resolve_log_path(log_dir: str | os.PathLike[str], path: str) -> tuple[Path, Path]:
    """``(the path as named inside log_dir, its fully resolved target)``; raises :class:`PathNotAllowed`.

    A relative ``path`` is taken from ``log_dir``. Both ``..`` components and symbolic links are resolved
    before the check, so neither can lead outside. The target need not exist yet.
    """
    if not isinstance(path, str) or not path.strip():
        raise PathNotAllowed("path must be a non-empty string")
    if "\x00" in path:
        raise PathNotAllowed("path must not contain a NUL character")
    try:
        root = Path(log_dir).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise PathNotAllowed(f"the log directory {os.fspath(log_dir)!r} cannot be used: {exc}") from None
    if not root.is_dir():
        raise PathNotAllowed(f"the log directory {str(root)!r} is not a directory")
    named = Path(path) if Path(path).is_absolute() else root / path
    try:
        target = named.resolve(strict=False)
    except (OSError, RuntimeError) as exc:
        raise PathNotAllowed(f"{path!r} cannot be resolved: {exc}") from None
    if target == root or not target.is_relative_to(root):
        raise PathNotAllowed(
            f"{path!r} is outside the log directory {str(root)!r} (after resolving '..' and symbolic links)"
        )
    return named, target


class FileFollower:
    """Reads the lines appended to the file named ``named`` (inside ``log_dir``), across rotation and truncation.

    Call :meth:`open` once (it raises FileNotFoundError or :class:`PathNotAllowed`), then :meth:`poll`
    repeatedly; each returns the complete lines that arrived since the previous one.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        path: str,
        *,
        from_start: bool = False,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_read_bytes: int = DEFAULT_READ_BYTES,
    ) -> None:
        self.log_dir = log_dir
        self.path = path
        self.named, self.target = resolve_log_path(log_dir, path)
        self.root = Path(log_dir).resolve()
        self.from_start = from_start
        self.max_line_bytes = max_line_bytes
        self.max_read_bytes = max_read_bytes
        self.rotations = 0
        self.truncations = 0
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._position = 0
        self._partial = bytearray()
        self._skipping = False
        self._lock = threading.Lock()
        self._close_requested = False
        self._closed = False

    @property
    def relative_path(self) -> str:
        """The followed file's resolved path, relative to the log directory."""
        return str(self.target.relative_to(self.root))

    @property
    def position(self) -> int:
        """Bytes of the current file read so far."""
        return self._position

    def open(self) -> None:
        """Open the file: at its end, or at its start with ``from_start``. Does nothing once closed."""
        with self._lock:
            try:
                if not (self._closed or self._close_requested):
                    self._open_current(at_end=not self.from_start)
            finally:
                if self._close_requested:
                    self._close_now()

    def close(self) -> None:
        """Close the file; safe to call from another thread while a poll runs (that poll then closes it)."""
        if self._lock.acquire(blocking=False):
            try:
                self._close_now()
            finally:
                self._lock.release()
        else:
            self._close_requested = True

    def poll(self) -> list[str]:
        """The complete lines that arrived since the last poll (at most ``max_read_bytes`` read per file)."""
        with self._lock:
            try:
                if self._closed or self._close_requested:
                    return []
                return self._poll()
            finally:
                if self._close_requested:
                    self._close_now()

    # --- internals ---------------------------------------------------------------------------------------

    def _close_now(self) -> None:
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open_current(self, *, at_end: bool) -> None:
        """Open what the name points to now; raises FileNotFoundError or PathNotAllowed."""
        self.named, self.target = resolve_log_path(self.log_dir, self.path)
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.target, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PathNotAllowed(f"{self.path!r} became a symbolic link while being opened") from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise PathNotAllowed(f"{self.path!r} is not a regular file")
            position = info.st_size if at_end else 0
            os.lseek(fd, position, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._identity = (info.st_dev, info.st_ino)
        self._position = position
        self._partial.clear()
        self._skipping = False

    def _poll(self) -> list[str]:
        lines: list[str] = []
        if self._fd is None:
            try:
                self._open_current(at_end=False)
            except FileNotFoundError:
                return lines
        lines.extend(self._read())
        assert self._fd is not None
        info = os.fstat(self._fd)
        if info.st_size < self._position:
            self.truncations += 1
            lines.extend(self._flush())
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._position = 0
            lines.extend(self._read())
        try:
            current = os.stat(self.named)
        except FileNotFoundError:
            return lines  # moved away and not recreated yet: keep reading the old file
        if (current.st_dev, current.st_ino) != self._identity:
            lines.extend(self._read())
            lines.extend(self._flush())
            os.close(self._fd)
            self._fd = None
            self.rotations += 1
            try:
                self._open_current(at_end=False)
            except FileNotFoundError:
                return lines
            lines.extend(self._read())
        return lines

    def _read(self) -> list[str]:
        assert self._fd is not None
        lines: list[str] = []
        budget = self.max_read_bytes
        while budget > 0:
            try:
                chunk = os.read(self._fd, min(65536, budget))
            except BlockingIOError:
                break
            if not chunk:
                break
            budget -= len(chunk)
            self._position += len(chunk)
            lines.extend(self._split(chunk))
        return lines

    def _split(self, chunk: bytes) -> list[str]:
        lines: list[str] = []
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not self._skipping:
                room = self.max_line_bytes - len(self._partial)
                self._partial.extend(piece[:room])
                if len(piece) > room:
                    # Too long: cut the line here and skip the rest of it, up to its newline.
                    lines.append(self._decode(bytes(self._partial)))
                    self._partial.clear()
                    self._skipping = True
            if end < 0:
                return lines
            if self._skipping:
                self._skipping = False
            else:
                lines.append(self._decode(bytes(self._partial)))
                self._partial.clear()
            start = end + 1

    def _flush(self) -> list[str]:
        """The held unterminated line, when it will never be completed (rotation, truncation)."""
        line = [] if self._skipping or not self._partial else [self._decode(bytes(self._partial))]
        self._partial.clear()
        self._skipping = False
        return line

    @staticmethod
    def _decode(data: bytes) -> str:
        return data.decode("utf-8", errors="replace").removesuffix("\r")
