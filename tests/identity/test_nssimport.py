"""Keeping the certificate of an existing stap-serverd NSS database."""

from __future__ import annotations

import stat
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.trial.unittest import TestCase

from stapsrv.identity.certs import cert_serial_text, make_certificate
from stapsrv.identity.nssimport import NSSImportError, export_nss_identity, has_nss_database
from stapsrv.identity.store import CERT_FILE, KEY_FILE, load_or_create_identity
from tests.helpers import require, require_header_release, require_program
from tests.helpers.realserver import (
    Client,
    fixed_runtime_for,
    remove_tree,
    scratch_directory,
    start_stap_serverd,
    start_stapsrv,
)

HELLO = 'probe begin { println("x"); exit() }'


def _public_der(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _leftover_p12(*directories: Path) -> list[Path]:
    found: list[Path] = []
    for directory in directories:
        found += directory.rglob("*.p12")
        found += directory.glob("stapsrv-nss-*")
    return found


def make_nss_database(directory: Path, key: rsa.RSAPrivateKey,
                      certificate: x509.Certificate) -> None:
    """An NSS sql DB with an empty password holding ``stap-server``."""
    certutil = require_program("certutil")
    pk12util = require_program("pk12util")
    subprocess.run([certutil, "-N", "-d", f"sql:{directory}", "--empty-password"],
                   check=True, capture_output=True)
    p12 = pkcs12.serialize_key_and_certificates(
        b"stap-server", key, certificate, None,
        serialization.BestAvailableEncryption(b"secret"))
    with tempfile.TemporaryDirectory() as private:
        path = Path(private) / "in.p12"
        path.write_bytes(p12)
        subprocess.run([pk12util, "-i", str(path), "-d", f"sql:{directory}",
                        "-W", "secret", "-K", ""], check=True, capture_output=True)


class ExportTests(TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir(mode=0o700)
        self.now = datetime.now(timezone.utc)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.certificate = make_certificate(self.key, "nsshost", self.now)
        make_nss_database(self.directory, self.key, self.certificate)

    def test_identity_is_kept(self) -> None:
        before = set(_leftover_p12(Path(tempfile.gettempdir()), Path("/tmp")))
        self.assertTrue(has_nss_database(self.directory))
        identity = load_or_create_identity(self.directory, "otherhost", self.now, 2048)
        self.assertEqual(identity.certificate.serial_number, self.certificate.serial_number)
        self.assertEqual(identity.certificate, self.certificate)
        self.assertEqual(_public_der(identity.key.public_key()),
                         _public_der(self.key.public_key()))
        key_path = self.directory / KEY_FILE
        self.assertEqual(stat.S_IMODE(key_path.stat().st_mode), 0o600)
        stored = x509.load_der_x509_certificate((self.directory / CERT_FILE).read_bytes())
        self.assertEqual(stored, self.certificate)
        self.assertEqual(_leftover_p12(self.directory), [])
        after = set(_leftover_p12(Path(tempfile.gettempdir()), Path("/tmp")))
        self.assertEqual(after - before, set())

        key_bytes = key_path.read_bytes()
        mtime = key_path.stat().st_mtime_ns
        again = load_or_create_identity(self.directory, "otherhost", self.now, 2048)
        self.assertEqual(cert_serial_text(again.certificate),
                         cert_serial_text(self.certificate))
        self.assertEqual(key_path.read_bytes(), key_bytes)
        self.assertEqual(key_path.stat().st_mtime_ns, mtime)

    def test_expired_certificate_is_replaced(self) -> None:
        later = self.now + timedelta(days=400)
        identity = load_or_create_identity(self.directory, "nsshost", later, 2048)
        self.assertNotEqual(identity.certificate.serial_number,
                            self.certificate.serial_number)
        self.assertNotEqual(_public_der(identity.key.public_key()),
                            _public_der(self.key.public_key()))

    def test_wrong_nickname_fails(self) -> None:
        self.assertRaises(NSSImportError, export_nss_identity, self.directory, "nope")

    def test_missing_pk12util_does_not_regenerate(self) -> None:
        self.assertRaises(NSSImportError, export_nss_identity, self.directory,
                          pk12util="/nonexistent/pk12util")


class RealServerTests(TestCase):
    timeout = 900

    def setUp(self) -> None:
        require_program("stap")
        require_program("certutil")
        require_program("pk12util")
        require(Path("/usr/lib/systemtap/stap-serverd").exists(),
                "stap-serverd is not installed")
        self.release = require_header_release()

    async def test_stapsrv_keeps_stap_serverd_certificate(self) -> None:
        client_base = scratch_directory("client-")
        self.addCleanup(remove_tree, client_base)
        client = Client(client_base)

        runtime = fixed_runtime_for(self.release)
        arguments = ("-R", runtime) if runtime else ()
        real = start_stap_serverd(arguments, release=self.release)
        self.addCleanup(remove_tree, real.base)
        self.addCleanup(real.stop)
        ssl_dir = real.base / "ssl"
        await client.trust(real.spec)
        out, err, code = await client.stap(
            f"--use-server={real.spec}", "-r", self.release, "-p4", "-e", HELLO,
            env={"TMPDIR": str(client.dir)})
        self.assertEqual(code, 0, err.decode())
        real.stop()
        real_cert = x509.load_der_x509_certificate((ssl_dir / CERT_FILE).read_bytes())
        self.assertTrue(has_nss_database(ssl_dir))
        self.assertFalse((ssl_dir / KEY_FILE).exists())
        for module in client.cwd.iterdir():
            module.unlink()

        server = start_stapsrv(arguments, release=self.release, ssl_dir=ssl_dir)
        self.addCleanup(remove_tree, server.base)
        self.addCleanup(server.stop)
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-r", self.release, "-p4", "-e", HELLO,
            env={"TMPDIR": str(client.dir)})
        self.assertEqual(code, 0, err.decode() + server.log())
        self.assertEqual(len([m for m in client.modules() if m.endswith(".ko")]), 1)
        served = x509.load_der_x509_certificate((ssl_dir / CERT_FILE).read_bytes())
        self.assertEqual(cert_serial_text(served), cert_serial_text(real_cert))
        self.assertEqual(served, real_cert)
        self.assertEqual(stat.S_IMODE((ssl_dir / KEY_FILE).stat().st_mode), 0o600)
        self.assertEqual(_leftover_p12(ssl_dir, server.base), [])
