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
    def test_measured_near_the_limit_at_most_once_a_second(self) -> None:
        clock, fake = Clock(), FakeCount(10, 1024)
        descriptors = Descriptors(clock, count=fake.count, limit=lambda: fake.limit, near=200)
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
        # Far from the limit, the estimate is trusted: no listing.
        self.assertEqual(descriptors.in_use(), 14)
        self.assertEqual(fake.reads, 1)
        for _ in range(900):
            descriptors.opened()
        fake.open += 900
        self.assertEqual(descriptors.in_use(), 930)  # near: measured
        self.assertEqual(fake.reads, 2)
        descriptors.opened()
        self.assertEqual(descriptors.in_use(), 931)  # not again within the second
        self.assertEqual(fake.reads, 2)
        self.assertEqual(descriptors.limit, 1024)

    def test_a_failed_measure_counts_as_full(self) -> None:
        clock, fake = Clock(), FakeCount(1000, 1024)
        descriptors = Descriptors(clock, count=fake.count, limit=lambda: fake.limit, near=100)
        self.assertEqual(descriptors.in_use(), 1000)

        def emfile() -> int:
            raise OSError(24, "Too many open files")

        descriptors._count = emfile
        clock.advance(1.0)
        self.assertEqual(descriptors.in_use(), 1024)
        descriptors.opened()
        self.assertEqual(descriptors.in_use(), 1024)  # full until measured again
        descriptors._count = fake.count
        fake.open = 1001
        clock.advance(1.0)
        self.assertEqual(descriptors.in_use(), 1001)

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
        # Each reason names its own addresses: 10.0.0.1 was never over the cap.
        self.assertIn(": 30 waiting longest without a request (most from 10.0.0.1 (30)), 1 new "
                      "ones with no descriptor to spare, 60 over the per-peer cap (most from "
                      "127.0.0.2 (60)) (", self.lines[1])
        self.clock.advance(60.0)
        self.assertEqual(len(self.lines), 2, "nothing to say, no line")
        self.report.closed(FULL)
        self.assertEqual(len(self.lines), 3)
        self.assertNotIn("most from", self.lines[2])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FakeConnection:
    def __init__(self, admission: Admission, since: float | None,
                 peer: str | None = "10.0.0.1") -> None:
        self.admission = admission
        self.waiting_since = since
        self.waiting_peer = peer
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True


class CountingConnection(FakeConnection):
    """Counts how often admission asks whether it is waiting."""

    def __init__(self, admission: Admission, since: float | None) -> None:
        super().__init__(admission, since)
        self.asked = 0

    @property  # type: ignore[misc]
    def waiting_since(self) -> float | None:
        self.asked += 1
        return self._since

    @waiting_since.setter
    def waiting_since(self, since: float | None) -> None:
        self._since = since


class AdmissionTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100.0)
        self.fake = FakeCount(20, 100)  # reserve 128 becomes 25, floor 6
        self.admission = Admission(self.clock, 128, self.fake.descriptors(self.clock))
        self.admission.report.log = Logger(namespace="stapsrv", observer=LogPublisher())

    def open(self, since: float | None, peer: str | None = "10.0.0.1",
             kind: type[FakeConnection] = FakeConnection) -> FakeConnection:
        connection = kind(self.admission, since)
        connection.waiting_peer = peer
        self.fake.open += 1
        self.admission.opened(connection)
        return connection

    def test_the_first_accepted_are_closed_when_the_reserve_is_gone(self) -> None:
        busy = [self.open(None) for _ in range(10)]  # requests in: never closed
        idle = [self.open(float(n)) for n in range(45)]  # 75 in use, 25 free
        self.assertFalse(any(connection.evicted for connection in busy + idle))
        newest = self.open(100.0)  # 24 free: close 26, the first accepted
        self.assertEqual([c for c in idle if c.evicted], idle[:26])
        self.assertFalse(newest.evicted or any(c.evicted for c in busy))
        # Until they are gone, their descriptors are still in use, but the
        # shortage they answer is not counted again.
        self.open(100.0)
        self.assertEqual(sum(1 for c in idle if c.evicted), 26)
        for connection in idle[:26]:
            self.admission.closed(connection)
            self.fake.open -= 1
        self.assertEqual(self.admission.descriptors.in_use(), 51)

    def test_the_new_connection_is_never_closed_for_room(self) -> None:
        # 900 connections of 1000 have their request in, and descriptors
        # are short: a newcomer, then the next, are kept, not closed at once.
        self.fake.limit = 1000
        self.admission = Admission(self.clock, 128, self.fake.descriptors(self.clock))
        self.admission.report.log = Logger(namespace="stapsrv", observer=LogPublisher())
        for _ in range(900):
            self.open(None)
        self.fake.open = 1000 - 100  # 100 free, under the reserve (128)
        self.clock.advance(1.0)
        newcomers = [self.open(self.clock.seconds()) for _ in range(3)]
        self.assertFalse(any(c.evicted for c in newcomers))
        # Young ones are spared too: a connection accepted a moment ago.
        self.clock.advance(1.0)
        later = self.open(self.clock.seconds())
        self.assertFalse(any(c.evicted for c in newcomers + [later]))
        # Past their grace, waiting ones go.
        self.clock.advance(1.5)
        self.open(self.clock.seconds())
        self.assertTrue(all(c.evicted for c in newcomers))
        self.assertFalse(later.evicted)

    def test_the_busiest_peers_go_first(self) -> None:
        honest = self.open(1.0, "192.0.2.1")
        flood = [self.open(float(n), "203.0.113.9") for n in range(2, 56)]
        self.open(100.0, "192.0.2.2")  # 24 free: 26 go, all the flood's
        self.assertFalse(honest.evicted)
        self.assertEqual([c for c in flood if c.evicted], flood[:26])

    def test_with_none_to_close_connections_are_not_searched_at_every_accept(self) -> None:
        watched = [self.open(None, kind=CountingConnection) for _ in range(74)]
        asked = sum(c.asked for c in watched)  # type: ignore[attr-defined]
        for _ in range(10):
            self.open(self.clock.seconds())  # short, and nobody may go
        self.assertLessEqual(sum(c.asked for c in watched) - asked,  # type: ignore[attr-defined]
                             74, "searched once, not at each of the ten")

    def test_new_connections_have_room_until_the_floor(self) -> None:
        self.fake.open = 93
        self.assertTrue(self.admission.has_room())  # the new one makes 94: 6 free
        self.fake.open = 94
        self.clock.advance(1.0)
        self.assertFalse(self.admission.has_room())

    def test_before_refusing_a_new_connection_room_is_made(self) -> None:
        idle = [self.open(float(n)) for n in range(50)]  # 70 in use: 30 free
        self.assertFalse(any(c.evicted for c in idle))
        self.fake.open = 95  # the server's own files: 5 free, under the floor
        self.clock.advance(1.0)
        self.assertTrue(self.admission.has_room())
        self.assertTrue(any(c.evicted for c in idle))


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
