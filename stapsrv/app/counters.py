"""Request counters, and the service that writes them for ``stap-server status``.

The counters file holds one line, ``requests=N failures=N cache_hits=N
compiling=N waiting=N``.  The server opens it once and rewrites it in place
through that descriptor, so the manager may rename the file after the
start (to ``STAT_PATH/<pid>.counters``) and still read fresh values.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import define
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

FIELDS = ("requests", "failures", "cache_hits", "compiling", "waiting")
_LINE = re.compile(r"(\w+)=(\d+)")


@define
class Counters:
    """What one server has done since it started."""

    requests: int = 0
    failures: int = 0
    cache_hits: int = 0
    compiling: int = 0
    waiting: int = 0


def render(counters: Counters) -> str:
    return " ".join(f"{name}={getattr(counters, name)}" for name in FIELDS) + "\n"


def parse(text: str) -> Counters | None:
    """Counters from a file's text; None when it is not (yet) complete."""
    values = {name: int(value) for name, value in _LINE.findall(text)}
    if not text.endswith("\n") or set(values) != set(FIELDS):
        return None
    return Counters(**values)


def describe(counters: Counters) -> str:
    """The line ``stap-server status`` prints under a running server."""
    return (f"  requests {counters.requests}, failures {counters.failures}, "
            f"cache hits {counters.cache_hits}, compiling {counters.compiling}, "
            f"waiting {counters.waiting}\n")


class CountersFileService(Service):
    """Rewrites the counters file when the values change (at most every
    ``interval`` seconds) and once more when the server stops."""

    log = Logger()

    def __init__(self, path: Path, snapshot: Callable[[], Counters], clock: Any = None,
                 interval: float = 0.5) -> None:
        self.path = path
        self.snapshot = snapshot
        self.interval = interval
        self._clock = clock
        self._fd: int | None = None
        self._written: str | None = None
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self.log.warn("Cannot write request counters to {path}: {error}",
                          path=self.path, error=exc)
            return
        self._loop = LoopingCall(self.write)
        if self._clock is not None:
            self._loop.clock = self._clock
        self._loop.start(self.interval, now=True)

    def write(self) -> None:
        if self._fd is None:
            return
        text = render(self.snapshot())
        if text == self._written:
            return
        data = text.encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError as exc:
            self.log.warn("Cannot write request counters to {path}: {error}",
                          path=self.path, error=exc)
            return
        self._written = text

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.write()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
