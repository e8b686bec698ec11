"""``python -m stapsrv.cli.kernels verify``: the server builds each probe
kind for a release through each client it serves, the modules run on the
release's kernel in a VM with each client's staprun, and the result is
kept with the release and shown by ``kernels list``."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

from twisted.trial.unittest import TestCase

from stapsrv.vm import verification
from stapsrv.vm.verify import PROBES
from tests.helpers.realclient import RealClientMixin
from tests.helpers.realredis import free_port
from tests.helpers.realserver import CLIENT_55, as_server_user, server_environment, venv_bin
from tests.helpers.vm import require_vm, vm_store


class VerifyTests(RealClientMixin, TestCase):
    def setUp(self) -> None:
        super().setUp()
        require_vm()
        CLIENT_55.require()

    def kernels(self, *words: str) -> subprocess.CompletedProcess[str]:
        store = vm_store()
        return subprocess.run(
            as_server_user([venv_bin("python"), "-m", "stapsrv.cli.kernels", "--store",
                            str(store), *words]),
            env=server_environment(store.parent, "stapsrv"), capture_output=True, text=True,
            timeout=3600, cwd="/")

    def test_verify_the_installed_release(self) -> None:
        server = self.own_server()
        self.addCleanup(verification.remove, vm_store(), self.release)
        done = self.kernels("verify", self.release, "--server", server.spec,
                            "--client", "/opt/stap55", "--json")
        found = json.loads(done.stdout)
        self.assertEqual(found["release"], self.release)
        self.assertIn("version 4.8", found["translator"])
        results = {(r["client"], r["probe"]): r for r in found["results"]}
        probes = [probe.name for probe in PROBES]
        self.assertEqual(sorted(results), sorted(
            [(client, probe) for client in ("4.8", "5.5") for probe in probes]))
        for probe in probes:
            self.assertTrue(results["4.8", probe]["runs"], results["4.8", probe])
            # 5.5 installs its staprun mode 4110: the server's user cannot
            # copy it into the VM (were it readable, it would stop with
            # 'Unable to send relocation', as tests/system/test_vm shows).
            self.assertFalse(results["5.5", probe]["runs"])
            self.assertIn("cannot read /opt/stap55/bin/staprun", results["5.5", probe]["failure"])
        self.assertFalse(found["passed"])
        self.assertEqual(done.returncode, 1, done.stderr)
        listed = self.kernels("list")
        self.assertIn(f"{self.release}\tFAILED verification ", listed.stdout)
        self.assertIn("\t5/10 run\tby Systemtap translator/driver (version 4.8", listed.stdout)
        self.assertIn("  5.5 begin: ", listed.stdout)
        # A server on that store shows it in its metrics.
        port = free_port()
        self.own_server("--kernel-store", str(vm_store()), "--no-fetch",
                        "--metrics", f"tcp:{port}:interface=127.0.0.1")
        page = scrape(port)
        for probe in probes:
            self.assertIn(f'stapsrv_kernel_verification_runs{{client="4.8",probe="{probe}",'
                          f'release="{self.release}"}} 1.0', page)
            self.assertIn(f'stapsrv_kernel_verification_runs{{client="5.5",probe="{probe}",'
                          f'release="{self.release}"}} 0.0', page)
        self.assertIn(f'stapsrv_kernel_verification_passed{{release="{self.release}"}} 0.0', page)


def scrape(port: int, bound: float = 120.0) -> str:
    """The server's /metrics page, once its listener answers."""
    deadline = time.monotonic() + bound
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
                return page.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
