from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.trial.unittest import TestCase
from zope.interface import implementer

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

    def test_the_gate_is_under_the_proxy_reader(self) -> None:
        """Admission sees each socket first: without a proxy it wraps the
        factory; with one, it wraps what the PROXY reader listens with."""
        wrapped: list[object] = []

        def gate(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
            return Recorder(endpoint, wrapped)

        def proxy(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
            result: IStreamServerEndpoint = proxyEndpoint(endpoint)
            return result

        factory = Factory.forProtocol(Protocol)
        port = listen_now(reactor, "tcp:0:interface=127.0.0.1",  # type: ignore[arg-type]
                          factory, proxy=proxy, gate=gate)
        self.addCleanup(port.stopListening)
        self.assertEqual(wrapped, [factory])
        port = listen_now(reactor, "haproxy:tcp:0:interface=127.0.0.1",  # type: ignore[arg-type]
                          factory, proxy=proxy, gate=gate)
        self.addCleanup(port.stopListening)
        self.assertIsInstance(wrapped[1], HAProxyWrappingFactory)
        self.assertIs(wrapped[1].wrappedFactory, factory)  # type: ignore[attr-defined]


@implementer(IStreamServerEndpoint)
class Recorder:
    """An endpoint that notes the factory it listens with."""

    def __init__(self, endpoint: IStreamServerEndpoint, into: list[object]) -> None:
        self.endpoint = endpoint
        self.into = into

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        self.into.append(protocolFactory)
        result: Deferred[IListeningPort] = self.endpoint.listen(protocolFactory)
        return result
