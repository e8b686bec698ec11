"""Modules that run: what the real clients get from stapsrv, loaded with
each client's own staprun on the release's real kernel, booted in a VM
(:mod:`tests.helpers.vm`)."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.kernel.sysroots import host_distribution
from stapsrv.vm.initramfs import MARK, USER
from tests.helpers.realclient import RealClientMixin
from tests.helpers.realserver import (
    CLIENT_55,
    STAP_SERVERD_55,
    Client,
    ServerProcess,
    remove_tree,
    shared_server,
    start_stap_serverd,
)
from tests.helpers.staprun import MODULE_ALTERED, MODULE_OK
from tests.helpers.toolchains import toolchain_server
from tests.helpers.vm import VmRun, require_vm, run_in_vm, trusted_signers

#: Probe kinds, each printing one known line and ending.
BEGIN = 'probe begin { println("stapsrv-begin"); exit() }'
KPROBE = 'probe kprobe.function("vfs_read") { println("stapsrv-kprobe"); exit() }'
SYSCALL = 'probe nd_syscall.openat { println("stapsrv-syscall"); exit() }'
TIMER = 'probe timer.ms(100) { println("stapsrv-timer"); exit() }'
PROCESS = 'probe process("/usr/bin/busybox").begin { println("stapsrv-process"); exit() }'
#: A program the probes can watch: it opens and reads a file, printing nothing.
WORKLOAD = "/usr/bin/busybox grep -q Linux /proc/version"
#: A function of a library the client machine has: the translator finds it
#: in the library's symbols, and the module probes it at that offset in the
#: file with that build-id.  It prints once, whoever calls malloc first.
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
MALLOC = (f'global seen; probe process("{LIBC}").function("malloc") '
          '{ if (seen++ == 0) println("stapsrv-malloc"); exit() }')
#: A dynamically linked program of the client machine: it calls malloc
#: (opendir) and prints nothing (/root is empty in the VM).
LIBRARY_WORKLOAD = "/usr/bin/ls /root"


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

    async def test_process_function_of_a_library(self) -> None:
        await self.runs(MALLOC, "stapsrv-malloc", command=LIBRARY_WORKLOAD,
                        files=("/usr/bin/ls",))


class ModulesRun55(ModulesRun):
    """The 5.5 client's modules, built by the forky toolchain's translator
    (SystemTap 5.6: a server with that toolchain answers 5.x clients with
    it), loaded with 5.5's own staprun.  (Built by the host's 4.8
    translator, 5.5's staprun stopped with 'Unable to send relocation:
    Invalid argument': the transports differ.)  Its user-space probes are
    resolved against the host's files, given to forky's translator as its
    ``--sysroot``: ``process(LIBC).function("malloc")`` fires (resolved in
    forky's own libc instead, the module's probe was refused in the VM:
    'Build-id mismatch ... task_finder mmap inode-uprobes callback ...
    failed'), and ``process("/usr/bin/busybox").begin`` runs.  (That probe
    needs nothing of the file from the translator: forky's translator
    without the sysroot and without the server's System.map made one that
    fires too.  It fails to register when the VM lacks the file it names,
    'Couldn't resolve target program file path '/usr/bin/busybox': -2': the
    VM's own busybox is at /stapsrv/busybox; ``files`` puts the machine's
    there.)"""

    kind = CLIENT_55

    async def module(self, script: str, *options: str,
                     server: ServerProcess | None = None) -> tuple[Client, Path]:
        server = server or toolchain_server()
        found = await super().module(script, *options, server=server)
        self.assertIn("Toolchain forky (SystemTap 5.", answered_by(server))
        # Its user-space probes were resolved against the host's files
        # (the client's distribution's), not forky's.
        self.assertIn(f"User-space probes resolve against host ({host_distribution()})",
                      server.log().rsplit(") answers ", 1)[-1])
        return found


class Modules48WithToolchains(ModulesRun):
    """The 4.8 client, unchanged on a server that has the forky toolchain:
    the host's 4.8 translator still answers it, and its modules run under
    4.8's staprun."""

    async def module(self, script: str, *options: str,
                     server: ServerProcess | None = None) -> tuple[Client, Path]:
        server = server or toolchain_server()
        found = await super().module(script, *options, server=server)
        self.assertIn("Toolchain host (SystemTap 4.8) answers", answered_by(server))
        return found


def answered_by(server: ServerProcess) -> str:
    """The server's last log line naming the toolchain of a request."""
    lines = [line for line in server.log().splitlines() if ") answers " in line]
    return lines[-1] if lines else ""


class Reference55(RealClientMixin, TestCase):
    """What the 5.5 client's modules need: built by 5.5's own translator
    (the original stap-serverd 5.5), a module runs under 5.5's staprun on
    the same kernel (as stapsrv's answers to 5.5 clients with the forky
    toolchain do: ModulesRun55)."""

    kind = CLIENT_55

    def setUp(self) -> None:
        super().setUp()
        require_vm()

    async def test_a_module_built_by_the_55_translator_runs(self) -> None:
        server = start_stap_serverd(program=STAP_SERVERD_55, name="serverd55")
        self.addCleanup(remove_tree, server.base)
        self.addCleanup(server.stop)
        client = await self.trusted_client(server)
        out, err, code = await client.stap(f"--use-server={server.spec}", "-r", self.release,
                                           "-p4", "-e", BEGIN)
        self.assertEqual(code, 0, err.decode())
        module = next(client.cwd.glob("*.ko"))
        found = await run_in_vm(module, self.release, self.kind)
        self.assertEqual((found.status, found.output), (0, "stapsrv-begin\n"),
                         f"{found.summary}\n{found.console}")


class SignerDatabaseUnreadable(AssertionError):
    """staprun, setuid root and run by a user of group stapusr, cannot open
    the signer database: 'Error initializing NSS ... SEC_ERROR_READ_ONLY'.
    NSS opens it for writing and first asks access(2), which answers for the
    real user: cert9.db is not writable by that user (nor may it be), so NSS
    refuses.  Root's staprun opens the same database.  4.8's and 5.5's
    staprun alike (seen with strace on the host as well as in the VM)."""


NSS_READ_ONLY = "SEC_ERROR_READ_ONLY"
UNPRIVILEGED_TODO = ((SignerDatabaseUnreadable,),
                     "staprun run by a stapusr/stapsys user cannot open the signer "
                     "database on bookworm: 'Error initializing NSS for "
                     "sql:/etc/systemtap/staprun (-8126 SEC_ERROR_READ_ONLY)' (NSS wants "
                     "it writable by the real user); root's staprun opens it")


class UnprivilegedModulesRun(RealClientMixin, TestCase):
    """A ``--privilege=stapusr`` module, run as users run it: by a user of
    group stapusr, with staprun checking its signature against the server
    certificate the client machine trusts as a signer."""

    privilege = "stapusr"

    def setUp(self) -> None:
        super().setUp()
        require_vm()

    async def signed_module(self) -> tuple[Path, Path]:
        server = shared_server()
        client = await self.trusted_client(server)
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-r", self.release, "-p4",
            f"--privilege={self.privilege}",
            "-e", 'probe begin { println("stapsrv-unprivileged"); exit() }')
        self.assertEqual(code, 0, err.decode())
        modules = [client.cwd / name for name in client.modules() if name.endswith(".ko")]
        self.assertEqual(len(modules), 1, client.modules())
        self.assertTrue(modules[0].with_name(modules[0].name + ".sgn").exists())
        return modules[0], await trusted_signers(client, server.spec)

    async def as_member(self, module: Path, signers: Path | None) -> VmRun:
        found = await run_in_vm(module, self.release, self.kind, group=self.privilege,
                                signers=signers, options=("-vv",))
        self.assertIn(f"{MARK} run {USER}@@", found.console)
        if NSS_READ_ONLY in found.errors:
            raise SignerDatabaseUnreadable(found.summary)
        return found

    async def test_signed_module_runs_as_a_user_of_the_group(self) -> None:
        module, signers = await self.signed_module()
        found = await self.as_member(module, signers)
        self.assertIn(f"verify_module returns {MODULE_OK}", found.errors)
        self.assertEqual((found.status, found.output), (0, "stapsrv-unprivileged\n"),
                         f"{found.summary}\n{found.console}")

    test_signed_module_runs_as_a_user_of_the_group.todo = UNPRIVILEGED_TODO  # type: ignore[attr-defined]

    async def test_module_altered_by_one_byte_is_refused(self) -> None:
        module, signers = await self.signed_module()
        alter(module)
        found = await self.as_member(module, signers)
        self.assertIn(f"verify_module returns {MODULE_ALTERED}", found.errors)
        self.assertNotEqual(found.status, 0, found.console)
        self.assertEqual(found.output, "")

    test_module_altered_by_one_byte_is_refused.todo = UNPRIVILEGED_TODO  # type: ignore[attr-defined]

    async def test_signature_is_checked_against_the_trusted_server(self) -> None:
        """Root's staprun in the VM finds the signature good, and that of the
        module altered by one byte altered (root loads modules either way)."""
        module, signers = await self.signed_module()
        found = await run_in_vm(module, self.release, self.kind, signers=signers,
                                options=("-vv",))
        self.assertIn(f"verify_module returns {MODULE_OK}", found.errors, found.console)
        self.assertEqual((found.status, found.output), (0, "stapsrv-unprivileged\n"))
        alter(module)
        found = await run_in_vm(module, self.release, self.kind, signers=signers,
                                options=("-vv",))
        self.assertIn(f"verify_module returns {MODULE_ALTERED}", found.errors, found.console)

    async def test_a_user_without_trust_is_refused(self) -> None:
        module, _ = await self.signed_module()
        found = await run_in_vm(module, self.release, self.kind, group=self.privilege)
        self.assertIn(f"{MARK} run {USER}@@", found.console)
        self.assertNotEqual(found.status, 0, found.console)
        self.assertEqual(found.output, "")
        self.assertIn("Unable to verify the signature", found.errors)


class StapsysModulesRun(UnprivilegedModulesRun):
    """The same with a ``--privilege=stapsys`` module and a user of group
    stapsys."""

    privilege = "stapsys"


def alter(module: Path) -> None:
    """Flip one bit of one byte in the middle of ``module``."""
    data = bytearray(module.read_bytes())
    data[len(data) // 2] ^= 0x01
    module.write_bytes(bytes(data))
