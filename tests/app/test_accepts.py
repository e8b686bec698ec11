"""Accept errors reach the server log, at most one line per interval."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogPublisher, Logger
from twisted.trial.unittest import TestCase

from stapsrv.app.accepts import AcceptErrorLog
from stapsrv.app.logs import format_line


class AcceptErrorLogTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.publisher = LogPublisher()
        self.lines: list[str] = []

        def keep(event: LogEvent) -> None:
            line = format_line(event)
            if line is not None:
                self.lines.append(line)

        self.publisher.addObserver(keep)
        self.service = AcceptErrorLog(self.clock, 10.0, self.publisher)
        self.service.observer.log = Logger(namespace="stapsrv", observer=self.publisher)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        # What twisted.internet.tcp's accept loop logs, in its namespace.
        self.port_log = Logger(namespace="twisted.internet.tcp.Port", observer=self.publisher)

    def emfile_burst(self, closed: int) -> None:
        self.port_log.info("EMFILE encountered; releasing reserved file descriptor.")
        for number in range(closed):
            self.port_log.info("EMFILE recovery: Closed socket from {address}",
                               address=("127.0.0.1", 40000 + number))
        self.port_log.info("Re-reserving EMFILE recovery file descriptor.")

    def test_emfile_is_logged_once_per_interval(self) -> None:
        self.emfile_burst(3)
        self.assertEqual(len(self.lines), 1)
        self.assertIn("Cannot accept connections: EMFILE (the server is out of file "
                      "descriptors", self.lines[0])
        for _ in range(50):
            self.clock.advance(0.1)
            self.emfile_burst(2)
        self.assertEqual(len(self.lines), 1, "rate-limited")
        self.clock.advance(10)
        self.emfile_burst(1)
        self.assertEqual(len(self.lines), 2)
        # The first burst's 3 closes came after its line, the last one's after this.
        self.assertIn("51 time(s) and 103 connection(s) closed unanswered", self.lines[1])

    def test_other_errors_and_not_aborted_connections(self) -> None:
        self.port_log.info("Could not accept new connection ({acceptError})",
                           acceptError="ECONNABORTED")
        self.assertEqual(self.lines, [])
        self.port_log.info("Could not accept new connection ({acceptError})",
                           acceptError="ENFILE")
        self.assertEqual(len(self.lines), 1)
        self.assertIn("ENFILE (the system is out of file descriptors)", self.lines[0])

    def test_other_namespaces_ignored(self) -> None:
        Logger(namespace="elsewhere", observer=self.publisher).info(
            "EMFILE encountered; releasing reserved file descriptor.")
        self.assertEqual(self.lines, [])

    def test_stopped_service_stops_listening(self) -> None:
        self.service.stopService()
        self.emfile_burst(1)
        self.assertEqual(self.lines, [])
