"""Fetching a kernel release's build tree, its ``System.map`` and (when
asked) its debuginfo from the Debian archive: the one the machine's apt is
configured for, or, when the admin named suites (``--fetch-suites``), those
suites through the kernel store's private apt configuration
(:mod:`stapsrv.kernel.privateapt`).

apt finds the packages (``apt-cache show``: the candidate versions from
apt's signed indexes) and downloads them (``apt-get download``, which
checks each file's hash against those indexes); ``dpkg-deb -x`` unpacks
them into the store without root and without maintainer scripts.  All of
it runs as child processes of the reactor, never blocking it.  Identical
requests share one fetch.

Which releases may be fetched is a list of shell patterns
(:func:`default_patterns`: the flavours of the server's own Debian release
and architecture; with suites named, also the kernel series those suites
hold, :func:`~stapsrv.core.aptsources.series_patterns`).  The suite a
release came from (``apt-cache policy``) is kept with it in the store.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from stapsrv.blocking import Blocking
from stapsrv.core.aptsources import policy_suite
from stapsrv.core.architectures import release_architecture
from stapsrv.kernel.children import ChildTimedOut, run_child
from stapsrv.kernel.privateapt import PrivateApt
from stapsrv.kernel.store import (
    DEBUG_DIRECTORY,
    IMAGES_DIRECTORY,
    KernelStore,
    StoredPackage,
    StoredRelease,
    describe_entry,
    fix_tree,
    valid_release,
)
from stapsrv.reactor import IHandlerReactor

APT_CACHE = "/usr/bin/apt-cache"
APT_GET = "/usr/bin/apt-get"
DPKG_DEB = "/usr/bin/dpkg-deb"
#: Seconds one external step of a fetch may take (the 860 MB -dbg package
#: at 1 MB/s takes 15 minutes).
STEP_TIMEOUT = 1800.0
#: Debian's kernel flavours per architecture, beside the plain one.
_EXTRA_FLAVOURS = ("cloud", "rt")
_ABI = re.compile(r"(\d+\.\d+\.\d+)-\d+-")


class FetchFailed(Exception):
    """A release could not be fetched; the message is one line for the client."""


def default_patterns(architecture: str, releases: Iterable[str]) -> tuple[str, ...]:
    """The flavours of the server's own kernel series on its Debian
    architecture, e.g. ``6.1.0-*-amd64``, ``6.1.0-*-cloud-amd64``,
    ``6.1.0-*-rt-amd64``: the series are those of ``releases`` (the
    installed and served ones)."""
    series = sorted({match.group(1) for release in releases
                     if (match := _ABI.match(release)) is not None})
    flavours = (architecture, *(f"{extra}-{architecture}" for extra in _EXTRA_FLAVOURS))
    return tuple(f"{prefix}-*-{flavour}" for prefix in series for flavour in flavours)


def debian_architecture() -> str:
    """``dpkg --print-architecture`` (blocking; once, at start-up)."""
    try:
        return subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.uname().machine


def allowed(release: str, patterns: Sequence[str]) -> bool:
    return valid_release(release) and any(
        fnmatch.fnmatchcase(release, pattern) for pattern in patterns)


@frozen
class Candidate:
    """A package as ``apt-cache show`` describes apt's candidate."""

    name: str
    version: str
    size: int
    depends: tuple[str, ...]
    #: The foreign architecture whose private apt found it (None: the
    #: server's own apt).
    via: str | None = None

    @property
    def stored(self) -> StoredPackage:
        return StoredPackage(self.name, self.version, self.size)


def parse_show(text: str) -> list[Candidate]:
    """The stanzas of ``apt-cache show --no-all-versions`` output."""
    found = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            name, colon, value = line.partition(":")
            if colon and not line.startswith(" "):
                fields[name.strip()] = value.strip()
        if "Package" in fields and "Version" in fields:
            depends = tuple(part.split("(")[0].split("|")[0].strip()
                            for part in fields.get("Depends", "").split(",") if part.strip())
            found.append(Candidate(fields["Package"], fields["Version"],
                                   int(fields.get("Size", "0") or 0), depends))
    return found


def build_packages(headers: Candidate) -> list[str]:
    """What ``linux-headers-<release>`` needs unpacked beside it: the common
    headers and kbuild (the compiler package names the installed gcc)."""
    return [name for name in headers.depends
            if name.startswith(("linux-headers-", "linux-kbuild-"))]


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


Progress = Callable[[str, int, int], None]


class Making:
    """One release being made in a store (:meth:`KernelFetcher.making`)."""

    def __init__(self, work: Path) -> None:
        #: The private directory to fill: ``root/`` is what is kept.
        self.work = work
        #: The packages it is made of, for the store's entry.
        self.packages: list[StoredPackage] = []
        #: The suite they came from (None: the machine's apt sources).
        self.suite: str | None = None
        self.stored: StoredRelease | None = None

    @property
    def result(self) -> StoredRelease:
        """The release as put in place (once the transaction is over)."""
        assert self.stored is not None, "the transaction is not over"
        return self.stored


@define(eq=False)
class KernelFetcher:
    """Fetches releases into a :class:`KernelStore`, one fetch per release
    at a time."""

    store: KernelStore
    reactor: IHandlerReactor
    pool: ThreadPool
    patterns: tuple[str, ...]
    log: Logger = field(factory=Logger)
    environ: Mapping[str, str] = field(factory=lambda: dict(os.environ))
    #: Where the machine's own kernel images are.
    boot: Path = Path("/boot")
    #: Seconds any one step (a download, an unpacking, a System.map pass)
    #: may take before it is stopped and the fetch fails.
    step_timeout: float = STEP_TIMEOUT
    #: The suites named by the admin (None: the machine's own apt sources).
    apt: PrivateApt | None = None
    #: Fires once apt's lists may be read (the suites' first update).
    ready: Callable[[], Awaitable[None]] | None = None
    #: The private apt of each other architecture whose releases it
    #: fetches (``--fetch-architectures``): their headers and images come
    #: through it, their build tools (``linux-kbuild``) from the server's own.
    foreign: Mapping[str, PrivateApt] = field(factory=dict)
    _flights: dict[str, list[Deferred[StoredRelease]]] = field(init=False, factory=dict)

    def allowed(self, release: str) -> bool:
        return allowed(release, self.patterns)

    def apt_options(self, architecture: str | None = None) -> list[str]:
        """What every apt command of the store takes after its name (for a
        package of ``architecture``: its private apt, if foreign)."""
        if architecture is not None and architecture in self.foreign:
            return self.foreign[architecture].options()
        return self.apt.options() if self.apt is not None else []

    def via(self, release: str) -> str | None:
        """The foreign architecture whose apt has ``release``'s packages
        (None: the server's own)."""
        architecture = release_architecture(release)
        return architecture if architecture in self.foreign else None

    @property
    def archive(self) -> str:
        """The archive in the clients' words: "the Debian archive this server uses"."""
        if self.apt is None:
            return "the Debian archive this server uses"
        return f"the Debian suites this server uses ({self.apt.describe()})"

    @property
    def in_thread(self) -> Blocking:
        """The fetcher's pool (store work blocks)."""
        return Blocking(self.reactor, self.pool)

    async def stored(self, release: str) -> StoredRelease | None:
        return await self.in_thread(self.store.get, release)

    @asynccontextmanager
    async def making(self, store: KernelStore, release: str) -> AsyncIterator[Making]:
        """The store's transaction: a private work directory for the body
        to fill (and say what it holds); left well, the release is put in
        place and the size cap applied (what it removed is logged); left by
        an error or a cancellation, nothing of it is kept."""
        making = Making(await self.in_thread(store.begin, release))
        try:
            yield making
            making.stored = await self.in_thread(store.commit, making.work, release,
                                                 making.packages, making.suite)
        except BaseException:
            await self.in_thread(store.abandon, making.work)
            raise
        for old in await self.in_thread(store.evict, release):
            self.log.info("Kernel store over its size cap: removed {what} ({size})",
                          what=describe_entry(old), size=megabytes(old.size))

    async def ensure(self, release: str, progress: Progress | None = None) -> StoredRelease:
        """The stored release, fetched first if need be (shared with any
        fetch of it already under way).  Raises :class:`FetchFailed`."""
        found = await self.stored(release)
        if found is not None:
            return found
        return await self._shared(release, lambda: self.fetch(release, progress),
                                  f"fetching kernel {release}")

    async def _shared(self, key: str, fetch: Callable[[], Awaitable[StoredRelease]],
                      what: str) -> StoredRelease:
        """``fetch()`` for the first caller of ``key``; callers that come
        while it runs wait for its result.  Raises :class:`FetchFailed`
        (an unexpected error is logged and becomes one)."""
        flight = self._flights.get(key)
        if flight is not None:
            waiter: Deferred[StoredRelease] = Deferred()
            flight.append(waiter)
            return await waiter
        waiting: list[Deferred[StoredRelease]] = []
        self._flights[key] = waiting
        try:
            stored = await fetch()
        except Exception as exc:
            del self._flights[key]
            if not isinstance(exc, FetchFailed):
                self.log.failure("{what} failed", what=what[:1].upper() + what[1:])
                exc = FetchFailed(f"{what} failed on the server")
            for waiter in waiting:
                waiter.errback(exc)
            raise exc
        del self._flights[key]
        for waiter in waiting:
            waiter.callback(stored)
        return stored

    @property
    def debug_store(self) -> KernelStore:
        """Symbols and debuginfo, apart from the build trees (``.debug``)."""
        return self.store.part(DEBUG_DIRECTORY)

    async def ensure_debug(self, release: str, vmlinux: bool,
                           progress: Progress | None = None) -> DebugFiles:
        """The release's System.map, and its ``vmlinux`` when asked.  Only
        those files are kept.  Raises FetchFailed.

        The map is read from the kernel image (:mod:`stapsrv.kernel.kallsyms`):
        ``/boot/vmlinuz-<release>`` when the machine has it, else the one in
        ``linux-image-<release>``, whose own System.map is a placeholder.
        The vmlinux, with the real map beside it, comes from
        ``linux-image-<release>-dbg``."""
        found = await self.stored_debug(release, vmlinux)
        if found is not None:
            return found
        store = self.debug_store
        if vmlinux:
            stored = await self._shared(
                f"{release} debuginfo",
                lambda: self._fetch_debug(store, release, progress),
                f"fetching the debuginfo of {release}")
        else:
            stored = await self._shared(
                f"{release} symbols",
                lambda: self._fetch_symbols(store, release, progress),
                f"making the System.map of {release}")
        return debug_files(stored)

    async def stored_debug(self, release: str, vmlinux: bool) -> DebugFiles | None:
        """What :meth:`ensure_debug` would give without fetching (None: it
        would fetch)."""
        found = await self.in_thread(self.debug_store.get, release)
        if found is not None:
            files = debug_files(found)
            if files.vmlinux is not None or not vmlinux:
                return files
        return None

    @property
    def image_store(self) -> KernelStore:
        """Kernel images, for booting a release in a VM (``.images``)."""
        return self.store.part(IMAGES_DIRECTORY)

    async def ensure_image(self, release: str, progress: Progress | None = None) -> Path:
        """The release's kernel image (``vmlinuz``): the machine's own in
        ``/boot`` when it has it, else the one in ``linux-image-<release>``,
        fetched into the store once.  Raises FetchFailed."""
        if not valid_release(release):
            raise FetchFailed(f"'{release}' is not a kernel release name")
        local = self.boot / f"vmlinuz-{release}"
        if await self.in_thread(os.access, local, os.R_OK):
            return local
        store = self.image_store
        found = await self.in_thread(store.get, release)
        if found is None:
            found = await self._shared(f"{release} image",
                                       lambda: self._fetch_image(store, release, progress),
                                       f"fetching the kernel image of {release}")
        else:
            await self.in_thread(store.touch, release)
        return image_path(found)

    async def _fetch_image(self, store: KernelStore, release: str,
                           progress: Progress | None) -> StoredRelease:
        if not valid_release(release):
            raise FetchFailed(f"'{release}' is not a kernel release name")
        package = await self.image_package(release)
        self.log.info("Fetching the kernel image of {release}: {name} {version} ({size}); "
                      "only its vmlinuz is kept", release=release, name=package.name,
                      version=package.version, size=megabytes(package.size))
        async with self.making(store, release) as making:
            work = making.work
            await self.download(work / "download", release, [package], package.size,
                                 _labelled(progress, "kernel image"))
            image = await self._unpack_image(work, release, package)
            os.rename(image, work / "root" / f"vmlinuz-{release}")
            making.packages.append(package.stored)
        return making.result

    async def candidate(self, name: str, via: str | None = None) -> Candidate:
        """apt's candidate of package ``name`` (``via``: through that
        foreign architecture's apt); FetchFailed without one."""
        if self.ready is not None:
            await self.ready()
        out, err, code = await self.run([APT_CACHE, *self.apt_options(via), "show",
                                         "--no-all-versions", name])
        found = parse_show(out.decode(errors="replace"))
        if code != 0 or not found:
            raise FetchFailed(f"{self.archive} has no {name}"
                              + (f" for {via}" if via is not None else ""))
        return evolve(found[0], via=via)

    async def image_package(self, release: str) -> Candidate:
        """The package holding the release's ``vmlinuz``: forky splits
        ``linux-image-<release>`` (then an empty package depending on the
        others) and puts the image in ``linux-binary-<release>``; older
        suites keep it in ``linux-image-<release>``."""
        try:
            return await self.candidate(f"linux-binary-{release}", self.via(release))
        except FetchFailed:
            return await self.candidate(f"linux-image-{release}", self.via(release))

    async def suite(self, package: Candidate) -> str | None:
        """The suite apt takes ``package``'s version from (None: not said)."""
        out, err, code = await self.run([APT_CACHE, *self.apt_options(package.via), "policy",
                                         package.name])
        return policy_suite(out.decode(errors="replace"), package.version) if code == 0 else None

    async def _fetch_symbols(self, store: KernelStore, release: str,
                             progress: Progress | None) -> StoredRelease:
        if not valid_release(release):
            raise FetchFailed(f"'{release}' is not a kernel release name")
        started = self.reactor.seconds()
        local = self.boot / f"vmlinuz-{release}"
        async with self.making(store, release) as making:
            work, packages = making.work, making.packages
            if await self.in_thread(os.access, local, os.R_OK):
                image = local
                self.log.info("Making the System.map of kernel {release} from {image}",
                              release=release, image=str(local))
            else:
                package = await self.image_package(release)
                self.log.info("Fetching the symbols of kernel {release}: {name} {version} "
                              "({size}); only the System.map made from its vmlinuz is kept",
                              release=release, name=package.name, version=package.version,
                              size=megabytes(package.size))
                await self.download(work / "download", release, [package], package.size,
                                     _labelled(progress, "kernel image"))
                image = await self._unpack_image(work, release, package)
                packages.append(package.stored)
            map_path = work / "root" / f"System.map-{release}"
            # Run in the work directory: "-m" puts the current one on sys.path.
            out, err, code = await self.run(
                [sys.executable, "-m", "stapsrv.kernel.kallsyms", str(image), str(map_path)],
                cwd=work)
            if code != 0:
                raise FetchFailed(f"reading the symbols of kernel {release} failed: "
                                  f"{_last_line(err) or f'exit {code}'}")
            self.log.info("Made the System.map of kernel {release} in {seconds:.1f} s "
                          "({functions})", release=release, functions=_last_line(out),
                          seconds=self.reactor.seconds() - started)
        return making.result

    async def _unpack_image(self, work: Path, release: str, package: Candidate) -> Path:
        """The ``vmlinuz`` of the downloaded image package: in ``/boot``,
        or in ``/usr/lib/modules/<release>/`` (forky's ``linux-binary``)."""
        if package.name.startswith("linux-binary-"):
            return await self._unpack_members(
                work, [f"./usr/lib/modules/{release}/vmlinuz"], strip=5)
        return await self._unpack_members(work, [f"./boot/vmlinuz-{release}"], strip=2)

    async def _unpack_members(self, work: Path, members: Sequence[str], strip: int) -> Path:
        """The first ``members`` of the downloaded package's data archive,
        unpacked into ``work/download`` (tar stops once it has them); the
        path of the first."""
        deb = next((work / "download").glob("*.deb"))
        out, err, code = await self.run(["/bin/sh", "-c", _EXTRACT, "sh", str(deb),
                                          str(work / "download"), str(strip), *members])
        first = work / "download" / Path(members[0]).name
        if code != 0 or not first.is_file():
            raise FetchFailed(f"unpacking {deb.name} failed: {_last_line(err)}")
        return first

    async def _fetch_debug(self, store: KernelStore, release: str,
                           progress: Progress | None) -> StoredRelease:
        if not valid_release(release):
            raise FetchFailed(f"'{release}' is not a kernel release name")
        started = self.reactor.seconds()
        package = await self.candidate(f"linux-image-{release}-dbg", self.via(release))
        self.log.info("Fetching the debuginfo of kernel {release}: {name} {version} ({size}); "
                      "its System.map and vmlinux are kept", release=release,
                      name=package.name, version=package.version, size=megabytes(package.size))
        async with self.making(store, release) as making:
            work = making.work
            await self.download(work / "download", release, [package], package.size,
                                 _labelled(progress, "debuginfo"))
            # Both are the first members of the archive: tar stops after them,
            # without decompressing the 5 GB of module debuginfo behind.
            names = (f"System.map-{release}", f"vmlinux-{release}")
            await self._unpack_members(work, [_DEBUG_BOOT + name for name in names], strip=5)
            for name in names:
                os.rename(work / "download" / name, work / "root" / name)
            making.packages.append(package.stored)
        self.log.info("Fetched the debuginfo of kernel {release} in {seconds:.1f} s "
                      "({size} kept)", release=release, size=megabytes(making.result.size),
                      seconds=self.reactor.seconds() - started)
        return making.result

    async def run(self, argv: Sequence[str], cwd: Path | None = None) -> tuple[bytes, bytes, int]:
        """A child process of the reactor: its output, errors and exit code;
        FetchFailed when it runs past :attr:`step_timeout` (it is stopped,
        with its pipeline)."""
        env = dict(self.environ)
        env.setdefault("LC_ALL", "C.UTF-8")
        try:
            return await run_child(self.reactor, argv, env, self.step_timeout, cwd)
        except ChildTimedOut as exc:
            raise FetchFailed(str(exc)) from None

    async def resolve(self, release: str) -> list[Candidate]:
        """The packages to fetch for ``release``; FetchFailed when the
        archive has none."""
        if not valid_release(release):
            raise FetchFailed(f"'{release}' is not a kernel release name")
        if self.ready is not None:
            await self.ready()
        headers = f"linux-headers-{release}"
        via = self.via(release)
        out, err, code = await self.run([APT_CACHE, *self.apt_options(via), "show",
                                         "--no-all-versions", headers])
        found = parse_show(out.decode(errors="replace"))
        if code != 0 or not found:
            raise FetchFailed(f"{self.archive} has no kernel headers "
                              f"for release {release} (no package {headers})")
        names = build_packages(found[0])
        # Another architecture's tree is built with the server's own
        # build tools (linux-kbuild) of the same version.
        groups: dict[str | None, list[str]] = {}
        for name in names:
            tools = via is not None and name.startswith("linux-kbuild-")
            groups.setdefault(None if tools else via, []).append(name)
        others: list[Candidate] = []
        failed = False
        for group_via, group in groups.items():
            if not group:
                continue
            out, err, code = await self.run([APT_CACHE, *self.apt_options(group_via), "show",
                                             "--no-all-versions", *group])
            failed = failed or code != 0
            others += [evolve(candidate, via=group_via)
                       for candidate in parse_show(out.decode(errors="replace"))]
        missing = set(names) - {candidate.name for candidate in others}
        if failed or missing:
            raise FetchFailed(f"the Debian archive lacks {', '.join(sorted(missing)) or names}"
                              f" needed for kernel {release}")
        return [evolve(found[0], via=via), *others]

    async def fetch(self, release: str, progress: Progress | None = None) -> StoredRelease:
        started = self.reactor.seconds()
        packages = await self.resolve(release)
        suite = await self.suite(packages[0])
        total = sum(package.size for package in packages)
        self.log.info("Fetching kernel {release}: {packages} ({total}){suite}",
                      release=release, suite=f" from {suite}" if suite else "",
                      packages=", ".join(f"{p.name} {p.version} ({megabytes(p.size)})"
                                         for p in packages),
                      total=megabytes(total))
        async with self.making(self.store, release) as making:
            await self._fetch_into(making.work, release, packages, total, progress)
            making.packages += [package.stored for package in packages]
            making.suite = suite
        self.log.info("Fetched kernel {release} in {seconds:.1f} s ({size} unpacked)",
                      release=release, seconds=self.reactor.seconds() - started,
                      size=megabytes(making.result.size))
        return making.result

    async def download(self, download: Path, release: str, packages: list[Candidate],
                       total: int, progress: Progress | None) -> None:
        """``apt-get download`` of exactly these versions into ``download``
        (apt checks each file against its signed indexes)."""
        ticker = None
        if progress is not None:
            report = progress

            def tick() -> None:
                report(release, _directory_bytes(download), total)
            ticker = LoopingCall(tick)
            ticker.clock = self.reactor
            ticker.start(0.5)
        code, err = 0, b""
        try:
            for via in dict.fromkeys(package.via for package in packages):
                out, err, code = await self.run(
                    [APT_GET, *self.apt_options(via), "download", "-q",
                     *(f"{p.name}={p.version}" for p in packages if p.via == via)],
                    cwd=download)
                if code != 0:
                    break
        finally:
            if ticker is not None:
                ticker.stop()
                tick()
        if code != 0:
            raise FetchFailed(f"downloading kernel {release} failed: "
                              f"{_last_line(err) or f'apt-get exit {code}'}")

    async def _fetch_into(self, work: Path, release: str, packages: list[Candidate],
                          total: int, progress: Progress | None) -> None:
        download = work / "download"
        await self.download(download, release, packages, total, progress)
        root = work / "root"
        debs = {deb.name.split("_", 1)[0]: deb for deb in download.glob("*.deb")}
        for package in packages:
            deb = debs.get(package.name)
            if deb is None:
                raise FetchFailed(f"apt-get did not download {package.name}")
            out, err, code = await self.run([DPKG_DEB, "-x", str(deb), str(root)])
            if code != 0:
                raise FetchFailed(f"unpacking {deb.name} failed: {_last_line(err)}")
        await self.in_thread(fix_tree, root, release, self.store.final_root(release))


@frozen
class DebugFiles:
    """A release's symbols, and its kernel debuginfo when fetched."""

    system_map: Path
    vmlinux: Path | None


#: Where the -dbg package has them (members of its data archive).
_DEBUG_BOOT = "./usr/lib/debug/boot/"
_EXTRACT = ('deb="$1"; dir="$2"; strip="$3"; shift 3; dpkg-deb --fsys-tarfile "$deb" | '
            'tar -x --occurrence=1 -C "$dir" --strip-components="$strip" "$@"')


def image_path(stored: StoredRelease) -> Path:
    """The kernel image of an entry of the image store."""
    return stored.directory / "root" / f"vmlinuz-{stored.release}"


def debug_files(stored: StoredRelease) -> DebugFiles:
    root = stored.directory / "root"
    vmlinux = root / f"vmlinux-{stored.release}"
    return DebugFiles(root / f"System.map-{stored.release}",
                      vmlinux if vmlinux.is_file() else None)


def _labelled(progress: Progress | None, what: str) -> Progress | None:
    """``progress`` with ``what`` after the release's name."""
    if progress is None:
        return None
    report = progress

    def labelled(release: str, done: int, total: int) -> None:
        report(f"{release} {what}", done, total)
    return labelled


def _directory_bytes(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
