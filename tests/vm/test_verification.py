"""Verification results kept with the release, and the verifier's words."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase

from stapsrv.vm import verification
from stapsrv.vm.verification import ProbeResult, Verification
from stapsrv.vm.console import Outcome
from stapsrv.vm.initramfs import Job, Staprun
from stapsrv.vm.verify import PROBES, ClientSpec, Verifier, version_of

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

    def test_hostile_records_are_nothing_and_never_block(self) -> None:
        """Whoever can write to the store's .verified/ gets no crash and no
        hang out of status or the metrics, and no record under another
        release's name."""
        import json
        import os
        store = Path(self.mktemp())
        directory = store / ".verified"
        directory.mkdir(parents=True)
        good = FOUND.as_json()
        records = {
            "6.1.0-1-amd64": dict(good, when=int("9" * 400)),  # float() overflows
            "6.1.0-2-amd64": dict(good, when=1e300),  # no time
            "6.1.0-3-amd64": dict(good, when=float("nan")),
            "6.1.0-4-amd64": good,  # another release's record
        }
        for release, record in records.items():
            (directory / f"{release}.json").write_text(json.dumps(record))
        (directory / "6.1.0-5-amd64.json").write_text("[" * 200_000)  # recursion
        os.mkfifo(directory / "6.1.0-6-amd64.json")  # would block a read
        os.symlink("/etc/passwd", directory / "6.1.0-7-amd64.json")
        (directory / "6.1.0-8-amd64.json").write_text(" " * (2 << 20))  # too big
        self.assertEqual(verification.load_all(store), [])
        with self.assertRaises(ValueError):
            verification.save(store, Verification("../x", 0.0, "t", ()))


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


class FakeFetcher:
    def __init__(self, image: Path) -> None:
        self.image = image

    async def ensure_image(self, release: str) -> Path:
        return self.image

    def via(self, release: str) -> str | None:
        return None  # the machine's own architecture

    def in_thread(self, function: Any, *args: Any) -> Deferred[object]:
        return succeed(function(*args))


class FakeRunner:
    """Every module prints its line, except under the 5.5 staprun."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, Job]] = []

    async def run(self, kernel: Path, staprun: Staprun, job: Job, in_thread: Any,
                  scratch: Path | None = None, busybox: str = "") -> Outcome:
        self.jobs.append((staprun.staprun, job))
        if staprun.staprun.startswith("/opt/stap55"):
            return Outcome(True, "", "Unable to send relocation: Invalid argument\n", 1, "")
        name = job.module.read_text()
        return Outcome(True, f"stapsrv-verify {name}\n", "", 0, "")


class FakeVerifier(Verifier):
    """Clients faked: ``stap -V`` says the version, a compile writes a
    module naming its probe (the timer's fails to compile)."""

    async def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
                  cwd: Path | None = None) -> tuple[bytes, bytes, int]:
        if argv[-1] == "-V":
            version = "5.5/0.192" if argv[0].startswith("/opt") else "4.8/0.188"
            return b"", f"Systemtap translator/driver (version {version})\n".encode(), 0
        if "-p4" in argv:
            assert cwd is not None
            script = argv[-1]
            probe = next(p.name for p in PROBES if p.script == script)
            if probe == "timer":
                return b"", b"semantic error: no timer here\n", 1
            (cwd / f"stap_{probe}_1.ko").write_text(probe)
        return b"", b"", 0


class VerifierTests(TestCase):
    async def test_each_client_each_probe(self) -> None:
        work = Path(self.mktemp())
        work.mkdir()
        runner = FakeRunner()
        verifier = FakeVerifier(reactor, FakeFetcher(work / "vmlinuz"),  # type: ignore[arg-type]
                                runner, "127.0.0.1:1", work)  # type: ignore[arg-type]
        found = await verifier.verify("6.1.0-57-amd64",
                                      [ClientSpec.host(), ClientSpec.prefix("/opt/stap55")])
        results = {(r.client, r.probe): r for r in found.results}
        self.assertEqual(len(results), 10)
        self.assertTrue(results["4.8", "begin"].runs)
        self.assertTrue(results["4.8", "process"].runs)
        self.assertEqual(results["4.8", "timer"].failure,
                         "no module: semantic error: no timer here")
        self.assertEqual(results["5.5", "kprobe"].failure,
                         "staprun exit 1: Unable to send relocation: Invalid argument")
        self.assertEqual(found.summary(), "4/10 run")
        self.assertIn("version 4.8", found.translator)
        # The workload and its program go with the probes that need them.
        kprobe = next(job for staprun, job in runner.jobs if job.module.name == "stap_kprobe_1.ko")
        self.assertEqual((kprobe.command, kprobe.files), (PROBES[1].command, ("/usr/bin/busybox",)))
