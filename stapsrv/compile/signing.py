"""Module signatures (``.sgn``) in the form ``staprun`` verifies.

A ``.sgn`` file is the bare PKCS#1 v1.5 RSA signature over the whole module
file, as long as the key's modulus (spec §5.6).  4.8's ``stap-serverd``
signs with SHA-1 and 5.5's with SHA-256.  What the client's ``staprun``
accepts decides which one it gets:

- 4.8's ``staprun`` lets NSS take the hash from the signature's DigestInfo,
  so it accepts either (checked here with the real 4.8 ``staprun``);
- 5.5's ``staprun`` asks NSS for SHA-256 first and only falls back to SHA-1
  when that context cannot be made, which does not happen for an RSA key:
  a SHA-1 signature is reported as an altered module (checked here with the
  real 5.5 ``staprun``).

So clients of 4.8 and later get SHA-256; older ones, which no test here can
run, keep the SHA-1 signature 4.8's server gave them.  PKCS#1 v1.5 is
deterministic, so for the same key and digest the bytes equal upstream's.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from stapsrv.core.members import version_key

SIGNATURE_SUFFIX = ".sgn"
#: The first client version known to verify SHA-256 module signatures.
SHA256_SINCE = "4.8"


def signature_digest(client_version: str) -> hashes.HashAlgorithm:
    """The digest a client of ``client_version`` gets its modules signed with."""
    if version_key(client_version) >= version_key(SHA256_SINCE):
        return hashes.SHA256()
    return hashes.SHA1()


def sign_module(key: rsa.RSAPrivateKey, module_bytes: bytes,
                digest: hashes.HashAlgorithm) -> bytes:
    """The raw RSA PKCS#1 v1.5 signature of ``module_bytes``."""
    return key.sign(module_bytes, padding.PKCS1v15(), digest)


def signature_path(ko_path: Path) -> Path:
    """``<module>.ko.sgn`` next to the module."""
    return ko_path.with_name(ko_path.name + SIGNATURE_SUFFIX)


def sign_module_file(key: rsa.RSAPrivateKey, ko_path: Path,
                     digest: hashes.HashAlgorithm) -> Path:
    """Sign the module at ``ko_path`` into ``<ko_path>.sgn`` and return that path."""
    path = signature_path(ko_path)
    path.write_bytes(sign_module(key, ko_path.read_bytes(), digest))
    return path
