"""Secure Boot signing with machine owner keys (MOK)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.hashes import SHA256
from twisted.trial.unittest import TestCase

from stapsrv.identity import mok
from tests.helpers import require, require_header_release
from tests.helpers.archives import make_zip
from tests.helpers.archives import RELEASE
from tests.helpers.der import verify_appended_signature
from tests.helpers.handlers import HandlerCase

class StoreTests(TestCase):
    def setUp(self) -> None:
        self.store = Path(self.mktemp())

    def test_generated_mok_profile(self) -> None:
        name = mok.generate(self.store, key_size=2048)
        self.assertEqual(mok.server_moks(self.store), [name])
        certificate = x509.load_der_x509_certificate(
            (self.store / name / mok.CERTIFICATE).read_bytes())
        self.assertEqual(certificate.subject.rfc4514_string(),
                         "CN=Systemtap module signing key,O=Systemtap")
        self.assertFalse(certificate.extensions.get_extension_for_class(
            x509.BasicConstraints).value.ca)
        self.assertTrue(certificate.extensions.get_extension_for_class(
            x509.KeyUsage).value.digital_signature)
        self.assertEqual(os.stat(self.store / name / mok.PRIVATE_KEY).st_mode & 0o777, 0o600)
        self.assertEqual(name, mok.fingerprint(certificate.public_bytes(
            __import__("cryptography.hazmat.primitives.serialization",
                       fromlist=["Encoding"]).Encoding.DER)))

    def test_invalid_entries_are_not_moks(self) -> None:
        name = mok.generate(self.store, key_size=2048)
        (self.store / "not-a-fingerprint").mkdir()
        wrong = self.store / "aa:bb"
        wrong.mkdir()
        (wrong / mok.PRIVATE_KEY).write_text("x")
        (wrong / mok.CERTIFICATE).write_bytes((self.store / name / mok.CERTIFICATE).read_bytes())
        self.assertEqual(mok.server_moks(self.store), [name])
        self.assertTrue(mok.remove(self.store, name))
        self.assertEqual(mok.server_moks(self.store), [])
        self.assertFalse(mok.remove(self.store, "../x"))

    def test_each_mok_is_known_by_both_fingerprints(self) -> None:
        name = mok.generate(self.store, key_size=2048)
        der = (self.store / name / mok.CERTIFICATE).read_bytes()
        sha256 = mok.fingerprint(der, SHA256())
        self.assertEqual(len(sha256.split(":")), 32)
        self.assertEqual(mok.fingerprints(der), (name, sha256))
        self.assertEqual(mok.advertised_fingerprints(self.store), [name, sha256])
        self.assertEqual(mok.matching_mok(self.store, ("11:22", sha256)), name)
        self.assertEqual(mok.matching_mok(self.store, (name,)), name)
        self.assertIsNone(mok.matching_mok(self.store, ("11:22", "missing")))

    def test_store_entry_named_by_sha256_as_5_5_lays_it_out(self) -> None:
        name = mok.generate(self.store, key_size=2048)
        der = (self.store / name / mok.CERTIFICATE).read_bytes()
        sha256 = mok.fingerprint(der, SHA256())
        (self.store / name).rename(self.store / sha256)
        self.assertEqual(mok.server_moks(self.store), [sha256])
        self.assertEqual(mok.matching_mok(self.store, (name,)), sha256)
        self.assertEqual(mok.advertised_fingerprints(self.store), [name, sha256])

    def test_client_fingerprints(self) -> None:
        parsed = mok.parse_client_fingerprints(b"ab:cd:ef\nmissing\nAB:CD\n; rm -rf /\n")
        self.assertEqual(parsed.fingerprints, ("ab:cd:ef", "missing"))
        self.assertEqual(parsed.complaints, (
            "Server: MOK fingerprint value 'AB:CD' isn't in the correct format",
            "Server: MOK fingerprint value '; rm -rf /' isn't in the correct format"))


def mok_request(fingerprints: bytes, version: bytes = b"4.8",
                release: str = RELEASE) -> bytes:
    return make_zip([("argv1", b"-p4", 0o100644), ("argv2", b"-eok", 0o100644),
                     ("sysinfo", f"sysinfo: {release} x86_64".encode(), 0o100644),
                     ("locale", b"LANG=C\n", 0o100644), ("version", version, 0o100644),
                     ("mok_fingerprints", fingerprints, 0o100644)])


class MokRequestTests(HandlerCase):
    """Requests built like the captured ones plus a mok_fingerprints member."""

    def setUp(self) -> None:
        super().setUp()
        self.store = self.base / "moks"

    def mok_handler(self, release: str = RELEASE):  # type: ignore[no-untyped-def]
        return self.handler(mok_store=self.store, releases=(release,))

    async def test_common_mok_signs_the_module(self) -> None:
        # Signing runs the kernel's own scripts/sign-file: a real build tree.
        release = require_header_release()
        sign_file = Path("/lib/modules") / release / "build" / "scripts" / "sign-file"
        require(sign_file.exists(), f"{sign_file} is missing (linux-headers-{release})")
        mok.generate(self.store, key_size=2048)
        name = mok.generate(self.store, key_size=2048)
        found = await self.answer(
            mok_request(f"11:22:33\n{name}\n".encode(), release=release),
            self.mok_handler(release))
        self.assertEqual(found["rc"], b"0", found.get("stderr"))
        certificate = x509.load_der_x509_certificate(
            (self.store / name / mok.CERTIFICATE).read_bytes())
        content = verify_appended_signature(found["stap000000/stap_fake_1.ko"], certificate)
        self.assertTrue(content.startswith(b"\x7fELF fake module"))
        self.assertNotIn("signing_key.x509", found)

    async def test_sha256_fingerprint_of_a_5_5_client_signs_the_module(self) -> None:
        release = require_header_release()
        name = mok.generate(self.store, key_size=2048)
        der = (self.store / name / mok.CERTIFICATE).read_bytes()
        found = await self.answer(
            mok_request(f"{mok.fingerprint(der, SHA256())}\n".encode(), version=b"5.5",
                        release=release),
            self.mok_handler(release))
        self.assertEqual(found["rc"], b"0", found.get("stderr"))
        verify_appended_signature(found["stap000000/stap_fake_1.ko"],
                                  x509.load_der_x509_certificate(der))

    async def test_no_common_mok_sends_ours_and_fails(self) -> None:
        found = await self.answer(mok_request(b"11:22:33:44\n"), self.mok_handler())
        self.assertEqual(found["rc"], b"1")
        [name] = mok.server_moks(self.store)  # generated on demand
        self.assertEqual(found["signing_key.x509"],
                         (self.store / name / mok.CERTIFICATE).read_bytes())
        self.assertTrue(found["stderr"].endswith((
            "Server: No matching machine owner key (MOK) available on the server to sign the\n"
            " module.\n"
            "Server: The server has no machine owner key (MOK) in common with this\n"
            "system. Use the following command to import a server MOK into this\n"
            "system, then reboot:\n\n\tmokutil --import signing_key.x509\n").encode()))

    async def test_missing_means_no_common_mok(self) -> None:
        name = mok.generate(self.store, key_size=2048)
        found = await self.answer(mok_request(b"missing\n"), self.mok_handler())
        self.assertEqual(found["rc"], b"1")
        self.assertEqual(found["signing_key.x509"],
                         (self.store / name / mok.CERTIFICATE).read_bytes())

    async def test_malformed_fingerprints_are_reported_first(self) -> None:
        found = await self.answer(mok_request(b"XYZ\n"), self.mok_handler())
        self.assertTrue(found["stderr"].startswith(
            b"Server: MOK fingerprint value 'XYZ' isn't in the correct format\n"))

    async def test_old_clients_mok_list_is_ignored(self) -> None:
        body = mok_request(b"11:22\n", version=b"1.5")
        found = await self.answer(body, self.mok_handler())
        self.assertEqual(found["rc"], b"0")
        self.assertNotIn("signing_key.x509", found)
