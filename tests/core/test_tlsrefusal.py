"""The alert a client ended its handshake with, read from OpenSSL's text."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from stapsrv.core.tlsrefusal import Refusal, certificate_refusal, refusal_message


class RefusalTests(SynchronousTestCase):
    def test_unknown_ca_is_an_nss_3_101_client(self) -> None:
        # pyOpenSSL's Error as str() shows it (OpenSSL 3's reason text).
        text = "[('SSL routines', '', 'tlsv1 alert unknown ca')]"
        self.assertIs(certificate_refusal(text), Refusal.UNKNOWN_ISSUER)
        self.assertIs(certificate_refusal("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown "
                                          "ca (_ssl.c:992)"), Refusal.UNKNOWN_ISSUER)

    def test_bad_certificate_is_not_trusted_yet(self) -> None:
        text = "[('SSL routines', '', 'sslv3 alert bad certificate')]"
        self.assertIs(certificate_refusal(text), Refusal.NOT_TRUSTED)

    def test_other_errors_are_not_refusals(self) -> None:
        for text in ("[('SSL routines', '', 'unexpected eof while reading')]",
                     "[('SSL routines', '', 'tlsv1 alert protocol version')]",
                     "[('SSL routines', '', 'wrong version number')]", ""):
            self.assertIsNone(certificate_refusal(text), text)

    def test_messages_name_the_alert_and_the_remedy(self) -> None:
        unknown = refusal_message(Refusal.UNKNOWN_ISSUER)
        self.assertIn("TLS alert unknown_ca", unknown)
        self.assertIn("python -m stapsrv.cli.clienttrust", unknown)
        self.assertIn("NSS_DISABLE_PKIX_VERIFY=1", unknown)
        self.assertIn("TLS alert bad_certificate", refusal_message(Refusal.NOT_TRUSTED))
        for refusal in Refusal:
            self.assertNotIn("{", refusal_message(refusal))  # a log format string
