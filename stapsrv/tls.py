"""The server's TLS settings (spec §2.2, §2.6 item 8)."""

from __future__ import annotations

from twisted.internet.ssl import CertificateOptions, TLSVersion

from stapsrv.certs import ServerIdentity


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
