"""The identity on disk (stapsrv.identity.store): reuse, regeneration, file modes."""

from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase

from stapsrv.identity.certs import ServerIdentity, identity_needs_renewal
from stapsrv.identity.store import CERT_FILE, KEY_FILE, load_or_create_identity
from tests.helpers.der import public_der

NOW = datetime(2026, 11, 26, 12, 30, 15, 123456, tzinfo=timezone.utc)


class LoadOrCreateTests(TestCase):
    """The ssl directory: reuse, regeneration, file modes."""

    def setUp(self) -> None:
        self.ssl_dir = Path(self.mktemp()) / "ssl" / "server"

    def load(self, now: datetime = NOW, **kwargs: Any) -> ServerIdentity:
        return load_or_create_identity(self.ssl_dir, "testhost.example", now,
                                       key_size=2048, **kwargs)

    def mode(self, name: str) -> int:
        return stat.S_IMODE((self.ssl_dir / name).stat().st_mode)

    def test_creates_files_with_modes(self) -> None:
        identity = self.load()
        self.assertEqual(stat.S_IMODE(self.ssl_dir.stat().st_mode), 0o700)
        self.assertEqual(self.mode(KEY_FILE), 0o600)
        self.assertEqual(self.mode(CERT_FILE), 0o644)
        self.assertEqual((self.ssl_dir / CERT_FILE).read_bytes(), identity.certificate_der)
        stored = serialization.load_pem_private_key(
            (self.ssl_dir / KEY_FILE).read_bytes(), password=None)
        assert isinstance(stored, rsa.RSAPrivateKey)
        self.assertEqual(public_der(stored), public_der(identity.key))
        self.assertTrue((self.ssl_dir / KEY_FILE).read_bytes().startswith(
            b"-----BEGIN PRIVATE KEY-----"))
        self.assertEqual(sorted(p.name for p in self.ssl_dir.iterdir()),
                         sorted([KEY_FILE, CERT_FILE]))

    def test_san_uses_nodename(self) -> None:
        identity = self.load()
        names = identity.certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        self.assertEqual(list(names), [x509.DNSName("testhost.example"),
                                       x509.DNSName("testhost.local")])

    def test_default_nodename(self) -> None:
        identity = load_or_create_identity(self.ssl_dir, now=NOW, key_size=2048)
        names = identity.certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        self.assertEqual(names[0], x509.DNSName(os.uname().nodename))

    def test_reuses_valid_identity(self) -> None:
        first = self.load()
        second = self.load(NOW + timedelta(days=100))
        self.assertEqual(second.serial_text, first.serial_text)
        self.assertEqual(second.certificate_der, first.certificate_der)
        self.assertEqual(public_der(second.key), public_der(first.key))

    def assertRegenerated(self, old: ServerIdentity, new: ServerIdentity) -> None:
        self.assertNotEqual(new.serial_text, old.serial_text)
        self.assertNotEqual(public_der(new.key), public_der(old.key))
        self.assertEqual((self.ssl_dir / CERT_FILE).read_bytes(), new.certificate_der)
        self.assertEqual(self.mode(KEY_FILE), 0o600)
        self.assertEqual(self.mode(CERT_FILE), 0o644)

    def test_regenerates_when_expired(self) -> None:
        old = self.load(NOW - timedelta(days=400))
        new = self.load()
        self.assertRegenerated(old, new)
        self.assertFalse(identity_needs_renewal(new, NOW))

    def test_regenerates_when_not_yet_valid(self) -> None:
        old = self.load(NOW + timedelta(days=2))
        new = self.load()
        self.assertFalse(identity_needs_renewal(new, NOW))
        self.assertNotEqual(new.serial_text, old.serial_text)

    def test_regenerates_when_key_mismatched(self) -> None:
        old = self.load()
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.ssl_dir / KEY_FILE).write_bytes(other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        new = self.load()
        self.assertRegenerated(old, new)
        self.assertNotEqual(public_der(new.key), public_der(other))

    def test_regenerates_when_key_missing(self) -> None:
        old = self.load()
        (self.ssl_dir / KEY_FILE).unlink()
        self.assertRegenerated(old, self.load())

    def test_regenerates_when_unreadable(self) -> None:
        old = self.load()
        (self.ssl_dir / CERT_FILE).write_bytes(b"not a certificate")
        new = self.load()
        self.assertEqual(self.mode(CERT_FILE), 0o644)
        self.assertNotEqual(public_der(new.key), public_der(old.key))
        (self.ssl_dir / KEY_FILE).write_bytes(b"garbage")
        newer = self.load()
        self.assertRegenerated(new, newer)

    def test_serial_never_reused_at_the_same_moment(self) -> None:
        """4.8's serial is the time in 0.52 s steps: a certificate made again
        at the same moment would get the old one's serial."""
        old = self.load()
        (self.ssl_dir / KEY_FILE).unlink()
        new = self.load()
        self.assertNotEqual(new.certificate.serial_number, old.certificate.serial_number)

    def test_servers_made_at_once_get_serials_a_client_can_trust_together(self) -> None:
        """Two servers' identities made in the same instant (a manager
        starting several, a fleet): different serials, or a client trusting
        both fails with SEC_ERROR_REUSED_ISSUER_AND_SERIAL (the issuer is the
        same fixed name for every server)."""
        serials = {load_or_create_identity(self.ssl_dir.parent / f"server-{n}", now=NOW,
                                           key_size=1024).certificate.serial_number
                   for n in range(8)}
        self.assertEqual(len(serials), 8)

    def test_key_file_never_created_wider(self) -> None:
        created: list[tuple[str, int]] = []
        real_open = os.open

        def recording_open(path: Any, flags: int, mode: int = 0o777, *,
                           dir_fd: int | None = None) -> int:
            fd = real_open(path, flags, mode, dir_fd=dir_fd)
            if flags & os.O_CREAT:
                created.append((os.path.basename(os.fspath(path)),
                                stat.S_IMODE(os.fstat(fd).st_mode)))
            return fd

        old_umask = os.umask(0)
        self.addCleanup(os.umask, old_umask)
        self.patch(os, "open", recording_open)
        self.load()
        key_files = [mode for name, mode in created if name.startswith(f".{KEY_FILE}.")]
        self.assertEqual(key_files, [0o600])
        self.assertEqual([entry for entry in created if entry[1] & 0o077], [])
        self.assertEqual(self.mode(KEY_FILE), 0o600)
        self.assertEqual(self.mode(CERT_FILE), 0o644)
        self.assertEqual(stat.S_IMODE(self.ssl_dir.stat().st_mode), 0o700)

    def test_existing_directory_kept(self) -> None:
        self.ssl_dir.mkdir(parents=True, mode=0o750)
        os.chmod(self.ssl_dir, 0o750)
        self.load()
        self.assertEqual(stat.S_IMODE(self.ssl_dir.stat().st_mode), 0o750)

    def test_logs_what_happened(self) -> None:
        with capturedLogs() as created:
            old = self.load(NOW - timedelta(days=400))
        with capturedLogs() as renewed:
            new = self.load()
        with capturedLogs() as reused:
            self.load()
        self.assertIn("does not exist", created[0]["log_format"])
        self.assertEqual([e["serial"] for e in created if "serial" in e], [old.serial_text])
        self.assertEqual([e["reason"] for e in renewed if "reason" in e],
                         ["the certificate is not valid now"])
        self.assertEqual([e["serial"] for e in renewed if "serial" in e], [new.serial_text])
        self.assertIn("Certificate is valid", [e["log_format"] for e in reused])
        self.assertEqual({e["log_namespace"] for e in created + renewed + reused}, {"stapsrv"})
