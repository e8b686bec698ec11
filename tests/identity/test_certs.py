"""The server certificate against spec §2.4-§2.6 and the real 4.8 sample."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID
from twisted.trial.unittest import TestCase

from stapsrv.identity import certs
from stapsrv.identity.certs import (
    SUBJECT,
    ServerIdentity,
    cert_serial_text,
    identity_needs_renewal,
    make_certificate,
    new_serial,
    serial_content_bytes,
)
from tests.helpers import DATA
from tests.helpers.der import der_header, public_der

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

    def test_serial_is_five_bytes(self) -> None:
        self.assertEqual(len(encoded_serial(self.cert)), 5)
        self.assertNotEqual(encoded_serial(self.cert)[0], 0)
        self.assertEqual(len(cert_serial_text(self.cert).split(":")), 5)

    def test_new_serials(self) -> None:
        drawn = [new_serial() for _ in range(1000)]
        self.assertEqual(len(set(drawn)), 1000)
        for serial in drawn:
            self.assertTrue(2 ** 32 <= serial < 2 ** 39, hex(serial))
            self.assertEqual(len(serial_content_bytes(serial)), 5)
        # Never the one it replaces.
        self.assertNotEqual(new_serial(previous=drawn[0]), drawn[0])

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


