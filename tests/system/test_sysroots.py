"""User-space roots for real: the trixie root made by the admin command
(its manifest agrees with dpkg), listed; a server with the forky toolchain
and that root answers the 5.5 client's ``process(libc).function("malloc")``
request for trixie's newest kernel (picked from the archive at run time)
with a module that carries the build-id of trixie's C library, not the
host's nor forky's (the translator read the root of the release's
distribution), and that fires on trixie's kernel in the VM, where
trixie's staprun (5.1, from the root) loads it and trixie's ``ls`` calls
malloc.  (bookworm's case: tests.system.test_vm, ModulesRun55.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.cli.roots import installed
from stapsrv.kernel.sysroots import sysroots_directory
from stapsrv.kernel.toolchains import toolchains_directory
from tests.helpers import require_program, sysroots, trixieclient
from tests.helpers import toolchains as forky_helper
from tests.helpers.realclient import RealClientMixin
from tests.helpers.realserver import (
    CLIENT_55,
    Client,
    ServerProcess,
    as_server_user,
    owned_directory,
    remove_tree,
    scratch_directory,
    server_environment,
    venv_bin,
)
from tests.helpers.waiting import poll
from tests.system.test_suites import newest
from tests.helpers.vm import require_vm, run_in_vm
from tests.system.test_vm import LIBC, LIBRARY_WORKLOAD, MALLOC

TRIXIE_SUITES = "trixie,trixie-security,trixie-updates"


def build_id(path: Path) -> bytes:
    """The GNU build-id of an ELF file (readelf -n)."""
    done = subprocess.run([require_program("readelf"), "-n", str(path)], capture_output=True,
                          text=True, check=True)
    found = re.search(r"Build ID: ([0-9a-f]+)", done.stdout)
    assert found is not None, done.stdout
    return bytes.fromhex(found.group(1))


class AdminCommandTests(TestCase):
    timeout = 3600

    def test_made_and_listed(self) -> None:
        trixie = sysroots.trixie()
        versions = dict(trixie.packages)
        self.assertEqual(versions, installed(trixie.root))
        self.assertEqual(trixie.suite, "trixie")
        self.assertNotEqual(build_id(trixie.root / LIBC.lstrip("/")), build_id(Path(LIBC)))
        store = trixie.root.parent.parent.parent
        done = subprocess.run(
            as_server_user([venv_bin("python"), "-m", "stapsrv.cli.sysroots", "--store",
                            str(store), "list"]),
            capture_output=True, text=True, timeout=120, cwd="/",
            env=server_environment(scratch_directory("list-"), "stapsrv"))
        self.assertEqual(done.returncode, 0, done.stderr)
        line = next(line for line in done.stdout.splitlines() if line.startswith("trixie\t"))
        self.assertIn(f"libc6 {versions['libc6']}\t", line)
        self.assertIn("suite trixie, made ", line)
        if sysroots.made_in is not None:
            print(f"\ntrixie root made in {sysroots.made_in:.0f} s")


class TrixieClientTests(RealClientMixin, TestCase):
    """The 5.5 client on trixie's newest kernel, through the forky toolchain."""

    kind = CLIENT_55

    def setUp(self) -> None:
        super().setUp()
        require_vm()

    def store(self) -> Path:
        forky, trixie = forky_helper.forky(), sysroots.trixie()
        store = owned_directory(scratch_directory("sysroot-store-") / "kernels")
        self.addCleanup(remove_tree, store.parent)
        (owned_directory(toolchains_directory(store)) / "forky").symlink_to(forky.root.parent)
        (owned_directory(sysroots_directory(store)) / "trixie").symlink_to(trixie.root.parent)
        return store

    async def test_malloc_resolved_in_the_trixie_root(self) -> None:
        store = self.store()
        server = self.own_server("--kernel-store", str(store), "--no-avahi",
                                 "--fetch-suites", TRIXIE_SUITES)
        self.assertTrue(await poll(
            lambda: "Kernel store: fetching releases matching" in server.log(), 300.0),
            server.log())
        self.assertIn("User-space root trixie (suite trixie): ", server.log())
        release = newest(store, r"\d+\.\d+\.\d+\+deb13(\.\d+)?-amd64",
                         tuple(TRIXIE_SUITES.split(",")))
        client = await self.trusted_client(server)
        out, err, code = await client.stap(f"--use-server={server.spec}", "-r", release,
                                           "-p4", "-e", MALLOC)
        self.assertEqual(code, 0, err.decode())
        log = server.log()
        self.assertIn("Toolchain forky (SystemTap 5.", log)
        self.assertIn("User-space probes resolve against root trixie ", log)
        modules = [client.cwd / name for name in client.modules() if name.endswith(".ko")]
        self.assertEqual(len(modules), 1, client.modules())
        module = modules[0].read_bytes()
        trixie = sysroots.trixie()
        forky = forky_helper.forky()
        self.assertIn(build_id(trixie.root / LIBC.lstrip("/")), module)
        self.assertNotIn(build_id(Path(LIBC)), module)
        self.assertNotIn(build_id(forky.root / LIBC.lstrip("/")), module)
        # On trixie's kernel, in a VM with trixie's staprun and ls and their
        # C library (the root's), the probe fires.
        found = await run_in_vm(modules[0], release, self.kind, root=trixie.root,
                                suites=TRIXIE_SUITES, command=LIBRARY_WORKLOAD,
                                files=("/usr/bin/ls",))
        self.assertEqual((found.status, found.output), (0, "stapsrv-malloc\n"),
                         f"{found.summary}\n{found.console}")


class TrixieOwnClientTests(TrixieClientTests):
    """The same, asked by trixie's own client (stap 5.1 from a trixie root,
    trusting the server through ``python -m stapsrv.cli.clienttrust``):
    its ``process(libc).function("malloc")`` fires on trixie's kernel."""

    def setUp(self) -> None:
        super().setUp()
        self.kind = trixieclient.trixie_client()

    async def trusted_client(self, server: ServerProcess) -> Client:
        client = self.new_client()
        into = subprocess.run(
            [venv_bin("python"), "-m", "stapsrv.cli.clienttrust", "--ssl",
             str(server.base / "ssl"), "--into", str(client.systemtap_dir / "ssl" / "client")],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(into.returncode, 0, into.stderr)
        return client
