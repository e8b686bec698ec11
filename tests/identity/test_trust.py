"""Client trust databases with the real ``certutil`` (spec §2.4, §2.6 item 11)."""

from __future__ import annotations

import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.trial.unittest import TestCase

from stapsrv.identity.certs import ServerIdentity, make_certificate
from stapsrv.identity.trust import (
    CertutilError,
    trust_certificate,
    trusted_server_certificates,
)
from tests.helpers import require_program, test_identity
from tests.helpers.nss import list_database


def write_certificate(directory: Path, identity: ServerIdentity) -> Path:
    path = directory / "stap.cert"
    path.write_bytes(identity.certificate_der)
    return path


def another_identity() -> ServerIdentity:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    later = datetime.now(timezone.utc) + timedelta(seconds=5)
    return ServerIdentity(key, make_certificate(key, "otherhost", later))


class TrustCertificateTests(TestCase):
    def setUp(self) -> None:
        self.certutil = require_program("certutil")
        self.base = Path(self.mktemp())
        self.base.mkdir()
        self.db_dir = self.base / "systemtap" / "ssl" / "client"
        self.cert = write_certificate(self.base, test_identity())

    def test_creates_database_and_trusts(self) -> None:
        trust_certificate(self.cert, self.db_dir, self.certutil)
        self.assertEqual(list_database(self.certutil, self.db_dir), [("stap-server", "P,P,P")])
        self.assertEqual(stat.S_IMODE(self.db_dir.stat().st_mode), 0o755)
        self.assertEqual(trusted_server_certificates(self.db_dir, self.certutil),
                         [test_identity().certificate_der])

    def test_database_files_readable(self) -> None:
        trust_certificate(self.cert, self.db_dir, self.certutil)
        databases = sorted(self.db_dir.glob("*.db"))
        self.assertEqual([p.name for p in databases], ["cert9.db", "key4.db"])
        for database in databases:
            self.assertEqual(stat.S_IMODE(database.stat().st_mode), 0o644)

    def test_idempotent(self) -> None:
        trust_certificate(self.cert, self.db_dir, self.certutil)
        trust_certificate(self.cert, self.db_dir, self.certutil)
        self.assertEqual(list_database(self.certutil, self.db_dir), [("stap-server", "P,P,P")])
        self.assertEqual(len(trusted_server_certificates(self.db_dir, self.certutil)), 1)
        for database in self.db_dir.glob("*.db"):
            self.assertEqual(stat.S_IMODE(database.stat().st_mode), 0o644)

    def test_existing_database_kept(self) -> None:
        self.db_dir.mkdir(parents=True)
        subprocess.run([self.certutil, "-N", "-d", f"sql:{self.db_dir}", "--empty-password"],
                       check=True, capture_output=True, timeout=60)
        other_dir = self.base / "other"
        other_dir.mkdir()
        other = write_certificate(other_dir, another_identity())
        trust_certificate(other, self.db_dir, self.certutil)
        trust_certificate(self.cert, self.db_dir, self.certutil)
        trust_certificate(self.cert, self.db_dir, self.certutil)
        self.assertEqual(list_database(self.certutil, self.db_dir),
                         [("stap-server", "P,P,P"), ("stap-server", "P,P,P")])
        self.assertIn(test_identity().certificate_der,
                      trusted_server_certificates(self.db_dir, self.certutil))
        self.assertEqual(len(trusted_server_certificates(self.db_dir, self.certutil)), 2)

    def test_empty_database_has_no_servers(self) -> None:
        self.db_dir.mkdir(parents=True)
        subprocess.run([self.certutil, "-N", "-d", f"sql:{self.db_dir}", "--empty-password"],
                       check=True, capture_output=True, timeout=60)
        self.assertEqual(trusted_server_certificates(self.db_dir, self.certutil), [])

    def test_bad_certificate_reports_stderr(self) -> None:
        bad = self.base / "bad.cert"
        bad.write_bytes(b"this is not DER")
        error = self.assertRaises(CertutilError, trust_certificate, bad, self.db_dir,
                                  self.certutil)
        self.assertIn("-A", str(error))
        self.assertIn("certutil", str(error))


class CertutilFailureTests(TestCase):
    """Errors are reported without needing the real certutil."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()
        self.cert = write_certificate(self.base, test_identity())

    def test_missing_certutil(self) -> None:
        error = self.assertRaises(CertutilError, trust_certificate, self.cert,
                                  self.base / "db", str(self.base / "no-such-certutil"))
        self.assertIn("not found", str(error))

    def test_stderr_in_error(self) -> None:
        fake = self.base / "certutil"
        fake.write_text(f"#!{sys.executable}\nimport sys\n"
                        "sys.stderr.write('certutil: SEC_ERROR_BAD_DATABASE\\n')\n"
                        "sys.exit(255)\n")
        fake.chmod(0o755)
        error = self.assertRaises(CertutilError, trust_certificate, self.cert,
                                  self.base / "db", str(fake))
        self.assertIn("SEC_ERROR_BAD_DATABASE", str(error))
        self.assertIn("255", str(error))
