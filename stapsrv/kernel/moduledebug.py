"""Kernel module debuginfo on demand (``--fetch-debuginfo``): when a script
names a module (``module("ext4").function(...)``), the module's debug
``.ko`` from ``linux-image-<release>-dbg``, so that its DWARF probes and
``$var`` accesses compile.

The -dbg package's module files are the unstripped modules (code and
DWARF, e.g. 19 MB for ext4), all behind the ``vmlinux`` in one xz stream
of about 5.7 GB: there is no random access.  So the package is downloaded
(it is not kept), read by one tar pass that stops as soon as it has the
modules asked for, and only those are kept.  A pass over the whole
archive takes about a minute here.  The first pass of a release also
lists the whole package, so a module it does not have is known absent
without another pass; the next passes stop as soon as they can.

The modules of a release are one entry of the store
``STORE/.debug-modules/<release>/`` (within the size cap, evicted least
recently used first): ``root/`` is laid out like
``/lib/modules/<release>/`` (``kernel/fs/ext4/ext4.ko``), ``modules.json``
lists the names found and absent.  Fetching more modules makes a new entry
(the old files hard-linked in) that replaces the old one whole, one fetch
per release at a time: concurrent requests for the same modules share it.

Where the translator finds them (elfutils looks for a module's file under
the release's modules directory):

- a stored release (``-r TREE``): elfutils walks TREE, so TREE gets a link
  :data:`TREE_LINK` to ``root/kernel``;
- an installed release, in the sandbox: ``root/`` (with the host's
  ``build`` and ``source`` links) is shown at ``/lib/modules/<release>``,
  or, when the host has that release's modules (stripped), each fetched
  file is shown over the host's.

Whatever goes wrong, the compile goes on without the module's debuginfo
and the translator's own error reaches the client.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from stapsrv.core.budget import OverBudget
from stapsrv.kernel.fetch import FetchFailed, KernelFetcher, megabytes
from stapsrv.kernel.store import MODULES_DIRECTORY, KernelStore, StoredRelease, valid_release

#: The store's directory of module debuginfo, apart from the trees.
#: The link in a stored build tree to its release's fetched modules.
TREE_LINK = "debug-modules"
#: At most this many modules are fetched for one request.
MAX_MODULES = 16
#: A failed fetch of a release's modules is not tried again for this long.
RETRY = 600
INDEX = "modules.json"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MEMBERS = "./usr/lib/debug/lib/modules/{release}/"
#: One tar pass; it stops once it has every pattern once.
_EXTRACT = ('deb="$1"; dir="$2"; shift 2; dpkg-deb --fsys-tarfile "$deb" | '
            'tar -x --wildcards --occurrence=1 -C "$dir" "$@"')
#: The first pass of a release: the same, and a second tar fed by tee lists
#: every member to the end, so that a name the package lacks never costs
#: another pass (a client cannot make the server download the package
#: again and again by naming modules that do not exist).
_EXTRACT_AND_LIST = (
    'deb="$1"; dir="$2"; list="$3"; shift 3; fifo="$list.fifo"; '
    'mkfifo "$fifo" || exit 3; tar -t < "$fifo" > "$list" & lister=$!; '
    'dpkg-deb --fsys-tarfile "$deb" | tee --output-error=warn-nopipe "$fifo" | '
    'tar -x --wildcards --occurrence=1 -C "$dir" "$@"; status=$?; '
    'wait "$lister" || status=3; rm -f "$fifo"; exit "$status"')
_TAR_BENIGN = ("Not found in archive", "Exiting with failure status")

#: Runs a pass (``fetch``, described by the words given) within the
#: request's share of kernel store work; raises OverBudget past it.
Budgeted = Callable[[Callable[[], "Deferred[ModuleSet]"], str], Awaitable["ModuleSet"]]


def canonical(name: str) -> str:
    """The kernel's name of a module: ``-`` and ``_`` are the same."""
    return name.replace("-", "_")


def wanted_modules(names: Iterable[str]) -> list[str]:
    """The canonical names worth fetching, at most :data:`MAX_MODULES`."""
    return sorted({canonical(name) for name in names if _NAME.fullmatch(name)})[:MAX_MODULES]


def member_pattern(release: str, name: str) -> str:
    """The tar pattern of a module's file in the -dbg package (its file
    name may spell ``_`` as ``-``)."""
    spelled = "".join("[_-]" if c == "_" else c for c in canonical(name))
    return f"{_MEMBERS.format(release=release)}*/{spelled}.ko"


@frozen
class ModuleSet:
    """The fetched modules of one release."""

    release: str
    #: Laid out like ``/lib/modules/<release>``.
    root: Path
    #: Canonical name -> path of its file relative to ``root``.
    modules: Mapping[str, str]
    #: Names that the -dbg package does not have.
    absent: frozenset[str]
    #: Every module the package has (None: not listed yet).
    available: frozenset[str] | None = None

    def lacks(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` a pass over the package would fetch."""
        return [name for name in names if name not in self.modules and name not in self.absent
                and (self.available is None or name in self.available)]

    def files(self, names: Iterable[str]) -> list[tuple[str, Path]]:
        """(relative path, file) of those of ``names`` that were fetched."""
        return [(self.modules[name], self.root / self.modules[name])
                for name in sorted(set(names)) if name in self.modules]


def read_set(stored: StoredRelease) -> ModuleSet:
    try:
        index = json.loads((stored.directory / INDEX).read_text())
    except (OSError, ValueError):
        index = {}
    available = index.get("available")
    return ModuleSet(stored.release, stored.directory / "root",
                     dict(index.get("modules", {})), frozenset(index.get("absent", ())),
                     frozenset(available) if isinstance(available, list) else None)


def listed_modules(listing: Path, release: str) -> frozenset[str]:
    """The canonical names of the modules a ``tar -t`` listing of the -dbg
    package shows."""
    prefix = _MEMBERS.format(release=release)
    names = set()
    with listing.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            member = line.rstrip("\n")
            if member.startswith(prefix) and member.endswith(".ko"):
                names.add(canonical(member.rsplit("/", 1)[-1][:-3]))
    return frozenset(names)


def found_modules(directory: Path) -> dict[str, str]:
    """Canonical name -> relative path of the ``.ko`` files under ``directory``."""
    found: dict[str, str] = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            if name.endswith(".ko"):
                relative = os.path.relpath(os.path.join(parent, name), directory)
                found.setdefault(canonical(name[:-3]), relative)
    return found


def assemble(work: Path, old: ModuleSet | None, release: str, asked: Iterable[str],
             host: Path, listing: Path | None = None) -> None:
    """Make the new entry in ``work`` (blocking): the old entry's files
    hard-linked, the extracted ones moved from ``work/download/members``,
    the host's ``build``/``source`` links of the release copied, and the
    index (with the package's modules, from ``listing`` or the old entry)."""
    root = work / "root"
    modules: dict[str, str] = dict(old.modules) if old is not None else {}
    absent = set(old.absent) if old is not None else set()
    if old is not None:
        for relative in old.modules.values():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            os.link(old.root / relative, root / relative)
    extracted = work / "download" / "members" / _MEMBERS.format(release=release)
    new = found_modules(extracted)
    for name, relative in new.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        os.rename(extracted / relative, root / relative)
        modules[name] = relative
    absent.update(name for name in asked if name not in new)
    for link in ("build", "source"):
        if (host / link).is_symlink():
            os.symlink(os.readlink(host / link), root / link)
    available = (listed_modules(listing, release) if listing is not None
                 else old.available if old is not None else None)
    index: dict[str, object] = {"release": release, "modules": modules,
                                "absent": sorted(absent)}
    if available:
        index["available"] = sorted(available)
    (work / INDEX).write_text(json.dumps(index, indent=1) + "\n")


def link_tree(tree: Path, modules: ModuleSet) -> None:
    """Give a stored build tree its link to the release's modules (blocking)."""
    link = tree / TREE_LINK
    target = modules.root / "kernel"
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


@define(eq=False)
class ModuleDebug:
    """Fetches module debuginfo into the store beside the fetcher's."""

    fetcher: KernelFetcher
    #: The host's modules directories (``/lib/modules``).
    modules_root: Path = Path("/lib/modules")
    log: Logger = field(factory=Logger)
    _known: dict[str, ModuleSet] = field(init=False, factory=dict)
    _locks: dict[str, DeferredLock] = field(init=False, factory=dict)
    _failed: dict[str, float] = field(init=False, factory=dict)

    @property
    def store(self) -> KernelStore:
        return self.fetcher.store.part(MODULES_DIRECTORY)

    def open(self) -> list[str]:
        """Remove what dead fetches left (blocking; at start-up)."""
        store = self.store
        return store.open() if store.directory.is_dir() else []

    async def provide(self, release: str, names: Iterable[str], tree: Path | None,
                      budgeted: Budgeted | None = None) -> None:
        """Have the debuginfo of the modules ``names`` of ``release`` where
        the translator looks (``tree``: the stored build tree, None for an
        installed release); a pass over the package runs through
        ``budgeted`` when given.  Never raises: a module that cannot be had
        is logged and left to the translator's own error."""
        wanted = wanted_modules(names)
        if not wanted or not valid_release(release):
            return
        try:
            modules = await self._ensure(release, wanted, budgeted)
            if modules is not None and tree is not None:
                await self.fetcher.in_thread(link_tree, tree, modules)
        except Exception:
            self.log.failure("Providing the module debuginfo of kernel {release} failed",
                             release=release)

    async def _read(self, release: str) -> ModuleSet | None:
        stored = await self.fetcher.in_thread(self.store.get, release)
        if stored is None:
            return None
        await self.fetcher.in_thread(self.store.touch, release)
        return read_set(stored)

    async def _ensure(self, release: str, wanted: list[str],
                      budgeted: Budgeted | None = None) -> ModuleSet | None:
        # From the store each time: cheap, marks it used, and sees evictions.
        known = await self._read(release)
        if known is not None and not known.lacks(wanted):
            self._known[release] = known
            return known
        lock = self._locks.setdefault(release, DeferredLock())
        await lock.acquire()
        try:
            # Whoever held the lock may have fetched these, or failed.
            known = await self._read(release)
            missing = known.lacks(wanted) if known is not None else wanted
            failed = self._failed.get(release)
            now = self.fetcher.reactor.seconds()
            if missing and (failed is None or now >= failed + RETRY):
                old = known

                def fetch() -> Deferred[ModuleSet]:
                    return Deferred.fromCoroutine(self._fetch(release, old, missing))

                try:
                    if budgeted is None:
                        known = await fetch()
                    else:
                        known = await budgeted(fetch, "a pass for the debuginfo of modules "
                                               f"{' '.join(missing)} of kernel release "
                                               f"'{release}'")
                except OverBudget:
                    self.log.info("Not fetching the debuginfo of modules {modules} of kernel "
                                  "{release} now: the client has its share of kernel store "
                                  "work under way", modules=" ".join(missing), release=release)
                except Exception as exc:
                    # Whatever the failure (a full disk too), not again at once:
                    # each attempt downloads the whole package.
                    self._failed[release] = self.fetcher.reactor.seconds()
                    reason = str(exc) if isinstance(exc, FetchFailed) else repr(exc)
                    self.log.warn("No debuginfo for modules {modules} of kernel {release}: "
                                  "{reason} (compiling without it; trying again in {retry} "
                                  "min)", modules=" ".join(missing), release=release,
                                  reason=reason[:300], retry=RETRY // 60)
                else:
                    self._failed.pop(release, None)
        finally:
            lock.release()
        if known is not None:
            self._known[release] = known
        return known

    async def _fetch(self, release: str, old: ModuleSet | None,
                     missing: list[str]) -> ModuleSet:
        fetcher, store = self.fetcher, self.store
        started = fetcher.reactor.seconds()
        package = await fetcher.candidate(f"linux-image-{release}-dbg")
        self.log.info("Fetching the debuginfo of modules {modules} of kernel {release}: "
                      "{name} {version} ({size}); only those modules are kept",
                      modules=" ".join(missing), release=release, name=package.name,
                      version=package.version, size=megabytes(package.size))
        async with fetcher.making(store, release) as making:
            work = making.work
            download = work / "download"
            await fetcher.download(download, release, [package], package.size, None)
            deb = next(download.glob("*.deb"))
            (download / "members").mkdir()
            patterns = [member_pattern(release, name) for name in missing]
            listing = None if old is not None and old.available is not None \
                else download / "listing"
            if listing is None:
                argv = ["/bin/sh", "-c", _EXTRACT, "sh", str(deb), str(download / "members"),
                        *patterns]
            else:
                argv = ["/bin/sh", "-c", _EXTRACT_AND_LIST, "sh", str(deb),
                        str(download / "members"), str(listing), *patterns]
            out, err, code = await fetcher.run(argv)
            problems = [line for line in err.decode(errors="replace").splitlines()
                        if line.startswith("tar:") and not any(
                            benign in line for benign in _TAR_BENIGN)]
            if code not in (0, 2) or problems:
                raise FetchFailed(f"unpacking {deb.name} failed: "
                                  f"{(problems or [f'exit {code}'])[-1][:300]}")
            await fetcher.in_thread(assemble, work, old, release, missing,
                                     self.modules_root / release, listing)
            making.packages.append(package.stored)
        stored = making.result
        modules = read_set(stored)
        self.log.info("Fetched the debuginfo of kernel {release}'s modules in {seconds:.1f} s: "
                      "{found} kept ({size} in all); not in the package: {absent}",
                      release=release, seconds=fetcher.reactor.seconds() - started,
                      found=" ".join(name for name in missing if name in modules.modules)
                      or "none", size=megabytes(stored.size),
                      absent=" ".join(name for name in missing if name in modules.absent)
                      or "none")
        self._known.pop(release, None)
        return modules

    def binds(self, release: str) -> list[tuple[Path, str]]:
        """What the sandbox shows read only for an installed ``release``
        (blocking; may be called from any thread)."""
        modules = self._known.get(release)
        host = self.modules_root / release
        # Only what is still there: bwrap refuses a missing source (an
        # entry evicted or removed since).
        if modules is None or not modules.modules or not host.is_dir() \
                or not modules.root.is_dir():
            return []
        inside = os.path.realpath(host)
        if not (host / "kernel").exists():
            return [(modules.root, inside)]
        return [(path, os.path.join(inside, relative))
                for relative, path in modules.files(modules.modules)
                if (host / relative).is_file() and path.is_file()]

    def key_words(self, release: str, names: Iterable[str]) -> list[str]:
        """What the cache key adds: the fetched files the request's
        modules have."""
        modules = self._known.get(release)
        if modules is None:
            return []
        return [f"module debuginfo {relative} {path}"
                for relative, path in modules.files(wanted_modules(names))]
