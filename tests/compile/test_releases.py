"""The releases a handler builds for: installed ones as given, stored ones
adopted once (with their runtime fix, which the sandbox then shows), and
the symbols fetched for them put where the translator looks.  The Debian
archive is a fake here (a made-up headers tree put into a real kernel
store); tests/system/test_kernels fetches from the real one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from stapsrv.compile.context import RequestContext
from stapsrv.compile.handler import RequestHandler
from stapsrv.compile.observer import NoObserver
from stapsrv.compile.releases import DEBUG_RETRY, ServedReleases
from stapsrv.compile.sandbox import Sandbox
from stapsrv.config.values import ServerConfig
from stapsrv.core.budget import OverBudget
from stapsrv.core.cmdline import Privilege
from stapsrv.kernel.fetch import DebugFiles, FetchFailed, allowed
from stapsrv.kernel.store import (
    InUse,
    KernelStore,
    StoredPackage,
    StoredRelease,
    build_tree_in,
    fix_tree,
    valid_release,
)
from stapsrv.paths import build_tree
from tests.helpers import test_identity
from tests.helpers.archives import RELEASE, request
from tests.helpers.handlers import Events, HandlerCase
from tests.helpers.vectors import members
from tests.helpers.waiting import NET, poll
from tests.kernel.test_runtime import NEW_TASK_WORK_H
from tests.kernel.test_store import fake_tree

STORED = "6.1.0-55-amd64"


class FakeFetcher:
    """A kernel fetcher over a real store whose archive is made up: a
    fetched release is a fake headers tree, its symbols small files."""

    def __init__(self, store: KernelStore, patterns: tuple[str, ...] = ("6.1.0-*-amd64",)
                 ) -> None:
        self.store = store
        self.patterns = patterns
        self.fetched: list[str] = []
        self.debug_fetched: list[tuple[str, bool]] = []
        #: The reason a fetch fails (None: it works).
        self.failure: str | None = None
        self.debug_failure: str | None = None
        #: The reason fetching a -dbg package fails (None: it works).
        self.dbg_failure: str | None = None
        #: Fired when symbols being made are done (None: made at once).
        self.debug_held: Deferred[None] | None = None
        #: The task_work.h a fetched tree has (None: none).
        self.task_work_h: str | None = None

    def allowed(self, release: str) -> bool:
        return allowed(release, self.patterns)

    async def stored(self, release: str) -> StoredRelease | None:
        return self.store.get(release)

    async def ensure(self, release: str) -> StoredRelease:
        found = self.store.get(release)
        if found is not None:
            return found
        if self.failure is not None:
            raise FetchFailed(self.failure)
        self.fetched.append(release)
        work = self.store.begin(release)
        fake_tree(work / "root", release)
        tree = build_tree_in(work / "root", release)
        (tree / "System.map").write_text("placeholder\n")
        if self.task_work_h is not None:
            (tree / "include" / "linux").mkdir(parents=True)
            (tree / "include" / "linux" / "task_work.h").write_text(self.task_work_h)
        fix_tree(work / "root", release, self.store.final_root(release))
        return self.store.commit(work, release, [StoredPackage(f"linux-headers-{release}",
                                                               "1", 5)])

    @property
    def debug_store(self) -> KernelStore:
        return KernelStore(self.store.directory / ".debug", self.store.size_cap)

    async def stored_debug(self, release: str, vmlinux: bool) -> DebugFiles | None:
        """Nothing is had without ensure_debug here (it counts them)."""
        return None

    def hold_debug(self) -> Deferred[None]:
        """Symbols are still being made until the Deferred returned fires."""
        self.debug_held = Deferred()
        return self.debug_held

    async def ensure_debug(self, release: str, vmlinux: bool) -> DebugFiles:
        self.debug_fetched.append((release, vmlinux))
        if self.debug_held is not None:
            await self.debug_held
        if not valid_release(release):  # as apt's fetcher: a tree named by path
            raise FetchFailed(f"'{release}' is not a kernel release name")
        if self.debug_failure is not None:
            raise FetchFailed(self.debug_failure)
        if vmlinux and self.dbg_failure is not None:
            raise FetchFailed(self.dbg_failure)
        root = self.store.directory / ".debug" / release
        root.mkdir(parents=True, exist_ok=True)
        system_map = root / f"System.map-{release}"
        system_map.write_text("ffffffff81000000 T _text\n")
        image = None
        if vmlinux:
            image = root / f"vmlinux-{release}"
            image.write_bytes(b"\x7fELF vmlinux")
        return DebugFiles(system_map, image)


class ReleasesCase(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.pool = ThreadPool(0, 2)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.store = KernelStore(self.base / "kernels", 10 << 20)
        self.store.open()
        self.fetcher = FakeFetcher(self.store)
        self.events = Events()
        self.added: list[str] = []
        self.sandbox = Sandbox(home=self.base / "home", systemtap_dir=self.base / "stap",
                               read_only=(self.base / "given",))

    def releases(self, fetch: bool = True, sandbox: bool = True,
                 runtimes: dict[str, str] | None = None, **config: object) -> ServedReleases:
        settings: dict[str, object] = dict(
            releases=(RELEASE, str(self.base / "tree")), ssl_dir=self.base / "ssl",
            tmpdir=self.base, runtime_cache=self.base / "runtime-cache")
        settings.update(config)
        return ServedReleases(
            ServerConfig(**settings), reactor, self.pool,  # type: ignore[arg-type]
            {} if runtimes is None else runtimes,
            sandbox=self.sandbox if sandbox else None,
            kernels=self.fetcher if fetch else None,  # type: ignore[arg-type]
            on_release_added=self.added.append, log=Logger(observer=self.events))


class InstalledTests(ReleasesCase):
    async def test_given_releases_are_served_as_given(self) -> None:
        releases = self.releases()
        given = str(self.base / "tree")
        for release in (RELEASE, given):
            self.assertIsNone(await releases.provide_release(release, RequestContext("peer")))
            self.assertTrue(releases.serves(release))
            self.assertIsNone(releases.stored_tree(release))
            self.assertEqual(releases.target(release), release)
        self.assertEqual(releases.tree(RELEASE), build_tree(RELEASE))
        self.assertEqual(releases.tree(given), Path(given))
        self.assertIsNone(await releases.provide_release(None, RequestContext("peer")))
        self.assertEqual((self.fetcher.fetched, self.added), ([], []))

    async def test_nothing_is_fetched_without_a_store_or_outside_the_patterns(self) -> None:
        for releases, release in ((self.releases(fetch=False), STORED),
                                  (self.releases(), "5.10.0-30-amd64")):
            # The preparation refuses it later, naming what is served.
            self.assertIsNone(await releases.provide_release(release, RequestContext("peer")))
            self.assertFalse(releases.serves(release))
        self.assertEqual((self.fetcher.fetched, self.added), ([], []))


class StoredTests(ReleasesCase):
    async def test_a_request_holds_its_stored_release_until_it_is_answered(self) -> None:
        releases = self.releases()
        context = RequestContext("peer")
        self.assertIsNone(await releases.provide_release(STORED, context))
        self.assertIsNone(await releases.hold(STORED, context))
        with self.assertRaises(InUse):
            self.store.remove_everywhere(STORED)
        self.store.size_cap = 0
        self.assertEqual(self.store.evict(), [])
        releases.finish_work(context)
        self.assertIsNone(context.lease)
        self.assertTrue(self.store.remove_everywhere(STORED))

    async def test_a_tree_removed_after_it_was_provided_is_had_again(self) -> None:
        releases = self.releases()
        context = RequestContext("peer")
        self.assertIsNone(await releases.provide_release(STORED, context))
        self.assertTrue(self.store.remove(STORED))  # the size cap, or an admin
        self.assertIsNone(await releases.hold(STORED, context))
        self.assertEqual(self.fetcher.fetched, [STORED, STORED])
        assert context.lease is not None
        self.assertTrue(context.lease.holds(self.store.directory))
        self.assertTrue((releases.tree(STORED) / "Makefile").is_file())
        releases.finish_work(context)

    async def test_a_tree_had_again_past_the_share_is_a_refusal(self) -> None:
        releases = self.releases(peer_fetches=1)
        first = RequestContext("10.0.0.1:1")
        self.assertIsNone(await releases.provide_release(STORED, first))
        releases.finish_work(first)
        releases.charge(RequestContext("10.0.0.1:2"), "6.1.0-56-amd64",
                        "the fetch of kernel release '6.1.0-56-amd64'")
        request = RequestContext("10.0.0.1:3")
        self.assertIsNone(await releases.provide_release(STORED, request))  # stored: free
        self.assertTrue(self.store.remove(STORED))  # evicted by that other fetch
        problem = await releases.hold(STORED, request)
        assert problem is not None
        self.assertIn("Not starting the fetch of kernel release '6.1.0-55-amd64'", problem)

    async def test_a_tree_had_again_gets_its_symbols_linked_again(self) -> None:
        releases = self.releases(fetch_symbols=True)
        first = RequestContext("10.0.0.1:1")
        self.assertIsNone(await releases.provide_release(STORED, first))
        await releases.provide_debug(STORED, first)
        tree = releases.tree(STORED)
        self.assertTrue((tree / "System.map").is_symlink())
        releases.finish_work(first)
        self.assertTrue(self.store.remove(STORED))  # the tree only: the cap took it
        again = RequestContext("10.0.0.1:2")
        self.assertIsNone(await releases.hold(STORED, again))
        releases.finish_work(again)
        self.assertTrue((tree / "System.map").is_symlink())
        self.assertIn("_text", (tree / "System.map").read_text())

    async def test_a_stored_release_is_adopted_once(self) -> None:
        releases = self.releases()
        self.assertFalse(releases.serves(STORED))
        self.assertIsNone(await releases.provide_release(STORED, RequestContext("peer")))
        stored = self.store.get(STORED)
        assert stored is not None
        self.assertTrue(releases.serves(STORED))
        self.assertEqual(releases.tree(STORED), stored.build_tree)
        self.assertEqual(releases.stored_tree(STORED), stored.build_tree)
        self.assertEqual(releases.target(STORED), str(stored.build_tree))
        self.assertEqual(self.added, [STORED])
        # Asked again: no fetch, not announced again, but marked used.
        os.utime(stored.directory / "used", (1, 1))
        self.assertIsNone(await releases.provide_release(STORED, RequestContext("peer")))
        self.assertEqual((self.fetcher.fetched, self.added), ([STORED], [STORED]))
        self.assertGreater((stored.directory / "used").stat().st_mtime, 1)
        # A tree without the new task_work API needs no runtime fix.
        self.assertEqual(self.sandbox, releases.sandbox)

    async def test_a_stored_tree_gets_its_runtime_fix_and_the_sandbox_shows_it(self) -> None:
        self.fetcher.task_work_h = NEW_TASK_WORK_H
        runtimes = {RELEASE: "/fixed/runtime"}
        releases = self.releases(runtimes=runtimes)
        await releases.provide_release(STORED, RequestContext("peer"))
        fixed = runtimes[STORED]
        self.assertTrue(Path(fixed).is_relative_to(self.base / "runtime-cache"), fixed)
        self.assertTrue((Path(fixed) / "runtime.h").is_file())
        assert releases.sandbox is not None
        self.assertEqual(releases.sandbox.read_only, (self.base / "given", Path(fixed)))
        self.assertEqual(releases.sandbox.home, self.sandbox.home)

    async def test_an_explicit_runtime_leaves_the_stored_tree_alone(self) -> None:
        self.fetcher.task_work_h = NEW_TASK_WORK_H
        runtimes: dict[str, str] = {}
        releases = self.releases(runtimes=runtimes, runtime="/explicit")
        await releases.provide_release(STORED, RequestContext("peer"))
        self.assertTrue(releases.serves(STORED))
        self.assertEqual(runtimes, {})
        self.assertEqual(releases.sandbox, self.sandbox)

    async def test_a_failed_fetch_is_one_line_for_the_client(self) -> None:
        self.fetcher.failure = "the Debian archive this server uses has no linux-headers-x"
        releases = self.releases()
        problem = await releases.provide_release(STORED, RequestContext("10.0.0.1:5"))
        self.assertEqual(problem, f"Server: Cannot build for kernel release '{STORED}': "
                         "the Debian archive this server uses has no linux-headers-x.")
        self.assertEqual(self.events.matching("Cannot provide kernel"), [
            f"Cannot provide kernel {STORED} for 10.0.0.1:5: the Debian archive this "
            "server uses has no linux-headers-x"])
        self.assertFalse(releases.serves(STORED))
        self.assertEqual(self.added, [])


class SymbolsTests(ReleasesCase):
    async def test_no_symbols_when_switched_off(self) -> None:
        releases = self.releases(fetch_symbols=False)
        await releases.provide_debug(RELEASE)
        self.assertEqual(self.fetcher.debug_fetched, [])
        self.assertEqual(releases.debug_binds(RELEASE), [])

    async def test_an_installed_release_gets_them_at_boot_in_the_sandbox(self) -> None:
        releases = self.releases(fetch_symbols=True)
        await releases.provide_debug(RELEASE)
        files = releases.debug_files(RELEASE)
        assert files is not None
        self.assertEqual(releases.debug_binds(RELEASE),
                         [(files.system_map, f"/boot/System.map-{RELEASE}")])
        await releases.provide_debug(RELEASE)
        self.assertEqual(self.fetcher.debug_fetched, [(RELEASE, False)], "fetched once")
        self.assertEqual(releases.debug_binds(None), [])

    async def test_debuginfo_is_fetched_when_only_symbols_are_known(self) -> None:
        releases = self.releases(fetch_symbols=True, fetch_debuginfo=True)
        releases._debug[RELEASE] = DebugFiles(self.base / "System.map", None)
        await releases.provide_debug(RELEASE)
        files = releases.debug_files(RELEASE)
        assert files is not None and files.vmlinux is not None
        self.assertEqual(releases.debug_binds(RELEASE), [
            (files.system_map, f"/boot/System.map-{RELEASE}"),
            (files.vmlinux, f"/boot/vmlinux-{RELEASE}")])
        await releases.provide_debug(RELEASE)
        self.assertEqual(self.fetcher.debug_fetched, [(RELEASE, True)])

    async def test_files_removed_since_are_had_again_and_never_shown_missing(self) -> None:
        releases = self.releases(fetch_symbols=True)
        await releases.provide_debug(RELEASE)
        files = releases.debug_files(RELEASE)
        assert files is not None
        # Evicted by the size cap, or removed by the admin.
        files.system_map.unlink()
        self.assertEqual(releases.debug_binds(RELEASE), [], "bwrap refuses a missing source")
        await releases.provide_debug(RELEASE)
        self.assertEqual(self.fetcher.debug_fetched, [(RELEASE, False)] * 2)
        self.assertEqual(releases.debug_binds(RELEASE),
                         [(files.system_map, f"/boot/System.map-{RELEASE}")])
        await releases.provide_debug(RELEASE)
        self.assertEqual(len(self.fetcher.debug_fetched), 2)

    async def test_without_the_dbg_package_the_map_from_the_image(self) -> None:
        self.fetcher.dbg_failure = "the Debian archive this server uses has no x-dbg"
        releases = self.releases(fetch_symbols=True, fetch_debuginfo=True)
        await releases.provide_debug(RELEASE)
        files = releases.debug_files(RELEASE)
        assert files is not None
        self.assertIsNone(files.vmlinux)
        self.assertEqual(releases.debug_binds(RELEASE),
                         [(files.system_map, f"/boot/System.map-{RELEASE}")])
        self.assertEqual(self.fetcher.debug_fetched, [(RELEASE, True), (RELEASE, False)])
        await releases.provide_debug(RELEASE)  # not again for DEBUG_RETRY
        self.assertEqual(len(self.fetcher.debug_fetched), 2)

    async def test_unprivileged_requests_fetch_no_module_debuginfo(self) -> None:
        asked: list[tuple[str, tuple[str, ...]]] = []

        class Modules:
            async def provide(self, release: str, names: tuple[str, ...],
                              tree: Path | None, budgeted: object = None) -> None:
                asked.append((release, names))

        releases = self.releases(fetch_symbols=True, fetch_debuginfo=True)
        releases.module_debug = Modules()  # type: ignore[assignment]
        for privilege in (Privilege.STAPUSR, Privilege.STAPSYS):
            await releases.provide_module_debug(RELEASE, ("ext4",), privilege)
        self.assertEqual(asked, [])
        await releases.provide_module_debug(RELEASE, ("ext4",), Privilege.STAPDEV)
        self.assertEqual(asked, [(RELEASE, ("ext4",))])

    async def test_a_tree_given_by_path_is_not_looked_up(self) -> None:
        releases = self.releases(fetch_symbols=True)
        await releases.provide_debug(str(self.base / "tree"))
        self.assertEqual((self.fetcher.debug_fetched, self.events.matching("No symbols")),
                         ([], []))

    async def test_without_the_sandbox_an_installed_release_gets_none(self) -> None:
        releases = self.releases(sandbox=False, fetch_symbols=True)
        await releases.provide_debug(RELEASE)
        self.assertEqual(self.fetcher.debug_fetched, [])

    async def test_a_stored_tree_gets_links_to_them(self) -> None:
        releases = self.releases(sandbox=False, fetch_symbols=True, fetch_debuginfo=True)
        await releases.provide_release(STORED, RequestContext("peer"))
        await releases.provide_debug(STORED)
        files = releases.debug_files(STORED)
        assert files is not None and files.vmlinux is not None
        tree = releases.tree(STORED)
        # The headers package's placeholder map is replaced.
        self.assertEqual(os.readlink(tree / "System.map"), str(files.system_map))
        self.assertEqual(os.readlink(tree / "vmlinux"), str(files.vmlinux))
        self.assertEqual((tree / "System.map").read_text(), "ffffffff81000000 T _text\n")

    async def test_missing_symbols_are_a_warning_and_nothing_more(self) -> None:
        self.fetcher.debug_failure = "the Debian archive this server uses has no x-dbg"
        releases = self.releases(fetch_symbols=True)
        clock = Clock()
        releases.reactor = clock  # type: ignore[assignment]
        await releases.provide_debug(RELEASE)
        self.assertEqual(self.events.matching("No symbols"), [
            f"No symbols for kernel {RELEASE}: the Debian archive this server uses has "
            "no x-dbg (compiling without them; trying again in 10 min)"])
        self.assertEqual(releases.debug_binds(RELEASE), [])
        # Not tried again for every request: an unreachable archive would
        # hold each one up.
        clock.advance(DEBUG_RETRY - 1)
        await releases.provide_debug(RELEASE)
        self.assertEqual(len(self.fetcher.debug_fetched), 1)
        clock.advance(1)
        await releases.provide_debug(RELEASE)
        self.assertEqual(len(self.fetcher.debug_fetched), 2)
        self.assertEqual(len(self.events.matching("No symbols")), 2)


class SymbolBudgetTests(ReleasesCase):
    """Symbols and module debuginfo count against the share of kernel
    store work of the request that starts them (--peer-fetches)."""

    async def test_past_its_share_a_request_compiles_without_symbols_and_is_told(self
                                                                                  ) -> None:
        releases = self.releases(fetch_symbols=True, peer_fetches=1)
        releases.charge(RequestContext("10.0.0.1:4000"), STORED,
                        f"the fetch of kernel release '{STORED}'")
        over = RequestContext("10.0.0.1:4001")
        await releases.provide_debug(RELEASE, over)
        self.assertEqual(self.fetcher.debug_fetched, [])
        self.assertEqual(releases.debug_binds(RELEASE), [])
        self.assertEqual(len(over.notes), 1)
        self.assertTrue(over.notes[0].startswith(
            f"Server: Not starting the System.map of kernel release '{RELEASE}' for "
            "10.0.0.1 now"), over.notes[0])
        self.assertTrue(over.notes[0].endswith(" Compiling without it meanwhile."))
        # Not marked failed: the next request that may have them makes them.
        other = RequestContext("10.0.0.2:4000")
        await releases.provide_debug(RELEASE, other)
        self.assertEqual(self.fetcher.debug_fetched, [(RELEASE, False)])
        self.assertEqual(other.notes, [])
        releases.finish_work(other)
        self.assertEqual(releases.budget.under_way("10.0.0.2"), [])

    async def test_work_for_the_release_under_way_costs_nothing_more(self) -> None:
        # Two requests of one address for the same new release: the one that
        # did not fetch it may still make its symbols.
        releases = self.releases(fetch_symbols=True, peer_fetches=1)
        releases.charge(RequestContext("10.0.0.1:4000"), RELEASE,
                        f"the fetch of kernel release '{RELEASE}'")
        second = RequestContext("10.0.0.1:4001")
        await releases.provide_debug(RELEASE, second)
        self.assertEqual((self.fetcher.debug_fetched, second.notes), ([(RELEASE, False)], []))

    async def test_symbols_the_server_is_making_are_shared_at_no_cost(self) -> None:
        made = self.fetcher.hold_debug()
        releases = self.releases(fetch_symbols=True, peer_fetches=1)
        releases.symbol_wait = 600.0
        self.assertIsNotNone(releases.debug_work(RELEASE))  # the server's own, at start
        releases.charge(RequestContext("10.0.0.1:4000"), STORED,
                        f"the fetch of kernel release '{STORED}'")
        over = RequestContext("10.0.0.1:4001")
        waited = Deferred.fromCoroutine(releases.provide_debug_within(RELEASE, over))
        made.callback(None)
        self.assertTrue(await waited)
        self.assertEqual((over.notes, over.store_work), ([], None))
        self.assertEqual(len(self.fetcher.debug_fetched), 1)
        self.assertNotEqual(releases.debug_binds(RELEASE), [])

    async def test_past_its_share_no_module_debuginfo_pass_starts(self) -> None:
        from stapsrv.kernel.fetch import KernelFetcher
        from stapsrv.kernel.moduledebug import ModuleDebug
        passes: list[list[str]] = []

        async def fetch(self: ModuleDebug, release: str, old: object,
                        missing: list[str]) -> None:
            passes.append(missing)
            raise FetchFailed("no archive here")

        self.patch(ModuleDebug, "_fetch", fetch)
        real = KernelFetcher(self.store, reactor, self.pool,  # type: ignore[arg-type]
                             ("6.1.0-*-amd64",))
        releases = self.releases(fetch_symbols=True, fetch_debuginfo=True, peer_fetches=1)
        releases.module_debug = ModuleDebug(real, modules_root=self.base / "modules",
                                            log=Logger(observer=self.events))
        releases.charge(RequestContext("10.0.0.1:4000"), STORED,
                        f"the fetch of kernel release '{STORED}'")
        over = RequestContext("10.0.0.1:4001")
        await releases.provide_module_debug(RELEASE, ("ext4",), Privilege.STAPDEV, over)
        self.assertEqual(passes, [])
        self.assertEqual(len(over.notes), 1)
        self.assertIn("a pass for the debuginfo of modules ext4 of kernel release", over.notes[0])
        # Not marked failed either: another address's request runs the pass.
        await releases.provide_module_debug(RELEASE, ("ext4",), Privilege.STAPDEV,
                                            RequestContext("10.0.0.2:4000"))
        self.assertEqual(passes, [["ext4"]])


class CountedWorkTests(ReleasesCase):
    """An address's share is held while its kernel store work runs, not
    while its requests live."""

    async def test_symbols_that_outlive_their_request_still_count(self) -> None:
        made = self.fetcher.hold_debug()
        releases = self.releases(fetch_symbols=True, peer_fetches=1)
        releases.symbol_wait = 0.1
        first = RequestContext("10.0.0.1:4000")
        self.assertFalse(await releases.provide_debug_within(RELEASE, first))
        releases.finish_work(first)  # answered without them; they are still being made
        self.assertEqual([work.release for work in releases.budget.under_way("10.0.0.1")],
                         [RELEASE])
        second = RequestContext("10.0.0.1:4001")
        with self.assertRaises(OverBudget):
            await releases.provide_release(STORED, second)
        self.assertEqual(self.fetcher.fetched, [])
        made.callback(None)
        self.assertTrue(await poll(lambda: not releases.budget.under_way("10.0.0.1"), NET))
        self.assertIsNone(await releases.provide_release(STORED, RequestContext("10.0.0.1:4002")))
        self.assertEqual(self.fetcher.fetched, [STORED])

    async def test_the_share_is_free_once_the_compile_starts(self) -> None:
        releases = self.releases(peer_fetches=1)
        context = RequestContext("10.0.0.1:4000")
        self.assertIsNone(await releases.provide_release(STORED, context))
        self.assertEqual(len(releases.budget.under_way("10.0.0.1")), 1)
        releases.let_go(context)  # what the handler does as its translator starts
        self.assertEqual(releases.budget.under_way("10.0.0.1"), [])
        # A second release for the same address while the first compiles.
        self.assertIsNone(await releases.provide_release("6.1.0-56-amd64",
                                                         RequestContext("10.0.0.1:4001")))
        releases.finish_work(context)
        self.assertEqual(releases.budget.under_way("10.0.0.1"), [])


class SymbolWaitTests(ReleasesCase):
    """Symbols still being made hold a request for a bounded time only."""

    async def test_a_request_goes_on_without_symbols_still_being_made(self) -> None:
        made = self.fetcher.hold_debug()
        releases = self.releases(fetch_symbols=True)
        releases.symbol_wait = 0.1
        first = await releases.provide_debug_within(RELEASE)
        second = await releases.provide_debug_within(RELEASE)
        self.assertEqual((first, second), (False, False))
        self.assertEqual(releases.debug_binds(RELEASE), [])
        self.assertEqual(len(self.events.matching("still being made")), 2)
        self.assertEqual(self.events.matching(
            "still being made")[0], f"The symbols of kernel {RELEASE} are still being made; "
            "compiling without them after waiting 0.1 s")
        # One making for both requests; once it is over, the next request
        # has them at once.
        made.callback(None)
        self.assertTrue(await poll(lambda: releases.debug_binds(RELEASE), NET))
        self.assertEqual(len(self.fetcher.debug_fetched), 1)
        self.assertTrue(await releases.provide_debug_within(RELEASE))

    async def test_symbols_made_in_time_are_waited_for(self) -> None:
        releases = self.releases(fetch_symbols=True)
        self.assertTrue(await releases.provide_debug_within(RELEASE))
        self.assertNotEqual(releases.debug_binds(RELEASE), [])
        self.assertEqual(self.events.matching("still being made"), [])


class SharedSymbolsTests(ReleasesCase):
    async def test_an_address_past_its_share_never_leaves_others_without_symbols(self) -> None:
        """Address A has a release fetch under way (its share); its request
        for symbols is noted and makes none.  Address B asks at the same
        time: B's request makes them, rather than joining A's attempt and
        coming away with none."""
        stored_debug = self.fetcher.stored_debug

        async def looked_up(*args: Any) -> Any:  # a look-up takes a turn of the reactor
            await deferLater(reactor, 0, lambda: None)
            return await stored_debug(*args)

        self.fetcher.stored_debug = looked_up  # type: ignore[method-assign]
        releases = self.releases(fetch_symbols=True, peer_fetches=1)
        busy = RequestContext("10.0.0.1:4000")
        releases.charge(busy, "6.1.0-9-amd64", "the fetch of kernel release '6.1.0-9-amd64'")
        a, b = RequestContext("10.0.0.1:4001"), RequestContext("10.0.0.2:4000")
        first = Deferred.fromCoroutine(releases.provide_debug_within(RELEASE, a))
        second = Deferred.fromCoroutine(releases.provide_debug_within(RELEASE, b))
        await first
        self.assertTrue(await second)
        self.assertNotEqual(releases.debug_binds(RELEASE), [], "B's symbols were made")
        self.assertEqual(len(a.notes), 1, a.notes)
        self.assertIn("Compiling without it meanwhile.", a.notes[0])
        self.assertEqual(b.notes, [])


class LateChargeTests(ReleasesCase):
    def test_work_for_an_answered_request_is_never_charged(self) -> None:
        """Symbols a request started may reach their charge after it was
        answered (the request waited 20 s at most): nothing would ever free
        that charge, so there is none."""
        releases = self.releases(fetch_symbols=True, peer_fetches=1)
        context = RequestContext("10.0.0.9:4000")
        releases.finish_work(context)
        releases.charge(context, RELEASE, "the System.map of a release")
        self.assertIsNone(context.store_work)
        self.assertEqual(releases.budget.under_way(context.address), [])


class HandlerTests(HandlerCase):
    """The handler asks its releases: a stored release's request runs on
    the stored tree, and the service hears of the new release."""

    async def test_a_request_for_a_stored_release_builds_on_the_stored_tree(self) -> None:
        store = KernelStore(self.base / "kernels", 10 << 20)
        store.open()
        given = self.handler()
        handler = RequestHandler(given.config, reactor, self.pool, test_identity,
                                 given.runtimes, given.environ,
                                 kernels=FakeFetcher(store))  # type: ignore[arg-type]
        added: list[str] = []
        handler.on_release_added = added.append
        found = await self.answer(request("-p4", "-eok", "-r", STORED, release=STORED),
                                  handler)
        self.assertEqual(found["rc"], b"0", found.get("stderr"))
        argv = self.recorded()["argv"]
        stored = store.get(STORED)
        assert stored is not None
        self.assertEqual(argv[0], f"-r{stored.build_tree}")
        self.assertEqual(argv[-2:], ["-p4", "-eok"], "the client's -r is dropped")
        self.assertEqual(added, [STORED])


class HeldFetcher(FakeFetcher):
    """A fake fetcher whose fetches each wait for the test to let them end."""

    def __init__(self, store: KernelStore) -> None:
        super().__init__(store)
        #: The releases whose fetch began, in order.
        self.started: list[str] = []
        self.held: dict[str, Deferred[None]] = {}

    async def ensure(self, release: str) -> StoredRelease:
        if self.store.get(release) is None:
            self.started.append(release)
            self.held[release] = Deferred()
            await self.held[release]
        return await super().ensure(release)


def fetchable(n: int) -> str:
    return f"6.1.0-{n}-amd64"


class BudgetTests(HandlerCase):
    """One client address cannot make others wait: its kernel store work
    is capped, and so are the fetches of all clients together."""

    def budgeted(self, **config: object) -> tuple[RequestHandler, HeldFetcher]:
        store = KernelStore(self.base / "kernels", 10 << 20)
        store.open()
        fetcher = HeldFetcher(store)
        given = self.handler(**config)
        handler = RequestHandler(given.config, reactor, self.pool, test_identity,
                                 given.runtimes, given.environ,
                                 kernels=fetcher)  # type: ignore[arg-type]
        return handler, fetcher

    def ask(self, handler: RequestHandler, peer: str, release: str = RELEASE
            ) -> Deferred[bytes | None]:
        body = (request("-p4", "-eok") if release == RELEASE
                else request("-p4", "-eok", "-r", release, release=release))
        return Deferred.fromCoroutine(handler.handle(body, RequestContext(peer)))

    async def test_five_releases_at_once_start_one_fetch_and_others_are_served(self) -> None:
        handler, fetcher = self.budgeted()
        outcomes: list[str] = []

        class Outcomes(NoObserver):
            def request_done(self, outcome: str, seconds: float) -> None:
                outcomes.append(outcome)

        handler.observer = Outcomes()
        releases = [fetchable(n) for n in range(1, 6)]
        asked = {release: self.ask(handler, f"10.0.0.1:{4000 + n}", release)
                 for n, release in enumerate(releases)}
        # Four refused at once; one fetch under way.
        self.assertTrue(await poll(lambda: sum(a.called for a in asked.values()) == 4
                                   or len(fetcher.started) > 1, NET))
        self.assertEqual(len(fetcher.started), 1)
        fetching = fetcher.started[0]
        for release, answer in asked.items():
            if release == fetching:
                self.assertFalse(answer.called)
                continue
            response = await answer
            assert response is not None
            found = members(response)
            self.assertEqual(found["rc"], b"1")
            self.assertEqual(
                found["stderr"].decode(),
                f"Server: Not starting the fetch of kernel release '{release}' for 10.0.0.1 "
                "now: this server does kernel store work (fetching a release, its symbols or "
                "debuginfo, its modules' debuginfo, a warm-up compile) for at most one kernel "
                "release at a time for "
                "one client address (--peer-fetches), and 10.0.0.1 has the fetch of kernel "
                f"release '{fetching}' under way.  Try again once that is done.\n")
        self.assertEqual(outcomes, ["refused"] * 4)
        # Another address's request for an installed release is answered
        # while the fetch is still under way.
        other = await self.ask(handler, "10.0.0.2:4000")
        assert other is not None
        self.assertEqual(members(other)["rc"], b"0")
        self.assertFalse(asked[fetching].called)
        self.assertEqual(fetcher.started, [fetching])
        fetcher.held[fetching].callback(None)
        response = await asked[fetching]
        assert response is not None
        self.assertEqual(members(response)["rc"], b"0")
        # The fetch is over: the address may have the next one.
        again = self.ask(handler, "10.0.0.1:5000", releases[0] if fetching != releases[0]
                         else releases[1])
        self.assertTrue(await poll(lambda: len(fetcher.started) == 2, NET))
        fetcher.held[fetcher.started[1]].callback(None)
        response = await again
        assert response is not None
        self.assertEqual(members(response)["rc"], b"0")
        self.assertEqual(len(fetcher.fetched), 2)

    async def test_a_fetch_under_way_is_shared_not_refused(self) -> None:
        handler, fetcher = self.budgeted()
        first = self.ask(handler, "10.0.0.1:4000", fetchable(1))
        self.assertTrue(await poll(lambda: fetcher.started, NET))
        second = self.ask(handler, "10.0.0.1:4001", fetchable(1))
        third = self.ask(handler, "10.0.0.2:4000", fetchable(1))
        self.assertTrue(await poll(lambda: len(handler.releases._release_flights[
            fetchable(1)]) == 2, NET))
        fetcher.held[fetchable(1)].callback(None)
        for answer in (first, second, third):
            response = await answer
            assert response is not None
            self.assertEqual(members(response)["rc"], b"0")
        self.assertEqual(fetcher.started, [fetchable(1)])

    async def test_fetches_of_all_clients_together_are_capped(self) -> None:
        handler, fetcher = self.budgeted(max_fetches=1)
        peers = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        asked = []
        for n, peer in enumerate(peers, 1):
            asked.append(self.ask(handler, f"{peer}:4000", fetchable(n)))
            # Each waiting for the fetch slot before the next comes.
            self.assertTrue(await poll(lambda: len(fetcher.started) + len(
                handler.releases.fetches.waiting) == n, NET))
        self.assertEqual(fetcher.started, [fetchable(1)])
        for n in (1, 2):
            fetcher.held[fetchable(n)].callback(None)
            self.assertTrue(await poll(lambda: len(fetcher.started) == n + 1, NET))
            self.assertFalse(asked[n].called)
        fetcher.held[fetchable(3)].callback(None)
        for answer in asked:
            response = await answer
            assert response is not None
            self.assertEqual(members(response)["rc"], b"0")
        self.assertEqual(fetcher.started, [fetchable(n) for n in (1, 2, 3)])

    async def test_a_fetch_whose_client_left_while_it_waited_is_not_started(self) -> None:
        handler, fetcher = self.budgeted(max_fetches=1)
        first = self.ask(handler, "10.0.0.1:4000", fetchable(1))
        self.assertTrue(await poll(lambda: fetcher.started, NET))
        gone = RequestContext("10.0.0.2:4000")
        left = Deferred.fromCoroutine(handler.handle(
            request("-p4", "-eok", "-r", fetchable(2), release=fetchable(2)), gone))
        self.assertTrue(await poll(lambda: handler.releases.fetches.waiting, NET))
        gone.abandon()
        fetcher.held[fetchable(1)].callback(None)
        await first
        await left
        self.assertEqual(fetcher.started, [fetchable(1)])
        self.assertEqual(handler.releases.budget.under_way("10.0.0.2"), [])
