"""Handler discovery: entry points of the group ``nexus.handlers`` and ``module:Class`` specs.

A plugin package declares its handlers in its own ``pyproject.toml``::

    [project.entry-points."nexus.handlers"]
    countdown = "my_plugin.handlers:Countdown"

:func:`discover` imports each, checks that it is an :class:`~nexus.EventHandler` or
:class:`~nexus.StreamingEventHandler` subclass and builds it with no arguments. Anything that goes wrong raises
:class:`~nexus.errors.HandlerConfigError` naming the entry point or spec and the cause, at start-up.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog

from nexus.api import AnyHandler, EventHandler, StreamingEventHandler, plugin_name
from nexus.errors import HandlerConfigError, did_you_mean
from nexus.schema import ConfigKey

if TYPE_CHECKING:
    from nexus.provider import Provider, Registration

ENTRY_POINT_GROUP: Final = "nexus.handlers"
HANDLER_FLAG_SOURCE: Final = "--handler"

_DOTTED: Final = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_SPEC_RE: Final = re.compile(rf"({_DOTTED}):({_DOTTED})\Z")

HandlerClass = type[EventHandler] | type[StreamingEventHandler]


@dataclasses.dataclass(slots=True)
class HandlerSpec:
    """A handler instance ready to register, with its registration name and where it came from."""

    name: str
    """The entry-point name, or the ``module:Class`` spec given with ``--handler``."""
    handler: AnyHandler
    source: str
    """``entry point <distribution>`` or ``--handler``."""


def split_spec(spec: str) -> tuple[str, str]:
    """``(module, attribute)`` of a ``module:Class`` spec; raises :class:`HandlerConfigError` for another shape."""
    match = _SPEC_RE.match(spec.strip())
    if match is None:
        raise HandlerConfigError(f"{spec!r} is not a 'package.module:Class' spec")
    return match.group(1), match.group(2)


def _import_class(spec: str) -> HandlerClass:
    """The handler class ``spec`` names; raises :class:`HandlerConfigError` with the cause only."""
    module_name, attribute = split_spec(spec)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise HandlerConfigError(f"module {module_name!r} not found") from exc
        raise HandlerConfigError(f"importing module {module_name!r} failed: {_describe(exc)}") from exc
    except Exception as exc:
        raise HandlerConfigError(f"importing module {module_name!r} failed: {_describe(exc)}") from exc

    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerConfigError(f"module {module_name!r} has no attribute {attribute!r}") from None

    if not isinstance(target, type) or not issubclass(target, (EventHandler, StreamingEventHandler)):
        what = f"class {target.__name__}" if isinstance(target, type) else f"a {type(target).__name__}"
        raise HandlerConfigError(
            f"{attribute!r} is not a handler class ({what}): it must subclass nexus.EventHandler or "
            "nexus.StreamingEventHandler"
        )
    return target


def load_handler_class(spec: str) -> HandlerClass:
    """Import the handler class named by ``module:Class`` (``module:Outer.Inner`` for a nested class).

    Raises :class:`HandlerConfigError` naming ``spec`` and the cause: a malformed spec, a module that is not
    found or fails to import, a missing attribute, or something that is not a handler class.
    """
    try:
        return _import_class(spec)
    except HandlerConfigError as exc:
        raise HandlerConfigError(f"handler {spec!r}: {exc}") from exc.__cause__


def _instantiate(cls: HandlerClass, label: str) -> AnyHandler:
    try:
        return cls()
    except Exception as exc:
        raise HandlerConfigError(f"{label}: constructor of {cls.__qualname__} failed: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load(spec: str, label: str) -> AnyHandler:
    try:
        cls = _import_class(spec)
    except HandlerConfigError as exc:
        raise HandlerConfigError(f"{label}: {exc}") from exc.__cause__
    return _instantiate(cls, label)


def _entry_point_handlers(exclude: Sequence[str]) -> list[HandlerSpec]:
    log = structlog.get_logger("nexus.plugins")
    found = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    names = {entry_point.name for entry_point in found}
    for name in exclude:
        if name not in names:
            log.warning("excluded_handler_not_installed", name=name, group=ENTRY_POINT_GROUP)
    specs: list[HandlerSpec] = []
    for entry_point in found:
        if entry_point.name in exclude:
            log.info("handler_excluded", name=entry_point.name)
            continue
        dist = entry_point.dist.name if entry_point.dist is not None else "unknown distribution"
        label = f"entry point {entry_point.name!r} = {entry_point.value!r} (from {dist})"
        try:
            handler = _load(entry_point.value, label)
        except HandlerConfigError as exc:
            raise HandlerConfigError(
                f"{exc}; fix or uninstall {dist}, or skip this entry point with --exclude {entry_point.name}"
            ) from exc.__cause__
        specs.append(HandlerSpec(entry_point.name, handler, f"entry point {dist}"))
    return specs


def discover(
    load_entry_points: bool = True, extra: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[HandlerSpec]:
    """Build every handler to serve: the entry points of ``nexus.handlers`` (sorted by name, unless
    ``load_entry_points`` is false, skipping the names in ``exclude``), then each ``module:Class`` in ``extra``.

    Raises :class:`HandlerConfigError` naming the entry point or spec and the cause, or two handlers that
    would share a registration name.
    """
    specs = _entry_point_handlers(exclude) if load_entry_points else []
    for spec in extra:
        label = f"{HANDLER_FLAG_SOURCE} {spec!r}"
        specs.append(HandlerSpec(spec, _load(spec, label), HANDLER_FLAG_SOURCE))
    seen: dict[str, HandlerSpec] = {}
    for item in specs:
        other = seen.setdefault(item.name, item)
        if other is not item:
            raise HandlerConfigError(
                f"two handlers are named {item.name!r}: one from {other.source}, one from {item.source}"
            )
    return specs


def config_for(
    name: str, handler_config: Mapping[str, Mapping[str, Any]], defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``ctx.config`` of the handler registered as ``name``.

    A plugin with several handlers names its entry points ``<plugin>.<handler>`` (``places.track_location``);
    each gets the plugin's section ``[handlers.<plugin>]`` with its own ``[handlers.<plugin>.<handler>]``
    (TOML: a nested table) or ``[handlers."<name>"]`` laid over it. Everything is laid over ``defaults``: the
    server settings shared with plugins (:meth:`nexus.config.Settings.plugin_defaults`, e.g. ``log_dir``).
    """
    plugin = plugin_name(name)
    config: dict[str, Any] = dict(defaults or {})
    shared = handler_config.get(plugin, {})
    config.update({k: v for k, v in shared.items() if not isinstance(v, Mapping)})
    nested = shared.get(name.split(".", 1)[1]) if "." in name else None
    if isinstance(nested, Mapping):
        config.update(nested)
    if name != plugin:
        config.update(handler_config.get(name, {}))
    return config


SERVER_KEYS: Final = ("log_dir", "data_dir")
"""Keys every plugin's ``ctx.config`` gets from the server's settings (a section may set its own)."""


class Named(Protocol):
    """A handler with its registration name: a :class:`~nexus.provider.Registration` (no handler: only workers
    serve it) or a :class:`HandlerSpec`."""

    @property
    def name(self) -> str: ...

    @property
    def handler(self) -> AnyHandler | None: ...


def declared_config(registrations: Iterable[Named]) -> dict[str, dict[str, ConfigKey]]:
    """The settings each plugin declares (``config_keys`` of its handlers, together), by plugin and key name.

    Raises :class:`HandlerConfigError` for a declaration that is not a :class:`~nexus.ConfigKey`, or two handlers of
    one plugin declaring a key differently.
    """
    declared: dict[str, dict[str, ConfigKey]] = {}
    for registration in registrations:
        keys = getattr(type(registration.handler), "config_keys", ())
        plugin = plugin_name(registration.name)
        for key in keys:
            if not isinstance(key, ConfigKey):
                raise HandlerConfigError(f"{registration.name}: config_keys must hold ConfigKeys, not {key!r}")
            other = declared.setdefault(plugin, {}).setdefault(key.name, key)
            if (other.kind, other.default) != (key.kind, key.default):
                raise HandlerConfigError(
                    f"{registration.name}: declares the setting {key.name!r} of the plugin {plugin!r} as "
                    f"{key.kind.__name__} = {key.default!r}, another of its handlers as "
                    f"{other.kind.__name__} = {other.default!r}"
                )
    return declared


def installed_names() -> set[str]:
    """The names of the installed ``nexus.handlers`` entry points (loaded or not)."""
    return {entry_point.name for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def check_handler_config(
    handler_config: Mapping[str, Mapping[str, Any]],
    registrations: Iterable[Named],
    installed: Iterable[str] = (),
) -> None:
    """Refuse, at start-up, a ``[handlers.<name>]`` section that names no plugin or handler, and in the section of a
    plugin that declares its settings (``config_keys``) a key it does not declare or a value of the wrong type.

    A section may name a registered handler or its plugin, or an ``installed`` entry point that is not loaded
    (excluded, or entry points off): configuring it is no mistake. Raises :class:`HandlerConfigError` naming the
    section and key, with the closest known name.
    """
    registered = list(registrations)
    names = {r.name for r in registered} | set(installed)
    plugins = {plugin_name(name) for name in names}
    declared = declared_config(registered)
    for section, values in handler_config.items():
        if section not in names | plugins:
            raise HandlerConfigError(
                f"[handlers.{section}]: no plugin or handler is named {section!r}"
                f"{did_you_mean(section, plugins)} (plugins here: {', '.join(sorted(plugins)) or 'none'})"
            )
        keys = declared.get(plugin_name(section))
        if not keys:
            continue  # a plugin that declares nothing reads what it wants
        for key, value in values.items():
            nested = f"{section}.{key}"
            if section in plugins and isinstance(value, Mapping) and nested in names:
                _check_keys(nested, value, keys)  # [handlers.<plugin>.<handler>]: that handler's own values
            else:
                _check_keys(section, {key: value}, keys)


def _check_keys(section: str, values: Mapping[str, Any], keys: Mapping[str, ConfigKey]) -> None:
    plugin = plugin_name(section)
    for key, value in values.items():
        declared = keys.get(key)
        if declared is None:
            if key in SERVER_KEYS:
                continue
            raise HandlerConfigError(
                f"[handlers.{section}] {key}: the plugin {plugin!r} has no such setting"
                f"{did_you_mean(key, [*keys, *SERVER_KEYS])} (its settings: {', '.join(sorted(keys))})"
            )
        problem = declared.problem(value)
        if problem is not None:
            raise HandlerConfigError(f"[handlers.{section}] {key} {problem}")


def effective_config(registration: Registration) -> dict[str, Any]:
    """A handler's settings as it runs with them: its plugin's declared defaults, overlaid with its ``ctx.config``."""
    keys = getattr(type(registration.handler), "config_keys", ())
    defaults = {key.name: key.default for key in keys if isinstance(key, ConfigKey) and key.default is not None}
    return {**defaults, **registration.config}


def register_all(
    provider: Provider,
    specs: Iterable[HandlerSpec],
    handler_config: Mapping[str, Mapping[str, Any]],
    defaults: Mapping[str, Any] | None = None,
) -> list[Registration]:
    """Register each handler with its ``[handlers.<name>]`` section (over ``defaults``) as ``ctx.config``.

    A provider's refusal is re-raised naming where the handler came from. Then every section is checked
    (:func:`check_handler_config`) against the handlers registered so far and the installed entry points.
    """
    registrations: list[Registration] = []
    for spec in specs:
        config = config_for(spec.name, handler_config, defaults)
        try:
            registration = provider.register(spec.handler, name=spec.name, config=config)
        except HandlerConfigError as exc:
            raise HandlerConfigError(f"{exc} (loaded from {spec.source})") from exc
        registrations.append(registration)
    check_handler_config(handler_config, provider.registrations.values(), installed_names())
    return registrations
