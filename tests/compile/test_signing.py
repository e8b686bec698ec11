"""``.sgn`` module signatures (spec §5.6) and the digest each client gets."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from twisted.trial.unittest import TestCase

from stapsrv.compile.signing import sign_module, sign_module_file, signature_digest
from stapsrv.identity.store import load_or_create_identity
from tests.helpers import signature_hash, test_identity

MODULE = b"\x7fELF" + bytes(range(256)) * 40


class DigestRuleTests(TestCase):
    def test_current_clients_get_sha256(self) -> None:
        for version in ("4.8", "4.9", "5.0", "5.5", "10.1"):
            self.assertIsInstance(signature_digest(version), hashes.SHA256, version)

    def test_older_clients_keep_sha1(self) -> None:
        for version in ("1.6", "2.0", "4.7", "4.7.9", "", "garbage"):
            self.assertIsInstance(signature_digest(version), hashes.SHA1, version)


class SignModuleTests(TestCase):
    def setUp(self) -> None:
        self.key = test_identity().key

    def test_each_digest_verifies_with_pkcs1(self) -> None:
        for digest in (hashes.SHA1(), hashes.SHA256()):
            signature = sign_module(self.key, MODULE, digest)
            self.assertEqual(len(signature), 256)
            self.key.public_key().verify(signature, MODULE, PKCS1v15(), digest)

    def test_certificate_key_verifies(self) -> None:
        signature = sign_module(self.key, MODULE, hashes.SHA256())
        certificate_key = test_identity().certificate.public_key()
        assert isinstance(certificate_key, rsa.RSAPublicKey)
        certificate_key.verify(signature, MODULE, PKCS1v15(), hashes.SHA256())

    def test_raw_pkcs1_digest_info(self) -> None:
        """No wrapper: the signature is exactly EMSA-PKCS1-v1_5 over the digest."""
        public = self.key.public_key()
        self.assertEqual(signature_hash(public, sign_module(self.key, MODULE, hashes.SHA1()),
                                        MODULE), "sha1")
        self.assertEqual(signature_hash(public, sign_module(self.key, MODULE, hashes.SHA256()),
                                        MODULE), "sha256")

    def test_deterministic(self) -> None:
        self.assertEqual(sign_module(self.key, MODULE, hashes.SHA256()),
                         sign_module(self.key, MODULE, hashes.SHA256()))

    def test_tampered_module_fails(self) -> None:
        signature = sign_module(self.key, MODULE, hashes.SHA256())
        tampered = bytearray(MODULE)
        tampered[100] ^= 1
        self.assertRaises(InvalidSignature, self.key.public_key().verify,
                          signature, bytes(tampered), PKCS1v15(), hashes.SHA256())
        self.assertRaises(AssertionError, signature_hash,
                          self.key.public_key(), signature, bytes(tampered))

    def test_digests_are_not_interchangeable(self) -> None:
        signature = sign_module(self.key, MODULE, hashes.SHA1())
        self.assertRaises(InvalidSignature, self.key.public_key().verify,
                          signature, MODULE, PKCS1v15(), hashes.SHA256())


class SignModuleFileTests(TestCase):
    def test_writes_sgn_next_to_module(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        module = directory / "stap_0123_456.ko"
        module.write_bytes(MODULE)
        key = test_identity().key
        path = sign_module_file(key, module, hashes.SHA256())
        self.assertEqual(path, directory / "stap_0123_456.ko.sgn")
        self.assertEqual(path.read_bytes(), sign_module(key, MODULE, hashes.SHA256()))
        self.assertEqual(module.read_bytes(), MODULE)

    def test_rsa_4096_identity(self) -> None:
        """The default (4096-bit) identity makes 512-byte signatures."""
        directory = Path(self.mktemp())
        identity = load_or_create_identity(directory / "ssl", "testhost",
                                           datetime.now(timezone.utc))
        self.assertEqual(identity.key.key_size, 4096)
        self.assertEqual(identity.key.public_key().public_numbers().e, 65537)
        module = directory / "big.ko"
        module.write_bytes(MODULE * 8)
        signature = sign_module_file(identity.key, module, hashes.SHA256()).read_bytes()
        self.assertEqual(len(signature), 512)
        certificate_key = identity.certificate.public_key()
        assert isinstance(certificate_key, rsa.RSAPublicKey)
        certificate_key.verify(signature, MODULE * 8, PKCS1v15(), hashes.SHA256())
        self.assertRaises(InvalidSignature, certificate_key.verify,
                          signature, MODULE * 8 + b"\0", PKCS1v15(), hashes.SHA256())
