"""Debian trixie's own client (stap 5.1 from a debootstrapped trixie root,
over loopback; tests/helpers/trixieclient.py).

Trust (issue 27, item 4): its own ``--trust-servers=ssl`` cannot trust a
stapsrv server (NSS 3.110 reads the certificate as from an unknown issuer;
5.1 handles only the classic verifier's error); the server's log names the
cause; the trust printed by ``python -m stapsrv.cli.clienttrust``, run in
the trixie root, or made by NSS's classic verifier
(``NSS_DISABLE_PKIX_VERIFY=1``) for the trust step only, lets it in, and a
request is then answered (by the forky toolchain: a 5.x client).

Its own kernel: the newest trixie release, picked from the archive's lists
at run time through the server's private apt; the server (forky
toolchain, ``--fetch-suites`` with trixie) builds the module for it and
trixie's own staprun (from the root) runs it in the VM, a
``process().begin`` probe included."""

from __future__ import annotations

import subprocess

from twisted.trial.unittest import TestCase

from stapsrv.identity.trust import trusted_server_certificates
from tests.helpers import toolchains
from tests.helpers import trixieclient
from tests.helpers.realclient import HELLO, RealClientMixin
from tests.helpers.realserver import CLIENT_48, Client, ServerProcess, run, venv_bin
from tests.helpers.vm import require_vm, run_in_vm
from tests.helpers.waiting import poll
from tests.system.test_suites import newest
from tests.system.test_vm import PROCESS, WORKLOAD, answered_by

SUITES = "trixie,trixie-security,trixie-updates"
UNKNOWN_ISSUER_LINE = ("refused this server's certificate as one from an unknown issuer "
                       "(TLS alert unknown_ca)")


class TrixieClientTests(RealClientMixin, TestCase):
    timeout = 3600

    def setUp(self) -> None:
        super().setUp()
        self.kind = trixieclient.trixie_client()
        if trixieclient.made_in is not None:
            print(f"\ntrixie client root made in {trixieclient.made_in:.0f} s")
            trixieclient.made_in = None  # said once

    def trusted(self, client: Client) -> list[bytes]:
        return trusted_server_certificates(client.systemtap_dir / "ssl" / "client")

    async def refused(self, server: ServerProcess) -> Client:
        """A trixie client whose own --trust-servers=ssl fails; the server's
        log says why."""
        client = self.new_client()
        out, err, code = await client.stap(f"--use-server={server.spec}",
                                           "--trust-servers=ssl,no-prompt")
        self.assertIn("SEC_ERROR_UNKNOWN_ISSUER", err.decode(), err.decode())
        self.assertEqual(self.trusted(client), [])
        # Once a minute per client host: an earlier test's refusal on this
        # shared server may be the line.
        self.assertTrue(await poll(lambda: UNKNOWN_ISSUER_LINE in server.log(),
                                   60.0), server.log()[-3000:])
        self.assertIn("python -m stapsrv.cli.clienttrust", server.log())
        return client

    async def answered(self, client: Client, server: ServerProcess) -> None:
        out, err, code = await client.stap(f"--use-server={server.spec}", "-r", self.release,
                                           "-p4", "-e", HELLO)
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(len(list(client.cwd.glob("*.ko"))), 1, client.modules())
        self.assertIn("Toolchain forky (SystemTap 5.", answered_by(server))

    async def test_trusted_by_the_printed_script_then_answered(self) -> None:
        server = toolchains.toolchain_server()
        client = await self.refused(server)
        printed = subprocess.run(
            [venv_bin("python"), "-m", "stapsrv.cli.clienttrust", "--ssl",
             str(server.base / "ssl")], capture_output=True, text=True, timeout=120)
        self.assertEqual(printed.returncode, 0, printed.stderr)
        self.assertIn(f"certificate {server.serial()} for", printed.stdout)
        script = client.dir / "trust.sh"
        script.write_text(printed.stdout)
        # Run on "the client machine": trixie's shell and certutil.
        out, err, code = await run(trixieclient.in_root(["/bin/sh", str(script)], client.cwd),
                                   env=client.env(), cwd=client.cwd)
        self.assertEqual(code, 0, (out + err).decode())
        self.assertEqual(self.trusted(client), [(server.base / "ssl" / "stap.cert")
                                                .read_bytes()])
        await self.answered(client, server)

    async def test_trusted_through_the_classic_verifier_then_answered(self) -> None:
        server = toolchains.toolchain_server()
        client = await self.refused(server)
        out, err, code = await client.stap(f"--use-server={server.spec}",
                                           "--trust-servers=ssl,no-prompt",
                                           env={"NSS_DISABLE_PKIX_VERIFY": "1"})
        self.assertEqual(code, 0, err.decode())
        self.assertNotIn("SEC_ERROR", err.decode())
        self.assertEqual(len(self.trusted(client)), 1)
        await self.answered(client, server)  # without the variable

    async def test_the_48_client_not_trusting_yet_is_told_apart(self) -> None:
        """bookworm's NSS (3.87) ends the handshake with bad_certificate:
        the log gives it its own line, not the unknown_ca one."""
        server = self.own_server("--no-avahi")
        client = Client(self.new_client().dir, CLIENT_48)
        out, err, code = await client.stap(f"--use-server={server.spec}", "-r", self.release,
                                           "-p4", "-e", HELLO)
        self.assertNotEqual(code, 0)
        self.assertTrue(await poll(lambda: "TLS alert bad_certificate" in server.log(), 60.0),
                        server.log()[-3000:])
        self.assertNotIn(UNKNOWN_ISSUER_LINE, server.log())

    async def test_own_kernel_module_runs_under_its_own_staprun(self) -> None:
        require_vm()
        store = toolchains.forky_store()
        server = self.own_server("--kernel-store", str(store), "--no-avahi",
                                 "--fetch-suites", SUITES)
        self.assertTrue(await poll(
            lambda: "Kernel store: fetching releases matching" in server.log(), 600.0),
            server.log()[-3000:])
        release = newest(store, r"\d+\.\d+\.\d+\+deb13(\.\d+)?-amd64", tuple(SUITES.split(",")))
        client = self.new_client()
        into = subprocess.run(
            [venv_bin("python"), "-m", "stapsrv.cli.clienttrust", "--ssl",
             str(server.base / "ssl"), "--into", str(client.systemtap_dir / "ssl" / "client")],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(into.returncode, 0, into.stderr)
        script = 'probe begin { println("stapsrv-begin") } ' + PROCESS
        out, err, code = await client.stap(f"--use-server={server.spec}", "-r", release,
                                           "-p4", "-e", script)
        self.assertEqual(code, 0, err.decode())
        self.assertIn("Toolchain forky (SystemTap 5.", answered_by(server))
        modules = list(client.cwd.glob("*.ko"))
        self.assertEqual(len(modules), 1, client.modules())
        found = await run_in_vm(modules[0], release, self.kind, command=WORKLOAD,
                                files=("/usr/bin/busybox",), suites=SUITES,
                                root=trixieclient.trixie_root())
        self.assertEqual((found.status, found.output),
                         (0, "stapsrv-begin\nstapsrv-process\n"),
                         f"{release}: {found.summary}\n{found.console}")
        print(f"\ntrixie client on {release}: {found.summary}")
