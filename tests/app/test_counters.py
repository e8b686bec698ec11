"""The file of request counters that ``stap-server status`` reads."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from stapsrv.app.counters import CountersFileService
from stapsrv.core.counters import Counters, parse


class ServiceTests(TestCase):
    def test_rewrites_through_the_open_file_after_a_rename(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        path = base / "new"
        counters = Counters()
        clock = Clock()
        service = CountersFileService(path, lambda: counters, clock, interval=0.5)
        service.startService()
        self.assertEqual(parse(path.read_text()), Counters())
        renamed = base / "1234.counters"
        path.rename(renamed)
        counters.requests = 5
        counters.cache_hits = 4
        clock.advance(0.5)
        self.assertEqual(parse(renamed.read_text()), Counters(requests=5, cache_hits=4))
        counters.failures = 1
        service.stopService()
        self.assertEqual(parse(renamed.read_text()),
                         Counters(requests=5, failures=1, cache_hits=4))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_unwritable_file_is_a_warning_not_a_crash(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = CountersFileService(Path("/nonexistent/dir/file"), Counters, Clock())
        service.startService()
        service.stopService()
        warnings = [formatEvent(event) for event in events
                    if event["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("Cannot write request counters to /nonexistent/dir/file", warnings[0])
