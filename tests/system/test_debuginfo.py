"""Symbols and debuginfo fetched for a served release (``--fetch-debuginfo``,
with the real client and the real archive): no symbol-table warning,
user-space return probes and DWARF kernel probes compile (and the kernel
probes run on the release's kernel in a VM, reading their $variables), and
so do probes on a module a script names, whose debuginfo is fetched then.

The -dbg package is about 860 MB to download; what the server keeps of it
(System.map and vmlinux, about 640 MB, and the modules scripts named) stays in a store kept between runs
(``STAPSRV_CI_KERNEL_STORE``, default /var/cache/stapsrv-ci/kernel-store
when the tests run as root), so only the first run downloads it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.helpers.archive_releases import older_abi_release
from tests.helpers.realclient import HELLO, RealClientMixin
from tests.helpers.realserver import (
    ServerProcess,
    kept_directory,
    remove_tree,
    scratch_directory,
    venv_bin,
)
from tests.helpers.vm import run_in_vm

SYMBOLS_WARNING = "Kernel function symbol table missing"
MALLOC_RETURN = ('probe process("/lib/x86_64-linux-gnu/libc.so.6").function("malloc").return '
                 '{ println($return); exit() }')
VFS_READ = 'probe kernel.function("vfs_read") { printf("%d\\n", $count); exit() }'
VFS_READ_FILE = 'probe kernel.function("vfs_read") { println($file->f_flags); exit() }'
#: A module the -dbg package has (one $var read), and one it has not
#: (optional here, so that the script compiles).
EXT4_OPEN = ('probe module("ext4").function("ext4_file_open") { println($filp->f_flags); exit() } '
             'probe module("stapsrv_no_such_module").function("f")? { exit() }')
EXT4_PLAIN = 'probe module("ext4").function("ext4_file_open") { println(1); exit() }'
NO_SUCH_MODULE = 'probe module("stapsrv_no_such_module").function("f") { exit() }'
MODULE_FETCH = "Fetching the debuginfo of modules"


def kept_store() -> Path:
    """The store kept between runs, owned by the server's user."""
    return kept_directory("STAPSRV_CI_KERNEL_STORE", "kernel-store")


def functions_in(system_map: Path) -> set[tuple[str, str, str]]:
    found = set()
    for line in system_map.read_text().splitlines():
        address, kind, name = line.split()[:3]
        if kind in "TtWw":
            found.add((address, kind, name))
    return found


def map_from_image(release: str, case: TestCase) -> Path:
    """The System.map stapsrv makes from ``linux-image-<release>``."""
    work = scratch_directory("image-")
    case.addCleanup(remove_tree, work)
    subprocess.run(["apt-get", "download", "-q", f"linux-image-{release}"], cwd=work,
                   check=True, capture_output=True, timeout=600)
    deb = next(work.glob("*.deb"))
    subprocess.run(f"dpkg-deb --fsys-tarfile {deb} | tar -x --occurrence=1 -C {work} "
                   f"./boot/vmlinuz-{release}", shell=True, check=True, timeout=300)
    output = work / "System.map"
    subprocess.run([venv_bin("python"), "-m", "stapsrv.kernel.kallsyms",
                    str(work / "boot" / f"vmlinuz-{release}"), str(output)],
                   check=True, capture_output=True, timeout=300)
    return output


class DebuginfoTests(RealClientMixin, TestCase):
    timeout = 1800

    def kept_store_server(self) -> tuple[Path, ServerProcess]:
        store = kept_store()
        if not os.environ.get("STAPSRV_CI_KERNEL_STORE") and os.geteuid() != 0:
            self.addCleanup(remove_tree, store)
        return store, self.own_server("--kernel-store", str(store), "--fetch-debuginfo")

    async def check_module_probes(self, store: Path, server: ServerProcess,
                                  release: str) -> None:
        """module("ext4") probes and a $var of one compile; a module the
        package lacks gets the translator's own error; each is fetched once."""
        client = await self.trusted_client(server)

        async def compile(script: str) -> tuple[str, int]:
            out, err, code = await client.stap(
                f"--use-server={server.spec}", "-r", release, "-p4", "-e", script)
            return err.decode(), code

        err, code = await compile(EXT4_OPEN)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(client.modules()), 1)
        kept = store / ".debug-modules" / release
        self.assertTrue((kept / "root" / "kernel" / "fs" / "ext4" / "ext4.ko").is_file())
        self.assertEqual(sorted(p.name for p in (kept / "root" / "kernel").iterdir()), ["fs"])
        err, code = await compile(NO_SUCH_MODULE)
        self.assertNotEqual(code, 0)
        self.assertIn("semantic error:", err)
        self.assertIn("stapsrv_no_such_module", err)
        err, code = await compile(EXT4_PLAIN)
        self.assertEqual(code, 0, err)
        # At most one fetch (none when the kept store had them already).
        self.assertLessEqual(server.log().count(MODULE_FETCH), 1)
        self.assertNotIn("No debuginfo for modules", server.log())

    async def test_module_debuginfo_of_a_stored_release(self) -> None:
        release = older_abi_release()
        store, server = self.kept_store_server()
        await self.check_module_probes(store, server, release)

    async def test_symbols_and_debuginfo_of_a_served_release(self) -> None:
        store, server = self.kept_store_server()
        client = await self.trusted_client(server)

        async def compile(script: str) -> tuple[str, int]:
            out, err, code = await client.stap(
                f"--use-server={server.spec}", "-r", self.release, "-p4", "-e", script)
            return err.decode(), code

        err, code = await compile(HELLO)
        self.assertEqual(code, 0, err)
        self.assertNotIn(SYMBOLS_WARNING, err)
        kept = store / ".debug" / self.release / "root"
        self.assertEqual(sorted(p.name for p in kept.iterdir()),
                         [f"System.map-{self.release}", f"vmlinux-{self.release}"])
        for script in (MALLOC_RETURN, VFS_READ, VFS_READ_FILE):
            before = set(client.cwd.glob("*.ko"))
            err, code = await compile(script)
            self.assertEqual(code, 0, f"{script}: {err}")
            self.assertNotIn(SYMBOLS_WARNING, err)
            if script == MALLOC_RETURN:
                continue
            # The DWARF probe runs: its $variable is read where the
            # debuginfo says it is (a number, printed once).
            [module] = set(client.cwd.glob("*.ko")) - before
            found = await run_in_vm(module, self.release, self.kind,
                                    command="/usr/bin/busybox grep -q Linux /proc/version",
                                    files=("/usr/bin/busybox",))
            self.assertEqual(found.status, 0, f"{script}: {found.summary}\n{found.console}")
            self.assertRegex(found.output, r"^[0-9]+\n$", script)
        # The map the server makes from linux-image (without -dbg) names
        # every function the real one does, at the same address.
        real = functions_in(kept / f"System.map-{self.release}")
        made = functions_in(map_from_image(self.release, self))
        self.assertGreater(len(real), 20000)
        self.assertEqual(made, real)
        await self.check_module_probes(store, server, self.release)
