"""Kernel configuration headers (``stapconf_*.h``) shared by the members
of a fleet through the fleet cache, sealed like answers, so that a fleet
warms each release and toolchain once (issue 29).

The translator finds its header by a hash of the kernel tree's path, size
and time stamp (and those of its ``.config`` and version headers), the
runtime's (and, in 4.8, its ``transport``, ``unwind`` and ``linux``
directories'), the compiler's and its own (``hash.cxx`` in SystemTap).  The
fleet key here is a digest of those same inputs (with the release, guru
mode and the server's build options): two members whose key is equal
have translators that look for the same header names, so a header one
made is found by the other's translators as if it had made it.  Members
whose inputs differ (another store path, a tree unpacked at another time)
have other keys, find nothing, and warm up as before: never a wrong
header, at worst a warm-up of their own.

An entry is JSON: ``{"format": "stapconf-1", "headers": {"ab/stapconf_....h":
text}}``; what comes back is checked (names of the translator's shape,
bounded sizes) before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from attrs import define, field
from twisted.logger import Logger

from stapsrv.blocking import Blocking
from stapsrv.compile.sandbox import StapconfStore

#: Where the fleet keeps the headers (beside the answers).
STAPCONF_PREFIX = "stapsrv:stapconf:"
FORMAT = "stapconf-1"
#: A header name the translator makes: bucket/stapconf_<md4>_<bytes hashed>.h.
_NAME = re.compile(r"^[0-9a-f]{2}/stapconf_[0-9a-f]{32}_[0-9]{1,12}\.h$")
#: Headers per entry, and bytes per header, at most (one or two of ~40 kB
#: in practice).
MAX_HEADERS = 64
MAX_HEADER_BYTES = 1 << 20
#: The tree's files whose path, size and time the translator hashes.
#: The runtime's directories whose path, size and time SystemTap 4.8 hashes too.
_RUNTIME_DIRS = ("transport", "unwind", "linux")
_TREE_FILES = (".config", ".version", "include/linux/compile.h", "include/linux/version.h",
               "include/linux/utsrelease.h")


class SharedStore(Protocol):
    """The fleet cache's named entries (:class:`stapsrv.cache.fleet.RedisCache`)."""

    async def get(self, key: str, prefix: str = ...) -> bytes | None:
        """The sealed entry's contents under ``prefix + key`` (None: none)."""

    async def put(self, key: str, response: bytes, prefix: str = ...) -> None:
        """Seal and keep ``response`` under ``prefix + key``."""


def _identity(path: str | Path | None) -> list[object]:
    """What the translator hashes of a path: itself, its size and its
    time stamp in seconds (-1, -1 when it is missing)."""
    if not path:
        return [None]
    try:
        info = os.stat(path)
    except OSError:
        return [str(path), -1, -1]
    return [str(path), info.st_size, int(info.st_mtime)]


def fleet_key(release: str, tree: Path, translator: str, compiler: str | None,
              runtime: str | None, guru: bool, options: Iterable[str]) -> str:
    """The fleet's name for one warm-up (blocking: it reads file times)."""
    parts: list[object] = [FORMAT, release, guru, sorted(options), _identity(tree),
                           *(_identity(tree / name) for name in _TREE_FILES),
                           _identity(runtime),
                           *(_identity(Path(runtime) / name) for name in _RUNTIME_DIRS
                             if runtime),
                           _identity(compiler),
                           _identity(os.path.realpath(translator))]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def header_names(store: StapconfStore) -> set[str]:
    """The headers the store has now (``bucket/name``)."""
    return {f"{path.parent.name}/{path.name}" for path in _headers(store.directory)}


def pack(store: StapconfStore, before: set[str]) -> bytes | None:
    """The headers the store gained since ``before`` as one entry (None:
    none)."""
    headers = {f"{path.parent.name}/{path.name}": path for path in _headers(store.directory)}
    new = sorted(name for name in headers if name not in before and _NAME.match(name))
    if not new:
        return None
    texts = {name: headers[name].read_text(errors="replace") for name in new[:MAX_HEADERS]}
    return json.dumps({"format": FORMAT, "headers": texts}).encode()


def unpack(store: StapconfStore, entry: bytes) -> int:
    """Write the headers of an entry into the store (those it lacks); how
    many it holds.  Raises ValueError for anything not of the shape."""
    found = json.loads(entry)
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise ValueError("not a stapconf entry of format 1")
    headers = found.get("headers")
    if not isinstance(headers, dict) or not 0 < len(headers) <= MAX_HEADERS:
        raise ValueError("no headers, or too many")
    for name, text in headers.items():
        if not isinstance(name, str) or not _NAME.match(name) or not isinstance(text, str) \
                or len(text) > MAX_HEADER_BYTES:
            raise ValueError(f"not a header: {str(name)[:80]!r}")
    for name, text in headers.items():
        target = store.directory / name
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = target.with_name(target.name + ".partial")
        partial.write_text(text)
        os.replace(partial, target)
    return len(headers)


def _headers(directory: Path) -> list[Path]:
    try:
        buckets = [entry for entry in directory.iterdir()
                   if entry.is_dir() and not entry.is_symlink() and len(entry.name) == 2]
    except OSError:
        return []
    return sorted(header for bucket in buckets for header in bucket.glob("stapconf_*.h")
                  if header.is_file() and not header.is_symlink())


@define(eq=False)
class SharedStapconf:
    """What a handler's warm-ups ask of the fleet: a header made by another
    member (:meth:`take`), and theirs given to the others (:meth:`give`)."""

    fleet: SharedStore
    log: Logger = field(factory=Logger)

    async def take(self, key: str, store: StapconfStore, named: str,
                   in_thread: Blocking) -> bool:
        """Whether the fleet had the headers of this warm-up (now in ``store``)."""
        entry = await self.fleet.get(key, STAPCONF_PREFIX)
        if entry is None:
            return False
        try:
            count = await in_thread(unpack, store, entry)
        except (ValueError, OSError) as exc:
            self.log.warn("Kernel configuration header for {release} from the fleet cache "
                          "not used ({error}); warming up here", release=named, error=str(exc))
            return False
        self.log.info("Kernel configuration header for {release} ready from the fleet cache "
                      "({count} header(s) made by another member; no warm-up here)",
                      release=named, count=count)
        return True

    async def give(self, key: str, store: StapconfStore, before: set[str], named: str,
                   in_thread: Blocking) -> None:
        """The headers a warm-up just made, to the fleet."""
        entry = await in_thread(pack, store, before)
        if entry is None:
            return
        await self.fleet.put(key, entry, STAPCONF_PREFIX)
        self.log.info("Kernel configuration header for {release} shared through the fleet "
                      "cache", release=named)
