"""Module debuginfo on demand (stapsrv.kernel.moduledebug): which names
are fetched, the tar patterns, how a release's entry is made from the old
one and what was extracted, and where the sandbox shows the files.  The
fetch itself, with the real archive and client, is in
tests/system/test_debuginfo.py."""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from stapsrv.kernel import moduledebug
from stapsrv.kernel.fetch import Candidate, KernelFetcher
from stapsrv.kernel.moduledebug import (
    _EXTRACT_AND_LIST,
    INDEX,
    MAX_MODULES,
    RETRY,
    ModuleDebug,
    ModuleSet,
    assemble,
    link_tree,
    member_pattern,
    read_set,
    wanted_modules,
)
from stapsrv.kernel.store import KernelStore

RELEASE = "6.1.0-57-amd64"
DEBUG = f"usr/lib/debug/lib/modules/{RELEASE}"


class NameTests(TestCase):
    def test_wanted_names_are_canonical_checked_and_bounded(self) -> None:
        self.assertEqual(wanted_modules(["ext4", "nf-conntrack", "nf_conntrack", "../x", ""]),
                         ["ext4", "nf_conntrack"])
        self.assertEqual(len(wanted_modules(f"m{i}" for i in range(100))), MAX_MODULES)

    def test_pattern_matches_either_spelling_anywhere_below_the_release(self) -> None:
        pattern = member_pattern(RELEASE, "snd_hda_intel")
        for member in (f"./{DEBUG}/kernel/sound/pci/hda/snd-hda-intel.ko",
                       f"./{DEBUG}/kernel/sound/pci/hda/snd_hda_intel.ko"):
            self.assertTrue(fnmatch.fnmatchcase(member, pattern), member)
        self.assertFalse(fnmatch.fnmatchcase(
            f"./{DEBUG}/kernel/sound/pci/hda/snd-hda-intel-x.ko", pattern))
        self.assertFalse(fnmatch.fnmatchcase(
            "./usr/lib/debug/lib/modules/6.1.0-56-amd64/kernel/x/snd_hda_intel.ko", pattern))


def write(path: Path, data: bytes = b"ELF") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class EntryTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.store = KernelStore(self.base / "store", 1 << 30)
        self.host = self.base / "lib-modules" / RELEASE
        self.host.mkdir(parents=True)
        os.symlink(f"/usr/src/linux-headers-{RELEASE}", self.host / "build")

    def extracted(self, work: Path, *relatives: str) -> None:
        for relative in relatives:
            write(work / "download" / "members" / DEBUG / relative, relative.encode())

    def test_new_entry_keeps_old_modules_and_remembers_absent_ones(self) -> None:
        work = self.store.begin(RELEASE)
        self.extracted(work, "kernel/fs/ext4/ext4.ko")
        assemble(work, None, RELEASE, ["ext4", "nosuch"], self.host)
        first = read_set(self.store.commit(work, RELEASE, []))
        self.assertEqual(dict(first.modules), {"ext4": "kernel/fs/ext4/ext4.ko"})
        self.assertEqual(first.absent, {"nosuch"})
        self.assertEqual(first.lacks(["ext4", "nosuch", "xfs"]), ["xfs"])
        self.assertEqual(os.readlink(first.root / "build"), f"/usr/src/linux-headers-{RELEASE}")

        work = self.store.begin(RELEASE)
        self.extracted(work, "kernel/fs/xfs/xfs.ko")
        assemble(work, first, RELEASE, ["xfs"], self.host)
        second = read_set(self.store.commit(work, RELEASE, []))
        self.assertEqual(set(second.modules), {"ext4", "xfs"})
        self.assertEqual((second.root / "kernel/fs/ext4/ext4.ko").read_bytes(),
                         b"kernel/fs/ext4/ext4.ko")
        self.assertEqual(second.absent, {"nosuch"})
        index = json.loads((second.root.parent / INDEX).read_text())
        self.assertEqual(index["release"], RELEASE)
        # Nothing but the entry is left in the store.
        self.assertEqual(sorted(p.name for p in self.store.directory.iterdir()), [RELEASE])

    def test_stored_tree_links_to_the_modules(self) -> None:
        modules = ModuleSet(RELEASE, self.base / "entry" / "root", {}, frozenset())
        tree = self.base / "tree"
        tree.mkdir()
        link_tree(tree, modules)
        link_tree(tree, modules)
        self.assertEqual(os.readlink(tree / "debug-modules"), str(modules.root / "kernel"))


class BindTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.root = self.base / "entry" / "root"
        write(self.root / "kernel/fs/ext4/ext4.ko")
        self.module_debug = ModuleDebug(None, modules_root=self.base / "lib-modules")  # type: ignore[arg-type]
        self.module_debug._known[RELEASE] = ModuleSet(
            RELEASE, self.root, {"ext4": "kernel/fs/ext4/ext4.ko"}, frozenset({"nosuch"}))
        self.host = self.base / "lib-modules" / RELEASE
        self.host.mkdir(parents=True)

    def test_host_without_modules_gets_the_whole_directory(self) -> None:
        self.assertEqual(self.module_debug.binds(RELEASE), [(self.root, os.path.realpath(self.host))])
        self.assertEqual(self.module_debug.binds("6.1.0-56-amd64"), [])

    def test_host_with_stripped_modules_gets_each_file_over_its_own(self) -> None:
        write(self.host / "kernel/fs/ext4/ext4.ko", b"stripped")
        self.assertEqual(self.module_debug.binds(RELEASE), [
            (self.root / "kernel/fs/ext4/ext4.ko",
             os.path.join(os.path.realpath(self.host), "kernel/fs/ext4/ext4.ko"))])

    def test_removed_entry_is_not_shown(self) -> None:
        (self.root / "kernel/fs/ext4/ext4.ko").unlink()
        write(self.host / "kernel/fs/ext4/ext4.ko", b"stripped")
        self.assertEqual(self.module_debug.binds(RELEASE), [])
        (self.host / "kernel/fs/ext4/ext4.ko").unlink()
        (self.host / "kernel/fs/ext4").rmdir()
        (self.host / "kernel/fs").rmdir()
        (self.host / "kernel").rmdir()
        for directory in ("kernel/fs/ext4", "kernel/fs", "kernel"):
            (self.root / directory).rmdir()
        self.root.rmdir()
        self.assertEqual(self.module_debug.binds(RELEASE), [])

    def test_key_names_the_files_of_the_modules_asked_for(self) -> None:
        self.assertEqual(self.module_debug.key_words(RELEASE, ["ext4", "nosuch"]),
                         [f"module debuginfo kernel/fs/ext4/ext4.ko "
                          f"{self.root / 'kernel/fs/ext4/ext4.ko'}"])
        self.assertEqual(self.module_debug.key_words(RELEASE, ["xfs"]), [])


class ArchiveFetcher:
    """Stands in for KernelFetcher over a made-up -dbg package: apt and
    tar are replaced by writing the members the patterns match; each tar
    pass waits until the test lets it end (``passes``)."""

    MEMBERS = (f"./{DEBUG}/kernel/fs/ext4/ext4.ko", f"./{DEBUG}/kernel/fs/xfs/xfs.ko")

    def __init__(self, directory: Path) -> None:
        self.store = KernelStore(directory, 1 << 30)
        self.reactor = Clock()
        self.passes: list[Deferred[None]] = []
        #: Per pass: whether it also listed the package.
        self.listed: list[bool] = []
        self.fail_unpack = False
        self.log = Logger()

    def in_thread(self, function: Callable[..., object], *args: object) -> Deferred[object]:
        return maybeDeferred(function, *args)

    #: The real store transaction, over this fake's in_thread.
    making = KernelFetcher.making

    async def candidate(self, name: str) -> Candidate:
        return Candidate(name, "6.1.192-3", 858_000_000, ())

    async def download(self, download: Path, release: str, packages: list[Candidate],
                        total: int, progress: object) -> None:
        (download / f"{packages[0].name}_6.1.192-3_amd64.deb").write_bytes(b"deb")

    async def run(self, argv: list[str]) -> tuple[bytes, bytes, int]:
        done: Deferred[None] = Deferred()
        self.passes.append(done)
        await done
        if self.fail_unpack:
            return b"", b"tar: ./usr: Cannot write: No space left on device\n", 2
        self.listed.append(argv[2] == _EXTRACT_AND_LIST)
        if argv[2] == _EXTRACT_AND_LIST:
            target, patterns = Path(argv[5]), argv[7:]
            Path(argv[6]).write_text("".join(f"{m}\n" for m in ("./usr/", *self.MEMBERS)))
        else:
            target, patterns = Path(argv[5]), argv[6:]
        found = [m for m in self.MEMBERS if any(fnmatch.fnmatchcase(m, p) for p in patterns)]
        for member in found:
            write(target / member, member.encode())
        return b"", b"", 0 if len(found) == len(patterns) else 2


class FetchTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.fetcher = ArchiveFetcher(self.base / "store")
        self.module_debug = ModuleDebug(self.fetcher,  # type: ignore[arg-type]
                                 modules_root=self.base / "lib-modules")

    def test_identical_requests_share_one_pass_and_absent_modules_are_remembered(self) -> None:
        tree = self.base / "tree"
        tree.mkdir(parents=True)
        first = Deferred.fromCoroutine(self.module_debug.provide(RELEASE, ["ext4", "nosuch"], tree))
        second = Deferred.fromCoroutine(self.module_debug.provide(RELEASE, ["ext4"], None))
        self.assertEqual(len(self.fetcher.passes), 1)
        self.fetcher.passes[0].callback(None)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(len(self.fetcher.passes), 1)
        self.assertTrue((tree / "debug-modules" / "fs" / "ext4" / "ext4.ko").is_file())
        # Known present or absent: no pass; a new module: one more.
        self.successResultOf(Deferred.fromCoroutine(
            self.module_debug.provide(RELEASE, ["nosuch", "ext4"], None)))
        self.assertEqual(len(self.fetcher.passes), 1)
        third = Deferred.fromCoroutine(self.module_debug.provide(RELEASE, ["xfs"], None))
        self.fetcher.passes[1].callback(None)
        self.successResultOf(third)
        entry = self.module_debug.store.get(RELEASE)
        assert entry is not None
        self.assertEqual(set(read_set(entry).modules), {"ext4", "xfs"})
        self.assertEqual(self.fetcher.listed, [True, False], "listed on the first pass only")

    def test_names_the_package_lacks_never_cost_another_pass(self) -> None:
        first = Deferred.fromCoroutine(self.module_debug.provide(RELEASE, ["ext4"], None))
        self.fetcher.passes[0].callback(None)
        self.successResultOf(first)
        entry = self.module_debug.store.get(RELEASE)
        assert entry is not None
        self.assertEqual(read_set(entry).available, {"ext4", "xfs"})
        # A hostile client naming modules that do not exist, again and again.
        for number in range(5):
            self.successResultOf(Deferred.fromCoroutine(self.module_debug.provide(
                RELEASE, [f"nosuch{number}", f"other{number}"], None)))
        self.assertEqual(len(self.fetcher.passes), 1)

    def test_any_failure_waits_before_trying_again(self) -> None:
        def full(*arguments: object) -> None:
            raise OSError(28, "No space left on device")
        self.patch(moduledebug, "assemble", full)
        first = Deferred.fromCoroutine(self.module_debug.provide(RELEASE, ["ext4"], None))
        self.fetcher.passes[0].callback(None)
        self.successResultOf(first)
        self.assertEqual(list(self.module_debug.store.directory.iterdir()), [])
        self.successResultOf(Deferred.fromCoroutine(
            self.module_debug.provide(RELEASE, ["ext4"], None)))
        self.assertEqual(len(self.fetcher.passes), 1)

    def test_a_failed_pass_leaves_nothing_and_waits_before_trying_again(self) -> None:
        self.fetcher.fail_unpack = True
        first = Deferred.fromCoroutine(self.module_debug.provide(RELEASE, ["ext4"], None))
        self.fetcher.passes[0].callback(None)
        self.successResultOf(first)
        self.assertIsNone(self.module_debug.store.get(RELEASE))
        self.assertEqual(list(self.module_debug.store.directory.iterdir()), [])
        self.successResultOf(Deferred.fromCoroutine(self.module_debug.provide(RELEASE, ["ext4"], None)))
        self.assertEqual(len(self.fetcher.passes), 1)
        self.fetcher.reactor.advance(RETRY)
        self.fetcher.fail_unpack = False
        again = Deferred.fromCoroutine(self.module_debug.provide(RELEASE, ["ext4"], None))
        self.assertEqual(len(self.fetcher.passes), 2)
        self.fetcher.passes[1].callback(None)
        self.successResultOf(again)
        self.assertIsNotNone(self.module_debug.store.get(RELEASE))
