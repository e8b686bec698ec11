"""What verifying a release found, kept with the release in the kernel
store (``STORE/.verified/<release>.json``, replaced atomically) for
``kernels list``, ``stap-server status --json`` and the metrics.  Blocking
file work (small files)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from attrs import asdict, frozen

from stapsrv.kernel import records

VERIFIED_DIRECTORY = ".verified"
#: Bytes a record may have (a few kilobytes in practice).
MAX_RECORD = 1 << 20
#: A time past this (the year 10000) is no time a record was made.
MAX_WHEN = 253402300800.0


@frozen
class ProbeResult:
    """One probe kind's module, for one client, on the release's kernel:
    ``runs``, else ``failure`` (one line)."""

    client: str
    probe: str
    runs: bool
    failure: str = ""


@frozen
class Verification:
    release: str
    #: When it ended (seconds since the epoch).
    when: float
    #: The translator that built the modules (``stap -V``'s first line).
    translator: str
    results: tuple[ProbeResult, ...]

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(result.runs for result in self.results)

    def summary(self) -> str:
        running = sum(result.runs for result in self.results)
        return f"{running}/{len(self.results)} run"

    def as_json(self) -> dict[str, Any]:
        found = asdict(self)
        found["results"] = [asdict(result) for result in self.results]
        found["passed"] = self.passed
        return found


def from_json(found: dict[str, Any]) -> Verification:
    when = float(found["when"])
    if not math.isfinite(when) or not 0 <= when < MAX_WHEN:
        raise ValueError(f"not a time: {when!r}")
    return Verification(str(found["release"]), when, str(found["translator"]),
                        tuple(ProbeResult(str(r["client"]), str(r["probe"]), bool(r["runs"]),
                                          str(r.get("failure", "")))
                              for r in found["results"]))


def directory_of(store: Path) -> Path:
    return store / VERIFIED_DIRECTORY


def save(store: Path, record: Verification) -> Path:
    return records.save(directory_of(store), record)


def load(store: Path, release: str) -> Verification | None:
    """The record of ``release``; None when there is none or it is damaged."""
    return records.load(directory_of(store), release, from_json, MAX_RECORD)


def load_all(store: Path) -> list[Verification]:
    return records.load_all(directory_of(store), from_json, MAX_RECORD)


def remove(store: Path, release: str) -> bool:
    return records.remove(directory_of(store), release)
