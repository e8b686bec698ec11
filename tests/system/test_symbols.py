"""Every served release gets its System.map, made from its kernel image
(``linux-image-<release>``: the package's own map is a placeholder), with
the real client and the real archive: no symbol-table warning, and
user-space return probes compile, and run on the release's kernel in a VM."""

from __future__ import annotations

import json

from twisted.trial.unittest import TestCase

from tests.helpers.realclient import HELLO, RealClientMixin
from tests.helpers.realserver import (
    Client,
    ServerProcess,
    owned_directory,
    remove_tree,
    scratch_directory,
)
from tests.helpers.vm import run_in_vm

SYMBOLS_WARNING = "Kernel function symbol table missing"
MALLOC_RETURN = ('probe process("/lib/x86_64-linux-gnu/libc.so.6").function("malloc").return '
                 '{ println($return); exit() }')


class SymbolsTests(RealClientMixin, TestCase):
    timeout = 900

    async def test_the_map_of_an_installed_release_comes_from_its_image(self) -> None:
        base = scratch_directory("symbols-")
        self.addCleanup(remove_tree, base)
        store = owned_directory(base / "store")
        clients: list[Client] = []

        async def compile(server: ServerProcess, script: str) -> tuple[str, int]:
            client = await self.trusted_client(server)
            clients.append(client)
            out, err, code = await client.stap(
                f"--use-server={server.spec}", "-r", self.release, "-p4", "-e", script)
            return err.decode(), code

        server = self.own_server("--kernel-store", str(store))
        err, code = await compile(server, HELLO)
        self.assertEqual(code, 0, err)
        self.assertNotIn(SYMBOLS_WARNING, err)
        kept = store / ".debug" / self.release
        self.assertEqual(sorted(p.name for p in (kept / "root").iterdir()),
                         [f"System.map-{self.release}"])
        entry = json.loads((kept / "entry.json").read_text())
        self.assertEqual([p["name"] for p in entry["packages"]], [f"linux-image-{self.release}"])
        entries = (kept / "root" / f"System.map-{self.release}").read_text().splitlines()
        functions = {line.split()[2] for line in entries if line.split()[1] in "Tt"}
        self.assertTrue({"_stext", "vfs_read", "do_sys_open", "schedule"} <= functions)
        self.assertGreater(len(functions), 20000)
        log = server.log()
        self.assertIn(f"Fetching the symbols of kernel {self.release}: "
                      f"linux-image-{self.release} ", log)
        self.assertRegex(log, rf"Made the System.map of kernel {self.release} in [0-9.]+ s "
                              r"\(\d+ function symbols\)")
        # The symbol table is what user-space return probes need (4.8 on
        # Debian: "process return probes not available").
        err, code = await compile(server, MALLOC_RETURN)
        self.assertEqual(code, 0, err)
        self.assertNotIn(SYMBOLS_WARNING, err)
        # And the module runs: malloc returns, in a program of the VM (or
        # in stapio itself), and the probe prints what it returned.
        module = next(clients[-1].cwd.glob("*.ko"))
        found = await run_in_vm(module, self.release, self.kind, command="/usr/bin/ls -d /",
                                files=("/usr/bin/ls",))
        self.assertEqual(found.status, 0, f"{found.summary}\n{found.console}")
        self.assertRegex(found.output, r"(?m)^[1-9][0-9]*$")
        server.stop()
        # Made once: a new server on the same store uses it; switched off,
        # the translator is back to 4.8's warning.
        again = self.own_server("--kernel-store", str(store))
        err, code = await compile(again, 'probe begin { println("again"); exit() }')
        self.assertEqual(code, 0, err)
        self.assertNotIn(SYMBOLS_WARNING, err)
        self.assertNotIn("Fetching the symbols", again.log())
        again.stop()
        off = self.own_server("--kernel-store", str(store), "--no-fetch-symbols")
        err, code = await compile(off, MALLOC_RETURN)
        self.assertEqual(code, 1)
        self.assertIn(SYMBOLS_WARNING, err)
        self.assertIn("process return probes not available", err)
