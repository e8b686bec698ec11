from __future__ import annotations

import ipaddress

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IAddress, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from stapsrv.app.listen import listen_now
from stapsrv.app.proxies import TrustedPeersFactory, trusted_proxy_endpoint
from stapsrv.compile.policy import parse_networks

LOOPBACK = parse_networks(["127.0.0.0/8", "::1"])
ELSEWHERE = parse_networks(["10.0.0.0/8"])


class Recorder(Protocol):
    """What the server's protocol saw: the bytes, and its peer once they
    are in (behind a PROXY header, the address it names)."""

    def __init__(self, factory: RecordingFactory) -> None:
        self.recording = factory
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received.endswith(b"\n"):
            assert self.transport is not None
            self.recording.lines.append(self.received)
            self.recording.peers.append(self.transport.getPeer())
            self.transport.loseConnection()


class RecordingFactory(Factory):
    def __init__(self) -> None:
        self.peers: list[IAddress] = []
        self.lines: list[bytes] = []
        self.started = 0
        self.stopped = 0

    def buildProtocol(self, addr: IAddress) -> Recorder:
        return Recorder(self)

    def doStart(self) -> None:
        self.started += 1

    def doStop(self) -> None:
        self.stopped += 1


class Sender(Protocol):
    """A peer that writes its bytes and waits for the server to hang up."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = b""
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class GateTests(TestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.log = Logger(namespace="stapsrv.test-proxies")
        self.refusals = 0

    def messages(self) -> list[str]:
        return [formatEvent(event) for event in self.events
                if event.get("log_namespace") == "stapsrv.test-proxies"]

    def gate(self, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
             ) -> tuple[TrustedPeersFactory, RecordingFactory]:
        def refused() -> None:
            self.refusals += 1
        inner = RecordingFactory()
        return TrustedPeersFactory(inner, networks, self.log, refused), inner

    def test_trusted_peers_get_the_wrapped_protocol(self) -> None:
        gate, inner = self.gate(LOOPBACK)
        for address in (IPv4Address("TCP", "127.0.0.3", 4000),
                        IPv6Address("TCP", "::1", 4000),
                        IPv6Address("TCP", "::ffff:127.0.0.1", 4000)):
            self.assertIsInstance(gate.buildProtocol(address), Recorder, address)
        self.assertEqual((self.messages(), self.refusals), ([], 0))
        gate.doStart()
        gate.doStop()
        self.assertEqual((inner.started, inner.stopped), (1, 1))

    def test_untrusted_peer_gets_no_protocol_and_one_line(self) -> None:
        gate, _ = self.gate(ELSEWHERE)
        self.assertIsNone(gate.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000)))
        self.assertIsNone(gate.buildProtocol(IPv6Address("TCP", "2001:db8::5", 4001)))
        self.assertEqual(self.messages(), [
            "Closed a connection from 127.0.0.1:4000: not a trusted proxy (--proxy-from), "
            "so its PROXY header is not read",
            "Closed a connection from [2001:db8::5]:4001: not a trusted proxy (--proxy-from), "
            "so its PROXY header is not read"])
        self.assertEqual(self.refusals, 2)

    def test_peer_text_is_escaped(self) -> None:
        gate, _ = self.gate(ELSEWHERE)
        self.assertIsNone(gate.buildProtocol(IPv4Address("TCP", "x\nforged line", 1)))
        [line] = self.messages()
        self.assertIn("from x\\nforged line:1:", line)


class ListeningGateTests(TestCase):
    """The gate on a real haproxy: listener, with real TCP peers on loopback."""

    HEADER = b"PROXY TCP4 192.0.2.10 127.0.0.1 51234 443\r\n"

    def listen(self, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
               ) -> tuple[RecordingFactory, int]:
        inner = RecordingFactory()
        log = Logger(namespace="stapsrv.test-proxies")

        def proxy(stream: IStreamServerEndpoint) -> IStreamServerEndpoint:
            return trusted_proxy_endpoint(stream, networks, log)

        port = listen_now(reactor, "haproxy:tcp:0:interface=127.0.0.1",  # type: ignore[arg-type]
                          inner, proxy=proxy)
        self.addCleanup(port.stopListening)
        return inner, port.getHost().port  # type: ignore[attr-defined]

    async def send(self, port: int, data: bytes) -> Sender:
        sender = Sender(data)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await connectProtocol(endpoint, sender)
        await sender.closed
        return sender

    async def test_trusted_proxy_names_the_client(self) -> None:
        inner, port = self.listen(LOOPBACK)
        await self.send(port, self.HEADER + b"hello\n")
        self.assertEqual(inner.lines, [b"hello\n"])
        [peer] = inner.peers
        self.assertEqual((peer.host, peer.port), ("192.0.2.10", 51234))  # type: ignore[attr-defined]

    async def test_untrusted_peer_is_closed_unread(self) -> None:
        inner, port = self.listen(ELSEWHERE)
        sender = await self.send(port, self.HEADER + b"hello\n")
        self.assertEqual((inner.peers, inner.lines, sender.received), ([], [], b""))
