"""What every test shares: nothing the suite writes lands in the user's home, and the logging set-up a test changes
(an in-process ``nexus ...`` command configures it) is put back after it, so no test depends on which ran before it
in the same process.

A node keeps its data under ``$XDG_DATA_HOME/nexus/node-<grpc port>`` unless told otherwise (messaging's SQLite
database, for one); every test, and every ``nexus serve`` a test starts, gets a fresh directory for it instead of
``~/.local/share``. Servers that module- or session-scoped fixtures start (before any test's own directory
exists) get the session's.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import structlog

import nexus.logs

# With COVERAGE_PROCESS_START set (bash scripts/test), coverage measures pytest and each of its xdist workers from
# their first line. A worker (the controller still has to pass it on to the workers it starts) takes it out of its
# environment, so the `nexus serve` and `nexus worker` processes tests start are left unmeasured: tracing them made
# the servers, and the tests that time them, several times slower.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.pop("COVERAGE_PROCESS_START", None)

# The test process never configures logging, so what its in-process servers log goes through structlog's default
# ConsoleRenderer, which renders each traceback with rich when it is installed: syntax-highlighting the source of
# every frame costs ~0.7 s per traceback, and many tests provoke them (handlers that raise, refusals). The
# plain formatter writes the same frames. It is set on the default renderer itself, which `_restore_logging` puts
# back after every test that configures logging.
for _processor in structlog.get_config()["processors"]:
    if isinstance(_processor, structlog.dev.ConsoleRenderer):
        _processor.exception_formatter = structlog.dev.plain_traceback


def _data_home() -> Iterator[None]:
    directory = tempfile.mkdtemp(prefix="nexus-test-data-")
    previous = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = directory
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("XDG_DATA_HOME", None)
        else:
            os.environ["XDG_DATA_HOME"] = previous
        shutil.rmtree(directory, ignore_errors=True)


_session_data_home = pytest.fixture(scope="session", autouse=True)(_data_home)
_private_data_home = pytest.fixture(autouse=True)(_data_home)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Put the root logger, structlog and Nexus's own handler back as they were before the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    handler = nexus.logs._handler
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)
    nexus.logs._handler = handler
