"""Fleet cache entries sealed with an HMAC under the fleet's secret.

Whoever can write to the fleet's Redis could otherwise plant a kernel
module that every server of the fleet hands to its clients.  An entry is::

    MAGIC | length of the answer (8 bytes, big-endian) | tag (32 bytes) | answer

where the tag is HMAC-SHA-256, under the fleet secret, of ``MAGIC``, the
cache key (its 32 bytes), the length and the answer.  The key is bound in,
so a genuine entry copied to another key does not open there; ``MAGIC``
names the format version, so a later format cannot be mistaken for this
one.  Only servers that hold the secret can make an entry that opens.
Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac

MAGIC = b"stapsrv-fleet-1\n"
_LENGTH_BYTES = 8
_TAG_BYTES = 32
HEADER_BYTES = len(MAGIC) + _LENGTH_BYTES + _TAG_BYTES


class RefusedEntry(Exception):
    """An entry that is not what a server of this fleet stored under the key."""


def _tag(secret: bytes, key: str, length: bytes, response: bytes) -> bytes:
    mac = hmac.new(secret, MAGIC, hashlib.sha256)
    mac.update(bytes.fromhex(key))
    mac.update(length)
    mac.update(response)
    return mac.digest()


def seal(secret: bytes, key: str, response: bytes) -> bytes:
    """The entry that stores ``response`` under ``key``."""
    length = len(response).to_bytes(_LENGTH_BYTES, "big")
    return MAGIC + length + _tag(secret, key, length, response) + response


def entry_size(response: bytes) -> int:
    """Bytes of the entry that stores ``response``."""
    return HEADER_BYTES + len(response)


def open_entry(secret: bytes, key: str, entry: bytes) -> bytes:
    """The answer sealed in ``entry`` under ``key``; ``RefusedEntry`` (saying
    why) for anything else."""
    if not entry.startswith(MAGIC):
        raise RefusedEntry("not a stapsrv fleet entry of format 1")
    if len(entry) < HEADER_BYTES:
        raise RefusedEntry("truncated header")
    length = entry[len(MAGIC):len(MAGIC) + _LENGTH_BYTES]
    tag = entry[len(MAGIC) + _LENGTH_BYTES:HEADER_BYTES]
    response = entry[HEADER_BYTES:]
    if int.from_bytes(length, "big") != len(response):
        raise RefusedEntry("length mismatch")
    if not hmac.compare_digest(tag, _tag(secret, key, length, response)):
        raise RefusedEntry("not authenticated: forged, moved from another key, "
                           "or sealed under another fleet secret")
    return response
