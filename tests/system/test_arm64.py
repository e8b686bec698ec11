"""arm64 kernels served from this amd64 server (issue 30), with the real
4.8 client and the real archive: the newest bookworm arm64 release, picked
from the arm64 lists at run time, is fetched through the kernel store's
arm64 apt (its headers; the machine's amd64 linux-kbuild of the same
version builds it), and ``stap -a arm64 -r <release>`` gets an AArch64
module, cross-built with gcc-aarch64-linux-gnu.  A server that does not
build for arm64 refuses the same request clearly.  The 5.5 client's arm64
modules come from the forky toolchain, for the newest bookworm and the
newest trixie arm64 releases (``--fetch-suites`` trixie's, the cross
compiler of the headers' own gcc version), and run under trixie's arm64
staprun.

The kernel store is kept between runs (``STAPSRV_CI_ARM64_STORE``, default
``/var/cache/stapsrv-ci/arm64-store`` as root); nothing depends on what it
already holds."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from stapsrv.kernel.privateapt import APT_DIRECTORY
from tests.helpers import require_program
from tests.helpers.realclient import RealClientMixin
from stapsrv.vm import verification
from stapsrv.vm.verify import PROBES
from tests.helpers.realserver import (
    ServerProcess,
    as_server_user,
    kept_directory,
    server_environment,
    venv_bin,
)
from tests.helpers.vm import run_in_vm, trusted_signers, vm_store
from tests.helpers.waiting import poll
from tests.system.test_vm import MODULE_OK

#: ELF e_machine of AArch64.
EM_AARCH64 = 183
TRIXIE_SUITES = "trixie,trixie-security,trixie-updates"
_ABI = re.compile(r"6\.1\.0-(\d+)-arm64")


def arm64_store() -> Path:
    return kept_directory("STAPSRV_CI_ARM64_STORE", "arm64-store")


def newest_arm64(store: Path) -> str:
    """The newest plain arm64 6.1 (bookworm) release in the store's arm64 lists."""
    result = subprocess.run(
        as_server_user(["apt-cache", "-c", str(store / f"{APT_DIRECTORY}-arm64" / "apt.conf"),
                        "pkgnames", "linux-headers-6.1.0-"]),
        capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
    assert result.returncode == 0, result.stderr
    found = [int(match.group(1)) for name in result.stdout.split()
             if (match := _ABI.fullmatch(name[len("linux-headers-"):])) is not None]
    assert found, result.stdout
    return f"6.1.0-{max(found)}-arm64"


def elf_machine(module: Path) -> int:
    header = module.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", header
    return int.from_bytes(header[18:20], "little")


class Arm64Tests(RealClientMixin, TestCase):
    def setUp(self) -> None:
        super().setUp()
        require_program("aarch64-linux-gnu-gcc")

    async def arm64_server(self, store: Path | None = None, *options: str
                           ) -> tuple[Path, ServerProcess, str]:
        """A server building for arm64 on ``store`` (the shared arm64 store;
        ``options``: more of its options), once the arm64 lists are
        updated and their series joined its policy; the newest bookworm
        arm64 release they name (when they name one)."""
        store = store or arm64_store()
        server = self.own_server("--kernel-store", str(store), "--no-avahi",
                                 "--fetch-architectures", "arm64", *options)
        self.assertTrue(await poll(
            lambda: "-arm64" in "".join(line for line in server.log().splitlines()
                                        if "Kernel store: fetching releases matching" in line),
            600.0), server.log())
        return store, server, "" if options else newest_arm64(store)

    async def test_an_arm64_module_from_the_newest_bookworm_arm64_release(self) -> None:
        store, server, release = await self.arm64_server()
        client = await self.trusted_client(server)
        started = time.monotonic()
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-a", "arm64", "-r", release, "-p4", "-m",
            "hello_arm64", "-e", 'probe begin { println("hello from arm64"); exit() }')
        seconds = time.monotonic() - started
        self.assertEqual(code, 0, err.decode() + server.log()[-4000:])
        self.assertEqual(client.modules(), ["hello_arm64.ko"])
        self.assertEqual(elf_machine(client.cwd / "hello_arm64.ko"), EM_AARCH64)
        log = server.log()
        self.assertIn("Kernel store: fetching arm64 releases from the suites", log)
        if f"Fetching kernel {release}" in log:
            self.assertRegex(log, rf"Fetching kernel {re.escape(release)}: "
                             rf"linux-headers-{re.escape(release)} .*linux-kbuild-6\.1 ")
        tree = store / release / "root" / "usr" / "src" / f"linux-headers-{release}"
        self.assertIn("CONFIG_ARM64=y", (tree / ".config").read_text())
        fetched = re.search(rf"Fetched kernel {re.escape(release)} in [0-9.]+ s", log)
        print(f"\n{release}: first arm64 request answered in {seconds:.1f} s"
              + (f" ({fetched.group(0)})" if fetched else " (stored before)"))
        # The same script for the same release again: from the cache.
        again = await client.stap(
            f"--use-server={server.spec}", "-a", "arm64", "-r", release, "-p4", "-m",
            "hello_arm64", "-e", 'probe begin { println("hello from arm64"); exit() }')
        self.assertEqual(again[2], 0, again[1].decode())
        # Its System.map, read from the gzip'd arm64 Image's kallsyms (the
        # relative base from the Image's relocations), made in the background.
        system_map = store / ".debug" / release / "root" / f"System.map-{release}"
        self.assertTrue(await poll(system_map.exists, 600.0), server.log()[-4000:])
        self.assertRegex(system_map.read_text(encoding="latin-1"),
                         r"\nffff8[0-9a-f]{11} T _stext\n")
        # The module runs on that kernel, booted in qemu-system-aarch64,
        # under Debian's arm64 staprun (4.8, the client's family).
        started = time.monotonic()
        found = await run_in_vm(client.cwd / "hello_arm64.ko", release, self.kind)
        self.assertEqual((found.status, found.output), (0, "hello from arm64\n"),
                         f"{found.summary}\n{found.console}")
        print(f"{release}: ran in the arm64 VM ({found.accelerator}) in "
              f"{time.monotonic() - started:.1f} s")
        # A kprobe on the arm64 kernel's vfs_read.
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-a", "arm64", "-r", release, "-p4", "-m",
            "kprobe_arm64", "-e", 'global hits probe kprobe.function("vfs_read") '
            '{ if (!hits++) { println("vfs_read hit"); exit() } }')
        self.assertEqual(code, 0, err.decode())
        found = await run_in_vm(client.cwd / "kprobe_arm64.ko", release, self.kind)
        self.assertEqual((found.status, found.output), (0, "vfs_read hit\n"),
                         f"{found.summary}\n{found.console}")
        # A --privilege=stapusr module: signed by the server, and the arm64
        # staprun in the VM finds the signature good against the server's
        # certificate as the client machine trusts it.
        before = set(client.modules())
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-a", "arm64", "-r", release, "-p4",
            "--privilege=stapusr", "-e",
            'probe begin { println("unprivileged arm64"); exit() }')
        self.assertEqual(code, 0, err.decode())
        [signed] = [name for name in set(client.modules()) - before if name.endswith(".ko")]
        self.assertTrue((client.cwd / f"{signed}.sgn").exists(), client.modules())
        self.assertEqual(elf_machine(client.cwd / signed), EM_AARCH64)
        found = await run_in_vm(client.cwd / signed, release, self.kind,
                                signers=await trusted_signers(client, server.spec),
                                options=("-vv",))
        self.assertIn(f"verify_module returns {MODULE_OK}", found.errors, found.console)
        self.assertEqual((found.status, found.output), (0, "unprivileged arm64\n"),
                         f"{found.summary}\n{found.console}")
        # -a and sysinfo must agree: an arm64 kernel without -a is refused.
        out, err, code = await client.stap(f"--use-server={server.spec}", "-r", release,
                                           "-p4", "-e", "probe begin { exit() }")
        self.assertNotEqual(code, 0)
        self.assertIn(f"Server: Kernel release '{release}' is an arm64 kernel but the request "
                      "is for architecture 'x86_64'; give stap -a arm64 for it.", err.decode())
        self.assertNotIn("Traceback", server.log())

    async def test_kernels_verify_an_arm64_release(self) -> None:
        store, server, release = await self.arm64_server()
        self.addCleanup(verification.remove, vm_store(), release)
        argv = [venv_bin("python"), "-m", "stapsrv.cli.kernels", "--store", str(vm_store()),
                "verify", release, "--server", server.spec, "--json"]
        done = await deferToThread(
            subprocess.run, as_server_user(argv), capture_output=True, text=True,
            timeout=3600, cwd="/", env=server_environment(vm_store().parent, "stapsrv"))
        found = json.loads(done.stdout or "{}")
        results = {result["probe"]: result for result in found.get("results", [])}
        self.assertEqual(sorted(results), sorted(probe.name for probe in PROBES
                                                 if probe.name != "process"),
                         done.stderr[-3000:])
        for probe, result in results.items():
            self.assertTrue(result["runs"], result)
        self.assertTrue(found["passed"])
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])

    async def test_a_5x_client_module_for_arm64_runs_under_a_5x_staprun(self) -> None:
        """The 5.5 client's arm64 module, built by the forky toolchain's
        5.6 translator with its aarch64-linux-gnu-gcc-12, runs in the arm64
        VM under Debian's arm64 staprun of the 5.x family (trixie's)."""
        from tests.helpers.realserver import CLIENT_55
        from tests.helpers.toolchains import forky_store
        CLIENT_55.require()
        self.kind = CLIENT_55
        store, server, release = await self.arm64_server(
            await deferToThread(forky_store))
        client = await self.trusted_client(server)
        started = time.monotonic()
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-a", "arm64", "-r", release, "-p4", "-m",
            "hello_arm64_5x", "-e", 'probe begin { println("5.x on arm64"); exit() }')
        seconds = time.monotonic() - started
        self.assertEqual(code, 0, err.decode() + server.log()[-4000:])
        self.assertEqual(elf_machine(client.cwd / "hello_arm64_5x.ko"), EM_AARCH64)
        self.assertRegex(server.log(), r"Toolchain forky \(SystemTap 5\.")
        print(f"\n{release}: 5.5 client's arm64 module in {seconds:.1f} s")
        started = time.monotonic()
        found = await run_in_vm(client.cwd / "hello_arm64_5x.ko", release, CLIENT_55)
        self.assertEqual((found.status, found.output), (0, "5.x on arm64\n"),
                         f"{found.summary}\n{found.console}")
        staprun = store / ".userland-arm64-5" / "root" / "usr" / "bin" / "staprun"
        self.assertTrue(staprun.exists())
        print(f"{release}: ran under trixie's arm64 staprun in "
              f"{time.monotonic() - started:.1f} s")
        self.assertNotIn("Traceback", server.log())

    async def test_a_5x_client_module_for_the_newest_trixie_arm64_release(self) -> None:
        """The 5.5 client asks for the newest trixie arm64 release (from the
        arm64 lists of trixie's suites, at run time): the forky toolchain
        builds it with the cross compiler of the version the release's
        headers call (``aarch64-linux-gnu-gcc-14`` for trixie's), and the
        module runs on that kernel in the arm64 VM under trixie's arm64
        staprun (5.x)."""
        from tests.helpers.realserver import CLIENT_55
        from tests.helpers.toolchains import forky_store
        from tests.system.test_suites import newest
        CLIENT_55.require()
        self.kind = CLIENT_55
        store, server, _ = await self.arm64_server(
            await deferToThread(forky_store), "--fetch-suites", TRIXIE_SUITES)
        def listed() -> str | None:
            try:
                return newest(store, r"\d+\.\d+\.\d+\+deb13(\.\d+)?-arm64",
                              tuple(TRIXIE_SUITES.split(",")), f"{APT_DIRECTORY}-arm64")
            except AssertionError:
                return None

        # The server's policy line names arm64 before trixie's arm64 lists
        # are in (the installed series' own patterns): wait for the lists.
        release = None
        deadline = time.monotonic() + 600
        while release is None and time.monotonic() < deadline:
            release = await deferToThread(listed)
            if release is None:
                await deferLater(reactor, 2.0, lambda: None)
        self.assertIsNotNone(release, server.log()[-3000:])
        assert release is not None
        client = await self.trusted_client(server)
        started = time.monotonic()
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-a", "arm64", "-r", release, "-p4", "-m",
            "hello_trixie_arm64", "-e", 'probe begin { println("5.x on trixie arm64"); exit() }')
        seconds = time.monotonic() - started
        self.assertEqual(code, 0, err.decode() + server.log()[-4000:])
        module = client.cwd / "hello_trixie_arm64.ko"
        self.assertEqual(elf_machine(module), EM_AARCH64)
        log = server.log()
        self.assertRegex(log, r"Toolchain forky \(SystemTap 5\.")
        if f"Fetching kernel {release}" in log:
            self.assertRegex(log, rf"Fetching kernel {re.escape(release)}: .* from "
                             rf"trixie(-security|-updates)?\b")
        # Built by the cross compiler the headers name, of their gcc version.
        tree = store / release / "root" / "usr" / "src" / f"linux-headers-{release}"
        named = re.search(r'^CONFIG_CC_VERSION_TEXT="aarch64-linux-gnu-gcc-(\d+) ',
                          (tree / ".config").read_text(), re.M)
        assert named is not None, "the headers name no aarch64-linux-gnu-gcc-N"
        self.assertRegex(module.read_bytes(), rb"GCC: \(Debian " + named.group(1).encode()
                         + rb"\.")
        print(f"\n{release}: 5.5 client's arm64 module (aarch64-linux-gnu-gcc-"
              f"{named.group(1)}) in {seconds:.1f} s")
        started = time.monotonic()
        found = await run_in_vm(module, release, CLIENT_55, suites=TRIXIE_SUITES)
        self.assertEqual((found.status, found.output), (0, "5.x on trixie arm64\n"),
                         f"{found.summary}\n{found.console}")
        print(f"{release}: ran under trixie's arm64 staprun in the arm64 VM "
              f"({found.accelerator}) in {time.monotonic() - started:.1f} s")
        self.assertNotIn("Traceback", server.log())

    async def test_a_server_that_does_not_build_for_arm64_refuses(self) -> None:
        server = self.own_server("--no-avahi", "--no-fetch")
        client = await self.trusted_client(server)
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-a", "arm64", "-r", "6.1.0-1-arm64", "-p4",
            "-e", "probe begin { exit() }")
        self.assertNotEqual(code, 0)
        self.assertIn("Server: This server does not build modules for architecture 'arm64'; "
                      "it builds for: x86_64.", err.decode())
        self.assertEqual(client.modules(), [])
