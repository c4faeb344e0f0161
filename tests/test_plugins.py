"""Handler discovery: --handler specs, entry points of nexus.handlers, and the errors that name the cause."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nexus import EventHandler, StreamingEventHandler
from nexus.bus.memory import MemoryBus
from nexus.cli import main
from nexus.errors import HandlerConfigError
from nexus.plugins import (
    ENTRY_POINT_GROUP,
    HandlerSpec,
    discover,
    load_handler_class,
    register_all,
    split_spec,
)
from nexus.provider import Provider

HANDLERS_SOURCE = """
from nexus import Event, EventHandler, Stream, StreamingEventHandler


class Echo(EventHandler):
    event_type = "plugtest:echo"

    async def handle(self, event: Event) -> dict:
        return {"echo": event.payload}


class Ticker(StreamingEventHandler):
    event_type = "plugtest:stream_ticks"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"tick": 1})


class Outer:
    class Inner(EventHandler):
        event_type = "plugtest:inner"

        async def handle(self, event: Event) -> dict:
            return {}


class NotAHandler:
    pass


def function() -> None:
    pass


class Exploding(EventHandler):
    event_type = "plugtest:explode"

    def __init__(self) -> None:
        raise RuntimeError("no database")

    async def handle(self, event: Event) -> dict:
        return {}


class Abstract(EventHandler):
    event_type = "plugtest:abstract"
"""

WriteModule = Callable[[str], str]


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteModule]:
    """Write modules with unique names into a directory on sys.path; forget them afterwards."""
    directory = tmp_path / "modules"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))
    names: list[str] = []

    def write(source: str) -> str:
        name = f"nexus_plugtest_{uuid.uuid4().hex}"
        (directory / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        importlib.invalidate_caches()
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


@pytest.fixture
def handlers_module(write_module: WriteModule) -> str:
    """A module holding the handler classes above."""
    return write_module(HANDLERS_SOURCE)


def write_distribution(root: Path, monkeypatch: pytest.MonkeyPatch, dist: str, entry_points: dict[str, str]) -> None:
    """Write an installed-looking distribution with entry points into ``root`` and put it on sys.path."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n", encoding="utf-8")
    lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{name} = {value}" for name, value in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()


def test_handler_spec_loads_and_instantiates_the_class(handlers_module: str) -> None:
    """A --handler spec imports the module, builds the class with no arguments and names it by the spec."""
    spec = f"{handlers_module}:Echo"

    [found] = discover(load_entry_points=False, extra=[spec], exclude=[])

    assert found.name == spec
    assert found.source == "--handler"
    assert isinstance(found.handler, EventHandler)
    assert type(found.handler).__module__ == handlers_module


def test_load_handler_class_returns_streaming_and_nested_classes(handlers_module: str) -> None:
    """load_handler_class returns the class itself, following dotted attributes for nested classes."""
    ticker = load_handler_class(f"{handlers_module}:Ticker")
    inner = load_handler_class(f"{handlers_module}:Outer.Inner")

    assert issubclass(ticker, StreamingEventHandler)
    assert inner.__qualname__ == "Outer.Inner"


@pytest.mark.parametrize("spec", ["", "pkg.mod", "pkg.mod:", ":Cls", "pkg mod:Cls", "pkg.mod:Cls:x", "1pkg:Cls"])
def test_split_spec_rejects_malformed_specs(spec: str) -> None:
    """Anything but 'dotted.module:Dotted.Attr' is refused with a message quoting the spec."""
    with pytest.raises(HandlerConfigError, match=r"is not a 'package\.module:Class' spec"):
        split_spec(spec)


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        ("Missing", "has no attribute 'Missing'"),
        ("NotAHandler", "is not a handler class (class NotAHandler): it must subclass nexus.EventHandler"),
        ("function", "is not a handler class (a function)"),
        ("Exploding", "constructor of Exploding failed: RuntimeError: no database"),
        ("Abstract", "constructor of Abstract failed: TypeError: Can't instantiate abstract class"),
    ],
)
def test_handler_spec_errors_name_spec_and_cause(handlers_module: str, attribute: str, expected: str) -> None:
    """Each way a --handler spec can fail raises HandlerConfigError naming the spec and the cause."""
    spec = f"{handlers_module}:{attribute}"

    with pytest.raises(HandlerConfigError) as caught:
        discover(load_entry_points=False, extra=[spec], exclude=[])

    message = str(caught.value)
    assert message.startswith(f"--handler {spec!r}: ")
    assert expected in message


def test_missing_module_is_reported_as_not_found() -> None:
    """A spec whose module does not exist says the module was not found."""
    with pytest.raises(HandlerConfigError, match=r"handler 'no_such_pkg\.mod:Cls': module 'no_such_pkg\.mod' not"):
        load_handler_class("no_such_pkg.mod:Cls")


def test_module_failing_to_import_reports_its_error(write_module: WriteModule) -> None:
    """A module that exists but fails to import reports the import error, not 'not found'."""
    broken = write_module("import no_such_dependency_for_nexus_tests\n")
    raising = write_module("raise RuntimeError('bad module')\n")

    with pytest.raises(HandlerConfigError, match="No module named 'no_such_dependency_for_nexus_tests'") as first:
        load_handler_class(f"{broken}:Cls")
    with pytest.raises(HandlerConfigError, match="RuntimeError: bad module") as second:
        load_handler_class(f"{raising}:Cls")

    assert f"importing module {broken!r} failed" in str(first.value)
    assert f"importing module {raising!r} failed" in str(second.value)


def test_entry_points_are_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers_module: str) -> None:
    """An installed distribution's nexus.handlers entry point is loaded under its entry-point name."""
    write_distribution(tmp_path / "site", monkeypatch, "fake-plugin", {"fake_echo": f"{handlers_module}:Echo"})

    found = {spec.name: spec for spec in discover(load_entry_points=True, extra=[], exclude=[])}

    assert "fake_echo" in found
    assert found["fake_echo"].source == "entry point fake-plugin"
    assert isinstance(found["fake_echo"].handler, EventHandler)


def test_excluded_entry_points_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers_module: str
) -> None:
    """Entry points named in exclude are not loaded, so even a broken one does no harm."""
    write_distribution(
        tmp_path / "site",
        monkeypatch,
        "fake-plugin",
        {"fake_echo": f"{handlers_module}:Echo", "fake_broken": f"{handlers_module}:Missing"},
    )

    names = [spec.name for spec in discover(load_entry_points=True, extra=[], exclude=["fake_echo", "fake_broken"])]

    assert "fake_echo" not in names
    assert "fake_broken" not in names


def test_entry_points_are_ignored_when_disabled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers_module: str
) -> None:
    """With load_entry_points false only the extra specs are loaded."""
    write_distribution(tmp_path / "site", monkeypatch, "fake-plugin", {"fake_echo": f"{handlers_module}:Echo"})

    specs = discover(load_entry_points=False, extra=[f"{handlers_module}:Ticker"], exclude=[])

    assert [spec.name for spec in specs] == [f"{handlers_module}:Ticker"]


def test_broken_entry_point_names_entry_point_and_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers_module: str
) -> None:
    """A failing entry point's error names the entry point, its value, its distribution and the cause."""
    write_distribution(tmp_path / "site", monkeypatch, "fake-plugin", {"fake_broken": f"{handlers_module}:Missing"})

    with pytest.raises(HandlerConfigError) as caught:
        discover(load_entry_points=True, extra=[], exclude=[])

    message = str(caught.value)
    assert f"entry point 'fake_broken' = '{handlers_module}:Missing' (from fake-plugin)" in message
    assert "has no attribute 'Missing'" in message
    assert "--exclude fake_broken" in message


def test_serve_stops_at_a_broken_entry_point_and_suggests_excluding_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], handlers_module: str
) -> None:
    """``nexus serve`` with a broken entry point exits 2 before serving, naming it and ``--exclude NAME``; with
    that flag the same command gets past discovery."""
    write_distribution(tmp_path / "site", monkeypatch, "fake-plugin", {"fake_broken": f"{handlers_module}:Missing"})
    monkeypatch.setenv("NEXUS_DATA_DIR", str(tmp_path / "data"))
    common = ["serve", "--grpc-port", "0", "--no-gateway", "--no-metrics", "--log-level", "error"]

    assert main(common) == 2
    error = capsys.readouterr().err
    assert error.startswith("nexus: error: entry point 'fake_broken'")
    assert "skip this entry point with --exclude fake_broken" in error

    # `nexus handlers` discovers the same way: excluded, the broken entry point is skipped and the rest listed.
    assert main(["handlers", "--exclude", "fake_broken"]) == 0
    listed = [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()]
    assert "messaging.send_message" in listed
    assert "fake_broken" not in listed


def test_a_handler_flag_of_the_wrong_form_is_reported_as_that_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """``--handler countdown.Countdown`` (a dot for the colon) is a usage error naming ``flag --handler``."""
    assert main(["serve", "--grpc-port", "0", "--no-gateway", "--handler", "countdown.Countdown"]) == 2
    error = capsys.readouterr().err
    assert "handlers (from flag --handler)" in error
    assert "'countdown.Countdown' is not a 'package.module:Class' spec" in error


def test_two_handlers_with_one_name_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers_module: str
) -> None:
    """Two distributions declaring the same entry-point name raise an error naming both sources."""
    write_distribution(tmp_path / "one", monkeypatch, "plugin-one", {"fake_dup": f"{handlers_module}:Echo"})
    write_distribution(tmp_path / "two", monkeypatch, "plugin-two", {"fake_dup": f"{handlers_module}:Ticker"})

    with pytest.raises(HandlerConfigError, match="two handlers are named 'fake_dup'") as caught:
        discover(load_entry_points=True, extra=[], exclude=[])

    assert "entry point plugin-one" in str(caught.value)
    assert "entry point plugin-two" in str(caught.value)


def test_register_all_passes_each_handler_its_config_section(handlers_module: str) -> None:
    """register_all registers every spec under its name with its handler_config section as config."""
    specs = discover(
        load_entry_points=False, extra=[f"{handlers_module}:Echo", f"{handlers_module}:Ticker"], exclude=[]
    )
    provider = Provider(MemoryBus())
    echo_name = f"{handlers_module}:Echo"

    registrations = register_all(provider, specs, {echo_name: {"prefix": ">"}})

    assert [r.name for r in registrations] == [echo_name, f"{handlers_module}:Ticker"]
    assert provider.registrations[echo_name].config == {"prefix": ">"}
    assert provider.registrations[f"{handlers_module}:Ticker"].config == {}
    assert provider.route("plugtest:stream_ticks:v1:requested") is registrations[1]


def test_register_all_names_the_source_of_a_refused_handler(handlers_module: str) -> None:
    """A handler the provider refuses is reported with where it was loaded from."""
    handler = load_handler_class(f"{handlers_module}:Echo")()
    specs = [HandlerSpec("first", handler, "--handler"), HandlerSpec("second", handler, "entry point dup-dist")]

    with pytest.raises(HandlerConfigError, match=r"already handled by first \(loaded from entry point dup-dist\)"):
        register_all(Provider(MemoryBus()), specs, {})


def test_config_for_lays_the_handler_section_over_its_plugin_section() -> None:
    """An entry point named plugin.handler gets [handlers.plugin], with its own nested or quoted section on top."""
    from nexus.plugins import config_for

    sections: dict[str, dict[str, Any]] = {
        "places": {"dwell_radius_m": 60, "max_gap_s": 600, "track_location": {"min_dwell_s": 30}},
        "places.stream_encounters": {"max_gap_s": 10},
    }
    assert config_for("places.track_location", sections) == {"dwell_radius_m": 60, "max_gap_s": 600, "min_dwell_s": 30}
    assert config_for("places.stream_encounters", sections) == {"dwell_radius_m": 60, "max_gap_s": 10}
    assert config_for("places", sections) == {"dwell_radius_m": 60, "max_gap_s": 600}
    assert config_for("other", sections) == {}
