"""The kernel store: build trees of releases that are not installed.

Each stored release is a directory ``STORE/<release>/`` holding ``root/``
(the Debian packages unpacked there by ``dpkg-deb -x``, without root and
without maintainer scripts), ``entry.json`` (what was fetched, its size)
and ``used`` (its modification time is the last use, for the size cap).
A release is made in ``STORE/.partial-<pid>-<release>-*/`` and renamed
into place when complete, so an interrupted fetch never leaves a
half-made release where the server looks; leftovers of a dead process are
removed when the store is opened.

The arch package's ``Makefile`` includes the common tree by absolute path
(``include /usr/src/linux-headers-<abi>-common/Makefile``); when a release
is stored, that line is pointed at the stored common tree, so the tree
builds with and without the sandbox, and wherever the store is.

Blocking file work throughout: the server calls it from its thread pool.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from attrs import frozen

from stapsrv.config.values import ServerConfig

#: What a release name may be: the server puts it in paths and apt's words.
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_~-]{0,127}")
_INCLUDE = re.compile(rb"^include[ \t]+/usr/src/(linux-headers-[^/\s]+)/Makefile[ \t]*$",
                      re.M)
_PARTIAL = ".partial-"
_REMOVING = ".removing-"
ENTRY = "entry.json"
USED = "used"


def store_directory(config: ServerConfig) -> Path:
    """``--kernel-store``, else ``kernels/`` in the server's cache directory
    (``$XDG_CACHE_HOME/stapsrv``, else ``~/.cache/stapsrv``)."""
    if config.kernel_store is not None:
        return config.kernel_store
    if config.runtime_cache is not None:
        return config.runtime_cache / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "stapsrv" / "kernels"


def valid_release(release: str) -> bool:
    """Whether ``release`` is a plain name a store may hold."""
    return bool(_RELEASE.fullmatch(release)) and ".." not in release


@frozen
class StoredPackage:
    name: str
    version: str
    size: int


@frozen
class StoredRelease:
    """One complete release of the store."""

    release: str
    directory: Path
    packages: tuple[StoredPackage, ...]
    size: int
    fetched: float
    used: float

    @property
    def build_tree(self) -> Path:
        return build_tree_in(self.directory / "root", self.release)


def build_tree_in(root: Path, release: str) -> Path:
    return root / "usr" / "src" / f"linux-headers-{release}"


def tree_size(path: Path) -> int:
    """Bytes of the files under ``path`` (links count as nothing)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                info = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(directory, name)):
                total += info.st_blocks * 512
    return total


def fix_tree(root: Path, release: str, final_root: Path) -> None:
    """Point the arch ``Makefile``'s absolute include at the stored common
    tree (``final_root`` is where ``root`` will be once renamed), and drop
    the package's ``/lib/modules`` links, which name the host's paths."""
    tree = build_tree_in(root, release)
    makefile = tree / "Makefile"
    text = makefile.read_bytes()
    fixed = _INCLUDE.sub(
        lambda m: b"include " + os.fsencode(final_root / "usr" / "src")
        + b"/" + m.group(1) + b"/Makefile", text)
    if fixed != text:
        makefile.write_bytes(fixed)
    shutil.rmtree(root / "lib" / "modules", ignore_errors=True)


class KernelStore:
    """The store's directory, and what is in it."""

    def __init__(self, directory: Path, size_cap: int) -> None:
        self.directory = directory.absolute()  # stored Makefiles name it
        self.size_cap = size_cap

    def open(self) -> list[str]:
        """Make the directory; remove what dead fetches left.  Returns the
        names removed."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        removed = []
        for entry in self.directory.iterdir():
            if entry.name.startswith(_REMOVING) or (
                    entry.name.startswith(_PARTIAL) and not _owner_alive(entry.name)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    def get(self, release: str) -> StoredRelease | None:
        if not valid_release(release):
            return None
        directory = self.directory / release
        try:
            entry = json.loads((directory / ENTRY).read_text())
            used = (directory / USED).stat().st_mtime
        except (OSError, ValueError):
            return None
        packages = tuple(StoredPackage(p["name"], p["version"], int(p["size"]))
                         for p in entry.get("packages", ()))
        return StoredRelease(release, directory, packages, int(entry["size"]),
                             float(entry["fetched"]), used)

    def releases(self) -> list[StoredRelease]:
        """Every complete release, most recently used first."""
        try:
            names = [entry.name for entry in self.directory.iterdir()
                     if not entry.name.startswith(".")]
        except OSError:
            return []
        found = [stored for stored in map(self.get, names) if stored is not None]
        return sorted(found, key=lambda stored: stored.used, reverse=True)

    def touch(self, release: str) -> None:
        """Mark ``release`` used now."""
        try:
            os.utime(self.directory / release / USED)
        except OSError:
            pass

    def begin(self, release: str) -> Path:
        """A new private directory where ``release`` is made."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        work = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL}{os.getpid()}-{release}-",
                                     dir=self.directory))
        work.chmod(0o755)
        (work / "root").mkdir(mode=0o755)
        (work / "download").mkdir(mode=0o700)
        return work

    def final_root(self, release: str) -> Path:
        return self.directory / release / "root"

    def commit(self, work: Path, release: str, packages: Iterable[StoredPackage]) -> StoredRelease:
        """Put the release made in ``work`` in place (replacing any older
        copy) and return it."""
        shutil.rmtree(work / "download", ignore_errors=True)
        size = tree_size(work)
        entry = {"release": release, "size": size, "fetched": time.time(),
                 "packages": [{"name": p.name, "version": p.version, "size": p.size}
                              for p in packages]}
        (work / ENTRY).write_text(json.dumps(entry, indent=1) + "\n")
        (work / USED).touch()
        target = self.directory / release
        if target.exists():
            self._discard(target)
        os.rename(work, target)
        stored = self.get(release)
        assert stored is not None
        return stored

    def abandon(self, work: Path) -> None:
        shutil.rmtree(work, ignore_errors=True)

    def remove(self, release: str) -> bool:
        """Remove a stored release; whether there was one."""
        if not valid_release(release) or not (self.directory / release).is_dir():
            return False
        self._discard(self.directory / release)
        return True

    def evict(self, keep: str | None = None) -> list[StoredRelease]:
        """Remove least recently used releases (never ``keep``) until the
        store is within its size cap; the releases removed."""
        stored = self.releases()
        total = sum(entry.size for entry in stored)
        removed = []
        for entry in reversed(stored):
            if total <= self.size_cap:
                break
            if entry.release == keep:
                continue
            self._discard(entry.directory)
            total -= entry.size
            removed.append(entry)
        return removed

    def _discard(self, directory: Path) -> None:
        """Rename away first, so the release is gone at once, then delete."""
        doomed = Path(tempfile.mkdtemp(prefix=_REMOVING, dir=self.directory))
        os.rename(directory, doomed / "old")
        shutil.rmtree(doomed, ignore_errors=True)


def _owner_alive(name: str) -> bool:
    try:
        pid = int(name[len(_PARTIAL):].split("-", 1)[0])
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
