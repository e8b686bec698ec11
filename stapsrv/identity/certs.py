"""The server identity: an RSA key and the self-signed certificate of 4.8.

The certificate mirrors the one ``stap-serverd`` 4.8 generates
(``nsscommon.cxx: gen_cert_db``, spec §2.5/§2.6) so that the real client
treats it exactly like a real server's: same two-RDN subject (clients find
trusted servers by subject), a 5-byte serial (``--use-server=<serial>``
only accepts 5 fields), DNS names first in the subjectAltName, a critical
Netscape cert type and no basicConstraints/keyUsage/extendedKeyUsage.

One deliberate deviation: ``notBefore`` is back-dated by an hour so that a
client whose clock is slightly behind ours still accepts the certificate.

On disk the identity lives in the server's ssl directory as ``stap.cert``
(DER, 0644, the file 4.8 also writes) and ``stap-key.pem`` (unencrypted
PKCS#8 PEM, 0600) instead of 4.8's NSS database.  An existing 4.8 NSS
database in the ssl directory is imported once (:mod:`stapsrv.identity.nssimport`)
so that a replaced stap-serverd keeps its key, certificate and serial.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from attrs import frozen
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID, ObjectIdentifier
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger

log = Logger(namespace="stapsrv")

#: Subject and issuer of every stap server certificate, in DER order:
#: OU=Systemtap, then CN=Systemtap Compile Server, both PrintableString.
SUBJECT = x509.Name([
    x509.RelativeDistinguishedName([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Systemtap",
                           _ASN1Type.PrintableString),
    ]),
    x509.RelativeDistinguishedName([
        x509.NameAttribute(NameOID.COMMON_NAME, "Systemtap Compile Server",
                           _ASN1Type.PrintableString),
    ]),
])

#: Netscape certificate type: SSL server, object signing, object-signing CA.
NS_CERT_TYPE_OID = ObjectIdentifier("2.16.840.1.113730.1.1")
NS_CERT_TYPE_VALUE = bytes.fromhex("03020051")

CERT_FILE = "stap.cert"
KEY_FILE = "stap-key.pem"
CERT_MODE = 0o644
KEY_MODE = 0o600
SSL_DIR_MODE = 0o700

DEFAULT_KEY_SIZE = 4096
PUBLIC_EXPONENT = 65537
VALIDITY = timedelta(days=365)
BACKDATE = timedelta(hours=1)

#: Serials must have exactly 5 DER content bytes (``00`` + 4 bytes).
SERIAL_MIN = 2 ** 31
SERIAL_LIMIT = 2 ** 39
#: 4.8 uses ``PR_Now() >> 19``: microseconds since the epoch, ~0.52 s steps.
SERIAL_SHIFT = 19

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_LOG_TIME_FORMAT = "%a %b %d %H:%M:%S %Y"


class NaiveDatetimeError(ValueError):
    """A datetime without a timezone was passed where an instant is needed."""


def _require_aware(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise NaiveDatetimeError(f"timezone-aware datetime required, got {moment!r}")
    return moment.astimezone(timezone.utc)


def serial_for_time(now: datetime) -> int:
    """4.8's serial for ``now``: microseconds since the epoch >> 19."""
    microseconds = (_require_aware(now) - _EPOCH) // timedelta(microseconds=1)
    return microseconds >> SERIAL_SHIFT


def _check_serial(serial: int) -> int:
    if not SERIAL_MIN <= serial < SERIAL_LIMIT:
        raise ValueError(f"serial {serial:#x} does not encode as exactly 5 DER bytes")
    return serial


def _short_name(nodename: str) -> str:
    return nodename.split(".", 1)[0]


def _subject_alt_names(nodename: str,
                       extra_names: Iterable[str | x509.GeneralName]) -> list[x509.GeneralName]:
    """DNS nodename, DNS ``<short>.local``, then the extras, without duplicates."""
    if not nodename:
        raise ValueError("the node name must not be empty")
    names: list[x509.GeneralName] = [x509.DNSName(nodename)]
    short = _short_name(nodename)
    if short:
        names.append(x509.DNSName(short + ".local"))
    for extra in extra_names:
        names.append(x509.DNSName(extra) if isinstance(extra, str) else extra)
    unique: list[x509.GeneralName] = []
    for name in names:
        if name not in unique:
            unique.append(name)
    return unique


def make_certificate(key: rsa.RSAPrivateKey, nodename: str, now: datetime,
                     extra_names: Iterable[str | x509.GeneralName] = (), *,
                     serial: int | None = None) -> x509.Certificate:
    """A self-signed certificate for ``key`` shaped like 4.8's (spec §2.5).

    ``extra_names`` are DNS names (strings) or any ``GeneralName``; they follow
    the node name and ``<short>.local``, so the first entry is always a DNS
    name.  ``serial`` defaults to 4.8's time-based value for ``now``.
    """
    serial = _check_serial(serial_for_time(now) if serial is None else serial)
    now = _require_aware(now).replace(microsecond=0)
    return (
        x509.CertificateBuilder()
        .subject_name(SUBJECT)
        .issuer_name(SUBJECT)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(nodename, extra_names)),
                       critical=False)
        .add_extension(x509.UnrecognizedExtension(NS_CERT_TYPE_OID, NS_CERT_TYPE_VALUE),
                       critical=True)
        .sign(key, hashes.SHA256())
    )


def serial_content_bytes(serial: int) -> bytes:
    """The content bytes of ``serial`` as a minimal DER INTEGER."""
    magnitude = serial if serial >= 0 else ~serial
    return serial.to_bytes(magnitude.bit_length() // 8 + 1, "big", signed=True)


def cert_serial_text(cert: x509.Certificate) -> str:
    """The serial as 4.8's ``certinfo``: lowercase hex DER content bytes joined by ':'."""
    return ":".join(f"{byte:02x}" for byte in serial_content_bytes(cert.serial_number))


@frozen
class ServerIdentity:
    """The server's RSA key and its certificate (used for TLS and ``.sgn``)."""

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @property
    def serial_text(self) -> str:
        return cert_serial_text(self.certificate)

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)


def server_context_factory(identity: ServerIdentity) -> CertificateOptions:
    """TLS 1.2 or 1.3 with the identity's key and certificate.

    No client certificate is requested (``verify`` stays off) and SNI is
    ignored: there is a single certificate.  Twisted's default cipher
    selection includes the ECDHE-RSA AES-GCM and TLS 1.3 suites the 4.8
    client offers.
    """
    return CertificateOptions(
        privateKey=identity.key,  # type: ignore[arg-type]  # cryptography keys are accepted
        certificate=identity.certificate,  # type: ignore[arg-type]
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


def generate_key(key_size: int = DEFAULT_KEY_SIZE) -> rsa.RSAPrivateKey:
    """A new RSA key with e = 65537 (slow for 4096 bits: run it in a thread)."""
    return rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=key_size)


def identity_needs_renewal(identity: ServerIdentity, now: datetime) -> bool:
    """Whether the certificate is expired or not yet valid at ``now``."""
    now = _require_aware(now)
    certificate = identity.certificate
    return not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


def _public_der(public_key: object) -> bytes | None:
    if not isinstance(public_key, rsa.RSAPublicKey):
        return None
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def identity_problem(identity: ServerIdentity, now: datetime) -> str | None:
    """Why the identity cannot be used at ``now``, or ``None`` when it can."""
    certificate = identity.certificate
    if _public_der(certificate.public_key()) != _public_der(identity.key.public_key()):
        return "the key does not match the certificate"
    if certificate.subject != SUBJECT or certificate.issuer != SUBJECT:
        return "the certificate is not a stap server certificate"
    if identity_needs_renewal(identity, now):
        return "the certificate is not valid now"
    return None


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


def _next_serial(now: datetime, previous: x509.Certificate | None) -> int:
    """The time-based serial, bumped past the previous one so no serial is reused."""
    serial = serial_for_time(now)
    if previous is not None and previous.issuer == SUBJECT:
        bumped = previous.serial_number + 1
        if serial < bumped < SERIAL_LIMIT:
            serial = bumped
    return serial


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
    certificate = make_certificate(key, nodename, now, serial=_next_serial(now, previous))
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
    from stapsrv.identity.nssimport import has_nss_database, export_nss_identity

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
    now = datetime.now(timezone.utc) if now is None else _require_aware(now)
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
