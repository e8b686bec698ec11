"""Reading DER by hand, to check encodings byte for byte, and the kernel's
appended module signatures (``scripts/sign-file``) with it."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA512


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


MAGIC = b"~Module signature appended~\n"


def der_items(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Walk DER: yield (tag, value) of every element, depth first."""
    index = 0
    while index < len(data):
        tag, start, length = der_header(data, index)
        value = data[start:start + length]
        yield tag, value
        if tag & 0x20:  # constructed
            yield from der_items(value)
        index = start + length


def verify_appended_signature(module: bytes, certificate: x509.Certificate) -> bytes:
    """Check a kernel-style signature (scripts/sign-file) and return the content."""
    assert module.endswith(MAGIC), "no appended signature"
    trailer = module[: -len(MAGIC)]
    signature_length = struct.unpack(">I", trailer[-4:])[0]
    header = trailer[-12:]
    cms = trailer[-12 - signature_length:-12]
    content = trailer[: -12 - signature_length]
    assert header[2] == 2, "PKCS#7 signature id type"
    octets = [value for tag, value in der_items(cms) if tag == 0x04]
    public_key = certificate.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    size = public_key.key_size // 8
    signature = [value for value in octets if len(value) == size][-1]
    public_key.verify(signature, content, PKCS1v15(), SHA512())
    return content
def public_der(key: rsa.RSAPrivateKey) -> bytes:
    """The DER SubjectPublicKeyInfo of ``key``'s public half."""
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
