"""``.sgn`` module signatures (spec §5.6)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA1
from twisted.trial.unittest import TestCase

from stapsrv.compile.signing import sign_module, sign_module_file
from stapsrv.identity.store import load_or_create_identity
from tests.helpers import test_identity

MODULE = b"\x7fELF" + bytes(range(256)) * 40
#: DER DigestInfo prefix of a SHA-1 hash (RFC 8017 §9.2, note 1).
SHA1_DIGEST_INFO = bytes.fromhex("3021300906052b0e03021a05000414")


def recovered_message(key: rsa.RSAPrivateKey, signature: bytes) -> bytes:
    """Raw RSA "decryption" of a signature with the public exponent."""
    numbers = key.public_key().public_numbers()
    size = (numbers.n.bit_length() + 7) // 8
    value = pow(int.from_bytes(signature, "big"), numbers.e, numbers.n)
    return value.to_bytes(size, "big")


class SignModuleTests(TestCase):
    def setUp(self) -> None:
        self.key = test_identity().key

    def test_verifies_with_sha1_pkcs1(self) -> None:
        signature = sign_module(self.key, MODULE)
        self.assertEqual(len(signature), 256)
        self.key.public_key().verify(signature, MODULE, PKCS1v15(), SHA1())

    def test_certificate_key_verifies(self) -> None:
        signature = sign_module(self.key, MODULE)
        certificate_key = test_identity().certificate.public_key()
        assert isinstance(certificate_key, rsa.RSAPublicKey)
        certificate_key.verify(signature, MODULE, PKCS1v15(), SHA1())

    def test_raw_pkcs1_sha1_digest_info(self) -> None:
        """No wrapper: the signature is exactly EMSA-PKCS1-v1_5 over SHA-1."""
        signature = sign_module(self.key, MODULE)
        message = recovered_message(self.key, signature)
        digest = hashes.Hash(hashes.SHA1())
        digest.update(MODULE)
        self.assertTrue(message.startswith(b"\x00\x01\xff"))
        self.assertTrue(message.endswith(b"\x00" + SHA1_DIGEST_INFO + digest.finalize()))

    def test_deterministic(self) -> None:
        self.assertEqual(sign_module(self.key, MODULE), sign_module(self.key, MODULE))

    def test_tampered_module_fails(self) -> None:
        signature = sign_module(self.key, MODULE)
        tampered = bytearray(MODULE)
        tampered[100] ^= 1
        self.assertRaises(InvalidSignature, self.key.public_key().verify,
                          signature, bytes(tampered), PKCS1v15(), SHA1())

    def test_sha256_is_not_what_we_sign(self) -> None:
        signature = sign_module(self.key, MODULE)
        self.assertRaises(InvalidSignature, self.key.public_key().verify,
                          signature, MODULE, PKCS1v15(), hashes.SHA256())


class SignModuleFileTests(TestCase):
    def test_writes_sgn_next_to_module(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        module = directory / "stap_0123_456.ko"
        module.write_bytes(MODULE)
        key = test_identity().key
        path = sign_module_file(key, module)
        self.assertEqual(path, directory / "stap_0123_456.ko.sgn")
        self.assertEqual(path.read_bytes(), sign_module(key, MODULE))
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
        signature = sign_module_file(identity.key, module).read_bytes()
        self.assertEqual(len(signature), 512)
        certificate_key = identity.certificate.public_key()
        assert isinstance(certificate_key, rsa.RSAPublicKey)
        certificate_key.verify(signature, MODULE * 8, PKCS1v15(), SHA1())
        self.assertRaises(InvalidSignature, certificate_key.verify,
                          signature, MODULE * 8 + b"\0", PKCS1v15(), SHA1())
