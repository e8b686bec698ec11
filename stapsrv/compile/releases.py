"""The kernel releases a request handler builds for.

They are the releases the server was given (installed ones, or build
trees named by path) and the releases of the kernel store it adopts when a
client asks for one (fetched first when the store does not have it yet).
Adopting a stored tree prepares its runtime fix, as the service does for
an installed tree at start, and lets the sandbox show that runtime.  With
``--fetch-symbols`` (``--fetch-debuginfo``) the release's ``System.map``
(and ``vmlinux``) are fetched too and put where the translator looks.

:class:`ServedReleases` answers the handler's questions about a release:
whether it is served, its build tree, what ``-r`` names for it, and the
files the sandbox shows at ``/boot``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from attrs import Factory, define, evolve, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from stapsrv.blocking import Blocking
from stapsrv.compile.context import RequestContext
from stapsrv.compile.sandbox import Sandbox
from stapsrv.compile.slots import FairGate
from stapsrv.config.values import ServerConfig
from stapsrv.core.budget import SERVER, OverBudget, PeerBudget, Work, over_budget_message
from stapsrv.core.cmdline import Privilege
from stapsrv.kernel.fetch import DebugFiles, FetchFailed, KernelFetcher
from stapsrv.kernel.moduledebug import ModuleDebug
from stapsrv.kernel.runtime import select_runtime
from stapsrv.kernel.store import Lease, StoredRelease, settle_tree_time
from stapsrv.paths import build_tree
from stapsrv.reactor import IHandlerReactor

#: Seconds before symbols that could not be had are tried again.
DEBUG_RETRY = 600
#: Seconds a request waits for symbols still being made before it goes on
#: without them (the making goes on, for the requests after it).
SYMBOL_WAIT = 20.0

T = TypeVar("T")


@define(eq=False)
class ServedReleases:
    """The releases one handler builds for, and what it knows of each."""

    config: ServerConfig
    reactor: IHandlerReactor
    pool: ThreadPool
    #: Where its blocking work runs.
    _in_thread: Blocking = field(init=False, default=Factory(
        lambda self: Blocking(self.reactor, self.pool), takes_self=True))
    #: Fixed runtimes by release; a stored release adds its own.  The
    #: handler passes its own dict, so both see the same runtimes.
    runtimes: dict[str, str] = field(factory=dict)
    #: The translators' sandbox (None with ``--no-sandbox``); a stored
    #: tree's fixed runtime is added to what it shows.
    sandbox: Sandbox | None = None
    #: Fetches releases that are not installed into the kernel store; None
    #: with ``--no-fetch``.
    kernels: KernelFetcher | None = None
    #: Told (in the reactor thread) of each release first served from the
    #: kernel store.
    on_release_added: Callable[[str], None] | None = None
    log: Logger = field(factory=Logger)
    #: Fetches the debuginfo of modules scripts name (``--fetch-debuginfo``).
    module_debug: ModuleDebug | None = None
    #: Releases of the kernel store known to this server: their build trees.
    _stored: dict[str, Path] = field(init=False, factory=dict)
    #: The suite each stored release came from, where the store recorded it.
    _suites: dict[str, str] = field(init=False, factory=dict)
    #: Symbols (and debuginfo) fetched for served releases.
    _debug: dict[str, DebugFiles] = field(init=False, factory=dict)
    #: When making a release's symbols last failed (they are not tried
    #: again for :data:`DEBUG_RETRY` seconds, so that an unreachable archive
    #: does not hold up every request).
    _debug_failed: dict[str, float] = field(init=False, factory=dict)
    #: How long a request waits for symbols still being made.
    symbol_wait: float = SYMBOL_WAIT
    #: The symbols of each release being made now, shared by the requests
    #: that wait for them.
    _debug_work: dict[str, Deferred[None]] = field(init=False, factory=dict)
    #: Kernel store work under way per client address (``--peer-fetches``).
    budget: PeerBudget = field(init=False)
    #: Steps (fetches, symbol passes, warm-ups) running for each piece of
    #: counted work: it stays counted until they are over, even once its
    #: request has gone on without them.
    _steps: Counter[Work] = field(init=False, factory=Counter)
    #: Counted work whose request waits on it no more.
    _let_go: set[Work] = field(init=False, factory=set)
    #: The fetches run at once (``--max-fetches``), client addresses in turn.
    fetches: FairGate = field(init=False)
    #: Releases being fetched for a request: the requests that share it.
    _release_flights: dict[str, list[Deferred[StoredRelease]]] = field(
        init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self.budget = PeerBudget(self.config.peer_fetches)
        self.fetches = FairGate(max(1, self.config.max_fetches))

    def charge(self, context: RequestContext | None, release: str, what: str) -> None:
        """Before kernel store work for ``release`` for a request (None: the
        server's own): the request counts against its address's share, once
        however many steps it takes, until it waits on them no more
        (:meth:`let_go`) and the steps it started (:meth:`counted`) are
        over.  Raises :class:`OverBudget` past the share."""
        if context is None or context.store_work is not None or context.answered:
            return  # the server's own; counted already; or answered (nothing would free it)
        address = context.address
        work = self.budget.start(address, release, what)
        if work is None:
            under_way = self.budget.under_way(address)
            self.log.info("Not starting {what} for {address}: it has {count} piece(s) of "
                          "kernel store work under way ({busy})", what=what, address=address,
                          count=len(under_way),
                          busy=", ".join(item.what for item in under_way))
            raise OverBudget(over_budget_message(what, address, self.budget.per_peer,
                                                 under_way))
        context.store_work = work

    async def counted(self, context: RequestContext | None,
                      step: Callable[[], Awaitable[T]]) -> T:
        """``step()``, a piece of kernel store work of the request's counted
        work: that stays counted while the step runs, whatever becomes of
        the request."""
        work = None if context is None else context.store_work
        if work is None:
            return await step()
        self._steps[work] += 1
        try:
            return await step()
        finally:
            self._steps[work] -= 1
            self._settle(work)

    def let_go(self, context: RequestContext) -> None:
        """The request waits on its kernel store work no more (its compile
        starts, or it is answered): its address's share is free once the
        steps it started are over."""
        work, context.store_work = context.store_work, None
        if work is not None:
            self._let_go.add(work)
            self._settle(work)

    def _settle(self, work: Work) -> None:
        if work in self._let_go and self._steps[work] <= 0:
            self._let_go.discard(work)
            del self._steps[work]
            self.budget.finish(work)

    def finish_work(self, context: RequestContext) -> None:
        """The request is answered: what it held of the kernel store is
        free, and its address's share once its steps are over."""
        context.answered = True
        if context.lease is not None:
            context.lease.close()
            context.lease = None
        self.let_go(context)

    async def fetching(self, address: str, fetch: Callable[[], Deferred[T]]) -> T:
        """``fetch()`` once one of the fetch slots is free and it is
        ``address``'s turn."""
        await self.fetches.acquire_for(address)
        try:
            return await fetch()
        finally:
            self.fetches.release_for(address)

    def stored_tree(self, release: str) -> Path | None:
        """The build tree of a release adopted from the kernel store (None:
        not one)."""
        return self._stored.get(release)

    def debug_files(self, release: str) -> DebugFiles | None:
        """What was fetched of the release's symbols (None: nothing yet)."""
        return self._debug.get(release)

    async def provide_release(self, release: str | None,
                              context: RequestContext) -> str | None:
        """Make a release that is not installed available from the kernel
        store, fetching it if the policy allows; the client's one-line
        reason when it cannot be had (None: go on, the preparation refuses
        a release that is neither served nor fetchable).  Raises OverBudget
        when fetching it would take the request past its address's share
        of kernel store work."""
        if release is None or release in self.config.releases or self.kernels is None:
            return None
        if not self.kernels.allowed(release):
            return None
        try:
            stored = await self._stored_or_fetched(release, context)
        except FetchFailed as exc:
            self.log.info("Cannot provide kernel {release} for {peer}: {reason}",
                          release=release, peer=context.peer, reason=str(exc))
            return f"Server: Cannot build for kernel release '{release}': {exc}."
        new = stored.release not in self._stored
        await self._in_thread(self._adopt, stored)
        if new and self.on_release_added is not None:
            self.on_release_added(stored.release)
        return None

    async def hold(self, release: str, context: RequestContext) -> str | None:
        """Lease what the kernel store has of ``release`` until the request
        is answered (:meth:`finish_work`); a stored tree removed since it
        was provided is had again, once.  The client's one-line reason when
        it cannot be held."""
        if self.kernels is None or release.startswith("/"):
            return None
        for _ in range(2):
            try:
                lease = await self._in_thread(self._lease, release)
            except OSError as exc:
                self.log.warn("Cannot hold kernel {release} for {peer}: {error}",
                              release=release, peer=context.peer, error=str(exc))
                return (f"Server: Kernel release '{release}' cannot be held for this request "
                        f"now ({exc.strerror or exc}); try again.")
            if lease is not None:
                if context.lease is not None:
                    context.lease.close()
                context.lease = lease
                return None
            self._debug.pop(release, None)  # its links went with the old tree
            try:
                problem = await self.provide_release(release, context)
            except OverBudget as exc:
                return str(exc)
            if problem is not None:
                return problem
            await self.provide_debug_within(release, context)  # linked into the new tree
        return (f"Server: Kernel release '{release}' was removed from the server's kernel "
                "store while this request waited for it; try again.")

    def _lease(self, release: str) -> Lease | None:
        """The store's lease of ``release`` (blocking); None when a tree
        this server adopted is no longer there."""
        assert self.kernels is not None
        store = self.kernels.store
        lease = store.lease(release)
        if release in self._stored and not lease.holds(store.directory):
            lease.close()
            return None
        return lease

    async def _stored_or_fetched(self, release: str, context: RequestContext
                                 ) -> StoredRelease:
        """The stored release; fetched first (in a fetch slot, counted
        against the request's address) unless a fetch of it is under way
        already, which the request shares.  Raises OverBudget, FetchFailed."""
        assert self.kernels is not None
        flight = self._release_flights.get(release)
        if flight is not None:
            waiter: Deferred[StoredRelease] = Deferred()
            flight.append(waiter)
            return await waiter
        found = await self.kernels.stored(release)
        if found is not None:
            return found
        flight = self._release_flights.get(release)  # one may have begun meanwhile
        if flight is not None:
            waiter = Deferred()
            flight.append(waiter)
            return await waiter
        kernels = self.kernels
        self.charge(context, release, f"the fetch of kernel release '{release}'")
        waiting: list[Deferred[StoredRelease]] = []
        self._release_flights[release] = waiting

        def fetch() -> Deferred[StoredRelease]:
            if context.abandoned and not waiting:
                # Its turn came after its client left, and nobody else asks.
                raise FetchFailed("its client went away")
            return Deferred.fromCoroutine(kernels.ensure(release))

        try:
            stored = await self.counted(context, lambda: self.fetching(context.address, fetch))
        except Exception as exc:
            del self._release_flights[release]
            for waiter in waiting:
                waiter.errback(exc)
            raise
        del self._release_flights[release]
        for waiter in waiting:
            waiter.callback(stored)
        return stored

    async def provide_for_server(self, release: str) -> bool:
        """The server's own kernel store work (``--prepare-releases``):
        ``release`` fetched in a fetch slot, as the server's own address,
        unless it is stored (or being fetched for a request, which it
        joins), then adopted; whether this server builds for it only now.
        Its clients are not told here (the caller says when it is ready).
        Raises FetchFailed."""
        assert self.kernels is not None
        kernels = self.kernels
        flight = self._release_flights.get(release)
        if flight is not None:
            waiter: Deferred[StoredRelease] = Deferred()
            flight.append(waiter)
            stored = await waiter
        else:
            found = await kernels.stored(release)
            if found is None and release in self._release_flights:
                return await self.provide_for_server(release)  # one began meanwhile
            if found is None:
                waiting: list[Deferred[StoredRelease]] = []
                self._release_flights[release] = waiting
                try:
                    found = await self.fetching(SERVER, lambda: Deferred.fromCoroutine(
                        kernels.ensure(release)))
                except Exception as exc:
                    del self._release_flights[release]
                    for each in waiting:
                        each.errback(exc)
                    raise
                del self._release_flights[release]
                for each in waiting:
                    each.callback(found)
            stored = found
        new = stored.release not in self._stored
        await self._in_thread(self._adopt, stored)
        return new

    def _adopt(self, stored: StoredRelease) -> None:
        """A stored release becomes one this server builds for (blocking:
        its runtime fix is prepared as for an installed tree)."""
        assert self.kernels is not None
        self.kernels.store.touch(stored.release)
        if stored.release in self._stored:
            return
        tree = stored.build_tree
        if self.config.runtime is None and stored.release not in self.runtimes:
            fixed = select_runtime(tree, cache_root=self.config.runtime_cache)
            if fixed is not None:
                self.runtimes[stored.release] = str(fixed)
                if self.sandbox is not None and fixed not in self.sandbox.read_only:
                    self.sandbox = evolve(self.sandbox,
                                          read_only=(*self.sandbox.read_only, fixed))
        self._stored[stored.release] = tree
        if stored.suite:
            self._suites[stored.release] = stored.suite

    async def provide_debug_within(self, release: str,
                                   context: RequestContext | None = None) -> bool:
        """:meth:`provide_debug`, waited for at most :attr:`symbol_wait`
        seconds: False when the request must go on without the symbols
        still being made (they are, for the requests after it)."""
        work = self.debug_work(release, context)
        if work is None:
            return True
        waiter: Deferred[bool] = Deferred()

        def done(result: object) -> object:
            if not waiter.called:
                waiter.callback(True)
            return result

        def late() -> None:
            if not waiter.called:
                waiter.callback(False)

        work.addBoth(done)
        call = self.reactor.callLater(self.symbol_wait, late)
        ready = await waiter
        if call.active():
            call.cancel()
        if not ready:
            self.log.warn("The symbols of kernel {release} are still being made; compiling "
                          "without them after waiting {seconds:g} s", release=release,
                          seconds=self.symbol_wait)
        return ready

    def symbols_pending(self, release: str) -> bool:
        """Whether the symbols of ``release`` are being made right now."""
        return release in self._debug_work

    def debug_work(self, release: str, context: RequestContext | None = None
                   ) -> Deferred[None] | None:
        """:meth:`provide_debug` started, or joined when it is under way
        (for a request, or the server's own at start): what fires when it
        is over; None when it is over already."""
        work = self._debug_work.get(release)
        if work is not None:
            return work
        # A request past its address's share makes no symbols: its attempt
        # (which only notes that) is its own, never one others join and
        # come away from without symbols.
        shared = (context is None or context.store_work is not None or context.answered
                  or self.budget.allows(context.address, release))
        work = Deferred.fromCoroutine(self.provide_debug(release, context))

        def failed(failure: Failure) -> None:
            # Not tried again at once either: a broken store would make
            # every request retry and log a traceback.
            self._debug_failed[release] = self.reactor.seconds()
            self.log.failure("Making the symbols of kernel {release} failed", failure,
                             release=release)

        work.addErrback(failed)
        if work.called:
            return None
        if not shared:
            return work
        self._debug_work[release] = work

        def over(result: object) -> object:
            self._debug_work.pop(release, None)
            return result

        work.addBoth(over)
        return work

    async def provide_debug(self, release: str, context: RequestContext | None = None
                            ) -> None:
        """Unless ``--no-fetch-symbols``: the release's System.map (made
        from its kernel image), or with ``--fetch-debuginfo`` the map and
        vmlinux of its -dbg package, had once; a compile goes on without
        them when they cannot be had, or when making them would take the
        request (``context``; None: the server's own) past its address's
        share of kernel store work (its client is told)."""
        config = self.config
        if not config.fetch_symbols or self.kernels is None or release.startswith("/"):
            return  # a tree given by path has no package to make them from
        if self.sandbox is None and release not in self._stored:
            return  # an installed release's are shown at /boot in the sandbox only
        known = self._debug.get(release)
        if known is not None and (known.vmlinux is not None or not config.fetch_debuginfo):
            if await self._in_thread(self._still_there, release, known):
                return
            del self._debug[release]  # removed or evicted since: had again
        failed = self._debug_failed.get(release)
        if failed is not None and self.reactor.seconds() < failed + DEBUG_RETRY:
            return
        kernels = self.kernels
        files_or_none = await kernels.stored_debug(release, config.fetch_debuginfo)
        if files_or_none is not None:
            await self._in_thread(self._adopt_debug, release, files_or_none)
            return
        what = (f"the debuginfo of kernel release '{release}'" if config.fetch_debuginfo
                else f"the System.map of kernel release '{release}'")
        try:
            self.charge(context, release, what)
        except OverBudget as exc:
            assert context is not None
            context.notes.append(f"{exc} Compiling without it meanwhile.")
            return
        address = context.address if context is not None else SERVER

        def ensure(vmlinux: bool) -> Deferred[DebugFiles]:
            return Deferred.fromCoroutine(kernels.ensure_debug(release, vmlinux))

        try:
            files = await self.counted(
                context, lambda: self.fetching(address, lambda: ensure(config.fetch_debuginfo)))
        except FetchFailed as exc:
            now, last = self.reactor.seconds(), self._debug_failed.get(release)
            self._debug_failed[release] = now
            if last is not None and now < last + DEBUG_RETRY:
                return  # a request that shared the failed attempt
            self.log.warn("No symbols for kernel {release}: {reason} (compiling without them; "
                          "trying again in {retry} min)", release=release, reason=str(exc),
                          retry=DEBUG_RETRY // 60)
            if not config.fetch_debuginfo or known is not None:
                return
            try:  # without the -dbg package, the map from the kernel image at least
                files = await self.counted(
                    context, lambda: self.fetching(address, lambda: ensure(False)))
            except FetchFailed:
                return
        else:
            self._debug_failed.pop(release, None)
        await self._in_thread(self._adopt_debug, release, files)

    def _still_there(self, release: str, files: DebugFiles) -> bool:
        """Whether the files are still in the store (blocking); they are
        marked used, so the size cap removes others first."""
        assert self.kernels is not None
        if not files.system_map.is_file() or (
                files.vmlinux is not None and not files.vmlinux.is_file()):
            return False
        self.kernels.debug_store.touch(release)
        return True

    def _adopt_debug(self, release: str, files: DebugFiles) -> None:
        """Where the translator looks: a stored tree gets links to them
        (its ``System.map`` and ``vmlinux``); an installed release gets them
        at ``/boot`` in the sandbox (:meth:`debug_binds`)."""
        tree = self._stored.get(release)
        if tree is not None:
            for name, target in (("System.map", files.system_map), ("vmlinux", files.vmlinux)):
                if target is None:
                    continue
                # A new link put in place at once: two first requests may race here.
                fresh = tree / f".{name}.{os.getpid()}.{threading.get_ident()}"
                with contextlib.suppress(FileNotFoundError):
                    fresh.unlink()
                fresh.symlink_to(target)
                os.replace(fresh, tree / name)
            settle_tree_time(tree)
        self._debug[release] = files

    async def provide_module_debug(self, release: str, names: tuple[str, ...],
                                   privilege: Privilege = Privilege.STAPDEV,
                                   context: RequestContext | None = None) -> None:
        """The debuginfo of the modules a script names (``--fetch-debuginfo``),
        where the translator of this release looks (:mod:`stapsrv.kernel.moduledebug`).
        Not for unprivileged requests: the translator refuses them module
        probes anyway, so they would only make the server download."""
        tree = self._stored.get(release)
        if privilege is not Privilege.STAPDEV:
            return
        if self.module_debug is not None and (tree is not None or self.sandbox is not None):
            await self.module_debug.provide(release, names, tree,
                                            lambda fetch, what: self._budgeted(
                                                context, release, what, fetch))

    async def _budgeted(self, context: RequestContext | None, release: str, what: str,
                        fetch: Callable[[], Deferred[T]]) -> T:
        """``fetch()`` counted against the request's address (raises
        OverBudget, its client told) and in a fetch slot."""
        try:
            self.charge(context, release, what)
        except OverBudget as exc:
            assert context is not None
            context.notes.append(f"{exc} Compiling without it meanwhile.")
            raise
        return await self.counted(context, lambda: self.fetching(
            context.address if context is not None else SERVER, fetch))

    def debug_binds(self, release: str | None) -> list[tuple[Path, str]]:
        files = self._debug.get(release) if release is not None else None
        modules = (self.module_debug.binds(release) if self.module_debug is not None
                   and release is not None and release not in self._stored else [])
        if files is None:
            return modules
        # Only what is still there (blocking): bwrap refuses a missing source.
        binds = [(source, target) for source, target in (
            (files.system_map, f"/boot/System.map-{release}"),
            (files.vmlinux, f"/boot/vmlinux-{release}")) if source is not None and source.is_file()]
        return binds + modules

    def tree(self, release: str) -> Path:
        """The build tree of a release this server builds for."""
        if release in self._stored:
            return self._stored[release]
        return Path(release) if release.startswith("/") else build_tree(release)

    def target(self, release: str) -> str:
        """What the translator's ``-r`` names: the release, or a stored tree."""
        return str(self._stored[release]) if release in self._stored else release

    def suite(self, release: str) -> str | None:
        """The suite a stored release came from (None: installed on the
        server, or fetched before the store recorded suites)."""
        return self._suites.get(release) if release in self._stored else None

    def serves(self, release: str) -> bool:
        return release in self.config.releases or release in self._stored
