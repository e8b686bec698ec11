"""The watcher of the suites' lists (stapsrv.app.watcher): a release that
appears in a real (file:) suite between two updates of the private apt is
prepared, once, without a client; in a fleet sharing a real Redis one
member prepares it and the other skips it.  No timing: each test waits on
the watcher's own events."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from twisted.internet import reactor
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from stapsrv.app.watcher import ReleaseWatcher
from stapsrv.blocking import Blocking
from stapsrv.cache.fleet import RedisCache
from stapsrv.core.aptsources import parse_suites
from stapsrv.kernel import prepared
from stapsrv.kernel.fetch import KernelFetcher
from stapsrv.kernel.privateapt import APT_DIRECTORY, ListsUpdater, PrivateApt
from stapsrv.kernel.store import KernelStore
from tests.helpers.fakearchive import FakeArchive, kernel_packages
from tests.helpers.realredis import start_redis
from tests.kernel.test_privateapt import Events

FIRST = "9.9.1+deb99-amd64"
SECOND = "9.9.2+deb99-amd64"
SECRET = bytes(range(32))


class WatcherCase(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.pool = ThreadPool(0, 2)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.events = Events()
        self.environ = {"PATH": "/usr/bin:/bin"}
        if os.geteuid() == 0:
            sandbox = self.base / "root-apt.conf"
            sandbox.write_text('APT::Sandbox::User "root";\n')
            self.environ["APT_CONFIG"] = str(sandbox)
        (self.base / "archive").mkdir()
        self.archive = FakeArchive(self.base / "archive")
        self.addCleanup(self.archive.close)

    def fetcher(self, name: str) -> KernelFetcher:
        store = KernelStore(self.base / name, 1 << 30)
        store.open()
        apt = PrivateApt(store.directory / APT_DIRECTORY,
                         parse_suites([f"alpha={self.archive.uri()}"]), "amd64",
                         self.archive.keyring)
        apt.prepare()
        return KernelFetcher(store, reactor, self.pool, ("*",), environ=self.environ,
                             log=Logger(observer=self.events), apt=apt)

    def watcher(self, fetcher: KernelFetcher, ready: list[str],
                election: RedisCache | None = None, host: str = "host-a",
                prepare: Callable[..., object] | None = None) -> ReleaseWatcher:
        async def fetch(release: str, step: Callable[[str, float], None]) -> None:
            await fetcher.ensure(release)
            step("fetch", 0.0)
        return ReleaseWatcher(fetcher.store, fetcher.allowed, lambda release: False,
                              fetch, reactor, Blocking(reactor, self.pool), ready.append,
                              election=election, log=Logger(observer=self.events), host=host)

    def updater(self, fetcher: KernelFetcher, watcher: ReleaseWatcher) -> ListsUpdater:
        assert fetcher.apt is not None
        return ListsUpdater(fetcher.apt, fetcher.run, reactor, watcher.lists_updated,
                            log=Logger(observer=self.events))

    def publish(self, *releases: str) -> None:
        debs: list[Path] = []
        for number, release in enumerate(releases):
            work = self.base / "debs" / release
            debs += (sorted((work / "debs").glob("*.deb")) if work.exists() else
                     kernel_packages(work, release, f"9.9.{number}-1"))
        self.archive.add_suite("alpha", debs)


class WatcherTests(WatcherCase):
    async def test_a_release_that_appears_is_prepared_once(self) -> None:
        self.publish(FIRST)
        fetcher = self.fetcher("kernels")
        ready: list[str] = []
        watcher = self.watcher(fetcher, ready)
        updater = self.updater(fetcher, watcher)
        self.assertTrue(await updater.update(), self.events.text())
        await watcher.when_idle()
        self.assertEqual(ready, [FIRST])
        self.assertIsNotNone(fetcher.store.get(FIRST))
        # The lists change: the newer ABI of the same flavour appears.
        self.publish(FIRST, SECOND)
        self.assertTrue(await updater.update(), self.events.text())
        await watcher.when_idle()
        self.assertEqual(ready, [FIRST, SECOND], self.events.text())
        self.assertEqual(watcher.preparing, set())
        record = prepared.load(fetcher.store.directory, SECOND)
        assert record is not None
        self.assertEqual((record.state(), [name for name, _ in record.steps], record.by),
                         ("ready", ["fetch"], "host-a"))
        # An update with nothing new prepares nothing.
        self.assertTrue(await updater.update())
        await watcher.when_idle()
        self.assertEqual(ready, [FIRST, SECOND])
        self.assertIn(f"Kernel {SECOND} appeared in the lists", self.events.text())

    async def test_a_release_that_cannot_be_had_is_recorded_not_ready(self) -> None:
        self.publish(FIRST)
        fetcher = self.fetcher("kernels")
        ready: list[str] = []
        watcher = self.watcher(fetcher, ready)
        # The archive loses a package the release needs after the update.
        updater = self.updater(fetcher, watcher)
        for deb in (self.archive.root / "pool" / "alpha").glob("linux-kbuild-*"):
            deb.unlink()
        self.assertTrue(await updater.update(), self.events.text())
        await watcher.when_idle()
        self.assertEqual(ready, [])
        record = prepared.load(fetcher.store.directory, FIRST)
        assert record is not None
        self.assertEqual(record.state(), "failed", record)
        self.assertIn("not prepared", self.events.text())


class VerificationTests(WatcherCase):
    async def test_a_release_that_fails_its_verification_is_withheld(self) -> None:
        self.publish(FIRST)
        fetcher = self.fetcher("kernels")
        ready: list[str] = []
        verdicts: list[str | None] = ["staprun exit 1: x"]

        async def verify(release: str) -> str | None:
            return verdicts.pop(0)
        watcher = self.watcher(fetcher, ready)
        watcher.verify = verify
        updater = self.updater(fetcher, watcher)
        self.assertTrue(await updater.update(), self.events.text())
        await watcher.when_idle()
        self.assertEqual((ready, watcher.unadvertised()), ([], {FIRST}))
        record = prepared.load(fetcher.store.directory, FIRST)
        assert record is not None
        self.assertEqual(record.failure, "the VM verification failed: staprun exit 1: x")
        self.assertEqual([name for name, _ in record.steps], ["fetch", "verify"])
        # The next update tries again; this time it passes.
        verdicts.append(None)
        self.assertTrue(await updater.update())
        await watcher.when_idle()
        self.assertEqual((ready, watcher.unadvertised()), ([FIRST], set()))


class ElectionTests(WatcherCase):
    def fleet(self) -> RedisCache:
        cache = RedisCache(self.redis.url, reactor, secret=SECRET,
                           log=Logger(observer=self.events))
        self.addCleanup(cache.close)
        return cache

    async def test_one_member_prepares_the_other_skips(self) -> None:
        self.redis = start_redis(self, self.base / "redis")
        self.publish(FIRST)
        one, two = self.fetcher("kernels-a"), self.fetcher("kernels-b")
        ready_one: list[str] = []
        ready_two: list[str] = []
        first = self.watcher(one, ready_one, self.fleet(), "host-a")
        second = self.watcher(two, ready_two, self.fleet(), "host-b")
        self.assertTrue(await self.updater(one, first).update(), self.events.text())
        await first.when_idle()
        self.assertTrue(await self.updater(two, second).update(), self.events.text())
        await second.when_idle()
        self.assertEqual((ready_one, ready_two), ([FIRST], []))
        self.assertIsNone(two.store.get(FIRST))
        skipped = prepared.load(two.store.directory, FIRST)
        assert skipped is not None
        self.assertEqual((skipped.state(), skipped.by), ("preparing", "host-a"))
        self.assertIn("prepared by another member of the fleet (done:host-a)",
                      self.events.text())

    async def test_a_failed_member_hands_the_release_back(self) -> None:
        self.redis = start_redis(self, self.base / "redis")
        self.publish(FIRST)
        one, two = self.fetcher("kernels-a"), self.fetcher("kernels-b")
        ready: list[str] = []

        async def broken(release: str, step: Callable[[str, float], None]) -> None:
            raise RuntimeError("the disk is on fire")
        first = ReleaseWatcher(one.store, one.allowed, lambda release: False, broken, reactor,
                               Blocking(reactor, self.pool), ready.append,
                               election=self.fleet(), log=Logger(observer=self.events),
                               host="host-a")
        second = self.watcher(two, ready, self.fleet(), "host-b")
        self.assertTrue(await self.updater(one, first).update(), self.events.text())
        await first.when_idle()
        self.assertTrue(await self.updater(two, second).update(), self.events.text())
        await second.when_idle()
        self.assertEqual(ready, [FIRST], self.events.text())
        record = prepared.load(two.store.directory, FIRST)
        assert record is not None
        self.assertEqual((record.state(), record.by), ("ready", "host-b"))


__all__: Sequence[str] = ()
