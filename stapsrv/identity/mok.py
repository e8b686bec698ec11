"""Machine owner keys (MOK): signing modules for Secure Boot clients.

The store is ``<server certificate directory>/moks/<fingerprint>/`` with
``signing_key.priv`` (PEM key) and ``signing_key.x509`` (DER certificate),
as 4.8 lays it out; the fingerprint is the certificate's SHA-1, lowercase
hex pairs joined by ``:``.  A client that needs signed modules sends the
fingerprints of its enrolled keys; when one is in the store, the module is
signed with the kernel's ``scripts/sign-file``.  Administrators use
``python -m stapsrv.cli.mok list|generate|remove``.
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


def fingerprint(certificate_der: bytes) -> str:
    digest = hashes.Hash(hashes.SHA1())
    digest.update(certificate_der)
    return ":".join(f"{byte:02x}" for byte in digest.finalize())


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


def server_moks(store: Path) -> list[str]:
    """Valid MOKs of the store, sorted: a well-formed directory name equal to
    its certificate's fingerprint, and a private key beside it."""
    valid = []
    try:
        entries = sorted(store.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not _FINGERPRINT.fullmatch(entry.name) or not (entry / PRIVATE_KEY).is_file():
            continue
        try:
            certificate = (entry / CERTIFICATE).read_bytes()
        except OSError:
            continue
        if fingerprint(certificate) == entry.name:
            valid.append(entry.name)
    return valid


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
