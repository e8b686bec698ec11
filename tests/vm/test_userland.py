"""Another architecture's userland for the VM: what it is made of."""

from __future__ import annotations

import os
import tempfile
import unittest
from pathlib import Path

from stapsrv.vm import userland
from stapsrv.vm.userland import FAMILY_SUITES, PACKAGES, RENAMED, depended_libraries

#: ``apt-cache depends`` as trixie's arm64 lists answer it (abridged).
DEPENDS = """systemtap-runtime
  Depends: libc6
  Depends: libdebuginfod1t64
  Depends: libnss3
  Depends: adduser
  Breaks: systemtap
libdebuginfod1t64
  Depends: libc6
  Depends: libcurl3t64-gnutls
  Depends: libdebuginfod-common
  Breaks: <libdebuginfod1>
 |Depends: libgnutls30t64
  Depends: libssl3t64
  PreDepends: libzstd1:arm64
  Depends: <debconf-2.0>
"""


class DependedLibrariesTests(unittest.TestCase):
    def test_library_dependencies_each_once_first_alternative(self) -> None:
        self.assertEqual(depended_libraries(DEPENDS), [
            "libc6", "libdebuginfod1t64", "libnss3", "libcurl3t64-gnutls",
            "libdebuginfod-common", "libgnutls30t64", "libzstd1"])

    def test_nothing_from_no_dependencies(self) -> None:
        self.assertEqual(depended_libraries("busybox-static\n  Breaks: busybox\n"), [])


class FamilyTests(unittest.TestCase):
    def test_the_5x_family_comes_from_a_suite_with_its_library_names(self) -> None:
        suite = FAMILY_SUITES[5]
        self.assertEqual(suite, "trixie")
        for old in RENAMED[suite]:
            self.assertIn(old, PACKAGES)


class SettleTests(unittest.TestCase):
    def test_a_merged_usr_root_gets_its_top_links(self) -> None:
        with tempfile.TemporaryDirectory() as temporary:
            base = Path(temporary)
            work, directory = base / "work", base / "userland"
            (work / "download").mkdir(parents=True)
            (work / "root" / "usr" / "lib" / "aarch64-linux-gnu").mkdir(parents=True)
            (work / "root" / "usr" / "bin").mkdir()
            (work / "root" / "sbin").mkdir()  # a real one is kept
            userland._settle(work, directory, ("libc6",))
            root = directory / "root"
            self.assertEqual(os.readlink(root / "lib"), "usr/lib")
            self.assertTrue((root / "lib" / "aarch64-linux-gnu").is_dir())
            self.assertEqual(os.readlink(root / "bin"), "usr/bin")
            self.assertFalse((root / "sbin").is_symlink())
            self.assertEqual((directory / userland.COMPLETE).read_text(), "libc6\n")
            self.assertFalse(work.exists())
