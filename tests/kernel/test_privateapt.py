"""The kernel store's private apt configuration, with the real apt against
a small signed archive on disk (tests.helpers.fakearchive): the lists of
the named suites only, in the store's own directories; releases fetched
from the suite that has them, with that suite's kbuild; a suite apt cannot
verify is not used, and the others are."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from stapsrv.core.aptsources import parse_suites, series_patterns
from stapsrv.kernel.fetch import FetchFailed, KernelFetcher
from stapsrv.kernel.privateapt import (
    APT_DIRECTORY,
    UPDATE_INTERVAL,
    UPDATED_STAMP,
    AptSetupError,
    ListsUpdater,
    PrivateApt,
)
from stapsrv.kernel.store import KernelStore
from stapsrv.reactor import IHandlerReactor
from tests.helpers.fakearchive import FakeArchive, kernel_packages

reactor = cast(IHandlerReactor, global_reactor)
NEW_STYLE = "9.9.1+deb99-amd64"
OLD_STYLE = "8.8.0-7-amd64"


class Events(list[dict[str, object]]):
    def __call__(self, event: dict[str, object]) -> None:
        self.append(event)

    def text(self) -> str:
        from twisted.logger import formatEvent
        return "\n".join(formatEvent(event) for event in self)


class PrivateAptCase(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.pool = ThreadPool(0, 2)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.events = Events()
        self.environ = {"PATH": "/usr/bin:/bin"}
        if os.geteuid() == 0:
            # apt run by root hands downloads to its _apt user, which cannot
            # read a test's private directory; the server never runs as root.
            sandbox = self.base / "root-apt.conf"
            sandbox.write_text('APT::Sandbox::User "root";\n')
            self.environ["APT_CONFIG"] = str(sandbox)

    def archive(self, name: str = "one") -> FakeArchive:
        work = self.base / name
        work.mkdir()
        archive = FakeArchive(work)
        self.addCleanup(archive.close)
        return archive

    def fetcher(self, archive: FakeArchive, suites: Sequence[str],
                keyring: Path | None = None) -> KernelFetcher:
        store = KernelStore(self.base / "kernels", 1 << 30)
        store.open()
        apt = PrivateApt(store.directory / APT_DIRECTORY,
                         parse_suites(f"{suite}={archive.uri()}" for suite in suites),
                         "amd64", keyring or archive.keyring)
        apt.prepare()
        return KernelFetcher(store, reactor, self.pool, ("*",), environ=self.environ,
                             log=Logger(observer=self.events), apt=apt)

    def updater(self, fetcher: KernelFetcher, found: list[list[str]]) -> ListsUpdater:
        assert fetcher.apt is not None
        return ListsUpdater(fetcher.apt, fetcher.run, reactor, found.append,
                            log=Logger(observer=self.events))


class RealAptTests(PrivateAptCase):
    async def test_each_release_from_its_own_suite(self) -> None:
        archive = self.archive()
        work = self.base / "debs"
        archive.add_suite("alpha", kernel_packages(work / "a", NEW_STYLE, "9.9.1-1"))
        archive.add_suite("beta", kernel_packages(work / "b", OLD_STYLE, "8.8.0-7"))
        fetcher = self.fetcher(archive, ["alpha", "beta"])
        found: list[list[str]] = []
        self.assertTrue(await self.updater(fetcher, found).update(), self.events.text())
        self.assertEqual(series_patterns(found[0], "amd64"),
                         ("8.8.0-*-amd64", "9.9.*+deb99-amd64"))
        self.assertIn(f"linux-headers-{NEW_STYLE}", found[0])
        apt = fetcher.apt
        assert apt is not None
        lists = sorted(path.name for path in (apt.directory / "state" / "lists").glob("*_*"))
        self.assertEqual(len(lists), 4, lists)  # each suite's InRelease and Packages
        self.assertTrue((apt.directory / UPDATED_STAMP).is_file())

        stored = await fetcher.ensure(NEW_STYLE)
        self.assertEqual(stored.suite, "alpha")
        self.assertEqual(sorted(p.name for p in stored.packages), [
            "linux-headers-9.9.1+deb99-amd64", "linux-headers-9.9.1+deb99-common",
            "linux-kbuild-9.9.1+deb99"])
        tree = stored.build_tree
        self.assertEqual((tree / "Makefile").read_text(),
                         f"include {stored.directory}/root/usr/src/"
                         "linux-headers-9.9.1+deb99-common/Makefile\n")
        self.assertEqual((tree / "scripts").resolve(),
                         stored.directory / "root/usr/lib/linux-kbuild-9.9.1+deb99/scripts")
        self.assertTrue((tree / "scripts" / "Makefile.build").is_file())
        self.assertFalse((stored.directory / "root" / "lib" / "modules").exists())
        self.assertIn(f"Fetching kernel {NEW_STYLE}: linux-headers-{NEW_STYLE} 9.9.1-1",
                      self.events.text())
        self.assertIn("from alpha\n", self.events.text() + "\n")
        old = await fetcher.ensure(OLD_STYLE)
        self.assertEqual((old.suite, fetcher.store.get(OLD_STYLE)), ("beta", old))
        # Downloads went to the release's work directory, not apt's cache.
        self.assertEqual(list((apt.directory / "cache" / "archives").glob("*.deb")), [])

    async def test_a_suite_apt_cannot_verify_is_not_used(self) -> None:
        archive = self.archive()
        work = self.base / "debs"
        archive.add_suite("alpha", kernel_packages(work / "a", NEW_STYLE, "9.9.1-1"))
        archive.add_suite("gamma", kernel_packages(work / "g", OLD_STYLE, "8.8.0-7"),
                          signed=False)
        fetcher = self.fetcher(archive, ["alpha", "gamma"])
        found: list[list[str]] = []
        self.assertFalse(await self.updater(fetcher, found).update())
        text = self.events.text()
        self.assertIn("apt-get update of alpha=file://", text)
        self.assertIn("gamma", text)
        self.assertRegex(text, r"not signed|is not signed|NO_PUBKEY|does not have a Release")
        self.assertNotIn(f"linux-headers-{OLD_STYLE}", found[0])
        self.assertIn(f"linux-headers-{NEW_STYLE}", found[0])
        with self.assertRaises(FetchFailed) as raised:
            await fetcher.ensure(OLD_STYLE)
        self.assertIn(f"the Debian suites this server uses (alpha={archive.uri()} gamma=",
                      str(raised.exception))
        self.assertIn(f"has no kernel headers for release {OLD_STYLE}", str(raised.exception))
        self.assertEqual((await fetcher.ensure(NEW_STYLE)).suite, "alpha")

    async def test_a_key_outside_the_keyring_verifies_nothing(self) -> None:
        archive = self.archive()
        other = self.archive("other")
        archive.add_suite("alpha", kernel_packages(self.base / "debs", NEW_STYLE, "9.9.1-1"))
        fetcher = self.fetcher(archive, ["alpha"], keyring=other.keyring)
        found: list[list[str]] = []
        self.assertFalse(await self.updater(fetcher, found).update())
        self.assertIn("NO_PUBKEY", self.events.text())
        self.assertEqual(found, [[]])
        with self.assertRaises(FetchFailed):
            await fetcher.ensure(NEW_STYLE)


class SetupTests(TestCase):
    def test_no_keyring_no_configuration(self) -> None:
        base = Path(self.mktemp()).absolute()
        apt = PrivateApt(base, parse_suites(["trixie"]), "amd64", base / "missing.gpg")
        with self.assertRaises(AptSetupError) as raised:
            apt.prepare()
        self.assertIn("debian-archive-keyring", str(raised.exception))
        self.assertFalse(base.exists())

    def test_the_files_apt_reads(self) -> None:
        base = Path(self.mktemp()).absolute()
        keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
        apt = PrivateApt(base, parse_suites(["bookworm-backports,trixie"]), "arm64",
                         base.parent / "k.gpg" if not keyring.exists() else keyring)
        if not keyring.exists():
            (base.parent / "k.gpg").write_bytes(b"")
        apt.prepare()
        self.assertEqual(apt.options(), ["-c", str(base / "apt.conf")])
        self.assertEqual((base / "state" / "status").read_text(), "")
        self.assertEqual((base / "etc" / "sources.list").read_text(), "")
        self.assertIn("Suites: bookworm-backports trixie\n",
                      (base / "etc" / "sources.list.d" / "stapsrv.sources").read_text())
        self.assertIn('APT::Architecture "arm64";', (base / "apt.conf").read_text())
        self.assertIsNone(apt.last_update())
        apt.prepare()  # again, at the next start: the same files
        self.assertEqual(sorted(p.name for p in (base / "etc").iterdir()),
                         ["preferences.d", "sources.list", "sources.list.d", "trusted.gpg.d"])


class UpdaterTimingTests(TestCase):
    """When updates run (a fake apt; the clock is the test's)."""

    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        keyring = base / "k.gpg"
        keyring.write_bytes(b"")
        self.apt = PrivateApt(base / ".apt", parse_suites(["trixie"]), "amd64", keyring)
        self.apt.prepare()
        self.clock = Clock()
        self.commands: list[list[str]] = []

    async def fake_apt(self, argv: Sequence[str]) -> tuple[bytes, bytes, int]:
        self.commands.append(list(argv))
        if "pkgnames" in argv:
            return b"linux-headers-6.12.118+deb13-amd64\n", b"", 0
        return b"", b"", 0

    def test_now_and_every_interval(self) -> None:
        found: list[list[str]] = []
        updater = ListsUpdater(self.apt, self.fake_apt, self.clock, found.append, interval=60.0)
        first = updater.first_update()
        updater.start()
        self.assertTrue(first.called)
        self.assertEqual([argv[3:] for argv in self.commands],
                         [["update", "-q"], ["pkgnames", "linux-headers-"]])
        self.assertEqual(self.commands[0][:3],
                         ["/usr/bin/apt-get", "-c", str(self.apt.config_file)])
        self.clock.advance(59)
        self.assertEqual(len(found), 1)
        self.clock.advance(1)
        self.assertEqual(found, [["linux-headers-6.12.118+deb13-amd64"]] * 2)
        self.assertTrue(updater.first_update().called)
        updater.stop()
        self.clock.advance(600)
        self.assertEqual(len(found), 2)

    def test_a_command_updates_stale_lists_only(self) -> None:
        updater = ListsUpdater(self.apt, self.fake_apt, self.clock, lambda names: None,
                               interval=60.0)
        updater.start_if_stale(1000.0)  # never updated
        self.assertTrue(updater.first_update().called)
        self.assertEqual(len(self.commands), 2)
        stamp = self.apt.last_update()
        assert stamp is not None
        fresh = ListsUpdater(self.apt, self.fake_apt, self.clock, lambda names: None,
                             interval=60.0)
        fresh.start_if_stale(stamp + 30)
        self.assertTrue(fresh.first_update().called)
        self.assertEqual(len(self.commands), 2)
        ListsUpdater(self.apt, self.fake_apt, self.clock, lambda names: None,
                     interval=60.0).start_if_stale(stamp + 61)
        self.assertEqual(len(self.commands), 4)

    def test_stopping_stops_the_update_under_way(self) -> None:
        started: list[Deferred[tuple[bytes, bytes, int]]] = []
        cancelled: list[Deferred[tuple[bytes, bytes, int]]] = []

        def hanging(argv: Sequence[str]) -> Deferred[tuple[bytes, bytes, int]]:
            started.append(Deferred(cancelled.append))
            return started[-1]

        updater = ListsUpdater(self.apt, hanging, self.clock, lambda names: None)
        first = updater.first_update()
        updater.start()
        self.assertEqual(len(started), 1)
        self.assertFalse(first.called)
        updater.stop()
        self.assertEqual(cancelled, started)
        self.assertTrue(first.called)
        self.clock.advance(UPDATE_INTERVAL * 2)
        self.assertEqual(len(started), 1)

