from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from stapsrv.app.listen import NotListening, listen_now


class ListenTests(TestCase):
    def test_tcp_listens_at_once(self) -> None:
        port = listen_now(reactor, "tcp:0:interface=127.0.0.1",  # type: ignore[arg-type]
                          Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        address = port.getHost()
        self.assertIsInstance(address, IPv4Address)
        self.assertEqual(address.host, "127.0.0.1")  # type: ignore[attr-defined]
        self.assertGreater(address.port, 0)  # type: ignore[attr-defined]

    def test_port_in_use_is_the_listen_error(self) -> None:
        first = listen_now(reactor, "tcp:0:interface=127.0.0.1",  # type: ignore[arg-type]
                           Factory.forProtocol(Protocol))
        self.addCleanup(first.stopListening)
        taken = first.getHost().port  # type: ignore[attr-defined]
        with self.assertRaises(CannotListenError):
            listen_now(reactor, f"tcp:{taken}:interface=127.0.0.1",  # type: ignore[arg-type]
                       Factory.forProtocol(Protocol))

    def test_socket_activation_without_a_socket_says_so(self) -> None:
        with self.assertRaisesRegex(NotListening, "no such socket was handed over"):
            listen_now(reactor, "systemd:domain=INET:index=0",  # type: ignore[arg-type]
                       Factory.forProtocol(Protocol))

    def test_malformed_description(self) -> None:
        with self.assertRaisesRegex(NotListening, "Cannot listen on tcp:port=x"):
            listen_now(reactor, "tcp:port=x",  # type: ignore[arg-type]
                       Factory.forProtocol(Protocol))
