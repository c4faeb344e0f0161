"""Worker processes seen from ``nexus bench``: start one, send it commands, read its CPU and RSS, stop it.

Every worker started is remembered until stopped, so :func:`stop_all` ends them all whatever happened
(an error, a timeout, Ctrl-C); a worker also exits by itself when its stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from nexus.bench.stats import cpu_seconds, rss_bytes
from nexus.errors import Unavailable

_LIVE: set[Worker] = set()


class WorkerError(Unavailable):
    """A worker did not start, answered with an error, or took too long."""


class Worker:
    """One ``python -m nexus.bench.workers ROLE`` process."""

    def __init__(self, role: str, args: dict[str, Any]) -> None:
        self.role = role
        self.args = args
        self.process: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, timeout: float = 120) -> Worker:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nexus.bench.workers",
            self.role,
            json.dumps(self.args),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            limit=1 << 22,
            env=env,
        )
        _LIVE.add(self)
        self.info = await self._reply(timeout)
        if not self.info.get("ready"):
            await self.stop()
            raise WorkerError(f"{self.role} did not start: {self.info.get('error', 'no reason given')}")
        return self

    async def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.process is not None
        assert self.process.stdout is not None

        async def read() -> dict[str, Any]:
            assert self.process is not None
            assert self.process.stdout is not None
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    raise WorkerError(f"{self.role} exited (code {await self.process.wait()})")
                with contextlib.suppress(ValueError):
                    data = json.loads(line)
                    if isinstance(data, dict):
                        return data

        try:
            return await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            raise WorkerError(f"{self.role} did not answer within {timeout:g} s") from None

    async def call(self, timeout: float = 300, **command: Any) -> dict[str, Any]:
        """Send one command and return the worker's answer (raises :class:`WorkerError` on an error)."""
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()
        reply = await self._reply(timeout)
        if "error" in reply:
            raise WorkerError(f"{self.role} {command.get('op')}: {reply['error']}")
        return reply

    def cpu(self) -> float:
        """CPU seconds the worker has used (``/proc/<pid>/stat``)."""
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        """The worker's resident set size in bytes (``/proc/<pid>/status``)."""
        return rss_bytes(self.pid)

    async def stop(self) -> None:
        """Ask the worker to stop; kill it when it does not within a few seconds."""
        process = self.process
        _LIVE.discard(self)
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(Exception):
            assert process.stdin is not None
            process.stdin.write(b'{"op": "stop"}\n')
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 15)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(process.wait(), 5)


def kill_all() -> None:
    """Kill every worker still running (synchronous: safe from a ``finally`` after Ctrl-C)."""
    for worker in list(_LIVE):
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
        _LIVE.discard(worker)


@asynccontextmanager
async def worker(role: str, args: dict[str, Any], timeout: float = 120) -> AsyncIterator[Worker]:
    """One worker for the length of the block."""
    started = Worker(role, args)
    try:
        await started.start(timeout)
        yield started
    finally:
        await started.stop()
