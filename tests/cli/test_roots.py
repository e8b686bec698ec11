"""Making and removing administrators' roots as root, in a kernel store
that is the server user's (debootstrap and dpkg-query faked): the store
stays the server's, and nothing the server user plants is followed."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from stapsrv.cli import roots
from stapsrv.kernel.toolchains import MANIFEST, ROOT

SERVER_UID = 12345


def fake_run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """debootstrap makes an empty root; dpkg-query finds one package."""
    if argv[0] == "debootstrap":
        Path(argv[-3], "etc").mkdir(parents=True)
        return subprocess.CompletedProcess(argv, 0, "", "")
    return subprocess.CompletedProcess(argv, 0, "libc6\t2.41-1\tinstalled\n", "")


class RootsTests(TestCase):
    def setUp(self) -> None:
        if os.geteuid() != 0:
            self.skipTest("run as root, as the commands are (CI does)")
        self.patch(roots.subprocess, "run", fake_run)
        self.base = Path(self.mktemp()).absolute()
        self.home = self.base / "home"
        self.home.mkdir(parents=True, mode=0o750)
        os.chown(self.home, SERVER_UID, SERVER_UID)
        self.store = self.home / ".cache" / "stapsrv" / "kernels"

    def make(self, place: Path) -> Path:
        return roots.make_root(place, "trixie", "trixie", "trixie", (), roots.MIRROR,
                               io.StringIO(), None, lambda work: None)

    def test_made_in_a_store_that_stays_the_servers(self) -> None:
        made = self.make(self.store / ".sysroots")
        self.assertEqual(made, self.store / ".sysroots" / "trixie")
        manifest = json.loads((made / MANIFEST).read_text())
        self.assertEqual(manifest["packages"], {"libc6": "2.41-1"})
        self.assertIsInstance(manifest["size"], int)
        self.assertTrue((made / ROOT / "etc").is_dir())
        # The server must still make its own directories in its store.
        self.assertEqual([path.stat().st_uid for path in
                          (self.home / ".cache", self.store.parent, self.store)],
                         [SERVER_UID] * 3)
        place = made.parent.stat()
        self.assertEqual((place.st_uid, place.st_mode & 0o777), (0, 0o755))
        # Made again: in place of the old one, nothing left beside it.
        self.make(self.store / ".sysroots")
        self.assertEqual(os.listdir(self.store / ".sysroots"), ["trixie"])
        self.assertTrue(roots.remove_root(self.store / ".sysroots", "trixie"))
        self.assertFalse(roots.remove_root(self.store / ".sysroots", "trixie"))
        self.assertEqual(os.listdir(self.store / ".sysroots"), [])

    def test_a_link_or_a_directory_the_server_user_planted_is_refused(self) -> None:
        self.store.mkdir(parents=True)
        secret = self.base / "root-only"
        secret.mkdir(mode=0o700)
        (self.store / ".sysroots").symlink_to(secret)
        with self.assertRaises(roots.UnsafePlace):
            self.make(self.store / ".sysroots")
        with self.assertRaises(roots.UnsafePlace):
            roots.remove_root(self.store / ".sysroots", "trixie")
        self.assertEqual((secret.stat().st_mode & 0o777, os.listdir(secret)), (0o700, []))
        (self.store / ".sysroots").unlink()
        (self.store / ".sysroots").mkdir()
        os.chown(self.store / ".sysroots", SERVER_UID, SERVER_UID)
        with self.assertRaises(roots.UnsafePlace) as caught:
            self.make(self.store / ".sysroots")
        self.assertIn("is not root's alone (owner uid 12345", str(caught.exception))

    def test_a_root_that_is_a_link_is_neither_replaced_nor_removed(self) -> None:
        place = self.store / ".toolchains"
        self.make(place)
        os.rename(place / "trixie", self.base / "elsewhere")
        (place / "trixie").symlink_to(self.base / "elsewhere")
        with self.assertRaises(roots.UnsafePlace):
            self.make(place)
        self.assertFalse(roots.remove_root(place, "trixie"))
        self.assertTrue((self.base / "elsewhere" / ROOT).is_dir())
