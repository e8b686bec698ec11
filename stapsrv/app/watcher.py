"""New kernel releases made ready before any client asks for them
(``--prepare-releases``, issue 29).

After each update of the kernel store's private apt lists the watcher
compares the releases the lists offer that the fetch policy allows (the
newest of each series and flavour,
:func:`stapsrv.kernel.prepared.listed_releases`) with what the server
has; each new one is prepared in turn, one at a time: fetched, its
symbols and kernel configuration headers made
(:class:`stapsrv.compile.prepare.ReleasePreparer`), verified in a VM when
asked (``--verify-prepared``: ``kernels verify`` run as a child process
against this server), and only then advertised (until then it is left
out of the records Avahi publishes).  A release is not prepared when the
store could not take it without evicting another.

In a fleet the members elect the one that prepares a release through the
fleet's Redis (``SET NX PX``: a claim with an expiry, so a member that
dies leaves it to the others after a while); the others skip it, and
find its kernel configuration header in the fleet cache when a client
asks them for it.  Each preparation is recorded with the store
(:mod:`stapsrv.kernel.prepared`): when the release appeared in the lists,
each step's time, when it became ready, by which host.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

from attrs import define, evolve, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from stapsrv.blocking import Blocking
from stapsrv.kernel import prepared
from stapsrv.kernel.prepared import Preparation, listed_releases
from stapsrv.kernel.store import KernelStore

#: Milliseconds a member's claim on a release lasts while it works on it
#: (a fetch, symbols, warm-ups and a VM verification on a slow machine).
CLAIM_MS = 6 * 3600 * 1000
#: Milliseconds the others go on skipping a release one member made ready.
DONE_MS = 30 * 24 * 3600 * 1000
#: Room assumed for a release when the store holds none to compare with.
DEFAULT_ROOM = 400 << 20

#: Prepares one release, telling each step's name and seconds.
Prepare = Callable[[str, Callable[[str, float], None]], Awaitable[None]]
#: Verifies one release in a VM: why it failed (None: it passed).
Verify = Callable[[str], Awaitable["str | None"]]


class Election(Protocol):
    """The fleet's Redis (:class:`stapsrv.cache.fleet.RedisCache`)."""

    async def claim(self, name: str, token: str, milliseconds: int) -> bool | None:
        """Won (True), held by another (False), or Redis unreachable (None)."""

    async def holder(self, name: str) -> str | None:
        """Who holds ``name`` now."""

    async def settle(self, name: str, token: str, value: str | None,
                     milliseconds: int) -> None:
        """The holder's last word (None: handed back)."""


def room_needed(store: KernelStore) -> tuple[int, int]:
    """(bytes free under the store's cap, bytes a release takes: the
    largest stored one's, else :data:`DEFAULT_ROOM`); blocking."""
    sizes = [entry.size for entry in store.releases()]
    return store.size_cap - store.total_size(), max(sizes, default=DEFAULT_ROOM)


@define(eq=False)
class ReleaseWatcher:
    """Prepares the new releases of the lists, one at a time."""

    store: KernelStore
    #: The fetch policy (:meth:`stapsrv.kernel.fetch.KernelFetcher.allowed`).
    allowed: Callable[[str], bool]
    #: Whether the server has the release without the store (given, installed).
    installed: Callable[[str], bool]
    prepare: Prepare
    clock: IReactorTime
    in_thread: Blocking
    #: Told of each release that became ready (to advertise it).
    on_ready: Callable[[str], None]
    verify: Verify | None = None
    election: Election | None = None
    #: Told (step, seconds) of each step, "ready" for the whole (metrics).
    on_step: Callable[[str, float], None] | None = None
    log: Logger = field(factory=Logger)
    wall: Callable[[], float] = time.time
    host: str = field(factory=socket.gethostname)
    #: Releases waiting or being prepared: not advertised yet.
    preparing: set[str] = field(init=False, factory=set)
    #: Releases whose VM verification failed: served to a client that
    #: asks, never advertised (until one passes).
    withheld: set[str] = field(init=False, factory=set)
    _queue: list[str] = field(init=False, factory=list)
    _busy: bool = field(init=False, default=False)
    #: Updates of the lists being looked at.
    _considering: int = field(init=False, default=0)
    _idle: list[Deferred[None]] = field(init=False, factory=list)

    def lists_updated(self, packages: list[str]) -> None:
        """The lists were updated: their new releases join the queue."""
        self._considering += 1
        Deferred.fromCoroutine(self._consider(packages)).addErrback(
            lambda failure: self.log.failure("Preparing new kernel releases failed", failure))

    async def _consider(self, packages: list[str]) -> None:
        try:
            await self._queue_new(packages)
        finally:
            self._considering -= 1
            self._next()

    async def _queue_new(self, packages: list[str]) -> None:
        now = self.wall()
        for release in listed_releases(packages, self.allowed):
            if release in self.preparing or self.installed(release):
                continue
            record = await self.in_thread(prepared.load, self.store.directory, release)
            if record is not None and record.ready is not None:
                continue
            if record is None and await self.in_thread(self.store.get, release) is not None:
                continue  # a client had it fetched already
            record = Preparation(release, record.seen if record is not None else now,
                                 by=self.host)
            await self.in_thread(prepared.save, self.store.directory, record)
            self.log.info("Kernel {release} appeared in the lists; preparing it before any "
                          "client asks", release=release)
            self.preparing.add(release)
            self._queue.append(release)

    def when_idle(self) -> Deferred[None]:
        """Fires once nothing is queued or being prepared."""
        waiter: Deferred[None] = Deferred()
        if not self._busy and not self._queue and not self._considering:
            waiter.callback(None)
        else:
            self._idle.append(waiter)
        return waiter

    def _next(self) -> None:
        if self._busy:
            return
        if not self._queue:
            if self._considering:
                return
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)
            return
        self._busy = True
        release = self._queue.pop(0)

        async def one() -> None:
            try:
                await self._prepare_one(release)
            except Exception as exc:
                self.log.failure("Preparing kernel {release} failed: {error}",
                                 release=release, error=str(exc))
            finally:
                self.preparing.discard(release)
                self._busy = False
                self._next()
        Deferred.fromCoroutine(one())

    async def _prepare_one(self, release: str) -> None:
        record = await self.in_thread(prepared.load, self.store.directory, release)
        if record is None:
            record = Preparation(release, self.wall(), by=self.host)
        free, needed = await self.in_thread(room_needed, self.store)
        if free < needed:
            await self._failed(record, f"the kernel store has {free >> 20} MiB free under its "
                               f"cap, {needed >> 20} MiB wanted: not evicting releases for it")
            return
        token = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex}"
        name = f"prepare:{release}"
        if self.election is not None:
            won = await self.election.claim(name, token, CLAIM_MS)
            if won is False:
                holder = await self.election.holder(name) or "another member"
                self.log.info("Kernel {release}: prepared by another member of the fleet "
                              "({holder}); skipping it", release=release, holder=holder)
                await self.in_thread(prepared.save, self.store.directory,
                                     evolve(record, by=_holder_host(holder)))
                return
            if won is None:
                self.log.warn("Kernel {release}: the fleet's Redis cannot be asked who "
                              "prepares it; preparing it here", release=release)
        await self._steps(record, name, token)

    async def _steps(self, record: Preparation, name: str, token: str) -> None:
        release = record.release
        steps: list[tuple[str, float]] = []

        def step(what: str, seconds: float) -> None:
            steps.append((what, seconds))
            if self.on_step is not None:
                self.on_step(what, seconds)
            self.log.info("Kernel {release} preparation: {step} in {seconds:.1f} s",
                          release=release, step=what, seconds=seconds)

        try:
            await self.prepare(release, step)
            if self.verify is not None:
                started = self.clock.seconds()
                problem = await self.verify(release)
                step("verify", self.clock.seconds() - started)
                if problem is not None:
                    self.withheld.add(release)
                    raise RuntimeError(f"the VM verification failed: {problem}")
                self.withheld.discard(release)
        except Exception as exc:
            if self.election is not None:
                await self.election.settle(name, token, None, 0)
            await self._failed(evolve(record, steps=tuple(steps)), str(exc) or repr(exc))
            return
        ready = evolve(record, steps=tuple(steps), ready=self.wall(), failure="", by=self.host)
        await self.in_thread(prepared.save, self.store.directory, ready)
        if self.election is not None:
            await self.election.settle(name, token, f"done:{self.host}", DONE_MS)
        if self.on_step is not None and ready.to_ready is not None:
            self.on_step("appearance_to_ready", ready.to_ready)
        self.log.info("Kernel {release} is ready: {summary}", release=release,
                      summary=ready.summary())
        self.preparing.discard(release)
        self.on_ready(release)

    def unadvertised(self) -> set[str]:
        """The releases the server leaves out of what it advertises."""
        return self.preparing | self.withheld

    async def _failed(self, record: Preparation, why: str) -> None:
        self.log.warn("Kernel {release} not prepared: {reason} (a client's first request "
                      "for it prepares it; tried again after the next update of the lists)",
                      release=record.release, reason=why)
        await self.in_thread(prepared.save, self.store.directory,
                             evolve(record, failure=why[:300], by=self.host))


def _holder_host(holder: str) -> str:
    """The host in a claim's value ("HOST:PID:TOKEN", or "done:HOST")."""
    words = holder.split(":")
    return words[1] if words[0] == "done" and len(words) > 1 else words[0]
