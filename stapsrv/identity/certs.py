"""The server identity: an RSA key, the self-signed certificate of 4.8 and
the TLS options built from them (stored by :mod:`stapsrv.identity.store`).

The certificate mirrors the one ``stap-serverd`` 4.8 generates
(``nsscommon.cxx: gen_cert_db``, spec §2.5/§2.6) so that the real client
treats it exactly like a real server's: same two-RDN subject (clients find
trusted servers by subject), a 5-byte serial (``--use-server=<serial>``
only accepts 5 fields), DNS names first in the subjectAltName, a critical
Netscape cert type and no basicConstraints/keyUsage/extendedKeyUsage.

One deliberate deviation: ``notBefore`` is back-dated by an hour so that a
client whose clock is slightly behind ours still accepts the certificate.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID, ObjectIdentifier
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion

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

DEFAULT_KEY_SIZE = 4096
PUBLIC_EXPONENT = 65537
VALIDITY = timedelta(days=365)
BACKDATE = timedelta(hours=1)

#: Serials must have exactly 5 DER content bytes.
SERIAL_MIN = 2 ** 31
SERIAL_LIMIT = 2 ** 39
#: Where new serials are drawn: a first content byte of 01 to 7f.  (4.8
#: uses ``PR_Now() >> 19``, which reads ``00:..``: two servers made in the
#: same 0.52 s get the same issuer and serial, and no client can trust both.)
RANDOM_SERIAL_MIN = 2 ** 32



class NaiveDatetimeError(ValueError):
    """A datetime without a timezone was passed where an instant is needed."""


def require_aware(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise NaiveDatetimeError(f"timezone-aware datetime required, got {moment!r}")
    return moment.astimezone(timezone.utc)


def new_serial(previous: int | None = None) -> int:
    """A serial no other certificate has, for all a client can tell: drawn
    at random from 2^39 - 2^32 values (every issuer is the same fixed name,
    so the serial alone tells certificates apart), never ``previous``."""
    while True:
        serial = RANDOM_SERIAL_MIN + secrets.randbelow(SERIAL_LIMIT - RANDOM_SERIAL_MIN)
        if serial != previous:
            return serial


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
    name.  ``serial`` defaults to a new one (:func:`new_serial`).
    """
    serial = _check_serial(new_serial() if serial is None else serial)
    now = require_aware(now).replace(microsecond=0)
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


#: The TLS 1.2 suites offered: ECDHE key exchange (forward secrecy) with an
#: AEAD cipher only, so no plain-RSA key exchange, no CBC and no SHA-1 MAC.
#: TLS 1.3's suites are all ECDHE/AEAD and come from OpenSSL's own list.
#: Both real clients (NSS: 4.8 and 5.5) negotiate TLS 1.3; an NSS client held
#: to TLS 1.2 offers ECDHE-RSA-AES128-GCM-SHA256 and CHACHA20-POLY1305.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def server_context_factory(identity: ServerIdentity) -> CertificateOptions:
    """TLS 1.2 or 1.3 with the identity's key and certificate, ECDHE and
    AEAD suites only (:data:`TLS12_CIPHERS`).

    No client certificate is requested (``verify`` stays off) and SNI is
    ignored: there is a single certificate.
    """
    return CertificateOptions(
        privateKey=identity.key,  # type: ignore[arg-type]  # cryptography keys are accepted
        certificate=identity.certificate,  # type: ignore[arg-type]
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(  # type: ignore[no-untyped-call]
            TLS12_CIPHERS),
    )


def generate_key(key_size: int = DEFAULT_KEY_SIZE) -> rsa.RSAPrivateKey:
    """A new RSA key with e = 65537 (slow for 4096 bits: run it in a thread)."""
    return rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=key_size)


def identity_needs_renewal(identity: ServerIdentity, now: datetime) -> bool:
    """Whether the certificate is expired or not yet valid at ``now``."""
    now = require_aware(now)
    certificate = identity.certificate
    return not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


def public_key_der(public_key: object) -> bytes | None:
    if not isinstance(public_key, rsa.RSAPublicKey):
        return None
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def identity_problem(identity: ServerIdentity, now: datetime) -> str | None:
    """Why the identity cannot be used at ``now``, or ``None`` when it can."""
    certificate = identity.certificate
    if public_key_der(certificate.public_key()) != public_key_der(identity.key.public_key()):
        return "the key does not match the certificate"
    if certificate.subject != SUBJECT or certificate.issuer != SUBJECT:
        return "the certificate is not a stap server certificate"
    if identity_needs_renewal(identity, now):
        return "the certificate is not valid now"
    return None
