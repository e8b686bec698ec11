"""The kernel store on disk: complete releases only, the Makefile fix-up,
the size cap over every part, leases, removal, and what interrupted
fetches leave."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

from twisted.trial.unittest import TestCase

from stapsrv.kernel import store as store_module
from stapsrv.kernel.store import (
    DEBUG_DIRECTORY,
    IMAGES_DIRECTORY,
    MODULES_DIRECTORY,
    InUse,
    KernelStore,
    StoredPackage,
    build_tree_in,
    fix_tree,
    valid_release,
)

RELEASE = "6.1.0-55-amd64"


def fake_tree(root: Path, release: str, size: int = 1000) -> None:
    """What dpkg-deb -x of the headers packages gives (the parts that matter)."""
    tree = build_tree_in(root, release)
    tree.mkdir(parents=True)
    (tree / "Makefile").write_text("include /usr/src/linux-headers-6.1.0-55-common/Makefile\n")
    (tree / "payload").write_bytes(b"x" * size)
    common = root / "usr" / "src" / "linux-headers-6.1.0-55-common"
    common.mkdir(parents=True)
    (common / "Makefile").write_text("all:\n\t@echo common\n")
    modules = root / "lib" / "modules" / release
    modules.mkdir(parents=True)
    (modules / "build").symlink_to(f"/usr/src/linux-headers-{release}")


class KernelStoreTests(TestCase):
    def setUp(self) -> None:
        self.store = KernelStore(Path(self.mktemp()), 10 << 20)
        self.store.open()

    def add(self, release: str, size: int = 1000) -> None:
        work = self.store.begin(release)
        fake_tree(work / "root", release, size)
        fix_tree(work / "root", release, self.store.final_root(release))
        self.store.commit(work, release, [StoredPackage(f"linux-headers-{release}", "1", 5)])

    def test_a_stored_tree_includes_its_own_common_makefile(self) -> None:
        self.add(RELEASE)
        stored = self.store.get(RELEASE)
        assert stored is not None
        makefile = (stored.build_tree / "Makefile").read_text()
        self.assertEqual(makefile, f"include {self.store.directory}/{RELEASE}/root/usr/src/"
                         "linux-headers-6.1.0-55-common/Makefile\n")
        # make follows it: the stored tree builds without /usr/src.
        result = subprocess.run(["make", "-s", "-C", str(stored.build_tree)],
                                capture_output=True, text=True)
        self.assertEqual((result.returncode, result.stdout), (0, "common\n"), result.stderr)
        self.assertFalse((stored.directory / "root" / "lib" / "modules").exists())
        self.assertEqual([p.name for p in stored.packages], [f"linux-headers-{RELEASE}"])

    def test_forkys_output_directory_is_the_stored_tree(self) -> None:
        release = "7.2.12+deb14-amd64"
        work = self.store.begin(release)
        tree = build_tree_in(work / "root", release)
        tree.mkdir(parents=True)
        (tree / "Makefile").write_text(
            f"KBUILD_OUTPUT=/usr/src/linux-headers-{release}\n"
            "include /usr/src/linux-headers-7.2.12+deb14-common/Makefile\n")
        fix_tree(work / "root", release, self.store.final_root(release))
        stored = f"{self.store.final_root(release)}/usr/src"
        self.assertEqual((tree / "Makefile").read_text(),
                         f"KBUILD_OUTPUT={stored}/linux-headers-{release}\n"
                         f"include {stored}/linux-headers-7.2.12+deb14-common/Makefile\n")
        self.store.abandon(work)

    def test_a_stored_tree_has_the_time_of_its_config(self) -> None:
        """The translator names the kernel configuration header after the
        tree's time: every server storing the release gives it the same."""
        work = self.store.begin(RELEASE)
        fake_tree(work / "root", RELEASE, 1000)
        tree = work / "root" / "usr" / "src" / f"linux-headers-{RELEASE}"
        (tree / ".config").write_text("CONFIG_MODULES=y\n")
        os.utime(tree / ".config", (1_700_000_000, 1_700_000_000))
        fix_tree(work / "root", RELEASE, self.store.final_root(RELEASE))
        self.assertEqual(tree.stat().st_mtime, 1_700_000_000)

    def test_only_complete_releases_are_seen(self) -> None:
        work = self.store.begin(RELEASE)
        fake_tree(work / "root", RELEASE)
        self.assertIsNone(self.store.get(RELEASE))
        self.assertEqual(self.store.releases(), [])
        self.store.abandon(work)
        self.assertEqual(os.listdir(self.store.directory), [])

    def test_leftovers_of_a_dead_fetch_go_when_the_store_opens(self) -> None:
        dead = self.store.directory / f".partial-999999999-{RELEASE}-abc"
        dead.mkdir()
        alive = self.store.begin(RELEASE)
        self.assertEqual(self.store.open(), [dead.name])
        self.assertEqual(os.listdir(self.store.directory), [alive.name])

    def test_the_size_cap_removes_least_recently_used_first(self) -> None:
        self.store.size_cap = 7 << 19  # 3.5 MiB: three releases
        for number in (1, 2, 3):
            self.add(f"6.1.0-{number}-amd64", size=1 << 20)
            os.utime(self.store.directory / f"6.1.0-{number}-amd64" / "used",
                     (1000.0 * number, 1000.0 * number))
        self.store.touch("6.1.0-1-amd64")
        self.add("6.1.0-4-amd64", size=1 << 20)
        removed = self.store.evict(keep="6.1.0-4-amd64")
        self.assertEqual([entry.release for entry in removed], ["6.1.0-2-amd64"])
        self.assertEqual([entry.release for entry in self.store.releases()],
                         ["6.1.0-4-amd64", "6.1.0-1-amd64", "6.1.0-3-amd64"])
        self.assertLessEqual(sum(e.size for e in self.store.releases()), self.store.size_cap)

    def test_remove(self) -> None:
        self.add(RELEASE)
        self.assertTrue(self.store.remove(RELEASE))
        self.assertFalse(self.store.remove(RELEASE))
        self.assertEqual(os.listdir(self.store.directory), [])

    def test_release_names(self) -> None:
        self.assertTrue(valid_release("6.1.0-57-cloud-amd64"))
        for bad in ("", "-r", "../etc", "a/b", "6.1 0", "x" * 200, ".hidden"):
            self.assertFalse(valid_release(bad), bad)


def add_to(store: KernelStore, release: str, size: int, used: float) -> None:
    """A release of ``size`` bytes in ``store`` (a tree or a part), last used at ``used``."""
    work = store.begin(release)
    (work / "root" / "payload").write_bytes(b"x" * size)
    store.commit(work, release, [StoredPackage(f"some-package-{release}", "1", 5)])
    os.utime(store.directory / release / "used", (used, used))


class CeilingTests(TestCase):
    """One ceiling for the trees and every part, and what compiles hold."""

    def setUp(self) -> None:
        self.store = KernelStore(Path(self.mktemp()), 7 << 19)  # 3.5 MiB: three of five
        for part in self.store.family():
            part.open()

    def fill(self) -> None:
        """Five releases of 1 MiB, one in each part and two trees, the
        oldest first: image, tree 1, symbols, module debuginfo, tree 2."""
        add_to(self.store.part(IMAGES_DIRECTORY), "r-image", 1 << 20, 1000.0)
        add_to(self.store, "r-tree-1", 1 << 20, 2000.0)
        add_to(self.store.part(DEBUG_DIRECTORY), "r-symbols", 1 << 20, 3000.0)
        add_to(self.store.part(MODULES_DIRECTORY), "r-modules", 1 << 20, 4000.0)
        add_to(self.store, "r-tree-2", 1 << 20, 5000.0)

    def names(self) -> set[str]:
        return {entry.release for part in self.store.family() for entry in part.releases()}

    def test_the_ceiling_counts_every_part(self) -> None:
        self.fill()
        self.assertGreater(self.store.total_size(), self.store.size_cap)
        # Evicting from a part evicts across the whole store, oldest first.
        removed = self.store.part(DEBUG_DIRECTORY).evict()
        self.assertEqual([entry.release for entry in removed], ["r-image", "r-tree-1"])
        self.assertEqual(self.names(), {"r-symbols", "r-modules", "r-tree-2"})
        self.assertLessEqual(self.store.total_size(), self.store.size_cap)

    def admin_root(self, kind: str, name: str, size: int | None, files: int = 0) -> Path:
        """A root as the admin commands make it (``size``: what its
        manifest records; ``files`` bytes of files in it)."""
        import json
        directory = self.store.directory / kind / name
        (directory / "root").mkdir(parents=True)
        if files:
            (directory / "root" / "data").write_bytes(b"x" * files)
        manifest = {"name": name, "suite": name, "made": 0.0, "packages": {}}
        if size is not None:
            manifest["size"] = size
        (directory / "manifest.json").write_text(json.dumps(manifest))
        return directory

    def test_administrators_roots_take_room_and_are_never_removed(self) -> None:
        self.fill()
        self.admin_root(".toolchains", "forky", 1 << 20)
        # Made before sizes were recorded: measured (in blocks) instead.
        self.admin_root(".sysroots", "trixie", None, files=1 << 20)
        roots = self.store.admin_bytes()
        self.assertGreaterEqual(roots, 2 << 20)
        self.assertLess(roots, (2 << 20) + (64 << 10))
        removed = self.store.evict()
        # 3.5 MiB less the roots' 2: one release of 1 MiB is left, the newest.
        self.assertEqual(self.names(), {"r-tree-2"})
        self.assertEqual(len(removed), 4)
        self.assertLessEqual(self.store.total_size(), self.store.size_cap)
        self.assertTrue((self.store.directory / ".toolchains" / "forky" / "root").is_dir())
        self.assertTrue((self.store.directory / ".sysroots" / "trixie" / "root").is_dir())

    def test_a_damaged_or_foreign_entry_counts_nothing(self) -> None:
        (self.store.directory / ".toolchains" / "empty").mkdir(parents=True)
        broken = self.admin_root(".sysroots", "broken", None)
        (broken / "manifest.json").write_text("{not json")
        self.assertEqual(self.store.admin_bytes(), 0)

    def test_a_leased_release_is_passed_by_and_kept_in_every_part(self) -> None:
        self.fill()
        add_to(self.store.part(DEBUG_DIRECTORY), "r-tree-1", 1 << 10, 2500.0)
        with self.store.lease("r-tree-1") as lease:
            self.assertTrue(lease.holds(self.store.directory))
            self.assertTrue(lease.holds(self.store.part(DEBUG_DIRECTORY).directory))
            removed = self.store.evict()
            self.assertEqual([entry.release for entry in removed], ["r-image", "r-symbols"])
            self.assertIn("r-tree-1", self.names())
            with self.assertRaises(InUse):
                self.store.remove("r-tree-1")
            with self.assertRaises(InUse):
                self.store.remove_everywhere("r-tree-1")
            # Nothing of it went: neither the tree nor its symbols.
            self.assertIsNotNone(self.store.get("r-tree-1"))
            self.assertIsNotNone(self.store.part(DEBUG_DIRECTORY).get("r-tree-1"))
        self.assertTrue(self.store.remove_everywhere("r-tree-1"))
        self.assertIsNone(self.store.get("r-tree-1"))
        self.assertIsNone(self.store.part(DEBUG_DIRECTORY).get("r-tree-1"))
        self.assertFalse(self.store.remove_everywhere("r-tree-1"))

    def test_a_lease_taken_in_another_process_counts(self) -> None:
        add_to(self.store, RELEASE, 1 << 10, 1000.0)
        used = self.store.directory / RELEASE / "used"
        holder = subprocess.Popen(
            [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
             "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); sys.stdin.read()",
             str(used)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.stdin.close)  # type: ignore[union-attr]
        self.assertEqual(holder.stdout.readline(), "held\n")  # type: ignore[union-attr]
        with self.assertRaises(InUse):
            self.store.remove_everywhere(RELEASE)
        self.store.size_cap = 0
        self.assertEqual(self.store.evict(), [])
        self.assertIsNotNone(self.store.get(RELEASE))

    def test_a_lease_of_what_is_gone_holds_nothing(self) -> None:
        add_to(self.store, RELEASE, 1 << 10, 1000.0)
        self.assertTrue(self.store.remove(RELEASE))
        with self.store.lease(RELEASE) as lease:
            self.assertFalse(lease.holds(self.store.directory))
        with self.store.lease("../escape") as lease:
            self.assertFalse(lease.holds(self.store.directory))


class RacesTests(TestCase):
    """What compiles, evictions and removals do to each other."""

    def setUp(self) -> None:
        self.store = KernelStore(Path(self.mktemp()), 1 << 30)
        for part in self.store.family():
            part.open()

    def test_replacing_a_held_release_never_waits(self) -> None:
        # A new module set (or -dbg over a map) for a release a compile
        # reads: put in place at once; the old copy is set aside whole,
        # for the compile that has it open or mounted, and deleted once free.
        modules = self.store.part(MODULES_DIRECTORY)
        add_to(modules, RELEASE, 1 << 10, 1000.0)
        old_payload = modules.directory / RELEASE / "root" / "payload"
        with modules.lease(RELEASE):
            with old_payload.open("rb") as reading:
                add_to(modules, RELEASE, 1 << 11, 2000.0)  # returns: it did not wait
                self.assertEqual(len(reading.read()), 1 << 10)
            aside = [entry for entry in modules.directory.iterdir()
                     if entry.name.startswith(".removing-")]
            self.assertEqual(len(aside), 1)
            self.assertEqual((aside[0] / "old" / "root" / "payload").stat().st_size, 1 << 10)
            self.assertEqual(modules.sweep(), [])  # still held
        self.assertEqual((modules.directory / RELEASE / "root" / "payload").stat().st_size,
                         1 << 11)
        self.assertEqual(modules.sweep(), [aside[0].name])
        self.assertFalse(aside[0].exists())

    def test_a_lock_that_cannot_be_opened_counts_as_held(self) -> None:
        add_to(self.store, RELEASE, 1 << 10, 1000.0)
        self.store.size_cap = 0
        real_open = os.open

        def no_descriptors(path: Any, *args: Any, **kwargs: Any) -> int:
            if str(path).endswith("/used"):
                raise OSError(errno.EMFILE, "Too many open files")
            return real_open(path, *args, **kwargs)

        with mock.patch.object(store_module.os, "open", no_descriptors):
            self.assertEqual(self.store.evict(), [])
            with self.assertRaises(InUse):
                self.store.remove(RELEASE)
            with self.assertRaises(InUse):
                self.store.remove_everywhere(RELEASE)
            with self.assertRaises(OSError):
                self.store.lease(RELEASE)
        self.assertIsNotNone(self.store.get(RELEASE))

    def test_an_entry_another_evicter_took_meanwhile_is_no_failure(self) -> None:
        # Two fetches ending at once (or two servers on one store) both
        # pick the same least recently used release.
        add_to(self.store, "r-1", 1 << 10, 1000.0)
        add_to(self.store.part(DEBUG_DIRECTORY), "r-1", 1 << 10, 1000.0)
        add_to(self.store.part(IMAGES_DIRECTORY), "r-1", 1 << 10, 1000.0)
        add_to(self.store, "r-2", 1 << 10, 2000.0)
        real_hold = store_module._hold

        def the_other_was_first(path: Path, operation: int) -> int | None:
            if ".images" in str(path) and path.parent.exists():
                shutil.rmtree(path.parent)
            return real_hold(path, operation)

        with mock.patch.object(store_module, "_hold", the_other_was_first):
            self.assertTrue(self.store.remove_everywhere("r-1"))
        self.assertEqual([entry.name for entry in self.store.directory.iterdir()
                          if entry.name.startswith(".removing-")], [])
        self.assertIsNone(self.store.part(DEBUG_DIRECTORY).get("r-1"))
        add_to(self.store, "r-3", 1 << 10, 3000.0)
        self.store.size_cap = 1 << 10

        def gone_first(path: Path, operation: int) -> int | None:
            if "r-2" in str(path) and path.parent.exists():
                shutil.rmtree(path.parent)
            return real_hold(path, operation)

        with mock.patch.object(store_module, "_hold", gone_first):
            self.assertEqual(self.store.evict(keep="r-3"), [])
        self.assertEqual([entry.release for entry in self.store.releases()], ["r-3"])
