"""The server identity on disk, and the start-up choice of identity.

The identity lives in the server's ssl directory as ``stap.cert`` (DER,
0644, the file 4.8 also writes) and ``stap-key.pem`` (unencrypted PKCS#8
PEM, 0600) instead of 4.8's NSS database.  An existing 4.8 NSS database in
the ssl directory is imported once (:mod:`stapsrv.identity.nssimport`) so
that a replaced stap-serverd keeps its key, certificate and serial.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.logger import Logger

from stapsrv.identity.certs import (
    DEFAULT_KEY_SIZE,
    SUBJECT,
    ServerIdentity,
    generate_key,
    identity_problem,
    make_certificate,
    new_serial,
    require_aware,
)
from stapsrv.identity.nssimport import export_nss_identity, has_nss_database

log = Logger(namespace="stapsrv")

CERT_FILE = "stap.cert"
KEY_FILE = "stap-key.pem"
CERT_MODE = 0o644
KEY_MODE = 0o600
SSL_DIR_MODE = 0o700

_LOG_TIME_FORMAT = "%a %b %d %H:%M:%S %Y"


def _read_certificate(path: Path) -> tuple[x509.Certificate | None, str | None]:
    try:
        return x509.load_der_x509_certificate(path.read_bytes()), None
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {exc}"


def _read_key(path: Path) -> tuple[rsa.RSAPrivateKey | None, str | None]:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return None, f"cannot read {path}: {exc}"
    if not isinstance(key, rsa.RSAPrivateKey):
        return None, f"{path} does not hold an RSA key"
    return key, None


def _read_identity(ssl_dir: Path, now: datetime
                   ) -> tuple[ServerIdentity | None, x509.Certificate | None, str | None]:
    """The usable stored identity, else the stored certificate (if any) and why not."""
    certificate, problem = _read_certificate(ssl_dir / CERT_FILE)
    if certificate is None:
        return None, None, problem
    key, problem = _read_key(ssl_dir / KEY_FILE)
    if key is None:
        return None, certificate, problem
    identity = ServerIdentity(key, certificate)
    problem = identity_problem(identity, now)
    if problem is not None:
        return None, certificate, problem
    return identity, certificate, None


def _next_serial(previous: x509.Certificate | None) -> int:
    """A new serial, never the previous certificate's."""
    return new_serial(previous.serial_number if previous is not None
                      and previous.issuer == SUBJECT else None)


def _ensure_directory(ssl_dir: Path) -> None:
    try:
        ssl_dir.mkdir(mode=SSL_DIR_MODE, parents=True)
    except FileExistsError:
        return
    os.chmod(ssl_dir, SSL_DIR_MODE)
    log.info("Certificate database {directory} does not exist", directory=ssl_dir)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` in one step; the file never has wider modes.

    The temporary file is created 0600 (``mkstemp``) in the same directory and
    only then set to ``mode``, so a key is never readable by others, even
    briefly and whatever the umask.
    """
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def store_identity(ssl_dir: Path, identity: ServerIdentity) -> None:
    """Write the key (0600) and then the certificate (0644) into ``ssl_dir``."""
    write_file_atomically(ssl_dir / KEY_FILE, _key_pem(identity.key), KEY_MODE)
    write_file_atomically(ssl_dir / CERT_FILE, identity.certificate_der, CERT_MODE)


def _format_time(moment: datetime) -> str:
    return moment.strftime(_LOG_TIME_FORMAT)


def _log_found(certificate: x509.Certificate, ssl_dir: Path) -> None:
    """4.8's lines about the certificate found at start-up."""
    log.info("Certificate found in database {directory}", directory=ssl_dir)
    log.info("  Not Valid Before: {not_before} UTC",
             not_before=_format_time(certificate.not_valid_before_utc))
    log.info("  Not Valid After: {not_after} UTC",
             not_after=_format_time(certificate.not_valid_after_utc))


def _create_identity(ssl_dir: Path, nodename: str, now: datetime, key_size: int,
                     previous: x509.Certificate | None) -> ServerIdentity:
    key = generate_key(key_size)
    certificate = make_certificate(key, nodename, now, serial=_next_serial(previous))
    identity = ServerIdentity(key, certificate)
    store_identity(ssl_dir, identity)
    log.info("Created certificate {serial} for {nodename} in {directory}"
             " (RSA-{key_size}, valid until {not_after} UTC)",
             serial=identity.serial_text, nodename=nodename, directory=ssl_dir,
             key_size=key_size, not_after=_format_time(certificate.not_valid_after_utc))
    return identity


def _import_nss_identity(ssl_dir: Path, now: datetime) -> ServerIdentity | None:
    """The identity of a stap-serverd NSS database in ``ssl_dir``, stored as our files.

    ``None`` when there is no NSS database or its certificate is not valid
    at ``now`` (then a new one is generated as usual).  If the database
    exists but cannot be exported, the error propagates: a certificate that
    clients may already trust is never silently replaced.
    """
    if not has_nss_database(ssl_dir):
        return None
    log.info("Importing the stap-serverd certificate from the NSS database {directory}",
             directory=ssl_dir)
    identity = export_nss_identity(ssl_dir)
    problem = identity_problem(identity, now)
    if problem is not None:
        log.warn("Not using the NSS certificate {serial} from {directory}: {reason}",
                 serial=identity.serial_text, directory=ssl_dir, reason=problem)
        return None
    store_identity(ssl_dir, identity)
    log.info("Certificate is valid; kept certificate {serial} from the NSS database"
             " {directory} in {key_file} and {cert_file}",
             serial=identity.serial_text, directory=ssl_dir, key_file=KEY_FILE,
             cert_file=CERT_FILE)
    return identity


def load_or_create_identity(ssl_dir: Path, nodename: str | None = None,
                            now: datetime | None = None,
                            key_size: int = DEFAULT_KEY_SIZE) -> ServerIdentity:
    """The identity stored in ``ssl_dir``, or a new one when that is unusable.

    Stored files are reused when both read back, the key matches the
    certificate and the certificate is valid at ``now``; otherwise a new key
    and certificate (with a new serial) replace them.  Blocking and, when
    generating, slow: call it from a thread.
    """
    now = datetime.now(timezone.utc) if now is None else require_aware(now)
    nodename = os.uname().nodename if nodename is None else nodename
    _ensure_directory(ssl_dir)
    identity, previous, problem = _read_identity(ssl_dir, now)
    if previous is not None:
        _log_found(previous, ssl_dir)
    if identity is not None:
        log.info("Certificate is valid")
        return identity
    imported = _import_nss_identity(ssl_dir, now)
    if imported is not None:
        return imported
    if previous is not None:
        log.info("Certificate is not valid")
    log.info("Generating a new certificate in {directory}: {reason}",
             directory=ssl_dir, reason=problem)
    return _create_identity(ssl_dir, nodename, now, key_size, previous)
