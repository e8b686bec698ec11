"""What verifying a release found, kept with the release in the kernel
store (``STORE/.verified/<release>.json``, replaced atomically) for
``kernels list``, ``stap-server status --json`` and the metrics.  Blocking
file work (small files)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from attrs import asdict, frozen

from stapsrv.compile.kernels import valid_release

VERIFIED_DIRECTORY = ".verified"


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
    return Verification(str(found["release"]), float(found["when"]), str(found["translator"]),
                        tuple(ProbeResult(str(r["client"]), str(r["probe"]), bool(r["runs"]),
                                          str(r.get("failure", "")))
                              for r in found["results"]))


def directory_of(store: Path) -> Path:
    return store / VERIFIED_DIRECTORY


def save(store: Path, verification: Verification) -> Path:
    directory = directory_of(store)
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    target = directory / f"{verification.release}.json"
    handle, temporary = tempfile.mkstemp(prefix=".new-", dir=directory)
    with os.fdopen(handle, "w") as out:
        json.dump(verification.as_json(), out, indent=1)
        out.write("\n")
    os.chmod(temporary, 0o644)
    os.replace(temporary, target)
    return target


def load(store: Path, release: str) -> Verification | None:
    if not valid_release(release):
        return None
    try:
        return from_json(json.loads((directory_of(store) / f"{release}.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_all(store: Path) -> list[Verification]:
    try:
        names = sorted(path.name for path in directory_of(store).glob("*.json"))
    except OSError:
        return []
    found = [load(store, name[:-len(".json")]) for name in names]
    return [verification for verification in found if verification is not None]


def remove(store: Path, release: str) -> bool:
    if not valid_release(release):
        return False
    try:
        (directory_of(store) / f"{release}.json").unlink()
    except OSError:
        return False
    return True
