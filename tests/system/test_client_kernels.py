"""Every client family against the newest kernel of every suite the server
fetches, for real, and the table of the admin guide checked against it.

One server on a kernel store of its own (kept between runs like the VM
tests' one, ``$STAPSRV_CI_TABLE_STORE``; its apt configuration names
other suites than theirs), with the forky toolchain, and
``--fetch-suites`` for bookworm (its own suites too: with suites named
every fetch goes through them), bookworm-backports, trixie and forky; the newest
release of each suite is picked from its lists at run time (bookworm's:
the machine's own).  For each release:

- the 4.8 client (bookworm's) asks for a ``begin`` module: refused with
  one ``Server:`` line, or built (by the host's 4.8) and run in the VM
  with bookworm's staprun;
- forky's own client (its stap 5.6 run in the forky root, over loopback)
  asks for the same script: built by the toolchain the server picks and
  run in the VM with forky's staprun on that kernel;
- the upstream 5.5 client asks at ``-p2`` (the server's log names the
  toolchain that answers it), and the 5.x module of the forky client's
  request is run with 5.5's own staprun: one compile and two boots per
  release for the 5.x family, not two compiles.

Then forky's client on forky's kernel once more, with a kprobe and a
``process().begin`` probe.

The results are written to a JSON file (``$STAPSRV_TABLE_RESULTS``, else
a scratch file) and ``tools/client-kernel-table --check`` compares them
with the guide's table; ``--write`` regenerates it from such a file.
What it costs: four releases (about 100 MB of headers and 200 MB of
images to fetch into an empty store), four 5.x compiles (three with their
kernel configuration header, about a minute more each) and one 4.8
compile, nine boots (10-20 s each under TCG): 687 s from an empty store,
429 s on a kept one, on 2 cores with a load average of 9 (other workers);
the two more probes on forky's kernel add two compiles and two boots
(about 50 s: 438 s in all on a kept store).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from stapsrv.kernel.toolchains import kernel_compiler
from tests.helpers.realclient import RealClientMixin
from stapsrv.kernel.toolchains import toolchains_directory
from tests.helpers.realserver import (
    CLIENT_48,
    CLIENT_55,
    Client,
    ServerProcess,
    kept_directory,
    owned_directory,
    remove_tree,
    scratch_directory,
)
from tests.helpers.toolchains import ForkyClient, forky, forky_store, forky_zip
from tests.helpers.vm import require_vm, run_in_vm
from tests.helpers.waiting import poll
from tests.system.test_suites import newest

ROOT = Path(__file__).resolve().parents[2]
SUITES = ("bookworm,bookworm-security,bookworm-updates,bookworm-backports,trixie,"
          "trixie-security,trixie-updates,forky")
#: Each suite's kernels: a pattern of its plain amd64 releases, and the
#: suites apt may take them from.
SERIES = (
    ("bookworm-backports", r"6\.12\.\d+\+deb12-amd64", ("bookworm-backports",)),
    ("trixie", r"\d+\.\d+\.\d+\+deb13(\.\d+)?-amd64",
     ("trixie", "trixie-security", "trixie-updates")),
    ("forky", r"\d+\.\d+\.\d+\+deb14(\.\d+)?-amd64", ("forky",)),
)
WORKLOAD = "/usr/bin/busybox grep -q Linux /proc/version"
SCRIPT = 'probe begin { println("stapsrv-table"); exit() }'
LINE = "stapsrv-table\n"


def table_store() -> Path:
    """The test's kernel store, with the VM tests' forky toolchain in it."""
    store = kept_directory("STAPSRV_CI_TABLE_STORE", "table-store")
    forky_store()
    place = owned_directory(toolchains_directory(store))
    if not (place / "forky").exists():
        (place / "forky").unlink(missing_ok=True)  # a dangling link
        (place / "forky").symlink_to(forky().root.parent)
    return store


class ClientKernelTable(RealClientMixin, TestCase):
    timeout = 7200

    def setUp(self) -> None:
        super().setUp()
        require_vm()
        CLIENT_55.require()
        self.store = table_store()

    async def start(self) -> tuple[ServerProcess, dict[str, str]]:
        server = self.own_server("--kernel-store", str(self.store), "--no-avahi",
                                 "--fetch-suites", SUITES)
        self.assertTrue(await poll(
            lambda: "Kernel store: fetching releases matching" in server.log(), 600.0),
            server.log())
        releases = {"bookworm": self.release}
        for suite, pattern, suites in SERIES:
            releases[suite] = newest(self.store, pattern, suites)
        return server, releases

    async def clients(self, server: ServerProcess) -> dict[str, Client]:
        base = scratch_directory("table-")
        self.addCleanup(remove_tree, base)
        zip_programs = forky_zip(self.store, base / "zip")
        found = {"4.8": Client(base / "c48", CLIENT_48), "5.5": Client(base / "c55", CLIENT_55),
                 "5.6": ForkyClient(base / "c56", zip_programs)}
        for client in found.values():
            await client.trust(server.spec)
        return found

    async def test_every_client_on_every_suites_newest_kernel(self) -> None:
        started = time.monotonic()
        server, releases = await self.start()
        clients = await self.clients(server)
        cells: list[dict[str, Any]] = []
        compilers = {}
        for suite, release in releases.items():
            cells.append(await self.built_and_run(server, clients["4.8"], suite, release,
                                                  "4.8", "host"))
            forky_cell = await self.built_and_run(server, clients["5.6"], suite, release,
                                                  "5.6", "forky")
            cells.append(forky_cell)
            cells.append(await self.five_five(server, clients["5.5"], suite, release,
                                              forky_cell))
            tree = self.build_tree(release)
            compilers[suite] = kernel_compiler(tree) or "unknown"
        results = {
            "made": time.strftime("%Y-%m-%d", time.gmtime()),
            "clients": [{"name": "4.8", "staprun": "bookworm's /usr/bin/staprun"},
                        {"name": "5.5", "staprun": "/opt/stap55"},
                        {"name": "5.6", "staprun": "forky's, from the forky root"}],
            "series": [{"suite": suite, "release": release, "compiler": compilers[suite]}
                       for suite, release in releases.items()],
            "cells": cells}
        path = Path(os.environ.get("STAPSRV_TABLE_RESULTS") or
                    scratch_directory("table-results-") / "client-kernels.json")
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nclient x kernel results in {path} ({time.monotonic() - started:.0f} s)")
        self.assert_honest(cells)
        await self.forky_on_forky(server, clients["5.6"], releases["forky"])
        done = subprocess.run([str(ROOT / "tools" / "client-kernel-table"), str(path),
                               "--check", str(ROOT / "doc" / "admin-guide.md")],
                              capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stderr)

    def build_tree(self, release: str) -> Path:
        installed = Path(f"/usr/src/linux-headers-{release}")
        if installed.is_dir():
            return installed
        return self.store / release / "root" / "usr" / "src" / f"linux-headers-{release}"

    def assert_honest(self, cells: list[dict[str, Any]]) -> None:
        """What the table says follows from what the server and VM did:
        a refusal has its one Server: line, a cell that runs printed the
        line in the VM."""
        for cell in cells:
            if cell["outcome"] == "refused":
                self.assertTrue(cell["detail"].startswith("Server: "), cell)
            if cell["outcome"] == "runs":
                self.assertEqual(cell["printed"], LINE, cell)
        # The forky client on forky's own kernel: its module runs.
        forky_cell = next(cell for cell in cells
                          if (cell["client"], cell["suite"]) == ("5.6", "forky"))
        self.assertEqual(forky_cell["outcome"], "runs", forky_cell)

    async def forky_on_forky(self, server: ServerProcess, client: Client,
                             release: str) -> None:
        """forky's own client on forky's kernel, with probes beyond
        ``begin``: a kprobe and a ``process().begin`` (with the workload
        program the VM has), under forky's staprun."""
        for name, point in (("kprobe", 'kprobe.function("vfs_read")'),
                            ("process", 'process("/usr/bin/busybox").begin')):
            for old in client.cwd.glob("*.ko"):
                old.unlink()
            out, err, code = await client.stap(
                f"--use-server={server.spec}", "-r", release, "-p4", "-e",
                f'probe {point} {{ println("stapsrv-{name}"); exit() }}')
            self.assertEqual(code, 0, err.decode(errors="replace"))
            module = next(client.cwd.glob("*.ko"))
            ran = await run_in_vm(module, release, client.kind, suites=SUITES,
                                  root=forky().root, store=self.store, command=WORKLOAD,
                                  files=("/usr/bin/busybox",))
            self.assertEqual((ran.status, ran.output), (0, f"stapsrv-{name}\n"),
                             f"{ran.summary}\n{ran.console}")

    async def built_and_run(self, server: ServerProcess, client: Client, suite: str,
                            release: str, version: str, root: str) -> dict[str, Any]:
        """``client``'s module for ``release``, run in the VM with its own
        staprun (``root``: forky's from the forky root, else the kind's)."""
        for old in client.cwd.glob("*.ko"):
            old.unlink()
        out, err, code = await client.stap(f"--use-server={server.spec}", "-r", release,
                                           "-p4", "-e", SCRIPT)
        cell = self.asked(server, err.decode(errors="replace"), version, suite, release)
        modules = sorted(client.cwd.glob("*.ko"))
        if cell["outcome"] == "refused" or not modules:
            return cell
        cell["module"] = str(modules[0])
        ran = await run_in_vm(modules[0], release, client.kind, suites=SUITES,
                              root=forky().root if root == "forky" else None, store=self.store)
        return self.loaded(cell, ran)

    async def five_five(self, server: ServerProcess, client: Client, suite: str,
                        release: str, forky_cell: dict[str, Any]) -> dict[str, Any]:
        out, err, code = await client.stap(f"--use-server={server.spec}", "-r", release,
                                           "-p2", "-e", SCRIPT)
        cell = self.asked(server, err.decode(errors="replace"), "5.5", suite, release)
        if cell["outcome"] == "refused":
            return cell
        if cell["toolchain"] != forky_cell["toolchain"] or "module" not in forky_cell:
            cell.update(outcome="not proven", detail="no 5.x module of the same toolchain")
            return cell
        ran = await run_in_vm(Path(forky_cell["module"]), release, CLIENT_55, suites=SUITES,
                              store=self.store)
        return self.loaded(cell, ran)

    def asked(self, server: ServerProcess, err: str, version: str, suite: str,
              release: str) -> dict[str, Any]:
        cell: dict[str, Any] = {"client": version, "suite": suite, "release": release,
                                "outcome": "fails to build", "toolchain": "", "detail": ""}
        refusals = [line for line in err.splitlines() if line.startswith("Server: ")]
        if refusals:
            self.assertEqual(len(refusals), 1, err)
            cell.update(outcome="refused", detail=refusals[0])
            return cell
        answers = re.findall(rf"Toolchain (\S+) \(SystemTap ([\d.]+)\) answers \S+ "
                             rf"\(client {re.escape(version)}, kernel {re.escape(release)}\)",
                             server.log())
        if answers:
            cell["toolchain"] = f"{answers[-1][0]} {answers[-1][1]}"
        lines = [line for line in err.splitlines() if line.strip()]
        cell["detail"] = lines[-1][:300] if lines else ""
        return cell

    def loaded(self, cell: dict[str, Any], ran: Any) -> dict[str, Any]:
        cell["printed"] = ran.output
        if ran.status == 0 and ran.output == LINE:
            cell.update(outcome="runs", detail="")
        else:
            cell.update(outcome="fails to load", detail=ran.summary[:300])
        return cell
