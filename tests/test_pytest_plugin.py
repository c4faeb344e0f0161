"""The README's testing example runs as written in a new project: the ``nexus`` pytest plugin (entry point
``pytest11``) runs async tests with no configuration and gives the ``nexus_server`` fixture.

The example is taken from the README's text (the tour's ``countdown.py`` and the ``test_countdown.py`` that tests
it), written into an empty project directory, and run by pytest in a subprocess with the installed package.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nexus.pytest_plugin import ServerFactory
from nexus.testing import TestServer

ROOT = Path(__file__).resolve().parent.parent
GUARD = 120.0


def python_block_after(text: str, marker: str) -> str:
    """The first fenced Python block after ``marker`` in ``text``."""
    rest = text[text.index(marker) :]
    match = re.search(r"```python\n(.*?)```", rest, re.DOTALL)
    assert match is not None, f"no python block after {marker!r}"
    return match.group(1)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A new project holding the README's handler module and its test module, nothing else."""
    readme = (ROOT / "README.md").read_text()
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "countdown.py").write_text(python_block_after(readme, "Write a handler (`countdown.py`"))
    (directory / "test_countdown.py").write_text(python_block_after(readme, "Test it in three lines"))
    (directory / "pyproject.toml").write_text('[project]\nname = "my-plugin"\nversion = "0.1.0"\n')
    return directory


def run_pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m pytest ARGS`` in ``project``, as its author would run it (this repository not on the path)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("NEXUS_", "PYTEST_"))}
    env.pop("PYTHONPATH", None)
    env["XDG_DATA_HOME"] = str(project / "data")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=GUARD,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ini", "args"),
    [
        pytest.param("", (), id="pytest-asyncio-installed-strict"),
        pytest.param("", ("-p", "no:asyncio"), id="no-pytest-asyncio"),
        pytest.param("[pytest]\nasyncio_mode = auto\n", (), id="pytest-asyncio-auto"),
    ],
)
def test_the_readme_testing_example_passes_in_a_new_project(project: Path, ini: str, args: tuple[str, ...]) -> None:
    """The README's two tests (``run_server`` and the ``nexus_server`` fixture) pass as written, whether
    pytest-asyncio is absent, installed but unconfigured, or in auto mode."""
    if ini:
        (project / "pytest.ini").write_text(ini)
    result = run_pytest(project, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b2 passed\b", result.stdout), result.stdout
    assert "not natively supported" not in result.stdout + result.stderr


@pytest.mark.slow
def test_without_the_plugin_the_example_does_not_run(project: Path) -> None:
    """The plugin is what makes it work: with ``-p no:nexus`` pytest refuses the async tests and lacks the fixture."""
    result = run_pytest(project, "-p", "no:nexus", "-p", "no:asyncio")
    assert result.returncode != 0
    assert "fixture 'nexus_server' not found" in result.stdout
    assert "async def functions are not natively supported" in result.stdout


async def test_servers_of_the_fixture_run_until_the_test_ends(nexus_server: ServerFactory) -> None:
    """Each call starts another server with the given settings; both serve at once (they stop after the test)."""
    from nexus import Event, EventHandler

    class Echo(EventHandler):
        event_type = "fixture:echo"

        async def handle(self, event: Event) -> dict[str, object]:
            return {"echo": event.payload}

    first: TestServer = await nexus_server(Echo())
    second = await nexus_server(Echo(), gateway=True)
    assert first.address != second.address
    assert second.ws_url.startswith("ws://127.0.0.1:")
    for nexus in (first, second):
        done = await nexus.client.call("fixture:echo:v1:requested", {"n": 1})
        assert (done.state, done.payload) == ("success", {"echo": {"n": 1}})
