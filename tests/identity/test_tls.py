"""The server's TLS context: in memory, and against the real 4.8 client."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from stapsrv.identity.certs import ServerIdentity
from stapsrv.identity.certs import server_context_factory
from stapsrv.identity.trust import trust_certificate
from tests.helpers import require_program, test_identity
from tests.helpers.nss import list_database

#: The node name tests.helpers.test_identity puts first in its SAN.
HOSTNAME = "testhost"
ADDRESS = IPv4Address("TCP", "127.0.0.1", 0)


@implementer(IHandshakeListener)
class Peer(Protocol):
    """Records the handshake and the bytes received; may answer once."""

    def __init__(self, greeting: bytes = b"", answer: bytes = b"") -> None:
        self.greeting = greeting
        self.answer = answer
        self.received = bytearray()
        self.handshake_done = False
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.answer:
            self.transport.write(self.answer)
            self.answer = b""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


def client_options(identity: ServerIdentity,
                   **settings: object) -> IOpenSSLClientConnectionCreator:
    """A client that trusts exactly this certificate and checks the host name."""
    trust_root = Certificate.loadPEM(identity.certificate.public_bytes(Encoding.PEM))
    return optionsForClientTLS(HOSTNAME, trustRoot=trust_root,
                               extraCertificateOptions=settings)


@implementer(IOpenSSLClientConnectionCreator)
class TLS11Client:
    """A client that offers only TLS 1.1 (security level 0, so OpenSSL sends it)."""

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_1_VERSION)
        context.set_max_proto_version(SSL.TLS1_1_VERSION)
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class TLS12SuiteClient:
    """A TLS 1.2 client that offers one cipher suite only."""

    def __init__(self, suite: str) -> None:
        self.suite = suite

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(f"{self.suite}:@SECLEVEL=0".encode())
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


#: TLS 1.2 suites the server accepts, and some it refuses: plain-RSA key
#: exchange (no forward secrecy), CBC, SHA-1 MACs, finite-field DHE.
ALLOWED_TLS12 = ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384",
                 "ECDHE-RSA-CHACHA20-POLY1305")
REFUSED_TLS12 = ("AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-SHA", "AES256-SHA256",
                 "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384", "DHE-RSA-AES128-GCM-SHA256",
                 "DES-CBC3-SHA")


class InMemoryTLSTests(TestCase):
    """Both TLS ends over an in-memory transport (twisted.test.iosim)."""

    def connect(self, client_creator: IOpenSSLClientConnectionCreator
                ) -> tuple[TLSMemoryBIOProtocol, TLSMemoryBIOProtocol, Peer, Peer]:
        clock = Clock()
        server_peer = Peer(answer=b"pong")
        client_peer = Peer(greeting=b"ping")
        server_factory = TLSMemoryBIOFactory(server_context_factory(test_identity()), False,
                                             Factory.forProtocol(lambda: server_peer),
                                             clock=clock)
        client_factory = TLSMemoryBIOFactory(client_creator, True,
                                             Factory.forProtocol(lambda: client_peer),
                                             clock=clock)
        server = server_factory.buildProtocol(ADDRESS)
        client = client_factory.buildProtocol(ADDRESS)
        assert isinstance(server, TLSMemoryBIOProtocol)
        assert isinstance(client, TLSMemoryBIOProtocol)
        pump = iosim.connect(server, iosim.makeFakeServer(server),
                             client, iosim.makeFakeClient(client), greet=False, clock=clock)
        pump.flush()
        return server, client, server_peer, client_peer

    def test_handshake_and_data(self) -> None:
        server, client, server_peer, client_peer = self.connect(
            client_options(test_identity()))
        self.assertTrue(server_peer.handshake_done)
        self.assertTrue(client_peer.handshake_done)
        self.assertEqual(bytes(server_peer.received), b"ping")
        self.assertEqual(bytes(client_peer.received), b"pong")
        version = server.getHandle().get_protocol_version_name()
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(version, "TLSv1.3")  # what two default OpenSSL ends negotiate
        self.assertIsNone(server_peer.lost)
        self.assertIsNone(client_peer.lost)

    def test_presents_identity_certificate(self) -> None:
        server, client, _, _ = self.connect(client_options(test_identity()))
        peer = client.getHandle().get_peer_certificate(as_cryptography=True)
        self.assertEqual(peer.public_bytes(Encoding.DER), test_identity().certificate_der)

    def test_tls12_client(self) -> None:
        options = client_options(test_identity(), lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        server, _, server_peer, client_peer = self.connect(options)
        self.assertEqual(server.getHandle().get_protocol_version_name(), "TLSv1.2")
        self.assertEqual(bytes(client_peer.received), b"pong")

    def test_tls11_client_refused(self) -> None:
        """The server itself refuses TLS 1.1 (a protocol_version alert)."""
        _, _, server_peer, client_peer = self.connect(TLS11Client())
        self.assertFalse(server_peer.handshake_done)
        self.assertFalse(client_peer.handshake_done)
        self.assertEqual(bytes(server_peer.received), b"")
        assert server_peer.lost is not None and client_peer.lost is not None
        self.assertTrue(server_peer.lost.check(SSL.Error))
        self.assertIn("protocol version", str(client_peer.lost.value))

    def test_only_ecdhe_aead_suites_complete_a_tls12_handshake(self) -> None:
        for suite in ALLOWED_TLS12:
            server, _, server_peer, client_peer = self.connect(TLS12SuiteClient(suite))
            self.assertTrue(server_peer.handshake_done, suite)
            self.assertEqual(server.getHandle().get_cipher_name(), suite)
            self.assertEqual(bytes(client_peer.received), b"pong", suite)
        for suite in REFUSED_TLS12:
            try:
                _, _, server_peer, client_peer = self.connect(TLS12SuiteClient(suite))
            except SSL.Error:
                continue  # this OpenSSL does not even offer it
            self.assertFalse(server_peer.handshake_done, suite)
            self.assertFalse(client_peer.handshake_done, suite)
            self.assertEqual(bytes(server_peer.received), b"", suite)

    def test_tls13_suites_are_aead(self) -> None:
        connection = SSL.Connection(server_context_factory(test_identity()).getContext(), None)
        suites = connection.get_cipher_list()
        self.assertIn("TLS_AES_128_GCM_SHA256", suites)
        for suite in suites:
            self.assertRegex(suite, r"^(TLS_.*|ECDHE-.*)(GCM|CHACHA20).*", suite)
            self.assertNotRegex(suite, r"CBC|-SHA$|^AES|^DHE|CCM|ECDSA-AES.*-SHA$")

    def test_no_client_certificate_requested(self) -> None:
        context = server_context_factory(test_identity()).getContext()
        self.assertEqual(context.get_verify_mode(), SSL.VERIFY_NONE)
        options = context.set_options(0)
        self.assertTrue(options & SSL.OP_NO_TLSv1_1)
        self.assertTrue(options & SSL.OP_NO_TLSv1)
        self.assertFalse(options & SSL.OP_NO_TLSv1_2)
        self.assertFalse(options & SSL.OP_NO_TLSv1_3)


class ProbeServer(Protocol):
    """Closes on the 4-byte zero length of a certificate probe (spec §3.2)."""

    def __init__(self, closed: Deferred[None]) -> None:
        self.buffer = b""
        self.closed = closed

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer[:4] == b"\0\0\0\0":
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class RealClientTrustTests(TestCase):
    """``stap --trust-servers`` (the 4.8 client) accepts our certificate."""

    async def test_stap_trusts_server(self) -> None:
        certutil = require_program("certutil")
        stap = require_program("stap")
        closed: list[Deferred[None]] = []

        def build() -> ProbeServer:
            closed.append(Deferred())
            return ProbeServer(closed[-1])

        factory = TLSMemoryBIOFactory(server_context_factory(test_identity()), False,
                                      Factory.forProtocol(build))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(base),
               "SYSTEMTAP_DIR": str(base / "systemtap"), "LANG": "C.UTF-8"}
        _, err, code = await getProcessOutputAndValue(
            stap, ["--trust-servers=ssl,no-prompt",
                   f"--use-server=127.0.0.1:{port.getHost().port}"],
            env=env, path=str(base))
        await DeferredList(closed)
        self.assertEqual(code, 0, f"stap failed ({code}): {err.decode(errors='replace')}")
        self.assertEqual(len(closed), 1)
        db_dir = base / "systemtap" / "ssl" / "client"
        self.assertEqual(list_database(certutil, db_dir),
                         [("stap-server", "P,P,P")])
        self.assertEqual(os.stat(db_dir / "cert9.db").st_mode & 0o777, 0o644)

        # The server's own import (trust.py) recognises the client's entry.
        cert = base / "stap.cert"
        cert.write_bytes(test_identity().certificate_der)
        await deferToThread(trust_certificate, cert, db_dir, certutil)
        self.assertEqual(list_database(certutil, db_dir),
                         [("stap-server", "P,P,P")])
