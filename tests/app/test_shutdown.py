"""SIGTERM ends twistd with status 0 and 4.8's log line."""

from __future__ import annotations

import signal

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from stapsrv.app.shutdown import CleanExitOnSignal


class FakeReactor:
    _exitSignal: int | None = None


class CleanExitTests(TestCase):
    def stop_after(self, number: int | None) -> tuple[FakeReactor, list[str]]:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        reactor = FakeReactor()
        reactor._exitSignal = number
        service = CleanExitOnSignal(reactor)
        service.startService()
        service.stopService()
        return reactor, [formatEvent(event) for event in events]

    def test_sigterm_and_sigint_exit_cleanly(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            reactor, lines = self.stop_after(number)
            self.assertIsNone(reactor._exitSignal, "twistd will not re-raise it")
            self.assertIn(f"Received signal {int(number)}, exiting", lines)

    def test_other_stops_are_left_alone(self) -> None:
        reactor, lines = self.stop_after(None)
        self.assertIsNone(reactor._exitSignal)
        self.assertEqual(lines, [])
        reactor, lines = self.stop_after(signal.SIGHUP)
        self.assertEqual(reactor._exitSignal, signal.SIGHUP)
