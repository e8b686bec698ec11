"""``python -m stapsrv.cli.clienttrust``: the printed script, run with the
real ``sh`` and ``certutil``, and ``--into``, trust the server's certificate
as ``--trust-servers`` would (nickname stap-server, trust P,P,P)."""

from __future__ import annotations

import io
import os
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.cli.clienttrust import main
from stapsrv.identity.certs import ServerIdentity
from stapsrv.identity.store import store_identity
from stapsrv.identity.trust import trusted_server_certificates
from tests.helpers import require_program, test_identity
from tests.helpers.nss import list_database


class ClientTrustTests(TestCase):
    def setUp(self) -> None:
        self.certutil = require_program("certutil")
        self.base = Path(self.mktemp())
        self.ssl = self.base / "ssl"
        self.ssl.mkdir(parents=True)
        self.identity: ServerIdentity = test_identity()
        store_identity(self.ssl, self.identity)

    def command(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["--ssl", str(self.ssl), *argv])
        return code, out.getvalue(), err.getvalue()

    def assert_trusted(self, database: Path) -> None:
        self.assertEqual(trusted_server_certificates(database, self.certutil),
                         [self.identity.certificate_der])
        self.assertEqual(list_database(self.certutil, database), [("stap-server", "P,P,P")])

    def test_the_printed_script_trusts_it_for_the_user(self) -> None:
        code, script, err = self.command()
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"certificate {self.identity.serial_text} for", script)
        home = self.base / "home"
        home.mkdir()
        for _ in range(2):  # again: the database is there already
            done = subprocess.run(
                ["/bin/sh", "-c", script], capture_output=True, text=True, timeout=120,
                env={"PATH": os.environ["PATH"], "HOME": str(home),
                     "SYSTEMTAP_DIR": str(self.base / "stapdir")})
            self.assertEqual(done.returncode, 0, done.stderr)
        self.assert_trusted(self.base / "stapdir" / "ssl" / "client")
        self.assertFalse((home / ".systemtap").exists())

    def test_all_users_and_signer_scripts_name_the_system_databases(self) -> None:
        self.assertIn("db=/etc/systemtap/ssl/client\n", self.command("--all-users")[1])
        self.assertIn("db=/etc/systemtap/staprun\n", self.command("--signer")[1])

    def test_into_a_database(self) -> None:
        database = self.base / "client"
        code, out, err = self.command("--into", str(database))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, f"Trusted {self.identity.serial_text} in {database}\n")
        self.assert_trusted(database)

    def test_no_certificate_is_one_line(self) -> None:
        code, out, err = main_in(self.base / "nothing")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("cannot read the server's certificate", err)


def main_in(ssl: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["--ssl", str(ssl)])
    return code, out.getvalue(), err.getvalue()
