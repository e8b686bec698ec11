"""Shared pieces for tests: a quick identity, the fake translator, skips,
and the kernel release whose headers are installed."""

from __future__ import annotations

import functools
import os
import shutil
import stat
import sys
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.trial.unittest import SkipTest

from stapsrv.identity.certs import ServerIdentity, make_certificate
from stapsrv.paths import installed_releases

#: The tests directory and the checkout.
TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
DATA = TESTS / "data"
FAKESTAP = Path(__file__).with_name("fakestap.py")


@functools.lru_cache(maxsize=1)
def test_identity() -> ServerIdentity:
    """A 2048-bit identity, made once per test run (4096 is slow to make)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ServerIdentity(key, make_certificate(key, "testhost", datetime.now(timezone.utc)))


def install_fake_stap(directory: Path) -> Path:
    """An executable ``stap`` in ``directory`` running tests/fakestap.py."""
    path = directory / "stap"
    path.write_text(f"#!{sys.executable}\n" + FAKESTAP.read_text())
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def require(condition: bool, reason: str) -> None:
    """Skip when a system dependency is missing, except in CI where that fails."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        raise AssertionError(f"missing dependency in CI: {reason}")
    raise SkipTest(reason)


def require_program(name: str) -> str:
    found = shutil.which(name)
    require(found is not None, f"{name} is not installed (run 'make setup')")
    assert found is not None
    return found


def header_release() -> str | None:
    """The kernel release that tests needing headers build for: the newest
    one with an installed build tree, as the server and ``make serve``
    choose.  Never a literal: Debian's archive moves the ABI at every point
    release, and ``make setup`` installs whatever is newest then."""
    releases = installed_releases()
    return releases[-1] if releases else None


def require_header_release() -> str:
    """:func:`header_release`, skipping (failing in CI) when there is none."""
    release = header_release()
    require(release is not None, "no kernel headers installed (run 'make setup')")
    assert release is not None
    return release


#: DER DigestInfo prefixes (RFC 8017 §9.2, note 1) by hash name.
DIGEST_INFO = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
}


def signature_hash(public_key: rsa.RSAPublicKey, signature: bytes, data: bytes) -> str:
    """The hash a bare PKCS#1 v1.5 signature of ``data`` was made with, read
    from its DigestInfo as ``staprun``'s NSS does; raises AssertionError
    unless the signature is exactly that encoding of ``data``'s digest."""
    numbers = public_key.public_numbers()
    size = (numbers.n.bit_length() + 7) // 8
    assert len(signature) == size, f"signature is {len(signature)} bytes, key {size}"
    message = pow(int.from_bytes(signature, "big"), numbers.e, numbers.n).to_bytes(size, "big")
    for name, prefix in DIGEST_INFO.items():
        digest = hashes.Hash(hashes.SHA1() if name == "sha1" else hashes.SHA256())
        digest.update(data)
        tail = b"\x00" + prefix + digest.finalize()
        if message.endswith(tail):
            padding = message[: -len(tail)]
            assert padding == b"\x00\x01" + b"\xff" * (len(padding) - 2), "bad PKCS#1 padding"
            return name
    raise AssertionError("the signature is not a SHA-1 or SHA-256 signature of the data")

