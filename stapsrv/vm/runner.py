"""Booting a kernel image with an initramfs under qemu, from the reactor.

qemu runs as a child process of the reactor with the serial console on
its standard output; the run ends when the VM powers off (``/init`` does,
and a panic does with ``panic=-1 -no-reboot``) or, as a safety net, when
its time is up (qemu is killed).  KVM is used when ``/dev/kvm`` can be
opened and the VM reaches ``/init`` with it; otherwise, and from then on
for this runner, TCG.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from stapsrv.core.programs import SETPRIV
from stapsrv.reactor import IHandlerReactor
from stapsrv.vm import initramfs
from stapsrv.vm.console import Outcome, read_console
from stapsrv.vm.initramfs import MARK, Job, Staprun

#: Runs a blocking function off the reactor thread (a
#: :class:`~stapsrv.kernel.fetch.KernelFetcher`'s ``in_thread`` is one).
InThread = Callable[..., Deferred[object]]
QEMU = "/usr/bin/qemu-system-x86_64"
#: arm64 kernels: qemu's generic board and a Cortex-A57, emulated (TCG).
QEMU_ARM64 = "/usr/bin/qemu-system-aarch64"
KVM = "/dev/kvm"
#: Console text kept at most (a module printing without end is cut).
MAX_CONSOLE = 4 << 20


@frozen
class VmSettings:
    """How VMs are run: ``timeout`` bounds a whole run; with KVM, a VM that
    has not reached ``/init`` after ``kvm_grace`` seconds is taken for
    KVM not working here."""

    qemu: str = QEMU
    memory_mb: int = 1024
    timeout: float = 600.0
    kvm: bool = True
    kvm_grace: float = 60.0
    kvm_device: str = KVM
    append: str = "console=ttyS0 loglevel=1 panic=-1"
    #: The kernels' Debian architecture: ``amd64`` (the machine's own) or
    #: ``arm64`` (:meth:`for_arm64`).
    architecture: str = "amd64"

    def for_arm64(self) -> VmSettings:
        """The same limits for an arm64 kernel: qemu-system-aarch64, no
        KVM (this machine is not arm64), the PL011 console."""
        return evolve(self, qemu=QEMU_ARM64, kvm=False, architecture="arm64",
                      append=self.append.replace("console=ttyS0", "console=ttyAMA0"))


def qemu_command(settings: VmSettings, kernel: Path, initrd: Path, accelerator: str) -> list[str]:
    """qemu's command line; it gets SIGKILL if the process that ran it dies
    (a command interrupted, a server stopped), so no VM outlives its run."""
    cpu = ["-cpu", "host"] if accelerator == "kvm" else ["-cpu", "max"]
    if settings.architecture == "arm64":
        cpu = ["-M", "virt", "-cpu", "cortex-a57"]
    return [SETPRIV, "--pdeathsig", "KILL", "--", settings.qemu, "-accel", accelerator, *cpu, "-m", str(settings.memory_mb),
            "-smp", "1", "-nodefaults", "-display", "none", "-serial", "stdio",
            "-monitor", "none", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", settings.append]


class _Console(ProcessProtocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.ended: Deferred[None] = Deferred()
        self.booted: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.closeStdin()  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        if len(self.data) < MAX_CONSOLE:
            self.data += data[:MAX_CONSOLE - len(self.data)]
        if not self.booted.called and f"{MARK} init@@".encode() in self.data:
            self.booted.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.outReceived(data)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


@define(eq=False)
class VmRunner:
    """Runs VMs; remembers whether KVM works."""

    reactor: IHandlerReactor
    settings: VmSettings = VmSettings()
    log: Logger = field(factory=lambda: Logger(namespace="stapsrv.vm"))
    kvm_works: bool | None = None

    def _kvm_usable(self) -> bool:
        if not self.settings.kvm or self.kvm_works is False:
            return False
        return os.access(self.settings.kvm_device, os.R_OK | os.W_OK)

    async def boot(self, kernel: Path, initrd: Path) -> Outcome:
        """Boot ``kernel`` with ``initrd``; what its console said."""
        if self._kvm_usable():
            outcome, reached = await self._boot(kernel, initrd, "kvm", self.settings.kvm_grace)
            if reached:
                self.kvm_works = True
                return outcome
            self.kvm_works = False
            self.log.warn("KVM did not boot {kernel} here; using TCG from now on",
                          kernel=str(kernel))
        outcome, _ = await self._boot(kernel, initrd, "tcg", None)
        return outcome

    async def _boot(self, kernel: Path, initrd: Path, accelerator: str,
                    grace: float | None) -> tuple[Outcome, bool]:
        console = _Console()
        argv = qemu_command(self.settings, kernel, initrd, accelerator)
        process = self.reactor.spawnProcess(console, argv[0], argv, env={"LC_ALL": "C.UTF-8"})
        timed_out = []

        def kill(why: str) -> None:
            timed_out.append(why)
            try:
                process.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
        timers: list[IDelayedCall] = [
            self.reactor.callLater(self.settings.timeout, kill, "timeout")]
        if grace is not None:
            grace_timer = self.reactor.callLater(grace, kill, "grace")
            timers.append(grace_timer)
            console.booted.addCallback(lambda _: grace_timer.cancel()
                                       if grace_timer.active() else None)
        try:
            await console.ended
        finally:
            for timer in timers:
                if timer.active():
                    timer.cancel()
        outcome = read_console(bytes(console.data), timed_out=bool(timed_out),
                               accelerator=accelerator)
        return outcome, outcome.booted

    async def run(self, kernel: Path, staprun: Staprun, job: Job,
                  in_thread: InThread, scratch: Path | None = None,
                  busybox: str = initramfs.BUSYBOX) -> Outcome:
        """``job`` with ``staprun`` on ``kernel``: the initramfs is made in a
        private directory (in ``in_thread``: file work blocks); ``busybox``
        is its shell (the kernel's architecture's)."""
        work = Path(tempfile.mkdtemp(prefix="stapsrv-vm-", dir=scratch))
        try:
            initrd = work / "initrd.gz"
            await in_thread(initramfs.write, staprun, job, initrd, busybox)
            if self.settings.architecture == "arm64" and await in_thread(gzipped, kernel):
                # qemu boots an arm64 Image, not a gzip'd one.
                image = work / "Image"
                await in_thread(gunzip, kernel, image)
                kernel = image
            started = self.reactor.seconds()
            outcome = await self.boot(kernel, initrd)
            self.log.info("Ran {module} with {staprun} on {kernel} ({accelerator}, "
                          "{seconds:.1f} s): {summary}", module=job.module.name,
                          staprun=staprun.describe(), kernel=kernel.name,
                          accelerator=outcome.accelerator, summary=outcome.summary(),
                          seconds=self.reactor.seconds() - started)
            return outcome
        finally:
            await in_thread(shutil.rmtree, work, True)


def gzipped(path: Path) -> bool:
    with path.open("rb") as stream:
        return stream.read(2) == b"\x1f\x8b"


def gunzip(source: Path, target: Path, limit: int = 256 << 20) -> None:
    """The first gzip member of ``source`` decompressed into ``target``
    (what follows it, as in Debian's arm64 vmlinuz, is left), at most
    ``limit`` bytes (blocking)."""
    inflate = zlib.decompressobj(wbits=31)
    written = 0
    with source.open("rb") as stream, target.open("wb") as out:
        while not inflate.eof and (chunk := stream.read(1 << 20)):
            data = inflate.decompress(chunk, limit + 1 - written)
            written += len(data)
            if written > limit or inflate.unconsumed_tail:
                raise ValueError(f"{source} decompresses to more than {limit >> 20} MiB")
            out.write(data)
