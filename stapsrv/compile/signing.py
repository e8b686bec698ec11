"""Module signatures (``.sgn``) as 4.8's ``nsscommon.cxx: sign_file`` writes them.

A ``.sgn`` file is the bare PKCS#1 v1.5 RSA signature (SHA-1 DigestInfo)
over the whole module file, as long as the key's modulus (spec §5.6).
PKCS#1 v1.5 is deterministic, so the bytes equal 4.8's for the same key.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

SIGNATURE_SUFFIX = ".sgn"


def sign_module(key: rsa.RSAPrivateKey, module_bytes: bytes) -> bytes:
    """The raw RSA PKCS#1 v1.5 SHA-1 signature of ``module_bytes``."""
    return key.sign(module_bytes, padding.PKCS1v15(), hashes.SHA1())


def signature_path(ko_path: Path) -> Path:
    """``<module>.ko.sgn`` next to the module."""
    return ko_path.with_name(ko_path.name + SIGNATURE_SUFFIX)


def sign_module_file(key: rsa.RSAPrivateKey, ko_path: Path) -> Path:
    """Sign the module at ``ko_path`` into ``<ko_path>.sgn`` and return that path."""
    path = signature_path(ko_path)
    path.write_bytes(sign_module(key, ko_path.read_bytes()))
    return path
