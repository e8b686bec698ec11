"""The kernel store's own apt: the Debian suites the admin named
(``--fetch-suites``), with lists, cache and package status of its own
under ``STORE/.apt/``, so that the machine's ``/etc/apt`` and
``/var/lib/apt`` are read for nothing but apt's general settings (a
proxy, say) and written never.

:class:`PrivateApt` writes the configuration (blocking; once, at start)
and gives the words every ``apt-get``/``apt-cache`` of the store takes
(``-c STORE/.apt/apt.conf``).  :class:`ListsUpdater` runs ``apt-get
update`` through it, as the server's user, a bounded child of the
reactor like every external step of the store, at start and then every
:data:`UPDATE_INTERVAL` seconds, and hands the ``linux-headers-*`` names
the lists hold to whoever asked (the fetch policy's patterns).  An update
that fails for one suite (a key missing from the keyring, an expired
``Release``) is logged with apt's words; the suites that did update are
used.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from stapsrv.core.aptsources import (
    DEBIAN_KEYRING,
    ETC,
    LOG,
    SOURCES_FILE,
    STATUS_FILE,
    AptSuite,
    apt_conf_text,
    check_architecture,
    parse_suites,
    sources_text,
)

#: The private configuration's directory in the kernel store.
APT_DIRECTORY = ".apt"
CONFIG_FILE = "apt.conf"
#: Touched after each update that updated every suite (its time is the
#: last such update; a command retries sooner after a failed one).
UPDATED_STAMP = "state/updated"
#: Seconds between two updates of the lists (Debian's security suites
#: publish several times a day; the dated InRelease files say a week).
UPDATE_INTERVAL = 6 * 3600.0
APT_GET = "/usr/bin/apt-get"
APT_CACHE = "/usr/bin/apt-cache"

#: Runs a program to completion: (output, errors, exit code).
Runner = Callable[[Sequence[str]], Awaitable[tuple[bytes, bytes, int]]]


class AptSetupError(Exception):
    """The private configuration cannot be made; one line for the log."""


@frozen
class PrivateApt:
    """Where the private configuration is, and what it names."""

    directory: Path
    suites: tuple[AptSuite, ...]
    architecture: str
    keyring: Path = Path(DEBIAN_KEYRING)

    @property
    def config_file(self) -> Path:
        return self.directory / CONFIG_FILE

    def options(self) -> list[str]:
        """The words after ``apt-get``/``apt-cache`` that make them use it."""
        return ["-c", str(self.config_file)]

    def describe(self) -> str:
        return " ".join(suite.name if suite.uri in _DEFAULT_URIS else f"{suite.name}={suite.uri}"
                        for suite in self.suites)

    def prepare(self) -> None:
        """Write the configuration (blocking).  Raises AptSetupError when
        the keyring cannot be read or a file cannot be written."""
        check_architecture(self.architecture)
        if not self.suites:
            raise AptSetupError("no suites named")
        if not os.access(self.keyring, os.R_OK):
            raise AptSetupError(
                f"the archive keyring {self.keyring} cannot be read: install Debian's "
                "debian-archive-keyring package (the suites are never used unverified)")
        base = self.directory.absolute()
        try:
            for name in (f"{ETC}/sources.list.d", f"{ETC}/preferences.d",
                         f"{ETC}/trusted.gpg.d", "state/lists/partial",
                         "cache/archives/partial", LOG):
                (base / name).mkdir(parents=True, exist_ok=True, mode=0o755)
            _replace(base / f"{ETC}/sources.list", "")
            _replace(base / SOURCES_FILE,
                     sources_text(self.suites, self.architecture, str(self.keyring)))
            _replace(base / CONFIG_FILE, apt_conf_text(str(base), self.architecture))
            status = base / STATUS_FILE
            if not status.exists():
                status.write_text("")
        except (OSError, ValueError) as exc:
            raise AptSetupError(f"the private apt configuration in {base} cannot be "
                                f"written: {exc}") from None

    def last_update(self) -> float | None:
        """When the lists were last updated (None: never)."""
        try:
            return (self.directory / UPDATED_STAMP).stat().st_mtime
        except OSError:
            return None


_DEFAULT_URIS = ("http://deb.debian.org/debian", "http://deb.debian.org/debian-security")


def host_suites(os_release: Path = Path("/etc/os-release")) -> tuple[AptSuite, ...]:
    """The machine's own Debian suites (its codename, with -updates and
    -security), for the other architectures' apt when no suites are named;
    raises AptSetupError when ``os_release`` names no codename."""
    try:
        fields = dict(line.split("=", 1) for line in os_release.read_text().splitlines()
                      if "=" in line)
    except OSError as exc:
        raise AptSetupError(f"cannot read {os_release}: {exc}") from None
    codename = fields.get("VERSION_CODENAME", "").strip().strip('"')
    if not codename:
        raise AptSetupError(f"{os_release} names no VERSION_CODENAME: name the suites "
                            "(--fetch-suites) for the other architectures")
    return parse_suites([f"{codename} {codename}-updates {codename}-security"])


def foreign_apts(store: Path, suites: tuple[AptSuite, ...],
                 architectures: Sequence[str]) -> dict[str, PrivateApt]:
    """A private apt per other architecture (``STORE/.apt-ARCH``), for
    ``suites`` (none: the machine's own, :func:`host_suites`), prepared
    (blocking).  Raises AptSetupError."""
    if not architectures:
        return {}
    suites = suites or host_suites()
    found = {}
    for architecture in architectures:
        apt = PrivateApt(store / f"{APT_DIRECTORY}-{architecture}", suites, architecture)
        apt.prepare()
        found[architecture] = apt
    return found


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all."""
    partial = path.with_name(path.name + ".new")
    partial.write_text(text)
    os.replace(partial, path)


def apt_problems(errors: bytes) -> list[str]:
    """apt's error and warning lines (``E:``, ``W:``, ``Err:``)."""
    return [line.strip() for line in errors.decode(errors="replace").splitlines()
            if line.startswith(("E: ", "W: ", "Err:"))][:20]


@define(eq=False)
class ListsUpdater:
    """``apt-get update`` through a :class:`PrivateApt`, now and every
    ``interval`` seconds; each time, ``on_packages`` gets the names of the
    ``linux-headers-*`` packages the lists hold."""

    apt: PrivateApt
    run: Runner
    clock: IReactorTime
    on_packages: Callable[[list[str]], None]
    log: Logger = field(factory=Logger)
    interval: float = UPDATE_INTERVAL
    _loop: LoopingCall | None = field(init=False, default=None)
    #: The update under way (stopping cancels it: its apt is ended).
    _running: Deferred[None] | None = field(init=False, default=None)
    #: Waiting for the first update (None: it ended).
    _waiters: list[Deferred[None]] | None = field(init=False, factory=list)

    async def update(self) -> bool:
        """One update; whether apt updated every suite.  What the lists
        hold afterwards (all the suites that did update) goes to
        ``on_packages``."""
        started = self.clock.seconds()
        out, err, code = await self.run([APT_GET, *self.apt.options(), "update", "-q"])
        seconds = self.clock.seconds() - started
        problems = apt_problems(err)
        if code == 0 and not problems:
            self.log.info("Kernel store: updated the lists of {suites} in {seconds:.1f} s",
                          suites=self.apt.describe(), seconds=seconds)
        else:
            self.log.warn("Kernel store: apt-get update of {suites} ended with exit {code} "
                          "in {seconds:.1f} s; a suite whose lists did not update is served "
                          "from its previous lists, if any: {problems}",
                          suites=self.apt.describe(), code=code, seconds=seconds,
                          problems=" | ".join(problems) or "no message")
        if code == 0:
            (self.apt.directory / UPDATED_STAMP).touch()
        self.on_packages(await self.headers())
        return code == 0 and not problems

    async def headers(self) -> list[str]:
        """The ``linux-headers-*`` package names the lists hold."""
        out, err, code = await self.run([APT_CACHE, *self.apt.options(), "pkgnames",
                                         "linux-headers-"])
        if code != 0:
            self.log.warn("Kernel store: apt-cache pkgnames failed: {problems}",
                          problems=" | ".join(apt_problems(err)) or f"exit {code}")
            return []
        return sorted(out.decode(errors="replace").split())

    def start(self) -> None:
        """The first update now, the others every :attr:`interval` seconds."""
        loop = self._loop = LoopingCall(self._tick)
        loop.clock = self.clock
        loop.start(self.interval, now=True).addErrback(
            lambda failure: self.log.failure("Kernel store: the lists updates stopped",
                                             failure))

    def stop(self) -> None:
        """No more updates; one under way is stopped (its apt ended)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._running is not None:
            self._running.cancel()

    def first_update(self) -> Deferred[None]:
        """Fires once the first update ended (whatever its outcome)."""
        waiter: Deferred[None] = Deferred()
        if self._waiters is None:
            waiter.callback(None)
        else:
            self._waiters.append(waiter)
        return waiter

    def start_if_stale(self, now: float) -> None:
        """One update now when the lists are missing or older than
        :attr:`interval` (``now``: the wall clock), else none (for a
        command that fetches once, such as ``kernels prefetch``)."""
        last = self.apt.last_update()
        if last is not None and 0 <= now - last < self.interval:
            self._first_ended()
        else:
            self._tick()

    def _tick(self) -> Deferred[None]:
        async def once() -> None:
            try:
                await self.update()
            except CancelledError:
                self.log.info("Kernel store: the update of the lists was stopped")
            except Exception as exc:
                self.log.warn("Kernel store: updating the lists failed: {error}",
                              error=str(exc) or type(exc).__name__)
            finally:
                self._running = None
            self._first_ended()
        running = self._running = Deferred.fromCoroutine(once())
        if running.called:  # it ended at once (no apt to wait for)
            self._running = None
        return running

    def _first_ended(self) -> None:
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            waiter.callback(None)
