"""Take over the key and certificate of an existing stap-serverd NSS database.

The original ``stap-serverd`` keeps its identity in an NSS database
(``cert9.db``, ``key4.db``, ``pkcs11.txt``) under the nickname
``stap-server`` (spec §2.5).  To keep clients' trust and the ``certinfo``
serial, stapsrv exports that key and certificate once with ``pk12util``
into a private temporary directory, loads the PKCS#12 with ``cryptography``
and lets :mod:`stapsrv.identity.certs` store them as ``stap-key.pem``/``stap.cert``,
so later starts no longer need the NSS tools.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.logger import Logger

from stapsrv.identity.certs import ServerIdentity, public_key_der

log = Logger(namespace="stapsrv")

NSS_FILES = ("cert9.db", "key4.db")
NICKNAME = "stap-server"
PK12UTIL = "pk12util"
EXPORT_TIMEOUT = 60.0


class NSSImportError(Exception):
    """The NSS database exists but its identity could not be exported."""


def has_nss_database(ssl_dir: Path) -> bool:
    """Whether ``ssl_dir`` holds an NSS sql database (``cert9.db`` and ``key4.db``)."""
    return all((ssl_dir / name).is_file() for name in NSS_FILES)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)


def export_nss_identity(ssl_dir: Path, nickname: str = NICKNAME,
                        pk12util: str | None = None) -> ServerIdentity:
    """Export ``nickname`` from the NSS database in ``ssl_dir`` (empty DB password).

    The PKCS#12 file and its random password file live in a 0700 temporary
    directory that is removed afterwards; the password never appears on a
    command line.  Raises :class:`NSSImportError` on any failure.
    """
    program = pk12util or shutil.which(PK12UTIL)
    if program is None:
        raise NSSImportError(f"{PK12UTIL} is not installed (package libnss3-tools)")
    password = secrets.token_hex(24).encode("ascii")
    private = Path(tempfile.mkdtemp(prefix="stapsrv-nss-"))  # mode 0700
    try:
        os.chmod(private, 0o700)
        p12_path = private / "stap-server.p12"
        password_path = private / "p12-password"
        slot_password_path = private / "slot-password"
        _write_private(password_path, password + b"\n")
        _write_private(slot_password_path, b"\n")
        argv = [program, "-o", str(p12_path), "-n", nickname, "-d", f"sql:{ssl_dir}",
                "-w", str(password_path), "-k", str(slot_password_path)]
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                    timeout=EXPORT_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NSSImportError(f"cannot run {program}: {exc}") from exc
        if result.returncode != 0 or not p12_path.exists():
            output = (result.stdout + result.stderr).decode(errors="replace").strip()
            raise NSSImportError(
                f"{program} could not export {nickname!r} from {ssl_dir}"
                f" (exit {result.returncode}): {output}")
        try:
            with warnings.catch_warnings():
                # pk12util writes BER (indefinite lengths); cryptography warns.
                warnings.simplefilter("ignore", UserWarning)
                key, certificate, _ = pkcs12.load_key_and_certificates(
                    p12_path.read_bytes(), password)
        except (OSError, ValueError) as exc:
            raise NSSImportError(f"cannot read the exported PKCS#12: {exc}") from exc
    finally:
        shutil.rmtree(private, ignore_errors=True)
    if key is None or certificate is None:
        raise NSSImportError(f"the export of {nickname!r} lacks the key or the certificate")
    if not isinstance(key, rsa.RSAPrivateKey):
        raise NSSImportError(f"the key of {nickname!r} is not an RSA key")
    if public_key_der(key.public_key()) != public_key_der(certificate.public_key()):
        raise NSSImportError(f"the key of {nickname!r} does not match its certificate")
    identity = ServerIdentity(key, certificate)
    log.info("Exported certificate {serial} ({nickname}) from the NSS database {directory}",
             serial=identity.serial_text, nickname=nickname, directory=ssl_dir)
    return identity
