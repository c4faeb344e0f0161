"""The settings readers plugins use (nexus.settings, public API): what they accept, refuse and say."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from nexus import read_int, read_number, setting_name


def exactly(message: str) -> str:
    return rf"\A{re.escape(message)}\Z"


def number_refused(value: Any, message: str, **options: Any) -> None:
    with pytest.raises(ValueError, match=exactly(message)):
        read_number({"k": value}, "k", 1.0, **{"plugin": "demo", **options})


def int_refused(value: Any, message: str, **options: Any) -> None:
    with pytest.raises(ValueError, match=exactly(message)):
        read_int({"k": value}, "k", 1, **{"plugin": "demo", **options})


def test_a_setting_is_named_by_plugin_and_key_or_as_in_the_config_file() -> None:
    """A setting is named "<plugin> setting '<key>'", or "[handlers.<plugin>] <key>" with table=True."""
    assert setting_name("places", "exit_points") == "places setting 'exit_points'"
    assert setting_name("messaging", "history_limit", table=True) == "[handlers.messaging] history_limit"


def test_read_number_returns_the_value_or_the_default_as_a_float() -> None:
    """An int or float is returned as a float, and an absent key gives the default."""
    assert read_number({"k": 3}, "k", 1.0, plugin="demo") == 3.0
    assert isinstance(read_number({"k": 3}, "k", 1.0, plugin="demo"), float)
    assert read_number({"k": 0.25}, "k", 1.0, plugin="demo") == 0.25
    assert read_number({}, "k", 7, plugin="demo") == 7.0


@pytest.mark.parametrize("value", [True, False, "1", None, [1], math.nan, math.inf, -math.inf])
def test_read_number_refuses_what_is_not_a_finite_number(value: Any) -> None:
    """A bool, a non-number, NaN or an infinity is refused, naming the plugin, the key and the value."""
    number_refused(value, f"demo setting 'k' must be a finite number, got {value!r}")


def test_read_number_minimum_is_inclusive_unless_strict() -> None:
    """The minimum itself is accepted, or refused with strict=True, and the message states the bound."""
    assert read_number({"k": 0}, "k", 1.0, plugin="demo", minimum=0) == 0.0
    number_refused(-0.5, "demo setting 'k' must be at least 0, got -0.5", minimum=0)
    number_refused(0, "demo setting 'k' must be more than 0, got 0", minimum=0, strict=True)
    assert read_number({"k": 1e-9}, "k", 1.0, plugin="demo", minimum=0, strict=True) == 1e-9


def test_read_number_maximum_is_inclusive() -> None:
    """The maximum itself is accepted, and a value above it is refused with the bounds in the message."""
    assert read_number({"k": 100}, "k", 1.0, plugin="demo", minimum=0, maximum=100) == 100.0
    number_refused(100.5, "demo setting 'k' must be from 0 to 100, got 100.5", minimum=0, maximum=100)
    number_refused(-1, "demo setting 'k' must be from 0 to 100, got -1", minimum=0, maximum=100)
    number_refused(2, "demo setting 'k' must be at most 1.5, got 2", maximum=1.5)
    number_refused(0, "demo setting 'k' must be more than 0 and at most 1, got 0", minimum=0, strict=True, maximum=1)


def test_read_number_must_be_replaces_both_messages_and_table_names_the_key_as_in_the_file() -> None:
    """With must_be a wrong kind and a broken bound get that one description, and table=True says [handlers.demo] k."""
    for value in ("x", 0, -3.5):
        message = f"[handlers.demo] k must be a positive number, got {value!r}"
        number_refused(value, message, table=True, minimum=0, strict=True, must_be="a positive number")


def test_read_number_checks_the_default_too() -> None:
    """An absent key's default goes through the same checks as a configured value."""
    with pytest.raises(ValueError, match=exactly("demo setting 'k' must be at least 1, got 0")):
        read_number({}, "k", 0, plugin="demo", minimum=1)


def test_read_int_accepts_ints_and_whole_floats() -> None:
    """An int is returned as it is and a whole float as an int; an absent key gives the default."""
    assert read_int({"k": 3}, "k", 1, plugin="demo") == 3
    value = read_int({"k": 10.0}, "k", 1, plugin="demo")
    assert (value, type(value)) == (10, int)
    assert read_int({}, "k", 5, plugin="demo") == 5
    assert read_int({"k": -4}, "k", 1, plugin="demo") == -4


@pytest.mark.parametrize("value", [True, False, 1.5, "3", None, math.nan, math.inf])
def test_read_int_refuses_what_is_not_an_integer(value: Any) -> None:
    """A bool, a fractional or non-finite float, or a non-number is refused, naming the plugin, key and value."""
    int_refused(value, f"demo setting 'k' must be an integer, got {value!r}", minimum=0)


def test_read_int_minimum_is_inclusive_and_reported_after_a_whole_float_is_read() -> None:
    """The minimum itself is accepted; below it the message states the bound and the value read as an int."""
    assert read_int({"k": 1}, "k", 5, plugin="demo", minimum=1) == 1
    int_refused(0, "demo setting 'k' must be at least 1, got 0", minimum=1)
    int_refused(0.0, "demo setting 'k' must be at least 1, got 0", minimum=1)


def test_read_int_must_be_replaces_both_messages_and_table_names_the_key_as_in_the_file() -> None:
    """With must_be a wrong kind and a too-small value get that one description; table=True says [handlers.demo] k."""
    for value in ("lots", 0, 2.5):
        message = f"[handlers.demo] k must be a positive integer, got {value!r}"
        int_refused(value, message, table=True, minimum=1, must_be="a positive integer")
