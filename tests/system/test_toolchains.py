"""Toolchains for real: the forky root made by the admin command (its
manifest agrees with dpkg), listed; a server on a store with it and a
damaged one names the damaged one and serves with the other: the 5.5
client's request is compiled by forky's translator (the log says so),
the 4.8 client's by the host's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.cli.roots import installed
from stapsrv.kernel.toolchains import toolchains_directory
from tests.helpers import toolchains as helper
from tests.helpers.realclient import HELLO, RealClientMixin
from tests.helpers.realserver import (
    CLIENT_55,
    as_server_user,
    owned_directory,
    remove_tree,
    scratch_directory,
    server_environment,
    venv_bin,
)


class AdminCommandTests(TestCase):
    timeout = 3600

    def test_made_and_listed(self) -> None:
        forky = helper.forky()
        versions = dict(forky.packages)
        self.assertEqual(versions, installed(forky.root))
        for package in ("systemtap", "gcc-12", "gcc-14", "gcc", "make", "libc6-dev"):
            self.assertIn(package, versions)
        self.assertTrue(forky.translator.startswith("5."), forky.translator)
        store = forky.root.parent.parent.parent
        done = subprocess.run(
            as_server_user([venv_bin("python"), "-m", "stapsrv.cli.toolchains", "--store",
                            str(store), "list"]),
            capture_output=True, text=True, timeout=120, cwd="/",
            env=server_environment(scratch_directory("list-"), "stapsrv"))
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertTrue(lines[0].startswith("host\tSystemTap 4.8"), lines)
        forky_line = next(line for line in lines if line.startswith("forky\t"))
        self.assertIn(f"SystemTap {versions['systemtap']}\t", forky_line)
        self.assertIn(f"gcc-12 {versions['gcc-12']}", forky_line)
        self.assertIn(f"gcc-14 {versions['gcc-14']}", forky_line)
        if helper.made_in is not None:
            print(f"\nforky toolchain made in {helper.made_in:.0f} s")


class ServingTests(RealClientMixin, TestCase):
    """A server whose store has the forky toolchain and a damaged one."""

    def store(self) -> Path:
        forky = helper.forky()
        store = owned_directory(scratch_directory("toolchain-store-") / "kernels")
        self.addCleanup(remove_tree, store.parent)
        place = owned_directory(toolchains_directory(store))
        (place / "forky").symlink_to(forky.root.parent)
        damaged = place / "broken"
        os.makedirs(damaged / "root" / "usr" / "bin")
        shutil.copyfile(forky.root.parent / "manifest.json", damaged / "manifest.json")
        return store

    async def test_each_client_gets_its_toolchain_and_a_damaged_one_is_left_out(self) -> None:
        server = self.own_server("--kernel-store", str(self.store()), "--no-fetch")
        log = server.log()
        self.assertIn("Not using toolchain broken: ", log)
        self.assertIn("usr/bin/stap is missing", log)
        self.assertIn("Toolchain forky (SystemTap 5.", log)
        for kind, toolchain in ((CLIENT_55, "forky"), (self.kind, "host")):
            self.kind = kind
            kind.require()
            client = await self.trusted_client(server)
            out, err, code = await client.stap(f"--use-server={server.spec}", "-r",
                                               self.release, "-p4", "-e", HELLO)
            self.assertEqual(code, 0, err.decode())
            self.assertEqual(len(list(client.cwd.glob("*.ko"))), 1)
            self.assertIn(f"Toolchain {toolchain} (SystemTap ", server.log())

    async def test_a_48_client_for_a_kernel_48_does_not_build_is_told_why(self) -> None:
        """The release's name only (a 6.12 name made from the machine's
        own): it is refused before anything is fetched."""
        server = self.own_server("--kernel-store", str(self.store()),
                                 "--fetch-releases", "*")
        release = re.sub(r"^\d+\.\d+\.", "6.12.", self.release)
        client = await self.trusted_client(server)
        out, err, code = await client.stap(f"--use-server={server.spec}", "-r", release,
                                           "-p4", "-e", HELLO)
        self.assertNotEqual(code, 0)
        lines = [line for line in err.decode().splitlines() if line.startswith("Server:")]
        self.assertEqual(lines, [
            f"Server: No toolchain of this server builds for kernel release '{release}' "
            "modules that a SystemTap 4.8 client's staprun loads: host (SystemTap 4.8) "
            "builds for kernels up to 6.1 only; forky (SystemTap 5.6) makes modules for "
            "SystemTap 5.x clients' staprun (4.x's refuses them). A SystemTap 5.x client "
            "would be served."], err.decode())
        self.assertNotIn(f"Fetching kernel {release}", server.log())
        self.assertIn("Refusing the request from ", server.log())
