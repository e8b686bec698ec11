"""What verifying a release found, kept with the release in the kernel
store (``STORE/.verified/<release>.json``, replaced atomically) for
``kernels list``, ``stap-server status --json`` and the metrics.  Blocking
file work (small files)."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from attrs import asdict, frozen

from stapsrv.kernel.store import valid_release

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


def save(store: Path, verification: Verification) -> Path:
    if not valid_release(verification.release):
        raise ValueError(f"not a kernel release: {verification.release!r}")
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


def _read_record(path: Path) -> bytes:
    """A record's bytes: a regular file (never a link, FIFO or device: the
    metrics and ``status`` read these), at most :data:`MAX_RECORD` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = os.read(fd, MAX_RECORD + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_RECORD:
        raise ValueError(f"{path} is larger than {MAX_RECORD} bytes")
    return data


def load(store: Path, release: str) -> Verification | None:
    """The record kept for ``release``; None when there is none, or when
    what is there is not one (whatever it holds)."""
    if not valid_release(release):
        return None
    try:
        found = from_json(json.loads(_read_record(directory_of(store) / f"{release}.json")))
    except Exception:  # a damaged or hostile file is no record, never a crash
        return None
    return found if found.release == release else None


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
