"""``python -m stapsrv.cli.toolchains``: listing (a damaged root named, the
others shown), removal, and the commands that need root refusing without
it.  Making a root from the archive is in tests.system.test_toolchains."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from stapsrv.cli import toolchains as command
from stapsrv.kernel.toolchains import toolchains_directory
from tests.helpers.realserver import as_server_user, venv_bin
from tests.kernel.test_toolchains import make_root


class ListTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = Path(self.mktemp()).absolute()
        make_root(toolchains_directory(self.store) / "forky")

    def test_list_shows_the_host_and_the_toolchain(self) -> None:
        out = io.StringIO()
        self.assertEqual(command.list_toolchains(self.store, out, packages=True), 0)
        lines = out.getvalue().splitlines()
        self.assertTrue(lines[0].startswith("host\tSystemTap 4.8"), lines)
        self.assertTrue(lines[1].startswith("forky\tSystemTap 5.6-1\tgcc-14 14.3.0-9\t"
                                            "suite forky, made "), lines)
        self.assertIn("  systemtap=5.6-1", lines)

    def test_a_damaged_root_is_named_and_the_others_listed(self) -> None:
        broken = make_root(toolchains_directory(self.store) / "trixie")
        (broken / "root" / "usr" / "bin" / "stap").unlink()
        out = io.StringIO()
        self.assertEqual(command.list_toolchains(self.store, out), 1)
        text = out.getvalue()
        self.assertIn("\nforky\tSystemTap 5.6-1", text)
        self.assertIn("DAMAGED toolchain trixie: ", text)
        self.assertIn("usr/bin/stap is missing", text)

    def test_remove(self) -> None:
        self.assertTrue(command.remove_toolchain(self.store, "forky"))
        self.assertFalse(command.remove_toolchain(self.store, "forky"))
        self.assertFalse(command.remove_toolchain(self.store, "../x"))
        self.assertEqual(os.listdir(toolchains_directory(self.store)), [])

    def test_create_needs_root(self) -> None:
        done = subprocess.run(
            as_server_user([venv_bin("python"), "-m", "stapsrv.cli.toolchains", "--store",
                            str(self.store), "create", "forky"]),
            capture_output=True, text=True, timeout=120, cwd="/")
        self.assertEqual((done.returncode, done.stderr),
                         (1, "create needs root (debootstrap does; the server only reads "
                          "the root).\n"))

    def test_the_suites_packages(self) -> None:
        forky = command.SUITES["forky"]
        self.assertEqual(forky.script, "sid")
        for package in ("systemtap", "gcc", "gcc-12", "gcc-14", "make", "libc6-dev"):
            self.assertIn(package, forky.packages)
