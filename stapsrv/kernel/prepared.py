"""Releases prepared before any client asks (``--prepare-releases``):
which releases of the suites' lists are worth preparing, and the record
of each preparation, kept with the kernel store
(``STORE/.prepared/<release>.json``, replaced atomically) for ``kernels
list``, ``stap-server status --json`` and the metrics.

A record says when the release was first seen in the lists, how long each
step took (fetch, symbols, the kernel configuration headers, the VM
verification), when it became ready (or why it did not), and which host
did the work.  Blocking file work (small files); the selection is pure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from attrs import asdict, frozen

from stapsrv.kernel import records
from stapsrv.kernel.store import valid_release

PREPARED_DIRECTORY = ".prepared"
#: Bytes a record may have (a few hundred in practice).
MAX_RECORD = 1 << 16
#: A time past this (the year 10000) is no time a record was made.
MAX_WHEN = 253402300800.0
_HEADERS = "linux-headers-"
#: Packages named like releases that are none (the shared headers).
_NOT_RELEASES = re.compile(r"-common(-rt)?$")


@frozen
class Preparation:
    """One release prepared (or being prepared) by the server."""

    release: str
    #: When the server first saw it in the suites' lists (epoch seconds).
    seen: float
    #: (step, seconds) in the order they ran.
    steps: tuple[tuple[str, float], ...] = ()
    #: When it became ready (None: not yet, or it failed).
    ready: float | None = None
    #: Why it did not become ready (one line; "" when it did or still may).
    failure: str = ""
    #: The host that did the work.
    by: str = ""

    @property
    def to_ready(self) -> float | None:
        """Seconds from its appearance in the lists to ready."""
        return None if self.ready is None else max(0.0, self.ready - self.seen)

    def state(self) -> str:
        if self.ready is not None:
            return "ready"
        return "failed" if self.failure else "preparing"

    def summary(self) -> str:
        """One line: the state, the time to ready and each step's time."""
        steps = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.steps)
        if self.ready is not None:
            text = f"ready {self.to_ready:.1f} s after it appeared in the lists"
        elif self.failure:
            text = f"not ready: {self.failure}"
        else:
            text = "being prepared"
        return text + (f" ({steps})" if steps else "") + (f" by {self.by}" if self.by else "")

    def as_json(self) -> dict[str, Any]:
        found = asdict(self)
        found["steps"] = [[name, seconds] for name, seconds in self.steps]
        found["state"] = self.state()
        found["to_ready"] = self.to_ready
        return found


def _when(value: object) -> float:
    when = float(value)  # type: ignore[arg-type]
    if not math.isfinite(when) or not 0 <= when < MAX_WHEN:
        raise ValueError(f"not a time: {value!r}")
    return when


def from_json(found: dict[str, Any]) -> Preparation:
    ready = found.get("ready")
    return Preparation(str(found["release"]), _when(found["seen"]),
                       tuple((str(name), float(seconds)) for name, seconds in found["steps"]),
                       None if ready is None else _when(ready), str(found.get("failure", "")),
                       str(found.get("by", "")))


def directory_of(store: Path) -> Path:
    return store / PREPARED_DIRECTORY


def save(store: Path, record: Preparation) -> Path:
    return records.save(directory_of(store), record)


def load(store: Path, release: str) -> Preparation | None:
    """The record of ``release``; None when there is none or it is damaged."""
    return records.load(directory_of(store), release, from_json, MAX_RECORD)


def load_all(store: Path) -> list[Preparation]:
    return records.load_all(directory_of(store), from_json, MAX_RECORD)


def remove(store: Path, release: str) -> bool:
    return records.remove(directory_of(store), release)


# --- which releases to prepare (pure) ------------------------------------------------


def listed_releases(packages: Iterable[str], allowed: Callable[[str], bool]) -> list[str]:
    """The releases whose ``linux-headers-<release>`` the lists hold and
    the fetch policy allows (``allowed``), newest of each kernel series
    and flavour only: an older ABI still in the lists is one no host is
    about to boot into."""
    found = sorted({name[len(_HEADERS):] for name in packages if name.startswith(_HEADERS)})
    releases = [release for release in found
                if valid_release(release) and release[:1].isdigit()
                and not _NOT_RELEASES.search(release)
                and allowed(release)]
    newest: dict[tuple[str, str], str] = {}
    for release in releases:
        group = _group(release)
        if group not in newest or _version_key(release) > _version_key(newest[group]):
            newest[group] = release
    return sorted(newest.values(), key=_version_key)


def _group(release: str) -> tuple[str, str]:
    """(kernel series, flavour): ``6.1.0-28-cloud-amd64`` is ("6.1", "cloud-amd64")."""
    words = release.split("-")
    flavour: list[str] = []
    while len(words) > 1 and words[-1][:1].isalpha():
        flavour.insert(0, words.pop())
    series = ".".join(re.split(r"[.+]", words[0])[:2]) if words else ""
    return series, "-".join(flavour)


def _version_key(release: str) -> tuple[tuple[int, str], ...]:
    return tuple((int(part), "") if part.isdigit() else (-1, part)
                 for part in re.split(r"[.+\-]", release) if part)
