"""The manager's status directory (``STAT_PATH``): a ``<pid>.stat`` file
(4.8's grammar) and a ``<pid>.counters`` file for each server it started,
and a lock so that one manager acts at a time."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attrs import frozen

from stapsrv.config.files import ConfigError, ServerSettings, read_server_file, render_status
from stapsrv.core import counters as request_counters


@frozen
class StatusDirectory:
    path: Path

    def managed(self) -> list[tuple[int, ServerSettings]]:
        """Status files in name order (only ``<pid>.stat``)."""
        found = []
        try:
            entries = sorted(self.path.iterdir(), key=lambda p: p.name)
        except OSError:
            return []
        for path in entries:
            if path.suffix == ".stat" and path.stem.isdigit():
                found.append((int(path.stem), read_server_file(path)))
        return found

    def status_file(self, pid: int | str) -> Path:
        return self.path / f"{pid}.stat"

    def counters_file(self, pid: int) -> Path:
        return self.path / f"{pid}.counters"

    def record(self, pid: int, settings: ServerSettings) -> None:
        self.status_file(pid).write_text(render_status(settings))

    def recorded(self, pid: int, fallback: ServerSettings) -> ServerSettings:
        """What the server's status file says (else ``fallback``)."""
        try:
            return read_server_file(self.status_file(pid))
        except (OSError, ConfigError):
            return fallback

    def forget(self, pid: int) -> None:
        for path in (self.status_file(pid), self.counters_file(pid)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def counters(self, pid: int) -> request_counters.Counters | None:
        try:
            text = self.counters_file(pid).read_text()
        except OSError:
            return None
        return request_counters.parse(text)

    def counters_line(self, pid: int) -> str:
        """The running server's request counters, as a status line."""
        values = self.counters(pid)
        return request_counters.describe(values) if values is not None else ""

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One manager at a time per status directory (4.8 had no lock)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / ".lock", "a")
        except OSError:
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


def remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
