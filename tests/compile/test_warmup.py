"""The server's own warm-up compiles: one per release and guru mode, its
kernel configuration header kept for every sandbox, not done again when
an earlier server did it, shared by the requests that come meanwhile.
The translator is a fake that makes a header where a sandboxed one would;
the real one runs in the system suites (tests.helpers.faults.wait_for_warm_up)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from stapsrv.compile.context import RequestContext
from stapsrv.compile.releases import ServedReleases
from stapsrv.compile.sandbox import WARM_UP_SCRIPT, Sandbox, StapconfStore
from stapsrv.compile.sharedconf import SharedStapconf
from stapsrv.compile.translator import TranslatorRun
from stapsrv.compile.warmup import WarmUp
from stapsrv.config.values import ServerConfig
from stapsrv.core.cmdline import ServerOption
from stapsrv.kernel.store import KernelStore
from stapsrv.kernel.toolchains import Toolchain, host_toolchain
from tests.compile.test_releases import STORED, FakeFetcher
from tests.helpers.archives import RELEASE
from tests.helpers.handlers import Events

#: A translator that records its arguments and makes a stapconf header in
#: its SYSTEMTAP_DIR's cache, as the real one does for -p4.
FAKE_TRANSLATOR = """\
import json, os, sys, time
with open(os.environ["WARMUP_RECORD"], "a") as out:
    out.write(json.dumps(sys.argv[1:]) + "\\n")
time.sleep(float(os.environ.get("WARMUP_DELAY", "0")))
if os.environ.get("WARMUP_FAIL"):
    sys.exit(1)
cache = os.path.join(os.environ["SYSTEMTAP_DIR"], "cache", "ab")
os.makedirs(cache, exist_ok=True)
with open(os.path.join(cache, os.environ.get("WARMUP_HEADER", "stapconf_abcd.h")), "w") as out:
    out.write("#define STAPCONF_FAKE 1\\n")
"""


class Translators:
    """The handler's side of a warm-up: options, environment, sandbox
    directories (made for real, with no bwrap around the fake)."""

    def __init__(self, sandbox: Sandbox, stapconf: StapconfStore, record: Path) -> None:
        self.sandbox = sandbox
        self.stapconf = stapconf
        self.environ = {"PATH": os.environ["PATH"], "WARMUP_RECORD": str(record)}
        self.options = [ServerOption("-D", "A=1")]

        #: The translator program of toolchains other than the host's.
        self.program = ""
        #: The toolchains other than the host's whose sandboxes were made.
        self.systems: list[str] = []

    def server_options(self, release: str,
                       toolchain: Toolchain | None = None) -> list[ServerOption]:
        return list(self.options)

    def translator(self, toolchain: Toolchain | None) -> str:
        return self.program

    def stapconf_for(self, toolchain: Toolchain | None) -> StapconfStore | None:
        assert toolchain is not None
        return StapconfStore(self.stapconf.directory.with_name(f"stapconf-{toolchain.name}"))

    def translator_environment(self, scratch: Path) -> dict[str, str]:
        _, systemtap_dir = self.sandbox.private_dirs(scratch)
        return {**self.environ, "SYSTEMTAP_DIR": str(systemtap_dir), "TMPDIR": str(scratch)}

    def sandbox_words(self, scratch: Path, release: str | None = None,
                      toolchain: Toolchain | None = None) -> tuple[str, ...]:
        stapconf = self.stapconf
        if toolchain is not None:
            self.systems.append(f"{toolchain.name} {release}")
            found = self.stapconf_for(toolchain)
            assert found is not None
            stapconf = found
        self.sandbox.prepare(scratch, None, stapconf)
        return ()


class WarmUpCase(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.tmpdir = self.base / "tmp"
        self.tmpdir.mkdir(parents=True)
        self.pool = ThreadPool(0, 2)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.stap = self.base / "stap"
        self.stap.write_text(f"#!{sys.executable}\n{FAKE_TRANSLATOR}")
        self.stap.chmod(0o755)
        self.record = self.base / "record"
        self.stapconf = StapconfStore(self.base / "stapconf")
        self.sandbox = Sandbox(home=self.base / "home", systemtap_dir=self.base / "stap-dir")
        self.translators = Translators(self.sandbox, self.stapconf, self.record)
        self.events = Events()
        self.gate = DeferredSemaphore(2)
        self.running: set[TranslatorRun] = set()
        self.fetcher = FakeFetcher(KernelStore(self.base / "kernels", 10 << 20))

    def warmup(self, sandbox: bool = True, **config: object) -> WarmUp:
        settings: dict[str, object] = dict(
            releases=(RELEASE,), ssl_dir=self.base / "ssl", stap=str(self.stap),
            tmpdir=self.tmpdir, runtime_cache=self.base / "runtime-cache")
        settings.update(config)
        server_config = ServerConfig(**settings)  # type: ignore[arg-type]
        releases = ServedReleases(server_config, reactor, self.pool, {},
                                  sandbox=self.sandbox if sandbox else None,
                                  kernels=self.fetcher)  # type: ignore[arg-type]
        return WarmUp(server_config, reactor, self.pool, releases, self.translators,
                      self.stapconf if sandbox else None, self.gate, self.running,
                      log=Logger(observer=self.events))

    def runs(self) -> list[list[str]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def header(self) -> Path:
        return self.stapconf.directory / "ab" / "stapconf_abcd.h"

    async def until(self, done: object, what: str) -> None:
        for _ in range(400):
            if callable(done) and done():
                return
            await deferLater(reactor, 0.05, lambda: None)
        self.fail(f"not within 20 s: {what}")


class DictFleet:
    """The fleet cache's named entries, in a dict (sealing is the real
    cache's; tests.cache.test_fleet runs it against Redis)."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}

    async def get(self, key: str, prefix: str = "") -> bytes | None:
        return self.entries.get(prefix + key)

    async def put(self, key: str, response: bytes, prefix: str = "") -> None:
        self.entries[prefix + key] = response


class SharedTests(WarmUpCase):
    async def test_a_second_member_takes_the_header_from_the_fleet(self) -> None:
        fleet = DictFleet()
        self.translators.environ["WARMUP_HEADER"] = f"stapconf_{'ab' * 16}_12.h"
        first = self.warmup()
        first.shared = SharedStapconf(fleet, log=Logger(observer=self.events))
        await first.stapconf_ready(RELEASE, False)
        self.assertEqual((len(self.runs()), len(fleet.entries)), (1, 1))
        self.assertEqual(len(self.events.matching("shared through the fleet cache")), 1)
        # Another member: a header store of its own, the same fleet.
        self.stapconf = self.translators.stapconf = StapconfStore(self.base / "stapconf-b")
        second = self.warmup()
        second.shared = SharedStapconf(fleet, log=Logger(observer=self.events))
        await second.stapconf_ready(RELEASE, False)
        self.assertEqual(len(self.runs()), 1, "no warm-up of its own")
        self.assertEqual((self.stapconf.directory / "ab" / f"stapconf_{'ab' * 16}_12.h")
                         .read_text(), "#define STAPCONF_FAKE 1\n")
        self.assertEqual(self.events.matching("from the fleet cache"), [
            f"Kernel configuration header for {RELEASE} ready from the fleet cache (1 "
            "header(s) made by another member; no warm-up here)"])
        # And it stays warmed: a later request asks the fleet no more.
        fleet.entries.clear()
        await second.stapconf_ready(RELEASE, False)
        self.assertEqual(len(self.runs()), 1)


class ReadyTests(WarmUpCase):
    async def test_a_warm_up_makes_the_header_once(self) -> None:
        warmup = self.warmup()
        await warmup.stapconf_ready(RELEASE, False)
        [argv] = self.runs()
        self.assertEqual(argv[:2], [f"-r{RELEASE}", "-DA=1"])
        self.assertTrue(argv[2].startswith(f"--tmpdir={self.tmpdir}/stap-server."), argv)
        self.assertTrue(argv[2].endswith("/response/stap000000"), argv)
        self.assertEqual(argv[3:], ["--client-options", "-p4", "-e", WARM_UP_SCRIPT])
        self.assertEqual(self.header().read_text(), "#define STAPCONF_FAKE 1\n")
        [line] = self.events.matching("Kernel configuration header")
        self.assertRegex(line, rf"^Kernel configuration header for {RELEASE} ready in "
                         r"[0-9]+\.[0-9] s \(1 new\)$")
        self.assertEqual(os.listdir(self.tmpdir), [], "scratch directory removed")
        self.assertEqual(self.running, set())
        await warmup.stapconf_ready(RELEASE, False)
        self.assertEqual(len(self.runs()), 1)

    async def test_guru_mode_is_warmed_up_apart(self) -> None:
        warmup = self.warmup()
        await warmup.stapconf_ready(RELEASE, False)
        await warmup.stapconf_ready(RELEASE, True)
        self.assertEqual([argv[-1] for argv in self.runs()], [WARM_UP_SCRIPT, "-g"])
        self.assertRegex(self.events.matching("(guru mode)")[0],
                         rf"^Kernel configuration header for {RELEASE} \(guru mode\) ready in "
                         r"[0-9.]+ s \(0 new\)$")

    async def test_a_later_server_does_not_warm_up_again(self) -> None:
        await self.warmup().stapconf_ready(RELEASE, False)
        await self.warmup().stapconf_ready(RELEASE, False)
        self.assertEqual(len(self.runs()), 1)
        self.assertEqual(self.events.matching("(made before)"), [
            f"Kernel configuration header for {RELEASE} ready (made before)"])
        # Other server options make another header.
        self.translators.options = [ServerOption("-D", "A=2")]
        await self.warmup().stapconf_ready(RELEASE, False)
        self.assertEqual(len(self.runs()), 2)

    async def test_each_toolchain_apart_the_hosts_being_the_servers_own(self) -> None:
        self.translators.environ["WARMUP_DELAY"] = "1"
        warmup = self.warmup()
        first = Deferred.fromCoroutine(warmup.stapconf_ready(RELEASE, False))
        await self.until(lambda: self.running, "the server's own warm-up runs")
        await warmup.stapconf_ready(RELEASE, False, None, host_toolchain("4.8"))
        await first
        self.assertEqual(len(self.runs()), 1, "the host's chosen for a request: the same")
        del self.translators.environ["WARMUP_DELAY"]
        self.translators.program = str(self.stap)
        forky = Toolchain("forky", self.base / "forky", "5.6", digest="0123")
        await warmup.stapconf_ready(RELEASE, False, None, forky)
        await warmup.stapconf_ready(RELEASE, False, None, forky)
        self.assertEqual(len(self.runs()), 2)
        self.assertEqual(self.translators.systems, [f"forky {RELEASE}"])
        header = self.base / "stapconf-forky" / "ab" / "stapconf_abcd.h"
        self.assertEqual(header.read_text(), "#define STAPCONF_FAKE 1\n")
        self.assertRegex(self.events.matching("with toolchain forky")[0],
                         rf"^Kernel configuration header for {RELEASE} with toolchain forky "
                         r"ready in [0-9.]+ s \(1 new\)$")
        # Another manifest (an update of the root) is warmed up again.
        await self.warmup().stapconf_ready(RELEASE, False, None, forky)
        self.assertEqual(len(self.runs()), 2, "made before")
        await self.warmup().stapconf_ready(RELEASE, False, None,
                                           Toolchain("forky", forky.root, "5.6", digest="4567"))
        self.assertEqual(len(self.runs()), 3)

    async def test_requests_that_come_meanwhile_wait_for_the_same_warm_up(self) -> None:
        self.translators.environ["WARMUP_DELAY"] = "1"
        warmup = self.warmup()
        first = Deferred.fromCoroutine(warmup.stapconf_ready(RELEASE, False))
        await self.until(lambda: self.running, "the warm-up's translator runs")
        second = Deferred.fromCoroutine(warmup.stapconf_ready(RELEASE, False))
        self.assertFalse(second.called, "waits for the warm-up under way")
        self.assertEqual(len(self.running), 1, "the handler sees the warm-up's translator")
        await gatherResults([first, second])
        self.assertEqual(len(self.runs()), 1)
        self.assertTrue(self.header().exists())

    async def test_a_failed_warm_up_is_a_warning_and_each_request_makes_its_own(self) -> None:
        self.translators.environ["WARMUP_FAIL"] = "1"
        warmup = self.warmup()
        await warmup.stapconf_ready(RELEASE, False)
        self.assertEqual(self.events.matching("warm-up compile"), [
            f"The warm-up compile for kernel {RELEASE} failed (rc 1); each request makes "
            "its own kernel configuration header"])
        self.assertFalse(self.header().exists())
        self.assertEqual(os.listdir(self.tmpdir), [])
        await warmup.stapconf_ready(RELEASE, False)
        self.assertEqual(len(self.runs()), 1, "not tried again by this server")
        await self.warmup().stapconf_ready(RELEASE, False)
        self.assertEqual(len(self.runs()), 2, "a new server tries again")

    async def test_a_stored_release_is_warmed_up_on_its_tree(self) -> None:
        warmup = self.warmup()
        await warmup.releases.provide_release(STORED, RequestContext("peer"))
        await warmup.stapconf_ready(STORED, False)
        stored = self.fetcher.store.get(STORED)
        assert stored is not None
        self.assertEqual(self.runs()[0][0], f"-r{stored.build_tree}")


class AheadTests(WarmUpCase):
    """A request's warm-up started while its release's symbols are made."""

    async def test_it_runs_in_a_slot_and_the_request_then_joins_it(self) -> None:
        self.translators.environ["WARMUP_DELAY"] = "1"
        self.gate = DeferredSemaphore(1)
        warmup = self.warmup()
        context = RequestContext("10.0.0.1:4000")
        self.assertFalse(warmup.known_ready(RELEASE, False, None))
        ahead = Deferred.fromCoroutine(warmup.ahead(RELEASE, False, context, None))
        await self.until(lambda: self.running, "the warm-up's translator runs")
        self.assertEqual(self.gate.tokens, 0, "in a translator slot")
        # The request, in its own turn, waits for that one.
        own = Deferred.fromCoroutine(warmup.stapconf_ready(RELEASE, False, context))
        await gatherResults([ahead, own])
        self.assertEqual(len(self.runs()), 1)
        self.assertTrue(self.header().exists())
        self.assertEqual(self.gate.tokens, 1)
        self.assertTrue(warmup.known_ready(RELEASE, False, None))

    async def test_a_request_gone_or_past_its_share_starts_none(self) -> None:
        gone = RequestContext("10.0.0.1:4000")
        gone.abandoned = True
        warmup = self.warmup(peer_fetches=1)
        await warmup.ahead(RELEASE, False, gone, None)
        busy = RequestContext("10.0.0.2:4000")
        warmup.releases.charge(busy, STORED, f"the fetch of kernel release '{STORED}'")
        await warmup.ahead(RELEASE, False, RequestContext("10.0.0.2:4001"), None)
        self.assertEqual(self.runs(), [])
        self.assertEqual(self.gate.tokens, 2, "slots given back")
        self.assertEqual(self.events.matching("failed"), [])


class StartTests(WarmUpCase):
    def tree(self, name: str, makefile: bool) -> str:
        tree = self.base / name
        tree.mkdir()
        if makefile:
            (tree / "Makefile").write_text("all:\n")
        return str(tree)

    async def test_served_trees_are_warmed_up_in_a_slot(self) -> None:
        ready, unready = self.tree("ready", True), self.tree("unready", False)
        self.gate = DeferredSemaphore(1)
        warmup = self.warmup(releases=(ready, unready), fetch_symbols=True)
        await self.gate.acquire()
        warmup.start()
        # Trees given by path have no package to make symbols from.
        self.assertEqual(self.fetcher.debug_fetched, [])
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.runs(), [], "no slot free yet")
        self.gate.release()
        await self.until(lambda: self.gate.tokens == 1, "the warm-up gives its slot back")
        self.assertEqual([argv[0] for argv in self.runs()], [f"-r{ready}"])
        self.assertEqual(len(self.events.matching(f"header for {ready} ready in")), 1)
        self.assertEqual(os.listdir(self.tmpdir), [])

    async def test_without_the_sandbox_nothing_is_warmed_up(self) -> None:
        warmup = self.warmup(sandbox=False, releases=(self.tree("ready", True),),
                             fetch_symbols=True)
        warmup.start()
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual((self.runs(), self.fetcher.debug_fetched), ([], []))


class BudgetTests(WarmUpCase):
    """A warm-up counts against the share of kernel store work of the
    request that starts it (--peer-fetches)."""

    async def test_past_its_share_a_request_starts_no_warm_up(self) -> None:
        from stapsrv.core.budget import OverBudget
        warmup = self.warmup(peer_fetches=1)
        busy = RequestContext("10.0.0.1:4000")
        warmup.releases.charge(busy, STORED, f"the fetch of kernel release '{STORED}'")
        with self.assertRaises(OverBudget) as caught:
            await warmup.stapconf_ready(RELEASE, False, RequestContext("10.0.0.1:4001"))
        self.assertIn("Server: Not starting the kernel configuration warm-up compile for "
                      f"kernel release '{RELEASE}' for 10.0.0.1 now", str(caught.exception))
        self.assertEqual(self.runs(), [], "no warm-up started")
        # Another address may; then the header is ready for everyone.
        other = RequestContext("10.0.0.2:4000")
        await warmup.stapconf_ready(RELEASE, False, other)
        self.assertEqual(len(self.runs()), 1)
        self.assertIsNotNone(other.store_work)
        await warmup.stapconf_ready(RELEASE, False, RequestContext("10.0.0.1:4002"))
        self.assertEqual(len(self.runs()), 1)

    async def test_the_symbols_made_at_start_are_shared_at_no_cost(self) -> None:
        from stapsrv.compile import warmup as warmup_module
        made = self.fetcher.hold_debug()
        tree = self.base / "installed"
        tree.mkdir()
        (tree / "Makefile").write_text("all:\n")
        self.patch(warmup_module, "build_tree", lambda release: tree)
        self.gate = DeferredSemaphore(1)
        await self.gate.acquire()  # no warm-up compile here
        warmup = self.warmup(fetch_symbols=True, peer_fetches=1)
        warmup.releases.symbol_wait = 600.0
        warmup.start()
        warmup.releases.charge(RequestContext("10.0.0.1:4000"), STORED,
                               f"the fetch of kernel release '{STORED}'")
        over = RequestContext("10.0.0.1:4001")
        waited = Deferred.fromCoroutine(warmup.releases.provide_debug_within(RELEASE, over))
        made.callback(None)
        self.assertTrue(await waited)
        self.assertEqual((over.notes, over.store_work), ([], None))
        self.assertEqual(self.fetcher.debug_fetched, [(RELEASE, False)])
