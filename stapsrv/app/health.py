"""Whether a server can serve: what ``/healthz`` answers (and a load
balancer's health check reads)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from attrs import frozen

#: Free space, in bytes, below which a server's temporary or cache
#: directory counts as full: a compile writes a few to tens of MiB there.
MIN_FREE_BYTES = 256 * 1024 * 1024


@frozen
class Check:
    name: str
    ok: bool
    detail: str


@frozen
class Health:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def text(self) -> str:
        """One line per check, ``ok``/``FAIL`` first; the verdict on top."""
        lines = ["ok" if self.ok else "unhealthy"]
        lines += [f"{'ok' if check.ok else 'FAIL'} {check.name}: {check.detail}"
                  for check in self.checks]
        return "\n".join(lines) + "\n"


def translator_check(stap: str) -> Check:
    """The translator can be started by this server's user."""
    if os.access(stap, os.R_OK | os.X_OK):
        return Check("translator", True, stap)
    return Check("translator", False, f"{stap} cannot be run by this user")


def space_check(directories: Iterable[Path], floor: int = MIN_FREE_BYTES,
                usage: Callable[[Path], int] = lambda path: shutil.disk_usage(path).free
                ) -> Check:
    """Each directory (or its nearest existing parent) has ``floor`` bytes free."""
    details = []
    ok = True
    for directory in directories:
        existing = directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            free = usage(existing)
        except OSError as exc:
            ok = False
            details.append(f"{directory}: {exc.strerror}")
            continue
        if free < floor:
            ok = False
        details.append(f"{directory}: {free >> 20} MiB free")
    return Check("disk space", ok, "; ".join(details) + f" (floor {floor >> 20} MiB)")


def listening_check(listening: bool, where: str) -> Check:
    return Check("listening", listening, where if listening else "not listening")
