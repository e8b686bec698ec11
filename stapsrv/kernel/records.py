"""Per-release JSON records kept in a directory of the kernel store
(``STORE/.verified``, ``STORE/.prepared``): written whole (a temporary file
renamed into place), read bounded and never through a link, FIFO or
device (the metrics and ``status`` read them), a damaged or hostile file
being no record rather than a crash.  Blocking file work."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from stapsrv.kernel.store import valid_release


class Record(Protocol):
    @property
    def release(self) -> str:
        """The kernel release the record is of."""

    def as_json(self) -> dict[str, Any]:
        """What is written."""


R = TypeVar("R", bound=Record)


def save(directory: Path, record: Record) -> Path:
    """Write ``record`` as ``directory/<release>.json``; its path."""
    if not valid_release(record.release):
        raise ValueError(f"not a kernel release: {record.release!r}")
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    target = directory / f"{record.release}.json"
    handle, temporary = tempfile.mkstemp(prefix=".new-", dir=directory)
    with os.fdopen(handle, "w") as out:
        json.dump(record.as_json(), out, indent=1)
        out.write("\n")
    os.chmod(temporary, 0o644)
    os.replace(temporary, target)
    return target


def read_bounded(path: Path, limit: int) -> bytes:
    """A record's bytes: a regular file of at most ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data


def load(directory: Path, release: str, parse: Callable[[dict[str, Any]], R],
         limit: int) -> R | None:
    """The record of ``release``; None when there is none, or when what is
    there is not one (whatever it holds)."""
    if not valid_release(release):
        return None
    try:
        found = parse(json.loads(read_bounded(directory / f"{release}.json", limit)))
    except Exception:  # a damaged or hostile file is no record, never a crash
        return None
    return found if found.release == release else None


def load_all(directory: Path, parse: Callable[[dict[str, Any]], R], limit: int) -> list[R]:
    try:
        names = sorted(path.name for path in directory.glob("*.json"))
    except OSError:
        return []
    found = [load(directory, name[:-len(".json")], parse, limit) for name in names]
    return [record for record in found if record is not None]


def remove(directory: Path, release: str) -> bool:
    if not valid_release(release):
        return False
    try:
        (directory / f"{release}.json").unlink()
    except OSError:
        return False
    return True
