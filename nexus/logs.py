"""Structured logging: one format for Nexus's own logs and for the libraries beneath it.

Nexus logs with structlog bound loggers (``structlog.get_logger("nexus.provider").bind(correlation_id=...)``).
:func:`configure_logging` sends them through the standard library's :mod:`logging`, and renders every record
(structlog's and foreign ones such as ``grpc`` or ``asyncio``) with one :class:`structlog.stdlib.ProcessorFormatter`
on one stderr handler, so operators read a single format:

- ``json``: one JSON object per line with ``timestamp`` (ISO 8601, UTC, ``Z``), ``level``, ``event``,
  ``logger``, the bound keys, and ``exception`` as structured frames (as ``dict_tracebacks``, without
  local variables) when there is one;
- ``console``: structlog's readable :class:`~structlog.dev.ConsoleRenderer`, coloured on a terminal;
- ``auto``: ``console`` when stderr is a terminal, else ``json``.

What clients or other writers get wrong (undecodable requests, bad frames, poison messages on NATS) is logged at
warning level without a traceback, through a :class:`LogLimiter` (at most a few lines per kind every 10 s, with
a ``suppressed`` count). A handler's own exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import structlog
from structlog.typing import Processor

LOG_FORMATS: Final = ("auto", "json", "console")
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of the record, so a swapped stderr is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            stream = sys.stderr
            stream.write(message + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


_handler: _StderrHandler | None = None


def _shared_processors() -> list[Processor]:
    """What every record gets before rendering, whether it came from structlog or from ``logging``."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


def _renderers(fmt: str) -> list[Processor]:
    # Tracebacks leave out local variables: they can hold payloads and credentials, and make lines huge.
    if fmt == "json":
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        return [tracebacks, structlog.processors.JSONRenderer()]
    exception_formatter: structlog.typing.ExceptionRenderer = (
        structlog.dev.RichTracebackFormatter(show_locals=False)
        if importlib.util.find_spec("rich") is not None
        else structlog.dev.plain_traceback
    )
    return [structlog.dev.ConsoleRenderer(colors=_stderr_is_tty(), exception_formatter=exception_formatter)]


def _stderr_is_tty() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


def resolve_format(fmt: str) -> str:
    """``json`` or ``console`` for ``fmt``; ``auto`` picks ``console`` when stderr is a terminal."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        return "console" if _stderr_is_tty() else "json"
    return fmt


def _level_number(level: str) -> int:
    name = level.lower()
    if name not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return logging.getLevelNamesMapping()[name.upper()]


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Render structlog and standard-library records to stderr in ``fmt`` at ``level`` and above.

    ``fmt`` is ``auto``, ``json`` or ``console``; ``level`` one of ``debug``, ``info``, ``warning``, ``error``,
    ``critical``. Calling it again replaces the previous configuration (it never adds a second handler).
    Raises :class:`ValueError` for an unknown format or level.
    """
    global _handler
    rendered = resolve_format(fmt)
    level_number = _level_number(level)

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_renderers(rendered)],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)

    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(level_number)
    _handler = handler

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        # Not cached: loggers created before a reconfiguration (or inside capture_logs) follow the new one.
        cache_logger_on_first_use=False,
    )


BAD_INPUT_WINDOW_S: Final = 10.0
BAD_INPUT_LINES: Final = 5
_MAX_KINDS: Final = 1024


@dataclasses.dataclass(slots=True)
class _Window:
    start: float
    lines: int = 0
    dropped: int = 0
    """Lines held back since the last one let through."""


class LogLimiter:
    """Lets at most ``lines`` log lines of each kind through in each ``window_s`` seconds.

    For what clients (or other writers) get wrong: a flood of garbage must not become a flood of log lines. The
    lines held back are counted, and the next line of that kind that gets through reports them as
    ``suppressed``. The clock is given, so the limiter is tested without waiting.
    """

    def __init__(
        self,
        lines: int = BAD_INPUT_LINES,
        window_s: float = BAD_INPUT_WINDOW_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lines = lines
        self.window_s = window_s
        self._clock = clock
        self._kinds: dict[str, _Window] = {}

    def allow(self, kind: str) -> int | None:
        """None when a line of ``kind`` must be dropped now; else how many were dropped before it."""
        now = self._clock()
        window = self._kinds.get(kind)
        if window is None:
            if len(self._kinds) >= _MAX_KINDS:
                self._kinds.clear()
            window = self._kinds[kind] = _Window(now)
        elif now - window.start >= self.window_s:
            window.start, window.lines = now, 0
        if window.lines >= self.lines:
            window.dropped += 1
            return None
        window.lines += 1
        dropped, window.dropped = window.dropped, 0
        return dropped

    def warning(self, logger: Any, event: str, kind: str | None = None, **fields: Any) -> bool:
        """Log ``event`` at warning level, without a traceback, unless its kind (``event`` unless given) is over
        its rate; ``suppressed`` says how many lines of the kind were dropped since the last. Returns whether
        the line was written."""
        suppressed = self.allow(kind or event)
        if suppressed is None:
            return False
        if suppressed:
            fields["suppressed"] = suppressed
        logger.warning(event, **fields)
        return True
