"""The pytest plugin of :mod:`nexus.testing`, registered through the ``pytest11`` entry point ``nexus``.

Installing Nexus is all a project needs to test its handlers with pytest::

    from nexus.testing import run_server

    async def test_echo(nexus_server) -> None:
        nexus = await nexus_server(Echo())
        done = await nexus.client.call("demo:echo:v1:requested", {"x": 1})
        assert done.payload == {"echo": {"x": 1}}

- **Async tests run without configuration.** A coroutine test function that no async plugin claims (no
  ``anyio`` or ``asyncio`` marker, pytest-asyncio absent or in its default strict mode) is run by anyio's pytest
  plugin (anyio is a dependency of Nexus) on asyncio, the loop Nexus runs on. With pytest-asyncio in auto mode
  (``asyncio_mode = "auto"``), or anyio in auto mode, that plugin runs them and this one stays out of the way.
- **``nexus_server``**: a fixture that starts servers: ``await nexus_server(*handlers, **settings)`` returns a
  running :class:`~nexus.testing.TestServer` (``run_server``'s arguments: ``gateway=True``,
  ``heartbeat_interval=0.05``, ...), stopped when the test ends.

``pytest -p no:nexus`` turns the plugin off.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

import pytest

from nexus.api import AnyHandler
from nexus.plugins import HandlerSpec
from nexus.testing import TestServer, run_server

ASYNC_MARKERS = ("anyio", "asyncio")
"""Markers that say another plugin runs a coroutine test already."""


class ServerFactory(Protocol):
    """``nexus_server``: start a server with these handlers and settings; it stops when the test ends."""

    def __call__(self, *handlers: AnyHandler | HandlerSpec, **options: Any) -> Awaitable[TestServer]: ...


def _auto_mode(config: pytest.Config, name: str) -> bool:
    """Whether ``--<name>`` or the ini option ``name`` (``asyncio_mode``, ``anyio_mode``) says ``auto``."""
    try:
        option = config.getoption(name, default=None)
        ini = config.getini(name)
    except ValueError:  # the plugin that declares the option is not loaded
        return False
    return "auto" in (option, ini)


def _another_plugin_runs_every_async_test(config: pytest.Config) -> bool:
    if config.pluginmanager.has_plugin("asyncio") and _auto_mode(config, "asyncio_mode"):
        return True
    return config.pluginmanager.has_plugin("anyio") and _auto_mode(config, "anyio_mode")


def _claimed(collector: pytest.Module | pytest.Class, obj: object) -> bool:
    own = [mark.name for mark in getattr(obj, "pytestmark", ())]
    return any(name in own or collector.get_closest_marker(name) is not None for name in ASYNC_MARKERS)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Module | pytest.Class, name: str, obj: object) -> Any:
    """Hand a coroutine test no plugin claims to anyio, on asyncio (before anyio's own collection hook looks)."""
    inner = getattr(getattr(obj, "hypothesis", None), "inner_test", obj)  # a Hypothesis test wraps the coroutine
    if (
        collector.istestfunction(obj, name)
        and inspect.iscoroutinefunction(inner)
        and not _claimed(collector, obj)
        and not _another_plugin_runs_every_async_test(collector.config)
        and collector.config.pluginmanager.has_plugin("anyio")
    ):
        pytest.mark.anyio(obj)
        pytest.mark.parametrize("anyio_backend", ["asyncio"])(obj)
    yield


@pytest.fixture
async def nexus_server() -> AsyncIterator[ServerFactory]:
    """Start in-process servers on free ports: ``nexus = await nexus_server(Echo(), gateway=True)``.

    Each call runs :func:`~nexus.testing.run_server` with its arguments and returns the
    :class:`~nexus.testing.TestServer` (``nexus.client``, ``nexus.record(...)``, ``nexus.ws_url``); every server
    started stops, in reverse order, when the test ends.
    """
    async with contextlib.AsyncExitStack() as stack:

        async def start(*handlers: AnyHandler | HandlerSpec, **options: Any) -> TestServer:
            return await stack.enter_async_context(run_server(*handlers, **options))

        yield start
