"""Machine owner keys (MOK): signing modules for Secure Boot clients.

The store is ``<server certificate directory>/moks/<fingerprint>/`` with
``signing_key.priv`` (PEM key) and ``signing_key.x509`` (DER certificate),
as 4.8 lays it out; the fingerprint is the certificate's SHA-1, lowercase
hex pairs joined by ``:`` (what ``mokutil`` prints and 4.8 uses).  5.5
names and matches MOKs by SHA-256 instead, and its client passes on
whichever form ``mokutil`` shows, so each MOK is known by both: a
directory named by either form is valid, a client fingerprint in either
form finds it, and both are advertised.  A client that needs signed
modules sends the fingerprints of its enrolled keys; when one is in the
store, the module is signed with the kernel's ``scripts/sign-file``.
Administrators use ``python -m stapsrv.cli.mok list|generate|remove``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


PRIVATE_KEY = "signing_key.priv"
CERTIFICATE = "signing_key.x509"
_FINGERPRINT = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2})+")

NO_MATCH = ("Server: No matching machine owner key (MOK) available on the server to sign the\n"
            " module.")
SENT_CERTIFICATE = (
    "Server: The server has no machine owner key (MOK) in common with this\n"
    "system. Use the following command to import a server MOK into this\n"
    "system, then reboot:\n\n\tmokutil --import signing_key.x509")


def fingerprint(certificate_der: bytes,
                algorithm: hashes.HashAlgorithm = hashes.SHA1()) -> str:
    digest = hashes.Hash(algorithm)
    digest.update(certificate_der)
    return ":".join(f"{byte:02x}" for byte in digest.finalize())


def fingerprints(certificate_der: bytes) -> tuple[str, str]:
    """The SHA-1 (4.8, mokutil) and SHA-256 (5.5) fingerprints."""
    return fingerprint(certificate_der), fingerprint(certificate_der, hashes.SHA256())


@frozen
class ClientFingerprints:
    fingerprints: tuple[str, ...]
    complaints: tuple[str, ...]


def parse_client_fingerprints(data: bytes) -> ClientFingerprints:
    """Lines of ``mok_fingerprints``: fingerprints, or ``missing`` when the
    client has no key enrolled; anything else is reported."""
    found = []
    complaints = []
    for line in data.decode("utf-8", "replace").splitlines():
        value = line.strip()
        if not value:
            continue
        if value == "missing" or _FINGERPRINT.fullmatch(value):
            found.append(value)
        else:
            complaints.append(f"Server: MOK fingerprint value '{value}' isn't in the correct format")
    return ClientFingerprints(tuple(found), tuple(complaints))


def known_moks(store: Path) -> dict[str, tuple[str, str]]:
    """Valid MOKs of the store, sorted by directory name, each with its
    fingerprints: a well-formed directory name equal to one of its
    certificate's fingerprints, and a private key beside it."""
    valid = {}
    try:
        entries = sorted(store.iterdir())
    except OSError:
        return {}
    for entry in entries:
        if not _FINGERPRINT.fullmatch(entry.name) or not (entry / PRIVATE_KEY).is_file():
            continue
        try:
            certificate = (entry / CERTIFICATE).read_bytes()
        except OSError:
            continue
        both = fingerprints(certificate)
        if entry.name in both:
            valid[entry.name] = both
    return valid


def server_moks(store: Path) -> list[str]:
    """The directory names of the store's valid MOKs, sorted."""
    return list(known_moks(store))


def advertised_fingerprints(store: Path) -> list[str]:
    """Every fingerprint of every valid MOK, SHA-1 then SHA-256 for each, as
    ``mok_info`` entries: a 4.8 client matches the first, a 5.5 client either."""
    return [value for both in known_moks(store).values() for value in both]


def matching_mok(store: Path, client_fingerprints: tuple[str, ...]) -> str | None:
    """The directory of the first MOK, in the client's order, that the client
    has enrolled (by either fingerprint), or None."""
    by_fingerprint = {value: name for name, both in known_moks(store).items() for value in both}
    return next((by_fingerprint[value] for value in client_fingerprints
                 if value in by_fingerprint), None)


def generate(store: Path, key_size: int = 4096, now: datetime | None = None) -> str:
    """A new MOK in 4.8's profile; returns its fingerprint."""
    now = now or datetime.now(timezone.utc)
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Systemtap"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Systemtap module signing key")])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=36500))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256()))
    der = certificate.public_bytes(serialization.Encoding.DER)
    name_fp = fingerprint(der)
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = Path(tempfile.mkdtemp(prefix=".new-", dir=store))
    fd = os.open(work / PRIVATE_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    (work / CERTIFICATE).write_bytes(der)
    os.rename(work, store / name_fp)
    return name_fp


def remove(store: Path, name: str) -> bool:
    if not _FINGERPRINT.fullmatch(name) or not (store / name).is_dir():
        return False
    shutil.rmtree(store / name)
    return True


def sign_module(build_tree: Path, mok_dir: Path, module: Path) -> str | None:
    """Append a kernel module signature; None on success, else the message."""
    result = subprocess.run(
        [str(build_tree / "scripts" / "sign-file"), "sha512", str(mok_dir / PRIVATE_KEY),
         str(mok_dir / CERTIFICATE), str(module)],
        capture_output=True, timeout=120)
    if result.returncode != 0:
        return f"Server: Running sign-file failed, rc = {result.returncode}"
    return None
