from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from attrs import evolve

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransportWithDisconnection
from twisted.logger import LogPublisher, Logger, formatEvent, globalLogPublisher
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.trial.unittest import TestCase

from stapsrv.app.admission import Admission, Descriptors
from stapsrv.app.server import ARRIVING, CompileServerFactory, describe_peer
from stapsrv.compile.context import RequestContext
from stapsrv.compile.policy import Policy
from stapsrv.config.values import ServerConfig
from tests.helpers.vectors import CAPTURE, members


class FakeHandler:
    """Records requests; each answer is released by the test."""

    def __init__(self, max_threads: int = 2, limit: int = 5000,
                 allow: tuple[str, ...] = (), endpoint: str | None = None) -> None:
        self.config = ServerConfig(releases=("r",), ssl_dir=Path("/nonexistent"), allow=allow,
                                   max_threads=max_threads, max_compressed_request=limit,
                                   request_timeout=30.0, endpoint=endpoint)
        self.reactor = Clock()
        self.gate = DeferredSemaphore(self.config.concurrency)
        self.policy = Policy.from_values(allow, False, ("stapusr", "stapsys", "stapdev"))
        self.requests: list[tuple[bytes, RequestContext]] = []
        self.answers: list[Deferred[bytes | None]] = []

    def drain(self) -> None:
        """Answer every request, those still waiting for a slot too, so that
        no handler coroutine is left suspended when the test ends (garbage
        collected later, its resumption is an error in another test)."""
        while any(not answer.called for answer in self.answers):
            for answer in list(self.answers):
                if not answer.called:
                    answer.callback(None)

    async def handle(self, body: bytes, context: RequestContext) -> bytes | None:
        """As the real handler: a translator slot first (the fake answers
        stand for compiles)."""
        await self.gate.acquire()
        try:
            if context.abandoned:
                return None
            self.requests.append((body, context))
            answer: Deferred[bytes | None] = Deferred()
            self.answers.append(answer)
            return await answer
        finally:
            self.gate.release()


class ConnectionTestCase(TestCase):
    """Connections to a factory over string transports, and the log."""

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.drained: list[FakeHandler] = []

    def drain_at_end(self, factory: CompileServerFactory) -> None:
        handler = factory.handler
        if isinstance(handler, FakeHandler) and handler not in self.drained:
            self.drained.append(handler)
            self.addCleanup(handler.drain)

    def connect(self, factory: CompileServerFactory, port: int = 40000) -> tuple[Any, Any]:
        self.drain_at_end(factory)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        transport = StringTransportWithDisconnection(
            peerAddress=IPv6Address("TCP", "::ffff:127.0.0.1", port))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def messages(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def connect_proxied(self, factory: CompileServerFactory) -> tuple[Any, Any]:
        """A connection from HAProxy (at 127.0.0.1) through the PROXY wrapper."""
        self.drain_at_end(factory)
        wrapper = HAProxyWrappingFactory(factory)
        protocol = wrapper.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert protocol is not None
        transport = StringTransportWithDisconnection(
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    PROXY_HEADER = b"PROXY TCP4 198.51.100.7 127.0.0.1 51234 443\r\n"


class ProtocolTests(ConnectionTestCase):
    def test_captured_request_is_answered_then_closed(self) -> None:
        handler = FakeHandler()
        protocol, transport = self.connect(CompileServerFactory(handler))
        protocol.dataReceived((CAPTURE / "01-trivial-p4.c2s.bin").read_bytes())
        self.assertEqual(handler.requests[0][0],
                         (CAPTURE / "01-trivial-p4.request.zip").read_bytes())
        self.assertTrue(transport.connected)
        handler.answers[0].callback(b"PK-response")
        self.assertEqual(transport.value(), b"PK-response")
        self.assertFalse(transport.connected)
        self.assertIn("Accepted connection from 127.0.0.1:40000", self.messages())
        self.assertIn("Request from 127.0.0.1:40000 complete", self.messages())

    def test_peer_outside_the_allow_list_is_told_and_closed(self) -> None:
        handler = FakeHandler(allow=("192.0.2.0/24",))
        protocol, transport = self.connect(CompileServerFactory(handler))
        protocol.dataReceived((CAPTURE / "01-trivial-p4.c2s.bin").read_bytes())
        self.assertEqual(handler.requests, [], "the request never reaches the handler")
        found = members(transport.value())
        self.assertEqual(found["rc"], b"1")
        self.assertEqual(found["stderr"], b"Server: This server does not accept requests "
                         b"from 127.0.0.1 (its --allow list).\n")
        self.assertFalse(transport.connected)
        self.assertIn("Refusing 127.0.0.1:40000: not in the --allow list", self.messages())

    def test_proxied_client_is_logged_with_its_own_address(self) -> None:
        handler = FakeHandler(endpoint="haproxy:tcp:0")
        protocol, transport = self.connect_proxied(CompileServerFactory(handler))
        self.assertNotIn("Accepted connection from 127.0.0.1:40000", self.messages())
        protocol.dataReceived(self.PROXY_HEADER + (CAPTURE / "01-trivial-p4.c2s.bin").read_bytes())
        self.assertEqual(handler.requests[0][1].peer, "198.51.100.7:51234")
        handler.answers[0].callback(b"PK-response")
        self.assertEqual(transport.value(), b"PK-response")
        self.assertIn("Accepted connection from 198.51.100.7:51234", self.messages())
        self.assertIn("Request from 198.51.100.7:51234 complete", self.messages())
        self.assertNotIn("Accepted connection from 127.0.0.1:40000", self.messages())

    def test_allow_list_judges_the_proxied_address(self) -> None:
        # The proxy itself (127.0.0.1) is allowed; the client behind it is not.
        handler = FakeHandler(allow=("127.0.0.0/8",), endpoint="haproxy:tcp:0")
        protocol, transport = self.connect_proxied(CompileServerFactory(handler))
        protocol.dataReceived(self.PROXY_HEADER + (CAPTURE / "01-trivial-p4.c2s.bin").read_bytes())
        self.assertEqual(handler.requests, [])
        self.assertEqual(members(transport.value())["stderr"],
                         b"Server: This server does not accept requests "
                         b"from 198.51.100.7 (its --allow list).\n")
        self.assertIn("Refusing 198.51.100.7:51234: not in the --allow list", self.messages())

    def test_allowed_proxied_client_is_served(self) -> None:
        handler = FakeHandler(allow=("198.51.100.0/24",), endpoint="haproxy:tcp:0")
        protocol, transport = self.connect_proxied(CompileServerFactory(handler))
        protocol.dataReceived(self.PROXY_HEADER + (CAPTURE / "01-trivial-p4.c2s.bin").read_bytes())
        self.assertEqual(len(handler.requests), 1)

    def test_connection_without_a_proxy_header_is_dropped(self) -> None:
        handler = FakeHandler(endpoint="haproxy:tcp:0")
        protocol, transport = self.connect_proxied(CompileServerFactory(handler))
        protocol.dataReceived((CAPTURE / "01-trivial-p4.c2s.bin").read_bytes())
        self.assertFalse(transport.connected)
        self.assertEqual(handler.requests, [])

    def test_probe_closes_without_bytes(self) -> None:
        handler = FakeHandler()
        protocol, transport = self.connect(CompileServerFactory(handler))
        protocol.dataReceived(b"\0\0\0\0")
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.connected)
        self.assertEqual(handler.requests, [])

    def test_too_large_closes_with_48_log_line(self) -> None:
        handler = FakeHandler(limit=10)
        protocol, transport = self.connect(CompileServerFactory(handler))
        protocol.dataReceived(struct.pack(">i", 11) + b"x" * 10)
        self.assertTrue(transport.connected, "the client is still sending")
        protocol.dataReceived(b"x")
        self.assertFalse(transport.connected)
        answer = members(transport.value())
        self.assertEqual(answer["rc"], b"1")
        self.assertEqual(answer["stderr"], b"Server: The request is 11 bytes compressed; "
                         b"this server accepts at most 10 bytes (its --max-compressed-request).\n")
        self.assertTrue(any(m.startswith("Error size of (compressed) request file is too large")
                            for m in self.messages()))
        self.assertEqual(handler.requests, [])

    def test_negative_size_closes_at_once(self) -> None:
        handler = FakeHandler()
        protocol, transport = self.connect(CompileServerFactory(handler))
        protocol.dataReceived(struct.pack(">i", -5))
        self.assertFalse(transport.connected)
        self.assertEqual(transport.value(), b"")

    def test_no_answer_means_close(self) -> None:
        handler = FakeHandler()
        protocol, transport = self.connect(CompileServerFactory(handler))
        protocol.dataReceived(struct.pack(">i", 3) + b"abc")
        handler.answers[0].callback(None)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.connected)

    def test_client_gone_abandons_request(self) -> None:
        handler = FakeHandler()
        factory = CompileServerFactory(handler)
        protocol, transport = self.connect(factory)
        protocol.dataReceived(struct.pack(">i", 3) + b"abc")
        transport.loseConnection()
        context = handler.requests[0][1]
        self.assertTrue(context.abandoned)
        self.assertEqual(factory.gate.tokens, 1, "slot held until the work ends")
        handler.answers[0].callback(None)
        self.assertEqual(factory.gate.tokens, 2)

    def test_gate_and_48_load_lines(self) -> None:
        handler = FakeHandler(max_threads=2)
        factory = CompileServerFactory(handler, Clock())
        connections = [self.connect(factory, 40000 + i) for i in range(3)]
        for protocol, _ in connections:
            protocol.dataReceived(struct.pack(">i", 3) + b"abc")
        self.assertEqual(
            [m for m in self.messages() if m.startswith(("Processing", "Server is"))],
            ["Processing 1 request...", "Processing 2 concurrent requests...",
             "Server is overloaded. Processing times may be longer than normal."])
        self.assertEqual(len(handler.requests), 2, "the third request waits for a slot")
        self.assertEqual(factory.waiting, 1)
        handler.answers[0].callback(b"one")
        self.assertEqual(len(handler.requests), 3)
        self.assertEqual(factory.waiting, 0)

    def test_idle_connections_take_no_slot(self) -> None:
        handler = FakeHandler(max_threads=1)
        factory = CompileServerFactory(handler, Clock())
        idle = [self.connect(factory, 41000 + i) for i in range(20)]
        protocol, transport = self.connect(factory, 40000)
        protocol.dataReceived(struct.pack(">i", 3) + b"abc")
        self.assertEqual(len(handler.requests), 1)
        handler.answers[0].callback(b"module")
        self.assertEqual(transport.value(), b"module")
        self.assertTrue(all(t.connected for _, t in idle))

    def test_concurrency_disabled_serialises_without_load_lines(self) -> None:
        handler = FakeHandler(max_threads=0)
        factory = CompileServerFactory(handler, Clock())
        connections = [self.connect(factory, 40000 + i) for i in range(2)]
        for protocol, _ in connections:
            protocol.dataReceived(struct.pack(">i", 3) + b"abc")
        self.assertEqual(len(handler.requests), 1)
        self.assertFalse([m for m in self.messages() if m.startswith("Processing")])

    def test_queued_client_leaving_frees_nothing_it_did_not_hold(self) -> None:
        handler = FakeHandler(max_threads=1)
        factory = CompileServerFactory(handler, Clock())
        first, first_transport = self.connect(factory, 1)
        second, second_transport = self.connect(factory, 2)
        first.dataReceived(struct.pack(">i", 3) + b"abc")
        second.dataReceived(struct.pack(">i", 3) + b"abc")
        second_transport.loseConnection()
        self.assertEqual(factory.gate.tokens, 0)
        handler.answers[0].callback(b"one")
        self.assertEqual(len(handler.requests), 1, "the departed client's request is not run")
        self.assertEqual(factory.gate.tokens, 1)

    def test_silent_client_is_cut_off(self) -> None:
        handler = FakeHandler()
        clock = Clock()
        factory = CompileServerFactory(handler, clock)
        protocol, transport = self.connect(factory)
        protocol.dataReceived(struct.pack(">i", 100) + b"partial")
        clock.advance(29)
        self.assertTrue(transport.connected)
        clock.advance(1)
        self.assertFalse(transport.connected)
        self.assertIn("Timed out waiting for the request from 127.0.0.1:40000", self.messages())
        self.assertEqual(handler.requests, [])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_deadline_stops_once_the_request_is_in(self) -> None:
        handler = FakeHandler()
        clock = Clock()
        factory = CompileServerFactory(handler, clock)
        protocol, transport = self.connect(factory)
        protocol.dataReceived(struct.pack(">i", 3) + b"abc")
        clock.advance(3600)
        self.assertTrue(transport.connected, "compiling takes as long as it takes")
        handler.answers[0].callback(b"module")
        self.assertEqual(transport.value(), b"module")

    async def test_drain_waits_for_busy_and_drops_idle(self) -> None:
        handler = FakeHandler()
        factory = CompileServerFactory(handler)
        busy, busy_transport = self.connect(factory, 1)
        idle, idle_transport = self.connect(factory, 2)
        busy.dataReceived(struct.pack(">i", 3) + b"abc")
        handler.reactor.advance(ARRIVING)
        clock = Clock()
        drained = Deferred.fromCoroutine(factory.drain(clock, 10.0))
        self.assertFalse(idle_transport.connected)
        self.assertFalse(drained.called)
        handler.answers[0].callback(b"module")
        self.assertEqual(busy_transport.value(), b"module")
        await drained
        self.assertIn("Waiting for 1 outstanding requests to complete...", self.messages())

    async def test_drain_lets_an_arriving_connection_send_its_request(self) -> None:
        handler = FakeHandler()
        factory = CompileServerFactory(handler)
        handler.reactor.advance(100)
        arriving, transport = self.connect(factory, 1)
        handler.reactor.advance(ARRIVING / 2)
        drained = Deferred.fromCoroutine(factory.drain(Clock(), 10.0))
        self.assertTrue(transport.connected)
        arriving.dataReceived(struct.pack(">i", 3) + b"abc")
        handler.answers[0].callback(b"module")
        self.assertEqual(transport.value(), b"module")
        await drained

    async def test_drain_forces_after_grace(self) -> None:
        handler = FakeHandler()
        factory = CompileServerFactory(handler)
        busy, transport = self.connect(factory, 1)
        busy.dataReceived(struct.pack(">i", 3) + b"abc")
        clock = Clock()
        drained = Deferred.fromCoroutine(factory.drain(clock, 10.0))
        clock.advance(10)
        self.assertTrue(handler.requests[0][1].abandoned)
        self.assertFalse(transport.connected)
        handler.answers[0].callback(None)
        await drained
        self.assertIn("Timeout reached, exiting (forced)", self.messages())


class AdmissionTests(ConnectionTestCase):
    """The connections of a factory under admission (descriptors counted
    by a fake: 20 of the server's own, 100 at most)."""

    def admitted_factory(self, handler: FakeHandler, limit: int = 100) -> CompileServerFactory:
        clock = handler.reactor
        self.open_files = 20
        descriptors = Descriptors(clock, count=lambda: self.open_files, limit=lambda: limit)
        admission = Admission(clock, 128, descriptors)
        admission.report.log = Logger(namespace="stapsrv", observer=LogPublisher())
        factory = CompileServerFactory(handler, clock, admission)
        self.closed: list[str] = []
        factory.on_closed_early.append(self.closed.append)
        return factory

    def open(self, factory: CompileServerFactory, port: int) -> tuple[Any, Any]:
        self.open_files += 1
        return self.connect(factory, port)

    def test_the_connections_accepted_first_are_closed_first(self) -> None:
        handler = FakeHandler(max_threads=0)
        handler.config = evolve(handler.config, max_peer_connections=0)
        factory = self.admitted_factory(handler)
        clock = handler.reactor
        request = (CAPTURE / "01-trivial-p4.c2s.bin").read_bytes()
        working, _ = self.open(factory, 39999)
        working.dataReceived(request)  # its request is in: it is never closed early
        idle = []
        for port in range(40000, 40054):  # 75 in use: the reserve (25) is left
            clock.advance(0.1)
            idle.append(self.open(factory, port))
        # The first idle connection drips bytes of its request: that does
        # not make it newer than the others.
        idle[0][0].dataReceived(request[:10])
        clock.advance(0.1)
        self.assertEqual(self.closed, [])
        newest, newest_transport = self.open(factory, 41000)  # 24 free: 26 go
        closed = [port for port, (_, transport) in enumerate(idle, 40000)
                  if not transport.connected]
        self.assertEqual(closed, list(range(40000, 40026)))
        self.assertEqual(self.closed, ["oldest"] * 26)
        self.assertTrue(newest_transport.connected)
        self.assertTrue(working.transport.connected)
        self.assertEqual(len(factory.connections), 1 + 54 + 1 - 26)

    def test_the_new_connection_and_young_ones_are_never_closed(self) -> None:
        handler = FakeHandler(max_threads=0)
        handler.config = evolve(handler.config, max_peer_connections=0)
        factory = self.admitted_factory(handler)
        request = (CAPTURE / "01-trivial-p4.c2s.bin").read_bytes()
        for port in range(30000, 30070):  # 90 in use, every request in
            self.open(factory, port)[0].dataReceived(request)
        newcomers = []
        for port in range(40000, 40010):
            if factory.admission is not None and not factory.admission.has_room():
                factory.closed_early("full", None)
                continue
            newcomers.append(self.open(factory, port))
        # 10 free at first, 6 at the floor: four get in, and stay.
        self.assertEqual(len(newcomers), 4)
        self.assertTrue(all(transport.connected for _, transport in newcomers))
        self.assertEqual(self.closed, ["full"] * 6)
        # Once past their grace, they are the ones to go for the next.
        handler.reactor.advance(2.0)
        self.open_files -= 4  # (the server closed files of its own)
        _, last = self.open(factory, 41000)
        self.assertTrue(last.connected)
        self.assertFalse(any(transport.connected for _, transport in newcomers))

    def test_a_peer_over_its_cap_behind_a_proxy_is_closed(self) -> None:
        handler = FakeHandler(endpoint="haproxy:tcp:0")
        handler.config = evolve(handler.config, max_peer_connections=1)
        factory = self.admitted_factory(handler)
        first, first_transport = self.connect_proxied(factory)
        # (Counted once its address is known: its first bytes past the
        # header; TLS, here absent, counts it when the handshake is done.)
        first.dataReceived(self.PROXY_HEADER + b"\0\0")
        second, second_transport = self.connect_proxied(factory)
        second.dataReceived(self.PROXY_HEADER + (CAPTURE / "01-trivial-p4.c2s.bin").read_bytes())
        self.assertTrue(first_transport.connected)
        self.assertFalse(second_transport.connected)
        self.assertEqual(handler.requests, [])
        self.assertEqual(self.closed, ["peer"])
        self.assertEqual(factory.peers, {"198.51.100.7": 1})
        first_transport.loseConnection()
        self.assertEqual(factory.peers, {})
        third, third_transport = self.connect_proxied(factory)
        third.dataReceived(self.PROXY_HEADER + (CAPTURE / "01-trivial-p4.c2s.bin").read_bytes())
        self.assertEqual(len(handler.requests), 1)

    def test_peers_are_counted_and_the_default_cap_is_an_eighth_of_the_limit(self) -> None:
        handler = FakeHandler()
        factory = self.admitted_factory(handler, limit=1024)
        self.assertEqual(factory.per_peer, 128)
        self.assertTrue(factory.peer_admits("127.0.0.1"))
        connections = [self.open(factory, port) for port in range(40000, 40128)]
        self.assertEqual(factory.peers, {"127.0.0.1": 128})
        self.assertFalse(factory.peer_admits("127.0.0.1"))
        self.assertTrue(factory.peer_admits("127.0.0.2"))
        connections[0][1].loseConnection()
        self.assertTrue(factory.peer_admits("127.0.0.1"))
        handler.config = evolve(handler.config, max_peer_connections=0)
        self.assertEqual(factory.per_peer, 0)
        self.assertTrue(factory.peer_admits("127.0.0.1"))


class PeerTests(TestCase):
    def test_forms(self) -> None:
        self.assertEqual(describe_peer(IPv6Address("TCP", "::ffff:10.0.0.1", 5)), "10.0.0.1:5")
        self.assertEqual(describe_peer(IPv6Address("TCP", "::1", 5)), "[::1]:5")


class RefusalLogTests(TestCase):
    """(Found by the attack review.)  A client refusing the certificate
    at will is logged once a minute per host and kind, not every time."""

    def test_once_a_minute_per_host_and_kind(self) -> None:
        clock = Clock()
        factory = CompileServerFactory(FakeHandler(), clock=clock)  # type: ignore[arg-type]
        news = factory.refusal_news
        self.assertTrue(news("10.0.0.1:4000", "UNKNOWN_ISSUER"))
        self.assertFalse(news("10.0.0.1:4001", "UNKNOWN_ISSUER"), "same host")
        self.assertTrue(news("10.0.0.1:4002", "NOT_TRUSTED"), "another kind")
        self.assertTrue(news("[2001:db8::1]:4000", "UNKNOWN_ISSUER"), "another host")
        clock.advance(59)
        self.assertFalse(news("10.0.0.1:4003", "UNKNOWN_ISSUER"))
        clock.advance(1)
        self.assertTrue(news("10.0.0.1:4004", "UNKNOWN_ISSUER"))
