"""Plugins declare their settings (``config_keys`` of ConfigKeys): unknown sections and keys, and values of the
wrong type, stop the server at start-up with the closest name; ``nexus handlers --config`` shows the effective
settings; the built-in plugins declare exactly what they read; ``handle`` must be ``async def``."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nexus import ConfigKey, Event, EventHandler, Stream, StreamingEventHandler
from nexus.bus.memory import MemoryBus
from nexus.cli import main
from nexus.config import Settings
from nexus.errors import HandlerConfigError
from nexus.plugins import SERVER_KEYS, HandlerSpec, declared_config, discover, register_all
from nexus.provider import Provider, ProviderSettings
from nexus.server import NexusServer
from nexus.testing import run_server
from nexus.worker import declaration


class Pumps(EventHandler):
    event_type = "pumps:monitor"
    config_keys = (
        ConfigKey("window", int, 100, "Readings per window."),
        ConfigKey("label", str, None, "A name for the logs."),
        ConfigKey("limits", dict, None, "Per-pump limits."),
    )

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"window": self.ctx.config.get("window", 100)}


class Loose(EventHandler):
    """A plugin that declares nothing: it reads whatever its section holds."""

    event_type = "loose:thing"

    async def handle(self, event: Event) -> dict[str, Any]:
        return dict(self.ctx.config)


def register(handler_config: dict[str, dict[str, Any]], *specs: HandlerSpec) -> Provider:
    provider = Provider(MemoryBus(), ProviderSettings())
    register_all(provider, specs, handler_config)
    return provider


def pumps() -> HandlerSpec:
    return HandlerSpec("pumps.monitor", Pumps(), "test")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        pytest.param(
            {"pumps": {"windw": 5}},
            "[handlers.pumps] windw: the plugin 'pumps' has no such setting; did you mean 'window'? "
            "(its settings: label, limits, window)",
            id="typo-of-a-key",
        ),
        pytest.param({"pumps": {"window": "5"}}, "[handlers.pumps] window must be an integer, got '5'", id="type"),
        pytest.param({"pumps": {"window": 2.5}}, "[handlers.pumps] window must be an integer, got 2.5", id="fraction"),
        pytest.param({"pumps": {"monitor": {"labl": "x"}}}, "[handlers.pumps.monitor] labl:", id="nested-table"),
        pytest.param({"pumsp": {"window": 5}}, "did you mean 'pumps'?", id="typo-of-a-section"),
        pytest.param({"pumps.montor": {}}, "[handlers.pumps.montor]: no plugin or handler is named", id="handler"),
    ],
)
def test_unknown_sections_keys_and_wrong_types_are_refused_with_the_closest_name(
    section: dict[str, dict[str, Any]], message: str
) -> None:
    """A key the plugin does not declare, a value of another type, or a section naming no plugin stops the
    registration with the section, the key and what was probably meant."""
    with pytest.raises(HandlerConfigError) as caught:
        register(section, pumps())
    assert message in str(caught.value)


def test_declared_keys_of_the_right_type_and_server_keys_are_accepted() -> None:
    """Declared keys with fitting values (10.0 counts as an integer), the server's keys (log_dir, data_dir), a
    handler's nested table and a plugin that declares nothing all register."""
    config: dict[str, dict[str, Any]] = {
        "pumps": {"window": 10.0, "label": "north", "limits": {"p1": 3}, "data_dir": "/srv", "monitor": {"window": 3}},
        "pumps.monitor": {"window": 4},
        "loose": {"anything": [1, 2], "goes": True},
    }
    provider = register(config, pumps(), HandlerSpec("loose.thing", Loose(), "test"))
    assert provider.registrations["pumps.monitor"].config["window"] == 4
    assert provider.registrations["loose.thing"].config == {"anything": [1, 2], "goes": True}


def test_a_section_of_an_installed_plugin_that_is_not_loaded_is_no_error() -> None:
    """Configuring a built-in plugin while entry points are off (or it is excluded) is not a mistake."""
    register({"messaging": {"history_limit": 10}, "analytics.snapshot": {}}, pumps())


def test_nexus_serve_exits_2_at_a_typo_in_a_plugin_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in a built-in plugin's section stops `nexus serve` before anything listens: exit 2, one line."""
    config = tmp_path / "nexus.toml"
    config.write_text("[handlers.messaging]\nhistroy_limit = 5\n")
    assert main(["serve", "--config", str(config), "--grpc-port", "0", "--no-gateway", "--no-metrics"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("nexus: error: [handlers.messaging] histroy_limit: the plugin 'messaging' has no such")
    assert "did you mean 'history_limit'?" in error


async def test_a_server_with_an_unknown_key_does_not_start() -> None:
    """``run_server`` (and every NexusServer) refuses the same section before it starts."""
    with pytest.raises(HandlerConfigError, match="did you mean 'window'"):
        async with run_server(pumps(), handler_config={"pumps": {"windows": 1}}):
            pass


def test_nexus_handlers_shows_the_effective_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`nexus handlers --config FILE` prints each handler with its settings: the declared defaults, the file's
    values over them (a handler's own table last), and the node's data directory."""
    config = tmp_path / "nexus.toml"
    config.write_text(
        "[nexus]\ngrpc_port = 6001\n[handlers.messaging]\nhistory_limit = 20\n"
        '[handlers.messaging.stream_messages]\nlive_queue = 7\n[handlers.places]\nstay_rule = "centroid"\n'
    )
    assert main(["handlers", "--config", str(config)]) == 0
    listed = {item["name"]: item["config"] for item in map(json.loads, capsys.readouterr().out.splitlines())}
    send, stream = listed["messaging.send_message"], listed["messaging.stream_messages"]
    assert (send["history_limit"], send["live_queue"], send["typing_ttl_s"]) == (20, 1000, 5.0)
    assert (stream["history_limit"], stream["live_queue"]) == (20, 7)
    assert send["data_dir"].endswith("node-6001")
    assert listed["places.track_location"]["stay_rule"] == "centroid"
    assert listed["places.track_location"]["min_dwell_s"] == 120.0
    assert listed["anomalies.monitor"]["confidence"] == 0.99


class Recording(dict[str, Any]):
    """A ``ctx.config`` that notes every key a plugin looks up."""

    def __init__(self, values: dict[str, Any], seen: set[str]) -> None:
        super().__init__(values)
        self.seen = seen

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.seen.add(str(key))
        return super().__contains__(key)


async def test_the_built_in_plugins_declare_exactly_the_keys_they_read() -> None:
    """Every key a built-in plugin looks up while its handlers set up is declared (or is a server key), and every
    key it declares is looked up: the declarations, `nexus handlers` and the refusals match the code."""
    built_in = [spec for spec in discover(load_entry_points=True) if spec.source == "entry point nexus-bus"]
    assert {spec.name.split(".")[0] for spec in built_in} == {"analytics", "anomalies", "messaging", "places"}
    seen: dict[str, set[str]] = {}
    server = NexusServer(Settings(grpc_port=0, ws_port=0, gateway=False, metrics=False), handlers=built_in)
    for registration in server.provider.registrations.values():
        plugin = registration.name.split(".")[0]
        registration.config = Recording(registration.config, seen.setdefault(plugin, set()))
    await server.start()
    await server.stop(grace=1.0)
    declared = declared_config(server.provider.registrations.values())
    assert set(seen) == set(declared)
    for plugin, keys in seen.items():
        assert keys - set(SERVER_KEYS) - set(declared[plugin]) == set(), plugin
        assert set(declared[plugin]) - keys == set(), plugin


class Blocking(EventHandler):
    event_type = "sync:echo"

    def handle(self, event: Event) -> dict[str, Any]:  # type: ignore[override]
        return {}


class Yielding(StreamingEventHandler):
    event_type = "sync:stream_items"

    async def handle_stream(self, event: Event, stream: Stream) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        yield {"i": 1}


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        (Blocking(), "Blocking.handle must be 'async def', but it is a plain function"),
        (Yielding(), "Yielding.handle_stream must be 'async def', but it is an async generator (it yields)"),
    ],
)
def test_a_handler_whose_handle_is_not_a_coroutine_is_refused_with_the_reason(
    handler: EventHandler | StreamingEventHandler, reason: str
) -> None:
    """`def handle` (blocking the loop) and an async generator `handle_stream` are refused at registration, in
    process and by a worker before it declares the handler."""
    provider = Provider(MemoryBus(), ProviderSettings())
    with pytest.raises(HandlerConfigError, match=re.escape(reason)):
        provider.register(handler)
    with pytest.raises(HandlerConfigError, match=re.escape(reason)):
        declaration(handler, name="sync.handler", max_in_flight=1)


def test_a_declaration_that_cannot_be_checked_is_refused_where_it_is_written() -> None:
    """A key of a type settings cannot have, a default of another type or a bad name fails at import time;
    ``from_dataclass`` takes names, types and defaults from a settings dataclass."""
    with pytest.raises(ValueError, match="kind must be one of bool, int, float, str, list, dict"):
        ConfigKey("tags", set, None, "")
    with pytest.raises(ValueError, match="the default '10' is not an integer"):
        ConfigKey("window", int, "10", "")
    with pytest.raises(ValueError, match="a config key name is letters"):
        ConfigKey("max-window", int, 10, "")

    @dataclasses.dataclass(frozen=True)
    class Knobs:
        window: int = 100
        ratio: float = 0.5
        rule: str = "anchor"

    keys = ConfigKey.from_dataclass(Knobs, {"ratio": "How much."})
    assert [(k.name, k.kind, k.default, k.description) for k in keys] == [
        ("window", int, 100, ""),
        ("ratio", float, 0.5, "How much."),
        ("rule", str, "anchor", ""),
    ]
    assert keys[1].problem(1) is None
    assert keys[1].problem(float("nan")) == "must be a number, got nan"
    assert keys[0].problem(True) == "must be an integer, got True"
