"""Driving qemu from the reactor, with a fake reactor and fake processes:
the command line, the safety-net timeout, and KVM's fallback to TCG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from stapsrv.vm.console import Outcome
from stapsrv.vm.runner import VmRunner, VmSettings, qemu_command

RAN = (b"@@stapsrv-vm init@@\n@@stapsrv-vm output@@\nhi\n\n@@stapsrv-vm errors@@\n"
       b"\n@@stapsrv-vm exit 0@@\n")


class FakeProcess:
    def __init__(self, protocol: ProcessProtocol, argv: list[str]) -> None:
        self.protocol = protocol
        self.argv = argv
        self.signals: list[str] = []
        self.ended = False

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def closeStdin(self) -> None:
        pass

    def say(self, data: bytes) -> None:
        self.protocol.outReceived(data)

    def end(self, code: int = 0) -> None:
        self.ended = True
        self.protocol.processEnded(Failure(ProcessTerminated(code)))


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []

    def spawnProcess(self, protocol: ProcessProtocol, executable: str, args: list[str],
                     env: Any = None, **rest: Any) -> FakeProcess:
        process = FakeProcess(protocol, list(args))
        self.processes.append(process)
        protocol.makeConnection(process)  # type: ignore[arg-type]
        return process


class RunnerTests(TestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.kernel = Path("/k/vmlinuz-6.1.0-1-amd64")
        self.initrd = Path("/k/initrd.gz")

    def boot(self, settings: VmSettings) -> tuple[VmRunner, Deferred[Outcome]]:
        runner = VmRunner(self.reactor, settings)  # type: ignore[arg-type]
        return runner, Deferred.fromCoroutine(runner.boot(self.kernel, self.initrd))

    def test_command_line(self) -> None:
        argv = qemu_command(VmSettings(), self.kernel, self.initrd, "tcg")
        self.assertEqual(argv[:4], ["/usr/bin/setpriv", "--pdeathsig", "KILL", "--"])
        argv = argv[4:]
        self.assertEqual(argv[:5], ["/usr/bin/qemu-system-x86_64", "-accel", "tcg", "-cpu", "max"])
        for pair in (["-kernel", str(self.kernel)], ["-initrd", str(self.initrd)],
                     ["-serial", "stdio"]):
            index = argv.index(pair[0])
            self.assertEqual(argv[index:index + 2], pair)
        self.assertIn("-no-reboot", argv)
        self.assertIn("panic=-1", argv[argv.index("-append") + 1])
        self.assertEqual(qemu_command(VmSettings(), self.kernel, self.initrd, "kvm")[6:9],
                         ["kvm", "-cpu", "host"])

    def test_arm64_command_line(self) -> None:
        settings = VmSettings().for_arm64()
        self.assertFalse(settings.kvm)
        argv = qemu_command(settings, self.kernel, self.initrd, "tcg")[4:]
        self.assertEqual(argv[:7], ["/usr/bin/qemu-system-aarch64", "-accel", "tcg", "-M",
                                    "virt", "-cpu", "cortex-a57"])
        append = argv[argv.index("-append") + 1]
        self.assertIn("console=ttyAMA0", append)
        self.assertNotIn("ttyS0", append)

    def test_gunzip_takes_the_first_member(self) -> None:
        import gzip

        from stapsrv.vm.runner import gunzip, gzipped
        base = Path(self.mktemp())
        base.mkdir()
        source, target = base / "vmlinuz", base / "Image"
        source.write_bytes(gzip.compress(b"MZ image" * 1000) + b"trailing")
        self.assertTrue(gzipped(source))
        gunzip(source, target)
        self.assertEqual(target.read_bytes(), b"MZ image" * 1000)
        self.assertFalse(gzipped(target))
        with self.assertRaises(ValueError):
            gunzip(source, target, limit=100)

    def test_tcg_run(self) -> None:
        runner, done = self.boot(VmSettings(kvm=False))
        [process] = self.reactor.processes
        self.assertIn("tcg", process.argv)
        process.say(RAN[:20])
        process.say(RAN[20:])
        process.end()
        outcome = self.successResultOf(done)
        self.assertEqual((outcome.output, outcome.status, outcome.timed_out,
                          outcome.accelerator), ("hi\n", 0, False, "tcg"))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_timeout_kills_qemu(self) -> None:
        runner, done = self.boot(VmSettings(kvm=False, timeout=100))
        [process] = self.reactor.processes
        process.say(b"@@stapsrv-vm init@@\n")
        self.reactor.advance(99)
        self.assertEqual(process.signals, [])
        self.reactor.advance(1)
        self.assertEqual(process.signals, ["KILL"])
        process.end(137)
        outcome = self.successResultOf(done)
        self.assertEqual((outcome.booted, outcome.status, outcome.timed_out),
                         (True, None, True))

    def test_kvm_that_never_reaches_init_falls_back_to_tcg(self) -> None:
        device = Path(self.mktemp())
        device.write_bytes(b"")
        runner, done = self.boot(VmSettings(kvm_device=str(device), kvm_grace=30))
        [kvm] = self.reactor.processes
        self.assertIn("kvm", kvm.argv)
        self.reactor.advance(30)
        self.assertEqual(kvm.signals, ["KILL"])
        kvm.end(137)
        [_, tcg] = self.reactor.processes
        self.assertIn("tcg", tcg.argv)
        tcg.say(RAN)
        tcg.end()
        outcome = self.successResultOf(done)
        self.assertEqual((outcome.status, outcome.accelerator, outcome.timed_out),
                         (0, "tcg", False))
        self.assertIs(runner.kvm_works, False)
        # From then on, TCG at once.
        Deferred.fromCoroutine(runner.boot(self.kernel, self.initrd))
        self.assertIn("tcg", self.reactor.processes[-1].argv)

    def test_working_kvm_is_kept(self) -> None:
        device = Path(self.mktemp())
        device.write_bytes(b"")
        runner, done = self.boot(VmSettings(kvm_device=str(device), kvm_grace=30))
        [kvm] = self.reactor.processes
        kvm.say(RAN)
        self.reactor.advance(30)
        self.assertEqual(kvm.signals, [])
        kvm.end()
        outcome = self.successResultOf(done)
        self.assertEqual((outcome.status, outcome.accelerator), (0, "kvm"))
        self.assertIs(runner.kvm_works, True)
