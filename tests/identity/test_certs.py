"""The server certificate against spec §2.4-§2.6 and the real 4.8 sample."""

from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase

from stapsrv.identity import certs
from stapsrv.identity.certs import (
    SUBJECT,
    ServerIdentity,
    cert_serial_text,
    identity_needs_renewal,
    make_certificate,
    serial_for_time,
)
from stapsrv.identity.store import CERT_FILE, KEY_FILE, load_or_create_identity
from tests.helpers import DATA
from tests.helpers.der import der_header

#: Copy of spec/samples/real-stap-serverd-4.8-cert.der (a fresh 4.8 ``stap.cert``).
SAMPLE = DATA / "samples" / "real-stap-serverd-4.8-cert.der"
NOW = datetime(2026, 11, 26, 12, 30, 15, 123456, tzinfo=timezone.utc)


def sample_certificate() -> x509.Certificate:
    return x509.load_der_x509_certificate(SAMPLE.read_bytes())


def encoded_serial(certificate: x509.Certificate) -> bytes:
    """The serial INTEGER's content bytes, read from the TBS DER itself."""
    tbs = certificate.tbs_certificate_bytes
    _, offset, _ = der_header(tbs, 0)                      # TBSCertificate SEQUENCE
    tag, content, length = der_header(tbs, offset)         # [0] version
    assert tag == 0xA0
    tag, content, length = der_header(tbs, content + length)  # serialNumber
    assert tag == 0x02
    return tbs[content:content + length]


_KEY: rsa.RSAPrivateKey | None = None


def small_key() -> rsa.RSAPrivateKey:
    """One 2048-bit key shared by the certificate-shape tests."""
    global _KEY
    if _KEY is None:
        _KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _KEY


def public_der(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


class SampleTests(TestCase):
    """Our constants reproduce what the real 4.8 certificate contains."""

    def test_subject_bytes_equal_sample(self) -> None:
        sample = sample_certificate()
        self.assertEqual(SUBJECT.public_bytes(), sample.subject.public_bytes())
        self.assertEqual(SUBJECT.public_bytes(), sample.issuer.public_bytes())

    def test_sample_serial_text(self) -> None:
        self.assertEqual(cert_serial_text(sample_certificate()), "00:cc:24:a6:36")

    def test_sample_serial_is_five_bytes(self) -> None:
        self.assertEqual(encoded_serial(sample_certificate()), bytes.fromhex("00cc24a636"))

    def test_extensions_mirror_sample(self) -> None:
        sample = sample_certificate()
        ours = make_certificate(small_key(), "vm", NOW)
        self.assertEqual([(e.oid, e.critical) for e in ours.extensions],
                         [(e.oid, e.critical) for e in sample.extensions])
        self.assertEqual(ours.signature_algorithm_oid, sample.signature_algorithm_oid)

    def test_sample_san_shape(self) -> None:
        names = sample_certificate().extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        self.assertEqual(list(names), [x509.DNSName("vm"), x509.DNSName("vm.local")])


class SerialTextTests(TestCase):
    def _text(self, serial: int) -> str:
        key = small_key()
        return cert_serial_text(
            x509.CertificateBuilder().subject_name(SUBJECT).issuer_name(SUBJECT)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(NOW).not_valid_after(NOW + timedelta(days=1))
            .sign(key, hashes.SHA256()))

    def test_leading_zero_when_top_bit_set(self) -> None:
        self.assertEqual(self._text(0x80), "00:80")
        self.assertEqual(self._text(0xCC24A636), "00:cc:24:a6:36")

    def test_no_leading_zero_otherwise(self) -> None:
        self.assertEqual(self._text(0x7F), "7f")
        self.assertEqual(self._text(0x1234), "12:34")
        self.assertEqual(self._text(0x7FFFFFFF), "7f:ff:ff:ff")


class MakeCertificateTests(TestCase):
    """Every field of spec §2.6, parsed back from the DER."""

    def setUp(self) -> None:
        self.key = small_key()
        der = make_certificate(self.key, "vm.example.org", NOW, ["build.example.org"]) \
            .public_bytes(serialization.Encoding.DER)
        self.cert = x509.load_der_x509_certificate(der)

    def test_subject_and_issuer(self) -> None:
        sample = sample_certificate()
        self.assertEqual(self.cert.subject.public_bytes(), sample.subject.public_bytes())
        self.assertEqual(self.cert.issuer.public_bytes(), self.cert.subject.public_bytes())

    def test_version_and_signature(self) -> None:
        self.assertEqual(self.cert.version, x509.Version.v3)
        self.assertEqual(self.cert.signature_algorithm_oid,
                         SignatureAlgorithmOID.RSA_WITH_SHA256)
        public_key = self.cert.public_key()
        assert isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(self.cert.signature, self.cert.tbs_certificate_bytes,
                          padding.PKCS1v15(), hashes.SHA256())
        self.assertEqual(public_der(self.key), public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))

    def test_serial_is_time_based_and_five_bytes(self) -> None:
        microseconds = int(NOW.replace(microsecond=0).timestamp()) * 10 ** 6 + NOW.microsecond
        self.assertEqual(self.cert.serial_number, microseconds >> 19)
        self.assertEqual(len(encoded_serial(self.cert)), 5)
        self.assertEqual(encoded_serial(self.cert)[0], 0)
        self.assertEqual(len(cert_serial_text(self.cert).split(":")), 5)

    def test_serial_for_time(self) -> None:
        microseconds = int(NOW.replace(microsecond=0).timestamp()) * 10 ** 6 + NOW.microsecond
        self.assertEqual(serial_for_time(NOW), microseconds >> 19)
        self.assertEqual(serial_for_time(NOW.astimezone(timezone(timedelta(hours=5)))),
                         serial_for_time(NOW))
        self.assertGreaterEqual(serial_for_time(NOW), 2 ** 31)

    def test_serial_out_of_range(self) -> None:
        for serial in (2 ** 31 - 1, 2 ** 39):
            self.assertRaises(ValueError, make_certificate, self.key, "vm", NOW, serial=serial)

    def test_naive_datetime_refused(self) -> None:
        self.assertRaises(ValueError, make_certificate, self.key, "vm", NOW.replace(tzinfo=None))

    def test_subject_alt_names_in_order(self) -> None:
        extension = self.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertFalse(extension.critical)
        self.assertEqual(list(extension.value), [
            x509.DNSName("vm.example.org"), x509.DNSName("vm.local"),
            x509.DNSName("build.example.org")])

    def test_duplicates_skipped_and_other_names_allowed(self) -> None:
        cert = make_certificate(self.key, "vm", NOW, [
            "vm.local", "vm", "other", x509.IPAddress(IPv4Address("127.0.0.1")), "other"])
        names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        self.assertEqual(names, [x509.DNSName("vm"), x509.DNSName("vm.local"),
                                 x509.DNSName("other"),
                                 x509.IPAddress(IPv4Address("127.0.0.1"))])
        self.assertIsInstance(names[0], x509.DNSName)

    def test_empty_nodename_refused(self) -> None:
        self.assertRaises(ValueError, make_certificate, self.key, "", NOW)

    def test_netscape_cert_type(self) -> None:
        extension = self.cert.extensions.get_extension_for_oid(certs.NS_CERT_TYPE_OID)
        self.assertTrue(extension.critical)
        assert isinstance(extension.value, x509.UnrecognizedExtension)
        self.assertEqual(extension.value.value, bytes.fromhex("03020051"))

    def test_no_constraints_or_usages(self) -> None:
        for oid in (ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
                    ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
                    ExtensionOID.AUTHORITY_KEY_IDENTIFIER):
            self.assertRaises(x509.ExtensionNotFound,
                              self.cert.extensions.get_extension_for_oid, oid)
        self.assertEqual(len(self.cert.extensions), 2)

    def test_validity_window(self) -> None:
        start = NOW.replace(microsecond=0)
        self.assertEqual(self.cert.not_valid_before_utc, start - timedelta(hours=1))
        self.assertEqual(self.cert.not_valid_after_utc, start + timedelta(days=365))

    def test_identity_properties(self) -> None:
        identity = ServerIdentity(self.key, self.cert)
        self.assertEqual(identity.serial_text, cert_serial_text(self.cert))
        self.assertEqual(identity.certificate_der,
                         self.cert.public_bytes(serialization.Encoding.DER))

    def test_needs_renewal(self) -> None:
        identity = ServerIdentity(self.key, self.cert)
        self.assertFalse(identity_needs_renewal(identity, NOW))
        self.assertFalse(identity_needs_renewal(identity, NOW - timedelta(minutes=59)))
        self.assertTrue(identity_needs_renewal(identity, NOW - timedelta(hours=2)))
        self.assertTrue(identity_needs_renewal(identity, NOW + timedelta(days=366)))


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
        self.assertGreater(new.certificate.serial_number, old.certificate.serial_number)
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

    def test_serial_never_reused_within_one_tick(self) -> None:
        """Same 0.52 s serial window: the new certificate still gets a new serial."""
        old = self.load()
        (self.ssl_dir / KEY_FILE).unlink()
        new = self.load()
        self.assertEqual(new.certificate.serial_number, old.certificate.serial_number + 1)

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
