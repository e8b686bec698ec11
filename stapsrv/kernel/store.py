"""The kernel store: build trees of releases that are not installed.

Each stored release is a directory ``STORE/<release>/`` holding ``root/``
(the Debian packages unpacked there by ``dpkg-deb -x``, without root and
without maintainer scripts), ``entry.json`` (what was fetched, from which
suite when apt said, its size)
and ``used`` (its modification time is the last use, for the size cap).
A release is made in ``STORE/.partial-<pid>-<release>-*/`` and renamed
into place when complete, so an interrupted fetch never leaves a
half-made release where the server looks; leftovers of a dead process are
removed when the store is opened.

The arch package's ``Makefile`` includes the common tree by absolute path
(``include /usr/src/linux-headers-<abi>-common/Makefile``), and forky's
names its own tree as ``KBUILD_OUTPUT``; when a release is stored, those
lines are pointed at the stored trees, so the tree
builds with and without the sandbox, and wherever the store is.

One ceiling covers the whole store: the trees and the parts kept beside
them (symbols in ``.debug``, module debuginfo in ``.debug-modules``, kernel
images in ``.images``, each a store of releases of its own), least recently
used first, whichever part it is in.  The roots an administrator made in
the store (toolchains in ``.toolchains``, user-space roots in
``.sysroots``) are never removed by it, but take their room under it: the
size their manifest records, or measured once when it records none.  A release a compile is reading holds a
lease (a shared ``flock`` on its ``used`` file, which other processes such
as ``kernels remove`` see too); the size cap passes it by and removal
refuses it.

Blocking file work throughout: the server calls it from its thread pool.
"""

from __future__ import annotations

import fcntl
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
#: forky's arch Makefile also names its own tree as the output directory.
_OUTPUT = re.compile(rb"^KBUILD_OUTPUT[ \t]*:?=[ \t]*/usr/src/(linux-headers-[^/\s]+)[ \t]*$",
                     re.M)
_PARTIAL = ".partial-"
_REMOVING = ".removing-"
ENTRY = "entry.json"
USED = "used"
#: The store's parts beside the trees, each a directory of releases.
DEBUG_DIRECTORY = ".debug"
MODULES_DIRECTORY = ".debug-modules"
IMAGES_DIRECTORY = ".images"
PARTS = (DEBUG_DIRECTORY, MODULES_DIRECTORY, IMAGES_DIRECTORY)
#: Where administrators' roots are kept (each ``NAME/root`` with ``manifest.json``).
ADMIN_DIRECTORIES = (".toolchains", ".sysroots")
#: Sizes measured of roots whose manifest records none, by (manifest, its mtime).
_measured: dict[tuple[str, int], int] = {}


_PART_WORDS = {DEBUG_DIRECTORY: "the symbols of", MODULES_DIRECTORY: "the module debuginfo of",
               IMAGES_DIRECTORY: "the kernel image of"}


def describe_entry(entry: StoredRelease) -> str:
    """What an entry is, for the log: ``the kernel image of 6.1.0-57-amd64``."""
    return f"{_PART_WORDS.get(entry.directory.parent.name, 'the build tree of')} {entry.release}"


class InUse(Exception):
    """A release a compile is reading cannot be removed now."""


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
    #: The Debian suite its packages came from (None: not recorded).
    suite: str | None = None

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
    stored = os.fsencode(final_root / "usr" / "src")
    fixed = _INCLUDE.sub(lambda m: b"include " + stored + b"/" + m.group(1) + b"/Makefile",
                         text)
    fixed = _OUTPUT.sub(lambda m: b"KBUILD_OUTPUT=" + stored + b"/" + m.group(1), fixed)
    if fixed != text:
        makefile.write_bytes(fixed)
    shutil.rmtree(root / "lib" / "modules", ignore_errors=True)
    settle_tree_time(tree)


def settle_tree_time(tree: Path) -> None:
    """Give the build tree's directory the time of its ``.config`` (the
    package's): the translator names a kernel configuration header after
    the tree's path, size and time, so every server that stores the release
    at the same path names it alike, and a fleet can share it
    (:mod:`stapsrv.compile.sharedconf`); unpacking, or a link added since,
    leaves the time it happened."""
    try:
        config = (tree / ".config").stat()
        os.utime(tree, ns=(config.st_mtime_ns, config.st_mtime_ns), follow_symlinks=False)
    except OSError:
        pass


class Lease:
    """A compile's hold on the releases it reads (:meth:`KernelStore.lease`)."""

    def __init__(self, held: Iterable[tuple[Path, int]] = ()) -> None:
        self._held = list(held)

    def add(self, directory: Path, descriptor: int) -> None:
        self._held.append((directory, descriptor))

    def holds(self, directory: Path) -> bool:
        """Whether the lease holds the release in the store at ``directory``."""
        return any(store == directory for store, _ in self._held)

    def close(self) -> None:
        held, self._held = self._held, []
        for _, descriptor in held:
            os.close(descriptor)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class KernelStore:
    """The store's directory, and what is in it.  A part (:meth:`part`)
    shares its top store's ceiling."""

    def __init__(self, directory: Path, size_cap: int, top: KernelStore | None = None) -> None:
        self.directory = directory.absolute()  # stored Makefiles name it
        self.size_cap = size_cap
        self._top = top

    @property
    def top(self) -> KernelStore:
        """The store whose directory holds the trees and the parts."""
        return self._top or self

    def part(self, name: str) -> KernelStore:
        """The part ``name`` (one of :data:`PARTS`) of this store."""
        return KernelStore(self.top.directory / name, self.top.size_cap, self.top)

    def family(self) -> list[KernelStore]:
        """The trees' store and every part: what one ceiling covers."""
        return [self.top, *(self.part(name) for name in PARTS)]

    def open(self) -> list[str]:
        """Make the directory; remove what dead fetches left.  Returns the
        names removed."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        removed = self.sweep()
        for entry in self.directory.iterdir():
            if entry.name.startswith(_PARTIAL) and not _owner_alive(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    def sweep(self) -> list[str]:
        """Delete the releases set aside when they were replaced or
        removed while a compile held them, once nothing holds them; the
        names deleted."""
        swept = []
        try:
            aside = [entry for entry in self.directory.iterdir()
                     if entry.name.startswith(_REMOVING)]
        except OSError:
            return []
        for entry in aside:
            try:
                held = _hold(entry / "old" / USED, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # still held (or unreadable): next time
            shutil.rmtree(entry, ignore_errors=True)
            if held is not None:
                os.close(held)
            swept.append(entry.name)
        return swept

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
        suite = entry.get("suite")
        return StoredRelease(release, directory, packages, int(entry["size"]),
                             float(entry["fetched"]), used,
                             suite if isinstance(suite, str) else None)

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

    def commit(self, work: Path, release: str, packages: Iterable[StoredPackage],
               suite: str | None = None) -> StoredRelease:
        """Put the release made in ``work`` in place (replacing any older
        copy) and return it; ``suite``: where its packages came from."""
        shutil.rmtree(work / "download", ignore_errors=True)
        size = tree_size(work)
        entry = {"release": release, "size": size, "fetched": time.time(),
                 "packages": [{"name": p.name, "version": p.version, "size": p.size}
                              for p in packages]}
        if suite is not None:
            entry["suite"] = suite
        (work / ENTRY).write_text(json.dumps(entry, indent=1) + "\n")
        (work / USED).touch()
        target = self.directory / release
        if target.exists():
            # Never waits: a copy a compile holds is set aside whole (its
            # readers keep what they opened or mounted) and deleted later.
            self._discard(target, aside=True)
        os.rename(work, target)
        stored = self.get(release)
        assert stored is not None
        return stored

    def abandon(self, work: Path) -> None:
        shutil.rmtree(work, ignore_errors=True)

    def remove(self, release: str) -> bool:
        """Remove a stored release; whether there was one.  Raises
        :class:`InUse` when a compile is reading it."""
        if not valid_release(release) or not (self.directory / release).is_dir():
            return False
        if not self._discard(self.directory / release):
            if not (self.directory / release).exists():
                return False  # removed meanwhile by another
            raise InUse(release)
        return True

    def remove_everywhere(self, release: str) -> bool:
        """Remove ``release`` from the trees and every part; whether there
        was any.  Raises :class:`InUse`, nothing removed, while a compile
        holds it anywhere."""
        if not valid_release(release):
            return False
        parts = [store for store in self.family() if (store.directory / release).is_dir()]
        held: list[int] = []
        try:
            for store in parts:
                descriptor = _hold(store.directory / release / USED,
                                   fcntl.LOCK_EX | fcntl.LOCK_NB)
                if descriptor is not None:
                    held.append(descriptor)
            doomed = [store._rename_away(store.directory / release) for store in parts]
        except OSError:  # held, or its lock unreadable
            raise InUse(release) from None
        finally:
            for descriptor in held:
                os.close(descriptor)
        for directory in doomed:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
        return any(directory is not None for directory in doomed)

    def evict(self, keep: str | None = None) -> list[StoredRelease]:
        """Remove least recently used releases, from the trees and every
        part alike, until the whole store is within its size cap; never
        ``keep`` (in any part) nor a release a compile holds.  The releases
        removed."""
        for store in self.family():
            store.sweep()
        stored = sorted((entry for store in self.family() for entry in store.releases()),
                        key=lambda entry: entry.used, reverse=True)
        total = sum(entry.size for entry in stored) + self.admin_bytes()
        removed = []
        for entry in reversed(stored):
            if total <= self.size_cap:
                break
            if entry.release == keep or not self._discard(entry.directory):
                continue
            total -= entry.size
            removed.append(entry)
        return removed

    def total_size(self) -> int:
        """Bytes of everything the ceiling covers."""
        return (sum(entry.size for store in self.family() for entry in store.releases())
                + self.admin_bytes())

    def admin_bytes(self) -> int:
        """Bytes of the roots administrators made in the store."""
        total = 0
        for name in ADMIN_DIRECTORIES:
            try:
                kept = sorted((self.top.directory / name).iterdir())
            except OSError:
                continue
            total += sum(root_bytes(directory) for directory in kept)
        return total

    def lease(self, release: str) -> Lease:
        """Hold ``release`` in the trees and every part that has it, until
        the lease is closed: the size cap passes it by and removal refuses
        it.  What is not there is not held (a part made later is fresh).
        Raises OSError when a lock cannot be had (no descriptor left)."""
        lease = Lease()
        if valid_release(release):
            try:
                for store in self.family():
                    descriptor = _hold(store.directory / release / USED, fcntl.LOCK_SH)
                    if descriptor is not None:
                        lease.add(store.directory, descriptor)
            except BaseException:
                lease.close()
                raise
        return lease

    def _discard(self, directory: Path, aside: bool = False) -> bool:
        """Rename ``directory`` away first, so the release is gone at once,
        then delete it; never waits.  While a compile holds it: nothing is
        done (False), or with ``aside`` it is renamed away and left for
        :meth:`sweep`."""
        try:
            held = _hold(directory / USED, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not aside:
                return False  # held, or its lock unreadable: counts as held
            return self._rename_away(directory) is not None
        try:
            doomed = self._rename_away(directory)
        finally:
            if held is not None:
                os.close(held)
        if doomed is None:
            return False  # gone already (another eviction)
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def _rename_away(self, directory: Path) -> Path | None:
        """Move ``directory`` out of the store's names at once; what to
        delete (None: it was gone already)."""
        doomed = Path(tempfile.mkdtemp(prefix=_REMOVING, dir=self.directory))
        try:
            os.rename(directory, doomed / "old")
        except FileNotFoundError:
            doomed.rmdir()
            return None
        return doomed


def root_bytes(directory: Path) -> int:
    """The size of an administrator's root kept in ``directory`` (a link to
    one counts what it names): its manifest's ``size``, or
    :func:`tree_size` of it, once per manifest version.  Nothing for what is not a
    root with a manifest."""
    manifest = directory / "manifest.json"
    try:
        stat = manifest.stat()
        recorded = json.loads(manifest.read_bytes()).get("size")
    except (OSError, ValueError, AttributeError):
        return 0
    if isinstance(recorded, int) and recorded >= 0:
        return recorded
    known = (str(manifest.resolve()), stat.st_mtime_ns)
    if known not in _measured:
        _measured[known] = tree_size(directory / "root")
    return _measured[known]


def _hold(path: Path, operation: int) -> int | None:
    """A descriptor of ``path`` locked with ``operation`` (None: no such
    file, or it was renamed away while the lock was awaited).  Raises
    BlockingIOError for a non-blocking lock that is taken, and OSError when
    the file cannot be opened (no descriptor left, a link): callers count
    that as held, never as absent."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(descriptor, operation)
        same = os.path.samestat(os.fstat(descriptor), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        same = False
    except BaseException:
        os.close(descriptor)
        raise
    if not same:
        os.close(descriptor)
        return None
    return descriptor


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
