"""A handler's release made ready before any client asks for it
(``--prepare-releases``, issue 29): fetched into the kernel store and
adopted, its symbols made, and its kernel configuration header made for
each toolchain that builds for it, all as the server's own kernel store
work: in a fetch slot, then in a translator slot, niced like every step
of the store (:data:`stapsrv.core.programs.STORE_NICENESS`)."""

from __future__ import annotations

from collections.abc import Callable

from attrs import define
from twisted.internet.interfaces import IReactorTime

from stapsrv.blocking import Blocking
from stapsrv.compile.releases import ServedReleases
from stapsrv.compile.slots import FairGate
from stapsrv.compile.warmup import WarmUp
from stapsrv.core.budget import SERVER
from stapsrv.kernel.toolchains import Toolchain, kernel_compiler, kernel_version, serves

#: Told each step's name and seconds as it ends.
StepDone = Callable[[str, float], None]


@define(eq=False)
class ReleasePreparer:
    """The steps of one release's preparation, for one handler."""

    releases: ServedReleases
    warmup: WarmUp
    toolchains: list[Toolchain]
    gate: FairGate
    clock: IReactorTime
    in_thread: Blocking

    async def prepare(self, release: str, step: StepDone) -> None:
        """Fetch (unless stored), symbols (unless ``--no-fetch-symbols``),
        then the headers of each toolchain.  Raises FetchFailed when the
        release cannot be had."""
        started = self.clock.seconds()
        await self.releases.provide_for_server(release)
        step("fetch", self.clock.seconds() - started)
        if self.releases.config.fetch_symbols:
            started = self.clock.seconds()
            work = self.releases.debug_work(release)
            if work is not None:
                await work
            step("symbols", self.clock.seconds() - started)
        if self.releases.sandbox is None:
            return  # without the sandbox there is no header to share
        for toolchain in await self.in_thread(self.serving, release):
            started = self.clock.seconds()
            await self.gate.acquire_for(SERVER)
            try:
                await self.warmup.stapconf_ready(release, False, None, toolchain)
            finally:
                self.gate.release_for(SERVER)
            step("stapconf" if toolchain is None or toolchain.is_host
                 else f"stapconf {toolchain.name}", self.clock.seconds() - started)

    def serving(self, release: str) -> list[Toolchain | None]:
        """The toolchains that build for ``release`` (blocking: its tree is
        read); the host's alone (None) when there are no others."""
        if len(self.toolchains) < 2:
            return [None]
        tree = self.releases.tree(release)
        version, compiler = kernel_version(release, tree), kernel_compiler(tree)
        return [toolchain for toolchain in self.toolchains
                if serves(toolchain, version, compiler)]
