"""Verification results kept with the release, and the verifier's words."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.vm import verification
from stapsrv.vm.verification import ProbeResult, Verification
from stapsrv.vm.verify import PROBES, version_of

FOUND = Verification("6.1.0-57-amd64", 1700000000.5, "Systemtap translator/driver (version 4.8/0.188)",
                     (ProbeResult("4.8", "begin", True),
                      ProbeResult("5.5", "begin", False,
                                  "staprun exit 1: Unable to send relocation: Invalid argument")))


class KeptTests(TestCase):
    def test_round_trip_replaced_and_removed(self) -> None:
        store = Path(self.mktemp())
        path = verification.save(store, FOUND)
        self.assertEqual(path, store / ".verified" / "6.1.0-57-amd64.json")
        self.assertEqual(verification.load(store, "6.1.0-57-amd64"), FOUND)
        self.assertEqual((FOUND.passed, FOUND.summary()), (False, "1/2 run"))
        newer = Verification(FOUND.release, FOUND.when + 60, FOUND.translator,
                             FOUND.results[:1])
        verification.save(store, newer)
        self.assertEqual(verification.load_all(store), [newer])
        self.assertTrue(newer.passed)
        self.assertEqual([p.name for p in (store / ".verified").iterdir()],
                         ["6.1.0-57-amd64.json"])
        self.assertTrue(verification.remove(store, FOUND.release))
        self.assertFalse(verification.remove(store, FOUND.release))
        self.assertEqual(verification.load_all(store), [])

    def test_damaged_and_bad_names_are_nothing(self) -> None:
        store = Path(self.mktemp())
        (store / ".verified").mkdir(parents=True)
        (store / ".verified" / "6.1.0-1-amd64.json").write_text("{not json")
        self.assertEqual(verification.load_all(store), [])
        self.assertIsNone(verification.load(store, "../../etc/passwd"))
        self.assertEqual(verification.load_all(Path(self.mktemp())), [])
        self.assertFalse(Verification("r", 0.0, "t", ()).passed)


class VerifierWordsTests(TestCase):
    def test_version_of(self) -> None:
        self.assertEqual(version_of("Systemtap translator/driver (version 4.8/0.188, Debian "
                                    "version 4.8-2)\nCopyright"), "4.8")
        self.assertEqual(version_of("Systemtap translator/driver (version 5.5/0.192, non-git "
                                    "sources)"), "5.5")
        self.assertEqual(version_of("odd"), "odd")

    def test_every_kind_the_issue_names(self) -> None:
        self.assertEqual([probe.name for probe in PROBES],
                         ["begin", "kprobe", "syscall", "timer", "process"])
        for probe in PROBES:
            self.assertIn(f'println("{probe.expected}")', probe.script)
            if probe.command:
                self.assertTrue(probe.command.startswith("/usr/bin/busybox "))
                self.assertEqual(probe.files, ("/usr/bin/busybox",))
