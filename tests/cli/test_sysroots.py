"""``python -m stapsrv.cli.sysroots``: listing (a damaged root named, the
others shown), removal, and the commands that need root refusing without
it.  Making a root from the archive is in tests.system.test_sysroots."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from stapsrv.cli import sysroots as command
from stapsrv.kernel.sysroots import sysroots_directory
from tests.helpers.realserver import as_server_user, venv_bin
from tests.kernel.test_sysroots import make_user_root


class ListTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = Path(self.mktemp()).absolute()
        make_user_root(sysroots_directory(self.store) / "trixie")

    def test_list_shows_the_host_and_the_root(self) -> None:
        out = io.StringIO()
        self.assertEqual(command.list_roots(self.store, out, packages=True), 0)
        lines = out.getvalue().splitlines()
        self.assertTrue(lines[0].startswith("host\t"), lines)
        self.assertTrue(lines[1].startswith("trixie\tlibc6 2.41-12\t2 packages\t"
                                            "suite trixie, made "), lines)
        self.assertIn("  libc6=2.41-12", lines)

    def test_a_damaged_root_is_named_and_the_others_listed(self) -> None:
        broken = make_user_root(sysroots_directory(self.store) / "forky")
        (broken / "manifest.json").write_text("{")
        out = io.StringIO()
        self.assertEqual(command.list_roots(self.store, out), 1)
        text = out.getvalue()
        self.assertIn("\ntrixie\tlibc6 2.41-12", text)
        self.assertIn("DAMAGED root forky: its manifest ", text)

    def test_remove(self) -> None:
        self.assertTrue(command.remove_sysroot(self.store, "trixie"))
        self.assertFalse(command.remove_sysroot(self.store, "trixie"))
        self.assertFalse(command.remove_sysroot(self.store, "../x"))
        self.assertEqual(os.listdir(sysroots_directory(self.store)), [])

    def test_create_needs_root(self) -> None:
        done = subprocess.run(
            as_server_user([venv_bin("python"), "-m", "stapsrv.cli.sysroots", "--store",
                            str(self.store), "create", "trixie"]),
            capture_output=True, text=True, timeout=120, cwd="/")
        self.assertEqual((done.returncode, done.stderr),
                         (1, "create needs root (debootstrap does; the server only reads "
                          "the root).\n"))
