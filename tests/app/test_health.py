from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.app.health import (
    MIN_FREE_BYTES,
    Health,
    listening_check,
    space_check,
    translator_check,
)


class HealthTests(TestCase):
    def test_translator_that_cannot_run_fails(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        stap = directory / "stap"
        stap.write_text("#!/bin/sh\n")
        stap.chmod(0o755)
        self.assertTrue(translator_check(str(stap)).ok)
        stap.chmod(0o644)  # even root cannot run a file without an x bit
        self.assertFalse(translator_check(str(stap)).ok)
        self.assertFalse(translator_check(str(directory / "missing")).ok)

    def test_space_below_the_floor_fails(self) -> None:
        here = Path(self.mktemp())
        check = space_check([here / "not" / "made" / "yet"], usage=lambda path: 2 * MIN_FREE_BYTES)
        self.assertTrue(check.ok, check.detail)
        check = space_check([here], usage=lambda path: MIN_FREE_BYTES - 1)
        self.assertFalse(check.ok)
        self.assertIn("255 MiB free", check.detail)

    def test_verdict_and_text(self) -> None:
        health = Health((listening_check(True, "[::]:1"), translator_check("/nonexistent")))
        self.assertFalse(health.ok)
        self.assertEqual(health.text().splitlines(),
                         ["unhealthy", "ok listening: [::]:1",
                          "FAIL translator: /nonexistent cannot be run by this user"])
        self.assertTrue(Health((listening_check(True, "x"),)).ok)
        self.assertFalse(listening_check(False, "x").ok)
