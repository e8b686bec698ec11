"""The manual pages render without warnings (as `man -l` shows them)."""

from __future__ import annotations

import subprocess

from twisted.trial.unittest import TestCase

from tests.helpers import ROOT, require_program

DOC = ROOT / "doc"


class ManualPageTests(TestCase):
    def test_pages_render_without_warnings(self) -> None:
        require_program("groff")
        pages = sorted(DOC.rglob("*.8"))
        self.assertTrue(pages)
        for page in pages:
            result = subprocess.run(["groff", "-k", "-ww", "-man", "-Tutf8", str(page)],
                                    capture_output=True, text=True)
            self.assertEqual((result.returncode, result.stderr), (0, ""), page)
            self.assertIn("stap-server", result.stdout)
