"""Why a client's TLS handshake failed, read from the alert it sent.

An NSS client that does not trust the server's certificate ends the
handshake with an alert whose kind follows the verifier's error (NSS's
``ssl3_SendAlertForCertError``):

- ``bad_certificate``: ``SEC_ERROR_CA_CERT_INVALID``, what NSS's classic
  verifier says of a stap server certificate it has not been told to trust
  (4.8's shape: self-signed, no basicConstraints).  Every stap client's
  ``--trust-servers`` handles it.
- ``unknown_ca``: ``SEC_ERROR_UNKNOWN_ISSUER`` (or ``UNTRUSTED_ISSUER``),
  what NSS 3.101 and later say of the same certificate: they verify with
  libpkix by default.  SystemTap 5.2 and later trust it with
  ``--trust-servers``; 5.1 and older (Debian trixie's 5.1 on its NSS 3.110)
  cannot, with any certificate a server could present (issue 27).

Sans-IO: the text of the TLS library's error in, a :class:`Refusal` out.
"""

from __future__ import annotations

import enum


class Refusal(enum.Enum):
    """What a client's alert says about the server's certificate."""

    #: Not trusted yet; ``--trust-servers`` makes it trusted.
    NOT_TRUSTED = "bad_certificate"
    #: Not trusted, from a client on NSS 3.101 or later.
    UNKNOWN_ISSUER = "unknown_ca"


#: OpenSSL's reason strings for the alerts a client sent (``tlsv1 alert
#: unknown ca``, ``sslv3 alert bad certificate``).
_REASONS = {"alert unknown ca": Refusal.UNKNOWN_ISSUER,
            "alert bad certificate": Refusal.NOT_TRUSTED}


def certificate_refusal(error_text: str) -> Refusal | None:
    """The refusal a TLS error's text reports, or None for any other error."""
    lowered = error_text.lower()
    for reason, refusal in _REASONS.items():
        if reason in lowered:
            return refusal
    return None


def refusal_message(refusal: Refusal) -> str:
    """The log line's text after the peer's name (no placeholders)."""
    if refusal is Refusal.NOT_TRUSTED:
        return ("refused this server's certificate (TLS alert bad_certificate): it does "
                "not trust it yet (stap --trust-servers=ssl trusts it), or it trusts another "
                "certificate with the same serial")
    return ("refused this server's certificate as one from an unknown issuer (TLS alert "
            "unknown_ca): a client on NSS 3.101 or later that does not trust this server "
            "yet.  SystemTap 5.1 and older clients (Debian trixie's) cannot trust any "
            "server with --trust-servers on that NSS: trust it for them with "
            "'python -m stapsrv.cli.clienttrust' (it prints the certutil lines), or run "
            "their --trust-servers=ssl once with NSS_DISABLE_PKIX_VERIFY=1")
