"""The newc archive, read back by an independent reader (busybox's cpio)."""

from __future__ import annotations

import subprocess

from twisted.trial.unittest import TestCase

from stapsrv.vm import cpio
from tests.helpers import require_program


class ArchiveTests(TestCase):
    def test_members_owners_and_modes(self) -> None:
        data = cpio.archive([
            cpio.directory("/usr"),
            cpio.directory("/usr/bin"),
            cpio.regular("/usr/bin/staprun", b"x" * 5, 0o4754, uid=0, gid=156),
            cpio.symlink("/bin", "usr/bin"),
            cpio.char_device("/dev/console", 5, 1),
        ])
        self.assertEqual(len(data) % 4, 0)
        self.assertTrue(data.startswith(b"070701"))
        busybox = require_program("busybox")
        listing = subprocess.run([busybox, "cpio", "-t", "-v"], input=data,
                                 capture_output=True, check=True).stdout.decode()
        lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line.split()
                 for line in listing.splitlines()}
        self.assertEqual(set(lines), {"usr", "usr/bin", "usr/bin/staprun", "bin", "dev/console"})
        self.assertEqual(lines["usr/bin/staprun"][0], "-rwsr-xr--")
        self.assertEqual(lines["usr/bin/staprun"][1], "0/156")
        self.assertEqual(lines["usr/bin/staprun"][2], "5")
        self.assertEqual(lines["bin"][0][0], "l")
        self.assertEqual(lines["bin"][-1], "usr/bin")
        self.assertEqual(lines["dev/console"][0][0], "c")

    def test_contents_survive(self) -> None:
        data = cpio.archive([cpio.regular("a", b"hello\n"), cpio.regular("b", b"")])
        busybox = require_program("busybox")
        out = subprocess.run([busybox, "cpio", "-i", "--to-stdout", "a"], input=data,
                             capture_output=True, check=True).stdout
        self.assertEqual(out, b"hello\n")
