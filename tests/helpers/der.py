"""Reading DER by hand, to check encodings byte for byte."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def der_header(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, content offset, content length) of the DER element at ``offset``."""
    tag = data[offset]
    length = data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[offset:offset + count], "big")
        offset += count
    return tag, offset, length


def public_der(key: rsa.RSAPrivateKey) -> bytes:
    """The DER SubjectPublicKeyInfo of ``key``'s public half."""
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
