"""Modules that run: what the real clients get from stapsrv, loaded with
each client's own staprun on the release's real kernel, booted in a VM
(:mod:`tests.helpers.vm`)."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.helpers.realclient import RealClientMixin
from tests.helpers.realserver import CLIENT_55, Client, ServerProcess, shared_server
from tests.helpers.vm import VmRun, require_vm, run_in_vm

#: Probe kinds, each printing one known line and ending.
BEGIN = 'probe begin { println("stapsrv-begin"); exit() }'
KPROBE = 'probe kprobe.function("vfs_read") { println("stapsrv-kprobe"); exit() }'
SYSCALL = 'probe nd_syscall.openat { println("stapsrv-syscall"); exit() }'
TIMER = 'probe timer.ms(100) { println("stapsrv-timer"); exit() }'
PROCESS = 'probe process("/usr/bin/busybox").begin { println("stapsrv-process"); exit() }'
#: A program the probes can watch: it opens and reads a file, printing nothing.
WORKLOAD = "/usr/bin/busybox grep -q Linux /proc/version"


class ModulesRun(RealClientMixin, TestCase):
    """The 4.8 client's modules on the installed release."""

    def setUp(self) -> None:
        super().setUp()
        require_vm()

    async def module(self, script: str, *options: str,
                     server: ServerProcess | None = None) -> tuple[Client, Path]:
        server = server or shared_server()
        client = await self.trusted_client(server)
        out, err, code = await client.stap(f"--use-server={server.spec}", "-r", self.release,
                                           "-p4", *options, "-e", script)
        self.assertEqual(code, 0, err.decode())
        modules = [name for name in client.modules() if name.endswith(".ko")]
        self.assertEqual(len(modules), 1, client.modules())
        return client, client.cwd / modules[0]

    async def runs(self, script: str, expected: str, **how: object) -> VmRun:
        _, module = await self.module(script)
        found = await run_in_vm(module, self.release, self.kind, **how)  # type: ignore[arg-type]
        self.assertEqual((found.status, found.output), (0, expected + "\n"),
                         f"{found.summary}\n{found.console}")
        return found

    async def test_begin(self) -> None:
        await self.runs(BEGIN, "stapsrv-begin")

    async def test_kprobe_through_the_servers_system_map(self) -> None:
        await self.runs(KPROBE, "stapsrv-kprobe", command=WORKLOAD, files=("/usr/bin/busybox",))

    async def test_syscall(self) -> None:
        await self.runs(SYSCALL, "stapsrv-syscall", command=WORKLOAD, files=("/usr/bin/busybox",))

    async def test_timer(self) -> None:
        await self.runs(TIMER, "stapsrv-timer")

    async def test_process_begin(self) -> None:
        await self.runs(PROCESS, "stapsrv-process", command=WORKLOAD, files=("/usr/bin/busybox",))


class TransportMismatch(AssertionError):
    """The module does not run because its staprun speaks another transport
    than the translator that built it (the known failure of the 5.5 client)."""


RELOCATION = "Unable to send relocation"


class ModulesRun55(ModulesRun):
    """The 5.5 client's modules (built by stapsrv's 4.8 translator), loaded
    with 5.5's own staprun.  They do not run today: 5.5's staprun stops with
    'Unable to send relocation: Invalid argument'.  Any other failure is a
    real one; a success is an unexpected one (the toolchain issue that makes
    them run removes the ``todo``)."""

    kind = CLIENT_55
    todo = ((TransportMismatch,),
            "a 4.8-built module under 5.5's staprun: 'Unable to send relocation' "
            "(the transports differ; the toolchain issue after #25)")

    async def runs(self, script: str, expected: str, **how: object) -> VmRun:
        _, module = await self.module(script)
        found = await run_in_vm(module, self.release, self.kind, **how)  # type: ignore[arg-type]
        if found.status != 0 and RELOCATION in found.errors:
            raise TransportMismatch(f"{found.summary}")
        self.assertEqual((found.status, found.output), (0, expected + "\n"),
                         f"{found.summary}\n{found.console}")
        return found
