"""Readers for a plugin's settings (``ctx.config``, its ``[handlers.<plugin>]`` table), checked as read.

Public API (``from nexus import read_int, read_number, setting_name``): a plugin reads each setting once in
``setup`` and lets the ValueError stop the server at start-up, naming the setting and the value::

    async def setup(self, ctx: HandlerContext) -> None:
        self.interval = read_number(ctx.config, "interval_s", 1.0, plugin=ctx.plugin, minimum=0, strict=True)
        self.limit = read_int(ctx.config, "limit", 100, plugin=ctx.plugin, minimum=1)

Pure: no I/O, nothing from the core. A reader takes the mapping, the key and its default, and returns the
value, or raises ValueError naming the plugin, the key and the value:

- :func:`read_number`: a finite int or float (never a bool), returned as a float; ``minimum`` is inclusive, or
  exclusive with ``strict=True``; ``maximum`` is inclusive.
- :func:`read_int`: an int (never a bool) or a float with no fractional part (``10.0`` reads as ``10``: numbers
  that travelled as JSON or protobuf doubles), of at least ``minimum``.

The message says ``<setting> must be <what>, got <value>``. The setting is named ``places setting
'exit_points'``, or with ``table=True`` as it stands in the config file: ``[handlers.messaging] history_limit``.
By default a value of the wrong kind is told what kind is wanted (``a finite number``, ``an integer``) and one
out of bounds is told the bounds (``at least 1``, ``more than 0``, ``from 0 to 100``); ``must_be`` replaces
both with one description (``a positive integer``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def setting_name(plugin: str, key: str, *, table: bool = False) -> str:
    """How a message names a setting: ``places setting 'exit_points'``, or ``[handlers.places] exit_points``."""
    return f"[handlers.{plugin}] {key}" if table else f"{plugin} setting {key!r}"


def _invalid(plugin: str, key: str, value: Any, what: str, *, table: bool) -> ValueError:
    return ValueError(f"{setting_name(plugin, key, table=table)} must be {what}, got {value!r}")


def _bounds(minimum: float | None, strict: bool, maximum: float | None) -> str:
    """The bounds a value broke, in words (at least one of them is set)."""
    if minimum is None:
        return f"at most {maximum:g}"
    low = f"more than {minimum:g}" if strict else f"at least {minimum:g}"
    if maximum is None:
        return low
    return f"{low} and at most {maximum:g}" if strict else f"from {minimum:g} to {maximum:g}"


def read_number(
    config: Mapping[str, Any],
    key: str,
    default: float,
    *,
    plugin: str,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
    table: bool = False,
    must_be: str | None = None,
) -> float:
    """``config[key]`` (``default`` when absent) as a float: finite, not a bool, within the bounds.

    ``strict`` refuses ``minimum`` itself. Raises ValueError naming the plugin, the key and the value.
    """
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(plugin, key, value, must_be or "a finite number", table=table)
    too_low = minimum is not None and (value <= minimum if strict else value < minimum)
    if too_low or (maximum is not None and value > maximum):
        raise _invalid(plugin, key, value, must_be or _bounds(minimum, strict, maximum), table=table)
    return float(value)


def read_int(
    config: Mapping[str, Any],
    key: str,
    default: int,
    *,
    plugin: str,
    minimum: int | None = None,
    table: bool = False,
    must_be: str | None = None,
) -> int:
    """``config[key]`` (``default`` when absent) as an int of at least ``minimum``; ``3.0`` counts as ``3``.

    A bool, a fractional float or anything else raises ValueError naming the plugin, the key and the value.
    """
    value = config.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(plugin, key, value, must_be or "an integer", table=table)
    if minimum is not None and value < minimum:
        raise _invalid(plugin, key, value, must_be or f"at least {minimum}", table=table)
    return value
