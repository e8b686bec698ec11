"""Sealed fleet entries (stapsrv.cache.sealed): only the fleet secret makes
an entry that opens, and only under the key it was sealed for."""

from __future__ import annotations

import hashlib
import os

from twisted.trial.unittest import TestCase

from stapsrv.cache.sealed import HEADER_BYTES, MAGIC, RefusedEntry, entry_size, open_entry, seal
from stapsrv.cache.store import encode_entry
from tests.helpers.handlers import KEY_A, KEY_B

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))


class SealTests(TestCase):
    def refusal(self, entry: bytes, key: str = KEY_A, secret: bytes = SECRET) -> str:
        with self.assertRaises(RefusedEntry) as caught:
            open_entry(secret, key, entry)
        return str(caught.exception)

    def test_round_trip(self) -> None:
        entry = seal(SECRET, KEY_A, b"PK answer")
        self.assertEqual(open_entry(SECRET, KEY_A, entry), b"PK answer")
        self.assertEqual(len(entry), entry_size(b"PK answer"))
        self.assertEqual(open_entry(SECRET, KEY_A, seal(SECRET, KEY_A, b"")), b"")

    def test_the_format_carries_its_version(self) -> None:
        entry = seal(SECRET, KEY_A, b"PK answer")
        self.assertTrue(entry.startswith(b"stapsrv-fleet-1\n"))
        self.assertIn("format 1", self.refusal(b"stapsrv-fleet-2\n" + entry[len(MAGIC):]))

    def test_another_secret_is_refused(self) -> None:
        self.assertIn("not authenticated", self.refusal(seal(OTHER, KEY_A, b"PK forged")))

    def test_an_entry_moved_to_another_key_is_refused(self) -> None:
        self.assertIn("moved from another key",
                      self.refusal(seal(SECRET, KEY_B, b"PK of B"), key=KEY_A))

    def test_every_changed_byte_is_refused(self) -> None:
        entry = seal(SECRET, KEY_A, b"PK answer")
        for index in range(len(entry)):
            changed = bytearray(entry)
            changed[index] ^= 0x40
            self.assertRaises(RefusedEntry, open_entry, SECRET, KEY_A, bytes(changed))

    def test_cut_or_extended_entries_are_refused(self) -> None:
        entry = seal(SECRET, KEY_A, b"PK answer")
        self.assertIn("truncated header", self.refusal(entry[:HEADER_BYTES - 1]))
        self.assertIn("length mismatch", self.refusal(entry[:-1]))
        self.assertIn("length mismatch", self.refusal(entry + b"x"))

    def test_a_self_checked_entry_is_not_enough(self) -> None:
        """The disk format (a plain sha256 anyone can compute) never opens,
        nor does a sealed entry whose tag is a plain hash."""
        self.refusal(encode_entry(KEY_A, b"PK forged"))
        forged = seal(SECRET, KEY_A, b"PK forged")
        tag_at = len(MAGIC) + 8
        plain = hashlib.sha256(forged[:tag_at] + forged[HEADER_BYTES:]).digest()
        self.refusal(forged[:tag_at] + plain + forged[HEADER_BYTES:])
        self.refusal(forged[:tag_at] + os.urandom(32) + forged[HEADER_BYTES:])
