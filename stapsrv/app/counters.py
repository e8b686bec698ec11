"""The service that writes the request counters for ``stap-server status``.

The counters file holds one line (:mod:`stapsrv.core.counters`).  The
server opens it once and rewrites it in place through that descriptor, so
the manager may rename the file after the start (to
``STAT_PATH/<pid>.counters``) and still read fresh values.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from stapsrv.core.counters import Counters, render


class CountersFileService(Service):
    """Rewrites the counters file when the values change (at most every
    ``interval`` seconds) and once more when the server stops."""

    log = Logger()

    def __init__(self, path: Path, snapshot: Callable[[], Counters], clock: IReactorTime,
                 interval: float = 0.5) -> None:
        self.path = path
        self.snapshot = snapshot
        self.interval = interval
        self._clock = clock
        self._fd: int | None = None
        self._written: str | None = None
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        Service.startService(self)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self.log.warn("Cannot write request counters to {path}: {error}",
                          path=self.path, error=exc)
            return
        self._loop = LoopingCall(self.write)
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
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.write()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
