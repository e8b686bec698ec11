"""The server's own warm-up compiles, which make the kernel configuration
headers (``stapconf_*.h``) that every sandboxed translator starts with.

A translator in the sandbox has a private ``SYSTEMTAP_DIR``, so a header
it makes is lost with it.  Instead the server compiles a fixed script
(:data:`stapsrv.compile.sandbox.WARM_UP_SCRIPT`) once per release and
guru mode and keeps the headers it made in the
:class:`~stapsrv.compile.sandbox.StapconfStore`.  At start that is done
in the background, in a translator slot, for every installed release that
has a build tree; any other release (a stored one, or guru mode) is warmed
up before its first request's translator runs, and requests that come
meanwhile wait for the same warm-up.  A warm-up whose inputs are unchanged
since an earlier server's is not done again.  Without the sandbox there
is nothing to warm up.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

from attrs import Factory, define, evolve, field
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from stapsrv.blocking import Blocking
from stapsrv.compile.context import RequestContext
from stapsrv.compile.releases import ServedReleases
from stapsrv.compile.sandbox import WARM_UP_SCRIPT, StapconfStore, warm_up_key
from stapsrv.compile.scratch import MODULE_DIR, make_scratch
from stapsrv.compile.sharedconf import SharedStapconf, fleet_key, header_names
from stapsrv.compile.translator import TranslatorRun, start_translator
from stapsrv.config.values import ServerConfig
from stapsrv.core.budget import OverBudget
from stapsrv.core.cmdline import ServerOption, translator_argv
from stapsrv.core.programs import STORE_NICENESS
from stapsrv.kernel.toolchains import Toolchain
from stapsrv.paths import build_tree
from stapsrv.reactor import IHandlerReactor


class TranslatorSetup(Protocol):
    """What a warm-up compile asks of the handler: how its translators run."""

    def server_options(self, release: str,
                       toolchain: Toolchain | None = None) -> list[ServerOption]:
        """The server's own options for the translator, for ``release``."""

    def translator_environment(self, scratch: Path) -> dict[str, str]:
        """The translator's environment for a scratch directory."""

    def sandbox_words(self, scratch: Path, release: str | None = None,
                      toolchain: Toolchain | None = None) -> tuple[str, ...]:
        """The sandbox's private directories made in ``scratch``, and bwrap's words."""

    def translator(self, toolchain: Toolchain | None) -> str:
        """The translator program of a toolchain (None: the host's)."""

    def stapconf_for(self, toolchain: Toolchain | None) -> StapconfStore | None:
        """Where a toolchain's kernel configuration headers are kept."""


@define(eq=False)
class WarmUp:
    """The warm-up compiles of one handler."""

    config: ServerConfig
    reactor: IHandlerReactor
    pool: ThreadPool
    #: Where its blocking work runs.
    _in_thread: Blocking = field(init=False, default=Factory(
        lambda self: Blocking(self.reactor, self.pool), takes_self=True))
    releases: ServedReleases
    translators: TranslatorSetup
    #: Where the headers are kept (None without the sandbox).
    stapconf: StapconfStore | None
    #: The handler's translator slots (``--max-threads``).
    gate: DeferredSemaphore
    #: The handler's running translators: a warm-up's is one of them.
    running: set[TranslatorRun]
    log: Logger = field(factory=Logger)
    #: Warm-up compiles per (release, guru mode): the clients waiting for
    #: one, or True once it is done.
    _warmups: dict[tuple[str, str, bool], list[Deferred[None]] | bool] = field(
        init=False, factory=dict)
    #: Headers shared with the other members of a fleet (None: not shared).
    shared: SharedStapconf | None = None

    def start(self) -> None:
        """In the background, make the kernel configuration header of every
        served release that has a build tree, each in a translator slot, so
        that the first requests need not wait for it."""
        if self.releases.sandbox is None:
            return
        for release in self.config.releases:
            tree = Path(release) if release.startswith("/") else build_tree(release)
            if (tree / "Makefile").exists():
                Deferred.fromCoroutine(self._warm_up_in_a_slot(release))
                # Shared with the requests that come meanwhile (free for them).
                self.releases.debug_work(release)

    async def _warm_up_in_a_slot(self, release: str) -> None:
        await self.gate.acquire()
        try:
            await self.stapconf_ready(release, False)
        finally:
            self.gate.release()

    def known_ready(self, release: str, guru: bool, toolchain: Toolchain | None) -> bool:
        """Whether the header is known to be ready (without a look at disk)."""
        return self._warmups.get(_key(release, guru, toolchain)) is True

    async def ahead(self, release: str, guru: bool, context: RequestContext,
                    toolchain: Toolchain | None) -> None:
        """A request's warm-up started before its turn to compile (while its
        release's symbols are being made), in a translator slot of the
        server's own; the request's own :meth:`stapconf_ready` then waits
        for it or finds it done.  What stops it is the request's to meet."""
        await self.gate.acquire()
        try:
            if not context.abandoned:
                await self.stapconf_ready(release, guru, context, toolchain)
        except OverBudget:
            pass  # the request is told when it asks itself
        except Exception:
            self.log.failure("The warm-up ahead of the compile for kernel {release} failed",
                             release=release)
        finally:
            self.gate.release()

    async def stapconf_ready(self, release: str, guru: bool,
                             context: RequestContext | None = None,
                             toolchain: Toolchain | None = None) -> None:
        """Once per release and guru mode, before the first request's
        translator: the server's own compile of a fixed script makes the
        kernel configuration header that every sandbox then starts with.
        It counts against the share of kernel store work of the request
        that starts it (``context``; None: the server's own): past the
        share, OverBudget is raised and nothing is started (that request's
        translator makes the header for itself)."""
        key = _key(release, guru, toolchain)
        named = _named(release, guru, toolchain)
        state = self._warmups.get(key)
        if state is True:
            return
        if state is None and await self._in_thread(self._was_warmed, release, guru,
                                                   toolchain):
            self._warmups[key] = True
            self.log.info("Kernel configuration header for {release} ready (made before)",
                          release=named)
            return
        state = self._warmups.get(key)
        if state is True:
            return
        if isinstance(state, list):
            waiter: Deferred[None] = Deferred()
            state.append(waiter)
            await waiter
            return
        self.releases.charge(context, release, "the kernel configuration warm-up compile "
                             f"for kernel release '{release}'"
                             + (" in guru mode" if guru else ""))
        waiting: list[Deferred[None]] = []
        self._warmups[key] = waiting
        try:
            await self.releases.counted(context, lambda: self._shared_or_warm_up(
                release, guru, toolchain))
        finally:
            self._warmups[key] = True
            for waiter in waiting:
                waiter.callback(None)

    async def _shared_or_warm_up(self, release: str, guru: bool,
                                 toolchain: Toolchain | None) -> None:
        """The fleet's headers for this warm-up when another member made
        them, else the warm-up here, its headers then given to the fleet."""
        shared, stapconf = self.shared, self._stapconf(toolchain)
        if shared is None or stapconf is None:
            return await self._warm_up(release, guru, toolchain)
        other = None if toolchain is None or toolchain.is_host else toolchain
        key = await self._in_thread(
            fleet_key, release, self.releases.tree(release),
            self.translators.translator(other),
            shutil.which("gcc") if other is None else str(other.root / "usr" / "bin" / "gcc"),
            (self.config.runtime or self.releases.runtimes.get(release)) if other is None
            else None,
            guru, [option.flag + (option.value or "")
                   for option in self._options(release, toolchain)])
        named = _named(release, guru, toolchain)
        if await shared.take(key, stapconf, named, self._in_thread):
            await self._in_thread(stapconf.mark_warmed,
                                  self._warm_up_key(release, guru, toolchain))
            return
        before = await self._in_thread(header_names, stapconf)
        await self._warm_up(release, guru, toolchain)
        await shared.give(key, stapconf, before, named, self._in_thread)

    def _stapconf(self, toolchain: Toolchain | None) -> StapconfStore | None:
        if toolchain is None or toolchain.is_host:
            return self.stapconf
        return self.translators.stapconf_for(toolchain)

    def _options(self, release: str, toolchain: Toolchain | None) -> list[ServerOption]:
        if toolchain is None or toolchain.is_host:
            return self.translators.server_options(release)
        return self.translators.server_options(release, toolchain)

    def _warm_up_key(self, release: str, guru: bool, toolchain: Toolchain | None) -> str:
        tree = self.releases.tree(release)
        options = [option.flag + (option.value or "")
                   for option in self._options(release, toolchain)]
        if toolchain is None or toolchain.is_host:
            return warm_up_key(self.config.stap, tree,
                               self.config.runtime or self.releases.runtimes.get(release),
                               guru, options)
        options.append("toolchain " + toolchain.label())
        return warm_up_key(str(toolchain.root / "usr" / "bin" / "stap"), tree, None, guru,
                           options)

    def _was_warmed(self, release: str, guru: bool, toolchain: Toolchain | None) -> bool:
        stapconf = self._stapconf(toolchain)
        assert stapconf is not None
        return stapconf.warmed(self._warm_up_key(release, guru, toolchain))

    async def _warm_up(self, release: str, guru: bool, toolchain: Toolchain | None) -> None:
        stapconf = self._stapconf(toolchain)
        assert self.releases.sandbox is not None and stapconf is not None
        started = self.reactor.seconds()
        named = _named(release, guru, toolchain)
        scratch = await self._in_thread(make_scratch, self.config.tmpdir)
        try:
            module_dir = scratch / "response" / MODULE_DIR
            module_dir.mkdir(mode=0o700)
            host = toolchain is None or toolchain.is_host
            if host:
                words = await self._in_thread(self.translators.sandbox_words, scratch)
            else:
                words = await self._in_thread(self.translators.sandbox_words, scratch,
                                              release, toolchain)
            argv = translator_argv(
                self.config.stap if host else self.translators.translator(toolchain),
                self.releases.target(release), self._options(release, toolchain),
                str(module_dir),
                ["-p4", "-e", WARM_UP_SCRIPT, *(["-g"] if guru else [])])
            run = start_translator(
                self.reactor, argv, self.translators.translator_environment(scratch),
                scratch / "request", scratch / "response" / "stdout",
                scratch / "response" / "stderr",
                evolve(self.config.limits, niceness=STORE_NICENESS), words,
                self.config.max_output)
            self.running.add(run)
            try:
                status = await run.result
            finally:
                self.running.discard(run)
            if status != 0:
                self.log.warn("The warm-up compile for kernel {release} failed (rc {rc}); "
                              "each request makes its own kernel configuration header",
                              release=named, rc=status)
                return
            _, private = self.releases.sandbox.private_dirs(scratch)
            added = await self._in_thread(stapconf.collect, private)
            await self._in_thread(stapconf.mark_warmed,
                                  self._warm_up_key(release, guru, toolchain))
            self.log.info("Kernel configuration header for {release} ready in "
                          "{seconds:.1f} s ({added} new)", release=named, added=added,
                          seconds=self.reactor.seconds() - started)
        except Exception:
            self.log.failure("The warm-up compile for kernel {release} could not run",
                             release=release)
        finally:
            await self._in_thread(shutil.rmtree, scratch, True)


def _key(release: str, guru: bool, toolchain: Toolchain | None) -> tuple[str, str, bool]:
    """Which warm-up serves a request: the host's chosen for a request is the
    same as the server's own."""
    return ("" if toolchain is None or toolchain.is_host else toolchain.name, release, guru)


def _named(release: str, guru: bool, toolchain: Toolchain | None) -> str:
    """A release as the warm-up's log lines name it (with its guru mode and
    a toolchain other than the host's)."""
    return (release + (" (guru mode)" if guru else "")
            + (f" with toolchain {toolchain.name}"
               if toolchain is not None and not toolchain.is_host else ""))
