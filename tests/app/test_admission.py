"""Admission in the app: the descriptor count, the report, the gate under
every listening port, and closing the connections waiting longest."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogPublisher, Logger
from twisted.trial.unittest import TestCase

from stapsrv.app.admission import (
    FULL,
    OLDEST,
    PEER,
    Admission,
    AdmissionFactory,
    AdmissionReport,
    Descriptors,
)
from stapsrv.app.logs import format_line


class FakeCount:
    """Descriptors open (``open``) and the soft limit (``limit``)."""

    def __init__(self, open_: int, limit: int) -> None:
        self.open = open_
        self.limit = limit
        self.reads = 0

    def count(self) -> int:
        self.reads += 1
        return self.open

    def descriptors(self, clock: Clock) -> Descriptors:
        return Descriptors(clock, count=self.count, limit=lambda: self.limit)


class DescriptorsTests(TestCase):
    def test_measured_at_most_once_a_second_and_moved_by_connections(self) -> None:
        clock, fake = Clock(), FakeCount(10, 1024)
        descriptors = fake.descriptors(clock)
        self.assertEqual(descriptors.in_use(), 10)
        for _ in range(5):
            descriptors.opened()
        fake.open = 15
        self.assertEqual(descriptors.in_use(), 15)
        descriptors.closed()
        self.assertEqual(descriptors.in_use(), 14)
        self.assertEqual(fake.reads, 1)
        fake.open = 30  # the server opened 16 files of its own meanwhile
        clock.advance(1.0)
        self.assertEqual(descriptors.in_use(), 30)
        self.assertEqual(fake.reads, 2)
        self.assertEqual(descriptors.limit, 1024)

    def test_real_count_and_limit(self) -> None:
        descriptors = Descriptors(Clock())
        self.assertGreater(descriptors.in_use(), 2)
        self.assertGreaterEqual(descriptors.limit, descriptors.in_use())


class ReportTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.publisher = LogPublisher()
        self.lines: list[str] = []

        def keep(event: LogEvent) -> None:
            line = format_line(event)
            if line is not None:
                self.lines.append(line)

        self.publisher.addObserver(keep)
        self.report = AdmissionReport(self.clock, 10.0)
        self.report.log = Logger(namespace="stapsrv", observer=self.publisher)
        self.report.in_use, self.report.limit, self.report.reserve = 900, 1024, 128

    def test_first_at_once_then_one_line_per_interval_with_the_counts(self) -> None:
        self.report.closed(PEER, "127.0.0.2")
        self.assertEqual(len(self.lines), 1)
        self.assertIn("Closed connections to keep room for new clients: 0 waiting longest "
                      "without a request, 0 new ones with no descriptor to spare, 1 over the "
                      "per-peer cap (most from 127.0.0.2 (1)) (900 of 1024 descriptors in "
                      "use, 128 kept free; at most one such line every 10 s)", self.lines[0])
        for _ in range(30):
            self.clock.advance(0.1)
            self.report.closed(OLDEST, "10.0.0.1")
            self.report.closed(PEER, "127.0.0.2")
            self.report.closed(PEER, "127.0.0.2")
        self.report.closed(FULL)
        self.assertEqual(len(self.lines), 1, "rate-limited")
        self.clock.advance(10.0)
        self.assertEqual(len(self.lines), 2, "the counts since come at the interval's end")
        self.assertIn(": 30 waiting longest without a request, 1 new ones with no descriptor "
                      "to spare, 60 over the per-peer cap (most from 127.0.0.2 (60), "
                      "10.0.0.1 (30))", self.lines[1])
        self.clock.advance(60.0)
        self.assertEqual(len(self.lines), 2, "nothing to say, no line")
        self.report.closed(FULL)
        self.assertEqual(len(self.lines), 3)
        self.assertNotIn("most from", self.lines[2])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FakeConnection:
    def __init__(self, admission: Admission, since: float | None) -> None:
        self.admission = admission
        self.waiting_since = since
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True


class AdmissionTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeCount(20, 100)  # reserve 128 becomes 25, floor 6
        self.admission = Admission(self.clock, 128, self.fake.descriptors(self.clock))
        self.admission.report.log = Logger(namespace="stapsrv", observer=LogPublisher())

    def open(self, since: float | None) -> FakeConnection:
        connection = FakeConnection(self.admission, since)
        self.fake.open += 1
        self.admission.opened(connection)
        return connection

    def test_the_oldest_waiting_are_closed_when_the_reserve_is_gone(self) -> None:
        busy = [self.open(None) for _ in range(10)]  # requests in: never closed
        idle = [self.open(float(n)) for n in range(45)]  # 75 in use, 25 free
        self.assertFalse(any(connection.evicted for connection in busy + idle))
        newest = self.open(100.0)  # 24 free: close 26, the oldest
        self.assertEqual([c for c in idle if c.evicted], idle[:26])
        self.assertFalse(newest.evicted or any(c.evicted for c in busy))
        # Until they are gone, their descriptors are still in use, but the
        # shortage they answer is not counted again.
        self.open(101.0)
        self.assertEqual(sum(1 for c in idle if c.evicted), 26)
        for connection in idle[:26]:
            self.admission.closed(connection)
            self.fake.open -= 1
        self.assertEqual(self.admission.descriptors.in_use(), 51)

    def test_new_connections_have_room_until_the_floor(self) -> None:
        self.fake.open = 93
        self.assertTrue(self.admission.has_room())  # the new one makes 94: 6 free
        self.fake.open = 94
        self.clock.advance(1.0)
        self.assertFalse(self.admission.has_room())


class Recording(Protocol):
    pass


class AdmissionFactoryTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeCount(20, 1024)
        self.admission = Admission(self.clock, 128, self.fake.descriptors(self.clock))
        self.refused: list[tuple[str, str | None]] = []
        self.allowed_peers = {"127.0.0.1"}

        def peer_admits(address: IAddress) -> bool:
            return getattr(address, "host", None) in self.allowed_peers

        self.gate = AdmissionFactory(Factory.forProtocol(Recording), self.admission,
                                     lambda reason, peer: self.refused.append((reason, peer)),
                                     peer_admits, describe=lambda a: getattr(a, "host", "?"))

    def test_builds_while_there_is_room_and_the_peer_is_under_its_cap(self) -> None:
        protocol = self.gate.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.assertIsInstance(protocol, Recording)
        self.assertEqual(self.refused, [])

    def test_over_the_peer_cap_nothing_is_built(self) -> None:
        self.assertIsNone(self.gate.buildProtocol(IPv4Address("TCP", "127.0.0.2", 1)))
        self.assertEqual(self.refused, [(PEER, "127.0.0.2")])

    def test_without_descriptors_nothing_is_built(self) -> None:
        self.fake.open = 1024 - 20
        self.clock.advance(1.0)
        self.assertIsNone(self.gate.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)))
        self.assertEqual(self.refused, [(FULL, None)])
